"""HuggingFace DistilBERT -> jaxssl export (hf_distilbert.py through `python -m jaxssl.convert from-hf`), against
transformers' DistilBertForMaskedLM / DistilBertModel on the same random weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_bert, hf_distilbert  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.mesh import make_mesh  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_hf import V, batch, close, write_vocab  # noqa: E402  (tests/ is on sys.path)

SIZES = dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)


def randomised(model):
  """LayerNorms and biases drawn away from their init, so a swapped scale/bias or a missed bias would show."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


@pytest.fixture(scope='module')
def mlm(tmp_path_factory):
  """(DistilBertForMaskedLM, its hub-style directory, the jaxssl export converted from it)."""
  torch.manual_seed(0)
  model = randomised(transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(**SIZES)))
  d = tmp_path_factory.mktemp('distilbert')
  model.save_pretrained(d / 'hf')
  write_vocab(d / 'hf')
  convert_main(['from-hf', '--src', str(d / 'hf'), '--out', str(d / 'params')])
  return model, str(d / 'hf'), str(d / 'params')


def one_device():
  return make_mesh((1, 1, 1), jax.devices()[:1])


def assert_states_and_mlm_logits_match(ours, out, args, positions):
  """A jaxssl BERT export's model `ours` against transformers' output `out` (output_hidden_states) on the same
  batch `args` (ids, token types, mask): every layer's hidden states, and the MLM logits at `positions`."""
  hidden, logits = [h.numpy() for h in out.hidden_states], out.logits.numpy()
  _, _, our_hidden = ours.encode(*args, return_hidden_states=True)
  assert len(our_hidden) == len(hidden) == 3
  for i, (a, b) in enumerate(zip(our_hidden, hidden)):
    close(a, b, f'hidden state {i}')
  our_mlm, _ = ours(*args, jnp.asarray(positions, jnp.int32))
  close(our_mlm, np.take_along_axis(logits, positions[:, :, None], axis=1), 'MLM logits')
  return our_mlm


def test_import_matches_transformers(mlm):
  """Hidden states of every layer and MLM logits; segment ids change nothing (the token-type rows are zeros)."""
  model, _, export = mlm
  config, ours, tokenizer = load_export(export, one_device())
  m = config.model
  assert (m.num_layers, m.hidden_size, m.num_heads, m.intermediate_size, m.max_position) == (2, 32, 4, 37, 64)
  assert tokenizer.vocab_size == V and config.vocab_size == V
  assert_matches_without_token_types(model, ours)


def assert_matches_without_token_types(model, ours):
  """transformers' masked LM `model` (no token types) against the export's model `ours` on test_convert_hf's
  batch: every layer's states and the MLM logits; segment ids change nothing (the token-type rows are zeros)."""
  ids, types, mask, positions = batch()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
  args = [jnp.asarray(a, jnp.int32) for a in (ids, types, mask)]
  our_mlm = assert_states_and_mlm_logits_match(ours, out, args, positions)
  no_types, _ = ours(args[0], jnp.zeros_like(args[1]), args[2], jnp.asarray(positions, jnp.int32))
  np.testing.assert_array_equal(no_types, our_mlm)


def test_bare_model_and_classifier_checkpoints(tmp_path, capsys):
  """DistilBertModel (no prefix, no MLM head: it and the pooler start fresh) and a fine-tuned
  DistilBertForSequenceClassification (its pre_classifier/classifier named as unused) give the body's states."""
  torch.manual_seed(1)
  cls = randomised(transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**SIZES)))
  bare = transformers.DistilBertModel(cls.config).eval()
  bare.load_state_dict(cls.distilbert.state_dict())
  ids, types, mask, _ = batch(1)
  with torch.no_grad():
    want = bare(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  for name, model in (('bare', bare), ('cls', cls)):
    model.save_pretrained(tmp_path / name)
    write_vocab(tmp_path / name)
    convert_main(['from-hf', '--src', str(tmp_path / name), '--out', str(tmp_path / f'{name}_params')])
    printed = capsys.readouterr().out
    assert 'new heads' in printed and 'pooler' in printed and 'MLM head' in printed
    assert ('pre_classifier.weight' in printed) == (name == 'cls')
    _, ours, _ = load_export(str(tmp_path / f'{name}_params'), one_device())
    seq, _ = ours.encode(*[jnp.asarray(a, jnp.int32) for a in (ids, types, mask)])
    close(seq, want, f'{name}: last hidden state')


def test_config_names_defaults_and_refusals():
  """DistilBERT's names become BERT's; omitted keys take DistilBertConfig's defaults; a ReLU one is refused."""
  got = hf_distilbert.bert_config({'model_type': 'distilbert'})
  theirs = transformers.DistilBertConfig()
  assert (got['hidden_size'], got['num_hidden_layers'], got['num_attention_heads'], got['intermediate_size'],
          got['hidden_act'], got['max_position_embeddings']) == (
      theirs.dim, theirs.n_layers, theirs.n_heads, theirs.hidden_dim, theirs.activation,
      theirs.max_position_embeddings)
  model = hf_bert.jaxssl_config({'model_type': 'distilbert', **SIZES, 'dropout': 0.2}).model
  assert (model.hidden_size, model.dropout_rate, model.type_vocab_size) == (32, 0.2, 2)
  assert hf_bert.jaxssl_config({'model_type': 'distilbert', 'activation': 'relu'}).model.hidden_act == 'relu'
  with pytest.raises(Exception, match="hidden_act='silu'"):
    hf_bert.jaxssl_config({'model_type': 'distilbert', 'activation': 'silu'})

"""HuggingFace ELECTRA -> jaxssl export (hf_electra.py through `python -m jaxssl.convert from-hf`): factorised
embeddings (model.embedding_size), against transformers' ElectraForMaskedLM / ElectraForPreTraining on the same
random weights. (The FLOPs formula with factorised embeddings: tests/test_bench.py.)"""
import jax.numpy as jnp
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_bert  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_distilbert import assert_states_and_mlm_logits_match, one_device, randomised  # noqa: E402
from test_convert_hf import V, batch, close, write_vocab  # noqa: E402  (tests/ is on sys.path)

# Embeddings of 16 projected to 32: ELECTRA-small's shape (128 -> 256) in miniature.
SIZES = dict(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64)


def converted(model, tmp_path, name):
  model.save_pretrained(tmp_path / name)
  write_vocab(tmp_path / name)
  convert_main(['from-hf', '--src', str(tmp_path / name), '--out', str(tmp_path / f'{name}_params')])
  return str(tmp_path / f'{name}_params')


def test_generator_matches_transformers(tmp_path):
  """ElectraForMaskedLM (the generator): every layer's hidden states, the MLM logits (its head ends at the
  embedding width, tied to the word embeddings), the pair segment's token types."""
  torch.manual_seed(0)
  model = randomised(transformers.ElectraForMaskedLM(transformers.ElectraConfig(**SIZES)))
  config, ours, tokenizer = load_export(converted(model, tmp_path, 'generator'), one_device())
  assert (config.model.embedding_size, config.model.hidden_size) == (16, 32)
  assert ours.word_embeddings.embedding[...].shape == (V, 16)
  ids, types, mask, positions = batch()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  assert_states_and_mlm_logits_match(ours, out, [jnp.asarray(a, jnp.int32) for a in (ids, types, mask)], positions)


def test_discriminator_and_to_hf(tmp_path, capsys):
  """ElectraForPreTraining (the discriminator, what ELECTRA fine-tuning starts from): its body's states, its
  replaced-token head named as unused, the heads it lacks new; to-hf refuses factorised embeddings in one line."""
  torch.manual_seed(1)
  model = randomised(transformers.ElectraForPreTraining(transformers.ElectraConfig(**SIZES)))
  export = converted(model, tmp_path, 'discriminator')
  printed = capsys.readouterr().out
  assert 'discriminator_predictions.dense.weight' in printed and 'new heads' in printed and 'MLM head' in printed
  _, ours, _ = load_export(export, one_device())
  ids, types, mask, _ = batch(1)
  with torch.no_grad():
    want = model.electra(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                         attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  seq, _ = ours.encode(*[jnp.asarray(a, jnp.int32) for a in (ids, types, mask)])
  close(seq, want, 'last hidden state')
  with pytest.raises(UserError, match='factorised embeddings'):
    hf_bert.to_hf(export, str(tmp_path / 'back'))


"""HuggingFace MPNet -> jaxssl export (hf_mpnet.py through `python -m jaxssl.convert from-hf`): BERT with a relative
position bias (model.relative_attention_buckets), against transformers' MPNetForMaskedLM / MPNetModel on the same
random weights. (Packed fine-tuning with the bias: tests/test_packing.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_bert, hf_mpnet  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.models import bert, relative_positions  # noqa: E402
from jaxssl.models.layers import MultiHeadAttention  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_distilbert import assert_matches_without_token_types, one_device, randomised  # noqa: E402
from test_convert_hf import V, close, write_vocab  # noqa: E402  (tests/ is on sys.path)

SIZES = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
             max_position_embeddings=202, layer_norm_eps=1e-5)


def converted(model, tmp_path, name):
  model.save_pretrained(tmp_path / name)
  write_vocab(tmp_path / name)
  convert_main(['from-hf', '--src', str(tmp_path / name), '--out', str(tmp_path / f'{name}_params')])
  return str(tmp_path / f'{name}_params')


def test_buckets_equal_transformers_at_every_distance():
  """Every offset up to ±300 (exact buckets below 8, log-spaced ones to 128, the last bucket beyond) lands in the
  bucket transformers' MPNet computes, float32 rounding at the log bucket edges included."""
  t = 301
  want = transformers.models.mpnet.modeling_mpnet.MPNetEncoder.relative_position_bucket(
      torch.arange(t)[None, :] - torch.arange(t)[:, None]).numpy()
  got = relative_positions.relative_position_buckets(t, hf_mpnet.BUCKETS)
  np.testing.assert_array_equal(got, want)
  assert set(np.unique(got)) == set(range(32)) - {16}  # offset 0 counts as 'before': 16 (after, 0) is never hit


def test_masked_lm_matches_transformers(tmp_path):
  """MPNetForMaskedLM: every layer's hidden states and the MLM logits (the last layer at the masked rows only,
  which reads those rows of the bias); token types change nothing (zero rows); positions from HF's row 2."""
  torch.manual_seed(0)
  model = randomised(transformers.MPNetForMaskedLM(transformers.MPNetConfig(**SIZES)))
  config, ours, tokenizer = load_export(converted(model, tmp_path, 'mlm'), one_device())
  m = config.model
  assert (m.relative_attention_buckets, m.max_position, m.layer_norm_eps) == (32, 200, 1e-5)
  assert ours.relative_attention_bias[...].shape == (32, 4)
  assert_matches_without_token_types(model, ours)


def test_long_rows_and_bare_model(tmp_path, capsys):
  """A bare MPNetModel (pooler kept, MLM and NSP heads new) on 160-token rows, past the exact buckets and the
  128 maximum distance: last hidden state and pooler output. A classifier checkpoint's head is named unused."""
  torch.manual_seed(1)
  cls = randomised(transformers.MPNetForSequenceClassification(transformers.MPNetConfig(**SIZES, num_labels=3)))
  bare = transformers.MPNetModel(cls.config).eval()
  bare.load_state_dict(cls.mpnet.state_dict(), strict=False)
  export = converted(bare, tmp_path, 'bare')
  assert 'new heads' in capsys.readouterr().out
  converted(cls, tmp_path, 'cls')
  assert 'classifier.dense.weight' in capsys.readouterr().out
  rng = np.random.default_rng(0)
  lengths = np.array([160, 97])
  mask = (np.arange(160)[None] < lengths[:, None]).astype(np.int64)
  ids = rng.integers(5, V, (2, 160)) * mask + (1 - mask)  # HF's padding id 1
  with torch.no_grad():
    out = bare(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  _, ours, _ = load_export(export, one_device())
  seq, pooled = ours.encode(*[jnp.asarray(a, jnp.int32) for a in (ids, np.zeros_like(ids), mask)])
  real = mask.astype(bool)
  close(np.asarray(seq)[real], out.last_hidden_state.numpy()[real], 'last hidden state')
  close(pooled, out.pooler_output.numpy(), 'pooler output')


def test_explicit_attention_path_adds_the_bias_too():
  """The hand-written path (taken under attention dropout) and the fused one agree with a bias, and so do the
  few query rows of `query_positions`."""
  with nnx.use_eager_sharding(False):  # no mesh: plain arrays
    attention = MultiHeadAttention(16, 2, stddev=0.5, attention_dropout_rate=0.0, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 20, 16))
  mask = jnp.asarray(np.arange(20)[None] < np.array([[20], [13]]), jnp.int32)
  bias = relative_positions.bucket_bias(jax.random.normal(jax.random.key(2), (8, 2)), 20)
  fused = attention(x, mask, bias=bias)
  np.testing.assert_allclose(attention(x, mask, bias=bias, explicit=True), fused, rtol=1e-5, atol=1e-5)
  assert not np.allclose(attention(x, mask), fused, atol=1e-3)  # the bias matters
  rows = jnp.asarray([[0, 5, 19], [2, 3, 12]])
  np.testing.assert_allclose(attention(x, mask, bias=bias, query_positions=rows),
                             np.take_along_axis(np.asarray(fused), np.asarray(rows)[:, :, None], axis=1),
                             rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
  """Other bucket counts (transformers ignores them), to-hf of an MPNet export, the bias with block-sparse
  attention: one line each."""
  with pytest.raises(UserError, match='relative_attention_num_buckets=64.*only 32'):
    hf_mpnet.bert_config(dict(SIZES, model_type='mpnet', relative_attention_num_buckets=64))
  with pytest.raises(UserError, match='even number >= 4'):
    bert.BertConfig.from_config(dict(num_layers=1, hidden_size=8, num_heads=2, intermediate_size=8,
                                     relative_attention_buckets=5), V)
  with pytest.raises(UserError, match='block-sparse'):
    bert.BertConfig.from_config(dict(num_layers=1, hidden_size=8, num_heads=2, intermediate_size=8,
                                     relative_attention_buckets=32, attention_type='block_sparse'), V)
  torch.manual_seed(2)
  export = converted(transformers.MPNetModel(transformers.MPNetConfig(**SIZES)).eval(), tmp_path, 'm')
  with pytest.raises(UserError, match='relative position bias.*imported MPNet'):
    hf_bert.to_hf(export, str(tmp_path / 'back'))

"""The fused blockwise projection + cross-entropy (model.loss_chunk) equals the plain [B, T, V]-logits loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.errors import UserError
from jaxssl.families import build_model
from jaxssl.families import gpt as gpt_family
from jaxssl.models import gpt, lm_loss

B, T, H, V = 2, 16, 8, 50


def packed_rows():
  ids = jax.random.randint(jax.random.key(2), (B, T), 0, V)
  seg = jnp.asarray(np.array([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16]), jnp.int32)
  return ids, seg


@pytest.mark.parametrize('chunk', [4, T])
def test_values_and_gradients_equal_the_plain_loss(chunk):
  x = jax.random.normal(jax.random.key(0), (B, T, H))
  w = jax.random.normal(jax.random.key(1), (V, H))
  ids, seg = packed_rows()
  targets, valid = gpt.next_token_targets(ids, seg)

  def plain(x, w):
    loss, correct, _ = gpt.next_token_stats(jnp.einsum('bth,vh->btv', x, w), ids, seg)
    return loss, correct

  def fused(x, w):
    return lm_loss.next_token_stats(x, w, targets, valid, chunk)
  for got, want in zip(jax.jit(fused)(x, w), plain(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  # A scaled loss (what dividing by the token count does) scales both gradients.
  grads = jax.jit(jax.grad(lambda x, w: 0.5 * fused(x, w)[0], argnums=(0, 1)))(x, w)
  expected = jax.grad(lambda x, w: 0.5 * plain(x, w)[0], argnums=(0, 1))(x, w)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('variant', ['tiny', 'llama_tiny'])  # tied embeddings, and a separate lm_head
def test_train_sums_and_gradients_same_with_and_without_chunks(variant):
  ids, seg = packed_rows()
  batch = {'input_ids': ids, 'segment_ids': seg,
           'positions': jnp.asarray(np.array([list(range(10)) + list(range(4)) + [0, 0], list(range(16))]))}
  results = []
  for chunk in (0, 8):
    c = load_config(f'configs/gpt.py:{variant}').model
    c.update(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=0 if variant == 'tiny' else 1,
             intermediate_size=64, max_position=T, loss_chunk=chunk)
    with nnx.use_eager_sharding(False):
      graphdef, params = nnx.split(build_model(c, V, rngs=nnx.Rngs(params=0)))

    def loss(params):
      sums = gpt_family.lm_sums(graphdef, params, batch, jax.random.key(3))
      return sums['lm_loss'] / sums['lm_count'], sums
    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results.append((value, sums, grads))
  (v0, s0, g0), (v1, s1, g1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  assert float(s1['lm_count']) == float(s0['lm_count']) == 27.0 and float(s1['lm_correct']) == float(s0['lm_correct'])
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_negative_chunk_is_refused():
  c = load_config('configs/gpt.py:tiny').model
  c.loss_chunk = -1
  with pytest.raises(UserError, match=r'model.loss_chunk=-1 must be >= 0 \(0 = the whole logits at once\)'):
    gpt.GPTConfig.from_config(c, V)


def test_bfloat16_compute_keeps_a_float32_loss():
  """bf16 hidden states and weights (model.dtype=bfloat16): float32 logits and loss, bf16 cotangents as the plain
  path gives them, values within bf16 rounding of the float32 loss."""
  x = jax.random.normal(jax.random.key(0), (B, T, H))
  w = jax.random.normal(jax.random.key(1), (V, H))
  ids, seg = packed_rows()
  targets, valid = gpt.next_token_targets(ids, seg)
  loss32, _ = lm_loss.next_token_stats(x, w, targets, valid, 4)
  loss16, _ = lm_loss.next_token_stats(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), targets, valid, 4)
  assert loss16.dtype == jnp.float32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)
  gx, gw = jax.grad(lambda x, w: lm_loss.next_token_stats(x, w, targets, valid, 4)[0], argnums=(0, 1))(
      x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
  assert gx.dtype == gw.dtype == jnp.bfloat16
  ex, ew = jax.grad(lambda x, w: lm_loss.next_token_stats(x, w, targets, valid, 4)[0], argnums=(0, 1))(x, w)
  np.testing.assert_allclose(np.asarray(gw, np.float32), ew, atol=0.05 * float(np.abs(ew).max()))
  np.testing.assert_allclose(np.asarray(gx, np.float32), ex, atol=0.05 * float(np.abs(ex).max()))


@pytest.mark.parametrize('vocab_slice', [16, 64])  # 4 slices (the last of 2 entries), and one whole slice
def test_vocab_sliced_gradient_equals_the_chunked_one(vocab_slice, monkeypatch):
  """The bfloat16 XLA:CPU path (`_sliced_fwd`: blocks of rows, the vocabulary in slices, a running logsumexp)
  computes the same loss, count and gradients as the chunked one: in float32 to rounding, and in bfloat16 (what
  `next_token_stats` takes it for on CPU) within bfloat16 rounding of float32."""
  x = jax.random.normal(jax.random.key(0), (B, T, H))
  w = jax.random.normal(jax.random.key(1), (V, H))
  ids, seg = packed_rows()
  targets, valid = gpt.next_token_targets(ids, seg)
  (want, want_grads) = lm_loss._stats_fwd(x, w, targets, valid, 4)  # float32: the chunked path
  (got, got_grads) = jax.jit(lambda x, w: lm_loss._sliced_fwd(x, w, targets, valid, 8, vocab_slice))(x, w)
  for a, b in zip((*got, *got_grads), (*want, *want_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert lm_loss._cpu_chunk(8, 256, 64) == 256 and lm_loss._cpu_chunk(32, 1024, 64) == 64
  assert lm_loss._cpu_chunk(4, 12, 4) == 12 and lm_loss._cpu_chunk(3, 1000, 8) == 500
  monkeypatch.setattr(lm_loss, 'VOCAB_SLICE', vocab_slice)
  grad = jax.jit(jax.grad(lambda x, w: lm_loss.next_token_stats(x, w, targets, valid, 4)[0], argnums=(0, 1)))
  for got, want in zip(grad(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)), want_grads):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.02 * float(np.abs(want).max()))

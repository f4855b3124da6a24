"""attention_core.softmax_attention (the custom-gradient attention core of bfloat16 XLA:CPU) against the spelled-out
attention: values, gradients with dropout and masks, the layout its products compile to, and the GPT and BERT
attention layers that take it."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.models import attention_core, dropout, gpt, layers, parts

B, N, M, D = 2, 3, 32, 16


def _spelled_out(q, k, v, mask, rate, rng):
  """What autodiff differentiates on the other paths (layers.MultiHeadAttention, parts.CausalSelfAttention)."""
  logits = jnp.einsum('bnqd,bnkd->bnqk', q, k, preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(D))
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.einsum('bnqk,bnkd->bnqd', dropout.dropout(probs, rate, rng).astype(q.dtype), v)


def _inputs(dtype):
  q, k, v, g = (jax.random.normal(key, (B, N, M, D)).astype(dtype) for key in jax.random.split(jax.random.key(0), 4))
  # Causal, keys 28.. padding, and query rows 30.. padding too (nothing to attend: a uniform row, as before).
  keys = jnp.arange(M) < 28
  mask = jnp.tril(jnp.ones((M, M), bool))[None, None] & keys[None, None, None] & keys[None, None, :, None]
  return q, k, v, g, mask


def _value_and_grads(fn, q, k, v, g):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(g))


@pytest.mark.parametrize('rate', [0.0, 0.1])
def test_core_equals_spelled_out_attention_in_float32(rate):
  q, k, v, g, mask = _inputs(jnp.float32)
  rng = jax.random.key(7) if rate else None
  got = jax.jit(lambda *a: _value_and_grads(lambda q, k, v: attention_core.softmax_attention(q, k, v, mask, rate, rng),
                                            *a))(q, k, v, g)
  want = _value_and_grads(lambda q, k, v: _spelled_out(q, k, v, mask, rate, rng), q, k, v, g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=2e-6)
  assert float(jnp.abs(got[2]).max()) > 0  # the keys' gradient is not trivially zero


@pytest.mark.parametrize('rate', [0.0, 0.1])
def test_core_in_bfloat16_is_as_close_to_float32_as_autodiff(rate):
  """bfloat16 values equal the spelled-out path's; gradients within bfloat16 rounding of the float32 ones, no
  further off than autodiff's own bfloat16 gradients."""
  q, k, v, g, mask = _inputs(jnp.float32)
  rng = jax.random.key(7) if rate else None
  low = [a.astype(jnp.bfloat16) for a in (q, k, v, g)]
  core = jax.jit(lambda *a: _value_and_grads(lambda q, k, v: attention_core.softmax_attention(q, k, v, mask, rate, rng),
                                             *a))(*low)
  auto = _value_and_grads(lambda q, k, v: _spelled_out(q, k, v, mask, rate, rng), *low)
  exact = _value_and_grads(lambda q, k, v: _spelled_out(q, k, v, mask, rate, rng), q, k, v, g)
  assert all(a.dtype == jnp.bfloat16 for a in core)
  np.testing.assert_array_equal(np.asarray(core[0], np.float32), np.asarray(auto[0], np.float32))
  for ours, theirs, ref in zip(core[1:], auto[1:], exact[1:]):
    err = float(np.abs(np.asarray(ours, np.float32) - ref).max())
    assert err <= 0.03 * float(np.abs(ref).max()), err
    assert err <= 2.0 * float(np.abs(np.asarray(theirs, np.float32) - ref).max()) + 1e-3


def test_core_gradient_products_read_bfloat16_only():
  """Every dot of the compiled bfloat16 gradient reads bfloat16 operands (XLA:CPU converts a layout YNNPACK cannot
  take to float32 first: the slow products the core exists to avoid)."""
  q, k, v, g, mask = _inputs(jnp.bfloat16)
  fn = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: attention_core.softmax_attention(q, k, v, mask, 0.1, jax.random.key(1)), *a))
  hlo = fn.lower(q, k, v, g).compile().as_text()
  with_dots = [c for c in re.findall(r'^%[\w.\-]+ \(.*?\n\}', hlo, re.M | re.S) if ' dot(' in c]
  assert len(with_dots) == 6, hlo  # forward: scores, output; gradient: d_kept, d_v, d_q, d_k
  for body in with_dots:
    for operand in re.findall(r'= (\w+)\[[\d,]*\]\{[\d,]*\} parameter', body):
      assert operand == 'bf16', body


def _bf16_layer_grads(layer, x, *args, **kw):
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    y = nnx.merge(graphdef, state)(x, *args, **kw)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y
  (_, y), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
  return y, grads


def _assert_close(core, spelled_out):
  """Outputs and gradients (of the layer's parameters and input) within bfloat16 rounding. Not the key bias's:
  its exact gradient is zero (a softmax does not change when a row's scores all move by q . bias), so both paths
  give rounding noise there."""
  (y1, g1), (y0, g0) = core, spelled_out
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y0, np.float32), atol=0.03)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
    if 'key_bias' not in jax.tree_util.keystr(path):
      a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
      np.testing.assert_allclose(a, b, atol=0.03 * float(np.abs(b).max()) + 1e-3, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('kv_heads', [0, 2])  # multi-head, and grouped-query (4 query heads on 2 key/value heads)
def test_gpt_attention_with_and_without_the_core(monkeypatch, kv_heads):
  c = load_config('configs/gpt.py:tiny').model
  c.update(num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=kv_heads, dtype='bfloat16',
           attention_dropout_rate=0.1)
  cfg = gpt.GPTConfig.from_config(c, 50)
  with nnx.use_eager_sharding(False):
    attn = parts.CausalSelfAttention(cfg, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(0), (2, 128, 64)).astype(jnp.bfloat16)
  segments = jnp.asarray(np.repeat([[1, 2], [1, 1]], 64, axis=1))
  seg_mask = (segments[:, :, None] == segments[:, None, :])[:, None]
  results = []
  for core in (True, False):
    monkeypatch.setattr(attention_core, 'cpu_attention_core', lambda dtype, core=core: core)
    results.append(_bf16_layer_grads(attn, x, seg_mask, dropout_rng=jax.random.key(3)))
  _assert_close(*results)


def test_bert_attention_with_and_without_the_core(monkeypatch):
  with nnx.use_eager_sharding(False):
    attn = layers.MultiHeadAttention(64, 4, stddev=0.2, attention_dropout_rate=0.1, dtype=jnp.bfloat16,
                                     rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(0), (2, 48, 64)).astype(jnp.bfloat16)
  mask = jnp.asarray(np.array([[1] * 40 + [0] * 8, [1] * 20 + [2] * 28]))  # padding, and a packed row
  results = []
  for core in (True, False):
    monkeypatch.setattr(layers, 'cpu_attention_core', lambda dtype, core=core: core)
    results.append(_bf16_layer_grads(attn, x, mask, dropout_rng=jax.random.key(3)))
  _assert_close(*results)

"""Softmax attention with probability dropout as one function whose gradient is written out: the core BERT's and
GPT's hand-written attention take in bfloat16 on XLA:CPU (`cpu_attention_core`)."""
import functools

import jax
import jax.numpy as jnp

from jaxssl.models.dropout import dropout, keep_mask
from jaxssl.models.products import cpu_bfloat16, product_nt, transposed


def cpu_attention_core(dtype) -> bool:
  """Whether `softmax_attention`'s custom gradient applies: bfloat16 on XLA:CPU, where autodiff's products of the
  attention (a bfloat16 result, transposed operands) ran at 25-50 GFLOP/s (BENCHMARKS.md §42)."""
  return cpu_bfloat16(dtype)


def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dropout_rate: float,
                      dropout_rng: jax.Array | None) -> jax.Array:
  """Softmax attention with probability dropout, heads in front: q [B, N, M, D], k and v [B, N, S, D], `mask`
  bool broadcastable to [B, N, M, S] (True = may attend) -> [B, N, M, D] in q's dtype. Grouped queries: q
  [B, K, G, M, D] for k and v [B, K, S, D], mask broadcastable to [B, 1, G, M, S]. Scores and softmax in
  float32; a row with nothing to attend becomes uniform, not NaN.

  The same values as the spelled-out attention (`dropout` draws the same mask); its gradient is written out so
  that every product has a float32 result and a layout YNNPACK runs bfloat16 in: [M, K] @ [K, N], or [M, K] @
  [N, K]^T (scores, and the cotangent through the values); where the contraction runs over the rows of the left
  operand, that operand (q or the output's cotangent, never the [M, S] probabilities) is copied transposed. The
  softmax's gradient sums in float32. Meant for `cpu_attention_core` dtypes; any backend computes it.
  """
  if q.ndim == 5:  # grouped: a group's queries one after another, [B, K, G * M, D]
    b, kv, g, m, d = q.shape
    s, lead = k.shape[2], mask.shape[:2]
    mask = jnp.broadcast_to(mask, (*lead, g, m, s)).reshape(*lead, g * m, s)
    return softmax_attention(q.reshape(b, kv, g * m, d), k, v, mask, dropout_rate, dropout_rng).reshape(q.shape)
  rate = float(dropout_rate) if dropout_rng is not None else 0.0
  return _attention_core(q, k, v, mask, dropout_rng, rate)


def _one_batch_axis(product, a, b):
  """`product` of a [..., M, K] and b [..., *, *] with the leading axes merged into one batch axis: YNNPACK ran
  GPT-2 small's score products [96, 128, 64] x [96, 64, 256] ~2x faster with one batch axis than with [8, 12]."""
  lead = a.shape[:-2]
  y = product(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
  return y.reshape(*lead, *y.shape[-2:])


def _float32_product(a, b):
  """a [..., M, K] @ b [..., K, N] -> [..., M, N] float32."""
  return _one_batch_axis(functools.partial(jnp.einsum, 'bmk,bkn->bmn', preferred_element_type=jnp.float32), a, b)


def _float32_product_nt(a, b):
  """a [..., M, K] @ b [..., N, K]^T -> [..., M, N] float32 (b's transpose left to the dot)."""
  return _one_batch_axis(product_nt, a, b)


def _dropped(probs, rng, rate, dtype):
  return dropout(probs, rate, rng if rate > 0.0 else None).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_core(q, k, v, mask, rng, rate):
  return _attention_core_fwd(q, k, v, mask, rng, rate)[0]


def _attention_core_fwd(q, k, v, mask, rng, rate):
  logits = _float32_product_nt(q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  out = _float32_product(_dropped(probs, rng, rate, q.dtype), v).astype(q.dtype)
  return out, (q, k, v, mask, rng, probs)


def _attention_core_bwd(rate, saved, d_out):
  q, k, v, mask, rng, probs = saved
  d_kept = _float32_product_nt(d_out, v)  # [B, N, M, S]
  if rate == 0.0:
    kept, d_probs = probs.astype(q.dtype), d_kept
  else:  # `dropout`'s mask again: its gradient scales the kept entries' cotangents alike
    keep = keep_mask(rng, 1.0 - rate, probs.shape)
    kept = jnp.where(keep, probs / (1.0 - rate), 0.0).astype(q.dtype)
    d_probs = jnp.where(keep, d_kept / (1.0 - rate), 0.0)
  d_v = transposed(_float32_product(transposed(d_out), kept).astype(v.dtype))  # (d_out^T kept)^T
  d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))  # softmax's gradient
  d_logits = (jnp.where(mask, d_logits, 0.0) / jnp.sqrt(jnp.float32(q.shape[-1]))).astype(q.dtype)
  d_q = _float32_product(d_logits, k).astype(q.dtype)
  d_k = transposed(_float32_product(transposed(q), d_logits).astype(k.dtype))
  return d_q, d_k, d_v, None, None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)

"""Next-token cross-entropy fused with the output projection, a block of positions at a time.

The usual path writes logits [B, T, V] (0.4 GB for GPT-2 small at batch 8 x 256, float32), reads them again for
logsumexp, the target logit and argmax, and in the backward pass writes the same size of gradient and reads it
twice for the two weight-gradient matmuls. Here the logits of `chunk` positions exist at once, and under
`jax.grad` the forward pass already forms their gradient (softmax - one-hot: the loss is the last thing computed,
so its gradient is known up to the scalar cotangent) and reduces it into dL/dx and dL/dW on the spot; the
backward pass only scales them. Same FLOPs, one exp per logit instead of two, no [B, T, V] array. Numerically it
is the usual cross-entropy (float32 logits and softmax), tested against it; Levanter's blockwise cross-entropy
and Liger's fused linear cross-entropy are the same idea.

In bfloat16 on XLA:CPU the gradient takes `_sliced_fwd` instead: blocks of up to `CPU_ROWS` rows, the vocabulary
in slices of `VOCAB_SLICE` (BENCHMARKS.md §42).
"""
import functools

import jax
import jax.numpy as jnp

from jaxssl.models.products import cpu_bfloat16, product_nt, transposed

# The bfloat16 XLA:CPU gradient's shapes: rows per block (at least) and vocabulary entries per slice; at most
# MAX_SLICES slices (the slices are unrolled: Gemma 3's 262k entries would otherwise make 64 of them).
CPU_ROWS = 2048
VOCAB_SLICE = 4096
MAX_SLICES = 16


def next_token_stats(x, weights, targets, valid, chunk: int):
  """(summed cross-entropy, correct argmax predictions) over positions where `valid`, float32 scalars.

  x [B, T, H] final hidden states (compute dtype), weights [V, H] (compute dtype: the token embedding table as it
  is stored), targets [B, T] int, valid [B, T] bool; logits = x @ weights^T in float32. `chunk` positions per
  block (must divide T). Only the cross-entropy is differentiable (with respect to x and weights).

  Vocabulary-major weights because that is the tied table's layout, so no [H, V] transpose is copied going in
  and out, and a block (its three [*, V] matmuls and the transposes) ran ~10% faster on XLA:CPU (GPT-2 small
  shapes, alternating runs in one process).
  """
  return _stats(x, weights, targets, valid, chunk)


def _blocks(a, chunk):
  """[B, T, ...] -> [T / chunk, B, chunk, ...] (scanned over the first axis)."""
  b, t = a.shape[:2]
  return jnp.swapaxes(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 0, 1)


def _unblock(a):
  n, b, c = a.shape[:3]
  return jnp.swapaxes(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _block_logits(xc, weights):
  return jnp.einsum('bch,vh->bcv', xc, weights, preferred_element_type=jnp.float32)


def _block_stats(logits, tc, vc):
  """Summed nll and correct of one block, plus what its gradient needs (exp(logits - max), their sum)."""
  peak = jnp.max(logits, axis=-1, keepdims=True)
  e = jnp.exp(logits - peak)
  total = jnp.sum(e, axis=-1, keepdims=True)
  lse = (peak + jnp.log(total))[..., 0]
  target_logit = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
  nll = jnp.sum(jnp.where(vc, lse - target_logit, 0.0))
  # The target is the argmax when its logit is the maximum (already at hand): no second pass over the vocabulary
  # for an argmax. Only an exact tie with another logit counts differently (argmax takes the first).
  correct = jnp.sum((target_logit >= peak[..., 0]) & vc).astype(jnp.float32)
  return nll, correct, e, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _stats(x, weights, targets, valid, chunk):
  def body(carry, block):
    xc, tc, vc = block
    nll, correct, _, _ = _block_stats(_block_logits(xc, weights), tc, vc)
    return (carry[0] + nll, carry[1] + correct), None
  zero = jnp.zeros((), jnp.float32)
  (nll, correct), _ = jax.lax.scan(body, (zero, zero), (_blocks(x, chunk), _blocks(targets, chunk),
                                                        _blocks(valid, chunk)))
  return nll, correct


def _stats_fwd(x, weights, targets, valid, chunk):
  if cpu_bfloat16(x.dtype, weights.dtype):
    vocab_slice = max(VOCAB_SLICE, -(-weights.shape[0] // MAX_SLICES))
    return _sliced_fwd(x, weights, targets, valid, _cpu_chunk(x.shape[0], x.shape[1], chunk), vocab_slice)
  vocab = weights.shape[0]

  def body(carry, block):
    nll_sum, correct_sum, weights_grad = carry
    xc, tc, vc = block
    nll, correct, e, total = _block_stats(_block_logits(xc, weights), tc, vc)
    # d(nll)/d(logits) = softmax - one_hot(target), zero where not valid.
    onehot = jax.lax.broadcasted_iota(jnp.int32, e.shape, 2) == tc[..., None]
    dlogits = jnp.where(vc[..., None], e / total - onehot, 0.0).astype(x.dtype)
    # A float32 result: XLA:CPU's bfloat16 dot into bfloat16 ran this [c, V] x [V, H] product at 204 GFLOP/s
    # against 729 into float32 (Intel AMX host; products.bf16_matmul). Float32 inputs: the same product.
    dx = jnp.einsum('bcv,vh->bch', dlogits, weights, preferred_element_type=jnp.float32).astype(x.dtype)
    weights_grad = weights_grad + _weights_grad(dlogits, xc)
    return (nll_sum + nll, correct_sum + correct, weights_grad), dx
  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((vocab, weights.shape[1]), jnp.float32))
  (nll, correct, weights_grad), dx = jax.lax.scan(
      body, init, (_blocks(x, chunk), _blocks(targets, chunk), _blocks(valid, chunk)))
  return (nll, correct), (_unblock(dx), weights_grad.astype(weights.dtype))


def _weights_grad(dlogits, xc):
  """dlogits^T xc [V, H] in float32. In float32 formed [H, V] and transposed: XLA:CPU ran 'bcv,bch->vh' at ~90
  GFLOP/s and this at ~165 (GPT-2 small's loss and its gradient: 3.14 -> 2.86 s a step; BENCHMARKS.md §35). XLA:CPU
  has no [H, V] dot of bfloat16 inputs into float32 ('Unsupported element type for DotThunk'), so bfloat16 keeps
  the [V, H] form."""
  if xc.dtype == jnp.float32:
    return jnp.einsum('bch,bcv->hv', xc, dlogits, preferred_element_type=jnp.float32).T
  return jnp.einsum('bcv,bch->vh', dlogits, xc, preferred_element_type=jnp.float32)


def _cpu_chunk(batch: int, length: int, chunk: int) -> int:
  """Positions per block on the CPU path: the most that divide `length` with batch x positions <= CPU_ROWS
  (at least `chunk`)."""
  fits = [c for c in range(1, length + 1) if length % c == 0 and batch * c <= CPU_ROWS]
  return max([chunk, *fits])


def _sliced_fwd(x, weights, targets, valid, chunk, vocab_slice):
  """`_stats_fwd` as XLA:CPU runs it fastest in bfloat16: per block of `chunk` positions (all rows of a block as
  one [R, H] matrix), the vocabulary in slices of `vocab_slice` entries, each a product of the shapes YNNPACK runs
  at ~850 GFLOP/s; whole-vocabulary products ([512, 768] x [768, 50257] and its two gradients) ran at 400-650
  with the [V, H] table out of cache. Two passes over the slices: a running max and sum of exponentials
  (logsumexp) and the target's logit, then each slice's logits again (XLA:CPU forms each once) for the
  gradient. A slice's logits read its rows of the table as they are (`product_nt`: no transposed copy). The table
  gradient is formed [H, V] (x^T dlogits: no [R, V] transpose) and transposed once."""
  vocab, hidden = weights.shape
  spans = [(lo, min(lo + vocab_slice, vocab)) for lo in range(0, vocab, vocab_slice)]

  def slice_logits(x2, lo, hi):
    return product_nt(x2, weights[lo:hi])

  def body(carry, block):
    nll_sum, correct_sum, grad_t = carry
    xc, tc, vc = block
    x2, t2, v2 = xc.reshape(-1, hidden), tc.reshape(-1), vc.reshape(-1)
    rows = x2.shape[0]
    peak = jnp.full((rows,), -jnp.inf, jnp.float32)
    total = jnp.zeros((rows,), jnp.float32)
    target_logit = jnp.zeros((rows,), jnp.float32)
    for lo, hi in spans:
      logits = slice_logits(x2, lo, hi)
      new_peak = jnp.maximum(peak, jnp.max(logits, axis=1))
      total = total * jnp.exp(peak - new_peak) + jnp.sum(jnp.exp(logits - new_peak[:, None]), axis=1)
      peak = new_peak
      picked = jnp.take_along_axis(logits, jnp.clip(t2 - lo, 0, hi - lo - 1)[:, None], axis=1)[:, 0]
      target_logit = target_logit + jnp.where((t2 >= lo) & (t2 < hi), picked, 0.0)
    lse = peak + jnp.log(total)
    nll = jnp.sum(jnp.where(v2, lse - target_logit, 0.0))
    correct = jnp.sum((target_logit >= peak) & v2).astype(jnp.float32)
    dx = jnp.zeros((rows, hidden), jnp.float32)
    x_t = transposed(x2)
    slice_grads = []
    for lo, hi in spans:
      logits = slice_logits(x2, lo, hi)
      onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1) + lo == t2[:, None]
      # d(nll)/d(logits) = softmax - one_hot(target), zero where not valid.
      dlogits = jnp.where(v2[:, None], jnp.exp(logits - lse[:, None]) - onehot, 0.0).astype(x.dtype)
      dx = dx + jnp.dot(dlogits, weights[lo:hi], preferred_element_type=jnp.float32)
      slice_grads.append(jnp.dot(x_t, dlogits, preferred_element_type=jnp.float32))
    grad_t = grad_t + jnp.concatenate(slice_grads, axis=1)
    return (nll_sum + nll, correct_sum + correct, grad_t), dx.astype(x.dtype).reshape(xc.shape)
  zero = jnp.zeros((), jnp.float32)
  init = (zero, zero, jnp.zeros((hidden, vocab), jnp.float32))
  (nll, correct, grad_t), dx = jax.lax.scan(
      body, init, (_blocks(x, chunk), _blocks(targets, chunk), _blocks(valid, chunk)))
  return (nll, correct), (_unblock(dx), transposed(grad_t.astype(weights.dtype)))


def _stats_bwd(chunk, residuals, cotangents):
  del chunk
  dx, weights_grad = residuals
  g = cotangents[0]  # `correct` is a count: no gradient flows from it
  return (g * dx).astype(dx.dtype), (g * weights_grad).astype(weights_grad.dtype), None, None


_stats.defvjp(_stats_fwd, _stats_bwd)

"""Transformer parts shared by the decoder-style models (gpt, encdec, elmo): projections, norms, rotary
positions, grouped-query causal attention with its KV-cache step, MLPs, packed-row masks and the layer-stack runner.

Every part reads its sizes from a `BlockConfig` (GPTConfig carries the same fields, so GPT passes its own config).
Parameter names and logical axes are those of layers.py, so checkpoints do not depend on which model holds a part.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.mesh import constrain
from jaxssl.models import attention_core, fused_attention
from jaxssl.models.layer_boundary import layer_boundary
from jaxssl.models.layers import ACTIVATIONS, LayerNorm, dropout, make_param, maybe_remat, normal_init, ones, zeros
from jaxssl.models.products import add_bias, project

ACT = ('batch', 'length', 'act_embed')  # logical names of activations at block boundaries
HEADS_ACT = ('batch', 'length', 'act_heads', 'kv')
KV_HEADS_ACT = ('batch', 'length', 'act_kv_heads', 'kv')


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """The settings the parts read, for a stack of `num_layers` blocks (GPT-2 defaults; see GPTConfig for each).

  `num_kv_heads` and `head_dim` given as 0 read back resolved (num_heads, hidden_size // num_heads).
  """
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  attention: str = 'auto'
  norm: str = 'layernorm'
  num_kv_heads: int = 0
  head_dim: int = 0
  use_bias: bool = True
  attention_bias: bool = False

  def __post_init__(self):
    if not self.num_kv_heads:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    if not self.head_dim and self.num_heads > 0:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# ----- projections, norms, rotary positions -----

class Linear(nnx.Module):
  """y = x W (+ b): W (in, out) named `names`, b named `names[-1]` (the same paths as layers.Dense)."""

  def __init__(self, in_features: int, out_features: int, names: tuple[str, str], *, stddev: float,
               use_bias: bool, dtype, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, normal_init(stddev), (in_features, out_features), names)
    if use_bias:
      self.bias = make_param(rngs, zeros, (out_features,), names[-1:])
    self.use_bias = use_bias
    self.dtype = dtype
    self.out_major = False  # the kernel stored [out, in] (generation.layers_apart, for decoding)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype), out_major=self.out_major)
    return add_bias(y, self.bias[...]) if self.use_bias else y


class RMSNorm(nnx.Module):
  """x / rms(x) * scale (Llama; no mean subtraction, no bias), statistics in float32; output in `dtype`."""

  def __init__(self, features: int, *, eps: float, dtype, rngs: nnx.Rngs):
    self.scale = make_param(rngs, ones, (features,), ('norm',))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(self.dtype)


def make_norm(c: BlockConfig, rngs: nnx.Rngs):
  """The configured normalisation layer (LayerNorm: scale + bias; RMSNorm: scale only)."""
  cls = RMSNorm if c.norm == 'rmsnorm' else LayerNorm
  return cls(c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)


@functools.lru_cache(maxsize=None)
def rope_inv_freq(head_dim: int, theta: float, scaling: tuple | None = None) -> np.ndarray:
  """[head_dim / 2] float32 rotation frequencies, as HF computes them (float32 arithmetic, as the models were
  trained); `scaling` is GPTConfig.rope_scaling ('linear': all divided by factor; 'llama3': long wavelengths
  divided by factor, short ones kept, a smooth blend between)."""
  f32 = np.float32
  inv = f32(1.0) / (f32(theta) ** (np.arange(0, head_dim, 2).astype(f32) / f32(head_dim)))
  s = dict(scaling or ())
  if s.get('rope_type') == 'linear':
    inv = inv / f32(s['factor'])
  elif s.get('rope_type') == 'llama3':
    factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
    old = s['original_max_position_embeddings']
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / low, inv / f32(factor), inv)
    smooth = (f32(old) / wavelen - f32(low)) / f32(high - low)
    smoothed = (1 - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    inv = np.where(medium, smoothed, scaled)
  return np.asarray(inv, f32)


def rope_angles(c, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos, sin) [B, T, head_dim / 2] float32 of each token's rotation at its `positions` [B, T]; `c` is a config
  with head_dim, rope_theta and rope_scaling (GPTConfig)."""
  angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, rotary: tuple[jax.Array, jax.Array]) -> jax.Array:
  """Rotates x [B, T, N, D] by `rotary` = (cos, sin) [B, T, D/2], in float32.

  HF Llama's rotate_half layout: dimension i pairs with i + D/2 (not with i + 1), so HF q/k weights load as they
  are, with no permutation.
  """
  cos, sin = (a[:, :, None, :] for a in rotary)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----- attention (with its KV-cache step) and MLPs -----

class CausalSelfAttention(nnx.Module):
  """Causal self-attention with grouped-query heads; same parameter layout as layers.MultiHeadAttention.

  q kernel (embed, heads, kv), k/v kernels (embed, kv_heads, kv): heads can be split over the tensor axis without
  reshapes (HF's fused GPT-2 c_attn is split into the three when converting). Query head n reads key/value head
  n // (num_heads / num_kv_heads), as HF's repeat_kv.
  """

  def __init__(self, c: BlockConfig, *, rngs: nnx.Rngs):
    h, n, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    init = normal_init(c.initializer_range)
    self.qkv_bias = c.use_bias or c.attention_bias
    for name, heads, axis in (('query', n, 'heads'), ('key', kv, 'kv_heads'), ('value', kv, 'kv_heads')):
      setattr(self, f'{name}_kernel', make_param(rngs, init, (h, heads, d), ('embed', axis, 'kv')))
      if self.qkv_bias:
        setattr(self, f'{name}_bias', make_param(rngs, zeros, (heads, d), (axis, 'kv')))
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * layers).
    out_init = normal_init(c.initializer_range / math.sqrt(2 * c.num_layers))
    self.out_kernel = make_param(rngs, out_init, (n, d, h), ('heads', 'kv', 'embed'))
    if c.use_bias:
      self.out_bias = make_param(rngs, zeros, (h,), ('embed',))
    self.use_bias = c.use_bias
    self.head_dim = d
    self.attention_dropout_rate = c.attention_dropout_rate
    self.implementation = c.attention
    self.dtype = c.compute_dtype
    self.out_major = ()  # names of the kernels stored output-major (generation.layers_apart, for decoding)
    self.fused_qkv = ()  # (query heads, kv heads) where generation.layers_apart made q/k/v one `qkv_kernel`

  def _product(self, x, name):
    return project(x, getattr(self, f'{name}_kernel')[...].astype(self.dtype), out_major=name in self.out_major)

  def _project(self, x, name, rotary):
    return self._finish(self._product(x, name), name, rotary)

  def _finish(self, y, name, rotary):
    """A q/k/v product [B, T, heads, D] with its bias (and rotation for q and k), constrained to its heads."""
    if self.qkv_bias:
      y = add_bias(y, getattr(self, f'{name}_bias')[...])
    if rotary is not None and name != 'value':
      y = apply_rope(y, rotary)
    return constrain(y, HEADS_ACT if name == 'query' else KV_HEADS_ACT)

  def _qkv(self, x, rotary):
    names = ('query', 'key', 'value')
    if not self.fused_qkv:
      return tuple(self._project(x, n, rotary) for n in names)
    heads, kv_heads = self.fused_qkv
    products = jnp.split(self._product(x, 'qkv'), (heads, heads + kv_heads), axis=-2)
    return tuple(self._finish(y, n, rotary) for y, n in zip(products, names))

  def _output(self, out):
    out = constrain(out.astype(self.dtype), HEADS_ACT)
    y = project(out, self.out_kernel[...].astype(self.dtype), in_axes=2, out_major='out' in self.out_major)
    return add_bias(y, self.out_bias[...]) if self.use_bias else y

  def _explicit(self, q, k, v, mask, dropout_rng):
    """Softmax attention spelled out; q [B, T, N, D], k/v [B, S, K, D], `mask` [B, 1, T, S] bool (True = may
    attend). Query heads are grouped (K, N/K) so each group reads its key/value head without copying it."""
    b, t, n, d = q.shape
    # Heads in front of the sequence (as in layers.MultiHeadAttention: XLA:CPU's batched matmuls want them there).
    q = q.reshape(b, t, k.shape[2], n // k.shape[2], d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, K, S, D]
    if attention_core.cpu_attention_core(q.dtype):
      out = attention_core.softmax_attention(q, k, v, mask[:, :, None], self.attention_dropout_rate, dropout_rng)
      return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)
    logits = jnp.einsum('bkgtd,bksd->bkgts', q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    # A row with nothing to attend (a padding query) becomes uniform, not NaN; its output is never used.
    logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, self.attention_dropout_rate, dropout_rng).astype(self.dtype)
    return jnp.einsum('bkgts,bksd->bkgtd', probs, v).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)

  def _explicit_causal(self, q, k, v, mask, dropout_rng):
    """`_explicit` for causal self-attention, a block of queries at a time: block i scores only the keys up to its
    own end (those after are masked anyway), skipping (n - 1) / 2n of the scores, softmax and dropout work (n
    blocks of >= 64 queries, at most 4; 2 with the CPU core, faster than 4 or 1: BENCHMARKS.md §42). Block i
    draws its dropout from fold_in(dropout_rng, i)."""
    t = q.shape[1]
    blocks = max(1, min(2 if attention_core.cpu_attention_core(q.dtype) else 4, t // 64))
    while t % blocks:
      blocks -= 1
    if blocks == 1:
      return self._explicit(q, k, v, mask, dropout_rng)
    size, outs = t // blocks, []
    for i in range(blocks):
      lo, hi = i * size, (i + 1) * size
      key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      outs.append(self._explicit(q[:, lo:hi], k[:, :hi], v[:, :hi], mask[:, :, lo:hi, :hi], key))
    return jnp.concatenate(outs, axis=1)

  def __call__(self, x: jax.Array, segment_mask: jax.Array | None = None, *, segment_ids: jax.Array | None = None,
               rotary=None, dropout_rng: jax.Array | None = None, explicit: bool = False) -> jax.Array:
    """x [B, T, H] -> [B, T, H]. Causal; `segment_mask` [B, 1, T or 1, T] (True = may attend) further restricts
    it, or `segment_ids` [B, T] (packed documents: a token attends its own document only; what splash reads).

    `rotary` = rope_angles(...) rotates q and k (position='rope'). `explicit` forces the hand-written attention
    path (taken anyway when attention dropout is on).
    """
    x = x.astype(self.dtype)
    q, k, v = self._qkv(x, rotary)
    if segment_ids is not None:
      segment_mask = same_segment(segment_ids)
    if explicit or (dropout_rng is not None and self.attention_dropout_rate > 0.0):
      t = x.shape[1]
      mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
      if segment_mask is not None:
        mask = mask & segment_mask
      out = self._explicit_causal(q, k, v, mask, dropout_rng)
    else:
      # Takes k/v with fewer heads (GQA) as they are.
      out = fused_attention.attend(q, k, v, implementation=self.implementation, mask=segment_mask, causal=True,
                                   segment_ids=None if segment_ids is None else (segment_ids, segment_ids))
    return self._output(out)

  def decode(self, x, key_cache, value_cache, index, mask, rotary=None, layer=None):
    """One cached step: x [B, T, H] new tokens, caches [B, S, K, D] (k/v written at slots index..index+T-1),
    mask [B, 1, T, S] -> (y [B, T, H], key_cache, value_cache). Cached keys are stored rotated.

    With `layer`, the caches are every layer's, [L, B, S, K, D]: the new tokens go into slice `layer` and the step
    reads it. In a loop that carries the caches this writes only the new slots, in place, where returning the
    layer's whole cache had a loop over the layers copy every layer's cache in and out at every token (SmolLM2 at
    batch 8: 127 -> 160 tokens/s with 128 new tokens, 64 -> 86-104 with 512).
    """
    x = x.astype(self.dtype)
    q, k, v = self._qkv(x, rotary)
    lead = () if layer is None else (layer,)

    def write(cache, new):
      new = new.astype(cache.dtype).reshape((1,) * len(lead) + new.shape)
      return jax.lax.dynamic_update_slice(cache, new, (*lead, 0, index, 0, 0))

    key_cache, value_cache = write(key_cache, k), write(value_cache, v)
    keys, values = (key_cache, value_cache) if layer is None else (key_cache[layer], value_cache[layer])
    out = self._attend_filled(q, keys.astype(self.dtype), values.astype(self.dtype), mask, index + x.shape[1])
    return self._output(out), key_cache, value_cache

  def _attend_filled(self, q, keys, values, mask, filled):
    """`_explicit` over the cache's first `filled` slots only (a traced count), rounded up to one of a few static
    prefix lengths (`filled_prefixes`): the slots after are empty and masked, but reading them made every step of a
    long generation cost as much as its last (SmolLM2 at batch 8, 512 new tokens: 66-69 -> 90-96 tokens/s)."""
    prefixes = filled_prefixes(keys.shape[1])
    if len(prefixes) == 1:
      return self._explicit(q, keys, values, mask, None)
    branches = [functools.partial(self._explicit_prefix, n) for n in prefixes]
    which = jnp.searchsorted(jnp.asarray(prefixes), filled)
    return jax.lax.switch(which, branches, q, keys, values, mask)

  def _explicit_prefix(self, n, q, keys, values, mask):
    return self._explicit(q, keys[:, :n], values[:, :n], mask[..., :n], None)


class GeluMlp(nnx.Module):
  """W2 GELU(W1 x) with GPT-2's tanh-approximate GELU ("gelu_new")."""

  def __init__(self, c: BlockConfig, *, rngs: nnx.Rngs):
    dt, std, b = c.compute_dtype, c.initializer_range, c.use_bias
    self.wi = Linear(c.hidden_size, c.intermediate_size, ('embed', 'mlp'), stddev=std, use_bias=b, dtype=dt,
                     rngs=rngs)
    self.wo = Linear(c.intermediate_size, c.hidden_size, ('mlp', 'embed'), stddev=std / math.sqrt(2 * c.num_layers),
                     use_bias=b, dtype=dt, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS['gelu_new'](self.wi(x))
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    return self.wo(h)


class SwiGluMlp(nnx.Module):
  """W2 (SiLU(Wg x) * Wu x) (Llama; HF gate_proj, up_proj, down_proj = wi_gate, wi_up, wo)."""

  def __init__(self, c: BlockConfig, *, rngs: nnx.Rngs):
    dt, std, b = c.compute_dtype, c.initializer_range, c.use_bias
    h, i = c.hidden_size, c.intermediate_size
    self.wi_gate = Linear(h, i, ('embed', 'mlp'), stddev=std, use_bias=b, dtype=dt, rngs=rngs)
    self.wi_up = Linear(h, i, ('embed', 'mlp'), stddev=std, use_bias=b, dtype=dt, rngs=rngs)
    self.wo = Linear(i, h, ('mlp', 'embed'), stddev=std / math.sqrt(2 * c.num_layers), use_bias=b, dtype=dt,
                     rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.silu(self.wi_gate(x)) * self.wi_up(x)
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    return self.wo(h)


FILLED_BLOCK = 128  # cache slots: the granularity of the prefixes a decoding step attends over


def filled_prefixes(slots: int) -> tuple[int, ...]:
  """The static cache prefixes a one-token step may attend over (CausalSelfAttention._attend_filled): multiples of
  FILLED_BLOCK, at most 8, ending with all `slots` (none within half a step of it). A short cache has one: all."""
  step = max(FILLED_BLOCK, -(-slots // 8 // FILLED_BLOCK) * FILLED_BLOCK)
  return (*range(step, slots - step // 2, step), slots)


def kv_cache(num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype) -> dict:
  """Empty key/value caches [num_layers, B, max_len, num_kv_heads, head_dim] (what CausalSelfAttention.decode
  writes into, layer i at slice i)."""
  shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
  return dict(key=jnp.zeros(shape, dtype), value=jnp.zeros(shape, dtype))


def set_layer_cache(cache, i: int, layer_cache: jax.Array):
  """`cache` with layer i's entry replaced: a stacked array [L, ...] or a list of per-layer arrays
  (generation.layer_caches_apart)."""
  if isinstance(cache, list):
    return [*cache[:i], layer_cache, *cache[i + 1:]]
  return cache.at[i].set(layer_cache)


# ----- packed rows -----

def same_segment(segment_ids):
  """[B, 1, T, T] bool: query and key in the same segment (document of a packed row)."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def next_token_pairs(segment_ids):
  """[B, T-1] bool: whether token t+1 is a target for position t (both in the same non-zero segment)."""
  return (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, 1:] != 0)


# ----- layer stacks -----

def layer_keys(dropout_rng, num_layers: int):
  """Layer i's dropout key fold_in(dropout_rng, i), stacked [num_layers] for a scan (every layer path draws these);
  None without dropout."""
  if dropout_rng is None:
    return None
  return jax.vmap(lambda i: jax.random.fold_in(dropout_rng, i))(jnp.arange(num_layers))


def run_stack(layers, x, fn, *, num_layers: int, scan: bool, remat: str, unroll: bool = False, dropout_rng=None,
              per_layer: tuple = (), return_outputs: bool = False, boundary: bool = True):
  """x through the layers as `fn(layer, x, key, *rows)`; layer i gets fold_in(dropout_rng, i) and row i of each
  array in `per_layer` (leading axis num_layers: Gemma's is-local flags, Big Bird's random blocks), scanned or
  not, so a scanned stack equals the unscanned one even with dropout. `unroll` (layers.unroll_layers) unrolls the
  scan. `boundary`: each unrolled layer's output gradient computed once on CPU (layer_boundary; pre-norm stacks).
  -> the last output, or (it, every layer's output stacked [num_layers, ...]) with `return_outputs`."""
  fn = layer_boundary(fn, boundary and (unroll or not scan))
  if not scan:
    outputs = []  # kept only when asked: outside jit each would stay alive to the end
    keys = layer_keys(dropout_rng, num_layers)
    for i, layer in enumerate(layers):
      key = None if keys is None else keys[i]
      x = maybe_remat(fn, remat, in_scan=False)(layer, x, key, *(a[i] for a in per_layer))
      if return_outputs:
        outputs.append(x)
    return (x, jnp.stack(outputs)) if return_outputs else x
  # The body emits its output as the scan's ys only when asked: the stacked outputs cost L x [B, T, H] memory.
  emit, out_axes = ((lambda h: (h, h)), (nnx.Carry, 0)) if return_outputs else ((lambda h: h), nnx.Carry)
  scan_with = lambda body, in_axes: nnx.scan(body, in_axes=in_axes, out_axes=out_axes, unroll=unroll,  # noqa: E731
                                             transform_metadata={nnx.PARTITION_NAME: 'layers'})
  rows = (0,) * len(per_layer)
  if dropout_rng is None:
    body = maybe_remat(lambda lyr, h, *row: emit(fn(lyr, h, None, *row)), remat, in_scan=True)
    return scan_with(body, (0, nnx.Carry, *rows))(layers, x, *per_layer)
  body = maybe_remat(lambda lyr, h, key, *row: emit(fn(lyr, h, key, *row)), remat, in_scan=True)
  return scan_with(body, (0, nnx.Carry, 0, *rows))(layers, x, layer_keys(dropout_rng, num_layers), *per_layer)

"""Gemma-style options of the GPT decoder (models/gpt.py), what Gemma 3 needs (configs/gpt.py:gemma3_*):

  norm='rmsnorm_plus_one'   RMSNorm scaled by (1 + w), w stored as is (zero-initialised), as HF's Gemma3RMSNorm
  mlp='geglu'               W2 (gelu_tanh(Wg x) * Wu x)
  qk_norm=True              RMSNorm of each query and key head (over head_dim) before RoPE
  sandwich_norm=True        a norm after attention and after the MLP too (4 per layer: pre/post each)
  query_pre_attn_scalar     scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2 (0 = head_dim)
  sliding_window=W          local layers attend to the W most recent tokens (q - k < W), with RoPE base
  sliding_window_pattern=N  rope_local_theta; every Nth layer (N-1, 2N-1, ...) is global (the whole context,
  rope_local_theta          rope_theta and rope_scaling); 0 = every layer local
  scale_embeddings=True     token embeddings times sqrt(hidden) in the compute dtype (the tied head is unscaled)

Layers of both kinds share one parameter layout, so the stack stays one `nnx.vmap`-ed module run by `nnx.scan`:
which layer is local is scanned data ([L] bool), and each layer picks its rotation and mask from it.

KV cache (generation): global layers keep every position ([n_global, B, S, K, D] written at slot `index`); local
layers keep only a ring of min(W, S) slots per row, the key of position p in slot p % R, so padding never
evicts a real token and the ring always holds the last W positions a query can see. Decoding runs the layers
unrolled (a scanned stack is sliced per layer) because the two kinds hold caches of different sizes.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.layers import dropout, make_param, stack_layers, unroll_layers, zeros
from jaxssl.models.parts import (ACT, CausalSelfAttention, GeluMlp, RMSNorm, SwiGluMlp, apply_rope, kv_cache,
                                 rope_inv_freq, run_stack, same_segment, set_layer_cache)
from jaxssl.models.parts import make_norm as plain_norm


class RMSNormPlusOne(nnx.Module):
  """x / rms(x) * (1 + w) (Gemma), statistics in float32; w is zero-initialised (so the norm starts as plain
  RMSNorm) and stored as HF stores it."""

  def __init__(self, features: int, *, eps: float, dtype, rngs: nnx.Rngs):
    self.scale = make_param(rngs, zeros, (features,), ('norm',))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (y * (1.0 + self.scale[...])).astype(self.dtype)


def make_norm(c, rngs: nnx.Rngs, features: int = 0):
  """The configured norm over `features` (0 = hidden_size): parts.make_norm's, or Gemma's (1 + w) RMSNorm; a
  per-head (q/k) norm is an RMSNorm of either kind."""
  if c.norm == 'rmsnorm_plus_one':
    return RMSNormPlusOne(features or c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)
  if features:
    return RMSNorm(features, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)
  return plain_norm(c, rngs)


class GeGluMlp(SwiGluMlp):
  """W2 (GELU_tanh(Wg x) * Wu x) (Gemma's gelu_pytorch_tanh); the parameters of SwiGluMlp."""

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.wi_gate(x), approximate=True) * self.wi_up(x)
    return self.wo(constrain(h, ('batch', 'length', 'act_mlp')))


def uses_gemma_block(c) -> bool:
  """Whether the config needs GemmaBlock (sandwich norms, q/k norms, query scaling, local layers)."""
  return bool(c.sandwich_norm or c.qk_norm or c.sliding_window or c.query_pre_attn_scalar)


def local_layers(c) -> tuple[bool, ...]:
  """Per layer: whether it attends to a sliding window (local) rather than the whole context (global)."""
  if not c.sliding_window:
    return (False,) * c.num_layers
  n = c.sliding_window_pattern
  return tuple(n == 0 or (i + 1) % n != 0 for i in range(c.num_layers))


def check_config(c) -> None:
  """The Gemma options' own checks, as one-line UserErrors."""
  for name in ('qk_norm', 'sandwich_norm', 'scale_embeddings'):
    if not isinstance(getattr(c, name), bool):
      raise UserError(f'model.{name}={getattr(c, name)!r} must be True or False')
  for name in ('sliding_window', 'sliding_window_pattern'):
    if int(getattr(c, name)) < 0:
      raise UserError(f'model.{name}={getattr(c, name)} must be >= 0 (0 = off)')
  if c.query_pre_attn_scalar < 0 or c.rope_local_theta < 0:
    raise UserError('model.query_pre_attn_scalar and model.rope_local_theta must be >= 0 (0 = head_dim / '
                    'rope_theta)')
  if c.sliding_window and c.position != 'rope' and c.rope_local_theta:
    raise UserError("model.rope_local_theta needs position='rope'")


def rotary_pair(c, positions):
  """((cos, sin) of global layers, (cos, sin) of local ones) [B, T, head_dim / 2]: rope_theta with rope_scaling,
  and rope_local_theta (0 = rope_theta) unscaled, as HF's per-layer-type rope_parameters."""
  angles = positions.astype(jnp.float32)[..., None]
  glob = angles * rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
  local = angles * rope_inv_freq(c.head_dim, c.rope_local_theta or c.rope_theta, None)
  return (jnp.cos(glob), jnp.sin(glob)), (jnp.cos(local), jnp.sin(local))


class GemmaAttention(CausalSelfAttention):
  """CausalSelfAttention with per-head q/k RMSNorm before RoPE and Gemma's score scale; its decode step for a
  local layer reads the ring cache (see the module docstring)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    super().__init__(c, rngs=rngs)
    if c.qk_norm:
      self.query_norm = make_norm(c, rngs, c.head_dim)
      self.key_norm = make_norm(c, rngs, c.head_dim)
    self.qk_norm = c.qk_norm
    # The kernels scale by head_dim^-1/2: q is pre-scaled so the product is query_pre_attn_scalar^-1/2.
    scalar = c.query_pre_attn_scalar or c.head_dim
    self.query_scale = 1.0 if scalar == c.head_dim else math.sqrt(c.head_dim / scalar)

  def _finish(self, y, name, rotary):
    if self.qkv_bias:
      y = y + getattr(self, f'{name}_bias')[...].astype(self.dtype)
    if self.qk_norm and name != 'value':
      y = getattr(self, f'{name}_norm')(y)
    if rotary is not None and name != 'value':
      y = apply_rope(y, rotary)
    if name == 'query' and self.query_scale != 1.0:
      y = y * jnp.asarray(self.query_scale, y.dtype)
    return constrain(y, ('batch', 'length', 'act_heads' if name == 'query' else 'act_kv_heads', 'kv'))

  def decode_local(self, x, ring_key, ring_value, mask, src, has, rotary=None):
    """One cached step of a local layer: attends to [ring (R slots); the new tokens] under `mask`
    [B, 1, T, R + T]; then ring slot s takes new token src[b, s] where has[b, s]. -> (y, ring_key, ring_value)."""
    x = x.astype(self.dtype)
    q, k, v = self._qkv(x, rotary)
    keys = jnp.concatenate([ring_key.astype(self.dtype), k], axis=1)
    values = jnp.concatenate([ring_value.astype(self.dtype), v], axis=1)
    out = self._explicit(q, keys, values, mask, None)
    pick = lambda new, old: jnp.where(has[:, :, None, None], jnp.take_along_axis(  # noqa: E731
        new.astype(old.dtype), src[:, :, None, None], axis=1), old)
    return self._output(out), pick(k, ring_key), pick(v, ring_value)


class GemmaBlock(nnx.Module):
  """h = x + PostNorm(Attn(Norm(x))); y = h + PostNorm(MLP(Norm(h))) (the post norms with sandwich_norm)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    self.attention_norm = make_norm(c, rngs)
    self.attention = GemmaAttention(c, rngs=rngs)
    self.mlp_norm = make_norm(c, rngs)
    self.mlp = make_mlp(c, rngs)
    if c.sandwich_norm:
      self.post_attention_norm = make_norm(c, rngs)
      self.post_mlp_norm = make_norm(c, rngs)
    self.sandwich = c.sandwich_norm
    self.dropout_rate = c.dropout_rate

  def _add(self, x, branch, norm_name, key=None):
    if self.sandwich:
      branch = getattr(self, norm_name)(branch)
    return x + dropout(branch, self.dropout_rate, key).astype(jnp.float32)

  def __call__(self, x, rotary, dropout_rng=None, *, mask=None, segment_ids=None):
    k = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, i) for i in range(3)]
    a = self.attention(self.attention_norm(x), mask, segment_ids=segment_ids, rotary=rotary, dropout_rng=k[0])
    x = self._add(x, a, 'post_attention_norm', k[1])
    x = self._add(x, self.mlp(self.mlp_norm(x)), 'post_mlp_norm', k[2])
    return constrain(x, ACT)

  def decode(self, x, key_cache, value_cache, index, mask, rotary=None):
    a, key_cache, value_cache = self.attention.decode(self.attention_norm(x), key_cache, value_cache, index, mask,
                                                      rotary)
    x = self._add(x, a, 'post_attention_norm')
    return self._add(x, self.mlp(self.mlp_norm(x)), 'post_mlp_norm'), key_cache, value_cache

  def decode_local(self, x, ring_key, ring_value, mask, src, has, rotary=None):
    a, ring_key, ring_value = self.attention.decode_local(self.attention_norm(x), ring_key, ring_value, mask, src,
                                                          has, rotary)
    x = self._add(x, a, 'post_attention_norm')
    return self._add(x, self.mlp(self.mlp_norm(x)), 'post_mlp_norm'), ring_key, ring_value


def make_mlp(c, rngs: nnx.Rngs):
  """The configured MLP: GeGLU, SwiGLU or GPT-2's GELU MLP."""
  return {'geglu': GeGluMlp, 'swiglu': SwiGluMlp}.get(c.mlp, GeluMlp)(c, rngs=rngs)


class GemmaDecoder(nnx.Module):
  """The L GemmaBlocks: stacked + nnx.scan over (layer params, is-local flag), or a Python list."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    self.scan_layers, self.num_layers, self.remat = c.scan_layers, c.num_layers, c.remat
    self.unroll = unroll_layers(c.layer_loop)
    self.window = int(c.sliding_window)
    self.local = local_layers(c)
    self.kv = (c.num_kv_heads, c.head_dim, c.compute_dtype)
    self.layers = stack_layers(lambda r: GemmaBlock(c, rngs=r), c.num_layers, c.scan_layers, rngs)

  def __call__(self, x, segment_ids, dropout_rng=None, rotary=None):
    """x [B, T, H] through the layers; `rotary` is rotary_pair(...) (or None: learned positions)."""
    t = x.shape[1]
    idx = jnp.arange(t)
    in_window = (idx[:, None] - idx[None, :] < self.window)[None, None] if self.window else None
    segments = None if segment_ids is None else same_segment(segment_ids)

    def run(layer, h, key, is_local):
      rot = None if rotary is None else tuple(jnp.where(is_local, l, g) for g, l in zip(*rotary))
      if in_window is None:  # no local layer: segment ids as they are (what splash attention reads)
        return layer(h, rot, key, segment_ids=segment_ids)
      allowed = in_window | ~is_local
      return layer(h, rot, key, mask=allowed if segments is None else allowed & segments)

    return run_stack(self.layers, x, run, num_layers=self.num_layers, scan=self.scan_layers, remat=self.remat,
                     unroll=self.unroll, dropout_rng=dropout_rng, per_layer=(jnp.asarray(self.local),))

  # ----- KV-cache decoding -----

  def init_cache(self, batch: int, max_len: int) -> dict:
    """key/value [n_global, B, S, K, D]; local_key/local_value [n_local, B, R, K, D] with R = min(W, S) and
    local_positions [B, R] (the position each ring slot holds; -1 = empty)."""
    n_local = sum(self.local)
    heads, dim, dtype = self.kv
    ring = min(self.window, max_len) if n_local else 1
    local = kv_cache(n_local, batch, ring, heads, dim, dtype)
    return dict(kv_cache(self.num_layers - n_local, batch, max_len, heads, dim, dtype),
                local_key=local['key'], local_value=local['value'],
                local_positions=jnp.full((batch, ring), -1, jnp.int32))

  def _layer(self, i):
    if not self.scan_layers:
      return self.layers[i]
    graphdef, state = nnx.split(self.layers)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

  def decode(self, x, cache: dict, index, mask, positions, rotary=None) -> tuple[jax.Array, dict]:
    """Appends x [B, T, H] (at `positions` [B, T], -1 = padding) -> (hidden states, the cache's layer entries).
    `mask` [B, 1, T, S] is the global layers'; `rotary` is rotary_pair(...)."""
    ring_pos = cache['local_positions']
    ring = ring_pos.shape[1]
    kpos = jnp.concatenate([ring_pos, positions], axis=1)[:, None, None, :]
    qpos = positions[:, None, :, None]
    local_mask = (kpos >= 0) & (kpos <= qpos) & (qpos - kpos < self.window)
    # Ring slot s takes the newest new token whose position is s mod R (padding, -1, goes nowhere).
    hit = (positions[:, None, :] >= 0) & (positions[:, None, :] % ring == jnp.arange(ring)[None, :, None])
    src = jnp.argmax(jnp.where(hit, positions[:, None, :], -1), axis=-1)
    has = jnp.any(hit, axis=-1)
    new = {k: cache[k] for k in ('key', 'value', 'local_key', 'local_value')}
    glob, loc = (None, None) if rotary is None else rotary
    n_global = n_local = 0
    for i, is_local in enumerate(self.local):
      layer = self._layer(i)
      if is_local:
        x, k, v = layer.decode_local(x, new['local_key'][n_local], new['local_value'][n_local], local_mask, src,
                                     has, loc)
        new['local_key'], new['local_value'] = (set_layer_cache(new[n], n_local, a) for n, a in
                                                (('local_key', k), ('local_value', v)))
        n_local += 1
      else:
        x, k, v = layer.decode(x, new['key'][n_global], new['value'][n_global], index, mask, glob)
        new['key'], new['value'] = set_layer_cache(new['key'], n_global, k), set_layer_cache(new['value'], n_global, v)
        n_global += 1
    new['local_positions'] = jnp.where(has, jnp.take_along_axis(positions, src, axis=1), ring_pos)
    return x, new


def attention_flops(c, seq_len: int) -> float:
  """Training FLOPs per token of the attention scores and weighted sum, all layers: 12 x N x D x keys, keys =
  seq_len for a global layer and min(sliding_window, seq_len) for a local one (what a query can see)."""
  keys = [min(c.sliding_window, seq_len) if local else seq_len for local in local_layers(c)]
  return float(12 * c.num_heads * c.head_dim * sum(keys))


"""GPT-2 (Radford et al. 2019) causal language model; same math as HF GPT2LMHeadModel.

Pre-LayerNorm blocks, learned absolute positions, tanh-approximate GELU ("gelu_new"), LayerNorm eps 1e-5, a final
LayerNorm, and the output projection tied to the token embedding. As in bert.py, the block stack is created with
`nnx.vmap` (params get a leading 'layers' axis) and run with `nnx.scan`.

Packed training rows: `segment_ids` [B, T] (0 = padding) keep documents apart in attention and `positions` [B, T]
restart at 0 in each document; `next_token_loss` drops the pairs that cross a document boundary or touch padding.

Generation: `init_cache` + `GPT.decode` append new tokens to a KV cache; `generate` runs prefill + a
`lax.while_loop` of one-token decode steps under one jit, for a batch of prompts of different lengths.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.layers import (REMAT_POLICIES, Dense, Embed, LayerNorm, dropout, make_param, maybe_remat,
                                  normal_init, stack_layers, zeros)

ACT = ('batch', 'length', 'act_embed')  # logical names of activations at block boundaries
HEADS_ACT = ('batch', 'length', 'act_heads', 'kv')


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The `model` config section, validated; frozen (hashable) so modules can hold it as static data."""
  vocab_size: int
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  max_position: int = 1024
  dropout_rate: float = 0.1            # embeddings and both residual branches (GPT-2's embd/resid_pdrop)
  attention_dropout_rate: float = 0.1  # attention probabilities (attn_pdrop)
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: str = 'none'
  scan_layers: bool = True
  attention: str = 'xla'

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'GPTConfig':
    """Reads the fields this model uses from a ConfigDict/dict (extra keys such as `name` are ignored)."""
    get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
    kw = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.name != 'vocab_size'}
    kw = {k: v for k, v in kw.items() if v is not None}
    missing = [k for k in ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size') if k not in kw]
    if missing:
      raise UserError(f'the model config lacks {", ".join("model." + k for k in missing)}: '
                      'start from configs/gpt.py')
    c = cls(vocab_size=int(vocab_size), **kw)
    for name in ('vocab_size', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position'):
      if int(getattr(c, name)) < 1:
        raise UserError(f'model.{name}={getattr(c, name)} must be a positive integer')
    if c.hidden_size % c.num_heads:
      raise UserError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}; '
                      f'set --config.model.num_heads to a divisor (e.g. {max(1, c.hidden_size // 64)})')
    for name in ('dropout_rate', 'attention_dropout_rate'):
      if not 0.0 <= getattr(c, name) < 1.0:
        raise UserError(f'model.{name}={getattr(c, name)} must be in [0, 1)')
    if not c.layer_norm_eps > 0:
      raise UserError(f'model.layer_norm_eps={c.layer_norm_eps} must be positive (GPT-2 uses 1e-5)')
    if c.dtype not in ('float32', 'bfloat16'):
      raise UserError(f"model.dtype={c.dtype!r}: use 'float32' or 'bfloat16'")
    if c.remat not in ('none', *REMAT_POLICIES):
      raise UserError(f"model.remat={c.remat!r}: use 'none', 'full' or 'dots'")
    if c.attention not in ('xla', 'cudnn'):
      raise UserError(f"model.attention={c.attention!r}: use 'xla' or 'cudnn'")
    return c

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention; same parameter layout as layers.MultiHeadAttention.

  q/k/v kernels are (embed, heads, kv) so heads can be split over the tensor axis without reshapes (HF's fused
  c_attn is split into the three when converting).
  """

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    h, n, d = c.hidden_size, c.num_heads, c.head_dim
    init = normal_init(c.initializer_range)
    for name in ('query', 'key', 'value'):
      setattr(self, f'{name}_kernel', make_param(rngs, init, (h, n, d), ('embed', 'heads', 'kv')))
      setattr(self, f'{name}_bias', make_param(rngs, zeros, (n, d), ('heads', 'kv')))
    # GPT-2 scales the init of projections into the residual stream by 1/sqrt(2 * layers).
    out_init = normal_init(c.initializer_range / math.sqrt(2 * c.num_layers))
    self.out_kernel = make_param(rngs, out_init, (n, d, h), ('heads', 'kv', 'embed'))
    self.out_bias = make_param(rngs, zeros, (h,), ('embed',))
    self.head_dim = d
    self.attention_dropout_rate = c.attention_dropout_rate
    self.implementation = c.attention
    self.dtype = c.compute_dtype

  def _project(self, x, name):
    kernel = getattr(self, f'{name}_kernel')[...].astype(self.dtype)
    y = jnp.einsum('blh,hnd->blnd', x, kernel) + getattr(self, f'{name}_bias')[...].astype(self.dtype)
    return constrain(y, HEADS_ACT)

  def _output(self, out):
    out = constrain(out.astype(self.dtype), HEADS_ACT)
    y = jnp.einsum('blnd,ndh->blh', out, self.out_kernel[...].astype(self.dtype))
    return y + self.out_bias[...].astype(self.dtype)

  def _explicit(self, q, k, v, mask, dropout_rng):
    """Softmax attention spelled out; `mask` [B, 1, Tq, Tk] bool (True = may attend)."""
    logits = jnp.einsum('bqnd,bknd->bnqk', q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
    # A row with nothing to attend (a padding query) becomes uniform, not NaN; its output is never used.
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = dropout(probs, self.attention_dropout_rate, dropout_rng).astype(self.dtype)
    return jnp.einsum('bnqk,bknd->bqnd', probs, v)

  def __call__(self, x: jax.Array, segment_mask: jax.Array | None = None, *,
               dropout_rng: jax.Array | None = None, explicit: bool = False) -> jax.Array:
    """x [B, T, H] -> [B, T, H]. Causal; `segment_mask` [B, 1, T, T] (True = same document) further restricts it.

    `explicit` forces the hand-written attention path (taken anyway when attention dropout is on).
    """
    x = x.astype(self.dtype)
    q, k, v = (self._project(x, n) for n in ('query', 'key', 'value'))
    if explicit or (dropout_rng is not None and self.attention_dropout_rate > 0.0):
      t = x.shape[1]
      mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
      if segment_mask is not None:
        mask = mask & segment_mask
      out = self._explicit(q, k, v, mask, dropout_rng)
    else:
      impl = None if self.implementation == 'xla' else self.implementation
      out = jax.nn.dot_product_attention(q, k, v, mask=segment_mask, is_causal=True, implementation=impl)
    return self._output(out)

  def decode(self, x, key_cache, value_cache, index, mask):
    """One cached step: x [B, T, H] new tokens, caches [B, S, N, D] (k/v written at slots index..index+T-1),
    mask [B, 1, T, S] -> (y [B, T, H], key_cache, value_cache)."""
    x = x.astype(self.dtype)
    q, k, v = (self._project(x, n) for n in ('query', 'key', 'value'))
    key_cache = jax.lax.dynamic_update_slice_in_dim(key_cache, k.astype(key_cache.dtype), index, axis=1)
    value_cache = jax.lax.dynamic_update_slice_in_dim(value_cache, v.astype(value_cache.dtype), index, axis=1)
    out = self._explicit(q, key_cache.astype(self.dtype), value_cache.astype(self.dtype), mask, None)
    return self._output(out), key_cache, value_cache


class GeluMlp(nnx.Module):
  """W2 GELU(W1 x) with GPT-2's tanh-approximate GELU ("gelu_new")."""

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    dt, std = c.compute_dtype, c.initializer_range
    self.wi = Dense(c.hidden_size, c.intermediate_size, ('embed', 'mlp'), stddev=std, dtype=dt, rngs=rngs)
    self.wo = Dense(c.intermediate_size, c.hidden_size, ('mlp', 'embed'), stddev=std / math.sqrt(2 * c.num_layers),
                    dtype=dt, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jax.nn.gelu(self.wi(x), approximate=True)
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    return self.wo(h)


class GPTBlock(nnx.Module):
  """x = x + Drop(Attn(LN(x))); x = x + Drop(MLP(LN(x)))  (pre-LayerNorm, as in GPT-2)."""

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    dt, eps = c.compute_dtype, c.layer_norm_eps
    self.attention_norm = LayerNorm(c.hidden_size, eps=eps, dtype=dt, rngs=rngs)
    self.attention = CausalSelfAttention(c, rngs=rngs)
    self.mlp_norm = LayerNorm(c.hidden_size, eps=eps, dtype=dt, rngs=rngs)
    self.mlp = GeluMlp(c, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x, segment_mask, dropout_rng=None):
    k = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, i) for i in range(3)]
    # The residual stream stays float32; only the branches run in the compute dtype.
    a = self.attention(self.attention_norm(x), segment_mask, dropout_rng=k[0])
    x = x + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32)
    m = self.mlp(self.mlp_norm(x))
    x = x + dropout(m, self.dropout_rate, k[2]).astype(jnp.float32)
    return constrain(x, ACT)

  def decode(self, x, key_cache, value_cache, index, mask):
    a, key_cache, value_cache = self.attention.decode(self.attention_norm(x), key_cache, value_cache, index, mask)
    x = x + a.astype(jnp.float32)
    x = x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)
    return x, key_cache, value_cache


class GPTDecoder(nnx.Module):
  """The L blocks: stacked + nnx.scan (cfg.scan_layers) or a Python list (for comparison)."""

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    self.scan_layers = c.scan_layers
    self.num_layers = c.num_layers
    self.remat = c.remat
    self.layers = stack_layers(lambda r: GPTBlock(c, rngs=r), c.num_layers, c.scan_layers, rngs)

  def __call__(self, x, segment_mask, dropout_rng=None):
    # Layer i gets fold_in(dropout_rng, i) on both paths, so scanned == unscanned even with dropout.
    if not self.scan_layers:
      for i, layer in enumerate(self.layers):
        key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
        x = maybe_remat(lambda lyr, h, k: lyr(h, segment_mask, k), self.remat, in_scan=False)(layer, x, key)
      return x
    meta = {nnx.PARTITION_NAME: 'layers'}
    if dropout_rng is None:
      body = maybe_remat(lambda lyr, h: lyr(h, segment_mask), self.remat, in_scan=True)
      return nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry, transform_metadata=meta)(self.layers, x)
    keys = jax.vmap(lambda i: jax.random.fold_in(dropout_rng, i))(jnp.arange(self.num_layers))
    body = maybe_remat(lambda lyr, h, k: lyr(h, segment_mask, k), self.remat, in_scan=True)
    return nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=meta)(
        self.layers, x, keys)

  def decode(self, x, key_cache, value_cache, index, mask):
    """Caches [num_layers, B, S, N, D]; layer i reads and writes slice i."""
    if not self.scan_layers:
      keys, values = [], []
      for i, layer in enumerate(self.layers):
        x, k, v = layer.decode(x, key_cache[i], value_cache[i], index, mask)
        keys.append(k)
        values.append(v)
      return x, jnp.stack(keys), jnp.stack(values)
    body = lambda lyr, h, k, v: lyr.decode(h, k, v, index, mask)  # noqa: E731
    return nnx.scan(body, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0),
                    transform_metadata={nnx.PARTITION_NAME: 'layers'})(self.layers, x, key_cache, value_cache)


class GPT(nnx.Module):
  """GPT-2 language model: token + position embeddings, L pre-LN blocks, final LN, tied output projection.

  Created inside `with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES)` its params are born sharded; outside a
  mesh they are plain arrays that still carry their logical names (for `nnx.get_named_sharding` later).
  """

  def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
    c = cfg if isinstance(cfg, GPTConfig) else GPTConfig.from_config(cfg, vocab_size)
    self.config = c
    std = c.initializer_range
    # Eager sharding needs a mesh; without one, keep the annotations but place nothing.
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.token_embeddings = Embed(c.vocab_size, c.hidden_size, ('vocab', 'embed'), stddev=std, rngs=rngs)
      self.position_embeddings = Embed(c.max_position, c.hidden_size, ('position', 'embed'), stddev=std, rngs=rngs)
      self.decoder = GPTDecoder(c, rngs=rngs)
      self.final_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)

  def _embed(self, input_ids, positions):
    return self.token_embeddings(input_ids) + self.position_embeddings(positions)

  def _logits(self, x):
    # Tied output projection (Embed.attend gathers the table along fsdp first; see layers.py).
    return self.token_embeddings.attend(self.final_norm(x), self.config.compute_dtype)

  def __call__(self, input_ids, *, segment_ids=None, positions=None, dropout_rng=None) -> jax.Array:
    """input_ids [B, T] -> next-token logits [B, T, V] float32. dropout_rng None = eval.

    Packed rows: `segment_ids` [B, T] (0 = padding) let a token attend only to earlier tokens of its own
    segment; `positions` [B, T] (default 0..T-1) should restart at 0 in each document.
    """
    c = self.config
    seq_len = input_ids.shape[1]
    if seq_len > c.max_position:
      raise UserError(f'sequence length {seq_len} exceeds model.max_position={c.max_position}; '
                      'lower data.seq_len or raise model.max_position')
    if positions is None:
      positions = jnp.arange(seq_len)[None]
    segment_mask = None
    if segment_ids is not None:
      segment_mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, Tq, Tk]
    emb_key, dec_key = (None, None) if dropout_rng is None else (
        jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
    x = constrain(dropout(self._embed(input_ids, positions), c.dropout_rate, emb_key), ACT)
    x = self.decoder(x, segment_mask, dec_key)
    return self._logits(x)

  # ----- KV-cache decoding -----

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated).

    key/value [num_layers, B, S, N, D] in the compute dtype; positions [B, S] is the position stored in each slot
    (-1 = empty or padding: never attended to); index is the next slot to write (the same for every row).
    """
    c = self.config
    shape = (c.num_layers, batch, max_len, c.num_heads, c.head_dim)
    return dict(key=jnp.zeros(shape, c.compute_dtype), value=jnp.zeros(shape, c.compute_dtype),
                positions=jnp.full((batch, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))

  def decode(self, tokens, cache: dict, positions) -> tuple[jax.Array, dict]:
    """Appends `tokens` [B, T] to the cache at slots index..index+T-1 -> (logits [B, T, V] float32, new cache).

    `positions` [B, T] are each token's positions in its sequence; -1 marks padding (a prompt's pad slots).
    A token at position p attends to the cached tokens of its row with positions 0..p, so prompts may be left-
    or right-padded; positions must increase along a row (no position is stored twice). The caller keeps
    index + T <= the cache length.
    """
    positions = positions.astype(jnp.int32)
    index = cache['index']
    slot_positions = jax.lax.dynamic_update_slice_in_dim(cache['positions'], positions, index, axis=1)
    kpos = slot_positions[:, None, None, :]
    mask = (kpos >= 0) & (kpos <= positions[:, None, :, None])  # [B, 1, T, S]
    # Padding (-1) is looked up as position 0: finite values, and nothing attends to it.
    x = self._embed(tokens, jnp.maximum(positions, 0))
    x, keys, values = self.decoder.decode(x, cache['key'], cache['value'], index, mask)
    new_cache = dict(key=keys, value=values, positions=slot_positions, index=index + tokens.shape[1])
    return self._logits(x), new_cache


# ----- loss, FLOPs -----

def next_token_pairs(segment_ids):
  """[B, T-1] bool: whether token t+1 is a target for position t (both in the same non-zero segment)."""
  return (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, 1:] != 0)


def next_token_loss(logits: jax.Array, input_ids: jax.Array, segment_ids: jax.Array | None = None):
  """Summed cross-entropy of predicting token t+1 from position t -> (sum_loss, count), both float32 scalars.

  A pair counts only when both tokens are in the same non-zero segment: no loss across a document boundary of a
  packed row or on padding (segment 0). `segment_ids` None = every pair counts.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  valid = jnp.ones(targets.shape, bool) if segment_ids is None else next_token_pairs(segment_ids)
  # logsumexp minus the target logit: no [B, T, V] log-softmax array is materialised.
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per input token (forward + backward = 3x forward; 2 FLOPs per multiply-add), matmuls only.

  Per layer: 6 x matmul params (4 H^2 for q/k/v/out + 2 H I for the MLP) plus attention scores and weighted
  sum, 12 x H x seq_len (counted over the full T x T square, as computed, not halved for causality). The tied
  H x V output projection runs at every position. `max_predictions` is ignored: every token is a target.
  Embedding lookups, norms, softmax and biases are not counted (as in the usual MFU formula).
  """
  del max_predictions
  c = GPTConfig.from_config(model_cfg, vocab_size)
  h, i = c.hidden_size, c.intermediate_size
  layers = c.num_layers * (6 * (4 * h * h + 2 * h * i) + 12 * h * seq_len)
  return float(layers + 6 * h * c.vocab_size)


# ----- generation -----

def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature=1.0, top_k=0, top_p=1.0,
                  greedy: bool = False) -> jax.Array:
  """One token id per row of `logits` [B, V]: argmax (greedy), or a sample after temperature, top-k, top-p.

  temperature, top_k (0 = all tokens) and top_p (1.0 = all) may be traced scalars: changing them does not
  recompile a jitted caller.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  # top-k: drop what is below the k-th largest logit (ties with it stay).
  k = jnp.clip(top_k, 1, vocab)
  sorted_logits = jnp.where((jnp.arange(vocab) < k) | (top_k <= 0), sorted_logits, -jnp.inf)
  # top-p: keep the most likely tokens until their mass reaches top_p (always at least one).
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = (before < top_p) | (top_p >= 1.0)  # top_p = 1 keeps all, whatever the cumsum's rounding
  cutoff = jnp.min(jnp.where(keep & (sorted_logits > -jnp.inf), sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _decode_fn(graphdef, state, tokens, cache, positions):
  return nnx.merge(graphdef, state).decode(tokens, cache, positions)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_new_tokens', 'greedy', 'padding_side'))
def _generate(graphdef, state, prompt_ids, prompt_lengths, rng, temperature, top_k, top_p, stop_ids, pad_id, *,
              max_new_tokens, greedy, padding_side):
  batch, width = prompt_ids.shape
  lengths = prompt_lengths.astype(jnp.int32)
  idx = jnp.arange(width, dtype=jnp.int32)[None]
  if padding_side == 'right':
    positions = jnp.where(idx < lengths[:, None], idx, -1)
    last = lengths - 1
  else:
    positions = idx - (width - lengths)[:, None]
    positions = jnp.where(positions >= 0, positions, -1)
    last = jnp.full((batch,), width - 1, jnp.int32)
  cache = nnx.merge(graphdef, state).init_cache(batch, width + max_new_tokens)
  # Pad slots are looked up as token 0 (any pad value is safe) and never attended to (position -1).
  prompt_ids = jnp.where(positions >= 0, prompt_ids.astype(jnp.int32), 0)
  logits, cache = _decode_fn(graphdef, state, prompt_ids, cache, positions)
  logits = logits[jnp.arange(batch), last]  # [B, V] at each prompt's last real token

  def cond(carry):
    t, _, _, _, done, _, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  # The params ride in the loop carry: NNX refuses variables holding tracers of an outer trace (here, the jit's)
  # inside the loop body's nnx.scan.
  def body(carry):
    t, out, logits, cache, done, num, rng, state = carry
    rng, key = jax.random.split(rng)
    sampled = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    out = out.at[:, t].set(jnp.where(done, pad_id, sampled))
    num = jnp.where(done, num, t + 1)
    done = done | jnp.isin(sampled, stop_ids)
    # Stopped rows keep decoding (the batch moves in lockstep); their outputs are ignored.
    logits, cache = _decode_fn(graphdef, state, sampled[:, None], cache, (lengths + t)[:, None])
    return t + 1, out, logits[:, 0], cache, done, num, rng, state

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), out, logits, cache, jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.int32), rng, state)
  _, out, _, _, _, num, _, _ = jax.lax.while_loop(cond, body, init)
  return out, num


def generate(model: GPT, prompt_ids, prompt_lengths, max_new_tokens: int, rng: jax.Array | None = None, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             stop_ids=(), padding_side: str = 'right', pad_id: int = 0):
  """Continues a batch of prompts -> (tokens [B, max_new_tokens] int32, num_generated [B] int32).

  prompt_ids [B, P] hold prompts of `prompt_lengths` [B] (each >= 1) tokens, padded on `padding_side`
  ('right' or 'left'). A row stops after emitting a token in `stop_ids` (kept, and counted in num_generated);
  its later slots hold `pad_id`. The loop ends early when every row has stopped. Sampling: `greedy` takes
  the argmax; otherwise logits / temperature, restricted to the top_k (0 = all) most likely tokens and to the
  top_p nucleus (1.0 = all), sampled with `rng`. Compiled once per prompt shape, max_new_tokens, greedy,
  padding side and number of stop ids; the other settings are traced.
  """
  c = model.config
  width = prompt_ids.shape[1]
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} must be at least 1')
  if width + max_new_tokens > c.max_position:
    raise UserError(f'prompt width {width} + max_new_tokens {max_new_tokens} exceeds model.max_position='
                    f'{c.max_position}; shorten the prompts or generate fewer tokens')
  if padding_side not in ('left', 'right'):
    raise UserError(f"padding_side={padding_side!r}: use 'left' or 'right'")
  if not greedy and not temperature > 0:
    raise UserError(f'temperature={temperature} must be positive (or pass greedy=True)')
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise UserError(f'top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]')
  if rng is None:
    if not greedy:
      raise UserError('sampling needs an rng key (or pass greedy=True)')
    rng = jax.random.key(0)
  stop = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)  # -1: no stop id (never sampled)
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, jnp.asarray(prompt_ids), jnp.asarray(prompt_lengths), rng,
                   jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), stop, jnp.int32(pad_id),
                   max_new_tokens=int(max_new_tokens), greedy=bool(greedy), padding_side=padding_side)

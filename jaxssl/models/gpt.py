"""GPT-2 (Radford et al. 2019) causal LM, and its Llama-style variant; same math as GPT2LMHeadModel / LlamaForCausalLM.

Default config = GPT-2: pre-LayerNorm blocks, learned absolute positions, tanh-approximate GELU ("gelu_new"),
LayerNorm eps 1e-5, biases everywhere, a final LayerNorm, and the output projection tied to the token embedding.
The Llama architecture is the same decoder with other switches (configs/gpt.py:llama_tiny):

  norm='rmsnorm'  position='rope' (rope_theta, rope_scaling)  mlp='swiglu'  num_kv_heads < num_heads (GQA)
  use_bias=False  tie_embeddings=False (Llama 2/3 8B; Llama 3.2 1B/3B tie)  dropout 0

Gemma 3 (configs/gpt.py:gemma3_*) adds the options of models/gemma.py: (1 + w) RMSNorm, GeGLU, q/k norms, four
norms per layer, interleaved sliding-window (local) and global layers with their own RoPE bases, scaled embeddings.

The block stack is created with `nnx.vmap` (a leading 'layers' axis) and run with `nnx.scan`. Packed training
rows: `segment_ids` [B, T] (0 = padding) keep documents apart in attention and `positions` [B, T] restart at 0 in
each document (RoPE's rotation too); `next_token_loss` drops the pairs that cross a document boundary or touch
padding. Generation: `init_cache` + `GPT.decode` append new tokens to a KV cache (num_kv_heads heads);
`generation.generate` runs prefill + one-token decode steps under one jit.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models import gemma, vocab
from jaxssl.models.layers import (Embed, check_compute_settings, config_fields, decode_layer, dropout, stack_layers,
                                  unroll_layers)
from jaxssl.models.gemma import make_mlp, make_norm
from jaxssl.models.parts import ACT, CausalSelfAttention, Linear, kv_cache, next_token_pairs, rope_angles, run_stack
from jaxssl.models.products import vocab_logits


# rope_scaling types (HF's `rope_type`) and the keys each needs.
ROPE_SCALING_KEYS = {
    'linear': ('factor',),
    'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'),
}
CHOICES = {'norm': ('layernorm', 'rmsnorm', 'rmsnorm_plus_one'), 'position': ('learned', 'rope'),
           'mlp': ('gelu', 'swiglu', 'geglu')}


def _rope_scaling(value):
  """An HF-style rope_scaling dict -> sorted (key, value) pairs (hashable: the config is static data), or None.

  Accepts a dict, a ConfigDict or already-frozen pairs; 'type' is read as 'rope_type'; 'default' means none.
  """
  if value is None or (isinstance(value, tuple) and not value):
    return None
  if isinstance(value, tuple):
    value = dict(value)
  elif hasattr(value, 'items'):
    value = dict(value.items())
  else:
    raise UserError(f'model.rope_scaling={value!r} must be None or a dict like '
                    "{'rope_type': 'llama3', 'factor': 32.0, ...}")
  kind = value.pop('rope_type', value.pop('type', None))
  if kind in (None, 'default') and not value:
    return None
  if kind not in ROPE_SCALING_KEYS:
    raise UserError(f'model.rope_scaling has rope_type={kind!r}: supported are {", ".join(ROPE_SCALING_KEYS)} '
                    '(or None for plain RoPE)')
  need = ROPE_SCALING_KEYS[kind]
  missing, extra = [k for k in need if k not in value], sorted(k for k in value if k not in need)
  if missing or extra:
    raise UserError(f'model.rope_scaling for {kind!r} needs exactly the keys {", ".join(need)} '
                    f'(missing {missing}, unknown {extra})')
  frozen = {k: int(v) if k == 'original_max_position_embeddings' else float(v) for k, v in value.items()}
  if not all(v > 0 for v in frozen.values()):
    raise UserError(f'model.rope_scaling values must be positive: {frozen}')
  if kind == 'llama3' and not frozen['high_freq_factor'] > frozen['low_freq_factor']:
    raise UserError('model.rope_scaling needs high_freq_factor > low_freq_factor (Llama 3.x: 4.0 and 1.0)')
  return tuple(sorted({**frozen, 'rope_type': kind}.items()))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """The `model` config section, validated; frozen (hashable) so modules can hold it as static data.

  `num_kv_heads` and `head_dim` given as 0 read back resolved (num_heads, hidden_size // num_heads);
  `rope_scaling` reads back as sorted (key, value) pairs (`dict(c.rope_scaling)` is HF's dict).
  """
  vocab_size: int
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  max_position: int = 1024
  dropout_rate: float = 0.1            # embeddings and both residual branches (GPT-2's embd/resid_pdrop)
  attention_dropout_rate: float = 0.1  # attention probabilities (attn_pdrop)
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5         # LayerNorm or RMSNorm epsilon (Llama: rms_norm_eps)
  dtype: str = 'float32'
  remat: str = 'none'
  layer_loop: str = 'auto'  # layers.LAYER_LOOPS
  scan_layers: bool = True
  # Train loss: positions per block of the fused output projection + cross-entropy (models/lm_loss.py); 0 = the
  # whole [B, T, V] logits at once. Must divide data.seq_len (a divisor of it is used otherwise).
  loss_chunk: int = 0
  attention: str = 'auto'
  # Architecture switches; the defaults are GPT-2.
  norm: str = 'layernorm'              # 'layernorm' | 'rmsnorm'
  position: str = 'learned'            # 'learned' (a position table) | 'rope' (rotary, HF Llama's rotate_half)
  rope_theta: float = 10000.0
  rope_scaling: tuple | None = None    # None or HF's dict: rope_type 'llama3' (Llama 3.1+) or 'linear'
  mlp: str = 'gelu'                    # 'gelu' (W2 gelu(W1 x)) | 'swiglu' (W2 (silu(Wg x) * Wu x))
  num_kv_heads: int = 0                # 0 = num_heads; fewer = grouped-query attention
  head_dim: int = 0                    # 0 = hidden_size // num_heads
  tie_embeddings: bool = True          # False: a separate lm_head kernel (embed, vocab)
  use_bias: bool = True                # biases in q/k/v/out and the MLP
  attention_bias: bool = False         # q/k/v biases even when use_bias=False (Qwen2)
  # Gemma's options (models/gemma.py); the defaults are off.
  qk_norm: bool = False                # RMSNorm of each q/k head before RoPE
  sandwich_norm: bool = False          # norms after attention and after the MLP too
  query_pre_attn_scalar: float = 0.0   # scores * this^-1/2; 0 = head_dim
  sliding_window: int = 0              # local layers' window; 0 = every layer global
  sliding_window_pattern: int = 0      # every Nth layer global (Gemma 3: 6); 0 = all local
  rope_local_theta: float = 0.0        # RoPE base of local layers; 0 = rope_theta
  scale_embeddings: bool = False       # token embeddings * sqrt(hidden_size)
  # The tokenizer's ids when the embedding has more rows (a padded public vocabulary, models/vocab.py): logits of
  # the rows past it are -inf. 0 = every row is a token. Set by load_export, never by a config file.
  num_token_ids: int = 0

  def __post_init__(self):
    # 0 = derived: resolved once, so every user reads the actual sizes.
    if not self.num_kv_heads:
      object.__setattr__(self, 'num_kv_heads', self.num_heads)
    if not self.head_dim and self.num_heads > 0:
      object.__setattr__(self, 'head_dim', self.hidden_size // self.num_heads)
    object.__setattr__(self, 'rope_scaling', _rope_scaling(self.rope_scaling))

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'GPTConfig':
    """Reads the fields this model uses from a ConfigDict/dict (extra keys such as `name` are ignored)."""
    kw = config_fields(cls, model_cfg, 'configs/gpt.py')
    for name in ('num_kv_heads', 'head_dim', 'loss_chunk'):
      if int(kw.get(name, 0)) < 0:
        raise UserError(f'model.{name}={kw[name]} must be >= 0 (0 = ' +
                        ('the whole logits at once)' if name == 'loss_chunk' else 'derived from num_heads)'))
    c = cls(vocab_size=int(vocab_size), **kw)
    for name in ('vocab_size', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position'):
      if int(getattr(c, name)) < 1:
        raise UserError(f'model.{name}={getattr(c, name)} must be a positive integer')
    vocab.check_rows(c.num_token_ids, c.vocab_size, 'model.num_token_ids')
    if not kw.get('head_dim') and c.hidden_size % c.num_heads:
      raise UserError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}; '
                      f'set --config.model.num_heads to a divisor (e.g. {max(1, c.hidden_size // 64)})')
    if c.num_heads % c.num_kv_heads:
      raise UserError(f'model.num_kv_heads={c.num_kv_heads} does not divide model.num_heads={c.num_heads}; '
                      'use a divisor of num_heads (0 = num_heads, no grouping)')
    check_compute_settings(c, 'gpt', eps_note=' (GPT-2 uses 1e-5)')
    gemma.check_config(c)
    for name, choices in CHOICES.items():
      if getattr(c, name) not in choices:
        raise UserError(f'model.{name}={getattr(c, name)!r}: use {" or ".join(map(repr, choices))}')
    for name in ('tie_embeddings', 'use_bias', 'attention_bias', 'scan_layers'):
      if not isinstance(getattr(c, name), bool):
        raise UserError(f'model.{name}={getattr(c, name)!r} must be True or False')
    if c.position == 'rope':
      if c.head_dim % 2:
        raise UserError(f'model.head_dim={c.head_dim} must be even for position=rope (dimensions rotate in pairs)')
      if not c.rope_theta > 0:
        raise UserError(f'model.rope_theta={c.rope_theta} must be positive (Llama 2: 10000, Llama 3: 500000)')
    elif c.rope_scaling is not None:
      raise UserError("model.rope_scaling is set but model.position='learned'; set position='rope' or drop it")
    return c

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


class GPTBlock(nnx.Module):
  """x = x + Drop(Attn(Norm(x))); x = x + Drop(MLP(Norm(x)))  (pre-norm, as in GPT-2 and Llama)."""

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    self.attention_norm = make_norm(c, rngs)
    self.attention = CausalSelfAttention(c, rngs=rngs)
    self.mlp_norm = make_norm(c, rngs)
    self.mlp = make_mlp(c, rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x, segment_ids, rotary=None, dropout_rng=None):
    k = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, i) for i in range(3)]
    # The residual stream stays float32; only the branches run in the compute dtype.
    a = self.attention(self.attention_norm(x), segment_ids=segment_ids, rotary=rotary, dropout_rng=k[0])
    x = x + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32)
    m = self.mlp(self.mlp_norm(x))
    x = x + dropout(m, self.dropout_rate, k[2]).astype(jnp.float32)
    return constrain(x, ACT)

  def decode(self, x, key_cache, value_cache, index, mask, rotary=None, layer=None):
    a, key_cache, value_cache = self.attention.decode(self.attention_norm(x), key_cache, value_cache, index, mask,
                                                      rotary, layer)
    x = x + a.astype(jnp.float32)
    x = x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)
    return x, key_cache, value_cache


class GPTDecoder(nnx.Module):
  """The L blocks: stacked + nnx.scan (cfg.scan_layers) or a Python list (for comparison)."""

  def __init__(self, c: GPTConfig, *, rngs: nnx.Rngs):
    self.scan_layers, self.num_layers, self.remat = c.scan_layers, c.num_layers, c.remat
    self.unroll = unroll_layers(c.layer_loop)
    self.layers = stack_layers(lambda r: GPTBlock(c, rngs=r), c.num_layers, c.scan_layers, rngs)

  def __call__(self, x, segment_ids, dropout_rng=None, rotary=None):
    return run_stack(self.layers, x, lambda lyr, h, key: lyr(h, segment_ids, rotary, key), num_layers=self.num_layers,
                     scan=self.scan_layers, remat=self.remat, unroll=self.unroll, dropout_rng=dropout_rng)

  def decode(self, x, key_cache, value_cache, index, mask, rotary=None):
    """Caches [L, B, S, K, D] (a scan carries them, each layer writing its new slots in place) or lists of L
    arrays [B, S, K, D] (layers apart); layer i reads and writes entry i."""
    if not self.scan_layers:
      keys, values = list(key_cache), list(value_cache)  # new lists (or a stacked cache's slices)
      for i, layer in enumerate(self.layers):
        x, keys[i], values[i] = decode_layer(layer, x, keys[i], values[i], index, mask, rotary)
      return (x, keys, values) if isinstance(key_cache, list) else (x, jnp.stack(keys), jnp.stack(values))
    body = lambda lyr, carry, i: lyr.decode(*carry, index, mask, rotary, layer=i)  # noqa: E731
    return nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={
        nnx.PARTITION_NAME: 'layers'})(self.layers, (x, key_cache, value_cache), jnp.arange(self.num_layers))


class GPT(nnx.Module):
  """Causal LM: token (+ learned position) embeddings, L pre-norm blocks, final norm, tied or separate output
  projection (`lm_head`).

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
      if c.position == 'learned':
        self.position_embeddings = Embed(c.max_position, c.hidden_size, ('position', 'embed'), stddev=std,
                                         rngs=rngs)
      self.decoder = (gemma.GemmaDecoder if gemma.uses_gemma_block(c) else GPTDecoder)(c, rngs=rngs)
      self.final_norm = make_norm(c, rngs)
      if not c.tie_embeddings:
        self.lm_head = Linear(c.hidden_size, c.vocab_size, ('embed', 'vocab'), stddev=std, use_bias=False,
                              dtype=c.compute_dtype, rngs=rngs)

  def _embed(self, input_ids, positions):
    c = self.config
    x = self.token_embeddings(input_ids)
    if c.scale_embeddings:  # in the compute dtype, as HF's Gemma scales them
      x = (x.astype(c.compute_dtype) * jnp.asarray(c.hidden_size ** 0.5, c.compute_dtype)).astype(jnp.float32)
    return x + self.position_embeddings(positions) if c.position == 'learned' else x

  def _rotary(self, positions):
    c = self.config
    if c.position != 'rope':
      return None
    return gemma.rotary_pair(c, positions) if gemma.uses_gemma_block(c) else rope_angles(c, positions)

  def _lm_head_kernel(self) -> jax.Array:
    """lm_head's kernel [H, V] in the compute dtype, gathered along fsdp first (as Embed.gathered); vocab split."""
    return constrain(self.lm_head.kernel[...], (None, 'vocab')).astype(self.config.compute_dtype)

  def output_embedding(self) -> jax.Array:
    """The output projection vocabulary-major, [V, H] in the compute dtype (what models/lm_loss.py takes): the
    token embeddings, or lm_head's kernel transposed (as stored where generation.layers_apart stored it so)."""
    c = self.config
    if c.tie_embeddings:
      return self.token_embeddings.gathered(c.compute_dtype)
    return self.lm_head.kernel[...].astype(c.compute_dtype) if self.lm_head.out_major else self._lm_head_kernel().T

  def logits(self, x, *, decoding: bool = False):
    """Next-token logits [..., V] float32 of final-norm states `x` [..., H]; `decoding`: products.vocab_logits'."""
    c = self.config
    if c.tie_embeddings or self.lm_head.out_major:  # each weight as stored: XLA:CPU copied a transposed one whole
      logits = vocab_logits(x.astype(c.compute_dtype), self.output_embedding(), decoding=decoding)
    else:
      logits = jnp.einsum('...h,hv->...v', x.astype(c.compute_dtype), self._lm_head_kernel(),
                          preferred_element_type=jnp.float32)
    return vocab.mask_padding_logits(logits, c.num_token_ids)  # padding rows are never predicted

  def __call__(self, input_ids, *, segment_ids=None, positions=None, dropout_rng=None) -> jax.Array:
    """input_ids [B, T] -> next-token logits [B, T, V] float32. dropout_rng None = eval.

    Packed rows: `segment_ids` [B, T] (0 = padding) let a token attend only to earlier tokens of its own
    segment; `positions` [B, T] (default 0..T-1) should restart at 0 in each document.
    """
    return self.logits(self.features(input_ids, segment_ids=segment_ids, positions=positions,
                                     dropout_rng=dropout_rng))

  def features(self, input_ids, *, segment_ids=None, positions=None, dropout_rng=None) -> jax.Array:
    """The final-norm hidden states [B, T, H] in the compute dtype: what the output projection reads."""
    c = self.config
    seq_len = input_ids.shape[1]
    if seq_len > c.max_position:
      raise UserError(f'sequence length {seq_len} exceeds model.max_position={c.max_position}; '
                      'lower data.seq_len or raise model.max_position')
    if positions is None:
      positions = jnp.arange(seq_len)[None]
    emb_key, dec_key = (None, None) if dropout_rng is None else (
        jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
    x = constrain(dropout(self._embed(input_ids, positions), c.dropout_rate, emb_key), ACT)
    x = self.decoder(x, segment_ids, dec_key, self._rotary(positions))
    return self.final_norm(x).astype(c.compute_dtype)

  # ----- KV-cache decoding -----

  def init_cache(self, batch: int, max_len: int) -> dict:
    """An empty KV cache for `batch` rows of up to `max_len` tokens (prompt + generated).

    key/value [num_layers, B, S, num_kv_heads, head_dim] in the compute dtype; positions [B, S] is the position
    stored in each slot (-1 = empty or padding: never attended to); index is the next slot to write (the same
    for every row).
    """
    c = self.config
    layers = (self.decoder.init_cache(batch, max_len) if isinstance(self.decoder, gemma.GemmaDecoder) else
              kv_cache(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, c.compute_dtype))
    return dict(layers, positions=jnp.full((batch, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))

  def decode(self, tokens, cache: dict, positions, last=None) -> tuple[jax.Array, dict]:
    """Appends `tokens` [B, T] to the cache at slots index..index+T-1 -> (logits [B, T, V] float32, new cache);
    `last` [B]: the logits at each row's token `last` only, [B, 1, V] (a prefill needs no others).

    `positions` [B, T] are each token's positions in its sequence; -1 marks padding (a prompt's pad slots).
    A token at position p attends to the cached tokens of its row with positions 0..p, so prompts may be left-
    or right-padded; positions must increase along a row (no position is stored twice). The caller keeps
    index + T <= the cache length.
    """
    positions, index = positions.astype(jnp.int32), cache['index']
    slot_positions = jax.lax.dynamic_update_slice_in_dim(cache['positions'], positions, index, axis=1)
    kpos = slot_positions[:, None, None, :]
    mask = (kpos >= 0) & (kpos <= positions[:, None, :, None])  # [B, 1, T, S]
    # Padding (-1) is looked up as position 0: finite values, and nothing attends to it.
    x = self._embed(tokens, jnp.maximum(positions, 0))
    rotary = self._rotary(jnp.maximum(positions, 0))
    if isinstance(self.decoder, gemma.GemmaDecoder):
      x, new_cache = self.decoder.decode(x, cache, index, mask, positions, rotary)
    else:
      x, keys, values = self.decoder.decode(x, cache['key'], cache['value'], index, mask, rotary)
      new_cache = dict(key=keys, value=values)
    new_cache.update(positions=slot_positions, index=index + tokens.shape[1])
    x = x if last is None else x[jnp.arange(x.shape[0]), last][:, None]
    return self.logits(self.final_norm(x), decoding=True), new_cache


# ----- loss, FLOPs -----


def next_token_loss(logits: jax.Array, input_ids: jax.Array, segment_ids: jax.Array | None = None):
  """Summed cross-entropy of predicting token t+1 from position t -> (sum_loss, count), both float32 scalars.

  A pair counts only when both tokens are in the same non-zero segment: no loss across a document boundary of a
  packed row or on padding (segment 0). `segment_ids` None = every pair counts.
  """
  loss, _, count = next_token_stats(logits, input_ids, segment_ids)
  return loss, count


def next_token_targets(input_ids, segment_ids=None):
  """(targets [B, T] int32, valid [B, T] bool): position t predicts token t + 1 where next_token_pairs says so;
  the last position predicts nothing (target 0, not valid)."""
  targets = jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1))).astype(jnp.int32)
  valid = jnp.ones(targets[:, 1:].shape, bool) if segment_ids is None else next_token_pairs(segment_ids)
  return targets, jnp.pad(valid, ((0, 0), (0, 1)))


def next_token_stats(logits: jax.Array, input_ids: jax.Array, segment_ids: jax.Array | None = None):
  """(summed next-token loss, correct argmax predictions, counted pairs), float32 scalars; see next_token_loss.

  Reads logits [B, T, V] at every position as they are, with the targets shifted instead (the last position
  predicts nothing): slicing off the last position would copy the [B, T, V] array, and its gradient pad it back,
  which was ~15% of a GPT-2 small train step on CPU.
  """
  logits = logits.astype(jnp.float32)
  targets, valid = next_token_targets(input_ids, segment_ids)
  # logsumexp minus the target logit: no [B, T, V] log-softmax array is materialised.
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) & valid).astype(jnp.float32)
  return jnp.sum(jnp.where(valid, nll, 0.0)), correct, jnp.sum(valid).astype(jnp.float32)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per input token (forward + backward = 3x forward; 2 FLOPs per multiply-add), matmuls only.

  Per layer: 6 x matmul params (q and out H x N*D each, k and v H x K*D each with K = num_kv_heads; the MLP
  2 H I, or 3 H I for SwiGLU/GeGLU) plus attention scores and weighted sum, 12 x N*D x keys, keys = seq_len (the
  full T x T square, as computed, not halved for causality), or min(sliding_window, seq_len) in a local layer
  (gemma.attention_flops). The H x V output projection runs at every position. `max_predictions` is ignored:
  every token is a target. Embedding lookups, norms, RoPE, softmax and biases are not counted (the MFU formula).
  """
  del max_predictions
  c = GPTConfig.from_config(model_cfg, vocab_size)
  h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
  attention = h * d * (2 * c.num_heads + 2 * c.num_kv_heads)
  mlp = (2 if c.mlp == 'gelu' else 3) * h * i
  return float(c.num_layers * 6 * (attention + mlp) + gemma.attention_flops(c, seq_len) + 6 * h * c.vocab_size)

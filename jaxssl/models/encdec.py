"""Transformer encoder-decoder for denoising pretraining (BART, Lewis et al. 2019; MASS, Song et al. 2019).

  encoder: token + learned position embeddings -> L_e pre-LN blocks (bidirectional self-attention over the real
           source tokens, MLP) -> final LayerNorm
  decoder: token + learned position embeddings -> L_d pre-LN blocks (causal self-attention, cross-attention to the
           encoder output, MLP) -> final LayerNorm -> logits through the shared (tied) token embedding

One token embedding serves encoder input, decoder input and output projection (as BART); each side has its own
position table. The blocks are built from the shared parts (parts.py: CausalSelfAttention, GeluMlp; tanh GELU,
GPT-2 init), are stacked with `nnx.vmap` (a leading 'layers' axis) and run with `nnx.scan`. Unlike BART's post-LN
layers, these are pre-LN (stabler at depth without warmup tricks); converted BART checkpoints would not fit as
they are.

Generation: `init_cache` runs the encoder once and projects its output into every decoder layer's cross-attention
keys/values; `decode` appends target tokens to a GPT-style self-attention cache; `generate` is greedy (or sampled)
decoding from the decoder-start token under one jit (a `lax.while_loop`).

Downstream heads: `encode(input_ids, token_type_ids, attention_mask)` -> (sequence, pooled) is the encoder alone,
so tasks.model.TaskModel fine-tunes an exported encoder-decoder like BERT (token types are ignored; pooled = the masked
mean of the encoder output, as there is no pooler layer).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.generation import sample_logits
from jaxssl.models import fused_attention
from jaxssl.models.layers import (Embed, LayerNorm, check_compute_settings, config_fields, dropout, stack_layers,
                                  unroll_layers)
from jaxssl.models.parts import ACT, BlockConfig, CausalSelfAttention, GeluMlp, kv_cache, run_stack


@dataclasses.dataclass(frozen=True)
class EncDecConfig:
  """The `model` config section, validated; frozen (hashable) so modules can hold it as static data.

  `num_decoder_layers` given as 0 reads back resolved (= num_layers, the encoder's depth).
  """
  vocab_size: int
  num_layers: int                      # encoder blocks
  hidden_size: int
  num_heads: int
  intermediate_size: int
  num_decoder_layers: int = 0          # 0 = num_layers
  max_position: int = 1024             # longest source and longest target
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: str = 'none'
  layer_loop: str = 'auto'  # layers.LAYER_LOOPS
  scan_layers: bool = True
  attention: str = 'auto'

  def __post_init__(self):
    if not self.num_decoder_layers:
      object.__setattr__(self, 'num_decoder_layers', self.num_layers)

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'EncDecConfig':
    """Reads the fields this model uses from a ConfigDict/dict (extra keys such as `name` are ignored)."""
    kw = config_fields(cls, model_cfg, 'configs/encdec.py')
    if int(kw.get('num_decoder_layers', 0)) < 0:
      raise UserError(f'model.num_decoder_layers={kw["num_decoder_layers"]} must be >= 0 (0 = num_layers)')
    c = cls(vocab_size=int(vocab_size), **kw)
    for name in ('vocab_size', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position'):
      if int(getattr(c, name)) < 1:
        raise UserError(f'model.{name}={getattr(c, name)} must be a positive integer')
    if c.hidden_size % c.num_heads:
      raise UserError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}; '
                      f'set --config.model.num_heads to a divisor (e.g. {max(1, c.hidden_size // 64)})')
    check_compute_settings(c, 'encdec', eps_note=' (BART uses 1e-5)')
    if not isinstance(c.scan_layers, bool):
      raise UserError(f'model.scan_layers={c.scan_layers!r} must be True or False')
    return c

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def block_config(self, num_layers: int) -> BlockConfig:
    """The GPT-2 block settings of one stack (the shared attention and MLP parts read their sizes from it)."""
    return BlockConfig(num_layers=num_layers, hidden_size=self.hidden_size, num_heads=self.num_heads,
                       intermediate_size=self.intermediate_size, dropout_rate=self.dropout_rate,
                       attention_dropout_rate=self.attention_dropout_rate, initializer_range=self.initializer_range,
                       layer_norm_eps=self.layer_norm_eps, dtype=self.dtype, attention=self.attention)


# ----- blocks -----

class Attention(CausalSelfAttention):
  """Unmasked-direction attention: queries from `x`, keys/values from `memory` (x itself in the encoder, the
  encoder output in the decoder's cross-attention); `mask` [B, 1, T, S] or [B, 1, 1, S] (True = may attend)."""

  def keys_values(self, memory):
    """Keys and values [B, S, N, D] of `memory` [B, S, H] (computed once per source when decoding)."""
    memory = memory.astype(self.dtype)
    return self._project(memory, 'key', None), self._project(memory, 'value', None)

  def attend(self, x, keys, values, mask, dropout_rng=None, explicit=False):
    q = self._project(x.astype(self.dtype), 'query', None)
    if explicit or (dropout_rng is not None and self.attention_dropout_rate > 0.0):
      out = self._explicit(q, keys, values, mask, dropout_rng)
    else:
      # No segment-id form of a cross-attention mask: 'splash' takes the XLA path here.
      out = fused_attention.attend(q, keys, values, implementation=self.implementation, mask=mask)
    return self._output(out)

  def __call__(self, x, memory, mask, *, dropout_rng=None, explicit=False):
    return self.attend(x, *self.keys_values(memory), mask, dropout_rng, explicit)


def _keys(rng, n):
  return [None] * n if rng is None else [jax.random.fold_in(rng, i) for i in range(n)]


class EncoderBlock(nnx.Module):
  """x = x + Drop(Attn(LN(x))); x = x + Drop(MLP(LN(x)))  with attention over the real source tokens."""

  def __init__(self, c: BlockConfig, *, rngs: nnx.Rngs):
    self.attention_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)
    self.attention = Attention(c, rngs=rngs)
    self.mlp_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)
    self.mlp = GeluMlp(c, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x, key_mask, dropout_rng=None):
    k = _keys(dropout_rng, 3)
    h = self.attention_norm(x)
    a = self.attention(h, h, key_mask, dropout_rng=k[0])
    # The residual stream stays float32; only the branches run in the compute dtype.
    x = x + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32)
    x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, k[2]).astype(jnp.float32)
    return constrain(x, ACT)


class DecoderBlock(nnx.Module):
  """x += Drop(CausalAttn(LN(x))); x += Drop(CrossAttn(LN(x), encoder output)); x += Drop(MLP(LN(x)))."""

  def __init__(self, c: BlockConfig, *, rngs: nnx.Rngs):
    norm = lambda: LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)  # noqa: E731
    self.attention_norm = norm()
    self.attention = CausalSelfAttention(c, rngs=rngs)
    self.cross_attention_norm = norm()
    self.cross_attention = Attention(c, rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = GeluMlp(c, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x, target_mask, memory, memory_mask, dropout_rng=None):
    k = _keys(dropout_rng, 5)
    a = self.attention(self.attention_norm(x), target_mask, dropout_rng=k[0])
    x = x + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32)
    a = self.cross_attention(self.cross_attention_norm(x), memory, memory_mask, dropout_rng=k[2])
    x = x + dropout(a, self.dropout_rate, k[3]).astype(jnp.float32)
    x = x + dropout(self.mlp(self.mlp_norm(x)), self.dropout_rate, k[4]).astype(jnp.float32)
    return constrain(x, ACT)

  def decode(self, x, key_cache, value_cache, cross_keys, cross_values, index, self_mask, memory_mask, layer=None):
    a, key_cache, value_cache = self.attention.decode(self.attention_norm(x), key_cache, value_cache, index,
                                                      self_mask, None, layer)
    x = x + a.astype(jnp.float32)
    x = x + self.cross_attention.attend(self.cross_attention_norm(x), cross_keys, cross_values, memory_mask,
                                        explicit=True).astype(jnp.float32)
    x = x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)
    return x, key_cache, value_cache


# ----- the model -----

class EncoderDecoder(nnx.Module):
  """Shared token embedding, encoder stack, decoder stack, tied output projection.

  Created inside `with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES)` its params are born sharded; outside a
  mesh they are plain arrays that still carry their logical names.
  """

  def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
    c = cfg if isinstance(cfg, EncDecConfig) else EncDecConfig.from_config(cfg, vocab_size)
    self.config = c
    std, h = c.initializer_range, c.hidden_size
    enc, dec = c.block_config(c.num_layers), c.block_config(c.num_decoder_layers)
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.token_embeddings = Embed(c.vocab_size, h, ('vocab', 'embed'), stddev=std, rngs=rngs)
      self.encoder_positions = Embed(c.max_position, h, ('position', 'embed'), stddev=std, rngs=rngs)
      self.decoder_positions = Embed(c.max_position, h, ('position', 'embed'), stddev=std, rngs=rngs)
      self.encoder = stack_layers(lambda r: EncoderBlock(enc, rngs=r), c.num_layers, c.scan_layers, rngs)
      self.encoder_norm = LayerNorm(h, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)
      self.decoder = stack_layers(lambda r: DecoderBlock(dec, rngs=r), c.num_decoder_layers, c.scan_layers, rngs)
      self.decoder_norm = LayerNorm(h, eps=c.layer_norm_eps, dtype=c.compute_dtype, rngs=rngs)

  def _check_length(self, length: int, what: str):
    if length > self.config.max_position:
      raise UserError(f'{what} length {length} exceeds model.max_position={self.config.max_position}; '
                      'lower data.seq_len or raise model.max_position')

  def _embed(self, ids, table, offset=0, dropout_rng=None):
    positions = offset + jnp.arange(ids.shape[1])
    x = self.token_embeddings(ids) + table(positions)[None]
    return constrain(dropout(x, self.config.dropout_rate, dropout_rng), ACT)

  def encoder_states(self, source_ids, source_mask, *, dropout_rng=None) -> jax.Array:
    """Source [B, S] ids and mask (1 = real token) -> encoder output [B, S, H] (after its final LayerNorm)."""
    c = self.config
    self._check_length(source_ids.shape[1], 'source')
    k = _keys(dropout_rng, 2)
    x = self._embed(source_ids, self.encoder_positions, dropout_rng=k[0])
    key_mask = source_mask.astype(bool)[:, None, None, :]
    x = run_stack(self.encoder, x, lambda lyr, h, key: lyr(h, key_mask, key), num_layers=c.num_layers,
                  scan=c.scan_layers, remat=c.remat, unroll=unroll_layers(c.layer_loop), dropout_rng=k[1])
    return self.encoder_norm(x)

  def encode(self, input_ids, token_type_ids, attention_mask, *, dropout_rng=None):
    """tasks.model.TaskModel's body interface: -> (sequence [B, L, H], pooled [B, H]); token types are ignored and
    pooled is the mean of the sequence over the real tokens (the model has no pooler layer)."""
    del token_type_ids
    seq = self.encoder_states(input_ids, attention_mask, dropout_rng=dropout_rng)
    w = attention_mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(seq.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return seq, pooled.astype(seq.dtype)

  def _logits(self, x, decoding=False):
    return self.token_embeddings.attend(self.decoder_norm(x), self.config.compute_dtype, decoding=decoding)

  def __call__(self, source_ids, source_mask, target_input_ids, target_mask, dropout_rng=None) -> jax.Array:
    """-> next-token logits [B, T, V] float32 of the target (teacher forcing). dropout_rng None = eval.

    Masks are 1 for real tokens; targets are right-padded (a target position never sees a later one, so
    padding after it cannot change its logits).
    """
    c = self.config
    self._check_length(target_input_ids.shape[1], 'target')
    k = _keys(dropout_rng, 3)
    memory = self.encoder_states(source_ids, source_mask, dropout_rng=k[0])
    memory_mask = source_mask.astype(bool)[:, None, None, :]
    self_mask = target_mask.astype(bool)[:, None, None, :]  # and causal (inside CausalSelfAttention)
    x = self._embed(target_input_ids, self.decoder_positions, dropout_rng=k[1])
    x = run_stack(self.decoder, x, lambda lyr, h, key: lyr(h, self_mask, memory, memory_mask, key),
                  num_layers=c.num_decoder_layers, scan=c.scan_layers, remat=c.remat,
                  unroll=unroll_layers(c.layer_loop), dropout_rng=k[2])
    return self._logits(x)

  # ----- KV-cache decoding -----

  def init_cache(self, source_ids, source_mask, max_len: int) -> dict:
    """Runs the encoder and returns a decoding cache for targets of up to `max_len` tokens.

    key/value [L_d, B, max_len, N, D] (self-attention, filled by `decode`), cross_key/cross_value
    [L_d, B, S, N, D] (the encoder output projected once per decoder layer), source_mask [B, S], index (the next
    target position, the same for every row).
    """
    c = self.config
    self._check_length(max_len, 'target')
    memory = self.encoder_states(source_ids, source_mask)
    layers_kv = lambda lyr: lyr.cross_attention.keys_values(memory)  # noqa: E731
    if c.scan_layers:
      cross_k, cross_v = nnx.vmap(layers_kv, in_axes=0, out_axes=0,
                                  transform_metadata={nnx.PARTITION_NAME: 'layers'})(self.decoder)
    else:
      cross_k, cross_v = (jnp.stack(a) for a in zip(*(layers_kv(lyr) for lyr in self.decoder)))
    b, n, d = source_ids.shape[0], c.num_heads, c.hidden_size // c.num_heads
    return dict(kv_cache(c.num_decoder_layers, b, max_len, n, d, c.compute_dtype),
                cross_key=cross_k, cross_value=cross_v, source_mask=source_mask.astype(bool),
                index=jnp.zeros((), jnp.int32))

  def decode(self, tokens, cache: dict) -> tuple[jax.Array, dict]:
    """Appends target tokens [B, T] at positions index..index+T-1 -> (logits [B, T, V] float32, new cache)."""
    c = self.config
    index, t, s = cache['index'], tokens.shape[1], cache['key'].shape[2]
    positions = index + jnp.arange(t)
    self_mask = (jnp.arange(s)[None, :] <= positions[:, None])[None, None]  # [1, 1, T, S]: causal over slots
    memory_mask = cache['source_mask'][:, None, None, :]
    x = self.token_embeddings(tokens) + self.decoder_positions(positions)[None]

    def body(lyr, h, k, v, ck, cv, layer=None):
      return lyr.decode(h, k, v, ck, cv, index, self_mask, memory_mask, layer)
    args = (cache['key'], cache['value'], cache['cross_key'], cache['cross_value'])
    if c.scan_layers:  # the self-attention caches ride in the carry, each layer writing its new slots in place
      x, keys, values = nnx.scan(lambda lyr, carry, ck, cv, i: body(lyr, *carry, ck, cv, i),
                                 in_axes=(0, nnx.Carry, 0, 0, 0), out_axes=nnx.Carry,
                                 transform_metadata={nnx.PARTITION_NAME: 'layers'})(
          self.decoder, (x, *args[:2]), *args[2:], jnp.arange(c.num_decoder_layers))
    else:
      keys, values = [], []
      for i, layer in enumerate(self.decoder):
        x, k, v = body(layer, x, *(a[i] for a in args))
        keys.append(k)
        values.append(v)
      keys, values = jnp.stack(keys), jnp.stack(values)
    return self._logits(x, decoding=True), {**cache, 'key': keys, 'value': values, 'index': index + t}


@functools.partial(jax.jit, static_argnums=0, static_argnames=('max_new_tokens', 'greedy'))
def _generate(graphdef, state, source_ids, source_mask, start_id, stop_ids, pad_id, rng, temperature, top_k, top_p,
              *, max_new_tokens, greedy):
  batch = source_ids.shape[0]
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(source_ids, source_mask, max_new_tokens + 1)
  logits, cache = model.decode(jnp.full((batch, 1), start_id, jnp.int32), cache)

  # The params ride in the carry: NNX refuses variables of an outer trace inside the body's nnx.scan.
  def body(carry):
    t, out, logits, cache, done, num, rng, state = carry
    rng, key = jax.random.split(rng)
    token = sample_logits(logits[:, 0], key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    out = out.at[:, t].set(jnp.where(done, pad_id, token))
    num = jnp.where(done, num, t + 1)
    done = done | jnp.isin(token, stop_ids)
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], cache)
    return t + 1, out, logits, cache, done, num, rng, state

  init = (jnp.zeros((), jnp.int32), jnp.full((batch, max_new_tokens), pad_id, jnp.int32), logits, cache,
          jnp.zeros((batch,), bool), jnp.zeros((batch,), jnp.int32), rng, state)
  cond = lambda carry: (carry[0] < max_new_tokens) & ~jnp.all(carry[4])  # noqa: E731
  _, out, _, _, _, num, _, _ = jax.lax.while_loop(cond, body, init)
  return out, num


def generate(model: EncoderDecoder, source_ids, source_mask, max_new_tokens: int, *, start_id: int, stop_ids=(),
             pad_id: int = 0, greedy: bool = True, rng=None, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0):
  """Target tokens for a batch of sources -> (tokens [B, max_new_tokens] int32, num_generated [B] int32).

  The decoder starts from `start_id` (the pipeline's decoder-start token, tokenizer.cls_id); a row stops after a
  token in `stop_ids` (kept and counted), its later slots hold `pad_id`. Greedy by default; otherwise sampled
  with `rng` after temperature / top-k / top-p (as generation.generate).
  """
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens} must be at least 1')
  if max_new_tokens + 1 > model.config.max_position:
    raise UserError(f'max_new_tokens={max_new_tokens} (+ the start token) exceeds model.max_position='
                    f'{model.config.max_position}: generate fewer tokens')
  if not greedy and rng is None:
    raise UserError('sampling needs an rng key (or pass greedy=True)')
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  stop = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)
  return _generate(graphdef, state, jnp.asarray(source_ids, jnp.int32), jnp.asarray(source_mask, jnp.int32),
                   jnp.int32(start_id), stop, jnp.int32(pad_id), rng, jnp.float32(temperature), jnp.int32(top_k),
                   jnp.float32(top_p), max_new_tokens=int(max_new_tokens), greedy=bool(greedy))


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per source token (fwd + bwd = 3x forward, 2 per multiply-add), matmuls only, for targets as
  long as sources (seq_len each, as the denoising pipeline pads both).

  Encoder layer: 6 x (4 H^2 attention + 2 H I MLP) + 12 H S for scores and weighted sums. Decoder layer: the same
  plus cross-attention's 4 H^2 projections and 12 H S. The tied H x V output projection runs at every target
  position. `max_predictions` is ignored. Embeddings, norms, softmax and biases are not counted.
  """
  del max_predictions
  c = EncDecConfig.from_config(model_cfg, vocab_size)
  h, i = c.hidden_size, c.intermediate_size
  encoder = c.num_layers * (6 * (4 * h * h + 2 * h * i) + 12 * h * seq_len)
  decoder = c.num_decoder_layers * (6 * (8 * h * h + 2 * h * i) + 24 * h * seq_len)
  return float(encoder + decoder + 6 * h * c.vocab_size)

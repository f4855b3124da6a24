"""wav2vec 2.0 (Baevski et al. 2020): a strided 1-D conv encoder on raw 16 kHz audio, a Transformer context network
over the (span-masked) latent frames, and a Gumbel-softmax product quantiser that turns the unmasked latents into the
contrastive targets.

  audio [B, S] --conv encoder--> latents z [B, T, C] (20 ms frames for the paper's 7 layers: stride 320, 400-sample
  receptive field) --LayerNorm, Linear--> [B, T, H], masked frames replaced by a learned vector
  --x + GELU(grouped conv(x)) (relative positions), LayerNorm--> post-LN Transformer layers --> context [B, T, H]
  z (unmasked) --Linear, Gumbel-softmax per group, codebook rows concatenated--> q [B, T, Dq] (the targets)

The BASE configuration is the paper's (fairseq's wav2vec2_base): conv widths 512, kernels (10,3,3,3,3,2,2),
strides (5,2,2,2,2,2,2), no conv bias, GroupNorm (one group per channel) after the first conv only, 12 post-LN
layers of 768, positional conv of width 128 in 16 groups (weight-normalised over the kernel axis), G=2 codebooks of
V=320 entries whose concatenation has Dq=256 dims, final projections to 256. Not done: LayerDrop (0.05 in BASE).
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.data.audio_batches import BASE_CONV, samples_for_frames
from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models import parts
from jaxssl.models.layers import (Dense, LayerNorm, Mlp, MultiHeadAttention, check_compute_settings, dropout,
                                  make_param, normal_init, ones, stack_layers, unroll_layers, zeros)

ACT = ('batch', 'length', 'act_embed')


@dataclasses.dataclass(frozen=True)
class Wav2vec2Config:
  """The `model` section, validated (frozen: modules hold it as static data)."""
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  conv_layers: tuple = BASE_CONV      # ((channels, kernel, stride), ...)
  max_position: int = 1024            # the longest crop in frames (the positional conv itself has no limit)
  pos_conv_kernel: int = 128
  pos_conv_groups: int = 16
  codebooks: int = 2                  # G
  codebook_size: int = 320            # V
  codevector_dim: int = 256           # Dq: the G concatenated entries (Dq / G each); the targets' size
  final_dim: int = 256                # the space context and targets are compared in
  num_negatives: int = 100            # K distractors per scored frame (the batches draw them)
  logit_temperature: float = 0.1      # kappa: cosine similarities / kappa are the logits
  diversity_weight: float = 0.1       # alpha of the codebook diversity loss
  feature_penalty_weight: float = 10.0  # the mean squared conv-encoder output's weight
  # The Gumbel-softmax temperature of step s: max(start * decay**s, end) (the batches carry it).
  temperature_start: float = 2.0
  temperature_end: float = 0.5
  temperature_decay: float = 0.999995
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  feature_dropout_rate: float = 0.1   # fairseq's dropout_input and dropout_features
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-5
  dtype: str = 'float32'
  remat: str = 'none'
  layer_loop: str = 'auto'  # layers.LAYER_LOOPS
  scan_layers: bool = True
  attention: str = 'auto'

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int = 0) -> 'Wav2vec2Config':
    """The fields this model reads from a ConfigDict/dict (vocab_size is unused: audio has none); UserError for
    sizes that cannot be built."""
    del vocab_size
    get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
    kw = {f.name: get(f.name) for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in kw.items() if v is not None}
    missing = [k for k in ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size') if k not in kw]
    if missing:
      raise UserError(f'the model config lacks {", ".join("model." + k for k in missing)}: start from '
                      'configs/wav2vec2.py')
    kw['conv_layers'] = tuple(tuple(int(v) for v in layer) for layer in kw.get('conv_layers', BASE_CONV))
    c = cls(**kw)
    c.check()
    return c

  def check(self) -> None:
    """One-line UserErrors for settings that cannot be built."""
    if not self.conv_layers or any(len(l) != 3 or min(l) < 1 for l in self.conv_layers):
      raise UserError(f'model.conv_layers={self.conv_layers} must be a non-empty list of (channels, kernel, '
                      'stride) triples of positive ints')
    if self.hidden_size % self.num_heads:
      raise UserError(f'model.hidden_size={self.hidden_size} is not divisible by model.num_heads={self.num_heads}')
    if self.hidden_size % self.pos_conv_groups or self.pos_conv_kernel < 2:
      raise UserError(f'model.pos_conv_groups={self.pos_conv_groups} must divide model.hidden_size='
                      f'{self.hidden_size} and model.pos_conv_kernel={self.pos_conv_kernel} be at least 2')
    if self.codevector_dim % self.codebooks or self.codebook_size < 2:
      raise UserError(f'model.codevector_dim={self.codevector_dim} must be a multiple of model.codebooks='
                      f'{self.codebooks}, and model.codebook_size={self.codebook_size} at least 2')
    check_compute_settings(self, 'wav2vec2',
                           dropout_names=('dropout_rate', 'attention_dropout_rate', 'feature_dropout_rate'))

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


# ----- the modules -----

class FeatureEncoder(nnx.Module):
  """Raw audio [B, S] -> latents [B, T, C]: conv (no bias) -> [GroupNorm, first layer only] -> GELU per layer."""

  def __init__(self, c: Wav2vec2Config, *, rngs: nnx.Rngs):
    self.kernels = nnx.List()
    cin = 1
    for channels, kernel, _ in c.conv_layers:
      # Kaiming-normal, as fairseq's conv layers (fan_in = kernel * in channels).
      init = normal_init(math.sqrt(2.0 / (kernel * cin)))
      # The one input channel of raw audio is never split.
      self.kernels.append(make_param(rngs, init, (kernel, cin, channels), ('position', 'embed' if cin > 1 else
                                                                          'norm', 'mlp')))
      cin = channels
    first = c.conv_layers[0][0]
    self.group_norm_scale = make_param(rngs, ones, (first,), ('norm',))
    self.group_norm_bias = make_param(rngs, zeros, (first,), ('norm',))
    self.strides = tuple(s for _, _, s in c.conv_layers)
    self.dtype = c.compute_dtype

  def __call__(self, audio: jax.Array) -> jax.Array:
    x = audio.astype(self.dtype)[:, :, None]  # [B, S, 1]
    for i, (kernel, stride) in enumerate(zip(self.kernels, self.strides)):
      x = jax.lax.conv_general_dilated(x, kernel[...].astype(self.dtype), (stride,), 'VALID',
                                       dimension_numbers=('NWC', 'WIO', 'NWC'),
                                       preferred_element_type=jnp.float32)
      if i == 0:
        # GroupNorm with one group per channel: each channel normalised over time (float32 statistics).
        mean = jnp.mean(x, axis=1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.group_norm_scale[...] + self.group_norm_bias[...]
      x = jax.nn.gelu(x, approximate=False).astype(self.dtype)
      x = constrain(x, ('batch', 'length', 'act_mlp'))
    return x


class PositionalConv(nnx.Module):
  """GELU(grouped conv over time) of width K (weight-normalised per kernel position, as fairseq's dim=2), 'same'
  padded (an even kernel's extra last frame dropped): the relative position embedding added to the input."""

  def __init__(self, c: Wav2vec2Config, *, rngs: nnx.Rngs):
    h, k, g = c.hidden_size, c.pos_conv_kernel, c.pos_conv_groups
    std = math.sqrt(4.0 / (k * h))  # fairseq: normal(0, sqrt(4 / (k * embed_dim)))
    self.direction = make_param(rngs, normal_init(std), (k, h // g, h), ('position', 'kv', 'embed'))
    # Weight norm's g starts at ||v|| per kernel position, so the initial weight is v.
    norms = jnp.sqrt(jnp.sum(jnp.square(self.direction[...]), axis=(1, 2)))
    self.magnitude = make_param(rngs, lambda *_: norms, (k,), ('position',))
    self.bias = make_param(rngs, zeros, (h,), ('embed',))
    self.kernel, self.groups, self.dtype = k, g, c.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    v = self.direction[...]
    w = v * (self.magnitude[...] / jnp.sqrt(jnp.sum(jnp.square(v), axis=(1, 2))))[:, None, None]
    pad = self.kernel // 2
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (1,), [(pad, pad)],
                                     dimension_numbers=('NWC', 'WIO', 'NWC'), feature_group_count=self.groups,
                                     preferred_element_type=jnp.float32)
    y = y[:, :x.shape[1]] + self.bias[...]
    return jax.nn.gelu(y, approximate=False).astype(self.dtype)


class EncoderLayer(nnx.Module):
  """x = LN(x + Drop(MHA(x))); x = LN(x + Drop(MLP(x))): BASE's post-LN layer (layer_norm_first=False)."""

  def __init__(self, c: Wav2vec2Config, *, rngs: nnx.Rngs):
    dt, std = c.compute_dtype, c.initializer_range
    self.attention = MultiHeadAttention(c.hidden_size, c.num_heads, stddev=std,
                                        attention_dropout_rate=c.attention_dropout_rate, implementation=c.attention,
                                        dtype=dt, rngs=rngs)
    self.attention_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
    self.mlp = Mlp(c.hidden_size, c.intermediate_size, stddev=std, dtype=dt, rngs=rngs)
    self.mlp_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
    self.dropout_rate = c.dropout_rate

  def __call__(self, x, mask, dropout_rng=None):
    k = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, i) for i in range(3)]
    a = self.attention(x, mask, dropout_rng=k[0])
    x = self.attention_norm(x.astype(jnp.float32) + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32))
    m = self.mlp(x)
    x = self.mlp_norm(x.astype(jnp.float32) + dropout(m, self.dropout_rate, k[2]).astype(jnp.float32))
    return constrain(x, ACT)


class Quantizer(nnx.Module):
  """Product quantiser: latents [B, T, C] -> logits [B, T, G, V] -> per group one codebook row (Gumbel-softmax,
  straight-through: the forward pass takes the hard choice, gradients flow through the soft one) -> concatenated
  [B, T, Dq]. Without a key (eval) the choice is the plain argmax."""

  def __init__(self, c: Wav2vec2Config, *, rngs: nnx.Rngs):
    channels, g, v = c.conv_layers[-1][0], c.codebooks, c.codebook_size
    self.weight_proj = Dense(channels, g * v, ('embed', 'vocab'), stddev=1.0, rngs=rngs)
    self.codevectors = make_param(rngs, jax.nn.initializers.uniform(1.0), (g * v, c.codevector_dim // g),
                                  ('vocab', 'kv'))
    self.groups, self.size = g, v

  def __call__(self, z: jax.Array, temperature, gumbel_rng=None):
    """-> (quantised [B, T, Dq] float32, logits [B, T, G, V] float32)."""
    b, t, _ = z.shape
    logits = self.weight_proj(z.astype(jnp.float32)).reshape(b, t, self.groups, self.size)
    scores = logits
    if gumbel_rng is not None:
      scores = (logits + jax.random.gumbel(gumbel_rng, logits.shape)) / temperature[:, None, None, None]
    hard = jax.nn.one_hot(jnp.argmax(scores, -1), self.size, dtype=jnp.float32)
    if gumbel_rng is not None:
      soft = jax.nn.softmax(scores, -1)
      hard = soft + jax.lax.stop_gradient(hard - soft)
    codebooks = self.codevectors[...].reshape(self.groups, self.size, -1)
    q = jnp.einsum('btgv,gvd->btgd', hard, codebooks)
    return q.reshape(b, t, -1), logits


class Wav2vec2Model(nnx.Module):
  """The whole pretraining model; `__call__` gives what the contrastive objective needs, `encode` the context
  vectors (for probes and heads)."""

  def __init__(self, model_cfg, vocab_size: int = 0, *, rngs: nnx.Rngs):
    c = model_cfg if isinstance(model_cfg, Wav2vec2Config) else Wav2vec2Config.from_config(model_cfg)
    self.config = c
    dt, std, channels = c.compute_dtype, c.initializer_range, c.conv_layers[-1][0]
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.feature_encoder = FeatureEncoder(c, rngs=rngs)
      self.feature_norm = LayerNorm(channels, eps=c.layer_norm_eps, rngs=rngs)
      self.feature_projection = Dense(channels, c.hidden_size, ('mlp', 'embed'), stddev=std, dtype=dt, rngs=rngs)
      self.mask_embedding = make_param(rngs, jax.nn.initializers.uniform(1.0), (c.hidden_size,), ('embed',))
      self.positional_conv = PositionalConv(c, rngs=rngs)
      self.encoder_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
      self.layers = stack_layers(lambda r: EncoderLayer(c, rngs=r), c.num_layers, c.scan_layers, rngs)
      self.quantizer = Quantizer(c, rngs=rngs)
      self.project_q = Dense(c.codevector_dim, c.final_dim, ('kv', 'predictions'), stddev=std, rngs=rngs)
      self.final_proj = Dense(c.hidden_size, c.final_dim, ('embed', 'predictions'), stddev=std, rngs=rngs)

  def latents(self, audio):
    """Audio [B, S] -> (normalised latents [B, T, C] float32, their mean square: fairseq's feature penalty
    before its mean)."""
    z = self.feature_encoder(audio).astype(jnp.float32)
    return self.feature_norm(z), jnp.square(z)

  def context(self, z, frame_mask, mask=None, dropout_rng=None):
    """Normalised latents [B, T, C] -> context [B, T, H]; frames where `mask` is 1 read the mask embedding."""
    c = self.config
    keys = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, 100 + i) for i in range(3)]
    x = self.feature_projection(z)
    x = dropout(x, c.feature_dropout_rate, keys[0]).astype(jnp.float32)
    if mask is not None:
      x = jnp.where(mask[..., None].astype(bool), self.mask_embedding[...], x)
    x = x * frame_mask[..., None].astype(x.dtype)  # padding frames are zero before the positional conv
    x = x + self.positional_conv(x).astype(jnp.float32)
    x = self.encoder_norm(x)
    x = constrain(dropout(x, c.dropout_rate, keys[1]), ACT)
    return parts.run_stack(self.layers, x, lambda lyr, h, k: lyr(h, frame_mask, k), num_layers=c.num_layers,
                           scan=c.scan_layers, remat=c.remat, unroll=unroll_layers(c.layer_loop),
                           dropout_rng=keys[2])

  def __call__(self, audio, frame_mask, mask, temperature, *, dropout_rng=None):
    """-> dict: context [B, T, Dq] (final_proj of the masked-input context), targets [B, T, Dq] (project_q of the
    quantised unmasked latents), code_logits [B, T, G, V], feature_sq [B, T, C] float32."""
    c = self.config
    z, feature_sq = self.latents(audio)
    x = self.context(z, frame_mask, mask, dropout_rng)
    gumbel_rng = feature_rng = None
    if dropout_rng is not None:
      gumbel_rng, feature_rng = jax.random.fold_in(dropout_rng, 200), jax.random.fold_in(dropout_rng, 201)
    q, logits = self.quantizer(dropout(z, c.feature_dropout_rate, feature_rng), temperature, gumbel_rng)
    return {'context': self.final_proj(x).astype(jnp.float32), 'targets': self.project_q(q).astype(jnp.float32),
            'code_logits': logits, 'feature_sq': feature_sq}

  def encode(self, audio, frame_mask, *, dropout_rng=None):
    """Audio [B, S] (frame_mask [B, T] of its frames) -> (context vectors [B, T, H] float32, nothing masked;
    their mean over each row's real frames [B, H]): what probes and fine-tuning heads read."""
    z, _ = self.latents(audio)
    states = self.context(z, frame_mask, dropout_rng=dropout_rng).astype(jnp.float32)
    weights = frame_mask.astype(jnp.float32)[..., None]
    return states, jnp.sum(states * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


# ----- FLOPs -----

def flops_per_frame(model_cfg, seq_len: int, max_predictions: int, num_negatives: int = 100) -> float:
  """Training (forward + backward) matmul and conv FLOPs per latent frame of a row of `seq_len` frames, with
  `max_predictions` scored frames each against `num_negatives` distractors.

  Backward is twice the forward, except for the first conv (no gradient into the raw audio: 2x, not 3x)."""
  c = model_cfg if isinstance(model_cfg, Wav2vec2Config) else Wav2vec2Config.from_config(model_cfg)
  t, h, i = seq_len, c.hidden_size, c.intermediate_size
  length, conv, cin = samples_for_frames(c.conv_layers, t), 0.0, 1
  for n, (channels, kernel, stride) in enumerate(c.conv_layers):
    length = (length - kernel) // stride + 1
    conv += (2 if n == 0 else 3) * 2 * length * kernel * cin * channels
    cin = channels
  per_frame = (
      cin * h                                              # feature projection
      + c.pos_conv_kernel * (h // c.pos_conv_groups) * h   # positional conv
      + c.num_layers * (4 * h * h + 2 * h * i + 2 * t * h)  # layers: q, k, v, out, MLP; scores and mixing
      + cin * c.codebooks * c.codebook_size                # quantiser logits
      + c.codebook_size * c.codevector_dim                 # codebook rows picked by a one-hot matmul
      + c.codevector_dim * c.final_dim + h * c.final_dim)  # project_q, final_proj
  contrast = max_predictions * (num_negatives + 1) * c.final_dim / t  # cosine similarities
  return conv / t + 3 * 2 * (per_frame + contrast)

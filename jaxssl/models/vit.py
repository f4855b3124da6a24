"""Vision Transformer (Dosovitskiy et al. 2020) and the two self-supervised models built on it.

  ViT:  image [B, H, W, C] in [0, 1] -> non-overlapping p x p patches -> linear patch embedding (= a p x p conv
        with stride p) + 2-D positions (learned, or fixed sin-cos as MAE) -> [CLS] + patches -> pre-LN blocks
        (bidirectional attention, GELU MLP: encdec.EncoderBlock from the shared parts) -> final LayerNorm;
        features = the [CLS] state or the mean of the patch states (`pooling`).
  MaskedAutoencoder (MAE, He et al. 2021): the ViT on the visible patches only, a light decoder (its own width and
        depth) over the encoded visible patches plus a shared mask token at every masked position (with the
        decoder's positions) predicting each patch's pixels.
  SimCLR (Chen et al. 2020): the ViT's features -> a 2-layer MLP projection head (ReLU) -> the embedding the
        NT-Xent loss compares (families/simclr.py).

Every weight carries logical axis names of mesh.LOGICAL_AXIS_RULES; the patch's pixel axis has no name there and
is replicated (None). Images are float32 in [0, 1]; the model centres them (x - 0.5) / 0.5.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.encdec import EncoderBlock
from jaxssl.models.layers import LayerNorm, check_compute_settings, config_fields, make_param, normal_init, \
    stack_layers, unroll_layers
from jaxssl.models.parts import ACT, BlockConfig, Linear, run_stack

PIXELS = None  # logical name of a patch's pixel axis: replicated (small; mesh.py has no rule for it)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The `model` section of an image family, validated. Decoder fields are MAE's, projection fields SimCLR's."""
  image_size: int
  patch_size: int
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  channels: int = 3
  position: str = 'sincos'              # 'sincos' (fixed 2-D sin-cos, as MAE) | 'learned'
  pooling: str = 'mean'                 # features: 'mean' of the patch states | 'cls' state
  decoder_layers: int = 0               # MAE decoder
  decoder_hidden_size: int = 0
  decoder_heads: int = 0
  decoder_intermediate_size: int = 0
  mask_ratio: float = 0.75              # MAE: share of patches hidden from the encoder
  norm_pix_loss: bool = True            # MAE: targets are each patch's pixels normalised to mean 0, variance 1
  projection_hidden_size: int = 0       # SimCLR head
  projection_size: int = 0
  temperature: float = 0.1              # SimCLR NT-Xent temperature
  max_position: int = 0                 # the loop's generic check: >= data.seq_len (the number of patches)
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-6
  dtype: str = 'float32'
  remat: str = 'none'
  layer_loop: str = 'auto'  # layers.LAYER_LOOPS
  scan_layers: bool = True
  attention: str = 'auto'

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int = 0) -> 'ViTConfig':
    """Reads and checks the fields from a ConfigDict/dict (`name` and the vocabulary size are ignored)."""
    del vocab_size  # images have no vocabulary
    kw = config_fields(cls, model_cfg, 'configs/mae.py or configs/simclr.py')
    for key in ('image_size', 'patch_size'):
      if key not in kw:
        raise UserError(f'the model config lacks model.{key}: start from configs/mae.py or configs/simclr.py')
    c = cls(**kw)
    for name in ('image_size', 'patch_size', 'channels', 'num_layers', 'hidden_size', 'num_heads',
                 'intermediate_size'):
      if int(getattr(c, name)) < 1:
        raise UserError(f'model.{name}={getattr(c, name)} must be a positive integer')
    if c.image_size % c.patch_size:
      raise UserError(f'model.image_size={c.image_size} is not a multiple of model.patch_size={c.patch_size}')
    for width, heads in (('hidden_size', 'num_heads'), ('decoder_hidden_size', 'decoder_heads')):
      if getattr(c, heads) and getattr(c, width) % getattr(c, heads):
        raise UserError(f'model.{width}={getattr(c, width)} is not divisible by model.{heads}={getattr(c, heads)}')
    if c.position not in ('sincos', 'learned') or c.pooling not in ('mean', 'cls'):
      raise UserError(f"model.position={c.position!r} / model.pooling={c.pooling!r}: use 'sincos' or 'learned' / "
                      "'mean' or 'cls'")
    if c.position == 'sincos' and (c.hidden_size % 4 or (c.decoder_hidden_size or 4) % 4):
      raise UserError('model.position=sincos needs hidden sizes divisible by 4')
    check_compute_settings(c, 'vit')
    return c

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def patch_dim(self) -> int:
    return self.patch_size ** 2 * self.channels

  @property
  def num_visible(self) -> int:
    """Patches the MAE encoder sees: int(N (1 - mask_ratio)), at least 1 (as MAE's len_keep)."""
    return max(1, int(self.num_patches * (1.0 - self.mask_ratio)))

  def block_config(self, num_layers: int, hidden: int, heads: int, intermediate: int) -> BlockConfig:
    return BlockConfig(num_layers=num_layers, hidden_size=hidden, num_heads=heads, intermediate_size=intermediate,
                       dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                       initializer_range=self.initializer_range, layer_norm_eps=self.layer_norm_eps,
                       dtype=self.dtype, attention=self.attention)


def patchify(images: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C]: patches row by row, each flattened as (row, column, channel)."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


@functools.lru_cache(maxsize=None)
def sincos_2d(grid: int, dim: int) -> np.ndarray:
  """[grid*grid, dim] float32 fixed 2-D positions (MAE's get_2d_sincos_pos_embed): half the features encode the
  row, half the column, each as sin and cos of the position at dim/4 frequencies 1 / 10000^(k / (dim/4))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
  rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')
  def encode(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  # MAE's order: the first half from the column (w) coordinate, the second from the row (h).
  return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def _config(cfg) -> ViTConfig:
  return cfg if isinstance(cfg, ViTConfig) else ViTConfig.from_config(cfg)


def _eager_sharding():
  """Params born sharded under a mesh (jax.set_mesh), plain outside one (as the other models)."""
  return nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty)


class Transformer(nnx.Module):
  """A stack of pre-LN bidirectional blocks and a final LayerNorm over [B, S, H] (every position attends all)."""

  def __init__(self, bc: BlockConfig, *, scan: bool, remat: str, unroll: bool, rngs: nnx.Rngs):
    self.layers = stack_layers(lambda r: EncoderBlock(bc, rngs=r), bc.num_layers, scan, rngs)
    self.norm = LayerNorm(bc.hidden_size, eps=bc.layer_norm_eps, dtype=jnp.float32, rngs=rngs)
    self.num_layers, self.scan, self.remat, self.unroll = bc.num_layers, scan, remat, unroll

  def __call__(self, x, dropout_rng=None):
    mask = jnp.ones((x.shape[0], 1, 1, x.shape[1]), bool)
    x = run_stack(self.layers, constrain(x.astype(jnp.float32), ACT), lambda layer, h, key: layer(h, mask, key),
                  num_layers=self.num_layers, scan=self.scan, remat=self.remat, unroll=self.unroll,
                  dropout_rng=dropout_rng)
    return self.norm(x)


class ViT(nnx.Module):
  """The image encoder; `encode` gives the final states ([CLS] first), `features` the pooled [B, H]."""

  def __init__(self, cfg, vocab_size: int = 0, *, rngs: nnx.Rngs):
    del vocab_size  # the families' build signature; images have no vocabulary
    self.cfg = cfg = _config(cfg)
    h, std = cfg.hidden_size, cfg.initializer_range
    bc = cfg.block_config(cfg.num_layers, h, cfg.num_heads, cfg.intermediate_size)
    with _eager_sharding():
      self.patch_embed = Linear(cfg.patch_dim, h, (PIXELS, 'embed'), stddev=std, use_bias=True,
                                dtype=jnp.float32, rngs=rngs)
      self.cls_token = make_param(rngs, normal_init(std), (h,), ('embed',))
      if cfg.position == 'learned':
        self.position_embedding = make_param(rngs, normal_init(std), (cfg.num_patches, h), ('position', 'embed'))
      self.transformer = Transformer(bc, scan=cfg.scan_layers, remat=cfg.remat, unroll=unroll_layers(cfg.layer_loop),
                                      rngs=rngs)

  def positions(self) -> jax.Array:
    if self.cfg.position == 'learned':
      return self.position_embedding[...]
    return jnp.asarray(sincos_2d(self.cfg.grid, self.cfg.hidden_size))

  def embed_patches(self, images) -> jax.Array:
    """[B, N, H] patch embeddings plus their positions."""
    patches = patchify((images.astype(jnp.float32) - 0.5) / 0.5, self.cfg.patch_size)
    return self.patch_embed(patches) + self.positions()[None]

  def encode_tokens(self, tokens, dropout_rng=None) -> jax.Array:
    """[CLS] + `tokens` [B, S, H] (embedded patches) through the blocks -> [B, 1 + S, H]."""
    cls = jnp.broadcast_to(self.cls_token[...], (tokens.shape[0], 1, tokens.shape[-1]))
    return self.transformer(jnp.concatenate([cls, tokens], axis=1), dropout_rng)

  def encode(self, images, dropout_rng=None) -> jax.Array:
    """[B, H, W, C] -> [B, 1 + N, H] final states of [CLS] and every patch."""
    return self.encode_tokens(self.embed_patches(images), dropout_rng)

  def pool(self, states) -> jax.Array:
    return states[:, 0] if self.cfg.pooling == 'cls' else jnp.mean(states[:, 1:], axis=1)

  def features(self, images, dropout_rng=None) -> jax.Array:
    """[B, H, W, C] -> [B, H] pooled features (what a linear probe or a classification head reads)."""
    return self.pool(self.encode(images, dropout_rng))

  def __call__(self, images, dropout_rng=None):
    return self.features(images, dropout_rng)


def _encode(encoder: ViT, images, dropout_rng):
  states = encoder.encode(images, dropout_rng)
  return states, encoder.pool(states)


def visible_first(mask: jax.Array) -> jax.Array:
  """[B, N] int order of the patches with the visible ones (mask 0) first, each group in patch order."""
  return jnp.argsort(mask, axis=-1, stable=True)


class MaskedAutoencoder(nnx.Module):
  """MAE: `self.encoder` (a ViT: what fine-tuning and the linear probe keep) and a light pixel decoder."""

  def __init__(self, cfg, vocab_size: int = 0, *, rngs: nnx.Rngs):
    self.cfg = self.config = cfg = _config(cfg)  # `config`: what fine-tuning's TaskModel reads
    if not (cfg.decoder_layers and cfg.decoder_hidden_size and cfg.decoder_heads):
      raise UserError('MAE needs model.decoder_layers, model.decoder_hidden_size and model.decoder_heads > 0')
    d, std = cfg.decoder_hidden_size, cfg.initializer_range
    bc = cfg.block_config(cfg.decoder_layers, d, cfg.decoder_heads, cfg.decoder_intermediate_size or 4 * d)
    self.encoder = ViT(cfg, vocab_size, rngs=rngs)
    with _eager_sharding():
      self.decoder_embed = Linear(cfg.hidden_size, d, (PIXELS, 'embed'), stddev=std, use_bias=True,
                                  dtype=jnp.float32, rngs=rngs)
      self.mask_token = make_param(rngs, normal_init(std), (d,), ('embed',))
      if cfg.position == 'learned':
        self.decoder_position_embedding = make_param(rngs, normal_init(std), (cfg.num_patches, d),
                                                     ('position', 'embed'))
      self.decoder = Transformer(bc, scan=cfg.scan_layers, remat=cfg.remat, unroll=unroll_layers(cfg.layer_loop),
                                      rngs=rngs)
      self.predict = Linear(d, cfg.patch_dim, ('embed', PIXELS), stddev=std, use_bias=True, dtype=jnp.float32,
                            rngs=rngs)

  def encode(self, images, dropout_rng=None):
    """(states [B, 1 + N, H], pooled [B, H]) of the whole image (no mask): what fine-tuning heads read."""
    return _encode(self.encoder, images, dropout_rng)

  def _decoder_positions(self):
    if self.cfg.position == 'learned':
      return self.decoder_position_embedding[...]
    return jnp.asarray(sincos_2d(self.cfg.grid, self.cfg.decoder_hidden_size))

  def __call__(self, images, mask, dropout_rng=None) -> jax.Array:
    """images [B, H, W, C], mask [B, N] (1 = hidden from the encoder; exactly N - num_visible per row) ->
    predicted pixels [B, N, patch_dim] of every patch (the loss reads the masked ones)."""
    keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    n, nv = self.cfg.num_patches, self.cfg.num_visible
    order = visible_first(mask)                           # [B, N]: visible patches, then masked
    restore = jnp.argsort(order, axis=-1)                 # patch i sits at restore[i] in `order`
    tokens = self.encoder.embed_patches(images)           # [B, N, H]
    visible = jnp.take_along_axis(tokens, order[:, :nv, None], axis=1)
    encoded = self.decoder_embed(self.encoder.encode_tokens(visible, keys[0]))  # [B, 1 + nv, D]
    b, d = encoded.shape[0], encoded.shape[-1]
    shuffled = jnp.concatenate([encoded[:, 1:], jnp.broadcast_to(self.mask_token[...], (b, n - nv, d))], axis=1)
    x = jnp.take_along_axis(shuffled, restore[:, :, None], axis=1) + self._decoder_positions()[None]
    x = self.decoder(jnp.concatenate([encoded[:, :1], x], axis=1), keys[1])
    return self.predict(x[:, 1:])


class SimCLR(nnx.Module):
  """SimCLR: `self.encoder` (a ViT) and the projection head g(h) = W2 ReLU(W1 h) whose outputs NT-Xent compares."""

  def __init__(self, cfg, vocab_size: int = 0, *, rngs: nnx.Rngs):
    self.cfg = self.config = cfg = _config(cfg)
    if not (cfg.projection_hidden_size and cfg.projection_size):
      raise UserError('SimCLR needs model.projection_hidden_size and model.projection_size > 0')
    std = cfg.initializer_range
    self.encoder = ViT(cfg, vocab_size, rngs=rngs)
    with _eager_sharding():
      self.projection_hidden = Linear(cfg.hidden_size, cfg.projection_hidden_size, ('embed', 'mlp'), stddev=std,
                                      use_bias=True, dtype=jnp.float32, rngs=rngs)
      self.projection_out = Linear(cfg.projection_hidden_size, cfg.projection_size, ('mlp', 'embed'), stddev=std,
                                   use_bias=True, dtype=jnp.float32, rngs=rngs)

  def encode(self, images, dropout_rng=None):
    """(states [B, 1 + N, H], pooled [B, H]) of the encoder (the projection head is not used downstream)."""
    return _encode(self.encoder, images, dropout_rng)

  def __call__(self, images, dropout_rng=None) -> jax.Array:
    """[B, H, W, C] -> [B, projection_size] projections (not yet normalised)."""
    h = self.encoder.features(images, dropout_rng)
    return self.projection_out(jax.nn.relu(self.projection_hidden(h)))


def _block_flops(layers: int, hidden: int, intermediate: int, length: int) -> float:
  """Forward matmul FLOPs of `layers` blocks over `length` positions: 2 x (4 H^2 + 2 H I) per position for the
  projections and MLP, plus 2 x 2 H S per position for the attention scores and the weighted sum."""
  return layers * length * (2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * hidden * length)


def mae_flops_per_example(cfg: ViTConfig) -> float:
  """Training (fwd + bwd = 3 x forward) matmul FLOPs of one MAE example: patch embedding of all N patches, the
  encoder over 1 + N_visible positions, the decoder embedding and the decoder over 1 + N positions, the pixel
  prediction of every patch. Norms, softmax, GELU and the loss are not counted."""
  n, nv, p, h = cfg.num_patches, cfg.num_visible, cfg.patch_dim, cfg.hidden_size
  d = cfg.decoder_hidden_size
  forward = (2 * n * p * h + _block_flops(cfg.num_layers, h, cfg.intermediate_size, nv + 1)
             + 2 * (nv + 1) * h * d + _block_flops(cfg.decoder_layers, d, cfg.decoder_intermediate_size or 4 * d,
                                                    n + 1) + 2 * n * d * p)
  return 3.0 * forward


def simclr_flops_per_example(cfg: ViTConfig, global_batch: int) -> float:
  """Training matmul FLOPs of one SimCLR example (two views): per view the patch embedding, the encoder over
  1 + N positions and the projection head; plus its share of the 2B x 2B similarity matrix (2 rows of 2B dot
  products of projection_size)."""
  n, h = cfg.num_patches, cfg.hidden_size
  view = (2 * n * cfg.patch_dim * h + _block_flops(cfg.num_layers, h, cfg.intermediate_size, n + 1)
          + 2 * h * cfg.projection_hidden_size + 2 * cfg.projection_hidden_size * cfg.projection_size)
  similarity = 2 * (2 * global_batch) * 2 * cfg.projection_size
  return 3.0 * (2 * view + similarity)

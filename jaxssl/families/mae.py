"""The masked-autoencoder family (MAE, He et al. 2021): a ViT encoder sees a random 25% of each image's patches,
a light decoder reconstructs the pixels of the other 75%; the loss is the mean squared error over the masked
patches only, against each patch's pixels normalised to mean 0 and variance 1 (`norm_pix_loss`).

The mask of global row r of step s is drawn from (seed, s, r) (data/images_examples.py): resuming, processes and
meshes see the same masks.
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.data import images_examples
from jaxssl.errors import UserError
from jaxssl.families import family as family_lib
from jaxssl.families import vision
from jaxssl.models import vit

BATCH_KEYS = ('images', 'mask')


def reconstruction_targets(images, cfg: vit.ViTConfig):
  """[B, N, patch_dim] targets: the centred pixels of each patch, normalised per patch when cfg.norm_pix_loss."""
  target = vit.patchify((images.astype(jnp.float32) - 0.5) / 0.5, cfg.patch_size)
  if cfg.norm_pix_loss:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return target


def mae_sums(graphdef, params, batch, dropout_rng):
  """Summed per-patch mean squared error over the masked patches, and their count."""
  model = nnx.merge(graphdef, params)
  pred = model(batch['images'], batch['mask'], dropout_rng)
  per_patch = jnp.mean(jnp.square(pred - reconstruction_targets(batch['images'], model.cfg)), axis=-1)
  mask = batch['mask'].astype(jnp.float32)
  return {'rec_loss': jnp.sum(per_patch * mask), 'rec_count': jnp.sum(mask)}


OBJECTIVE = family_lib.Objective(
    batch_ndims={'images': 4, 'mask': 2}, sums=mae_sums,
    totals=lambda batch: {'rec': jnp.sum(batch['mask'].astype(jnp.float32)) + 1e-5},
    loss=lambda sums, totals: sums['rec_loss'] / totals['rec'],
    summarize=lambda sums: {'loss': sums['rec_loss'] / (sums['rec_count'] + 1e-5)},
    perplexities=vision.no_perplexity)


def make_example_for(config):
  """make_example(record, rng) -> {'images': [S, S, C], 'mask': [N]} for this config's model."""
  cfg = vit.ViTConfig.from_config(config.model)

  def make_example(record, rng):
    return {'images': vision.model_image(record, cfg),
            'mask': images_examples.mae_mask(rng, cfg.num_patches, cfg.num_visible)}
  return make_example


train_batches, eval_batches = vision.batch_builders(make_example_for)


def batch_shapes(config) -> dict:
  cfg = vit.ViTConfig.from_config(config.model)
  return {'images': ((cfg.image_size, cfg.image_size, cfg.channels), np.float32),
          'mask': ((cfg.num_patches,), np.int32)}


def synthetic_batch(config, vocab_size: int = 0, seed: int = 0) -> dict:
  """Uniform random images and valid masks (N - num_visible hidden patches per row)."""
  del vocab_size
  cfg = vit.ViTConfig.from_config(config.model)
  rng = np.random.default_rng(seed)
  b = config.train.batch_size
  return {'images': rng.random((b, cfg.image_size, cfg.image_size, cfg.channels), dtype=np.float32),
          'mask': np.stack([images_examples.mae_mask(rng, cfg.num_patches, cfg.num_visible) for _ in range(b)])}


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per patch (the loop's "token"): vit.mae_flops_per_example / patches per image."""
  del vocab_size, seq_len, max_predictions
  cfg = vit.ViTConfig.from_config(model_cfg)
  return vit.mae_flops_per_example(cfg) / cfg.num_patches


def validate(model_cfg, vocab_size: int = 0) -> vit.ViTConfig:
  cfg = vit.ViTConfig.from_config(model_cfg, vocab_size)
  if not (cfg.decoder_layers and cfg.decoder_hidden_size and cfg.decoder_heads):
    raise UserError('MAE needs model.decoder_layers, model.decoder_hidden_size and model.decoder_heads > 0')
  if not 0.0 < cfg.mask_ratio < 1.0:
    raise UserError(f'model.mask_ratio={cfg.mask_ratio} must be in (0, 1) (MAE: 0.75)')
  return cfg


FAMILY = vision.ImageFamily(
    name='mae', model_class=vit.MaskedAutoencoder, build=vit.MaskedAutoencoder, flops_per_token=flops_per_token,
    validate=validate, objective=OBJECTIVE, train_batches=train_batches, eval_batches=eval_batches,
    batch_shapes=batch_shapes, synthetic_batch=synthetic_batch, shape_keys=vision.SHAPE_KEYS,
    shape_value=vision.shape_value, config_checks=vision.config_checks, load_sources=vision.load_sources,
    corpus_identity=vision.corpus_identity, check_same_corpus=vision.check_same_corpus)

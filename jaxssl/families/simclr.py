"""The contrastive family (SimCLR, Chen et al. 2020): two augmented views of every image (random resized crop,
flip, colour jitter, greyscale; data/images_examples.augment, seeded by (seed, step, row)), a ViT encoder and a
projection head, and the NT-Xent loss over the GLOBAL batch: each of the 2B projections has its other view as
the positive and the 2B - 2 other projections of the whole batch, whichever device holds them, as negatives.

Under the mesh the projections are batch-sharded; the loss gathers them across the data axes (a sharding
constraint to replicated) and each device scores its own rows against all columns. The loss is not a sum over
rows of independent terms, so gradient accumulation over microbatches would change it: train.microbatches must
be 1.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.data import images_examples
from jaxssl.families import family as family_lib
from jaxssl.families import vision
from jaxssl.mesh import constrain
from jaxssl.errors import UserError
from jaxssl.models import vit

BATCH_KEYS = ('view1', 'view2')


def nt_xent_sums(z1, z2, temperature: float):
  """(summed loss, correct top-1 positives) of NT-Xent over projections z1, z2 [B, D] of the two views.

  Row i of view 1 scores all 2B - 1 others: the B projections of view 2 (its positive is column i) and the other
  B - 1 of view 1; likewise for view 2. Cosine similarities divided by `temperature`."""
  def unit(z):
    z = z.astype(jnp.float32)
    return z * jax.lax.rsqrt(jnp.sum(z * z, axis=-1, keepdims=True) + 1e-12)
  z1, z2 = unit(z1), unit(z2)
  # The columns: every projection of the global batch, gathered over the data axes to each device.
  all1, all2 = constrain(z1, (None, None)), constrain(z2, (None, None))
  b = z1.shape[0]
  itself = jnp.eye(b, dtype=bool)
  loss, correct = 0.0, 0.0
  for rows, same, other in ((z1, all1, all2), (z2, all2, all1)):
    rows = constrain(rows, ('batch', None))
    positives_block = rows @ other.T / temperature             # [B, B]: diagonal = the positives
    same_block = jnp.where(itself, -jnp.inf, rows @ same.T / temperature)
    logits = jnp.concatenate([positives_block, same_block], axis=1)  # [B, 2B]
    loss += jnp.sum(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(positives_block))
    correct += jnp.sum(jnp.argmax(logits, axis=1) == jnp.arange(b))
  return loss, correct


def simclr_sums(graphdef, params, batch, dropout_rng):
  """Summed NT-Xent over the 2B projections, top-1 positive hits, and 2B."""
  model = nnx.merge(graphdef, params)
  keys = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
  z1, z2 = model(batch['view1'], keys[0]), model(batch['view2'], keys[1])
  loss, correct = nt_xent_sums(z1, z2, model.cfg.temperature)
  return {'ntxent_loss': loss, 'ntxent_correct': correct.astype(jnp.float32),
          'ntxent_count': jnp.float32(2 * z1.shape[0])}


OBJECTIVE = family_lib.Objective(
    batch_ndims={'view1': 4, 'view2': 4}, sums=simclr_sums,
    totals=lambda batch: {'views': jnp.float32(2 * batch['view1'].shape[0])},
    loss=lambda sums, totals: sums['ntxent_loss'] / totals['views'],
    summarize=lambda sums: {'loss': sums['ntxent_loss'] / sums['ntxent_count'],
                            'accuracy': sums['ntxent_correct'] / sums['ntxent_count']},
    perplexities=vision.no_perplexity)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """SimCLR's view settings (data.* keys of configs/simclr.py)."""
  crop_scale: tuple = (0.08, 1.0)
  crop_ratio: tuple = (3 / 4, 4 / 3)
  flip: float = 0.5
  jitter_prob: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.4
  grayscale: float = 0.2

  @classmethod
  def from_config(cls, data) -> 'Augmentation':
    kw = {f.name: data.get(f.name) for f in dataclasses.fields(cls) if data.get(f.name) is not None}
    a = cls(**{k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in kw.items()})
    if not (0 < a.crop_scale[0] <= a.crop_scale[1] <= 1 and 0 < a.crop_ratio[0] <= a.crop_ratio[1]):
      raise UserError(f'data.crop_scale={a.crop_scale} / data.crop_ratio={a.crop_ratio}: use (low, high) with '
                      '0 < low <= high (<= 1 for the scale), e.g. (0.08, 1.0) and (0.75, 1.333)')
    for name in ('flip', 'jitter_prob', 'grayscale', 'brightness', 'contrast', 'saturation'):
      if not 0.0 <= getattr(a, name) <= 1.0:
        raise UserError(f'data.{name}={getattr(a, name)} must be in [0, 1]')
    return a


def make_example_for(config):
  """make_example(record, rng) -> {'view1', 'view2'}: two independent augmentations of the record's image."""
  cfg = vit.ViTConfig.from_config(config.model)
  augmentation = Augmentation.from_config(config.data)

  def make_example(record, rng):
    image = vision.model_image(record, cfg)
    return {'view1': images_examples.augment(image, rng, augmentation),
            'view2': images_examples.augment(image, rng, augmentation)}
  return make_example


train_batches, eval_batches = vision.batch_builders(make_example_for)


def batch_shapes(config) -> dict:
  cfg = vit.ViTConfig.from_config(config.model)
  shape = ((cfg.image_size, cfg.image_size, cfg.channels), np.float32)
  return {'view1': shape, 'view2': shape}


def synthetic_batch(config, vocab_size: int = 0, seed: int = 0) -> dict:
  del vocab_size
  cfg = vit.ViTConfig.from_config(config.model)
  rng = np.random.default_rng(seed)
  shape = (config.train.batch_size, cfg.image_size, cfg.image_size, cfg.channels)
  return {'view1': rng.random(shape, dtype=np.float32), 'view2': rng.random(shape, dtype=np.float32)}


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per patch of one image (two views): vit.simclr_flops_per_example without the similarity
  matrix (its share grows with the global batch, which this signature does not carry; < 1% at ViT-B, B = 4096)."""
  del vocab_size, seq_len, max_predictions
  cfg = vit.ViTConfig.from_config(model_cfg)
  return vit.simclr_flops_per_example(cfg, 0) / cfg.num_patches


def validate(model_cfg, vocab_size: int = 0) -> vit.ViTConfig:
  cfg = vit.ViTConfig.from_config(model_cfg, vocab_size)
  if not (cfg.projection_hidden_size and cfg.projection_size):
    raise UserError('SimCLR needs model.projection_hidden_size and model.projection_size > 0')
  if not cfg.temperature > 0:
    raise UserError(f'model.temperature={cfg.temperature} must be positive (SimCLR: 0.1 to 0.5)')
  return cfg


def config_checks(config) -> list:
  return vision.config_checks(config) + [
      (config.train.microbatches == 1, f'train.microbatches={config.train.microbatches}: NT-Xent compares the whole '
       'global batch at once, so SimCLR cannot accumulate microbatches (use 1)')]


def check_config(config) -> None:
  Augmentation.from_config(config.data)


FAMILY = vision.ImageFamily(
    name='simclr', model_class=vit.SimCLR, build=vit.SimCLR, flops_per_token=flops_per_token,
    validate=validate, objective=OBJECTIVE, train_batches=train_batches, eval_batches=eval_batches,
    batch_shapes=batch_shapes, synthetic_batch=synthetic_batch, shape_keys=vision.SHAPE_KEYS,
    shape_value=vision.shape_value, config_checks=config_checks, check_config=check_config,
    load_sources=vision.load_sources,
    corpus_identity=vision.corpus_identity, check_same_corpus=vision.check_same_corpus)

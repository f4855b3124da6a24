"""What the image families (mae, simclr) share: their Family record (a Family that reads images, not text, so it
brings its own corpus loading and needs no tokenizer), config checks, checkpoint shape keys and the per-example
image preparation."""
import dataclasses
from typing import Callable

import numpy as np

from jaxssl.data import images, images_examples
from jaxssl.families import family as family_lib
from jaxssl.models import vit

# Model keys whose change makes saved params unusable (the rest: how it computes, or the objective's settings).
SHAPE_KEYS = ('name', 'image_size', 'patch_size', 'channels', 'num_layers', 'hidden_size', 'num_heads',
              'intermediate_size', 'position', 'decoder_layers', 'decoder_hidden_size', 'decoder_heads',
              'decoder_intermediate_size', 'projection_hidden_size', 'projection_size')


@dataclasses.dataclass(frozen=True)
class ImageFamily(family_lib.Family):
  """A Family whose corpus is images: `load_sources(config)` -> {'train', 'validation'} ImageRecords (no
  tokenizer; the train/eval batch builders get None for it); `corpus_identity(data)` and
  `check_same_corpus(saved, data, workdir='', *, while_starting=False)` as data/corpora.py's for text."""
  load_sources: Callable = None
  corpus_identity: Callable = None
  check_same_corpus: Callable = None


def load_sources(config) -> dict:
  """The image corpus of `config.data` (digits, a class-folder tree, or a TFDS name), prepared once."""
  d = config.data
  return images.load_image_corpus(d.corpus, d.data_dir, d.get('validation_fraction', 0.2))


def corpus_identity(data, **unused) -> dict:
  """What the image corpus of `data` is (a checkpoint records it; resuming on other images is refused)."""
  del unused  # every_file: an image folder's identity always covers every file (through the dataset's hash)
  return images.corpus_identity(data.corpus, data.data_dir, data.get('validation_fraction', 0.2))


def check_same_corpus(saved: dict, data, workdir: str = '', *, while_starting: bool = False) -> None:
  """UserError when the image corpus of `data` differs from `saved`."""
  images.check_same_corpus(saved, data.corpus, data.data_dir, data.get('validation_fraction', 0.2),
                           workdir=workdir, while_starting=while_starting)


def shape_value(model: dict, key: str):
  """`model[key]` (0 for an absent size: the other image family's keys)."""
  value = model.get(key)
  return 0 if value is None and key != 'name' else value


def config_checks(config) -> list:
  """data.seq_len is the number of patches (throughput and FLOPs count patches as tokens)."""
  m = config.model
  patches = (m.image_size // m.patch_size) ** 2 if m.get('patch_size') else 0
  return [(config.data.seq_len == patches,
           f'data.seq_len={config.data.seq_len} must be the number of patches (model.image_size / '
           f'model.patch_size)^2 = {patches}')]


def model_image(record, cfg: vit.ViTConfig) -> np.ndarray:
  """A record's image as the model reads it: float32 [S, S, C] in [0, 1]."""
  return images_examples.to_model_image(record['image'], cfg.image_size, cfg.channels)


def batch_builders(make_example_for: Callable):
  """(train_batches, eval_batches) of a Family from `make_example_for(config) -> make_example(record, rng)`."""

  def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
    del tokenizer  # images
    return images_examples.train_batches(source, make_example_for(config), global_batch=config.train.batch_size,
                                         start_step=start_step, seed=seed, process_index=process_index,
                                         process_count=process_count)

  def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
    del tokenizer
    return images_examples.eval_batches(source, make_example_for(config), batch_size=config.train.batch_size,
                                        num_batches=config.eval.batches, seed=seed, process_index=process_index,
                                        process_count=process_count)

  return train_batches, eval_batches


def no_perplexity(result, sums, words) -> dict:
  """Image objectives have no perplexity."""
  del result, sums, words
  return {}

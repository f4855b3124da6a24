"""Linear-probe evaluation of an image encoder: the frozen ViT's pooled features of every image -> a multinomial
logistic regression (scikit-learn, L2, on standardised features) trained on the train split, accuracy on the
held-out split. The standard measure of what self-supervised pretraining (MAE, SimCLR) learnt.

  python -m jaxssl.eval.linear_probe --workdir /tmp/mae_digits        # the newest checkpoint of a run
  python -m jaxssl.eval.linear_probe --workdir /tmp/mae_digits --random_init   # the same ViT, untrained

Prints one JSON line: accuracy, train_accuracy, the step probed, the number of images and feature size.
"""
import argparse
import json

import jax
import numpy as np
from flax import nnx

from jaxssl import config as config_lib
from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl.data import images_examples
from jaxssl.errors import UserError
from jaxssl.models import vit
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import state as state_lib


def encoder_features(encoder: vit.ViT, source, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """(features [n, H] float32, labels [n]) of every image of `source` (ImageRecords) through the frozen encoder."""
  cfg = encoder.cfg
  graphdef, state = nnx.split(encoder)
  run = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
  features, labels = [], []
  for start in range(0, len(source), batch_size):
    records = source.__getitems__(list(range(start, min(len(source), start + batch_size))))
    x = np.stack([images_examples.to_model_image(r['image'], cfg.image_size, cfg.channels) for r in records])
    pad = batch_size - len(x)  # one compiled shape for every batch
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
    features.append(np.asarray(run(state, x))[:len(records)])
    labels += [r['label'] for r in records]
  return np.concatenate(features).astype(np.float32), np.asarray(labels)


def probe_accuracy(train: tuple, test: tuple, *, regularization: float = 1.0, max_iter: int = 2000) -> dict:
  """Accuracy of a logistic regression (inverse L2 strength `regularization`) fit on `train` (features, labels),
  on `train` and on `test`. Features are standardised with the train split's mean and deviation."""
  from sklearn.linear_model import LogisticRegression  # scikit-learn only for probing
  mean, std = train[0].mean(0), train[0].std(0) + 1e-6
  clf = LogisticRegression(C=regularization, max_iter=max_iter)
  clf.fit((train[0] - mean) / std, train[1])
  return {'train_accuracy': float(clf.score((train[0] - mean) / std, train[1])),
          'accuracy': float(clf.score((test[0] - mean) / std, test[1]))}


def linear_probe(encoder: vit.ViT, sources: dict, **probe) -> dict:
  """probe_accuracy of `encoder`'s features of sources['train'] against sources['validation']."""
  return probe_accuracy(encoder_features(encoder, sources['train']), encoder_features(encoder, sources['validation']),
                        **probe)


def run_encoder(config, params=None) -> vit.ViT:
  """The ViT encoder of an image family's model: with `params` (the whole model's), else randomly initialised
  from config.train.seed (the baseline a pretrained encoder must beat)."""
  family = families.family_for(config.model)
  if not hasattr(family, 'load_sources'):
    raise UserError(f'model.name={config.model.name} is not an image family: a linear probe needs mae or simclr')
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  setup = state_lib.setup_model(config.model, 0, mesh, config.train.seed)
  if params is None:
    params = state_lib.init_params(setup)
  return nnx.merge(setup.graphdef, params).encoder


def probe_workdir(workdir: str, random_init: bool = False) -> dict:
  """Linear probe of a pretraining run's newest checkpoint (or of its model randomly initialised)."""
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True)
  step, meta = checkpointer.newest_readable_meta()
  if meta is None:
    raise UserError(f'{workdir} holds no checkpoint: run python -m jaxssl.pretrain there first')
  config = config_lib.from_json(json.dumps(meta['config']))
  params = None
  if not random_init:
    mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
    setup = state_lib.setup_model(config.model, 0, mesh, config.train.seed)
    params = checkpointer.restore_params(step, setup.abstract_params)
  encoder = run_encoder(config, params)
  sources = families.family_for(config.model).load_sources(config)
  result = linear_probe(encoder, sources)
  return {**result, 'step': 0 if random_init else int(step), 'train_images': len(sources['train']),
          'test_images': len(sources['validation']), 'features': encoder.cfg.hidden_size}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, help='a pretraining run of an image family (mae, simclr)')
  parser.add_argument('--random_init', action='store_true', help='probe the same ViT randomly initialised')
  args = parser.parse_args(argv)
  try:
    print(json.dumps(probe_workdir(args.workdir, args.random_init)), flush=True)
  except UserError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()

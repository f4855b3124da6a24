"""The image families' examples, pure in (seed, step, example): which images a step reads, MAE's patch masks and
SimCLR's augmented views, and the batches (per process) built from them.

Global row r of step s reads image perm_e[(s B + r) mod n] (B the global batch, e the epoch (s B + r) // n,
perm_e a seeded permutation of the n images). Its randomness (mask, crop, flip, jitter) comes from
numpy's Generator seeded with (seed, step, r, purpose), so a resumed run, any number of processes and any mesh see
the same examples.
"""
import functools
from typing import Callable, Iterator

import numpy as np

EVAL = 1 << 30  # mixed into the held-out examples' seeds (no training step reaches it)


@functools.lru_cache(maxsize=8)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, n]).permutation(n)


def image_indices(step: int, rows: np.ndarray, global_batch: int, n: int, seed: int) -> np.ndarray:
  """Indices into the n images of global `rows` of training step `step` (a fresh permutation every epoch)."""
  positions = step * global_batch + np.asarray(rows, np.int64)
  return np.array([_epoch_order(n, seed, int(p // n))[p % n] for p in positions], np.int64)


def resize_bilinear(image: np.ndarray, size: int, box=None) -> np.ndarray:
  """float [H, W, C] -> [size, size, C]: bilinear samples of the `box` (top, left, height, width; default the
  whole image) at the centres of the output pixels (as PIL / TF resize with half-pixel centres)."""
  h, w = image.shape[:2]
  top, left, bh, bw = box if box is not None else (0.0, 0.0, float(h), float(w))
  ys = np.clip(top + (np.arange(size) + 0.5) * bh / size - 0.5, 0, h - 1)
  xs = np.clip(left + (np.arange(size) + 0.5) * bw / size - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  wy, wx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  top_row = image[y0][:, x0] * (1 - wx) + image[y0][:, x1] * wx
  bottom_row = image[y1][:, x0] * (1 - wx) + image[y1][:, x1] * wx
  return (top_row * (1 - wy) + bottom_row * wy).astype(np.float32)


def to_model_image(image: np.ndarray, size: int, channels: int) -> np.ndarray:
  """uint8 [H, W, C] -> float32 [size, size, channels] in [0, 1] (resized bilinearly; grey <-> RGB as needed)."""
  x = image.astype(np.float32) / 255.0
  if x.shape[-1] != channels:
    x = np.repeat(x, channels, axis=-1) if x.shape[-1] == 1 else x.mean(-1, keepdims=True)
  return x if x.shape[:2] == (size, size) else resize_bilinear(x, size)


def mae_mask(rng: np.random.Generator, num_patches: int, num_visible: int) -> np.ndarray:
  """[N] int32: 1 on the N - num_visible patches hidden from the encoder (a uniformly random subset)."""
  mask = np.ones(num_patches, np.int32)
  mask[rng.permutation(num_patches)[:num_visible]] = 0
  return mask


def augment(image: np.ndarray, rng: np.random.Generator, a) -> np.ndarray:
  """One SimCLR view of float [S, S, C] in [0, 1]: random resized crop (area share in a.crop_scale, aspect
  ratio in a.crop_ratio, log-uniform), horizontal flip with probability a.flip, colour jitter (with probability
  a.jitter_prob: brightness, contrast, saturation factors in [1 - s, 1 + s] for a.brightness/contrast/saturation,
  in a random order) and greyscale with probability a.grayscale."""
  size = image.shape[0]
  area = rng.uniform(*a.crop_scale) * size * size
  ratio = np.exp(rng.uniform(np.log(a.crop_ratio[0]), np.log(a.crop_ratio[1])))
  bw, bh = min(size, np.sqrt(area * ratio)), min(size, np.sqrt(area / ratio))
  x = resize_bilinear(image, size, (rng.uniform(0, size - bh), rng.uniform(0, size - bw), bh, bw))
  if rng.random() < a.flip:
    x = x[:, ::-1]
  if rng.random() < a.jitter_prob:
    for op in rng.permutation(3):
      if op == 0:
        x = x * rng.uniform(1 - a.brightness, 1 + a.brightness)
      elif op == 1:
        x = (x - x.mean()) * rng.uniform(1 - a.contrast, 1 + a.contrast) + x.mean()
      elif x.shape[-1] == 3:
        grey = x.mean(-1, keepdims=True)
        x = (x - grey) * rng.uniform(1 - a.saturation, 1 + a.saturation) + grey
      x = np.clip(x, 0.0, 1.0)
  if x.shape[-1] == 3 and rng.random() < a.grayscale:
    x = np.repeat(x.mean(-1, keepdims=True), 3, axis=-1)
  return np.ascontiguousarray(x, np.float32)


def local_rows(global_batch: int, process_index: int, process_count: int) -> np.ndarray:
  """The global rows this process builds: a contiguous block (make_array_from_process_local_data's order)."""
  per = global_batch // process_count
  return np.arange(process_index * per, (process_index + 1) * per)


def train_batches(source, make_example: Callable, *, global_batch: int, start_step: int, seed: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """Endless local batches from `start_step` on: `make_example(record, rng)` -> {key: array} for each local row,
  with rng seeded by (seed, step, global row), stacked per key."""
  rows = local_rows(global_batch, process_index, process_count)
  step = start_step
  while True:
    indices = image_indices(step, rows, global_batch, len(source), seed)
    records = source.__getitems__(list(indices))
    examples = [make_example(rec, np.random.default_rng([seed, step, int(r)])) for rec, r in zip(records, rows)]
    yield {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    step += 1


def eval_batches(source, make_example: Callable, *, batch_size: int, num_batches: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The fixed held-out batches: validation images in order (wrapping around), randomness seeded by (seed, EVAL,
  batch, row), the same every call."""
  rows = local_rows(batch_size, process_index, process_count)
  out = []
  for b in range(num_batches):
    indices = (b * batch_size + rows) % len(source)
    records = source.__getitems__([int(i) for i in indices])
    examples = [make_example(rec, np.random.default_rng([seed, EVAL, b, int(r)])) for rec, r in zip(records, rows)]
    out.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return out

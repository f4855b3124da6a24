"""wav2vec 2.0 pretraining batches: random crops of utterances with span masks over their latent frames, the
frames the loss scores and each one's distractors, all a pure function of (seed, step, row) so a resumed run sees
the same batches.

A row is `seq_len` latent frames: the crop is the fewest samples the conv encoder turns into that many frames
(models/wav2vec2.samples_for_frames). Shorter utterances are zero-padded (frame_mask marks their real frames).
Each crop is normalised to zero mean and unit variance over its real samples.

Masking (fairseq's compute_mask_indices, static spans, overlaps allowed): each frame starts a span with probability
mask_prob (the paper's p = 0.065; fairseq's mask_prob 0.65 is p * mask_length): int(mask_prob * frames + u) span
starts, u ~ U[0, 1), at least min_masks, drawn without replacement, each span mask_length frames (about half of the
frames end up masked with p = 0.065 and spans of 10). The loss
scores up to `max_predictions` masked frames (a random subset when more are masked), each against
`num_negatives` distractors drawn with replacement from the *other* masked frames of the same row (the paper's
sampling). The Gumbel temperature of step s, max(start * decay**s, end), rides along per row.
"""
import dataclasses

import numpy as np

from jaxssl.errors import UserError

# (channels, kernel, stride) of the paper's feature encoder: 20 ms frames (stride 320), 400-sample receptive field.
BASE_CONV = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
EVAL_STEP = 2**31 - 1  # a step no run reaches: the held-out batches' own random stream
BATCH_NDIMS = {'audio': 2, 'frame_mask': 2, 'mask': 2, 'pred_positions': 2, 'pred_weights': 2, 'distractors': 3,
               'gumbel_temperature': 1}


# ----- frames and samples -----

def receptive_field(conv_layers) -> tuple[int, int]:
  """(samples one output frame sees, samples between frames) of a conv stack."""
  field, stride = 1, 1
  for _, kernel, s in conv_layers:
    field += (kernel - 1) * stride
    stride *= s
  return field, stride


def samples_for_frames(conv_layers, frames: int) -> int:
  """The fewest samples from which the conv stack makes `frames` frames (the crop length of a row)."""
  field, stride = receptive_field(conv_layers)
  return field + (frames - 1) * stride


def frames_for_samples(conv_layers, samples) -> np.ndarray:
  """How many frames the conv stack makes of `samples` (int or array), layer by layer (0 when too short)."""
  n = np.asarray(samples, np.int64)
  for _, kernel, stride in conv_layers:
    n = np.maximum((n - kernel) // stride + 1, 0)
  return n



@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """The data settings of the objective, checked."""
  seq_len: int
  max_predictions: int
  conv_layers: tuple
  mask_prob: float = 0.065
  mask_length: int = 10
  min_masks: int = 2
  num_negatives: int = 100
  normalize: bool = True
  temperature: tuple = (2.0, 0.5, 0.999995)  # (start, end, decay per step)

  @classmethod
  def from_config(cls, config) -> 'MaskingConfig':
    """From a job config's `data` and `model` sections; UserError for settings that cannot mask anything."""
    d, m = config.data, config.model
    conv = tuple(tuple(int(v) for v in layer) for layer in m.get('conv_layers', BASE_CONV))
    c = cls(seq_len=int(d.seq_len), max_predictions=int(d.max_predictions), conv_layers=conv,
            mask_prob=float(d.get('mask_prob', 0.065)), mask_length=int(d.get('mask_length', 10)),
            min_masks=int(d.get('min_masks', 2)), num_negatives=int(m.get('num_negatives', 100)),
            normalize=bool(d.get('normalize', True)),
            temperature=(float(m.get('temperature_start', 2.0)), float(m.get('temperature_end', 0.5)),
                         float(m.get('temperature_decay', 0.999995))))
    if not 0.0 < c.mask_prob <= 1.0 or c.mask_length < 1 or c.min_masks < 0:
      raise UserError(f'data.mask_prob={c.mask_prob} must be in (0, 1], data.mask_length={c.mask_length} >= 1 and '
                      f'data.min_masks={c.min_masks} >= 0')
    if c.seq_len <= c.mask_length + 1:
      raise UserError(f'data.seq_len={c.seq_len} frames leave no room for spans of data.mask_length='
                      f'{c.mask_length}: use a longer seq_len or a shorter mask_length')
    if not 1 <= c.max_predictions <= c.seq_len or c.num_negatives < 1:
      raise UserError(f'data.max_predictions={c.max_predictions} must be in [1, seq_len={c.seq_len}] and '
                      f'model.num_negatives={c.num_negatives} >= 1')
    start, end, decay = c.temperature
    if not (start > 0 and end > 0 and 0 < decay <= 1):
      raise UserError(f'model.temperature_start/end/decay={c.temperature} must be positive, decay at most 1')
    return c

  @property
  def samples(self) -> int:
    return samples_for_frames(self.conv_layers, self.seq_len)

  def temperature_at(self, step: int) -> float:
    start, end, decay = self.temperature
    return max(start * decay ** step, end)


def span_mask(rng: np.random.Generator, frames: int, c: MaskingConfig) -> np.ndarray:
  """bool [frames]: the masked frames of a row with `frames` real frames (fairseq's static spans)."""
  mask = np.zeros(frames, bool)
  room = frames - c.mask_length
  count = max(c.min_masks, int(c.mask_prob * frames + rng.random()))
  count = min(count, room - 1)
  if count <= 0:
    return mask
  starts = rng.choice(room, count, replace=False)
  for s in starts:
    mask[s:s + c.mask_length] = True
  return mask


def crop(rng: np.random.Generator, audio: np.ndarray, c: MaskingConfig) -> tuple[np.ndarray, int]:
  """(float32 [samples] crop of int16 `audio`, normalised and zero-padded; its number of real frames)."""
  n, want = len(audio), c.samples
  start = int(rng.integers(0, n - want + 1)) if n > want else 0
  return window(audio, start, c.conv_layers, c.seq_len, normalize=c.normalize)


def window(audio: np.ndarray, start: int, conv_layers, frames: int, *, normalize: bool) -> tuple[np.ndarray, int]:
  """(float32 crop of int16 `audio` from `start` that makes `frames` frames, normalised (each crop to zero mean,
  unit variance) and zero-padded; its number of real frames)."""
  want = samples_for_frames(conv_layers, frames)
  piece = audio[start:start + want].astype(np.float32) / 32768.0
  if normalize and len(piece):
    piece = (piece - piece.mean()) / np.sqrt(piece.var() + 1e-7)
  out = np.zeros(want, np.float32)
  out[:len(piece)] = piece
  return out, int(min(frames_for_samples(conv_layers, len(piece)), frames))


def make_row(rng: np.random.Generator, audio: np.ndarray, c: MaskingConfig) -> dict:
  """One row (every key of BATCH_NDIMS but the temperature) from an utterance's int16 samples."""
  samples, frames = crop(rng, audio, c)
  t, p, k = c.seq_len, c.max_predictions, c.num_negatives
  mask = np.zeros(t, bool)
  mask[:frames] = span_mask(rng, frames, c)
  masked = np.flatnonzero(mask)
  chosen = np.sort(rng.choice(masked, p, replace=False)) if len(masked) > p else masked
  positions, weights = np.zeros(p, np.int32), np.zeros(p, np.float32)
  distractors = np.zeros((p, k), np.int32)
  positions[:len(chosen)] = chosen
  if len(masked) >= 2:
    weights[:len(chosen)] = 1.0
    rank = np.searchsorted(masked, chosen)
    draws = rng.integers(0, len(masked) - 1, (len(chosen), k))
    draws += draws >= rank[:, None]  # skip the frame itself
    distractors[:len(chosen)] = masked[draws]
  frame_mask = (np.arange(t) < frames).astype(np.int32)
  return {'audio': samples, 'frame_mask': frame_mask, 'mask': mask.astype(np.int32), 'pred_positions': positions,
          'pred_weights': weights, 'distractors': distractors}


def make_batch(source, c: MaskingConfig, *, seed: int, step: int, rows: range, temperature: float) -> dict:
  """The rows `rows` (global row indices) of step `step`'s batch, each from rng (seed, step, row)."""
  out = []
  for r in rows:
    rng = np.random.default_rng([seed, step, r])
    utterance = source[int(rng.integers(0, len(source)))]['audio']
    out.append(make_row(rng, np.asarray(utterance), c))
  batch = {key: np.stack([row[key] for row in out]) for key in out[0]}
  batch['gumbel_temperature'] = np.full(len(rows), temperature, np.float32)
  return batch


def local_rows(global_batch_size: int, process_index: int, process_count: int) -> range:
  """This process's global row indices of every batch."""
  if global_batch_size % process_count:
    raise UserError(f'train.batch_size={global_batch_size} must be a multiple of the {process_count} processes')
  per = global_batch_size // process_count
  return range(process_index * per, (process_index + 1) * per)


def train_batches(source, config, *, start_step: int, seed: int, process_index: int = 0, process_count: int = 1):
  """Endless iterator over this process's rows of the batches of steps start_step, start_step + 1, ..."""
  c = MaskingConfig.from_config(config)
  rows = local_rows(config.train.batch_size, process_index, process_count)
  if len(source) == 0:
    raise UserError('the audio corpus has no training utterances: add files to --config.data.corpus')
  step = start_step
  while True:
    yield make_batch(source, c, seed=seed, step=step, rows=rows, temperature=c.temperature_at(step))
    step += 1


def eval_batches(source, config, *, seed: int, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """The fixed held-out batches: config.eval.batches of them, the same crops, masks and distractors every call.
  The temperature is the final one (eval picks codes by plain argmax: it does not matter)."""
  c = MaskingConfig.from_config(config)
  rows = local_rows(config.train.batch_size, process_index, process_count)
  return [make_batch(source, c, seed=seed + 7919 * (i + 1), step=EVAL_STEP, rows=rows,
                     temperature=c.temperature[1]) for i in range(config.eval.batches)]


def batch_shapes(config) -> dict:
  """{key: (per-row shape, dtype)} of a batch."""
  c = MaskingConfig.from_config(config)
  t, p = c.seq_len, c.max_predictions
  return {'audio': ((c.samples,), np.float32), 'frame_mask': ((t,), np.int32), 'mask': ((t,), np.int32),
          'pred_positions': ((p,), np.int32), 'pred_weights': ((p,), np.float32),
          'distractors': ((p, c.num_negatives), np.int32), 'gumbel_temperature': ((), np.float32)}


def synthetic_batch(config, seed: int = 0) -> dict:
  """A global batch of white noise with real masks (bench, compile checks)."""
  c = MaskingConfig.from_config(config)
  rng = np.random.default_rng(seed)
  noise = [{'audio': (rng.standard_normal(c.samples) * 3000).astype(np.int16)}]
  return make_batch(noise, c, seed=seed, step=0, rows=range(config.train.batch_size), temperature=c.temperature[0])

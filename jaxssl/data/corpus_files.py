"""A corpus's files (local or in a bucket: gs://, s3://) and the documents in them.

`list_files` expands a file, a directory (every file below it, sorted; names starting with '.' or '_' are left
out, as Spark/Hadoop markers and hidden files) or a glob; a HuggingFace `datasets` folder written by
`save_to_disk` becomes its Arrow data files (a DatasetDict folder: its 'train' split). `file_documents` streams one
file's documents in any format data/corpus_records.py reads (text, JSON Lines, Parquet, Arrow; gzip, bz2, xz,
zstd). Bad records are either a UserError at once (`bad_records=None`) or skipped and collected in a
`BadRecords`, whose `check` enforces `data.max_bad_records`.
"""
import glob
import hashlib
import json
import os
import re
import sys
from typing import Iterable, Iterator

from etils import epath

from jaxssl import storage
from jaxssl.data import corpus_records
from jaxssl.errors import UserError

GLOB_CHARS = '*?['
_SKIPPED_PREFIXES = ('.', '_')  # hidden files, .git; Spark's _SUCCESS, Parquet's _metadata (as pyarrow.dataset)
_HOW_TO_SKIP = 'let up to N bad records be skipped (each one reported) with --config.data.max_bad_records=N'
# Per-file metadata (size, generation) from the last remote listing: fingerprinting then needs no request per file.
_remote_info: dict[str, dict] = {}


def is_url(path: str) -> bool:
  return '://' in path


class BadRecords:
  """The bad records met while reading a corpus: counts per kind and the first reports ('FILE line L is ...').

  `limit` is data.max_bad_records. Picklable; parallel readers each fill one and `merge` them.
  """

  def __init__(self, limit: int = 0, keep: int = 20):
    if limit < 0:
      raise UserError(f'data.max_bad_records={limit} must be >= 0: pass --config.data.max_bad_records=0 to stop '
                      'at the first bad record, or N to skip up to N of them')
    self.limit = limit
    self.keep = max(keep, min(limit, 1000))  # at most the limit: the warning lists every skipped record
    self.counts: dict[str, int] = {}
    self.reports: list[str] = []

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def add(self, path: str, where: str, kind: str, message: str) -> None:
    """Records one bad record: `where` is 'line 12' or 'row 3', `message` says what is wrong ('is not ...')."""
    self.counts[kind] = self.counts.get(kind, 0) + 1
    if len(self.reports) < self.keep:
      self.reports.append(f'{path} {where} {message}')

  def merge(self, other: 'BadRecords') -> 'BadRecords':
    """Adds `other`'s counts and reports (after this one's) to this one; returns self."""
    for kind, n in other.counts.items():
      self.counts[kind] = self.counts.get(kind, 0) + n
    self.reports += other.reports[:max(0, self.keep - len(self.reports))]
    return self

  def summary(self) -> str:
    return ', '.join(f'{n} {kind}' for kind, n in sorted(self.counts.items()))

  def check(self, corpus: str) -> None:
    """UserError when more than `limit` records were bad; else one warning line per skipped record (stderr)."""
    n = self.total
    if n > self.limit:
      shown = '; '.join(self.reports[:3]) + ('; ...' if n > 3 else '')
      raise UserError(f'corpus {corpus} has {n} bad record{"s" if n > 1 else ""} ({self.summary()}), more than '
                      f'data.max_bad_records={self.limit} allows: {shown}: fix or remove '
                      f'{"it" if n == 1 else "them"}, or {_HOW_TO_SKIP}')
    if n:
      print(f'warning: corpus {corpus}: skipped {n} bad record{"s" if n > 1 else ""} ({self.summary()}; '
            f'data.max_bad_records={self.limit}):', file=sys.stderr)
      for report in self.reports:
        print(f'warning:   skipped {report}', file=sys.stderr)
      if n > len(self.reports):
        print(f'warning:   ... and {n - len(self.reports)} more', file=sys.stderr)


# ---------------------------------------------------------------------------------------------- listing

def list_files(corpus: str) -> list[str]:
  """The corpus's files, sorted: absolute paths or URLs. UserError when there are none."""
  path = corpus if is_url(corpus) else os.path.abspath(os.path.expanduser(corpus))
  if epath.Path(path).is_file():
    return [path]
  if epath.Path(path).is_dir():
    files = _expand_datasets(_walk(path))
    if not files:
      raise UserError(f'corpus directory {corpus!r} holds no files: put text, .jsonl or .parquet files in it or '
                      'pass another --config.data.corpus')
    return files
  if any(c in corpus for c in GLOB_CHARS):
    files = _expand_datasets(_glob(path))
    if not files:
      raise UserError(f'corpus glob {corpus!r} matches no files: pass --config.data.corpus=<file, directory or '
                      "glob of .txt/.jsonl/.parquet files>, 'ptb', or a TFDS name")
    return files
  raise UserError(f'corpus path {corpus!r} does not exist: pass --config.data.corpus=<file, directory or glob '
                  "of .txt/.jsonl/.parquet files>, 'ptb', or a TFDS name like 'wikipedia/20230601.en'")


def list_class_folders(folder: str, suffixes: tuple[str, ...], what: str,
                       missing: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
  """(class names, ((path, label), ...)) of a folder with one subfolder of `what` files (names ending in one of
  `suffixes`) per class, sorted (local or in a bucket); UserError when there is no such folder (`missing`: what
  to pass instead) or no such file."""
  if not storage.isdir(folder):
    raise UserError(f'{folder!r} is not a folder (of {what} files, one subfolder per class): {missing}')
  classes = tuple(sorted(n for n in storage.listdir(folder)
                         if not n.startswith(_SKIPPED_PREFIXES) and storage.isdir(storage.join(folder, n))))
  files = []
  for label, name in enumerate(classes):
    sub = storage.join(folder, name)
    files += [(storage.join(sub, f), label) for f in sorted(storage.listdir(sub))
              if f.lower().endswith(suffixes) and not f.startswith('.')]
  if not files:
    raise UserError(f'{what} folder {folder!r} has no {what} files in class subfolders (expected {folder}/<class>/'
                    f'<file>{"|".join(suffixes)})')
  return classes, tuple(files)


def _skipped(relative: str) -> bool:
  return any(part.startswith(_SKIPPED_PREFIXES) for part in relative.split('/') if part)


def _remote_fs(url: str):
  """(fsspec filesystem, path without the protocol, protocol prefix 'gs://') of a URL."""
  import fsspec  # noqa: PLC0415 (remote corpora only; etils.epath uses the same filesystems)
  fs, bare = fsspec.core.url_to_fs(url)
  return fs, bare, url.split('://', 1)[0] + '://'


def _walk(root: str) -> list[str]:
  """Every file below `root` except skipped names, sorted."""
  if not is_url(root):
    files = []
    for here, dirs, names in os.walk(root):
      dirs[:] = [d for d in dirs if not d.startswith(_SKIPPED_PREFIXES)]
      files += [os.path.join(here, n) for n in names if not n.startswith(_SKIPPED_PREFIXES)]
    return sorted(files)
  # One listing request for the whole prefix (epath's walk lists directory by directory).
  fs, bare, protocol = _remote_fs(root)
  bare = bare.rstrip('/')
  found = fs.find(bare, withdirs=False, detail=True)
  files = []
  for name, info in found.items():
    if not _skipped(name[len(bare):]):
      files.append(protocol + name)
      _remote_info[protocol + name] = info
  return sorted(files)


def _glob(pattern: str) -> list[str]:
  """Files matching a glob (`**` spans directories), sorted."""
  if not is_url(pattern):
    base = _glob_base(pattern)
    return sorted(os.path.abspath(f) for f in glob.glob(pattern, recursive=True)
                  if os.path.isfile(f) and not _skipped(f[len(base):]))
  # epath refuses `**` on buckets; fsspec's glob lists the prefix before the first wildcard once.
  fs, bare, protocol = _remote_fs(pattern)
  base = _glob_base(bare)
  found = fs.glob(bare, detail=True)
  files = []
  for name, info in found.items():
    if info.get('type') == 'file' and not _skipped(name[len(base):]):
      files.append(protocol + name)
      _remote_info[protocol + name] = info
  return sorted(files)


def _glob_base(pattern: str) -> str:
  """The folder before a glob's first wildcard: names below it that start with '.' or '_' are skipped."""
  return re.split(r'[*?\[]', pattern, maxsplit=1)[0].rsplit('/', 1)[0]


def _parent(path: str) -> str:
  return path.rsplit('/', 1)[0]


def _expand_datasets(files: list[str]) -> list[str]:
  """`files` with each `save_to_disk` folder's files replaced by its Arrow data files (a DatasetDict: 'train')."""
  names = {}
  for f in files:
    names.setdefault(_parent(f), set()).add(f.rsplit('/', 1)[1])
  dataset_dirs = {d for d, n in names.items() if {'state.json', 'dataset_info.json'} <= n}
  dict_dirs = {d for d, n in names.items() if 'dataset_dict.json' in n}
  if not dataset_dirs and not dict_dirs:
    return files
  keep_dirs = set(dataset_dirs)
  for d in dict_dirs:
    splits = json.loads(epath.Path(f'{d}/dataset_dict.json').read_text()).get('splits', [])
    if 'train' not in splits:
      raise UserError(f'HuggingFace DatasetDict folder {d} has no train split (it has {", ".join(splits)}): '
                      f'point --config.data.corpus at one split folder, e.g. {d}/{(splits or ["SPLIT"])[0]}')
    keep_dirs -= {f'{d}/{s}' for s in splits if s != 'train'}
  data_files = {d: _data_files(d) for d in keep_dirs}
  out = []
  for f in files:
    owner = next((d for d in dict_dirs if f.startswith(d + '/')), None)
    if owner is not None and not f.startswith(f'{owner}/train/'):
      continue  # another split of a DatasetDict, or its dataset_dict.json
    if _parent(f) in dataset_dirs:
      if f.rsplit('/', 1)[1] in data_files.get(_parent(f), ()):
        out.append(f)  # a data file (not state.json, dataset_info.json, a cache file)
      continue
    out.append(f)
  return out


def _data_files(folder: str) -> set[str]:
  """The Arrow files a save_to_disk folder's state.json lists (all its .arrow files if it lists none)."""
  state = json.loads(epath.Path(f'{folder}/state.json').read_text())
  if state.get('_indices_data_files'):  # datasets < 2 saved a selection as the full table plus row indices
    raise UserError(f'HuggingFace datasets folder {folder} holds an indices mapping (saved by an old datasets '
                    'version): load it and save it again with a current one (its rows are then written out)')
  listed = {entry['filename'] for entry in state.get('_data_files', []) if 'filename' in entry}
  if listed:
    return listed
  return {p.name for p in epath.Path(folder).iterdir() if p.name.endswith('.arrow')}


def fingerprint(path: str) -> str:
  """What changes when the file changes: size and mtime (local), generation / md5 / size (a bucket object)."""
  if not is_url(path):
    st = os.stat(path)
    return f'size={st.st_size} mtime_ns={st.st_mtime_ns}'
  info = _remote_info.get(path)
  if info is None:
    fs, bare, _ = _remote_fs(path)
    info = fs.info(bare)
  keys = ('size', 'generation', 'md5Hash', 'crc32c', 'ETag', 'etag', 'VersionId', 'LastModified', 'mtime',
          'updated')
  return ' '.join(f'{k}={info[k]}' for k in keys if info.get(k) is not None)


# At most this many files are recorded one by one in a corpus's identity (the rest only through its digest): a
# checkpoint's metadata stays small (~100 KB) for a corpus of a million files.
MAX_RECORDED_FILES = 1000


def hash_files(h, files: list[str]) -> None:
  """Adds each file's path and what changes when it changes (size + mtime; a bucket object's fingerprint) to the
  hash `h`: the part of a prepared dataset's folder name that says which files it was made from."""
  for path in files:
    if is_url(path):
      h.update(f'{path}\0{fingerprint(path)}\n'.encode())
    else:
      st = os.stat(path)
      h.update(f'{path}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())


def file_stamp(path: str) -> list:
  """[path, size, stamp] of one corpus file as listed (absolute path or URL): stamp = the modification time in
  ns (local) or a content checksum (a bucket object: crc32c, md5 or ETag; else its generation or update time)."""
  if not is_url(path):
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]
  info = _remote_info.get(path)
  if info is None:
    fs, bare, _ = _remote_fs(path)
    info = fs.info(bare)
  # A checksum first: the same bytes uploaded again are the same file (its generation changes).
  keys = ('crc32c', 'md5Hash', 'ETag', 'etag', 'generation', 'VersionId', 'LastModified', 'mtime', 'updated')
  key = next((k for k in keys if info.get(k) is not None), None)
  return [path, int(info.get('size') or 0), f'{key}={info[key]}' if key else '']


def files_identity(files: list[str], recorded: int | None = MAX_RECORDED_FILES) -> dict:
  """{'count', 'digest', 'recorded'}: a digest of the stamps of `files` and the first `recorded` stamps one by one
  (None: all), JSON-able: what data/corpus_changes.py compares."""
  stamps = [file_stamp(f) for f in files]
  digest = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:24]
  return {'count': len(stamps), 'digest': digest, 'recorded': stamps if recorded is None else stamps[:recorded]}


# ---------------------------------------------------------------------------------------------- reading

def file_documents(path: str, *, text_field: str = 'text',
                   bad_records: BadRecords | None = None) -> Iterator[list[str]]:
  """The documents (lists of sentences) of one file, streamed.

  A bad record is skipped and added to `bad_records`; without one it is a UserError at once (file and line).
  """
  def report(where: str, kind: str, message: str) -> None:
    if bad_records is None:
      raise UserError(f'corpus file {path} {where} {message}: fix or remove it, or {_HOW_TO_SKIP}')
    bad_records.add(path, where, kind, message)

  yield from corpus_records.read_documents(path, text_field, report)


def documents(files: Iterable[str], *, text_field: str = 'text',
              bad_records: BadRecords | None = None) -> Iterator[list[str]]:
  """The documents of `files`, one file after another (a file boundary ends a document)."""
  for path in files:
    yield from file_documents(path, text_field=text_field, bad_records=bad_records)

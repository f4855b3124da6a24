"""Every file a job reads or writes on a user's path, local or in a bucket: one layer over etils.epath / fsspec.

A user path is a local path or a URL (`gs://BUCKET/run`, `s3://...` where s3fs is installed, `memory://` in tests).
Jobs never call `open`, `os.path` or `os.makedirs` on one; they call these functions, which work on both:
  * `write_bytes`/`write_text` are atomic for a reader: locally a temp file renamed into place, in a bucket one
    object upload (GCS and S3 make an object visible whole or not at all).
  * `append_text` adds lines to a log (metrics.jsonl) without rewriting it: O_APPEND locally; on gs:// the new lines
    are uploaded as a temporary object and GCS-composed onto the end, so the log stays one object a reader can read
    during the run. Other schemes have no append: the object is read and rewritten (fine for a short log).
  * `local_file` gives a local filename for libraries that take nothing else (sentencepiece, native readers).
Remote listings are never cached: another host may have written the object a moment ago (process 0 trains the
tokenizer, the others wait for it to appear).

gs:// goes through gcsfs, the same library etils.epath (orbax's paths) and TFDS use without TensorFlow; credentials
are gcsfs's defaults (`gcloud auth application-default login`, or the VM's service account on a TPU VM).
Orbax writes checkpoints with tensorstore, which reads the same credentials. Against a local GCS server
(`python tpu/local_gcs.py start --port 9023 --in-memory --default-bucket=B`: gcp-storage-emulator plus the
x-goog-generation header tensorstore needs to read an object back) set STORAGE_EMULATOR_HOST=http://127.0.0.1:9023;
`import jaxssl` (runtime.local_gcs_defaults) then sets what is not set already:
  TENSORSTORE_GCS_HTTP_URL=<the same>             tensorstore (orbax checkpoints) talks to it
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false         gcsfs skips its gRPC bucket-type probe (hangs 60 s on an emulator)
  FSSPEC_GCS_TOKEN=anon                           no credential lookup (an emulator needs none)
  GCE_METADATA_HOST=GCE_METADATA_ROOT=GCE_METADATA_IP=127.0.0.1:1  no metadata-server probe by google-auth or
                                                  tensorstore off Google Cloud
`check_local_gcs` stops a job whose local server lacks the generation header. Against real GCS set none of these.
"""
import contextlib
import ctypes
import errno
import io
import os
import re
import shutil
import tempfile
import urllib.parse
import urllib.request
import uuid
from typing import Iterator

from etils import epath

from jaxssl.errors import UserError

# Options of the remote filesystems this module opens: no listing cache, as other hosts write the same bucket.
_FS_OPTIONS = {scheme: {'use_listings_cache': False} for scheme in ('gs', 'gcs', 's3')}
_SWEPT: set[str] = set()  # bucket folders this process has appended logs in, after removing stale pieces
_PIECE = re.compile(r'\.append-[0-9a-f]{32}$')  # append_bytes' temporary object: LOG.append-<uuid4 hex>


def is_remote(p) -> bool:
  """Whether `p` is a URL (`gs://`, `s3://`, ...) rather than a local path (`file://` counts as local)."""
  p = os.fspath(p)
  return '://' in p and not p.startswith('file://')


def path(p) -> epath.Path:
  """`p` as an etils.epath.Path (what orbax and TFDS take), local or remote."""
  return epath.Path(os.fspath(p))


def join(base, *names: str) -> str:
  """`base/name/...` as a string, for a local path or a URL."""
  return os.fspath(epath.Path(os.fspath(base)).joinpath(*names)) if is_remote(base) else os.path.join(base, *names)


def parent(p) -> str:
  """The folder holding `p` (`gs://b/run` for `gs://b/run/x`)."""
  return os.fspath(epath.Path(os.fspath(p)).parent) if is_remote(p) else os.path.dirname(os.fspath(p))


def basename(p) -> str:
  """The last part of `p`."""
  return os.fspath(p).rstrip('/').rsplit('/', 1)[-1] if is_remote(p) else os.path.basename(os.fspath(p))


def _local(p) -> str:
  p = os.fspath(p)
  return p[len('file://'):] if p.startswith('file://') else p


def _fs(p):
  """(fsspec filesystem, path inside it) of a URL."""
  import fsspec  # reason: only remote paths need it; local ones run on os alone
  protocol = os.fspath(p).split('://', 1)[0]
  return fsspec.core.url_to_fs(os.fspath(p), **_FS_OPTIONS.get(protocol, {}))


def _changed(p) -> None:
  """Forgets the listings etils.epath cached for `p`'s filesystem: orbax lists checkpoint steps through epath, whose
  gcsfs keeps listings, and would not see a folder this module moved or removed."""
  epath.backend.fsspec_backend.fs(os.fspath(p)).invalidate_cache()


def _url(fs, inner: str) -> str:
  """The URL of a path fsspec returned (listings drop the protocol)."""
  protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
  protocol = 'gs' if protocol == 'gcs' else protocol
  return inner if '://' in inner else f'{protocol}://{inner}'


def open(p, mode: str = 'r'):  # noqa: A001 (the module's `open`, as `storage.open`)
  """A file object on `p` for streaming; text modes are UTF-8. Writing makes the parent folders.

  A remote file opened for writing appears whole when it is closed; a local one is written in place (use
  `write_bytes` or `local_file(p, 'w')` where a reader must never see it half-written).
  """
  if 'w' in mode or 'a' in mode or 'x' in mode:
    makedirs(parent(p))
  if not is_remote(p):
    return io.open(_local(p), mode, encoding=None if 'b' in mode else 'utf-8')
  if 'a' in mode:
    raise ValueError(f'{os.fspath(p)}: a bucket object cannot be opened for appending: use storage.append_text')
  fs, inner = _fs(p)
  handle = fs.open(inner, mode.replace('t', '') if 'b' in mode else mode.replace('t', '').rstrip('b') + 'b')
  return handle if 'b' in mode else io.TextIOWrapper(handle, encoding='utf-8')


def read_bytes(p) -> bytes:
  """The whole content of the file `p`."""
  if not is_remote(p):
    with io.open(_local(p), 'rb') as f:
      return f.read()
  fs, inner = _fs(p)
  return fs.cat_file(inner)


def read_text(p) -> str:
  """The whole content of the UTF-8 text file `p`."""
  return read_bytes(p).decode('utf-8')


def write_bytes(p, data: bytes) -> None:
  """Writes `data` to `p` whole (a reader sees the old content or the new one), making the parent folders."""
  if is_remote(p):
    fs, inner = _fs(p)
    fs.pipe_file(inner, bytes(data))
    _changed(p)
    return
  target = _local(p)
  folder = os.path.dirname(os.path.abspath(target))
  os.makedirs(folder, exist_ok=True)
  tmp = os.path.join(folder, f'.{os.path.basename(target)}.{uuid.uuid4().hex}.tmp')
  fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask's permissions, as open() gives
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())  # renamed only once on disk: a crash never leaves an empty file under the name
    os.replace(tmp, target)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text(p, text: str) -> None:
  """Writes `text` (UTF-8) to `p` whole; see `write_bytes`."""
  write_bytes(p, text.encode('utf-8'))


def append_text(p, text: str) -> None:
  """Adds `text` (UTF-8) at the end of `p`; see `append_bytes`."""
  append_bytes(p, text.encode('utf-8'))


def append_bytes(p, data: bytes) -> None:
  """Adds `data` at the end of `p` (created if missing) without rewriting what is there (but see the module doc).

  A bucket object takes about one write a second: callers appending often should gather lines and append them
  every few seconds (train/metrics.py does).
  """
  if not is_remote(p):
    os.makedirs(os.path.dirname(os.path.abspath(_local(p))), exist_ok=True)
    fd = os.open(_local(p), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    size = os.fstat(fd).st_size
    try:
      # One write: a reader sees whole lines, and a crash leaves no torn line in practice. A full disk writes part
      # and then fails: the part is cut off again, so the file never ends in a torn line.
      done = os.write(fd, data)
      while done < len(data):
        done += os.write(fd, data[done:])
    except OSError as e:
      os.ftruncate(fd, size)
      raise OSError(e.errno, e.strerror, os.fspath(p)) from None  # named: the job's last line says which file
    finally:
      os.close(fd)
    return
  fs, inner = _fs(p)
  if not fs.exists(inner):
    fs.pipe_file(inner, bytes(data))
    _changed(p)
  elif hasattr(fs, 'merge') and os.fspath(p).startswith(('gs://', 'gcs://')):
    if (folder := os.path.dirname(inner)) not in _SWEPT:  # pieces of a writer killed before removing them: one
      _SWEPT.add(folder)  # process writes a folder's logs, and a rerun names its TensorBoard file anew: sweep all
      for stale in [o for o in fs.ls(folder, detail=False) if _PIECE.search(o.rstrip('/'))]:
        fs.rm_file(stale)
    piece = f'{inner}.append-{uuid.uuid4().hex}'
    fs.pipe_file(piece, bytes(data))
    try:
      fs.merge(inner, [inner, piece])  # GCS compose: the log object is replaced by log + piece in one step
    finally:
      fs.rm_file(piece)
  else:
    fs.pipe_file(inner, fs.cat_file(inner) + bytes(data))


def exists(p) -> bool:
  """Whether a file or folder `p` exists."""
  if not is_remote(p):
    return os.path.exists(_local(p))
  fs, inner = _fs(p)
  return fs.exists(inner)


def isfile(p) -> bool:
  """Whether `p` is a file (an object, in a bucket)."""
  if not is_remote(p):
    return os.path.isfile(_local(p))
  fs, inner = _fs(p)
  return fs.isfile(inner)


def isdir(p) -> bool:
  """Whether `p` is a folder (in a bucket: a prefix that holds objects)."""
  if not is_remote(p):
    return os.path.isdir(_local(p))
  fs, inner = _fs(p)
  return fs.isdir(inner)


def makedirs(p) -> None:
  """Makes the folder `p` and its parents if missing (a bucket's folders exist when objects do: nothing to make)."""
  if not is_remote(p) and _local(p):
    os.makedirs(_local(p), exist_ok=True)


def listdir(p) -> list[str]:
  """The sorted names (not paths) in the folder `p`; FileNotFoundError when it does not exist."""
  if not is_remote(p):
    return sorted(os.listdir(_local(p)))
  fs, inner = _fs(p)
  if not fs.isdir(inner):
    raise FileNotFoundError(f'no folder {os.fspath(p)}')
  return sorted({entry.rstrip('/').rsplit('/', 1)[-1] for entry in fs.ls(inner, detail=False)} - {''})


def glob(pattern) -> list[str]:
  """The sorted paths matching `pattern` (`*`, `?`, `[...]`, and `**` for any depth, also in a bucket)."""
  if not is_remote(pattern):
    import glob as glob_lib  # reason: the module's own `glob` shadows the standard one
    return sorted(glob_lib.glob(_local(pattern), recursive=True))
  fs, inner = _fs(pattern)
  return sorted(_url(fs, found) for found in fs.glob(inner))


def remove(p, *, missing_ok: bool = False) -> None:
  """Removes the file `p`, or the folder `p` with everything in it."""
  if not exists(p):
    if missing_ok:
      return
    raise FileNotFoundError(f'no file or folder {os.fspath(p)}')
  if not is_remote(p):
    (shutil.rmtree if os.path.isdir(_local(p)) else os.remove)(_local(p))
    return
  fs, inner = _fs(p)
  fs.rm(inner, recursive=fs.isdir(inner))
  _changed(p)


def copy(src, dst) -> None:
  """Copies the file `src` to `dst` (either may be remote), making dst's folders; dst appears whole."""
  if not is_remote(src) and not is_remote(dst):
    with local_file(dst, 'w') as tmp:
      shutil.copyfile(_local(src), tmp)
    return
  with local_file(src) as local_src, local_file(dst, 'w') as local_dst:
    shutil.copyfile(local_src, local_dst)


def rename(src, dst) -> None:
  """Moves the file or folder `src` to `dst` (which must not exist), making dst's parent folders.

  Locally one rename (atomic). In a bucket there are no folders: every object is copied inside the bucket, then the
  originals deleted, so a reader may see a folder half-moved (write a marker file last where that matters).
  """
  if exists(dst):
    raise FileExistsError(f'{os.fspath(dst)} already exists')
  if is_remote(src) != is_remote(dst):
    raise ValueError(f'rename: {os.fspath(src)} and {os.fspath(dst)} must both be local or both remote')
  if not is_remote(src):
    makedirs(parent(dst))
    os.rename(_local(src), _local(dst))
    return
  fs, inner = _fs(src)
  _, inner_dst = _fs(dst)
  folder = fs.isdir(inner)
  # copy + delete, not fs.mv: gcsfs's mv tries GCS's newer moveTo call first, which GCS servers other than
  # Google's (emulators) answer 501, after ~10 s of retries per object.
  fs.copy(inner, inner_dst, recursive=folder)
  fs.rm(inner, recursive=folder)
  _changed(src)


def exchange(a, b) -> bool:
  """Swaps the local paths `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE): a reader of either
  sees the old or the new, never nothing. False where that is not possible (a bucket, another OS, a file system
  without it); the caller then swaps by two renames."""
  if is_remote(a) or is_remote(b) or not hasattr(os, 'O_PATH'):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  if renameat2(at_fdcwd, os.fsencode(_local(a)), at_fdcwd, os.fsencode(_local(b)), rename_exchange) == 0:
    return True
  code = ctypes.get_errno()
  if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EXDEV):
    return False
  raise OSError(code, os.strerror(code), os.fspath(a))


@contextlib.contextmanager
def local_file(p, mode: str = 'r') -> Iterator[str]:
  """A local filename standing for `p`, for libraries that only take one.

  mode 'r': `p` itself when local, else a temporary download of it. mode 'w': a temporary file the caller writes,
  which becomes `p` (renamed, or uploaded) when the block ends without an exception.
  """
  if mode not in ('r', 'w'):
    raise ValueError(f"local_file mode must be 'r' or 'w', not {mode!r}")
  if mode == 'r' and not is_remote(p):
    yield _local(p)
    return
  with tempfile.TemporaryDirectory(prefix='jaxssl-') as tmp_dir:
    local = os.path.join(tmp_dir, basename(p) or 'file')
    if mode == 'r':
      fs, inner = _fs(p)
      fs.get_file(inner, local)
      yield local
      return
    yield local
    if is_remote(p):
      fs, inner = _fs(p)
      fs.put_file(local, inner)
      _changed(p)
    else:
      target = _local(p)
      os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
      staged = os.path.join(os.path.dirname(os.path.abspath(target)), f'.{os.path.basename(target)}.{uuid.uuid4().hex}')
      shutil.copyfile(local, staged)  # the temp dir may be on another filesystem: copy next to p, then rename
      os.replace(staged, target)


@contextlib.contextmanager
def local_folder(p) -> Iterator[str]:
  """A local folder standing for the folder `p`, for libraries that write several files into one (a profiler).

  `p` itself when local (made if missing); else a temporary folder whose files are uploaded under `p` when the
  block ends without an exception.
  """
  if not is_remote(p):
    makedirs(p)
    yield _local(p)
    return
  with tempfile.TemporaryDirectory(prefix='jaxssl-') as tmp_dir:
    yield tmp_dir
    for folder, _, names in os.walk(tmp_dir):
      for name in sorted(names):
        local = os.path.join(folder, name)
        copy(local, join(p, *os.path.relpath(local, tmp_dir).split(os.sep)))


def check_local_gcs(url: str) -> None:
  """With STORAGE_EMULATOR_HOST set and a gs:// `url`: UserError unless that server answers a download with the
  object's x-goog-generation header, which tensorstore (orbax checkpoints) needs to read any object back (the
  plain gcp-storage-emulator leaves it out: a run would save its first checkpoint and never resume)."""
  endpoint = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if not endpoint or not url.startswith('gs://'):
    return
  endpoint = endpoint if '://' in endpoint else f'http://{endpoint}'
  bucket = url[len('gs://'):].split('/', 1)[0]
  probe = f'gs://{bucket}/.jaxssl-server-check-{uuid.uuid4().hex}'
  try:
    write_bytes(probe, b'x')
  except Exception as e:  # pylint: disable=broad-except  # gcsfs: FileNotFoundError (no bucket) or its HttpError
    raise UserError(f'cannot write to gs://{bucket} on the GCS server at STORAGE_EMULATOR_HOST={endpoint} '
                    f'({type(e).__name__}: {str(e)[:120]}): create the bucket (tpu/local_gcs.py '
                    f'--default-bucket={bucket}) or fix the address') from None
  try:
    name = urllib.parse.quote(probe[len(f'gs://{bucket}/'):], safe='')
    with urllib.request.urlopen(f'{endpoint}/download/storage/v1/b/{bucket}/o/{name}?alt=media', timeout=30) as r:
      generation = r.headers.get('x-goog-generation')
  finally:
    remove(probe)
  if not generation:
    raise UserError(f'the GCS server at STORAGE_EMULATOR_HOST={endpoint} sends no x-goog-generation header, '
                    'without which orbax/tensorstore cannot read checkpoints back: serve the bucket with '
                    '`python tpu/local_gcs.py start ...` (gcp-storage-emulator with that header) instead')

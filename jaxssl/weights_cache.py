"""An export's weights kept as one memory-mappable file beside the compile cache, for the generate job's next start.

Why: restoring an export through orbax copies every byte into fresh memory (2.8 s for Qwen3-0.6B's 2.4 GB of float32
weights here, against 0.8 s to load its saved program), so the generate job's second start was bound by it. On
the CPU backend, jax takes an aligned read-only numpy array without a copy (`jax.device_put`), so weights read as
views of a memory-mapped file cost nothing until used, and each layer's slice of a stacked weight is a view too
(generate_program.program_leaves). The file is the weights' raw bytes in the export's layout, each leaf 4096-byte
aligned after a JSON header; it is a cache, made again from the export whenever a lookup misses.

A file is found by what determines its bytes: the export's absolute path, the size and modification time of every
file under its params/ folder (an export written again is another key) and the weights' layout. Kept only where
it pays and is safe: a local compile cache folder and a local export, the CPU backend (the generate job uses it
where it keeps its program: on one device). The folder
holds at most JAXSSL_WEIGHTS_CACHE_GB gigabytes (default 16; 0 turns the cache off), least recently used first out.
"""
import hashlib
import json
import math
import os

from jaxssl import program_cache
from jaxssl import runtime

FORMAT = 3  # 2: big layer kernels kept output-major (generate_program.kept_layout); 3: q/k/v kept fused
ALIGN = 4096
DEFAULT_LIMIT_GB = 16.0


def _limit_bytes() -> float:
  try:
    return float(os.environ.get('JAXSSL_WEIGHTS_CACHE_GB', DEFAULT_LIMIT_GB)) * 1e9
  except ValueError:
    return 0.0  # an unreadable setting keeps nothing rather than fail a job


def _nbytes(layout: list) -> list[int]:
  import jax.numpy as jnp  # reason: jax's dtypes (bfloat16 too), after runtime.setup as every job's jax
  import numpy as np  # reason: as jax
  return [math.prod(shape) * np.dtype(jnp.dtype(dtype)).itemsize for _, shape, dtype in layout]


def path_for(export: str, layout: list) -> str | None:
  """The file that keeps `export`'s weights of `layout` (generate_program.weights_layout), or None where none is
  kept (see the module docstring)."""
  import jax  # reason: after runtime.setup, as every job's jax
  cache = runtime.compile_cache_dir()
  if (not cache or '://' in cache or '://' in export or jax.default_backend() != 'cpu'
          or sum(_nbytes(layout)) > _limit_bytes()):
    return None
  params = os.path.join(export, 'params')
  files = []
  for folder, dirs, names in sorted(os.walk(params)):
    dirs.sort()
    for name in sorted(names):
      stat = os.stat(os.path.join(folder, name))
      files.append([os.path.relpath(os.path.join(folder, name), params), stat.st_size, stat.st_mtime_ns])
  if not files:
    return None
  identity = dict(export=os.path.abspath(export), files=files, layout=layout, format=FORMAT)
  key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
  return os.path.join(cache, 'jaxssl_weights', f'{key[:40]}.bin')


def _offsets(header_bytes: int, sizes: list[int]) -> list[int]:
  offsets, at = [], -(-header_bytes // ALIGN) * ALIGN
  for n in sizes:
    offsets.append(at)
    at += -(-n // ALIGN) * ALIGN
  return offsets


def save(path: str, layout: list, weights) -> None:
  """Writes `weights` (a nested dict of arrays in `layout`, or an iterable of its leaves in layout order, each
  written and dropped in turn) to `path` whole or not at all (program_cache.write_whole), then trims the folder
  to its limit."""
  import numpy as np  # reason: as _nbytes
  header = json.dumps({'format': FORMAT, 'layout': layout}).encode() + b'\n'
  offsets = _offsets(len(header), _nbytes(layout))

  def leaves():
    for keys, _, _ in layout:
      leaf = weights
      for key in keys:
        leaf = leaf[key]
      yield leaf

  def fill(f):
    f.write(header)
    for offset, leaf in zip(offsets, leaves() if isinstance(weights, dict) else weights):
      f.seek(offset)
      f.write(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8))

  if program_cache.write_whole(path, fill):
    _trim(os.path.dirname(path), keep=path)


def load(path: str, layout: list) -> dict | None:
  """The weights `save` kept at `path` as a nested dict of read-only numpy views of the memory-mapped file (no
  byte read until used), or None: no such file, another layout, or a damaged one (a cache miss)."""
  import jax.numpy as jnp  # reason: as _nbytes
  import numpy as np  # reason: as _nbytes
  try:
    with open(path, 'rb') as f:
      header = f.readline()
    saved = json.loads(header)
    sizes = _nbytes(layout)
    offsets = _offsets(len(header), sizes)
    if saved != {'format': FORMAT, 'layout': layout} or (layout and os.path.getsize(path) < offsets[-1] + sizes[-1]):
      return None
    data = np.memmap(path, np.uint8, mode='r')
    os.utime(path)  # recently used: trimmed last
  except (OSError, ValueError):
    return None
  weights: dict = {}
  for (keys, shape, dtype), offset, n in zip(layout, offsets, sizes):
    node = weights
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = data[offset:offset + n].view(jnp.dtype(dtype)).reshape(shape)
  return weights


def _trim(folder: str, keep: str) -> None:
  """Removes the least recently used files of `folder` until it holds at most the limit (never `keep`)."""
  try:
    files = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.bin')]
    stats = sorted(((os.stat(p).st_mtime, os.stat(p).st_size, p) for p in files), reverse=True)
    total = 0.0
    for _, size, p in stats:
      if p != keep and total + size > _limit_bytes():
        os.remove(p)  # a job still mapping it keeps its pages until it exits
      else:
        total += size
  except OSError:
    pass

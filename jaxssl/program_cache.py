"""Programs a job exported (jax.export: traced and lowered StableHLO) on an earlier run, kept in the compile cache's
folder so that the next run skips tracing them.

Why: the generate job traced and lowered its program at every start (0.8 s for SmolLM2-135M) only to find the compiled
executable in XLA's compile cache by the lowered program's hash. A saved export is looked up by what determines it
(the export's config, the prompt shape, the settings, jax's version and backend, jaxssl's own source), so the job
loads it without building the model, then XLA's cache gives the executable.
"""
import hashlib
import json
import os

from jaxssl import runtime

FORMAT = 3  # of the files written here; part of every key (2: generate programs say how they take the weights;
# 3: and which layer kernels they take output-major)


def path_for(kind: str, **facts) -> str | None:
  """The file of a `kind` program determined by `facts` (JSON values), or None where programs are not kept: no
  local compile cache (off, or a gs:// URL), or a program over several devices (its shardings would be more facts)."""
  import jax  # reason: after runtime.setup, as every job's jax
  import jaxlib
  cache = runtime.compile_cache_dir()
  if not cache or '://' in cache or jax.device_count() != 1:
    return None
  device = jax.devices()[0]
  identity = dict(facts, format=FORMAT, jax=jax.__version__, jaxlib=jaxlib.__version__,
                  platform=device.client.platform, platform_version=device.client.platform_version,
                  device_kind=device.device_kind, xla_flags=os.environ.get('XLA_FLAGS', ''),
                  x64=bool(jax.config.jax_enable_x64), source=_source_digest())
  key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(cache, 'jaxssl_programs', f'{kind}-{key[:40]}')


def _source_digest() -> str:
  """A digest of jaxssl's Python source: a program saved by other code is never loaded."""
  root = os.path.dirname(os.path.abspath(__file__))
  digest = hashlib.sha256()
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(f for f in files if f.endswith('.py')):
      full = os.path.join(folder, name)
      digest.update(os.path.relpath(full, root).encode())
      with open(full, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


def read(path: str) -> tuple[dict, bytes] | None:
  """(metadata, serialized program) of a file `write` finished, or None (missing or unreadable)."""
  try:
    with open(path, 'rb') as f:
      header, blob = f.read().split(b'\n', 1)
    return json.loads(header), blob
  except (OSError, ValueError):
    return None


def write(path: str, meta: dict, blob: bytes) -> None:
  """Saves a program whole or not at all (write_whole)."""
  write_whole(path, lambda f: f.write(json.dumps(meta).encode() + b'\n' + bytes(blob)))


def write_whole(path: str, fill) -> bool:
  """`fill(file)` writes a temporary file beside `path`, renamed to `path` once done: a cache file appears whole or
  not at all. False (nothing written) where the folder is not writable, as XLA's own cache is skipped then."""
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'wb') as f:
      fill(f)
    os.replace(tmp, path)
    return True
  except BaseException as e:  # reason: no half-written file stays behind, whatever stopped `fill`
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      return False
    raise

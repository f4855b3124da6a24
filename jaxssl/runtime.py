"""Process-level JAX setup shared by every job: quiet logs, the persistent compile cache, several processes.

A job is one of several processes (TPU pod hosts, SLURM tasks, a local pod) when, in this order of precedence:
  * the flags `--coordinator HOST:PORT --num-processes N --process-id I` are given (every job has them), or
  * the environment sets JAXSSL_COORDINATOR, JAXSSL_NUM_PROCESSES and JAXSSL_PROCESS_ID (tpu/local_pod.py does), or
  * JAX can detect the cluster: JAXSSL_DISTRIBUTED=auto (tpu/pod.py sets it on every TPU worker), a SLURM step
    of several tasks, or a multi-host TPU slice that names its workers (TPU_WORKER_HOSTNAMES).
Then every process calls `jax.distributed.initialize`; on CPU the processes talk through gloo. A process that
stops sending heartbeats for `--heartbeat-timeout` seconds (default 20) is declared dead and the others stop
with an error instead of waiting forever in a collective. JAXSSL_DISTRIBUTED=off disables all of this.
"""
import contextlib
import ctypes
import glob
import os
import sys

from jaxssl.errors import UserError

DEFAULT_HEARTBEAT_TIMEOUT_S = 20
DEFAULT_COMPILE_CACHE_DIR = '~/.cache/jaxssl/jax_compile_cache'  # compile_cache_dir


def add_distributed_args(parser) -> None:
  """The multi-process flags every job accepts (each overrides its JAXSSL_* environment variable)."""
  group = parser.add_argument_group('several processes (TPU pod hosts, SLURM tasks, tpu/local_pod.py)')
  group.add_argument('--coordinator', default=None, help='HOST:PORT of process 0 (env JAXSSL_COORDINATOR)')
  group.add_argument('--num-processes', type=int, default=None, help='processes in the job (JAXSSL_NUM_PROCESSES)')
  group.add_argument('--process-id', type=int, default=None, help="this process's index (JAXSSL_PROCESS_ID)")
  group.add_argument('--heartbeat-timeout', type=int, default=None,
                     help=f'seconds without a heartbeat before a process counts as dead (default '
                          f'{DEFAULT_HEARTBEAT_TIMEOUT_S}; JAXSSL_HEARTBEAT_TIMEOUT)')


def local_gcs_defaults() -> None:
  """With STORAGE_EMULATOR_HOST set (a local GCS server, e.g. tpu/local_gcs.py), the settings that point
  tensorstore at the same server and keep gcsfs and google-auth from probing Google's services; each only where
  the environment does not set it already. Runs at `import jaxssl`, before gcsfs or tensorstore read them."""
  host = os.environ.get('STORAGE_EMULATOR_HOST', '')
  if not host:
    return
  defaults = {'TENSORSTORE_GCS_HTTP_URL': host if '://' in host else f'http://{host}',
              'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'FSSPEC_GCS_TOKEN': 'anon',
              'GCE_METADATA_HOST': '127.0.0.1:1', 'GCE_METADATA_ROOT': '127.0.0.1:1', 'GCE_METADATA_IP': '127.0.0.1:1'}
  for key, value in defaults.items():
    os.environ.setdefault(key, value)


def check_workdir(workdir: str) -> None:
  """A workdir is a local folder or a bucket URL whose filesystem is installed (gs:// needs gcsfs, s3:// s3fs).

  Every host of a pod reaches a bucket: a gs:// workdir needs no shared file system (jaxssl/storage.py).
  """
  scheme, sep, rest = workdir.partition('://')
  if not sep or scheme == 'file':
    return
  if not rest.strip('/'):
    raise UserError(f'--workdir {workdir} names no bucket: use {scheme}://BUCKET/FOLDER')
  import fsspec  # reason: only URL workdirs need it
  try:
    fsspec.get_filesystem_class(scheme)
  except (ImportError, ValueError) as e:
    reason = (str(e).splitlines() or [''])[0][:160]
    raise UserError(f'--workdir {workdir}: {scheme}:// is not reachable here ({reason}): use gs:// (gcsfs), '
                    's3:// (pip install s3fs) or a local folder') from None
  from jaxssl import storage  # reason: only URL workdirs need it (and its fsspec imports)
  storage.check_local_gcs(workdir)


def _setting(args, flag: str, env: str, kind=str):
  value = getattr(args, flag, None) if args is not None else None
  if value is None and os.environ.get(env, '') != '':
    try:
      value = kind(os.environ[env])
    except ValueError:
      raise UserError(f'{env}={os.environ[env]!r} must be an integer') from None
  return value


def _cluster_detected() -> bool:
  """Whether JAX's own cluster detection should run: asked for, or a multi-task SLURM step / multi-host TPU."""
  if os.environ.get('JAXSSL_DISTRIBUTED') == 'auto':
    return True
  if os.environ.get('SLURM_JOB_ID') and int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    return True
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def runs_xla_cpu() -> bool:
  """Whether this process computes on XLA:CPU: JAX_PLATFORMS says so, or the host has no TPU or GPU device."""
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms:
    return platforms.split(',')[0] == 'cpu'
  return not any(glob.glob(p) for p in ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*'))


def keep_host_memory_mapped() -> bool:
  """On glibc, serves large host buffers from one heap that is never given back to the OS; True if applied.

  XLA:CPU allocates a step's scratch (activations: 1.7 GB for BERT-base at batch 8 x 128) with malloc at every
  execution and frees it at the end. glibc serves such sizes with a fresh mmap each time, so every step page-faulted
  the whole scratch back in and the kernel zeroed it again: 450k faults and ~1.2 s of system time per BERT-base
  step on a 2-core host, 12% of the process's CPU time under `perf`. With one arena, no mmap and no trimming, the
  freed pages stay mapped and the next step reuses them. Trimming is off altogether, not only above some size: a
  step's scratch is sometimes allocated before the previous step's is freed (the free runs on XLA's thread after the
  outputs are ready), so the heap holds two or three steps' scratch at its high-water mark; any finite threshold
  (2 GB was one) gave those pages back and each later step page-faulted 1.9 GB in again (BERT-base: 160 tokens/s
  instead of 320 in those steps). Must run before XLA starts its threads (each thread would
  otherwise get an arena of its own, whose large blocks are always mmapped), so `import jaxssl` does it on XLA:CPU
  hosts, before numpy or jax start any. JAXSSL_KEEP_HOST_MEMORY=0 turns it off.
  """
  if os.environ.get('JAXSSL_KEEP_HOST_MEMORY', '1') == '0' or not sys.platform.startswith('linux'):
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt  # the C library Python runs on (find_library would spawn ldconfig)
  except (OSError, AttributeError):  # not glibc (musl has no mallopt)
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
  never = -1  # glibc: 'setting M_TRIM_THRESHOLD to -1 disables trimming completely' (mallopt(3))
  return bool(mallopt(m_arena_max, 1) and mallopt(m_mmap_max, 0) and mallopt(m_trim_threshold, never))


def give_back_freed_host_memory() -> bool:
  """Returns the heap's free pages to the OS now (glibc's malloc_trim); True if it did. For a one-off large free
  that no later step reuses (the generate job's restored weights, once it maps them from a file instead), which
  keep_host_memory_mapped would otherwise keep resident."""
  try:
    return bool(ctypes.CDLL(None).malloc_trim(0))
  except (OSError, AttributeError):  # not glibc
    return False


def compile_cache_dir() -> str | None:
  """Where jobs keep XLA's compiled programs across runs: JAX_COMPILATION_CACHE_DIR (a folder or a gs:// URL),
  else ~/.cache/jaxssl/jax_compile_cache; None when JAX_COMPILATION_CACHE_DIR is set to ''.

  On by default (as MaxText's jax_cache_dir): without it every run of a job compiles again (the generate job of a
  135M model: 9 s of compiling, against 1 s to load its program from the cache).
  """
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  return os.path.expanduser(DEFAULT_COMPILE_CACHE_DIR) if cache is None else cache or None


@contextlib.contextmanager
def _rocm_plugin_search_by_folder_name():
  """While jax is imported: importlib.metadata.distributions() yields only the distributions whose folder name could
  be a ROCm plugin's (jax-rocm*-plugin), or whose name it cannot tell without reading them.

  Why: jax's import looks for a ROCm plugin by parsing the METADATA file of every installed distribution (jax/_src/
  numpy/array_constructors.py): 0.09 s of every job's start with the ~150 distributions of the test environment
  (4% of the generate job's second start; BENCHMARKS.md §33). A distribution's normalized name comes from its
  folder's name without reading it (2.6 ms for all), and jax's own check then runs on what is left: a ROCm plugin
  is still found."""
  import importlib.metadata as metadata  # reason: only around jax's import
  original = metadata.distributions

  def distributions(**kwargs):
    for dist in original(**kwargs):
      name = getattr(dist, '_normalized_name', None)
      if not isinstance(name, str) or name.startswith('jax_rocm'):
        yield dist

  metadata.distributions = distributions
  try:
    yield
  finally:
    metadata.distributions = original


def setup(args=None) -> None:
  """Enables the compile cache (`compile_cache_dir`) and joins a multi-process job if one is configured.

  `args` are a job's parsed arguments (with `add_distributed_args`'s flags), or None for the environment alone.
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  with _rocm_plugin_search_by_folder_name():
    import jax
  cache = compile_cache_dir()
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  if os.environ.get('JAXSSL_DISTRIBUTED') == 'off':
    return
  coordinator = _setting(args, 'coordinator', 'JAXSSL_COORDINATOR')
  num_processes = _setting(args, 'num_processes', 'JAXSSL_NUM_PROCESSES', int)
  process_id = _setting(args, 'process_id', 'JAXSSL_PROCESS_ID', int)
  heartbeat = _setting(args, 'heartbeat_timeout', 'JAXSSL_HEARTBEAT_TIMEOUT', int)
  heartbeat = DEFAULT_HEARTBEAT_TIMEOUT_S if heartbeat is None else heartbeat
  if heartbeat < 1:
    raise UserError(f'--heartbeat-timeout={heartbeat} must be at least 1 second')
  timeouts = dict(heartbeat_timeout_seconds=heartbeat, initialization_timeout=300)
  if coordinator or num_processes is not None or process_id is not None:
    if not coordinator or num_processes is None or process_id is None:
      raise UserError('a multi-process job needs all of --coordinator HOST:PORT, --num-processes N and '
                      '--process-id I (or JAXSSL_COORDINATOR, JAXSSL_NUM_PROCESSES, JAXSSL_PROCESS_ID)')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(f'--process-id={process_id} must be in [0, --num-processes={num_processes})')
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    _every_process_writes_its_compiles(cache)
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, **timeouts)
  elif _cluster_detected():
    _every_process_writes_its_compiles(cache)
    jax.distributed.initialize(**timeouts)


def _every_process_writes_its_compiles(cache: str | None) -> None:
  """Lets every process of a multi-process job write the programs it compiles to a local compile cache.

  JAX writes cache entries from process 0 only (hosts writing one key to a bucket contend), so where the cache is a
  folder on each host's own disk (the default, ~/.cache/jaxssl/jax_compile_cache: a TPU VM's hosts share no disk)
  the other hosts found nothing on every restart and compiled every program again while host 0 loaded it and
  waited at the first collective. On CPU each process's keys are its own anyway (they hash its own devices): a local
  pod's process 1 compiled its train step on every run (7-10 s for a tiny BERT) against process 0's 0.5 s load.
  Here the other processes write too, to a local folder; a bucket (gs://) keeps JAX's rule. Where hosts share a
  folder and their keys agree, they write the same bytes: JAX skips a key already there, and a reader that meets a
  half-written entry compiles instead. Process 0, and programs with host callbacks, go through JAX's own rules."""
  if not cache or '://' in cache:
    return
  import jax  # reason: imported by setup before this runs
  from jax._src import compilation_cache, compiler, distributed  # reason: JAX's cache writer, multi-process jobs only
  original = compiler._cache_write  # pylint: disable=protected-access

  def cache_write(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks):
    if distributed.global_state.process_id == 0 or host_callbacks:
      return original(cache_key, compile_time_secs, module_name, backend, executable, host_callbacks)
    if compile_time_secs < jax.config.jax_persistent_cache_min_compile_time_secs:
      return None
    try:
      compilation_cache.put_executable_and_time(cache_key, module_name, executable, backend, int(compile_time_secs))
    except Exception:  # pylint: disable=broad-except  (a cache entry saves time; its write failing loses nothing)
      pass
    return None

  compiler._cache_write = cache_write  # pylint: disable=protected-access


def exit_without_teardown() -> None:
  """Ends a finished single-process job at once (status 0), after flushing stdout and stderr.

  The interpreter's teardown (freeing the weights and the XLA client, module by module) took 0.4-0.5 s of every
  generate job on CPU. Only for a job that has nothing left to write; a job of several processes returns normally,
  so that jax.distributed's shutdown still runs.
  """
  import jax  # noqa: PLC0415 (after setup)
  if jax.process_count() > 1:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)

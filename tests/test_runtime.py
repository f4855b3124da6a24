"""Joining a multi-process job: flag/environment precedence and every incomplete or impossible setting's message."""
import argparse

import pytest

from jaxssl import runtime
from jaxssl.errors import UserError


def args(**kwargs):
  parser = argparse.ArgumentParser()
  runtime.add_distributed_args(parser)
  flags = [f'--{k.replace("_", "-")}={v}' for k, v in kwargs.items()]
  return parser.parse_args(flags)


@pytest.mark.parametrize('given, message', [
    (dict(coordinator='127.0.0.1:1234'), 'needs all of --coordinator HOST:PORT, --num-processes N and --process-id'),
    (dict(coordinator='127.0.0.1:1234', num_processes=2, process_id=2), r'--process-id=2 must be in \[0, '),
    (dict(heartbeat_timeout=0), '--heartbeat-timeout=0 must be at least 1 second'),
])
def test_incomplete_or_impossible_settings(given, message, monkeypatch):
  for name in ('JAXSSL_COORDINATOR', 'JAXSSL_NUM_PROCESSES', 'JAXSSL_PROCESS_ID', 'JAXSSL_DISTRIBUTED'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(UserError, match=message):
    runtime.setup(args(**given))


def test_environment_fills_in_and_flags_win(monkeypatch):
  monkeypatch.setenv('JAXSSL_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAXSSL_PROCESS_ID', '7')
  monkeypatch.delenv('JAXSSL_COORDINATOR', raising=False)
  # The flag's process id (1) wins over the environment's (7); the count comes from the environment.
  with pytest.raises(UserError, match='needs all of --coordinator'):
    runtime.setup(args(process_id=1))
  assert runtime._setting(args(process_id=1), 'process_id', 'JAXSSL_PROCESS_ID', int) == 1
  assert runtime._setting(args(), 'num_processes', 'JAXSSL_NUM_PROCESSES', int) == 4
  monkeypatch.setenv('JAXSSL_NUM_PROCESSES', 'four')
  with pytest.raises(UserError, match="JAXSSL_NUM_PROCESSES='four' must be an integer"):
    runtime.setup(args())


def test_cluster_detection(monkeypatch):
  for name in ('JAXSSL_DISTRIBUTED', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  assert not runtime._cluster_detected()
  monkeypatch.setenv('SLURM_JOB_ID', '42')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not runtime._cluster_detected()  # one task: nothing to join
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert runtime._cluster_detected()
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert runtime._cluster_detected()


def test_the_rocm_plugin_search_reads_only_what_could_be_one(tmp_path):
  """While runtime.setup imports jax, importlib.metadata yields only the distributions whose folder names a ROCm
  plugin could have (jax reads the METADATA of each it is given): a jax-rocm plugin is still found, another
  distribution is not read; afterwards every one is yielded again."""
  import importlib.metadata as metadata  # noqa: PLC0415 (test-only)
  for folder, name in (('jax_rocm7_plugin-0.10.2.dist-info', 'jax-rocm7-plugin'), ('torch-2.13.0.dist-info', 'torch')):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / 'METADATA').write_text(f'Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n')
  with runtime._rocm_plugin_search_by_folder_name():
    assert [d.metadata['Name'] for d in metadata.distributions(path=[str(tmp_path)])] == ['jax-rocm7-plugin']
  assert sorted(d.metadata['Name'] for d in metadata.distributions(path=[str(tmp_path)])) == [
      'jax-rocm7-plugin', 'torch']


def test_local_workdir_is_accepted():
  """Bucket workdirs (accepted, and URLs refused for a missing bucket or scheme) are tested in test_bucket.py."""
  runtime.check_workdir('/mnt/bucket/run')


def _last_number(code: str, **env) -> int:
  """Runs `code` in a fresh XLA:CPU Python process (the host memory setting applies at its start); the last number
  it prints."""
  import os
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-c', code], env=dict(os.environ, JAX_PLATFORMS='cpu', **env),
                          capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-2000:]
  return int(result.stdout.split()[-1])


_FAULTS_PER_RUN = r'''
import jaxssl  # first, as every job's entry point imports it
import resource, sys
import jax, jax.numpy as jnp
x = jnp.ones((16384, 1024), jnp.float32)
w = jnp.ones((1024, 16), jnp.float32)
step = jax.jit(lambda x, w: (jnp.sin(x) @ w).sum()).lower(x, w).compile()
assert step.memory_analysis().temp_size_in_bytes >= 64 * 2**20, step.memory_analysis()
for _ in range(10):
  step(x, w).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  step(x, w).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
'''


@pytest.mark.parametrize('keep', ['1', '0'])
def test_xla_cpu_scratch_reuses_mapped_memory(keep):
  """A program with a 64 MB scratch buffer: with jaxssl's host memory setting (the default on XLA:CPU) its pages
  stay mapped between executions; turned off (JAXSSL_KEEP_HOST_MEMORY=0), glibc maps them afresh every run.

  (With the setting, the heap still grows now and then while it settles: aligned allocations leave gaps that the
  next one cannot use. Over 20 runs after 10 warm-up runs that was 0 to 3 growths, hence the bound of half.)"""
  faults = _last_number(_FAULTS_PER_RUN, JAXSSL_KEEP_HOST_MEMORY=keep)
  pages = 64 * 2**20 // 4096
  if keep == '1':
    assert faults < pages // 2, f'{faults} page faults per run: the scratch is mapped afresh each time'
  else:
    assert faults > pages * 9 // 10, f'{faults} page faults per run: the control should fault the scratch in'


_HEAP_TOP_AFTER_FREE = r'''
import jaxssl  # applies the host memory setting on XLA:CPU hosts
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
libc.malloc.argtypes, libc.free.argtypes, libc.sbrk.argtypes = [ctypes.c_size_t], [ctypes.c_void_p], [ctypes.c_long]
block = libc.malloc(3 * 2**30)  # address space only: nothing touches it, so no page is faulted in
assert block, 'malloc failed'
grown = libc.sbrk(0)
libc.free(block)
print(grown - libc.sbrk(0))
'''


def test_host_heap_is_never_given_back():
  """A 3 GB block freed stays in the heap (glibc would give a top of more than any finite threshold back): a
  later step's scratch that lands there is not page-faulted in again (runtime.keep_host_memory_mapped)."""
  shrunk = _last_number(_HEAP_TOP_AFTER_FREE)
  assert shrunk == 0, f'the heap shrank by {shrunk} bytes after free'



_RESIDENT_AFTER_TRIM = r'''
import jaxssl  # applies the host memory setting on XLA:CPU hosts
import numpy as np
from jaxssl import runtime

def resident():
  return int(next(l for l in open('/proc/self/status') if l.startswith('RssAnon')).split()[1]) * 1024

block = np.ones(2**28, np.uint8)  # 256 MB, touched
keep = np.ones(2**20, np.uint8)  # allocated after it: the freed block is not the heap's top
del block
kept = resident()
assert runtime.give_back_freed_host_memory()
print(kept - resident())
'''


def test_freed_host_memory_is_given_back_when_asked():
  """runtime.give_back_freed_host_memory returns freed pages inside the heap too (the generate job's restored
  weights, once it maps them from a file instead), which keep_host_memory_mapped otherwise keeps resident."""
  assert _last_number(_RESIDENT_AFTER_TRIM) > 200 * 2**20

@pytest.mark.parametrize('setting', ['unset', 'folder', 'empty'])
def test_compile_cache_is_on_by_default(setting, tmp_path):
  """Jobs keep compiled programs in ~/.cache/jaxssl/jax_compile_cache unless JAX_COMPILATION_CACHE_DIR says
  elsewhere; set to '' it is off. A job's second run then loads its programs instead of compiling them."""
  import os
  import subprocess
  import sys
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COMPILATION_CACHE_DIR'}
  env.update(HOME=str(tmp_path / 'home'), JAX_PLATFORMS='cpu')
  if setting != 'unset':
    env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'mine') if setting == 'folder' else ''
  program = ('from jaxssl import runtime; runtime.setup(); import jax, jax.numpy as jnp; '
             'print(jax.jit(lambda x: jnp.sin(x) * 3)(jnp.arange(4.0)).sum())')
  subprocess.run([sys.executable, '-c', program], env=env, check=True, capture_output=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  default = tmp_path / 'home' / '.cache' / 'jaxssl' / 'jax_compile_cache'
  written = {'unset': default, 'folder': tmp_path / 'mine', 'empty': None}[setting]
  assert [p for p in (default, tmp_path / 'mine') if p.exists() and os.listdir(p)] == ([written] if written else [])


_POD_PROGRAM = """
from jaxssl import runtime
runtime.setup()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ('d',))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), np.ones((1, 4), np.float32))
print('sum', float(jax.jit(lambda a: (a * 3).sum())(x)))
"""


@pytest.mark.parametrize('disks', ['shared', 'per_host'])
def test_every_process_of_a_pod_loads_its_programs_from_the_cache(disks, tmp_path):
  """A local pod run twice: on the second run process 1 too loads the program from the compile cache, whether the
  processes share the cache folder or each has its own (a TPU VM's hosts: no shared disk). JAX writes from process
  0 only, so process 1 compiled everything on every run; on CPU its keys, which hash its own devices, never matched
  process 0's entries either."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'), JAX_LOG_COMPILES='1')
  program = _POD_PROGRAM
  if disks == 'per_host':  # each process's cache folder its own, as on separate machines
    program = "import os; os.environ['JAX_COMPILATION_CACHE_DIR'] += os.environ['JAXSSL_PROCESS_ID']\n" + program
  cmd = [sys.executable, os.path.join(root, 'tpu', 'local_pod.py'), '--processes', '2', '--devices-per-process', '1',
         '--', sys.executable, '-c', program]
  runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=300) for _ in range(2)]
  for run in runs:
    assert run.returncode == 0 and '[0] sum 24.0' in run.stdout, run.stderr[-3000:]

  def hits(run, process):
    return [l for l in run.stderr.splitlines()
            if l.startswith(f'[{process}]') and "Persistent compilation cache hit for 'jit__lambda'" in l]
  assert not hits(runs[0], 0) and not hits(runs[0], 1)
  assert hits(runs[1], 0) and hits(runs[1], 1), runs[1].stderr[-3000:]
  if disks == 'per_host':
    assert all(os.listdir(tmp_path / f'cache{process}') for process in (0, 1))


@pytest.mark.parametrize('cache', ['local', 'bucket'])
def test_every_process_of_a_pod_writes_its_compiles_on_any_platform(cache, monkeypatch, tmp_path):
  """Joining a pod, by its coordinator or by JAX's own cluster detection (TPU pods, SLURM steps), on any platform,
  lets the processes other than 0 write to a local compile cache; a bucket keeps JAX's rule (process 0 alone: hosts
  writing one key to a bucket contend)."""
  import jax
  from jax._src import compiler
  joined = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: joined.append(kwargs))
  jaxs_writer = compiler._cache_write  # pylint: disable=protected-access
  monkeypatch.setattr(compiler, '_cache_write', jaxs_writer)  # put back after the test
  monkeypatch.setattr(runtime, 'compile_cache_dir', lambda: str(tmp_path) if cache == 'local' else 'gs://b/cache')
  monkeypatch.setattr(jax.config, 'update', lambda *a: None)  # this process's own cache settings stay
  monkeypatch.setenv('JAX_PLATFORMS', '')  # a TPU or GPU host
  for join in ({'JAXSSL_COORDINATOR': 'h0:1234', 'JAXSSL_NUM_PROCESSES': '2', 'JAXSSL_PROCESS_ID': '1'},
               {'JAXSSL_DISTRIBUTED': 'auto'}):
    for name in ('JAXSSL_COORDINATOR', 'JAXSSL_NUM_PROCESSES', 'JAXSSL_PROCESS_ID', 'JAXSSL_DISTRIBUTED'):
      monkeypatch.delenv(name, raising=False)
    for name, value in join.items():
      monkeypatch.setenv(name, value)
    compiler._cache_write = jaxs_writer  # pylint: disable=protected-access
    runtime.setup()
    assert (compiler._cache_write is jaxs_writer) == (cache == 'bucket'), join  # pylint: disable=protected-access
  assert len(joined) == 2


def test_program_files_are_keyed_by_what_determines_them(monkeypatch, tmp_path):
  import jax
  from jaxssl import program_cache
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path))
  monkeypatch.setattr(jax, 'device_count', lambda: 1)  # the tests' process has 8 CPU devices; the job, one
  first = program_cache.path_for('generate', export={'model': {'num_layers': 2}}, prompts=(1, 5), greedy=True)
  assert first.startswith(str(tmp_path / 'jaxssl_programs' / 'generate-'))
  assert first == program_cache.path_for('generate', export={'model': {'num_layers': 2}}, prompts=(1, 5), greedy=True)
  assert first != program_cache.path_for('generate', export={'model': {'num_layers': 3}}, prompts=(1, 5), greedy=True)
  assert first != program_cache.path_for('generate', export={'model': {'num_layers': 2}}, prompts=(1, 6), greedy=True)
  program_cache.write(first, {'greedy': True}, b'\x00program\nbytes')
  assert program_cache.read(first) == ({'greedy': True}, b'\x00program\nbytes')
  assert program_cache.read(first + '-missing') is None
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '')
  assert program_cache.path_for('generate', prompts=(1, 5)) is None  # no compile cache, no saved programs
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path))
  monkeypatch.setattr(jax, 'device_count', lambda: 2)
  assert program_cache.path_for('generate', prompts=(1, 5)) is None  # programs over several devices: not kept

"""Test setup: 8 simulated CPU devices (for sharded == unsharded checks) and a persistent compile cache."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# A fine-tune job's model.dtype=auto computes in bfloat16 on a CPU with bfloat16 instructions (models/precision.py):
# the suite pins the answer to no, so that its float32 figures hold on every host; tests of bfloat16 ask for it.
os.environ.setdefault('JAXSSL_CPU_BF16', '0')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
_cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
if _cache:
  jax.config.update('jax_compilation_cache_dir', _cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

# The files with the most test time, slowest first (seconds summed over their tests, 2026-12-03 on 2 cores).
SLOWEST_FILES = ('test_pretrain_job.py',      # 291
                 'test_finetune_job.py',      # 195
                 'test_readme_decoders.py',   # 168, one test
                 'test_bucket.py',            # 144
                 'test_drills.py',            # 92
                 'test_bucket_jobs.py',       # 89
                 'test_readme.py',            # 79
                 'test_compile_only.py',      # 59
                 'test_speech.py')            # 56


def pytest_configure(config):
  """xdist's --dist loadfile hands files out by how many tests they hold, most first, which left the one-test
  README part 2 (~3 min) to run alone at the end; instead they go out in collection order (below): the slowest first,
  the many short files filling in behind them on both workers."""
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order

"""Test setup: 8 simulated CPU devices (for sharded == unsharded checks) and a persistent compile cache."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
_cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
if _cache:
  jax.config.update('jax_compilation_cache_dir', _cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

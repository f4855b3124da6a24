"""Process-level JAX setup shared by every job: quiet logs, the persistent compile cache."""
import os


def setup() -> None:
  """Enables the persistent compilation cache when JAX_COMPILATION_CACHE_DIR is set."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

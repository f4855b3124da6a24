"""Process-level JAX setup shared by every job: quiet logs, the persistent compile cache, several processes.

Several processes form one job when JAXSSL_COORDINATOR (host:port of process 0), JAXSSL_NUM_PROCESSES and
JAXSSL_PROCESS_ID are set: each runs `jax.distributed.initialize`, and on CPU they talk through gloo. With
JAXSSL_DISTRIBUTED=auto, JAX detects the cluster itself (TPU VM workers, SLURM). Launch scripts are tpu/'s job.
"""
import os

from jaxssl.errors import UserError


def setup() -> None:
  """Enables the compile cache (JAX_COMPILATION_CACHE_DIR) and joins a multi-process job if one is configured."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import jax
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if cache:
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  coordinator = os.environ.get('JAXSSL_COORDINATOR')
  if coordinator:
    try:
      num_processes = int(os.environ['JAXSSL_NUM_PROCESSES'])
      process_id = int(os.environ['JAXSSL_PROCESS_ID'])
    except (KeyError, ValueError):
      raise UserError('JAXSSL_COORDINATOR is set: also set JAXSSL_NUM_PROCESSES and JAXSSL_PROCESS_ID to integers')
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
  elif os.environ.get('JAXSSL_DISTRIBUTED') == 'auto':
    jax.distributed.initialize()

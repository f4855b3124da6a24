"""Benchmark of the train step on synthetic batches of the configured shape.

  python -m jaxssl.bench --config configs/bert.py:small [--steps N] [--config.key=value ...]

Prints one JSON line: tokens_per_sec, step_time_s (median), compile_s, peak_memory_mb, flops_per_token, mfu,
device. Compare against ../shared/bench/ run in the same session (ratios, not absolute figures).
"""
import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np

from jaxssl import config as config_lib
from jaxssl import runtime
from jaxssl.errors import exit_on_user_error


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """A BERT batch with 15% of positions predicted, in the layout the pipeline produces."""
  rng = np.random.default_rng(seed)
  b, length, p = config.train.batch_size, config.data.seq_len, config.data.max_predictions
  positions = np.sort(np.stack([rng.choice(np.arange(1, length), p, replace=False) for _ in range(b)]), -1)
  return {
      'input_ids': rng.integers(5, vocab_size, (b, length), dtype=np.int32),
      'token_type_ids': (np.arange(length)[None] >= length // 2).repeat(b, 0).astype(np.int32),
      'attention_mask': np.ones((b, length), np.int32),
      'mlm_positions': positions.astype(np.int32),
      'mlm_ids': rng.integers(5, vocab_size, (b, p), dtype=np.int32),
      'mlm_weights': np.ones((b, p), np.float32),
      'nsp_label': rng.integers(0, 2, (b,), dtype=np.int32),
  }


def run(config, steps: int) -> dict:
  import jax
  from jaxssl import mesh as mesh_lib
  from jaxssl import models
  from jaxssl.train import metrics as metrics_lib
  from jaxssl.train import state as state_lib
  from jaxssl.train import step as step_lib
  vocab_size = config.tokenizer.vocab_size
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  setup = state_lib.setup_model(config.model, vocab_size, mesh, config.train.seed)
  tx, schedule = state_lib.make_optimizer(config.train), state_lib.make_schedule(config.train)
  state = state_lib.init_state(setup, tx)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, config.train.microbatches),
      state_lib.state_shardings(setup, tx), mesh)
  batch = mesh_lib.global_batch(synthetic_batch(config, vocab_size), mesh)
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      state, metrics = train_step(state, batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens = config.train.batch_size * config.data.seq_len
  flops = models.flops_per_token(config.model, vocab_size, config.data.seq_len, config.data.max_predictions)
  peak = metrics_lib.peak_flops_per_device(config.log.peak_flops_per_device) * jax.device_count()
  device_stats = jax.devices()[0].memory_stats() or {}
  peak_mb = (device_stats.get('peak_bytes_in_use', 0) / 2**20 or
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return {
      'tokens_per_sec': round(tokens / step_time, 1), 'step_time_s': round(step_time, 4),
      'compile_s': round(compile_s, 2), 'peak_memory_mb': round(peak_mb, 1),
      'flops_per_token': flops, 'mfu': round(tokens / step_time * flops / peak, 4) if peak else None,
      'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}',
      'config': config.get('variant', ''), 'batch': config.train.batch_size, 'seq_len': config.data.seq_len,
      'dtype': config.model.dtype, 'loss': float(metrics['loss']),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.bench', description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/bert.py:small')
  parser.add_argument('--steps', type=int, default=10)
  args, config = config_lib.parse_job_args(parser, argv)
  if args.steps < 1:
    parser.error('--steps must be at least 1')
  runtime.setup(args)
  print(json.dumps(run(config, args.steps)), flush=True)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

"""Benchmark of the train step on synthetic batches of the configured shape.

  python -m jaxssl.bench --config configs/bert.py:small [--steps N] [--config.key=value ...]

Prints one JSON line: tokens_per_sec, step_time_s (median), compile_s, peak_memory_mb, flops_per_token, mfu,
device. Compare against ../shared/bench/ run in the same session (ratios, not absolute figures).

  python -m jaxssl.bench --attention-curve [--config configs/bert.py:bigbird_tiny] [--lengths 1024,2048,4096,8192]

Full vs Big Bird block-sparse attention: one JSON line per (attention, seq_len) with the forward + backward time
of one attention layer of the config's model (hidden_size, num_heads, block_size, num_random_blocks, dtype) on
`--batch` sequences, and the compiled program's temporary memory (XLA's memory analysis: works on CPU too).
Full attention should grow ~4x per doubling of the length, block-sparse ~2x.
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


def attention_curve(model_cfg, lengths, batch: int, steps: int):
  """Yields one dict per (attention, seq_len): median fwd+bwd time of one attention layer and its temp memory."""
  import functools
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jaxssl.models import attention
  from jaxssl.models.layers import MultiHeadAttention
  h, n, bs, r = model_cfg.hidden_size, model_cfg.num_heads, model_cfg.block_size, model_cfg.num_random_blocks
  dtype = jnp.dtype(model_cfg.dtype)
  with nnx.use_eager_sharding(False):  # one bare layer, no mesh
    layer = MultiHeadAttention(h, n, stddev=0.02, attention_dropout_rate=0.0, dtype=dtype, rngs=nnx.Rngs(params=0))
  graphdef, params = nnx.split(layer)
  for seq_len in lengths:
    nb = attention.check_layout(seq_len, bs, r)
    x = jax.random.normal(jax.random.key(seq_len), (batch, seq_len, h), jnp.float32)
    mask = jnp.ones((batch, seq_len), jnp.int32)
    for kind in ('full', 'block_sparse'):
      attend = None if kind == 'full' else functools.partial(
          attention.block_sparse_attention, random_blocks=attention.random_block_table(nb, r, 0, n))

      def loss(params, x, attend=attend):
        y = nnx.merge(graphdef, params)(x, mask, attend=attend)
        return jnp.sum(jnp.square(y.astype(jnp.float32)))
      start = time.perf_counter()
      step = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
      compile_s = time.perf_counter() - start
      temp = step.memory_analysis().temp_size_in_bytes
      times = []
      for _ in range(steps + 1):  # the first call is a warm-up
        start = time.perf_counter()
        jax.block_until_ready(step(params, x))
        times.append(time.perf_counter() - start)
      yield {
          'attention': kind, 'seq_len': seq_len, 'fwd_bwd_ms': round(1000 * statistics.median(times[1:]), 2),
          'temp_mb': round(temp / 2**20, 1), 'compile_s': round(compile_s, 2), 'batch': batch, 'hidden': h,
          'heads': n, 'block_size': bs, 'num_random_blocks': r, 'dtype': str(dtype),
          'device': f'{jax.devices()[0].device_kind}',
      }


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  curve = '--attention-curve' in argv
  parser = argparse.ArgumentParser(prog='python -m jaxssl.bench', description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/bert.py:bigbird_tiny' if curve else 'configs/bert.py:small')
  parser.add_argument('--steps', type=int, default=3 if curve else 10)
  parser.add_argument('--attention-curve', action='store_true',
                      help='time full vs block-sparse attention of one layer over --lengths instead')
  parser.add_argument('--lengths', default='1024,2048,4096,8192', help='with --attention-curve: sequence lengths')
  parser.add_argument('--batch', type=int, default=1, help='with --attention-curve: sequences per step')
  args, config = config_lib.parse_job_args(parser, argv)
  if args.steps < 1:
    parser.error('--steps must be at least 1')
  runtime.setup(args)
  if args.attention_curve:
    try:
      lengths = [int(x) for x in args.lengths.split(',')]
    except ValueError:
      parser.error(f'--lengths={args.lengths!r}: give comma-separated integers, e.g. 1024,2048,4096')
    for row in attention_curve(config.model, lengths, args.batch, args.steps):
      print(json.dumps(row), flush=True)
    return
  print(json.dumps(run(config, args.steps)), flush=True)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

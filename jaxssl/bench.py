"""Benchmark of the train step on synthetic batches of the configured shape.

  python -m jaxssl.bench --config configs/bert.py:small [--steps N] [--config.key=value ...]

Every family (bert, gpt, encdec, elmo): synthetic batches in the family's train layout. Prints one JSON line:
tokens_per_sec, step_time_s (median, after WARMUP_STEPS untimed steps), compile_s (trace + compile, not run),
peak_memory_mb, temp_memory_mb (XLA's scratch of the compiled step: activations), flops_per_token, mfu, device, family,
layers and attention (what 'auto' picked, as the job's banner says). Compare
against ../shared/bench/ run in the same session (ratios, not absolute figures). `--profile DIR` writes a
jax.profiler trace of the timed steps.

  python -m jaxssl.bench --config configs/bert.py:small --pipeline [--steps N] [--tokenizer PATH]

The real input pipeline instead: tokens/s that the family's train_batches deliver over data.corpus on one
thread (pipeline_tokens_per_sec); with --steps also the step figures and pipeline_over_step (their ratio).

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
from jaxssl import paths
from jaxssl import runtime
from jaxssl import storage
from jaxssl.errors import exit_on_user_error

# Untimed steps after the compile, as ../shared/bench's references take (their --warmup 2): the first steps grow
# the host heap to its high-water mark (runtime.keep_host_memory_mapped) and warm the caches.
WARMUP_STEPS = 2


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """One global batch of the family's train layout (families.Family.synthetic_batch) with random valid content."""
  from jaxssl import families
  return families.family_for(config.model).synthetic_batch(config, vocab_size, seed)


def compiled_step(config):
  """The train step of `config`, compiled and run once (not timed), on one synthetic batch:
  (compiled step, state after that step, batch, mesh, compile seconds). What `run` times; also
  benchmarks/paired_steps.py."""
  import jax
  from jaxssl import families
  from jaxssl import mesh as mesh_lib
  from jaxssl.models import precision
  from jaxssl.train import state as state_lib
  from jaxssl.train import step as step_lib
  vocab_size = config.tokenizer.vocab_size
  precision.resolve(config.model)  # model.dtype=auto: what the pretraining job would compute in here
  families.validate_config(config.model, vocab_size)
  family = families.family_for(config.model)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  setup = state_lib.setup_model(config.model, vocab_size, mesh, config.train.seed)
  tx, schedule = state_lib.make_optimizer(config.train), state_lib.make_schedule(config.train)
  state = state_lib.init_state(setup, tx)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, config.train.microbatches, family.objective),
      state_lib.state_shardings(setup, tx), mesh, family.objective)
  batch = mesh_lib.global_batch(family.synthetic_batch(config, vocab_size, config.train.seed), mesh)
  with jax.set_mesh(mesh):
    # Tracing + XLA compilation alone (a persistent compilation cache, if configured, shortens it).
    start = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP_STEPS):  # nor are the first runs (allocation, caches)
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics)
  return compiled, state, batch, mesh, compile_s


def run(config, steps: int, profile_dir: str = '') -> dict:
  """Times `steps` train steps on one synthetic batch (after a compiling first step); the bench JSON fields.

  With `profile_dir`, the timed steps run inside `jax.profiler.trace` (a TensorBoard / Perfetto trace there).
  """
  import contextlib
  import jax
  from jaxssl import families
  from jaxssl.models import fused_attention
  from jaxssl.models.layers import describe_layer_loop
  from jaxssl.train import metrics as metrics_lib
  vocab_size = config.tokenizer.vocab_size
  train_step, state, batch, mesh, compile_s = compiled_step(config)
  # The profiler writes local files only: a bucket's trace is written to a temporary folder and uploaded.
  with jax.set_mesh(mesh), (storage.local_folder(profile_dir) if profile_dir else contextlib.nullcontext()) as out:
    memory = train_step.memory_analysis()  # XLA's own figures for the compiled program (CPU included)
    times = []
    # create_perfetto_trace: a plain JSON trace beside the xplane.pb (benchmarks/gpu.py sums its kernels).
    with jax.profiler.trace(out, create_perfetto_trace=True) if profile_dir else contextlib.nullcontext():
      for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
  step_time = statistics.median(times)
  tokens = config.train.batch_size * config.data.seq_len
  flops = families.flops_per_token(config.model, vocab_size, config.data.seq_len, config.data.max_predictions)
  peak = metrics_lib.peak_flops_per_device(config.log.peak_flops_per_device) * jax.device_count()
  device_stats = jax.devices()[0].memory_stats() or {}
  peak_mb = (device_stats.get('peak_bytes_in_use', 0) / 2**20 or
             resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return {
      'tokens_per_sec': round(tokens / step_time, 1), 'step_time_s': round(step_time, 4),
      'compile_s': round(compile_s, 2), 'peak_memory_mb': round(peak_mb, 1),
      # Activations and other scratch of one step (what remat trades), per device.
      'temp_memory_mb': round(memory.temp_size_in_bytes / 2**20, 1) if memory else None,
      'flops_per_token': flops, 'mfu': round(tokens / step_time * flops / peak, 4) if peak else None,
      'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}', 'family': config.model.name,
      'config': config.get('variant', ''), 'batch': config.train.batch_size, 'seq_len': config.data.seq_len,
      'dtype': config.model.dtype, 'layers': describe_layer_loop(config.model),
      'attention': fused_attention.describe(config.model, config.data.seq_len), 'loss': float(metrics['loss']),
  }


def pipeline(config, batches: int, tokenizer_path: str = '', warmup: int = 2) -> dict:
  """Tokens/s the family's real input pipeline delivers (`train_batches` over `data.corpus`) over `batches`
  batches after `warmup` ones; tokens = batch_size x seq_len per batch, as the step figure counts them.

  The tokenizer is `tokenizer_path` (its vocabulary size replaces `config.tokenizer.vocab_size`), or a
  sentencepiece one of `tokenizer.vocab_size` trained on the corpus in a temporary directory (not timed).
  """
  import tempfile
  from jaxssl.data import corpora, tokenizers
  from jaxssl import families
  family = families.family_for(config.model)
  sources = corpora.load_configured(config.data, seed=config.train.seed)
  with tempfile.TemporaryDirectory() as tmp:
    if tokenizer_path:
      tokenizer = tokenizers.load_tokenizer(tokenizer_path)
      config.tokenizer.vocab_size = tokenizer.vocab_size  # a step timed after this one uses its vocabulary
    else:
      tokenizer = tokenizers.get_or_train_tokenizer(
          tmp, lambda: corpora.sample_sentences(sources['train'], limit=config.tokenizer.sample_sentences,
                                                seed=config.train.seed),
          config.tokenizer)
    it = family.train_batches(sources['train'], tokenizer, config, start_step=0, seed=config.train.seed)
    for _ in range(warmup):  # thread start-up and first reads are not the steady state
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    elapsed = time.perf_counter() - start
    close = getattr(it, 'close', None)
    if close:
      close()
  tokens = batches * config.train.batch_size * config.data.seq_len
  return {'pipeline_tokens_per_sec': round(tokens / elapsed, 1), 'pipeline_batches': batches,
          'pipeline_threads': config.data.num_threads, 'corpus': config.data.corpus,
          'family': config.model.name, 'config': config.get('variant', ''), 'batch': config.train.batch_size,
          'seq_len': config.data.seq_len}


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
  # None: 10 steps, or with --pipeline no step timing unless --steps is given.
  parser.add_argument('--steps', type=int, default=None)
  parser.add_argument('--profile', default='', metavar='DIR',
                      help='write a jax.profiler trace of the timed steps to DIR (TensorBoard / Perfetto)')
  parser.add_argument('--pipeline', action='store_true',
                      help="time the family's real input pipeline over data.corpus (one thread unless "
                           '--config.data.num_threads is given); with --steps also the step and their ratio')
  parser.add_argument('--pipeline-batches', type=int, default=20, help='with --pipeline: batches timed')
  parser.add_argument('--tokenizer', default='',
                      help='with --pipeline: a tokenizer file/directory (default: train one on the corpus)')
  parser.add_argument('--attention-curve', action='store_true',
                      help='time full vs block-sparse attention of one layer over --lengths instead')
  parser.add_argument('--lengths', default='1024,2048,4096,8192', help='with --attention-curve: sequence lengths')
  parser.add_argument('--batch', type=int, default=1, help='with --attention-curve: sequences per step')
  args, config = config_lib.parse_job_args(parser, argv)
  args.profile, args.tokenizer = paths.absolute(args.profile), paths.absolute(args.tokenizer)
  steps = args.steps if args.steps is not None else (3 if curve else 10)
  if steps < 1:
    parser.error('--steps must be at least 1')
  if args.pipeline_batches < 1:
    parser.error('--pipeline-batches must be at least 1')
  runtime.setup(args)
  if args.attention_curve:
    try:
      lengths = [int(x) for x in args.lengths.split(',')]
    except ValueError:
      parser.error(f'--lengths={args.lengths!r}: give comma-separated integers, e.g. 1024,2048,4096')
    for row in attention_curve(config.model, lengths, args.batch, steps):
      print(json.dumps(row), flush=True)
    return
  if args.pipeline:
    if not any(a.startswith('--config.data.num_threads') for a in argv):
      config.data.num_threads = 1  # the figure: what one core delivers
    row = pipeline(config, args.pipeline_batches, args.tokenizer)
    if args.steps is not None:
      step = run(config, steps, args.profile)
      row.update(step, pipeline_over_step=round(row['pipeline_tokens_per_sec'] / step['tokens_per_sec'], 2))
    print(json.dumps(row), flush=True)
    return
  print(json.dumps(run(config, steps, args.profile)), flush=True)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

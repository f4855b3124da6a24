"""Issue 21 point 5, the GPU checks in one run, for a session lent a GPU (`device`; jax with CUDA there):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --out $OUT/gpu.jsonl --budget-s 300   # ~8 min on an H200
    python benchmarks/gpu.py --smoke                                                  # tiny shapes, any host

On the device (2026-12-04): `pip download` the wheels named at the end here into .whl/ (cp312, manylinux), carry
.whl, and run `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site
python3 benchmarks/gpu.py --out $OUT/gpu.jsonl > $OUT/gpu.log 2>&1`. The unrolled steps compile for 40-90 s each.

1. Train steps, bfloat16: BERT-base at seq 512 and GPT-2 small at seq 1024 (`python -m jaxssl.bench`, its JSON
   line: tokens/s, MFU against the device's dense bf16 peak in jaxssl/train/metrics.py, e.g. 989 TFLOP/s for
   H100/H200; the issue's target is >= 50%). Each at its config's defaults (attention dropout 0.1, so the
   explicit attention path), then without attention dropout (model.attention 'auto' takes cuDNN flash attention),
   then (after 3.) larger batches and other settings while --budget-s lasts.
2. Attention: BERT-base's shape (batch x 512 x 12 heads x 64, bfloat16, a padding mask) forward + backward through
   `fused_attention.attend`'s cuDNN path and its XLA path: max abs difference of outputs and gradients, and ms
   per call of each (median of 20 after 3 warm-ups); beside them cuDNN given the padding as key lengths instead of
   the bias attend builds, and cuDNN without a mask. On a host without cuDNN only the XLA path runs. Then
   tests/test_fused_attention.py on the device (its cuDNN cases run only where a CUDA GPU is).
3. Generation: GPT-2 small (random weights, bfloat16), 128 greedy tokens at batch 1 and 8, its layers apart
   (`layer_loop` 'auto') and in their loop ('scan'): tokens/s, the first call's seconds (compile included), and
   batch 1 against the memory-bandwidth bound (weight bytes per token over the device's copy bandwidth, measured
   here); beside it transformers' `generate` of a GPT-2 small of the same shape and dtype on the same device
   (PyTorch, in its own process), when torch is installed.
4. The layer loop's break-even (benchmarks/layer_loop.py): BERT-base forward and gradient at 32 x 128, bfloat16,
   loop against unrolled: how many runs of a shape pay back the unrolled compile (`layers.UNROLL_MIN_RUNS`).
5. Where a step's time goes: the GPT-2 and BERT-base steps without attention dropout under jax.profiler (`jaxssl.bench
   --profile`), the device's kernels summed by name from the trace: the 20 largest, and the shares of matmuls,
   attention, other fusions and copies, to say what stands between the measured MFU and the target.

One JSON line per measurement, also written to --out; a failed check prints its error's last lines and the
others still run. The device's image has jax (0.11.2 on 2026-12-04, not the pinned 0.10.2), flax, optax and torch
but lacks ml_collections, zstandard, grain and grain's array-record, dm-tree and portpicker: carry them as cp312
wheels (../.library/device/README.md says how; flax 0.12.8 fails to import under jax 0.11.2, so use the image's).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

BERT_BASE = ['--config', 'configs/bert.py:base', '--config.data.seq_len=512', '--config.data.max_predictions=77',
             '--config.tokenizer.vocab_size=30522']
GPT2_SMALL = ['--config', 'configs/gpt.py:small', '--config.tokenizer.vocab_size=50257']
NO_ATTENTION_DROPOUT = ['--config.model.attention_dropout_rate=0.0']
# (name, bench flags): the two train steps at their defaults first (layers unrolled: `layer_loop` 'auto' on
# GPU), then other settings (BENCHMARKS.md §23 has the first GPU's figures).
TRAIN_STEPS = (
    ('bert_base_seq512_b32', BERT_BASE + ['--config.train.batch_size=32']),
    ('bert_base_seq512_b32_cudnn', BERT_BASE + ['--config.train.batch_size=32'] + NO_ATTENTION_DROPOUT),
    ('gpt2_small_seq1024_b16', GPT2_SMALL + ['--config.train.batch_size=16']),
    ('gpt2_small_seq1024_b16_cudnn', GPT2_SMALL + ['--config.train.batch_size=16'] + NO_ATTENTION_DROPOUT),
    ('bert_base_seq512_b128_cudnn', BERT_BASE + ['--config.train.batch_size=128'] + NO_ATTENTION_DROPOUT),
    ('gpt2_small_seq1024_b64_cudnn', GPT2_SMALL + ['--config.train.batch_size=64'] + NO_ATTENTION_DROPOUT),
    ('gpt2_small_seq1024_b16_cudnn_scan', GPT2_SMALL + ['--config.train.batch_size=16',
                                                        '--config.model.layer_loop=scan'] + NO_ATTENTION_DROPOUT),
    ('gpt2_small_seq1024_b16_cudnn_xla_flags', GPT2_SMALL + ['--config.train.batch_size=16'] + NO_ATTENTION_DROPOUT,
     {'XLA_FLAGS': '--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_enable_triton_gemm=false'}),
)
SMOKE_TRAIN_STEPS = (
    ('bert_tiny', ['--config', 'configs/bert.py:tiny', '--config.train.batch_size=4']),
    ('gpt_tiny_cudnn', ['--config', 'configs/gpt.py:tiny', '--config.train.batch_size=4'] + NO_ATTENTION_DROPOUT),
)


def _failure(name: str, what: str, stderr: str) -> dict:
  tail = stderr.strip().splitlines()[-15:]
  print(f'--- {name} failed ({what}):\n' + '\n'.join(tail), flush=True)
  return dict(check=name, error=(tail or ['?'])[-1][:300])


def train_step(name: str, flags: list[str], steps: int, timeout: float, env: dict | None = None) -> dict:
  """One `python -m jaxssl.bench` run in bfloat16 (its own process, with `env` added): its JSON line, named."""
  cmd = [sys.executable, '-m', 'jaxssl.bench', *flags, '--config.model.dtype=bfloat16', '--steps', str(steps)]
  # The child takes the GPU's memory as jax does by default; this process does not preallocate (main).
  child_env = {k: v for k, v in os.environ.items() if k != 'XLA_PYTHON_CLIENT_PREALLOCATE'} | (env or {})
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout,
                         env=child_env)
  except subprocess.TimeoutExpired as e:
    return _failure(name, f'over {timeout:.0f} s', e.stderr.decode() if isinstance(e.stderr, bytes) else '')
  if out.returncode != 0:
    return _failure(name, f'status {out.returncode}', out.stderr)
  return dict(check=name, **json.loads(out.stdout.strip().splitlines()[-1]))


def _median_ms(fn, *args, warmup: int = 3, rounds: int = 20) -> float:
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return round(statistics.median(times) * 1e3, 3)


def attention(batch: int, length: int, heads: int = 12, head_dim: int = 64) -> dict:
  """cuDNN against XLA on one attention's forward + backward: agreement and speed."""
  import jax
  import jax.numpy as jnp
  from jaxssl.models import fused_attention
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, g = (jax.random.normal(key, (batch, length, heads, head_dim), jnp.bfloat16) for key in keys)
  # Padding: row b attends its first length - 16 * b keys (as a BERT batch of unequal sentences).
  valid = jnp.arange(length)[None] < (length - 16 * jnp.arange(batch))[:, None]
  mask = valid[:, None, None, :]

  def fwd_bwd(path):
    def loss(q, k, v):
      out = fused_attention.attend(q, k, v, implementation=path, mask=mask)
      return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32)), out
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  row = dict(check='attention_fwd_bwd', shape=[batch, length, heads, head_dim], dtype='bfloat16',
             auto_path=fused_attention.resolve('auto', jnp.bfloat16))
  paths = ['xla'] + (['cudnn'] if jax.default_backend() == 'gpu' else [])
  results = {}
  for path in paths:
    step = fwd_bwd(path)
    results[path] = jax.device_get(step(q, k, v))
    row[f'{path}_ms'] = _median_ms(step, q, k, v)
  if 'cudnn' in results:
    (_, out_x), grads_x = results['xla']
    (_, out_c), grads_c = results['cudnn']
    row['max_abs_diff_out'] = float(jnp.max(jnp.abs(out_x.astype(jnp.float32) - out_c.astype(jnp.float32))))
    row['max_abs_diff_grads'] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                                    for a, b in zip(grads_x, grads_c))
    row['max_abs_grad'] = max(float(jnp.max(jnp.abs(a.astype(jnp.float32)))) for a in grads_x)
    row['cudnn_speedup'] = round(row['xla_ms'] / row['cudnn_ms'], 2)
    # What the padding mask costs cuDNN as a bias [B, 1, T, S] (what attend passes): the same padding as key
    # lengths, and no mask at all.
    lengths = length - 16 * jnp.arange(batch, dtype=jnp.int32)
    for name, kwargs in (('cudnn_key_lengths_ms', dict(key_value_seq_lengths=lengths)), ('cudnn_no_mask_ms', {})):
      def loss(q, k, v, kwargs=kwargs):
        out = jax.nn.dot_product_attention(q, k, v, implementation='cudnn', **kwargs)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))
      row[name] = _median_ms(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), q, k, v)
  else:
    row['cudnn'] = f'not run: backend {jax.default_backend()}'
  return row


def fused_attention_tests(timeout: float) -> dict:
  """tests/test_fused_attention.py on this process's backend (the cuDNN cases run where a CUDA GPU is present):
  pytest's summary line. tests/conftest.py would pin jax to the CPU; JAX_PLATFORMS is set to this backend's."""
  import jax
  platform = {'gpu': 'cuda'}.get(jax.default_backend(), jax.default_backend())
  cmd = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_fused_attention.py']
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS=platform))
  except subprocess.TimeoutExpired:
    return _failure('fused_attention_tests', f'over {timeout:.0f} s', '')
  summary = (out.stdout.strip().splitlines() or ['?'])[-1]
  if out.returncode != 0:
    return _failure('fused_attention_tests', summary, out.stdout[-3000:])
  return dict(check='fused_attention_tests', platform=platform, summary=summary)


def device_bandwidth_bytes_per_s(size: int = 1 << 31) -> float:
  """Bytes read + written per second by a large elementwise pass over device memory (median of 10)."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((size // 4,), jnp.float32)
  seconds = _median_ms(jax.jit(lambda a: a + 1), x, rounds=10) / 1e3
  return 2 * x.nbytes / seconds


def generation_speed(variant: str, batches: list[int], new_tokens: int, layer_loop: str = 'auto') -> list[dict]:
  """Greedy decoding of a randomly initialised GPT (`configs/gpt.py:VARIANT`, bfloat16): tokens/s per batch."""
  import jax
  import numpy as np
  from flax import nnx
  from configs import gpt as gpt_configs
  from jaxssl import families
  from jaxssl.models import generation
  config = gpt_configs.get_config(variant)
  config.model.dtype = 'bfloat16'
  config.model.layer_loop = layer_loop
  model = generation.layers_apart(families.build_model(config.model, 50257, rngs=nnx.Rngs(params=0)))
  weight_bytes = generation.weight_bytes_per_token(model)
  bandwidth = device_bandwidth_bytes_per_s(1 << 24 if jax.default_backend() == 'cpu' else 1 << 31)
  rows = []
  for batch in batches:
    ids = np.random.default_rng(0).integers(1, 50257, (batch, 16)).astype(np.int32)
    lengths = np.full((batch,), 16, np.int32)

    def run():
      return jax.block_until_ready(generation.generate(model, ids, lengths, new_tokens, greedy=True)[0])

    first, times = _timed(run)
    tokens_per_s = batch * new_tokens / statistics.median(times)
    row = dict(check='generation', model=f'gpt.py:{variant} random bf16', layer_loop=layer_loop, batch=batch,
               new_tokens=new_tokens,
               tokens_per_s=round(tokens_per_s, 1), first_call_s=round(first, 2),
               weight_mb=round(weight_bytes / 2**20, 1), device_bandwidth_gb_s=round(bandwidth / 1e9, 1))
    if batch == 1:
      row['fraction_of_bandwidth_bound'] = round(tokens_per_s / (bandwidth / weight_bytes), 4)
    rows.append(row)
  return rows


def _timed(fn, rounds: int = 3) -> tuple[float, list[float]]:
  """(seconds of the first call, seconds of each later call). generation.py's `timed` is the same, but importing
  it imports real_world, which pins jax to the CPU (JAX_PLATFORMS=cpu): not here."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, times


def transformers_generation(batches: list[int], new_tokens: int, tiny: bool) -> list[dict]:
  """transformers' greedy `generate` of a random GPT-2 (small, or a tiny one) in bfloat16 on this device."""
  import torch
  from transformers import GPT2Config, GPT2LMHeadModel
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  shape = dict(n_layer=2, n_embd=64, n_head=2) if tiny else {}
  torch.manual_seed(0)
  model = GPT2LMHeadModel(GPT2Config(**shape)).to(device, torch.bfloat16).eval()
  rows = []
  for batch in batches:
    ids = torch.randint(1, 50257, (batch, 16), device=device)

    def run():
      with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
      if device == 'cuda':
        torch.cuda.synchronize()

    first, times = _timed(run)
    rows.append(dict(check='transformers_generation', model='GPT-2 small random bf16' if not tiny else 'tiny',
                     device=device, torch=torch.__version__, batch=batch, new_tokens=new_tokens,
                     tokens_per_s=round(batch * new_tokens / statistics.median(times), 1),
                     first_call_s=round(first, 2)))
  return rows


def _transformers_rows(batches: list[int], new_tokens: int, smoke: bool, timeout: float) -> list[dict]:
  """transformers_generation in its own process (PyTorch and JAX would share the device's memory otherwise)."""
  cmd = [sys.executable, __file__, '--transformers-generation', *(['--smoke'] if smoke else [])]
  try:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout,
                         env=dict(os.environ, GPU_BENCH_BATCHES=','.join(map(str, batches)),
                                  GPU_BENCH_NEW_TOKENS=str(new_tokens)))
  except subprocess.TimeoutExpired:
    return [_failure('transformers_generation', f'over {timeout:.0f} s', '')]
  if out.returncode != 0:
    return [_failure('transformers_generation', f'status {out.returncode}', out.stderr)]
  return [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith('{')]


def kernel_summary(trace_path: str, steps: int, top: int = 20) -> dict:
  """The device's kernels in a Perfetto JSON trace (jax.profiler's perfetto_trace.json.gz), summed by name: the
  `top` largest (ms per step, share) and the shares of matmuls, attention, fusions and copies. On a host without a
  device track (CPU) every complete event counts."""
  import gzip
  with gzip.open(trace_path, 'rt') as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  names = {e['pid']: str(e.get('args', {}).get('name', '')) for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device = {pid for pid, name in names.items() if 'GPU' in name or '/device:' in name}
  totals: dict = {}
  for e in events:
    if e.get('ph') == 'X' and 'dur' in e and (not device or e.get('pid') in device):
      totals[e['name']] = totals.get(e['name'], 0.0) + float(e['dur'])
  whole = sum(totals.values()) or 1.0
  kinds = {'matmul': ('gemm', 'cublas', 'cutlass', 'xmma', 'matmul', 'dot'), 'attention': ('cudnn', 'flash', 'fmha'),
           'copy': ('copy', 'memcpy', 'memset', 'transpose'), 'fusion': ('fusion', 'loop_', 'input_', 'reduce')}
  shares = dict.fromkeys([*kinds, 'other'], 0.0)
  for name, us in totals.items():
    kind = next((k for k, words in kinds.items() if any(w in name.lower() for w in words)), 'other')
    shares[kind] += us / whole
  largest = sorted(totals.items(), key=lambda kv: -kv[1])[:top]
  return dict(device_tracks=len(device), device_ms_per_step=round(whole / 1e3 / steps, 3),
              shares={k: round(v, 3) for k, v in shares.items()},
              largest=[[name[:80], round(us / 1e3 / steps, 3), round(us / whole, 3)] for name, us in largest])


def profiled_step(name: str, flags: list[str], steps: int, timeout: float) -> dict:
  """A train step's run under the profiler (train_step with --profile), summarised by kernel_summary."""
  import glob
  import tempfile
  out = tempfile.mkdtemp(prefix='jaxssl_profile_')
  row = train_step(name, flags + ['--profile', out], steps, timeout)
  traces = glob.glob(os.path.join(out, '**', 'perfetto_trace.json.gz'), recursive=True)
  if 'error' in row or not traces:
    return dict(row, error=row.get('error', f'no perfetto trace under {out}'))
  return dict(row, profile=out, **kernel_summary(traces[0], steps))


def layer_loop_break_even(smoke: bool, timeout: float) -> list[dict]:
  """benchmarks/layer_loop.py in its own process (the default memory settings): BERT-base forward and gradient
  at 32 x 128 in bfloat16, loop against unrolled, compile and run times and the runs that pay the unrolled
  compile back (what `layers.UNROLL_MIN_RUNS['gpu']` should be)."""
  flags = ['--smoke'] if smoke else ['--size', 'base', '--rows', '32', '--dtype', 'bfloat16']
  cmd = [sys.executable, os.path.join(HERE, 'layer_loop.py'), *flags]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_PYTHON_CLIENT_PREALLOCATE'}
  try:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False, timeout=timeout, env=env)
  except subprocess.TimeoutExpired:
    return [_failure('layer_loop', f'over {timeout:.0f} s', '')]
  rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{')]
  return [dict(check='layer_loop', **r) for r in rows] if out.returncode == 0 and rows else [
      _failure('layer_loop', f'exit {out.returncode}', out.stderr[-3000:])]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='gpu_bench.jsonl')
  parser.add_argument('--smoke', action='store_true', help='tiny shapes, to check the script on a CPU host')
  parser.add_argument('--steps', type=int, default=10, help='timed train steps of each model')
  parser.add_argument('--budget-s', type=float, default=300.0,
                      help='seconds after which the extra train settings (after generation) are skipped')
  parser.add_argument('--transformers-generation', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.transformers_generation:  # the child process of _transformers_rows
    batches = [int(b) for b in os.environ['GPU_BENCH_BATCHES'].split(',')]
    for row in transformers_generation(batches, int(os.environ['GPU_BENCH_NEW_TOKENS']), args.smoke):
      print(json.dumps(row), flush=True)
    return 0
  start = time.perf_counter()
  rows = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(args.out, 'a') as f:
      f.write(json.dumps(row) + '\n')

  open(args.out, 'w').close()
  # This process's attention and generation checks need little memory; jax's default would hold 75% of the GPU
  # from the first check on, and the train steps' processes ran out of it at larger batches.
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  import flax
  import jax
  import optax
  emit(dict(check='device', backend=jax.default_backend(), device=jax.devices()[0].device_kind,
            jax=jax.__version__, flax=flax.__version__, optax=optax.__version__))
  emit(attention(*((2, 64) if args.smoke else (32, 512))))
  emit(fused_attention_tests(timeout=240))
  steps = SMOKE_TRAIN_STEPS if args.smoke else TRAIN_STEPS
  train_timeout = 60 if args.smoke else 120
  for name, flags, *env in steps[:4]:
    emit(train_step(name, flags, 2 if args.smoke else args.steps, train_timeout, *env))
  new_tokens, batches = (8, [1, 8]) if args.smoke else (128, [1, 8])
  for layer_loop in ('auto', 'scan'):
    for row in generation_speed('tiny' if args.smoke else 'small', batches, new_tokens, layer_loop):
      emit(row)
  for row in _transformers_rows(batches, new_tokens, args.smoke, timeout=120):
    emit(row)
  for row in layer_loop_break_even(args.smoke, timeout=240):
    emit(row)
  # Without attention dropout; the same programs as above, so XLA's compile cache has them.
  for name, flags, *_ in (steps[1], steps[3]) if not args.smoke else steps[:2]:
    if time.perf_counter() - start > args.budget_s:
      emit(dict(check=f'{name}_profile', skipped=f'past --budget-s {args.budget_s:.0f}'))
    else:
      emit(profiled_step(f'{name}_profile', flags, 3, train_timeout))
  for name, flags, *env in steps[4:]:  # other settings, while the budget lasts
    if time.perf_counter() - start > args.budget_s:
      emit(dict(check=name, skipped=f'past --budget-s {args.budget_s:.0f}'))
    else:
      emit(train_step(name, flags, args.steps, train_timeout, *env))
  emit(dict(check='total', seconds=round(time.perf_counter() - start, 1)))
  return 0 if not any('error' in r for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())

"""Issue 21 point 5, the GPU checks in one run, for a session lent a GPU (`device`; jax with CUDA there):

    PYTHONUNBUFFERED=1 python benchmarks/gpu.py --out $OUT/gpu.jsonl      # ~5 min on an H200
    python benchmarks/gpu.py --smoke                                      # tiny shapes: checks the script on CPU

1. Train steps, bfloat16: BERT-base at seq 512 and GPT-2 small at seq 1024 (`python -m jaxssl.bench`, its JSON
   line: tokens/s, MFU against the device's dense bf16 peak in jaxssl/train/metrics.py, e.g. 989 TFLOP/s for
   H100/H200; the issue's target is >= 50%).
2. Attention: BERT-base's shape (batch x 512 x 12 heads x 64, bfloat16, a padding mask) forward + backward through
   `fused_attention.attend`'s cuDNN path and its XLA path: max abs difference of outputs and gradients, and ms
   per call of each (median of 20 after 3 warm-ups). On a host without cuDNN only the XLA path runs.
3. Generation: GPT-2 small (random weights, bfloat16), 128 greedy tokens at batch 1 and 8: tokens/s and the first
   call's seconds (compile included).

One JSON line per measurement, also written to --out. The device there lacks grain, TFDS and ml_collections:
carry them as wheels (../.library/device/README.md says how) before the run.
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

# (name, bench flags, smoke flags): the two train steps.
TRAIN_STEPS = (
    ('bert_base_seq512_bf16', ['--config', 'configs/bert.py:base', '--config.data.seq_len=512',
                               '--config.data.max_predictions=77', '--config.train.batch_size=32',
                               '--config.tokenizer.vocab_size=30522'],
     ['--config', 'configs/bert.py:tiny', '--config.train.batch_size=4']),
    ('gpt2_small_seq1024_bf16', ['--config', 'configs/gpt.py:small', '--config.train.batch_size=16',
                                 '--config.tokenizer.vocab_size=50257'],
     ['--config', 'configs/gpt.py:tiny', '--config.train.batch_size=4']),
)


def train_step(name: str, flags: list[str], steps: int) -> dict:
  """One `python -m jaxssl.bench` run in bfloat16: its JSON line, named."""
  cmd = [sys.executable, '-m', 'jaxssl.bench', *flags, '--config.model.dtype=bfloat16', '--steps', str(steps)]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    return dict(check=name, error=(out.stderr.strip().splitlines() or ['?'])[-1][:300])
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

  row = dict(check='attention_fwd_bwd', shape=[batch, length, heads, head_dim], dtype='bfloat16')
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
    row['cudnn_speedup'] = round(row['xla_ms'] / row['cudnn_ms'], 2)
  else:
    row['cudnn'] = f'not run: backend {jax.default_backend()}'
  return row


def generation_speed(variant: str, batches: list[int], new_tokens: int) -> list[dict]:
  """Greedy decoding of a randomly initialised GPT (`configs/gpt.py:VARIANT`, bfloat16): tokens/s per batch."""
  import jax
  import numpy as np
  from flax import nnx
  from configs import gpt as gpt_configs
  from jaxssl import families
  from jaxssl.models import generation
  config = gpt_configs.get_config(variant)
  config.model.dtype = 'bfloat16'
  model = families.build_model(config.model, 50257, rngs=nnx.Rngs(params=0))
  rows = []
  for batch in batches:
    ids = np.random.default_rng(0).integers(1, 50257, (batch, 16)).astype(np.int32)
    lengths = np.full((batch,), 16, np.int32)

    def run():
      return jax.block_until_ready(generation.generate(model, ids, lengths, new_tokens, greedy=True)[0])

    start = time.perf_counter()
    run()
    first = time.perf_counter() - start
    times = []
    for _ in range(3):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    rows.append(dict(check='generation', model=f'gpt.py:{variant} random bf16', batch=batch, new_tokens=new_tokens,
                     tokens_per_s=round(batch * new_tokens / statistics.median(times), 1),
                     first_call_s=round(first, 2)))
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='gpu_bench.jsonl')
  parser.add_argument('--smoke', action='store_true', help='tiny shapes, to check the script on a CPU host')
  parser.add_argument('--steps', type=int, default=10, help='timed train steps of each model')
  args = parser.parse_args(argv)
  import jax
  rows = [dict(check='device', backend=jax.default_backend(), device=jax.devices()[0].device_kind,
               jax=jax.__version__)]
  print(json.dumps(rows[-1]), flush=True)
  for name, flags, smoke_flags in TRAIN_STEPS:
    rows.append(train_step(name, smoke_flags if args.smoke else flags, 2 if args.smoke else args.steps))
    print(json.dumps(rows[-1]), flush=True)
  rows.append(attention(*((2, 64) if args.smoke else (32, 512))))
  print(json.dumps(rows[-1]), flush=True)
  for row in generation_speed('tiny' if args.smoke else 'small', [1, 8], 8 if args.smoke else 128):
    rows.append(row)
    print(json.dumps(row), flush=True)
  with open(args.out, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return 0 if not any('error' in r for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())

"""Generation speed against its limit, side by side with transformers' `generate` on the same weights.

    python benchmarks/generation.py                    # SmolLM2-135M (the real-world run's GGUF), batch 1 and 8
    python benchmarks/generation.py --decoder gemma3 --new-tokens 64 --rounds 3
    python benchmarks/generation.py --src path/to/hf_checkpoint_dir   # any decoder jaxssl.convert reads (or a .gguf)
    python benchmarks/generation.py --dtype bfloat16   # jaxssl computing in bfloat16 (the generate job's --dtype)

At batch 1 every new token reads every weight once (but the tables it reads one row of: learned positions, and the
token embeddings of a model with a separate output layer), so (those bytes) / (memory bandwidth) is the fastest a
token can come: `bandwidth_bound_tokens_per_s`. The bandwidth is measured here, on this host, by copying a 1 GiB
array (numpy; read + write bytes over the time), and the report gives jaxssl's batch-1 tokens/s as a fraction
of that bound. Both sides decode greedily from the same prompts for exactly --new-tokens tokens (no stop
token), float32 (jaxssl in --dtype if given), prompt prefill included; tokens/s is batch x new tokens / the median
of --rounds timed calls after one untimed call (jaxssl's first call, compile included, is `first_call_s`). The
greedy tokens of both sides are compared: rows equal throughout, and each row's matching prefix.

It also times the generate job as a user runs it, twice (`python -m jaxssl.generate --params P --prompt ...`):
the second start finds the compiled program in the persistent compile cache.

The weights come from benchmarks/real_world.py's run (its smollm2 / gemma3 legs install the GGUF and convert it
to RUN_DIR/params/NAME; run one first), or from --src: a HuggingFace checkpoint directory or a .gguf file, which
`python -m jaxssl.convert from-hf` converts to RUN_DIR/params/<its name> and transformers reads itself. Prints one
JSON line per batch size and writes them to --out.
"""
import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import real_world  # noqa: E402  # the installed material and its paths

PROMPTS = ['The capital of France is', 'Once upon a time', 'def fibonacci(n):', 'Le chat est',
           'In 1905, Albert Einstein', 'The best way to learn a language', 'Water boils at', 'My favourite food is']


def host_bandwidth_bytes_per_s(size: int = 1 << 30, rounds: int = 5) -> float:
  """Memory bandwidth of this host: bytes read + written per second by a large array copy (best of `rounds`)."""
  src = np.ones(size // 4, np.float32)
  dst = np.empty_like(src)
  best = float('inf')
  for _ in range(rounds):
    start = time.perf_counter()
    np.copyto(dst, src)
    best = min(best, time.perf_counter() - start)
  return 2 * src.nbytes / best


def matching_prefix(a: np.ndarray, b: np.ndarray) -> list[int]:
  """Per row, how many leading tokens two greedy generations share (float32 sums in another order can flip a
  near-tie argmax after many tokens; from there the texts differ)."""
  same = np.cumprod(a == b, axis=1)
  return [int(n) for n in same.sum(1)]


def timed(fn, rounds: int) -> tuple[float, list[float]]:
  """(seconds of the first call, seconds of each of `rounds` later calls)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, times


def jaxssl_side(params_dir: str, prompts: list[str], new_tokens: int, rounds: int, dtype: str | None = None):
  import jax
  from jaxssl.models import generation
  from jaxssl.train import checkpoint as ckpt_lib
  _, model, tokenizer = ckpt_lib.load_export(params_dir, dtype=dtype)  # as the generate job's --dtype
  model = generation.layers_apart(model)  # as the generate job passes them: each layer's weights apart, once
  bos = [] if getattr(tokenizer, 'bos_id', None) is None else [tokenizer.bos_id]
  encoded = [bos + ids for ids in tokenizer.encode(prompts)]
  lengths = np.array([len(e) for e in encoded], np.int32)
  ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, e in enumerate(encoded):
    ids[row, :len(e)] = e
  out = {}

  def run():
    tokens, _ = generation.generate(model, ids, lengths, new_tokens, greedy=True, pad_id=tokenizer.pad_id)
    out['tokens'] = np.asarray(jax.block_until_ready(tokens))

  first, times = timed(run, rounds)
  return dict(first_call_s=round(first, 2), seconds=times, tokens=out['tokens'],
              weight_bytes=generation.weight_bytes_per_token(model),
              prompt_ids=encoded, pad_id=tokenizer.pad_id)


@functools.lru_cache(maxsize=None)  # one load per run: a GGUF takes minutes to dequantise here
def transformers_reference(src: str):
  """transformers' float32 model of `src`: a checkpoint directory, or a .gguf file (dequantised)."""
  import torch
  from transformers import AutoModelForCausalLM
  if src.endswith('.gguf'):
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(src), gguf_file=os.path.basename(src),
                                                dtype=torch.float32).eval()
  return AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()


def transformers_side(src: str, prompt_ids: list[list[int]], new_tokens: int, rounds: int, pad_id: int):
  model = transformers_reference(src)
  torch = real_world.torch_threads(None)  # every core, as XLA uses
  width = max(len(p) for p in prompt_ids)
  # Left padding with an attention mask: what transformers' generate expects for a batch of decoder prompts.
  ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
  mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
  for row, p in enumerate(prompt_ids):
    ids[row, width - len(p):] = torch.tensor(p)
    mask[row, width - len(p):] = 1
  out = {}

  def run():
    with torch.no_grad():
      generated = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad_id)
    out['tokens'] = generated[:, width:].numpy()

  first, times = timed(run, rounds)
  return dict(first_call_s=round(first, 2), seconds=times, tokens=out['tokens'])


def jaxssl_env() -> dict:
  """The environment for a jaxssl job run from anywhere: this checkout on PYTHONPATH, JAX on the CPU."""
  path = os.pathsep.join(p for p in (os.path.dirname(HERE), os.environ.get('PYTHONPATH', '')) if p)
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=path)


def convert_once(src: str, params: str) -> None:
  """`python -m jaxssl.convert from-hf --src SRC --out PARAMS`, unless PARAMS already holds SRC's conversion."""
  stamp = params + '.converted_from'  # beside the export, not in it
  if os.path.exists(stamp):
    with open(stamp) as f:
      if f.read() == src:
        return
  done = subprocess.run([sys.executable, '-m', 'jaxssl.convert', 'from-hf', '--src', src, '--out', params,
                         '--overwrite'], env=jaxssl_env())
  if done.returncode:
    sys.exit(done.returncode)  # the converter printed why (a user error: one line, status 2)
  with open(stamp, 'w') as f:
    f.write(src)


def job_start_seconds(run_dir: str, params: str, dtype: str | None = None) -> list[float]:
  """Wall seconds of `python -m jaxssl.generate` (one prompt, 8 greedy tokens), twice: cold, then warm cache."""
  cmd = [sys.executable, '-m', 'jaxssl.generate', '--params', params, '--prompt', PROMPTS[0], '--greedy',
         '--max-new-tokens', '8', *(['--dtype', dtype] if dtype else [])]
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    # The job runs in the run directory: jaxssl comes from this checkout.
    subprocess.run(cmd, cwd=run_dir, check=True, capture_output=True, env=jaxssl_env())
    seconds.append(round(time.perf_counter() - start, 2))
  return seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--decoder', default='smollm2', choices=sorted(real_world.DECODERS))
  parser.add_argument('--src', help='a HuggingFace decoder directory or .gguf file instead of --decoder\'s')
  parser.add_argument('--run-dir', default=os.path.join(real_world.CACHE, 'run'))
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--out', default='generation_bench.jsonl')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'),
                      help="jaxssl's compute dtype (default: the export's, float32 for a converted checkpoint); "
                           'transformers stays float32')
  args = parser.parse_args(argv)
  if args.src:
    src = os.path.abspath(args.src)
    name = os.path.basename(src.rstrip('/')).removesuffix('.gguf')
    params = os.path.join(args.run_dir, 'params', name)
    convert_once(src, params)
  else:
    _, directory, filename = real_world.DECODERS[args.decoder]
    name, src = args.decoder, os.path.join(directory, filename)
    params = os.path.join(args.run_dir, 'params', name)
    if not os.path.exists(os.path.join(params, 'config.json')):
      print(f'no {params}: run python benchmarks/real_world.py --only {args.decoder} first', file=sys.stderr)
      return 2
  # The job first, while this process holds no model: jaxssl keeps freed host memory mapped (JAXSSL_KEEP_HOST_MEMORY),
  # so after a 1.5B decoder's batches it would still hold ~14 GB beside the job's own.
  starts = job_start_seconds(args.run_dir, f'params/{name}', args.dtype)
  bandwidth = host_bandwidth_bytes_per_s()
  rows = []
  for batch in (int(b) for b in args.batches.split(',')):
    prompts = (PROMPTS * batch)[:batch]
    # One model in memory at a time, and jaxssl's own two while it takes the layers apart: a 1.5B decoder is 7 GB
    # in float32, so transformers' is loaded again for each batch size.
    transformers_reference.cache_clear()
    gc.collect()
    ours = jaxssl_side(params, prompts, args.new_tokens, args.rounds, args.dtype)
    gc.collect()
    theirs = transformers_side(src, ours['prompt_ids'], args.new_tokens, args.rounds, ours['pad_id'])
    ours_tps = batch * args.new_tokens / statistics.median(ours['seconds'])
    theirs_tps = batch * args.new_tokens / statistics.median(theirs['seconds'])
    bound = bandwidth / ours['weight_bytes']
    row = dict(decoder=name, batch=batch, new_tokens=args.new_tokens, rounds=args.rounds,
               jaxssl_dtype=args.dtype or 'export',
               jaxssl_tokens_per_s=round(ours_tps, 1), transformers_tokens_per_s=round(theirs_tps, 1),
               ratio=round(ours_tps / theirs_tps, 2), jaxssl_first_call_s=ours['first_call_s'],
               transformers_first_call_s=theirs['first_call_s'],
               greedy_rows_equal=f'{int((ours["tokens"] == theirs["tokens"]).all(1).sum())}/{batch}',
               greedy_matching_prefix=matching_prefix(ours['tokens'], theirs['tokens']),
               weight_mb=round(ours['weight_bytes'] / 2**20, 1), host_bandwidth_gb_s=round(bandwidth / 1e9, 2),
               bandwidth_bound_tokens_per_s=round(bound, 1))
    if batch == 1:
      row['fraction_of_bandwidth_bound'] = round(ours_tps / bound, 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
  rows.append(dict(decoder=name, generate_job_wall_s_cold_then_cached=starts))
  print(json.dumps(rows[-1]), flush=True)
  with open(args.out, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  return 0


if __name__ == '__main__':
  sys.exit(main())

"""How many input workers a pod host needs: the tokens/s one host's input pipeline delivers against what one host
of a TPU slice consumes.

  python benchmarks/input_pipeline.py [--cases bert_base,gpt2_small] [--settings 1x0,2x0,1x1,1x2] [--out F.jsonl]

For BERT-base (MLM + NSP examples) and GPT-2 small (packed LM rows) at their configs' batch size and sequence
length, each setting THREADSxWORKERS runs `python -m jaxssl.bench --pipeline` in a fresh process over the real
corpus (PTB unless --corpus) with a sentencepiece tokenizer trained once (--vocab-size pieces: PTB supports no
more than ~7.7k; the pipeline's cost per token barely depends on it). The consumption side comes from the
model's training FLOPs per token (the same formula as the MFU figure, at the real vocabulary) on one host of
--slice (v5e-256: 64 hosts of 4 chips, 197 TFLOP/s bf16 each) at --mfu. The summary divides the two: workers
needed = consumption / tokens/s of one core (the 1x0 setting: one reading thread keeps one core busy), rounded
up. Worker processes are counted as one core each although one may overlap its reading with its hand-off (the
1x1 setting can exceed 1x0 on an idle 2-core machine): the estimate errs on the side of enough workers.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# name: (config, real vocabulary for the FLOPs, timed batches)
CASES = {'bert_base': ('configs/bert.py:base', 30522, 20), 'gpt2_small': ('configs/gpt.py:small', 50257, 4)}
# slice: (hosts, chips per host, peak bf16 FLOP/s per chip)
SLICES = {'v5e-256': (64, 4, 197e12), 'v5p-128': (16, 4, 459e12), 'v6e-256': (64, 4, 918e12)}


def consumption(config_spec: str, vocab: int, slice_name: str, mfu: float) -> dict:
  """Tokens/s one host of the slice trains at `mfu`, from the family's training FLOPs per token."""
  from jaxssl import config as config_lib, families  # pylint: disable=import-outside-toplevel  # after sys.path
  config = config_lib.load_config(config_spec)
  flops = families.flops_per_token(config.model, vocab, config.data.seq_len, config.data.max_predictions)
  _, chips, peak = SLICES[slice_name]
  return {'flops_per_token': flops, 'host_tokens_per_sec_needed': round(chips * peak * mfu / flops, 1)}


def train_tokenizer(corpus: str, vocab_size: int, directory: str) -> str:
  """A sentencepiece model trained on the corpus (not timed); returns its path."""
  import ml_collections  # pylint: disable=import-outside-toplevel  # after sys.path, like the jaxssl imports
  from jaxssl.data import corpora, tokenizers  # pylint: disable=import-outside-toplevel
  sources = corpora.load_corpus(corpus)
  cfg = ml_collections.ConfigDict(dict(vocab_size=vocab_size, model_type='unigram', character_coverage=0.9995,
                                       max_training_sentences=200_000))
  tok = tokenizers.get_or_train_tokenizer(directory, lambda: corpora.iter_sentences(sources['train'], 200_000), cfg)
  return tok.model_path


def run_setting(config_spec: str, batches: int, threads: int, workers: int, tokenizer: str, corpus: str) -> dict:
  cmd = [sys.executable, '-m', 'jaxssl.bench', '--config', config_spec, '--pipeline',
         '--pipeline-batches', str(batches), '--tokenizer', tokenizer, f'--config.data.corpus={corpus}',
         f'--config.data.num_threads={threads}', f'--config.data.num_workers={workers}']
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  lines = [line for line in out.stdout.splitlines() if line.startswith('{')]
  if out.returncode or not lines:
    raise SystemExit(f'{" ".join(cmd)} failed:\n{out.stderr[-3000:]}')
  return json.loads(lines[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--settings', default='1x0,2x0,1x1,1x2', help='THREADSxWORKERS, comma-separated')
  parser.add_argument('--corpus', default='ptb')
  parser.add_argument('--vocab-size', type=int, default=4000)
  parser.add_argument('--slice', default='v5e-256', choices=sorted(SLICES))
  parser.add_argument('--mfu', type=float, default=0.5)
  parser.add_argument('--out', default='')
  args = parser.parse_args()
  settings = [tuple(int(x) for x in s.split('x')) for s in args.settings.split(',')]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = train_tokenizer(args.corpus, args.vocab_size, tmp)
    for case in args.cases.split(','):
      spec, vocab, batches = CASES[case]
      need = consumption(spec, vocab, args.slice, args.mfu)
      for threads, workers in settings:
        got = run_setting(spec, batches, threads, workers, tokenizer, args.corpus)
        row = {'case': case, 'threads': threads, 'workers': workers, 'cpu_cores_here': os.cpu_count(),
               'slice': args.slice, 'mfu': args.mfu, **need, **got}
        rows.append(row)
        print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:  # a local results file of the benchmark's user
      f.writelines(json.dumps(r) + '\n' for r in rows)
  print('\ncase        threads x workers   pipeline tokens/s   host needs tokens/s   workers needed')
  for case in args.cases.split(','):
    one_core = [r for r in rows if r['case'] == case and (r['threads'], r['workers']) == (1, 0)]
    for r in (r for r in rows if r['case'] == case):
      print(f"{case:<12}{r['threads']:>7} x {r['workers']:<10}{r['pipeline_tokens_per_sec']:>18,.0f}"
            f"{r['host_tokens_per_sec_needed']:>22,.0f}")
    if one_core:
      r = one_core[0]
      print(f"{case}: one core delivers {r['pipeline_tokens_per_sec']:,.0f} tokens/s; a {args.slice} host "
            f"at {args.mfu:.0%} MFU needs {r['host_tokens_per_sec_needed']:,.0f}: --config.data.num_workers="
            f"{math.ceil(r['host_tokens_per_sec_needed'] / r['pipeline_tokens_per_sec'])}")


if __name__ == '__main__':
  main()

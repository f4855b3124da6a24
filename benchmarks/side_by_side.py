"""Runs jaxssl.bench and the reference scripts of ../shared/bench/ alternately (A B A B ...) and prints ratios.

  python benchmarks/side_by_side.py --case bert_small --rounds 2 \\
      --flax-python /tmp/hfflax/bin/python --torch-python /tmp/torchvenv/bin/python

Each case pairs one jaxssl.bench command with the reference command(s) for the same shapes; every run prints one
JSON line, all of which go to --out (JSON lines) with the case, round and command. The summary is the median
tokens/s of each side and jaxssl's ratio to each reference. Absolute figures from different sessions on shared
machines are not comparable; ratios within one run are what BENCHMARKS.md records.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, '..', 'shared', 'bench')

# case: (jaxssl.bench arguments, {reference name: (venv, script arguments)})
CASES = {
    'bert_small': (['--config', 'configs/bert.py:small', '--config.train.batch_size=32',
                    '--config.tokenizer.vocab_size=30522'],
                   {'hf_flax': ('flax', ['hf_flax_bert.py', '--config', 'small']),
                    'hf_torch': ('torch', ['hf_torch_bert.py', '--config', 'small']),
                    'hf_torch_bf16': ('torch', ['hf_torch_bert.py', '--config', 'small', '--bf16'])}),
    'bert_base': (['--config', 'configs/bert.py:base', '--config.train.batch_size=8',
                   '--config.tokenizer.vocab_size=30522'],
                  {'hf_flax': ('flax', ['hf_flax_bert.py', '--config', 'base'])}),
    'gpt2_small': (['--config', 'configs/gpt.py:small', '--config.train.batch_size=8', '--config.data.seq_len=256',
                    '--config.tokenizer.vocab_size=50257'],
                   {'hf_torch': ('torch', ['hf_torch_gpt2.py', '--config', 'small']),
                    # The shared script has no bfloat16 flag; this wrapper of it runs the forward under autocast.
                    'hf_torch_bf16': ('torch', [os.path.join(REPO, 'benchmarks', 'hf_torch_gpt2_bf16.py'),
                                                '--config', 'small'])}),
}


def last_json(text: str) -> dict:
  for line in reversed(text.strip().splitlines()):
    if line.startswith('{'):
      return json.loads(line)
  raise RuntimeError(f'no JSON line in the output:\n{text[-2000:]}')


def run(cmd, timeout):
  start = time.time()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  if proc.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}')
  row = last_json(proc.stdout)
  row['wall_s'] = round(time.time() - start, 1)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--case', action='append', choices=sorted(CASES), help='repeatable; default all')
  parser.add_argument('--rounds', type=int, default=3,
                      help='A B rounds per case; the median of 3 survives one dipped round (this host: ~1 in 3)')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--skip', action='append', default=[], help='reference names to leave out, e.g. hf_torch_bf16')
  parser.add_argument('--flax-python', default=sys.executable, help='python of the HF Flax venv (transformers 4.57)')
  parser.add_argument('--torch-python', default=sys.executable, help='python of the HF PyTorch venv')
  parser.add_argument('--jaxssl-arg', action='append', default=[], metavar='ARG',
                      help='extra jaxssl.bench argument, repeatable, e.g. --jaxssl-arg=--config.model.remat=dots')
  parser.add_argument('--out', default='side_by_side.jsonl')
  parser.add_argument('--timeout', type=int, default=1800, help='seconds per run')
  args = parser.parse_args()
  pythons = {'flax': args.flax_python, 'torch': args.torch_python}
  summary = {}
  with open(args.out, 'a') as out:
    for case in args.case or sorted(CASES):
      ours_args, refs = CASES[case]
      refs = {k: v for k, v in refs.items() if k not in args.skip}
      cmds = {'jaxssl': [sys.executable, '-m', 'jaxssl.bench', *ours_args, *args.jaxssl_arg, '--steps',
                         str(args.steps)]}
      for name, (venv, script) in refs.items():
        cmds[name] = [pythons[venv], os.path.join(SHARED, script[0]), *script[1:], '--steps', str(args.steps)]
      rates = {name: [] for name in cmds}
      for rnd in range(args.rounds):
        for name, cmd in cmds.items():
          row = run(cmd, args.timeout)
          rates[name].append(row['tokens_per_sec'])
          out.write(json.dumps({'case': case, 'round': rnd, 'side': name, 'command': ' '.join(cmd), **row}) + '\n')
          out.flush()
          dtype = f' ({row["dtype"]})' if 'dtype' in row else ''  # as each side reports it (jaxssl: model.dtype=auto)
          print(f'{case} round {rnd} {name}: {row["tokens_per_sec"]} tokens/s{dtype}', flush=True)
      med = {name: statistics.median(r) for name, r in rates.items()}
      summary[case] = {'tokens_per_sec': med,
                       'ratio': {name: round(med['jaxssl'] / med[name], 2) for name in med if name != 'jaxssl'}}
      print(json.dumps({'case': case, **summary[case]}), flush=True)
  print(json.dumps({'summary': summary}), flush=True)


if __name__ == '__main__':
  main()

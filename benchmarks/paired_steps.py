"""Times config variants of one train step in one process, alternating step by step, and prints paired ratios.

  python benchmarks/paired_steps.py configs/bert.py:small --config.train.batch_size=32 \\
      -- --config.model.final_layer_subset=false -- --config.model.final_layer_subset=true

Arguments before the first `--` are the config and the overrides every variant shares; each `--` group after it is
one variant's overrides. All variants are compiled first, then stepped in turn (the order reversed every round), so
the slow drifts of a shared host hit them alike; the summary is each variant's median step time and the median of
its per-round speed ratio against the first variant. On the 2-core CI host the variant built first ran 6-10% faster
whatever it held: run both orders before trusting a few percent.
"""
import os
import statistics
import sys
import time

import jaxssl  # noqa: F401  (first: its import-time host memory setting)
import jax

from jaxssl import bench
from jaxssl import config as config_lib


def build(spec, overrides):
  """(compiled step, state, batch, mesh, tokens per step) for `spec` + `overrides` (bench.compiled_step)."""
  config = config_lib.load_config(spec)
  config_lib.parse_overrides(config, overrides)
  compiled, state, batch, mesh, _ = bench.compiled_step(config)
  return compiled, state, batch, mesh, config.train.batch_size * config.data.seq_len


def main(argv):
  groups = [[]]
  for arg in argv:
    if arg == '--':
      groups.append([])
    else:
      groups[-1].append(arg)
  if not groups[0] or len(groups) < 2:
    sys.exit(__doc__)
  spec, common = groups[0][0], groups[0][1:]
  rounds = int(os.environ.get('ROUNDS', 8))
  runs = []
  for overrides in groups[1:]:
    compiled, state, batch, mesh, tokens = build(spec, common + overrides)
    runs.append({'name': ' '.join(overrides) or '(shared overrides only)', 'step': compiled, 'state': state,
                 'batch': batch, 'mesh': mesh, 'tokens': tokens, 'times': []})
  for r in range(rounds):
    for run in runs if r % 2 == 0 else runs[::-1]:
      with jax.set_mesh(run['mesh']):
        start = time.perf_counter()
        run['state'], metrics = run['step'](run['state'], run['batch'])
        jax.block_until_ready(metrics)
        run['times'].append(time.perf_counter() - start)
  first = runs[0]['times']
  for run in runs:
    ratios = [a / b for a, b in zip(first, run['times'])]
    median = statistics.median(run['times'])
    print(f"{run['name']}: median step {median:.3f} s ({run['tokens'] / median:.1f} tokens/s), speed vs the first "
          f"variant {statistics.median(ratios):.3f}x (rounds {min(ratios):.3f}-{max(ratios):.3f})", flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

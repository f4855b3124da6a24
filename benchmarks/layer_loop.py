"""Where unrolling the layer stack pays, on this host (the figures behind `layers.UNROLL_MIN_RUNS`):

    python benchmarks/layer_loop.py                          # BERT-base and MiniLM shapes, float32 (~4 min, 2 cores)
    python benchmarks/layer_loop.py --size base --rows 32 --dtype bfloat16     # e.g. on a GPU
    python benchmarks/layer_loop.py --smoke                  # tiny shapes, seconds

For a BERT body with a classification head, each program (a forward pass as dev and evaluation batches run it, and
a gradient with dropout as a fine-tuning step runs it) is compiled (`jit(...).lower(...).compile()`, no compile
cache) and timed (median of --rounds runs) with the layers in XLA's loop (`layer_loop=scan`) and unrolled. One
JSON line per (program, size, shape) with both compile and run times and `break_even_runs`: how many runs of that
shape the unrolled program needs before its faster runs pay back its longer compile (null when it is not faster).
BENCHMARKS.md §24 has this host's figures.
"""
import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {'base': (12, 768, 12, 3072), 'mini': (6, 384, 12, 1536), 'tiny': (2, 64, 2, 128)}  # layers, width, heads, mlp


def measure(size: str, rows: int, length: int, dtype: str, rounds: int) -> list[dict]:
  """Both programs, both loops, at one shape: JSON-ready rows."""
  import jax  # noqa: PLC0415 (after argparse: --help stays instant)
  import jax.numpy as jnp  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jaxssl import mesh as mesh_lib  # noqa: PLC0415
  from jaxssl.tasks.model import task_loss  # noqa: PLC0415
  from jaxssl.train import finetune, state as state_lib  # noqa: PLC0415
  layers, width, heads, mlp = SIZES[size]
  ids = jnp.ones((rows, length), jnp.int32)
  batch = dict(input_ids=ids, token_type_ids=ids * 0, attention_mask=ids, labels=jnp.zeros((rows,), jnp.int32))
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  jax.jit(lambda x: x + 1).lower(ids).compile()  # the process's first compile carries set-up costs: not timed
  timings = {}
  for loop in ('scan', 'unrolled'):
    cfg = ml_collections.ConfigDict(dict(
        name='bert', num_layers=layers, hidden_size=width, num_heads=heads, intermediate_size=mlp, max_position=512,
        type_vocab_size=2, layer_loop=loop, remat='dots', scan_layers=True, dtype=dtype, dropout_rate=0.1,
        attention_dropout_rate=0.1))
    setup = finetune.task_model_setup(cfg, 30522, 'classification', 3, mesh)
    params = state_lib.init_params(setup)

    def forward(p, b, graphdef=setup.graphdef):
      return nnx.merge(graphdef, p)(b['input_ids'], b['token_type_ids'], b['attention_mask'])

    def gradient(p, b, graphdef=setup.graphdef):
      def loss(p):
        out = nnx.merge(graphdef, p)(b['input_ids'], b['token_type_ids'], b['attention_mask'],
                                     dropout_rng=jax.random.key(0))
        return task_loss('classification', out, b)[0]
      return jax.grad(loss)(p)

    for name, fn in (('forward', forward), ('gradient', gradient)):
      start = time.perf_counter()
      compiled = jax.jit(fn).lower(params, batch).compile()
      compile_s = time.perf_counter() - start
      jax.block_until_ready(compiled(params, batch))
      runs = []
      for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batch))
        runs.append(time.perf_counter() - start)
      timings[name, loop] = (compile_s, statistics.median(runs))
  out = []
  for name in ('forward', 'gradient'):
    (scan_compile, scan_run), (unrolled_compile, unrolled_run) = timings[name, 'scan'], timings[name, 'unrolled']
    gain = scan_run - unrolled_run
    out.append(dict(program=name, size=size, shape=f'{rows}x{length}', dtype=dtype, backend=jax.default_backend(),
                    loop_compile_s=round(scan_compile, 2), loop_run_ms=round(scan_run * 1e3, 2),
                    unrolled_compile_s=round(unrolled_compile, 2), unrolled_run_ms=round(unrolled_run * 1e3, 2),
                    unrolled_speedup=round(scan_run / unrolled_run, 3),
                    break_even_runs=max(0, round((unrolled_compile - scan_compile) / gain)) if gain > 0 else None))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--size', action='append', choices=sorted(SIZES), help='body size (repeatable)')
  parser.add_argument('--rows', type=int, action='append', help='batch rows (repeatable); length --length')
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--smoke', action='store_true', help='the tiny size at 4 x 16, 2 rounds')
  parser.add_argument('--out', help='also append the JSON lines to this file')
  args = parser.parse_args(argv)
  if args.smoke:
    cases, args.length, args.rounds = [('tiny', 4)], 16, 2
  else:
    cases = [(s, r) for s in (args.size or ['base', 'mini']) for r in (args.rows or [6, 32])]
  for size, rows in cases:
    for row in measure(size, rows, args.length, args.dtype, args.rounds):
      line = json.dumps(row)
      print(line, flush=True)
      if args.out:
        with open(args.out, 'a') as f:
          f.write(line + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())

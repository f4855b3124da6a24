"""Pretraining job.

  python -m jaxssl.pretrain --config configs/bert.py:tiny --workdir DIR [--config.key=value ...]
  python -m jaxssl.pretrain --config configs/bert.py:large --compile-only --topology v5e-256   # will it fit?

Resumes by itself when DIR holds a checkpoint. Mistakes in the config, corpus or workdir end with one line
on stderr and exit status 2.
"""
import argparse
import os
import sys

from jaxssl import config as config_lib
from jaxssl import paths
from jaxssl import runtime
from jaxssl.errors import exit_on_user_error, stop_on_sigterm_while_starting


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.pretrain', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='configs/FILE.py:VARIANT')
  parser.add_argument('--workdir', help='checkpoints, tokenizer, metrics.jsonl, TensorBoard events: a local folder '
                      'or a bucket (gs://BUCKET/run)')
  parser.add_argument('--compile-only', action='store_true',
                      help='compile the train step for --topology and report per-device memory and FLOPs; no training')
  parser.add_argument('--topology', default='cpu:1',
                      help='with --compile-only: a TPU slice (v5e-256, v4-32, v5p-128, v6e-64; needs libtpu) or cpu:N')
  parser.add_argument('--device-memory-gib', type=float, default=None,
                      help='with --compile-only: memory per device to check against (default: the chip\'s)')
  args, config = config_lib.parse_job_args(parser, argv)
  if args.compile_only:
    compile_only(config, args)
    return
  if not args.workdir:
    parser.error('the following arguments are required: --workdir')
  stop_on_sigterm_while_starting()  # a preemption notice before the first step: exit 0, nothing to save yet
  runtime.check_workdir(args.workdir)
  args.workdir = paths.absolute(args.workdir)
  runtime.setup(args)
  from jaxssl.train import loop, workdir_lock  # after runtime setup: jax-heavy imports initialise nothing early
  with workdir_lock.hold(args.workdir, job='pretrain'):  # one job per workdir: a second one refuses
    loop.run_pretraining(config, args.workdir)


def compile_only(config, args) -> None:
  """Compiles for the target slice on this machine (no accelerator, no data) and reports whether it fits."""
  import re
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the TPU slice is laid out by libtpu's compile-only client
  import jax
  cpu = re.fullmatch(r'cpu:(\d+)', args.topology)
  if cpu:
    jax.config.update('jax_num_cpu_devices', int(cpu.group(1)))
  runtime.setup(None)
  from jaxssl.train import compile_only as compile_lib
  report = compile_lib.compile_report(config, args.topology, config.tokenizer.vocab_size,
                                      args.device_memory_gib * 2**30 if args.device_memory_gib else None)
  compile_lib.print_report(report)
  compile_lib.check_fits(report)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

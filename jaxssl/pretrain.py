"""Pretraining job.

  python -m jaxssl.pretrain --config configs/bert.py:tiny --workdir DIR [--config.key=value ...]

Resumes by itself when DIR holds a checkpoint. Mistakes in the config, corpus or workdir end with one line
on stderr and exit status 2.
"""
import argparse
import sys

from jaxssl import config as config_lib
from jaxssl import runtime
from jaxssl.errors import exit_on_user_error


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.pretrain', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='configs/FILE.py:VARIANT')
  parser.add_argument('--workdir', required=True, help='checkpoints, tokenizer, metrics.jsonl, TensorBoard events')
  args, config = config_lib.parse_job_args(parser, argv)
  runtime.setup()
  from jaxssl.train import loop  # after runtime setup: importing jax-heavy modules initialises nothing early
  loop.run_pretraining(config, args.workdir)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

"""Fine-tuning job: a pre-trained body from exported params, a new head, a labelled task.

  python -m jaxssl.finetune --config configs/finetune.py:TASK --config.init_from=PARAMS --workdir DIR \
      [--config.task.train=FILE --config.task.dev=FILE] [--config.key=value ...]

Dev metrics go to DIR/metrics.jsonl; the best checkpoint (by task.best_metric) is exported to DIR/export.
DIR, PARAMS and the task files may be local or in a bucket (gs://BUCKET/...): nothing else is written.
"""
import argparse
import sys

from jaxssl import config as config_lib
from jaxssl import paths
from jaxssl import runtime
from jaxssl.errors import exit_on_user_error, stop_on_sigterm_while_starting


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.finetune', description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True, help='configs/finetune.py:TASK')
  parser.add_argument('--workdir', required=True)
  args, config = config_lib.parse_job_args(parser, argv)
  stop_on_sigterm_while_starting()  # a preemption notice before the first step: exit 0, nothing to save yet
  runtime.check_workdir(args.workdir)
  args.workdir = paths.absolute(args.workdir)
  runtime.setup(args)
  from jaxssl.train import export_config, finetune, workdir_lock
  # Mistakes in the config or the params are refused before the workdir lock makes DIR: nothing is left behind.
  finetune.check_config(config)
  export_config.read_export_config(config.init_from)
  with workdir_lock.hold(args.workdir, job='finetune'):  # one job per workdir: a second one refuses
    finetune.run_finetuning(config, args.workdir)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

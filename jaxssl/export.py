"""Export job: params only (no optimizer state), with the model config and the tokenizer.

  python -m jaxssl.export --workdir DIR --out PARAMS [--step N] [--overwrite]

Exports are read back by `jaxssl.train.checkpoint.load_export` (or `jaxssl.load`).
"""
import argparse
import json
import sys

from jaxssl import config as config_lib
from jaxssl import paths
from jaxssl import runtime
from jaxssl import storage
from jaxssl.errors import UserError, exit_on_user_error


def checkpoint_directory(workdir: str) -> str:
  """Where a run's checkpoints are: its config's checkpoint.directory (e.g. a bucket), else WORKDIR/checkpoints."""
  config_file = storage.join(workdir, 'config.json')
  saved = json.loads(storage.read_text(config_file)) if storage.exists(config_file) else {}
  return saved.get('checkpoint', {}).get('directory') or storage.join(workdir, 'checkpoints')


def export(workdir: str, out: str, *, step: int | None = None, overwrite: bool = False) -> int:
  """Writes the params of checkpoint `step` (default: the newest) to `out`; returns the step."""
  # Imported here, after runtime.setup (main): jax must not start before the compile cache and the
  # multi-process client are configured.
  import jax
  from jaxssl import families
  from jaxssl import mesh as mesh_lib
  from jaxssl.data import tokenizers
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
  directory = checkpoint_directory(workdir)
  if not storage.isdir(directory):
    raise UserError(f'{workdir} has no checkpoints ({directory}): pass the --workdir of a pretraining run')
  checkpointer = ckpt_lib.Checkpointer(workdir, read_only=True, directory=directory)
  steps = checkpointer.manager.all_steps()
  if not steps:
    raise UserError(f'{workdir} has no finished checkpoint yet: train longer or wait for the first save')
  step = max(steps) if step is None else step
  if step not in steps:
    raise UserError(f'{workdir} has no checkpoint at step {step}: choose one of {sorted(steps)}')
  meta = checkpointer.read_meta(step)
  ckpt_lib.check_format(meta, f'checkpoint {step} in {directory}')
  config = config_lib.from_json(json.dumps(meta['config']))
  # Before any writing: a workdir without one is a UserError (images and audio have none).
  tokenizer = tokenizers.load_tokenizer(workdir) if families.reads_text(config.model) else None
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  setup = state_lib.setup_model(config.model, meta['vocab_size'], mesh)
  params = checkpointer.restore_params(step, setup.abstract_params)
  export_config = {**meta['config'], 'vocab_size': meta['vocab_size'], 'exported_from': {'workdir': workdir,
                                                                                          'step': step}}
  ckpt_lib.write_export(out, params, json.dumps(export_config, indent=2, sort_keys=True), tokenizer,
                        overwrite=overwrite)
  checkpointer.close()
  if jax.process_index() == 0:
    print(f'exported step {step} of {workdir} to {out} ({state_lib.param_count(params) / 1e6:.2f}M params)')
  return step


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.export', description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--step', type=int, default=None)
  parser.add_argument('--overwrite', action='store_true')
  runtime.add_distributed_args(parser)
  args = parser.parse_args(argv)
  args.workdir, args.out = paths.absolute(args.workdir), paths.absolute(args.out)
  runtime.setup(args)
  export(args.workdir, args.out, step=args.step, overwrite=args.overwrite)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

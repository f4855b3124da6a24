"""Evaluate job: scores fine-tuned exports on a task file, or a suite of tasks (e.g. all of GLUE).

  python -m jaxssl.evaluate --config configs/eval.py:task --config.params=DIR/export --out results.json

Writes `results.json` ({"tasks": {name: {metric: value}}, "average": ...}) and prints a table; the average
counts a task with two metrics (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman) as their mean, as GLUE.
"""
import argparse
import json
import sys

from jaxssl import config as config_lib
from jaxssl import runtime
from jaxssl.errors import UserError, exit_on_user_error


def evaluate_export(path: str, data: str, batch_size: int, mesh):
  """(metrics, the fine-tune run's task config) of one fine-tuned export on `data` (default: its dev file)."""
  import ml_collections
  from jaxssl.data import tasks, tokenizers
  from jaxssl.models import heads
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import finetune
  from jaxssl.train import state as state_lib
  saved = ckpt_lib.read_export_config(path)
  if 'task' not in saved or 'finetune' not in saved:
    raise UserError(f'{path} is a pretraining export, not a fine-tuned one: evaluate DIR/export of '
                    'python -m jaxssl.finetune')
  info, task_cfg = saved['task'], ml_collections.ConfigDict(saved['finetune']['task'])
  data = data or task_cfg.dev
  tokenizer = tokenizers.load_tokenizer(path)
  examples = tasks.read_examples(info['kind'], data)
  seq_len = saved['finetune']['data']['seq_len']
  features, qa_infos = finetune.featurize_task(task_cfg, examples, tokenizer, seq_len, info['labels'])
  model_cfg = ml_collections.ConfigDict(saved['model'])
  setup = state_lib.setup_module(
      lambda rngs: heads.TaskModel(model_cfg, saved['vocab_size'], kind=info['kind'], num_labels=info['num_labels'],
                                   rngs=rngs), mesh)
  params = ckpt_lib.load_export_params(path, setup.abstract_params)
  outputs = finetune.make_predictor(setup, mesh, features, batch_size)(params, features)
  return finetune.dev_metrics(task_cfg, info['labels'], outputs, features, examples, qa_infos), task_cfg


def headline(name: str, metrics: dict, best_metric: str) -> float:
  """A task's single figure: the mean of its GLUE metrics for GLUE tasks, else its best-checkpoint metric."""
  from jaxssl.eval import metrics as metrics_lib
  glue = metrics_lib.GLUE_TASKS.get(name)
  keys = [k for k in (glue or ()) if k in metrics] or [best_metric]
  return sum(metrics[k] for k in keys) / len(keys)


def run(config, out: str) -> dict:
  import jax
  from jaxssl import mesh as mesh_lib
  if not config.params:
    raise UserError('pass --config.params=DIR/export (a fine-tuned export; in a suite use {task} in the path)')
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  names = list(config.tasks) or ['']
  results, headlines = {}, {}
  for name in names:
    path = config.params.replace('{task}', name)
    metrics, task_cfg = evaluate_export(path, config.data.replace('{task}', name), config.batch_size, mesh)
    key = name or task_cfg.name
    results[key] = metrics
    headlines[key] = headline(key, metrics, task_cfg.best_metric)
  report = {'tasks': results, 'headline': headlines, 'average': sum(headlines.values()) / len(headlines)}
  if jax.process_index() == 0:
    with open(out, 'w') as f:
      json.dump(report, f, indent=2, sort_keys=True)
    width = max(len(k) for k in results) + 2
    print(f'{"task":<{width}}score   metrics')
    for key, metrics in results.items():
      shown = ' '.join(f'{k}={v:.4f}' for k, v in sorted(metrics.items()))
      print(f'{key:<{width}}{headlines[key]:.4f}  {shown}')
    print(f'{"average":<{width}}{report["average"]:.4f}\nwrote {out}')
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.evaluate', description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/eval.py:task')
  parser.add_argument('--out', default='results.json')
  args, config = config_lib.parse_job_args(parser, argv)
  runtime.setup()
  run(config, args.out)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

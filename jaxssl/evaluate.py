"""Evaluate job: fine-tuned exports on a task or suite (GLUE), GPT exports on in-context learning, or word embeddings.

  python -m jaxssl.evaluate --config configs/eval.py:task --config.params=DIR/export --out results.json
  python -m jaxssl.evaluate --config configs/icl.py:sentiment --config.icl.models=A,B --out icl/results.json
  python -m jaxssl.evaluate --config configs/embeddings.py:apple --config.embeddings.model=A --out emb/results.json

Fine-tuned exports: writes `results.json` ({"tasks": {name: {metric: value}}, "headline": ..., "average": ...})
and prints a table. Exports, task files and --out may be local or in a bucket (gs://...).
A task's headline counts two metrics (MRPC, QQP: F1 and accuracy; STS-B: Pearson and Spearman) as their mean;
when every scored set is a GLUE task the average is the GLUE score (MNLI matched + mismatched count as one task).
In-context learning (a config with an `icl` section, configs/icl.py): see jaxssl/eval/icl.py (accuracy per model
and k in results.json, plus PNG plots beside it).
Contextual embeddings (a config with an `embeddings` section, configs/embeddings.py): see jaxssl/eval/embeddings.py
(cosine similarity matrices and the within/across-label gap in results.json, plus a heatmap PNG beside it).
"""
import argparse
import json
import sys
import time

from jaxssl import config as config_lib
from jaxssl import paths
from jaxssl import runtime
from jaxssl import storage
from jaxssl.errors import UserError, exit_on_user_error


def evaluate_export(path: str, data: str, batch_size: int, mesh, speed: dict | None = None):
  """({set name: metrics}, the fine-tune run's task config) of one fine-tuned export.

  Scores `data` (a file, or a split when the task reads TFDS) when given, else each of the run's
  `task.eval_sets` (MNLI: matched and mismatched), else its dev set. `speed`, when given, gets {set name:
  {'examples', 'seconds', 'examples_per_second'}} of the scoring (featurizing, compiling and predicting).
  """
  # Imported here, after runtime.setup has configured jax (as every job does).
  import ml_collections
  from jaxssl import families, tasks
  from jaxssl.data import tokenizers
  from jaxssl.models import vocab
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import finetune, layer_loop, length_buckets, predict as predict_lib
  saved = ckpt_lib.read_export_config(path)
  if 'task' not in saved or 'finetune' not in saved:
    raise UserError(f'{path} is a pretraining export, not a fine-tuned one: evaluate DIR/export of '
                    'python -m jaxssl.finetune')
  info, task_cfg = saved['task'], ml_collections.ConfigDict(saved['finetune']['task'])
  sets = {task_cfg.name: data} if data else dict(task_cfg.get('eval_sets') or {}) or {task_cfg.name: task_cfg.dev}
  tokenizer = None  # images and audio have none
  if families.reads_text(saved['model']):
    tokenizer = tokenizers.load_tokenizer(path)
    vocab.check_rows(tokenizer.vocab_size, saved['vocab_size'], path)  # more rows than ids: a padded vocabulary
  seq_len = saved['finetune']['data']['seq_len']
  # Cutting padding changes no output (train/length_buckets.py): exports of runs without buckets get them too.
  buckets = length_buckets.eval_lengths(saved['finetune']['data'].get('length_buckets', 'auto'), seq_len)
  kind = tasks.get(info['kind'])
  model_cfg = layer_loop.forward_config(ml_collections.ConfigDict(saved['model']))  # forward passes only
  setup = finetune.task_model_setup(model_cfg, saved['vocab_size'], kind.name, info['num_labels'], mesh)
  params = ckpt_lib.load_export_params(path, setup.abstract_params)
  # One forward shape per set it saves enough padding to pay for (compile_worth: each set is predicted once).
  worth = length_buckets.compile_worth(model_cfg, saved['vocab_size'], seq_len, 1) if tokenizer else 0.0
  results, predict = {}, None
  for name, source in sets.items():
    examples, _ = tasks.read_split(task_cfg, source)
    start = time.perf_counter()
    features, decode_info = kind.featurize(task_cfg, examples, tokenizer, seq_len, info['labels'])
    predict = predict or predict_lib.make_predictor(setup, mesh, features, batch_size, kind, buckets, worth)
    results[name] = kind.dev_metrics(task_cfg, info['labels'], predict(params, features), features, examples,
                                     decode_info)
    seconds = time.perf_counter() - start
    if speed is not None:
      speed[name] = {'examples': len(examples), 'seconds': round(seconds, 3),
                     'examples_per_second': round(len(examples) / max(seconds, 1e-9), 1)}
  return results, task_cfg


def headline(name: str, metrics: dict, best_metric: str) -> float:
  """A task's single figure: the mean of its GLUE metrics for GLUE tasks, else its best-checkpoint metric."""
  from jaxssl.tasks import metrics as metrics_lib
  glue = metrics_lib.GLUE_TASKS.get(name)
  keys = [k for k in (glue or ()) if k in metrics] or [best_metric]
  return sum(metrics[k] for k in keys) / len(keys)


def crosslingual_table(config, transfer: dict, mesh) -> dict:
  """{language: {'transfer': headline of the transfer export, 'baseline': headline of that language's own
  fine-tuned export, or None}} for every scored set and every `config.baselines` language.

  A baseline export is scored on its set named like the language when its run named one, else on its dev set.
  """
  table = {lang: {'transfer': score, 'baseline': None} for lang, score in transfer.items()}
  for lang, path in config.baselines.items():
    per_set, task_cfg = evaluate_export(path, '', config.batch_size, mesh)
    name = lang if lang in per_set else next(iter(per_set))
    row = table.setdefault(lang, {'transfer': None, 'baseline': None})
    row['baseline'] = headline(name, per_set[name], task_cfg.best_metric)
  return table


def run(config, out: str) -> dict:
  """Scores each export of the config (one, or one per suite task) and writes the report to `out`.

  A config with an `icl` section runs the in-context learning evaluation instead, one with an `embeddings`
  section the contextual-embedding analysis (`out`: a .json path or a directory; the plots go beside results.json).
  """
  import jax
  if 'icl' in config:
    from jaxssl.eval import icl
    return icl.run(config, out)
  if 'embeddings' in config:
    from jaxssl.eval import embeddings
    return embeddings.run(config, out)
  from jaxssl import mesh as mesh_lib
  from jaxssl.tasks import metrics as metrics_lib
  if not config.params:
    raise UserError('pass --config.params=DIR/export (a fine-tuned export; in a suite use {task} in the path)')
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  results, headlines, speed = {}, {}, {}
  for name in list(config.tasks) or ['']:
    path = config.params.replace('{task}', name)
    if name and '{task}' not in config.params:
      raise UserError(f'a suite of {len(config.tasks)} tasks needs one export per task: put {{task}} in '
                      f'--config.params (got {config.params!r})')
    sets_speed = {}
    per_set, task_cfg = evaluate_export(path, config.data.replace('{task}', name), config.batch_size, mesh,
                                        sets_speed)
    for set_name, metrics in per_set.items():
      key = name if name and len(per_set) == 1 else set_name
      speed[key] = sets_speed[set_name]
      results[key] = metrics
      headlines[key] = headline(key, metrics, task_cfg.best_metric)
  glue = all(k in metrics_lib.GLUE_TASKS for k in results)
  # GLUE counts MNLI matched + mismatched as one task; other suites weigh every scored set equally.
  average = metrics_lib.glue_score(results) if glue else sum(headlines.values()) / len(headlines)
  report = {'tasks': results, 'headline': headlines, 'average': average,
            'average_kind': 'GLUE score' if glue else 'mean of task scores', 'throughput': speed}
  if config.get('baselines'):
    report['crosslingual'] = crosslingual_table(config, headlines, mesh)
  if jax.process_index() == 0:
    # --out results/x.json: its folder may not exist yet (write_text makes it); gs://B/results.json: one upload.
    storage.write_text(out, json.dumps(report, indent=2, sort_keys=True))
    width = max(len(k) for k in results) + 2
    print(f'{"task":<{width}}score   metrics')
    for key, metrics in results.items():
      shown = ' '.join(f'{k}={v:.4f}' for k, v in sorted(metrics.items()))
      print(f'{key:<{width}}{headlines[key]:.4f}  {shown}')
    print(f'{"average":<{width}}{average:.4f}  ({report["average_kind"]})')
    for lang, row in report.get('crosslingual', {}).items():
      transfer, baseline = ('n/a' if v is None else f'{v:.4f}' for v in (row['transfer'], row['baseline']))
      print(f'{lang:<{width}}transfer {transfer}  in-language baseline {baseline}')
    print(f'wrote {out}')
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.evaluate', description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/eval.py:task')
  parser.add_argument('--out', default='results.json', help='results.json path (ICL, embeddings: or a directory for '
                      'it and the plots)')
  args, config = config_lib.parse_job_args(parser, argv)
  runtime.setup(args)
  run(config, paths.absolute(args.out))


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

"""Evaluation of fine-tuned exports (DIR/export of `python -m jaxssl.finetune`).

  python -m jaxssl.evaluate --config configs/eval.py:task --config.params=DIR/export --out results.json
  python -m jaxssl.evaluate --config configs/eval.py:glue --config.params='runs/{task}/export' --out results.json

A suite scores each task's export on the sets its fine-tune run names (`task.eval_sets`, else its dev set: the
TFDS validation splits for the GLUE variants; MNLI matched and mismatched). `--config.data` replaces them with
one file (or split) per task, e.g. --config.data='glue/{task}/dev.tsv' for local copies.
"""
import ml_collections

GLUE = ('cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte', 'wnli')
VARIANTS = ('task', 'glue')


def get_config(variant: str = 'task') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.params = ''          # a fine-tuned export; in a suite, '{task}' is replaced by each task's name
  c.data = ''            # the file to score; '' = the dev file the fine-tune run used; may contain '{task}'
  c.tasks = GLUE if variant == 'glue' else ()   # () = the export's own task; a list of names makes a suite
  c.batch_size = 64
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  return c

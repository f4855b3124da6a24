"""Evaluation of fine-tuned exports (DIR/export of `python -m jaxssl.finetune`).

  python -m jaxssl.evaluate --config configs/eval.py:task --config.params=DIR/export --out results.json
  python -m jaxssl.evaluate --config configs/eval.py:glue --config.params='runs/{task}/export' --out results.json

A suite scores each task's export on the sets its fine-tune run names (`task.eval_sets`, else its dev set: the
TFDS validation splits for the GLUE variants; MNLI matched and mismatched). `--config.data` replaces them with
one file (or split) per task, e.g. --config.data='glue/{task}/dev.tsv' for local copies.

Cross-lingual transfer: fine-tune on language A with the other languages' dev sets named as eval sets, then

  python -m jaxssl.evaluate --config configs/eval.py:crosslingual --config.params=runs/en/export \
      --config.baselines=zh=runs/zh/export --out results.json

scores the transfer export on every language and, for each language with a baseline (the same pretrained body
fine-tuned on that language's own training data), that export on the language's set: one table of both.
"""
import ml_collections

GLUE = ('cola', 'sst2', 'mrpc', 'qqp', 'stsb', 'mnli', 'qnli', 'rte', 'wnli')
VARIANTS = ('task', 'glue', 'crosslingual')


def get_config(variant: str = 'task') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.params = ''          # a fine-tuned export; in a suite, '{task}' is replaced by each task's name
  c.data = ''            # the file to score; '' = the dev file the fine-tune run used; may contain '{task}'
  c.tasks = GLUE if variant == 'glue' else ()   # () = the export's own task; a list of names makes a suite
  # language -> an export fine-tuned on that language (the in-language baseline row of a cross-lingual table)
  c.baselines = ml_collections.ConfigDict()
  c.batch_size = 64
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  return c

"""Sentence pairs: two texts → one class, packed [CLS] a [SEP] b [SEP] (GLUE MRPC, QQP, MNLI, QNLI, RTE, WNLI).

Everything but the reader is classification's: the same pooled head, loss and metrics.
Local files: TSV/JSONL with `text_a`, `text_b`, `label`.
"""
import dataclasses

from jaxssl.tasks import classification, files, heads
from jaxssl.tasks.base import Example


def read_file(path: str) -> list[Example]:
  """`text_a`, `text_b`, `label` rows of a TSV/JSONL file; labels as class-name strings."""
  return [Example(text=str(row['text_a']), text_b=str(row['text_b']), label=str(row['label']))
          for _, row in files.column_rows(path, ('text_a', 'text_b', 'label'), 'pair')]


KIND = dataclasses.replace(
    classification.KIND, name='pair', read_file=read_file, head_width=lambda n: heads.at_least_one_label(n, 'pair'),
    tfds_datasets=tuple(f'glue/{n}' for n in ('mrpc', 'qqp', 'mnli', 'qnli', 'rte', 'wnli', 'ax')))

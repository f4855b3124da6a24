"""Regression: a text (or a pair) → one float, from the pooled vector (GLUE STS-B).

Local files: TSV/JSONL with `text`, `label` (a number). Loss: mean squared error. Dev metrics: Pearson and
Spearman correlation.
"""
import jax.numpy as jnp
import numpy as np

from jaxssl.errors import UserError
from jaxssl.tasks import files, heads, metrics, tfds
from jaxssl.tasks.base import Example, TaskKind, pack_texts, stack


def read_file(path: str) -> list[Example]:
  """`text`, `label` rows of a TSV/JSONL file; UserError for a label that is not a number."""
  out = []
  for n, row in files.column_rows(path, ('text', 'label'), 'regression'):
    try:
      label = float(row['label'])
    except (TypeError, ValueError):
      raise UserError(f'{path} line {n}: label {row["label"]!r} is not a number (regression needs float '
                      'labels)') from None
    out.append(Example(text=str(row['text']), label=label))
  return out


def read_tfds(split: tfds.Split) -> tuple[list[Example], list[str]]:
  """A GLUE split with float labels (STS-B); no label names."""
  return tfds.read_glue(split, float_labels=True)


def head_width(num_labels: int) -> int:
  """One output; UserError unless num_labels is 1."""
  if num_labels != 1:
    raise UserError(f'task.num_labels={num_labels} for a regression task: set --config.task.num_labels=1')
  return 1


class ScoreHead(heads.PooledHead):
  """dropout(pooled) → Dense(H, 1): scores [B]."""

  def __call__(self, sequence, pooled, attention_mask, dropout_key):
    return super().__call__(sequence, pooled, attention_mask, dropout_key)[:, 0]


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels):
  """([CLS] text [SEP] (text_b [SEP]) features with float `labels`, None)."""
  del task_cfg, labels
  rows = pack_texts(examples, tokenizer, seq_len)
  for row, e in zip(rows, examples):
    row['labels'] = np.float32(e.label)
  return stack(rows), None


def loss(outputs, batch) -> dict:
  """Squared-error sums over the batch (`example_weights` 0 ignored)."""
  w = heads.example_weights(batch, outputs.shape[0])
  err = outputs.astype(jnp.float32) - jnp.asarray(batch['labels'], jnp.float32)
  return {'loss': jnp.sum(w * jnp.square(err)), 'count': jnp.sum(w)}


def dev_metrics(task_cfg, labels, outputs, features, examples, decode_info) -> dict:
  """Pearson and Spearman correlation of the scores with the gold floats."""
  del task_cfg, labels, examples, decode_info
  preds, gold = np.asarray(outputs), features['labels']
  return {'pearson': metrics.pearson(preds, gold), 'spearman': metrics.spearman(preds, gold)}


KIND = TaskKind(
    name='regression', read_file=read_file, tfds_datasets=('glue/stsb',), read_tfds=read_tfds,
    label_set=lambda examples: [], num_labels=lambda labels, source: 1, head_width=head_width, head=ScoreHead,
    featurize=featurize, loss=loss, metric_names=lambda task_cfg, labels: ('pearson', 'spearman'),
    dev_metrics=dev_metrics)

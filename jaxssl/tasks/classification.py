"""Classification: one text → one of the training file's classes, from the pooled vector (GLUE CoLA, SST-2).

Local files: TSV/JSONL with `text`, `label`. Loss: softmax cross-entropy. Dev metrics: a GLUE task's own
(`metrics.GLUE_TASKS`, by task name), else accuracy, plus the positive class's F1 with two classes.
"""
import jax.numpy as jnp
import numpy as np

from jaxssl.errors import UserError
from jaxssl.tasks import files, heads, metrics, tfds
from jaxssl.tasks.base import Example, TaskKind, pack_texts, stack


def read_file(path: str) -> list[Example]:
  """`text`, `label` rows of a TSV/JSONL file; labels as class-name strings."""
  return [Example(text=str(row['text']), label=str(row['label']))
          for _, row in files.column_rows(path, ('text', 'label'), 'classification')]


def read_tfds(split: tfds.Split) -> tuple[list[Example], list[str]]:
  """A GLUE split; label names in the dataset's order."""
  return tfds.read_glue(split, float_labels=False)


def label_set(examples: list[Example]) -> list[str]:
  """Sorted class names of the training examples."""
  return sorted({e.label for e in examples})


def num_labels(labels: list[str], source: str) -> int:
  """The number of classes; UserError for fewer than two."""
  if len(labels) < 2:
    raise UserError(f'{source} has a single label {labels}: a classifier needs at least two')
  return len(labels)


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels: list[str]):
  """([CLS] text [SEP] (text_b [SEP]) features with class ids as `labels`, None)."""
  del task_cfg
  index = {name: i for i, name in enumerate(labels)}
  rows = pack_texts(examples, tokenizer, seq_len)
  for row, e in zip(rows, examples):
    row['labels'] = np.int32(index.get(e.label, -1))  # -1: a dev label unseen in training (never correct)
  return stack(rows), None


def loss(outputs, batch) -> dict:
  """Softmax cross-entropy sums over the batch's `labels` (-1 and `example_weights` 0 ignored)."""
  labels = jnp.asarray(batch['labels'], jnp.int32)
  total, correct, count = heads.weighted_ce(outputs, labels, heads.example_weights(batch, labels.shape[0]))
  return {'loss': total, 'correct': correct, 'count': count}


def metric_names(task_cfg, labels) -> tuple[str, ...]:
  """A GLUE task's metrics, else accuracy (and f1 with two classes)."""
  if task_cfg.name in metrics.GLUE_TASKS:
    return metrics.GLUE_TASKS[task_cfg.name]
  return ('accuracy', 'f1') if len(labels) == 2 else ('accuracy',)


def dev_metrics(task_cfg, labels, outputs, features, examples, decode_info) -> dict:
  """The `metric_names` of the argmax class against the gold ids."""
  del examples, decode_info
  preds, gold = np.argmax(outputs, -1), features['labels']
  if task_cfg.name in metrics.GLUE_TASKS:
    # GLUE metrics compare label ids; dev labels unseen in training (-1) never match.
    return metrics.glue_task_metrics(task_cfg.name, preds, gold)
  result = {'accuracy': metrics.accuracy(preds, gold)}
  if len(labels) == 2:
    result['f1'] = metrics.f1_binary(preds, gold)
  return result


KIND = TaskKind(
    name='classification', read_file=read_file, tfds_datasets=('glue/cola', 'glue/sst2'), read_tfds=read_tfds,
    label_set=label_set, num_labels=num_labels,
    head_width=lambda n: heads.at_least_one_label(n, 'classification'), head=heads.PooledHead,
    featurize=featurize, loss=loss, metric_names=metric_names, dev_metrics=dev_metrics, class_labels=True)


def accuracy_only(task_cfg, labels, outputs, features, examples, decode_info) -> dict:
  """Accuracy of the argmax class (the image and audio kinds' dev metric)."""
  del task_cfg, labels, examples, decode_info
  return {'accuracy': metrics.accuracy(np.argmax(outputs, -1), features['labels'])}


def input_classification_kind(name: str, *, read_file, what: str, featurize, input_keys: tuple[str, ...],
                              settle_body) -> TaskKind:
  """The kind of a classifier of one non-text input (an image, an utterance) into the training set's classes:
  class-folder files, a pooled head on the body's `encode` of `input_keys`, softmax cross-entropy, accuracy."""
  def read_tfds(split):
    raise UserError(f'{name} reads {what}, not through task.tfds: pass --config.task.tfds=')
  return TaskKind(
      name=name, read_file=read_file, tfds_datasets=(), read_tfds=read_tfds, label_set=label_set,
      num_labels=num_labels, head_width=lambda n: heads.at_least_one_label(n, name), head=heads.PooledHead,
      featurize=featurize, loss=loss, metric_names=lambda task_cfg, labels: ('accuracy',),
      dev_metrics=accuracy_only, input_keys=input_keys, settle_body=settle_body)

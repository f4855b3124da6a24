"""What every task kind provides (`TaskKind`), the `Example` its readers produce, and BERT's input packing."""
import dataclasses
from typing import Callable

import numpy as np

INPUT_KEYS = ('input_ids', 'token_type_ids', 'attention_mask')  # what every task model reads


@dataclasses.dataclass
class Example:
  """One labelled example; which fields are set depends on the task kind."""
  text: str = ''
  text_b: str | None = None
  label: object = None                 # str class name, or float for regression
  tokens: list | None = None           # tagging: words
  tags: list | None = None             # tagging: one tag per word
  question: str = ''                   # qa
  qid: str = ''
  answers: list | None = None          # qa: [(text, char_start)], the first one trains
  image: object = None                 # image_classification: uint8 [H, W, C]
  audio: object = None                 # audio_classification: int16 samples at 16 kHz


def _no_settings(task_cfg, train_examples, dev_examples) -> None:
  del task_cfg, train_examples, dev_examples


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """One task kind, whole: how its examples are read, featurized, predicted by its head, scored and lost.

  `task_cfg` below is the `task` section of configs/finetune.py; `labels` the label names (class names or tags;
  [] for kinds without names).
  """
  name: str
  read_file: Callable[[str], list[Example]]             # a local file → examples (UserError on a bad row)
  tfds_datasets: tuple[str, ...]                          # TFDS names read as this kind
  read_tfds: Callable                                     # tfds.Split → (examples, label names)
  label_set: Callable[[list[Example]], list[str]]         # label names seen in the training examples
  num_labels: Callable[[list[str], str], int]             # (labels, training source) → num_labels stored
  head_width: Callable[[int], int]                        # num_labels → head outputs (UserError if invalid)
  head: type                                              # nnx module: (hidden, width, *, stddev, dropout_rate, rngs)
  featurize: Callable                                     # (task_cfg, examples, tokenizer, seq_len, labels) →
                                                          #   (features {key: [N, ...]}, decode info or None)
  loss: Callable                                          # (outputs, batch) → sums {'loss', 'count'[, 'correct']}
  metric_names: Callable                                  # (task_cfg, labels) → the dev metric names, in order
  dev_metrics: Callable                                   # (task_cfg, labels, outputs, features, examples,
                                                          #   decode info) → {metric: value}
  label_keys: tuple[str, ...] = ('labels',)               # feature keys the loss reads
  model_inputs: tuple[str, ...] = ()                      # feature keys the head reads beside INPUT_KEYS
  preferred_metric: str = ''                              # default task.best_metric when reported
  class_labels: bool = False                              # one label name per example: ICL can score it
  settle_config: Callable = _no_settings                  # (task_cfg, train, dev): settings decided from data
  describe: Callable = lambda task_cfg: ''                # a note for the fine-tune banner
  input_keys: tuple[str, ...] = INPUT_KEYS                # feature keys the body's `encode` reads, in order
  settle_body: Callable = lambda task_cfg, model_cfg: None  # settings taken from the body (image size)
  metric_note: Callable = lambda names: ''                # why a metric is missing from `names`, for errors
  token_outputs: bool = False                             # outputs [B, L, ...] per token (tagging, qa)


def _truncate_pair(a: list, b: list, max_tokens: int) -> tuple[list, list]:
  """Drops tokens from the end of the longer side until the pair fits (BERT's fine-tuning truncation)."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_tokens:
    (a if len(a) >= len(b) else b).pop()
  return a, b


def pack(ids_a: list[int], ids_b: list[int] | None, tokenizer, seq_len: int) -> dict[str, np.ndarray]:
  """[CLS] a [SEP] (b [SEP]) with token types and padding, truncated to `seq_len`."""
  special = 3 if ids_b is not None else 2
  a, b = _truncate_pair(ids_a, ids_b or [], seq_len - special)
  ids = [tokenizer.cls_id, *a, tokenizer.sep_id]
  types = [0] * len(ids)
  if ids_b is not None:
    ids += [*b, tokenizer.sep_id]
    types += [1] * (len(b) + 1)
  pad = seq_len - len(ids)
  return {'input_ids': np.array(ids + [tokenizer.pad_id] * pad, np.int32),
          'token_type_ids': np.array(types + [0] * pad, np.int32),
          'attention_mask': np.array([1] * len(ids) + [0] * pad, np.int32)}


def stack(rows: list[dict]) -> dict[str, np.ndarray]:
  """Per-example feature dicts → one array per key."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def pack_texts(examples: list[Example], tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
  """`pack` of each example's text, and its text_b when it has one (a pair)."""
  ids_a = tokenizer.encode([e.text for e in examples])
  seconds = [e.text_b for e in examples if e.text_b is not None]
  ids_b = iter(tokenizer.encode(seconds) if seconds else [])
  return [pack(a, next(ids_b) if e.text_b is not None else None, tokenizer, seq_len)
          for e, a in zip(examples, ids_a)]

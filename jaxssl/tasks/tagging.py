"""Tagging: a tag per word (NER, POS, chunks), predicted at each word's first piece from the sequence output.

Local files: CoNLL (`token<TAB>tag`, blank line between sentences) or JSONL `tokens`, `tags`; TFDS conll2003
(`task.tag_feature`: ner, pos or chunks). Dev metrics: `token_accuracy` for any tag set, plus entity
precision/recall/f1 when the tags are a span scheme (BIO, IOB1, IOBES), decided from the training tags into
`task.tag_scheme` unless set.
"""
import jax.numpy as jnp
import numpy as np

from jaxssl.errors import UserError
from jaxssl.tasks import files, heads, metrics, tfds
from jaxssl.tasks.base import Example, TaskKind, pack, stack

_SCHEME_NAMES = {'bio': 'BIO', 'iob2': 'BIO', 'iob1': 'IOB1', 'iobes': 'IOBES', 'none': 'none'}


def read_file(path: str) -> list[Example]:
  """Sentences of a CoNLL file, or of a JSONL file (by its .jsonl name)."""
  return files.read_tagged_jsonl(path) if path.endswith('.jsonl') else files.read_conll(path)


def read_tfds(split: tfds.Split) -> tuple[list[Example], list[str]]:
  """CoNLL-2003 sentences tagged by `split.tag_feature`; tag names in the dataset's order."""
  features, feature = split.features, split.tag_feature
  if feature not in features:
    raise UserError(f'task.tag_feature={feature!r} is not a feature of {split.name} '
                    f'({", ".join(features.keys())}): pass --config.task.tag_feature=ner')
  names = list(features[feature].feature.names)
  out = []
  for r in tfds.records(split):
    tokens, tags = [tfds.text(t) for t in r['tokens']], [names[int(t)] for t in r[feature]]
    if len(tokens) != len(tags):
      raise UserError(f'{split.name} {split.split}: a sentence has {len(tokens)} tokens but {len(tags)} {feature} tags')
    out.append(Example(tokens=tokens, tags=tags))
  return out, names


def label_set(examples: list[Example]) -> list[str]:
  """Sorted tags of the training examples."""
  return sorted({t for e in examples for t in e.tags})


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels: list[str]):
  """(features, None): tag ids on each word's first piece (-1 elsewhere) and `word_mask` marking those pieces."""
  del task_cfg
  index = {name: i for i, name in enumerate(labels)}
  rows = []
  for e in examples:
    pieces = tokenizer.encode(e.tokens)
    ids, tags, starts = [], [], []
    for word_pieces, tag in zip(pieces, e.tags):
      word_pieces = word_pieces or [tokenizer.unk_id]
      ids += word_pieces
      tags += [index.get(tag, -1)] + [-1] * (len(word_pieces) - 1)  # a word's label sits on its first piece
      starts += [1] + [0] * (len(word_pieces) - 1)
    row = pack(ids, None, tokenizer, seq_len)
    kept = int(row['attention_mask'].sum()) - 2
    row['labels'] = np.full(seq_len, -1, np.int32)
    row['labels'][1:1 + kept] = tags[:kept]
    row['word_mask'] = np.zeros(seq_len, np.int32)  # first piece of each word that survived truncation
    row['word_mask'][1:1 + kept] = starts[:kept]
    rows.append(row)
  return stack(rows), None


def word_predictions(labels: list[str], predictions: np.ndarray, features: dict, examples: list[Example]):
  """One predicted tag per word, read at its first piece; words cut off by truncation get 'O'."""
  out = []
  for e, pred, word_mask in zip(examples, predictions, features['word_mask']):
    tags = [labels[int(p)] for p, first in zip(pred, word_mask) if first]
    out.append(tags + ['O'] * (len(e.tokens) - len(tags)))
  return out


def loss(outputs, batch) -> dict:
  """Cross-entropy sums over labelled tokens (`labels` -1 and `label_weights` 0 ignored)."""
  labels = jnp.asarray(batch['labels'], jnp.int32)
  w = batch.get('label_weights')
  w = jnp.ones(labels.shape, jnp.float32) if w is None else jnp.asarray(w, jnp.float32)
  total, correct, count = heads.weighted_ce(outputs, labels, w)
  return {'loss': total, 'correct': correct, 'count': count}


def resolve_tag_scheme(task_cfg, train_examples, dev_examples) -> str:
  """'BIO', 'IOB1', 'IOBES' or 'none': `task.tag_scheme` when set, else decided from the training tags
  (`metrics.span_scheme`). Raises UserError for an unknown name, or tags (training or dev) that the span
  scheme cannot decode."""
  wanted = task_cfg.get('tag_scheme', '')
  if wanted is None:  # --config.task.tag_scheme=none parses as None
    wanted = 'none'
  if wanted and wanted.lower() not in _SCHEME_NAMES:
    raise UserError(f'task.tag_scheme={wanted!r}: use BIO, IOB1, IOBES, none, or leave it empty to decide from the '
                    'training tags')
  train_tags = [e.tags for e in train_examples]
  scheme = _SCHEME_NAMES[wanted.lower()] if wanted else metrics.span_scheme(train_tags) or 'none'
  if scheme == 'none':
    return scheme
  for split, examples in ((task_cfg.train, train_examples), (task_cfg.dev, dev_examples)):
    bad = next((t for e in examples for t in e.tags if not metrics.is_span_tag(t)), None)
    if bad is not None:
      raise UserError(f'{split}: tag {bad!r} is not a {scheme} span tag (O, or B-/I-/E-/S- and a type): fix the '
                      f'tags, or pass --config.task.tag_scheme=none to report token_accuracy only')
  return scheme


def settle_config(task_cfg, train_examples, dev_examples) -> None:
  """Writes the resolved span scheme into `task_cfg.tag_scheme` (so the export records it)."""
  task_cfg.tag_scheme = resolve_tag_scheme(task_cfg, train_examples, dev_examples)


def span_scheme(task_cfg, labels) -> str | None:
  """The task's span scheme, or None. Fine-tune runs store the one decided from the training tags in
  `task.tag_scheme` ('none' when there is none); an export written before that was stored is read from its tags."""
  scheme = task_cfg.get('tag_scheme', '')
  if scheme:
    return None if scheme == 'none' else scheme
  return metrics.span_scheme([list(labels)])


def metric_names(task_cfg, labels) -> tuple[str, ...]:
  """token_accuracy, and span precision/recall/f1 with a span scheme."""
  spans = ('precision', 'recall', 'f1') if span_scheme(task_cfg, labels) else ()
  return ('token_accuracy', *spans)


def dev_metrics(task_cfg, labels, outputs, features, examples, decode_info) -> dict:
  """`metric_names` of the argmax tag at each word's first piece against the gold tags."""
  del decode_info
  predicted = word_predictions(labels, np.argmax(outputs, -1), features, examples)
  return metrics.tagging_metrics(predicted, [e.tags for e in examples], span_scheme(task_cfg, labels))


def describe(task_cfg) -> str:
  """The banner's note on the tag scheme."""
  if task_cfg.tag_scheme != 'none':
    return f'tags {task_cfg.tag_scheme} (span precision/recall/f1 + token_accuracy) | '
  return 'tags: no span scheme (BIO/IOB1/IOBES), token_accuracy only | '


def metric_note(names) -> str:
  """Why span metrics are missing, for the best_metric error."""
  return ('' if 'f1' in names else
          ' (the training tags are not a BIO, IOB1 or IOBES span scheme, so no span precision/recall/f1)')


KIND = TaskKind(
    name='tagging', read_file=read_file, tfds_datasets=('conll2003',), read_tfds=read_tfds, label_set=label_set,
    num_labels=lambda labels, source: len(labels), head_width=lambda n: heads.at_least_one_label(n, 'tagging'),
    head=heads.TokenHead, featurize=featurize, loss=loss, metric_names=metric_names, dev_metrics=dev_metrics,
    preferred_metric='f1', settle_config=settle_config, describe=describe, metric_note=metric_note, token_outputs=True)

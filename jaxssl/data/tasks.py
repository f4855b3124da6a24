"""Downstream datasets: local files (and TFDS names, `tfds_tasks`) → examples → fixed-length features for the task heads.

Local formats (DESIGN.md): classification/regression TSV or JSONL with `text`, `label`; pairs `text_a`, `text_b`,
`label`; tagging CoNLL (`token<TAB>tag` per line, blank line between sentences) or JSONL `tokens`, `tags`;
extractive QA SQuAD v1.1 JSON. Label sets come from the training file. A wrong or missing column is a UserError
naming the file, the line and the columns expected.
"""
import csv
import dataclasses
import json
import os

import numpy as np

from jaxssl.errors import UserError

KINDS = ('classification', 'pair', 'regression', 'tagging', 'qa')
_COLUMNS = {'classification': ('text', 'label'), 'regression': ('text', 'label'),
            'pair': ('text_a', 'text_b', 'label')}


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


def _require_file(path: str) -> None:
  if not path or not os.path.isfile(path):
    raise UserError(f'task file {path!r} not found: set --config.task.train / --config.task.dev to existing files')


def _rows(path: str):
  """(line number, dict) rows of a TSV (with a header) or JSONL file."""
  _require_file(path)
  with open(path, encoding='utf-8') as f:
    if path.endswith('.jsonl') or path.endswith('.json'):
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            yield n, json.loads(line)
          except json.JSONDecodeError as e:
            raise UserError(f'{path} line {n} is not valid JSON ({e.msg}): one JSON object per line') from None
    else:
      for n, row in enumerate(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 2):
        yield n, row


def _read_rows(kind: str, path: str) -> list[Example]:
  columns = _COLUMNS[kind]
  out = []
  for n, row in _rows(path):
    missing = [c for c in columns if row.get(c) in (None, '')]
    if missing:
      raise UserError(f'{path} line {n} has no {", ".join(missing)}: a {kind} file needs columns '
                      f'{", ".join(columns)}')
    label = row['label']
    if kind == 'regression':
      try:
        label = float(label)
      except (TypeError, ValueError):
        raise UserError(f'{path} line {n}: label {label!r} is not a number (regression needs float labels)') from None
    else:
      label = str(label)
    out.append(Example(text=str(row['text_a' if kind == 'pair' else 'text']),
                       text_b=str(row['text_b']) if kind == 'pair' else None, label=label))
  return out


def _read_tagging(path: str) -> list[Example]:
  _require_file(path)
  if path.endswith('.jsonl'):
    out = []
    for n, row in _rows(path):
      tokens, tags = row.get('tokens'), row.get('tags')
      if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
        raise UserError(f'{path} line {n}: a tagging JSONL line needs lists "tokens" and "tags" of equal length')
      out.append(Example(tokens=[str(t) for t in tokens], tags=[str(t) for t in tags]))
    return out
  out, tokens, tags = [], [], []
  with open(path, encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip() or line.startswith('-DOCSTART-'):
        if tokens:
          out.append(Example(tokens=tokens, tags=tags))
        tokens, tags = [], []
        continue
      parts = line.split('\t') if '\t' in line else line.split()
      if len(parts) < 2:
        raise UserError(f'{path} line {n}: expected "token<TAB>tag" (CoNLL), got {line[:60]!r}')
      tokens.append(parts[0])
      tags.append(parts[-1])
  if tokens:
    out.append(Example(tokens=tokens, tags=tags))
  return out


def _read_squad(path: str) -> list[Example]:
  _require_file(path)
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)['data']
  except (json.JSONDecodeError, KeyError, TypeError):
    raise UserError(f'{path} is not SQuAD v1.1 JSON (a top-level "data" list of articles)') from None
  out = []
  for article in data:
    for paragraph in article.get('paragraphs', []):
      context = paragraph['context']
      for qa in paragraph.get('qas', []):
        answers = [(a['text'], int(a['answer_start'])) for a in qa.get('answers', [])]
        for text, start in answers:
          if context[start:start + len(text)] != text:
            raise UserError(f'{path}: question {qa.get("id")}: answer {text!r} is not at answer_start {start}')
        out.append(Example(text=context, question=qa['question'], qid=str(qa['id']), answers=answers))
  return out


def read_examples(kind: str, path: str) -> list[Example]:
  """Examples of a local task file; raises UserError for an unknown kind, a missing file or a bad row."""
  if kind not in KINDS:
    raise UserError(f'task.kind={kind!r}: use one of {", ".join(KINDS)}')
  if kind == 'tagging':
    examples = _read_tagging(path)
  elif kind == 'qa':
    examples = _read_squad(path)
  else:
    examples = _read_rows(kind, path)
  if not examples:
    raise UserError(f'task file {path} has no examples')
  return examples


def read_task_split(task_cfg, source: str) -> tuple[list[Example], list[str] | None]:
  """(examples, label names or None) of one split of a task config: `source` is a local file, or a TFDS split
  name when `task.tfds` is set. TFDS datasets name their labels; for local files the names are None (they come
  from the training file, `label_set`)."""
  if task_cfg.get('tfds'):
    from jaxssl.data import tfds_tasks  # noqa: PLC0415 (imports this module)
    return tfds_tasks.read_split(task_cfg.tfds, source, task_cfg.kind, data_dir=task_cfg.get('data_dir', ''),
                                 tag_feature=task_cfg.get('tag_feature', 'ner'))
  return read_examples(task_cfg.kind, source), None


def label_set(kind: str, examples: list[Example]) -> list[str]:
  """Sorted class names (classification/pair) or tags (tagging) seen in the training examples."""
  if kind in ('classification', 'pair'):
    return sorted({e.label for e in examples})
  if kind == 'tagging':
    return sorted({t for e in examples for t in e.tags})
  return []


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


def featurize(kind: str, examples: list[Example], tokenizer, seq_len: int, labels: list[str]) -> dict[str, np.ndarray]:
  """Stacked features for classification, pair, regression and tagging (QA windows: see `featurize_qa`)."""
  index = {name: i for i, name in enumerate(labels)}
  rows = []
  if kind in ('classification', 'pair', 'regression'):
    ids_a = tokenizer.encode([e.text for e in examples])
    ids_b = tokenizer.encode([e.text_b for e in examples]) if kind == 'pair' else [None] * len(examples)
    for e, a, b in zip(examples, ids_a, ids_b):
      row = pack(a, b, tokenizer, seq_len)
      if kind == 'regression':
        row['labels'] = np.float32(e.label)
      else:
        row['labels'] = np.int32(index.get(e.label, -1))  # -1: a dev label unseen in training (never correct)
      rows.append(row)
  elif kind == 'tagging':
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
  else:
    raise UserError(f'featurize does not handle task.kind={kind!r}')
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def word_predictions(labels: list[str], predictions: np.ndarray, features: dict, examples: list[Example]):
  """Tagging: one predicted tag per word, read at its first piece; words cut off by truncation get 'O'."""
  out = []
  for e, pred, word_mask in zip(examples, predictions, features['word_mask']):
    tags = [labels[int(p)] for p, first in zip(pred, word_mask) if first]
    out.append(tags + ['O'] * (len(e.tokens) - len(tags)))
  return out


@dataclasses.dataclass
class QAFeatureInfo:
  """Where one QA feature (a window of a context) came from, to map its logits back to the context text."""
  example: int                   # index into the examples
  window: tuple[int, int]        # (first context token, number of context tokens)
  context_start: int             # position of the window's first context token in the feature
  offsets: list                  # (char_start, char_end) of every context token of the example


def _answer_tokens(offsets, char_start: int, char_end: int) -> tuple[int, int]:
  """First and last context token overlapping the answer's characters ((-1, -1) if none)."""
  inside = [i for i, (s, e) in enumerate(offsets) if e > char_start and s < char_end]
  return (inside[0], inside[-1]) if inside else (-1, -1)


def featurize_qa(examples: list[Example], tokenizer, seq_len: int, *, max_query_length: int,
                 doc_stride: int) -> tuple[dict[str, np.ndarray], list[QAFeatureInfo]]:
  """[CLS] question [SEP] context-window [SEP] features; long contexts become overlapping windows (BERT's
  doc_stride). A window that does not contain the first answer gets start/end -1 (ignored by the loss)."""
  from jaxssl.data import qa  # noqa: PLC0415 (qa imports nothing of tasks; kept local for a light import)
  questions = tokenizer.encode([e.question for e in examples])
  contexts = tokenizer.encode_with_offsets([e.text for e in examples])
  rows, infos = [], []
  for index, (e, q_ids, (c_ids, offsets)) in enumerate(zip(examples, questions, contexts)):
    q_ids = q_ids[:max_query_length]
    context_start = len(q_ids) + 2
    answer = (-1, -1)
    if e.answers:
      text, char_start = e.answers[0]
      answer = _answer_tokens(offsets, char_start, char_start + len(text))
    for offset, length in qa.make_windows(len(c_ids), seq_len - len(q_ids) - 3, doc_stride):
      row = pack(q_ids, c_ids[offset:offset + length], tokenizer, seq_len)
      row['context_mask'] = np.zeros(seq_len, np.int32)
      row['context_mask'][context_start:context_start + length] = 1
      inside = answer[0] >= offset and answer[1] < offset + length and answer[0] >= 0
      row['start_positions'] = np.int32(context_start + answer[0] - offset if inside else -1)
      row['end_positions'] = np.int32(context_start + answer[1] - offset if inside else -1)
      rows.append(row)
      infos.append(QAFeatureInfo(index, (offset, length), context_start, offsets))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}, infos


def qa_predictions(examples: list[Example], infos: list[QAFeatureInfo], start_logits, end_logits,
                   max_answer_length: int) -> dict[str, str]:
  """{question id: answer text}: the best span over each example's windows (max-context rule)."""
  from jaxssl.data import qa  # noqa: PLC0415
  by_example: dict[int, list[int]] = {}
  for f, info in enumerate(infos):
    by_example.setdefault(info.example, []).append(f)
  out = {}
  for index, features in by_example.items():
    e = examples[index]
    answer = qa.best_answer_over_windows(
        [(start_logits[f], end_logits[f]) for f in features], [infos[f].window for f in features],
        infos[features[0]].offsets, e.text, max_answer_length,
        context_starts=[infos[f].context_start for f in features])
    out[e.qid] = answer.text
  return out

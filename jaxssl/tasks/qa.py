"""Extractive QA (SQuAD v1.1): a start and an end vector scored against every context token; answers decoded
as the best span of the context's windows (`qa_decoding`) and mapped back to its exact characters.

Features are [CLS] question [SEP] context-window [SEP]; contexts longer than the window are split with
`task.doc_stride`. Loss: (start CE + end CE) / 2, each a softmax over positions. Dev metrics: exact_match and f1
as the official script, in [0, 1].
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import optax

from jaxssl.tasks import files, heads, metrics, qa_decoding, tfds
from jaxssl.tasks.base import Example, TaskKind, pack, stack

QA_MASK_VALUE = -1e9  # finite: exp underflows to exactly 0 in float32, and a loss never becomes inf/NaN


def read_tfds(split: tfds.Split) -> tuple[list[Example], list[str]]:
  """SQuAD questions with all their answers; no label names."""
  return [Example(text=tfds.text(r['context']), question=tfds.text(r['question']), qid=tfds.text(r['id']),
                  answers=[(tfds.text(t), int(s)) for t, s in zip(r['answers']['text'], r['answers']['answer_start'])])
          for r in tfds.records(split)], []


class SpanHead(heads.TokenHead):
  """Dense(H, 2) at every token → (start_logits [B, L], end_logits [B, L]).

  Positions where `context_mask` is 0 get QA_MASK_VALUE, so a softmax over positions covers only the context
  (probability exactly 0 elsewhere). No no-answer option is built in (SQuAD v1.1 needs none); to get one (v2, or
  BERT's convention of labelling windows that miss the answer with [CLS]), set context_mask[:, 0] = 1 and point
  start/end at 0. Without `context_mask`, the attention_mask is used (only padding is excluded).
  """

  def __call__(self, sequence, pooled, attention_mask, dropout_key, context_mask=None):
    logits = super().__call__(sequence, pooled, attention_mask, dropout_key)
    keep = (attention_mask if context_mask is None else context_mask).astype(bool)
    return tuple(jnp.where(keep, logits[..., i], QA_MASK_VALUE) for i in (0, 1))


@dataclasses.dataclass
class FeatureInfo:
  """Where one QA feature (a window of a context) came from, to map its logits back to the context text."""
  example: int                   # index into the examples
  window: tuple[int, int]        # (first context token, number of context tokens)
  context_start: int             # position of the window's first context token in the feature
  offsets: list                  # (char_start, char_end) of every context token of the example


def _answer_tokens(offsets, char_start: int, char_end: int) -> tuple[int, int]:
  """First and last context token overlapping the answer's characters ((-1, -1) if none)."""
  inside = [i for i, (s, e) in enumerate(offsets) if e > char_start and s < char_end]
  return (inside[0], inside[-1]) if inside else (-1, -1)


def featurize_windows(examples: list[Example], tokenizer, seq_len: int, *, max_query_length: int,
                      doc_stride: int) -> tuple[dict[str, np.ndarray], list[FeatureInfo]]:
  """[CLS] question [SEP] context-window [SEP] features; long contexts become overlapping windows (BERT's
  doc_stride). A window that does not contain the first answer gets start/end -1 (ignored by the loss)."""
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
    for offset, length in qa_decoding.make_windows(len(c_ids), seq_len - len(q_ids) - 3, doc_stride):
      row = pack(q_ids, c_ids[offset:offset + length], tokenizer, seq_len)
      row['context_mask'] = np.zeros(seq_len, np.int32)
      row['context_mask'][context_start:context_start + length] = 1
      inside = answer[0] >= offset and answer[1] < offset + length and answer[0] >= 0
      row['start_positions'] = np.int32(context_start + answer[0] - offset if inside else -1)
      row['end_positions'] = np.int32(context_start + answer[1] - offset if inside else -1)
      rows.append(row)
      infos.append(FeatureInfo(index, (offset, length), context_start, offsets))
  return stack(rows), infos


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels):
  """(window features, their `FeatureInfo`s), windows sized by the task's max_query_length and doc_stride."""
  del labels
  return featurize_windows(examples, tokenizer, seq_len, max_query_length=task_cfg.max_query_length,
                           doc_stride=task_cfg.doc_stride)


def predictions(examples: list[Example], infos: list[FeatureInfo], start_logits, end_logits,
                max_answer_length: int) -> dict[str, str]:
  """{question id: answer text}: the best span over each example's windows (max-context rule)."""
  by_example: dict[int, list[int]] = {}
  for f, info in enumerate(infos):
    by_example.setdefault(info.example, []).append(f)
  out = {}
  for index, features in by_example.items():
    e = examples[index]
    answer = qa_decoding.best_answer_over_windows(
        [(start_logits[f], end_logits[f]) for f in features], [infos[f].window for f in features],
        infos[features[0]].offsets, e.text, max_answer_length,
        context_starts=[infos[f].context_start for f in features])
    out[e.qid] = answer.text
  return out


def loss(outputs, batch) -> dict:
  """(start CE + end CE) / 2 sums; a window whose positions are -1 (or `example_weights` 0) is ignored.
  'correct' counts start and end both right."""
  start_logits, end_logits = outputs
  starts = jnp.asarray(batch['start_positions'], jnp.int32)
  ends = jnp.asarray(batch['end_positions'], jnp.int32)
  w = heads.example_weights(batch, starts.shape[0]) * (starts >= 0) * (ends >= 0)
  ce = lambda lg, y: optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), jnp.maximum(y, 0))
  per_example = 0.5 * (ce(start_logits, starts) + ce(end_logits, ends))
  correct = (jnp.argmax(start_logits, -1) == starts) & (jnp.argmax(end_logits, -1) == ends)
  return {'loss': jnp.sum(w * per_example), 'correct': jnp.sum(w * correct), 'count': jnp.sum(w)}


def dev_metrics(task_cfg, labels, outputs, features, examples, decode_info) -> dict:
  """exact_match and f1 of the decoded answers, as the official script but in [0, 1]."""
  del labels, features
  start_logits, end_logits = outputs
  predicted = predictions(examples, decode_info, start_logits, end_logits, task_cfg.max_answer_length)
  answers = {e.qid: [text for text, _ in e.answers] for e in examples}
  # Official SQuAD figures are percentages; reported here in [0, 1] like every other dev metric.
  return {k: v / 100.0 for k, v in metrics.squad_metrics(predicted, answers).items()}


KIND = TaskKind(
    name='qa', read_file=files.read_squad, tfds_datasets=('squad/v1.1',), read_tfds=read_tfds,
    label_set=lambda examples: [], num_labels=lambda labels, source: 2,
    head_width=lambda n: 2,  # start and end vectors; num_labels is not used
    head=SpanHead, featurize=featurize, loss=loss, metric_names=lambda task_cfg, labels: ('exact_match', 'f1'),
    dev_metrics=dev_metrics, label_keys=('start_positions', 'end_positions'), model_inputs=('context_mask',),
    preferred_metric='f1', token_outputs=True)

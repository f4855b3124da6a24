"""Downstream fine-tuning: a pre-trained body plus a new, randomly initialised task head, and the task losses.

  model = TaskModel(cfg.model, vocab_size, kind='classification', num_labels=3, rngs=nnx.Rngs(params=seed))
  nnx.update(model.body, exported_params)       # an exported pretraining model's params fit `body` as they are
  outputs = model(ids, types, mask, dropout_rng=key)
  loss, sums = task_loss('classification', outputs, batch)

Kinds and outputs (all float32):
  classification, pair  dropout(pooled) -> Dense(H, num_labels) -> logits [B, num_labels]. Pairs are the same head;
                        the data code packs [CLS] a [SEP] b [SEP] with token types 0/1.
  regression            dropout(pooled) -> Dense(H, 1) -> scores [B]  (num_labels must be 1)
  tagging               dropout(sequence) -> Dense(H, num_labels) per token -> logits [B, L, num_labels]
  qa                    dropout(sequence) -> Dense(H, 2): a start and an end vector (+ biases) scored against every
                        token -> (start_logits [B, L], end_logits [B, L]); positions where `context_mask` is 0 get
                        QA_MASK_VALUE, so a softmax over positions covers only the context (probability exactly 0
                        elsewhere). No no-answer option is built in (SQuAD v1.1 needs none); to get one (v2, or
                        BERT's convention of labelling windows that miss the answer with [CLS]), set
                        context_mask[:, 0] = 1 and point start/end at 0. Without `context_mask`, the
                        attention_mask is used (only padding is excluded).

The head is Dense with float32 compute, named ('embed', 'classes'). Dropout rate: `classifier_dropout`, or the
model's hidden dropout when None. The body and the head get fold_in(dropout_rng, 0) and fold_in(dropout_rng, 1).

Batch keys `task_loss` reads (beside the model inputs):
  classification, pair  `labels` [B] int (-1 = ignore, e.g. a dev label unseen in training)
  regression            `labels` [B] float
  tagging               `labels` [B, L] int (-1 = ignore: [CLS]/[SEP], non-first word pieces, padding);
                        optional `label_weights` [B, L] (0 = ignore) multiplies in
  qa                    `start_positions`, `end_positions` [B] int (token positions in the sequence; -1 = ignore,
                        e.g. a window that misses the answer when [CLS] is not allowed; a label where
                        context_mask is 0 costs ~1e9); `context_mask` [B, L] is a model input, not a loss input
  all but tagging       optional `example_weights` [B] (0 = ignore, e.g. the padding rows of a last eval batch)
"""
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.families import build_model
from jaxssl.models.layers import Dense, dropout

KINDS = ('classification', 'pair', 'regression', 'tagging', 'qa')
QA_MASK_VALUE = -1e9  # finite: exp underflows to exactly 0 in float32, and a loss never becomes inf/NaN


def _check(kind: str, num_labels: int) -> int:
  """Validates (kind, num_labels); returns the head's output width."""
  if kind not in KINDS:
    raise UserError(f'task.kind={kind!r} is not a known task kind; use one of {list(KINDS)}')
  if kind == 'regression':
    if num_labels != 1:
      raise UserError(f'task.num_labels={num_labels} for a regression task: set --config.task.num_labels=1')
    return 1
  if kind == 'qa':
    return 2  # start and end vectors; num_labels is not used
  if int(num_labels) < 1:
    raise UserError(f'task.num_labels={num_labels} for a {kind} task: set --config.task.num_labels to the number '
                    'of classes/tags (at least 1)')
  return int(num_labels)


class TaskModel(nnx.Module):
  """A pre-trained body (`self.body`, a `build_model` model such as BertForPretraining) plus a new task head.

  The body's params have the same tree as a pretraining model's, MLM/NSP heads included (unused here), so
  exported pretraining params load into `body` with `nnx.update(model.body, params)`; the head stays random.
  """

  def __init__(self, model_cfg, vocab_size: int, *, kind: str, num_labels: int, rngs: nnx.Rngs,
               classifier_dropout: float | None = None):
    out = _check(kind, num_labels)
    self.body = build_model(model_cfg, vocab_size, rngs=rngs)
    if not hasattr(self.body, 'encode'):
      raise UserError(f'model.name={model_cfg.get("name")!r} has no encoder output for fine-tuning heads; '
                      'use an encoder model such as bert')
    c = self.body.config
    self.kind = kind
    self.num_labels = out
    self.dropout_rate = float(c.dropout_rate if classifier_dropout is None else classifier_dropout)
    if not 0.0 <= self.dropout_rate < 1.0:
      raise UserError(f'task.classifier_dropout={classifier_dropout}: use a rate in [0, 1)')
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.head = Dense(c.hidden_size, out, ('embed', 'classes'), stddev=c.initializer_range, dtype=jnp.float32,
                        rngs=rngs)

  def __call__(self, input_ids, token_type_ids, attention_mask, *, dropout_rng=None, context_mask=None):
    """[B, L] ints -> the kind's outputs (see the module docstring). dropout_rng None = eval (no dropout)."""
    body_key, head_key = (None, None) if dropout_rng is None else (
        jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
    seq, pooled = self.body.encode(input_ids, token_type_ids, attention_mask, dropout_rng=body_key)
    if self.kind in ('classification', 'pair', 'regression'):
      logits = self.head(dropout(pooled.astype(jnp.float32), self.dropout_rate, head_key))
      return logits[:, 0] if self.kind == 'regression' else logits
    logits = self.head(dropout(seq.astype(jnp.float32), self.dropout_rate, head_key))
    logits = constrain(logits, ('batch', 'length', 'classes'))
    if self.kind == 'tagging':
      return logits
    keep = (attention_mask if context_mask is None else context_mask).astype(bool)
    start, end = (jnp.where(keep, logits[..., i], QA_MASK_VALUE) for i in (0, 1))
    return start, end


def _weighted_ce(logits, labels, weights):
  """(Σ w·CE, Σ w·correct, Σ w) with labels < 0 ignored (weight 0)."""
  w = weights * (labels >= 0)
  safe = jnp.maximum(labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  correct = jnp.argmax(logits, -1) == safe
  return jnp.sum(ce * w), jnp.sum(correct * w), jnp.sum(w)


def _example_weights(batch, n):
  w = batch.get('example_weights')
  return jnp.ones((n,), jnp.float32) if w is None else jnp.asarray(w, jnp.float32)


def task_loss(kind: str, outputs, batch) -> tuple[jax.Array, dict]:
  """(mean loss, sums) for a batch; `outputs` as TaskModel returns them, `batch` keys in the module docstring.

  classification/pair: softmax cross-entropy; regression: mean squared error; tagging: cross-entropy averaged over
  labelled tokens; qa: (start CE + end CE) / 2, each a softmax over positions (as BERT). The mean divides by the
  batch's weight (max 1), so an all-ignored batch gives 0, not NaN.
  `sums` (add over batches/microbatches, then `summarize_task`): 'loss' (Σ weight·loss), 'count' (Σ weight) and,
  except for regression, 'correct' (argmax right; qa: start and end both right).
  """
  _check(kind, 1 if kind == 'regression' else 2)
  if kind in ('classification', 'pair'):
    labels = jnp.asarray(batch['labels'], jnp.int32)
    loss, correct, count = _weighted_ce(outputs, labels, _example_weights(batch, labels.shape[0]))
    sums = {'loss': loss, 'correct': correct, 'count': count}
  elif kind == 'regression':
    w = _example_weights(batch, outputs.shape[0])
    err = outputs.astype(jnp.float32) - jnp.asarray(batch['labels'], jnp.float32)
    sums = {'loss': jnp.sum(w * jnp.square(err)), 'count': jnp.sum(w)}
  elif kind == 'tagging':
    labels = jnp.asarray(batch['labels'], jnp.int32)
    w = batch.get('label_weights')
    w = jnp.ones(labels.shape, jnp.float32) if w is None else jnp.asarray(w, jnp.float32)
    loss, correct, count = _weighted_ce(outputs, labels, w)
    sums = {'loss': loss, 'correct': correct, 'count': count}
  else:
    start_logits, end_logits = outputs
    starts = jnp.asarray(batch['start_positions'], jnp.int32)
    ends = jnp.asarray(batch['end_positions'], jnp.int32)
    w = _example_weights(batch, starts.shape[0]) * (starts >= 0) * (ends >= 0)
    ce = lambda lg, y: optax.softmax_cross_entropy_with_integer_labels(lg.astype(jnp.float32), jnp.maximum(y, 0))
    per_example = 0.5 * (ce(start_logits, starts) + ce(end_logits, ends))
    correct = (jnp.argmax(start_logits, -1) == starts) & (jnp.argmax(end_logits, -1) == ends)
    sums = {'loss': jnp.sum(w * per_example), 'correct': jnp.sum(w * correct), 'count': jnp.sum(w)}
  return sums['loss'] / jnp.maximum(sums['count'], 1.0), sums


def summarize_task(sums) -> dict:
  """Means from (accumulated) `task_loss` sums: 'loss' and, where counted, 'accuracy'."""
  count = jnp.maximum(sums['count'], 1.0)
  out = {'loss': sums['loss'] / count}
  if 'correct' in sums:
    out['accuracy'] = sums['correct'] / count
  return out

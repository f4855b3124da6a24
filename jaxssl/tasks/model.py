"""A task model: a pre-trained body plus a new, randomly initialised head of a task kind; the kinds' losses.

  body = build_model(cfg.model, vocab_size, rngs=rngs)    # the family's encoder; exported params fit it as they are
  model = TaskModel(body, kind='classification', num_labels=3, rngs=rngs)
  outputs = model(ids, types, mask, dropout_rng=key)      # [B, num_labels] logits here; see each kind's head
  loss, sums = task_loss('classification', outputs, batch)

The body and the head get fold_in(dropout_rng, 0) and fold_in(dropout_rng, 1). Dropout rate of the head:
`classifier_dropout`, or the body's hidden dropout when None. Every kind's loss takes optional per-example
`example_weights` [B] (0 = ignore), tagging per-token `label_weights` [B, L] instead.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl import tasks
from jaxssl.errors import UserError

PACKED_INPUTS = ('position_ids', 'pool_positions')  # a packed batch's body inputs (train/packing.py)


class TaskModel(nnx.Module):
  """A pre-trained body (`self.body`, a model with `encode`, such as BertForPretraining) plus a task head.

  The body's params have the same tree as a pretraining model's, MLM/NSP heads included (unused here), so
  exported pretraining params load into `body` with `nnx.update(model.body, params)`; the head stays random.
  Build the body with the same `rngs` just before, as the fine-tune job does, for the same initialisation.
  """

  def __init__(self, body, *, kind: str, num_labels: int, rngs: nnx.Rngs, classifier_dropout: float | None = None):
    task_kind = tasks.get(kind)
    width = task_kind.head_width(num_labels)
    self.body = body
    c = body.config
    self.kind = kind
    self.input_keys = task_kind.input_keys
    self.num_labels = width
    rate = float(c.dropout_rate if classifier_dropout is None else classifier_dropout)
    if not 0.0 <= rate < 1.0:
      raise UserError(f'task.classifier_dropout={classifier_dropout}: use a rate in [0, 1)')
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.head = task_kind.head(c.hidden_size, width, stddev=c.initializer_range, dropout_rate=rate, rngs=rngs)

  def __call__(self, *inputs, dropout_rng=None, **head_inputs):
    """The kind's `input_keys` (text: input_ids, token_type_ids, attention_mask [B, L] ints; images: images
    [B, H, W, C]) → the kind's outputs. dropout_rng None = eval (no dropout). `head_inputs`: the kind's
    `model_inputs` (qa: context_mask); None values are left out. Inputs may be passed by name. A packed batch
    (train/packing.py) adds `position_ids` and `pool_positions`, which go to the body: pooled outputs are then one
    row per example, [E, ...]."""
    inputs = (*inputs, *(head_inputs.pop(k) for k in self.input_keys[len(inputs):] if k in head_inputs))
    packed = {k: head_inputs.pop(k) for k in PACKED_INPUTS if head_inputs.get(k) is not None}
    body_key, head_key = (None, None) if dropout_rng is None else (
        jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
    seq, pooled = self.body.encode(*inputs, dropout_rng=body_key, **packed)
    extra = {k: v for k, v in head_inputs.items() if v is not None}
    attention_mask = dict(zip(self.input_keys, inputs)).get('attention_mask')  # none for images
    return self.head(seq, pooled, attention_mask, head_key, **extra)


def task_loss(kind: str, outputs, batch) -> tuple[jax.Array, dict]:
  """(mean loss, sums) for a batch; `outputs` as TaskModel returns them, `batch` the kind's label keys.

  The mean divides by the batch's weight (max 1), so an all-ignored batch gives 0, not NaN. `sums` (add over
  batches/microbatches, then `summarize_task`): 'loss' (Σ weight·loss), 'count' (Σ weight) and, except for
  regression, 'correct' (argmax right; qa: start and end both right).
  """
  sums = tasks.get(kind).loss(outputs, batch)
  return sums['loss'] / jnp.maximum(sums['count'], 1.0), sums


def summarize_task(sums) -> dict:
  """Means from (accumulated) `task_loss` sums: 'loss' and, where counted, 'accuracy'."""
  count = jnp.maximum(sums['count'], 1.0)
  out = {'loss': sums['loss'] / count}
  if 'correct' in sums:
    out['accuracy'] = sums['correct'] / count
  return out

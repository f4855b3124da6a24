"""The head layers task kinds share, and their weighted cross-entropy.

A head is a float32 Dense named ('embed', 'classes') (so its params sit at `head/kernel`, `head/bias` of a task
model, as in every export) on the dropped-out pooled vector or on every token. It is called as
`head(sequence, pooled, attention_mask, dropout_key, **inputs)`; `dropout_key` None = eval.
"""
import jax.numpy as jnp
import optax
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.layers import Dense, dropout


class PooledHead(Dense):
  """dropout(pooled) → Dense(H, width): logits [B, width] (classification and pair)."""

  def __init__(self, hidden: int, width: int, *, stddev: float, dropout_rate: float, rngs: nnx.Rngs):
    super().__init__(hidden, width, ('embed', 'classes'), stddev=stddev, dtype=jnp.float32, rngs=rngs)
    self.dropout_rate = dropout_rate

  def __call__(self, sequence, pooled, attention_mask, dropout_key):
    del sequence, attention_mask
    return super().__call__(dropout(pooled.astype(jnp.float32), self.dropout_rate, dropout_key))


class TokenHead(Dense):
  """dropout(sequence) → Dense(H, width) at every token: logits [B, L, width] (tagging)."""

  def __init__(self, hidden: int, width: int, *, stddev: float, dropout_rate: float, rngs: nnx.Rngs):
    super().__init__(hidden, width, ('embed', 'classes'), stddev=stddev, dtype=jnp.float32, rngs=rngs)
    self.dropout_rate = dropout_rate

  def __call__(self, sequence, pooled, attention_mask, dropout_key):
    del pooled, attention_mask
    logits = super().__call__(dropout(sequence.astype(jnp.float32), self.dropout_rate, dropout_key))
    return constrain(logits, ('batch', 'length', 'classes'))


def weighted_ce(logits, labels, weights):
  """(Σ w·CE, Σ w·correct, Σ w) with labels < 0 ignored (weight 0)."""
  w = weights * (labels >= 0)
  safe = jnp.maximum(labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  correct = jnp.argmax(logits, -1) == safe
  return jnp.sum(ce * w), jnp.sum(correct * w), jnp.sum(w)


def example_weights(batch, n):
  """The batch's `example_weights` [n] (0 = ignore, e.g. padding rows of a last eval batch), else ones."""
  w = batch.get('example_weights')
  return jnp.ones((n,), jnp.float32) if w is None else jnp.asarray(w, jnp.float32)


def at_least_one_label(num_labels: int, kind: str) -> int:
  """`head_width` of the kinds with one output per label."""
  if int(num_labels) < 1:
    raise UserError(f'task.num_labels={num_labels} for a {kind} task: set --config.task.num_labels to the number '
                    'of classes/tags (at least 1)')
  return int(num_labels)

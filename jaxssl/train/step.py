"""The generic jitted train step (with gradient accumulation over microbatches) and eval step.

Both run a family's `Objective` (jaxssl/families/): its sums, global totals, loss and metrics. Losses are sums
divided by the weight of the *whole* global batch, so accumulated microbatches give exactly the full-batch gradient.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl import mesh as mesh_lib


def _split_microbatches(batch, microbatches: int):
  """[B, ...] → [M, B/M, ...] taking every M-th row, so each microbatch spans all batch shards evenly."""
  def split(x):
    x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _step_key(state):
  """The dropout key of the step `state` is at: fold_in(key(seed), step)."""
  return jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])


def _accumulated(fn, zero_fn, batch, step_key, microbatches: int):
  """`fn(batch, step_key)`, or with microbatches the sum of `fn(microbatch_i, fold_in(step_key, i))` over them
  (a scan; `zero_fn()` gives the zero of fn's output tree)."""
  if microbatches == 1:
    return fn(batch, step_key)

  def accumulate(carry, inputs):
    index, microbatch = inputs
    microbatch = jax.tree.map(lambda x: mesh_lib.constrain(x, ('batch',) + (None,) * (x.ndim - 1)), microbatch)
    return jax.tree.map(jnp.add, carry, fn(microbatch, jax.random.fold_in(step_key, index))), None
  total, _ = jax.lax.scan(accumulate, zero_fn(), (jnp.arange(microbatches), _split_microbatches(batch, microbatches)))
  return total


def _zero_sums(graphdef, params, batch, objective):
  """Float32 zeros shaped like the objective's sums."""
  shapes = jax.eval_shape(lambda: objective.sums(graphdef, params, jax.tree.map(lambda x: x[:1], batch), None))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), shapes)


def make_train_step(graphdef, tx, schedule, microbatches: int, objective):
  """Returns `train_step(state, batch) -> (state, metrics)` for `objective` (a families.Objective), a pure
  function to jit."""

  def loss_fn(params, batch, dropout_rng, totals):
    sums = objective.sums(graphdef, params, batch, dropout_rng)
    return objective.loss(sums, totals), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params, step, step_key = state['params'], state['step'], _step_key(state)
    totals = objective.totals(batch)
    grads, sums = _accumulated(
        lambda b, key: grad_fn(params, b, key, totals),
        lambda: (jax.tree.map(jnp.zeros_like, params), _zero_sums(graphdef, params, batch, objective)),
        batch, step_key, microbatches)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = objective.summarize(sums)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(step)
    new_state = {'params': new_params, 'opt_state': opt_state, 'step': step + 1, 'rng': state['rng']}
    return new_state, metrics

  return train_step


def make_checkpoint_check(graphdef, microbatches: int, objective):
  """Returns `check(state, batch) -> (loss, finite)`, a pure function to jit: what a checkpoint of `state` must
  pass before it is saved.

  `loss` is the loss the next train step will compute from `state` on `batch` (the next step's batch, dropout
  keys and microbatches; forward only), and `finite` whether every parameter and optimizer moment is finite.
  The loss logged at step d comes from the params *before* update d, so without this a checkpoint could hold an
  update that was never checked (train.nonfinite: a NaN run must not leave a NaN checkpoint behind).
  """

  def check(state, batch):
    params, step_key = state['params'], _step_key(state)
    totals = objective.totals(batch)
    sums = _accumulated(lambda b, key: objective.sums(graphdef, params, b, key),
                        lambda: _zero_sums(graphdef, params, batch, objective), batch, step_key, microbatches)
    return objective.loss(sums, totals), all_finite((params, state['opt_state']))

  return check


def all_finite(tree):
  """Whether every float in `tree` (params, optimizer moments) is finite: a boolean scalar, to use under jit.
  The largest magnitude of all is finite exactly when every entry is (a maximum propagates NaN); XLA:CPU compiles
  this in half the time of an `isfinite(x).all()` per leaf (0.42 against 0.96 s for MiniLM's params and moments,
  and runs it in 19 against 39 ms)."""
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact) and x.size]
  if not floats:
    return jnp.bool_(True)
  return jnp.isfinite(functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in floats]))


def make_eval_step(graphdef, objective):
  """Returns `eval_step(params, batch) -> sums` (no dropout); add over batches, then `objective.eval_metrics`."""

  def eval_step(params, batch):
    return objective.sums(graphdef, params, batch, None)
  return eval_step


def _batch_shardings(mesh, objective):
  return {k: mesh_lib.batch_sharding(mesh, ndim) for k, ndim in objective.batch_ndims.items()}


def jit_train_step(train_step, state_shardings, mesh, objective):
  """Explicit in/out shardings; the old state is donated so params and moments are updated in place."""
  return jax.jit(train_step, in_shardings=(state_shardings, _batch_shardings(mesh, objective)),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def jit_eval_step(eval_step, param_shardings, mesh, objective):
  """The eval step jitted with explicit shardings; the sums come back replicated."""
  return jax.jit(eval_step, in_shardings=(param_shardings, _batch_shardings(mesh, objective)),
                 out_shardings=NamedSharding(mesh, P()))


def jit_checkpoint_check(check, state_shardings, mesh, objective):
  """The checkpoint check jitted with explicit shardings (the state is read, not donated)."""
  return jax.jit(check, in_shardings=(state_shardings, _batch_shardings(mesh, objective)),
                 out_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P())))

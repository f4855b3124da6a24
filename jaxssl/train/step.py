"""The BERT pretraining loss, the jitted train step (with gradient accumulation) and the eval step.

Losses are sums divided by the weight of the *whole* global batch, so accumulating gradients over microbatches
gives exactly the full-batch gradient (not a mean of per-microbatch means).
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl import mesh as mesh_lib
from jaxssl.models import lm_loss

BATCH_KEYS = ('input_ids', 'token_type_ids', 'attention_mask', 'mlm_positions', 'mlm_ids', 'mlm_weights',
              'nsp_label')


def pretraining_sums(graphdef, params, batch, dropout_rng):
  """Forward pass; returns per-objective sums (loss, correct, count) over the batch."""
  model = nnx.merge(graphdef, params)
  mlm_logits, nsp_logits = model(batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
                                 batch['mlm_positions'], dropout_rng=dropout_rng)
  weights = batch['mlm_weights'].astype(jnp.float32)
  mlm_losses = optax.softmax_cross_entropy_with_integer_labels(mlm_logits.astype(jnp.float32), batch['mlm_ids'])
  mlm_correct = (jnp.argmax(mlm_logits, -1) == batch['mlm_ids']) * weights
  nsp_losses = optax.softmax_cross_entropy_with_integer_labels(nsp_logits.astype(jnp.float32), batch['nsp_label'])
  nsp_correct = jnp.argmax(nsp_logits, -1) == batch['nsp_label']
  return {
      'mlm_loss': jnp.sum(mlm_losses * weights), 'mlm_correct': jnp.sum(mlm_correct), 'mlm_count': jnp.sum(weights),
      'nsp_loss': jnp.sum(nsp_losses), 'nsp_correct': jnp.sum(nsp_correct),
      'nsp_count': jnp.asarray(nsp_losses.shape[0], jnp.float32),
  }


def _split_microbatches(batch, microbatches: int):
  """[B, ...] → [M, B/M, ...] taking every M-th row, so each microbatch spans all batch shards evenly."""
  def split(x):
    x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def bert_totals(batch):
  """BERT divides by the number of predictions (+ a small epsilon) and of sequences in the *global* batch."""
  return {'mlm': jnp.sum(batch['mlm_weights'].astype(jnp.float32)) + 1e-5,
          'nsp': jnp.asarray(batch['nsp_label'].shape[0], jnp.float32)}


def bert_loss(sums, totals):
  return sums['mlm_loss'] / totals['mlm'] + sums['nsp_loss'] / totals['nsp']


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a pretraining family trains on: its batch keys (with ndim), per-batch sums, global normalisers, the
  loss from both, and the metrics from summed sums. The train step, accumulation and eval are shared."""
  batch_ndims: dict
  sums: Callable      # (graphdef, params, batch, dropout_rng) -> dict of sums
  totals: Callable    # (global batch) -> dict of normalisers
  loss: Callable      # (sums, totals) -> scalar
  summarize: Callable  # (sums) -> metrics


def make_train_step(graphdef, tx, schedule, microbatches: int = 1, objective: 'Objective | None' = None):
  """Returns `train_step(state, batch) -> (state, metrics)`, a pure function to jit."""
  objective = objective or BERT

  def loss_fn(params, batch, dropout_rng, totals):
    sums = objective.sums(graphdef, params, batch, dropout_rng)
    return objective.loss(sums, totals), sums

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    params, step = state['params'], state['step']
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
    totals = objective.totals(batch)
    if microbatches == 1:
      grads, sums = grad_fn(params, batch, step_key, totals)
    else:
      def accumulate(carry, inputs):
        index, microbatch = inputs
        microbatch = jax.tree.map(lambda x: mesh_lib.constrain(x, ('batch',) + (None,) * (x.ndim - 1)), microbatch)
        g, s = grad_fn(params, microbatch, jax.random.fold_in(step_key, index), totals)
        return jax.tree.map(jnp.add, carry, (g, s)), None
      zeros = jax.tree.map(jnp.zeros_like, params)
      zero_sums = jax.eval_shape(lambda: objective.sums(graphdef, params, jax.tree.map(lambda x: x[:1], batch),
                                                        None))
      zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), zero_sums)
      (grads, sums), _ = jax.lax.scan(
          accumulate, (zeros, zero_sums), (jnp.arange(microbatches), _split_microbatches(batch, microbatches)))
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    metrics = objective.summarize(sums)
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['learning_rate'] = schedule(step)
    new_state = {'params': new_params, 'opt_state': opt_state, 'step': step + 1, 'rng': state['rng']}
    return new_state, metrics

  return train_step


def summarize(sums):
  """Per-token/per-sequence means from sums; `loss` = MLM + NSP as BERT."""
  mlm_loss = sums['mlm_loss'] / (sums['mlm_count'] + 1e-5)
  nsp_loss = sums['nsp_loss'] / sums['nsp_count']
  return {
      'loss': mlm_loss + nsp_loss, 'mlm_loss': mlm_loss, 'mlm_accuracy': sums['mlm_correct'] / (sums['mlm_count'] + 1e-5),
      'nsp_loss': nsp_loss, 'nsp_accuracy': sums['nsp_correct'] / sums['nsp_count'],
  }


LM_BATCH_KEYS = ('input_ids', 'segment_ids', 'positions')


def lm_sums(graphdef, params, batch, dropout_rng):
  """GPT: summed next-token loss, correct predictions and predicted pairs (within a document only)."""
  from jaxssl.models import gpt  # noqa: PLC0415 (the model registry imports this module's users, not the reverse)
  model = nnx.merge(graphdef, params)
  kw = dict(segment_ids=batch['segment_ids'], positions=batch['positions'], dropout_rng=dropout_rng)
  if model.config.loss_chunk:
    x = model.features(batch['input_ids'], **kw)
    targets, valid = gpt.next_token_targets(batch['input_ids'], batch['segment_ids'])
    chunk = math.gcd(x.shape[1], model.config.loss_chunk)
    loss, correct = lm_loss.next_token_stats(x, model.output_embedding(), targets, valid, chunk)
    return {'lm_loss': loss, 'lm_correct': correct, 'lm_count': jnp.sum(valid).astype(jnp.float32)}
  loss, correct, count = gpt.next_token_stats(model(batch['input_ids'], **kw), batch['input_ids'],
                                              batch['segment_ids'])
  return {'lm_loss': loss, 'lm_correct': correct, 'lm_count': count}


def lm_totals(batch):
  from jaxssl.models import gpt  # noqa: PLC0415
  return {'lm': jnp.sum(gpt.next_token_pairs(batch['segment_ids'])).astype(jnp.float32) + 1e-5}


def lm_summarize(sums):
  loss = sums['lm_loss'] / (sums['lm_count'] + 1e-5)
  return {'loss': loss, 'accuracy': sums['lm_correct'] / (sums['lm_count'] + 1e-5)}


GPT = Objective(batch_ndims={k: 2 for k in LM_BATCH_KEYS}, sums=lm_sums, totals=lm_totals,
                loss=lambda sums, totals: sums['lm_loss'] / totals['lm'], summarize=lm_summarize)
BERT = Objective(batch_ndims={k: 1 if k == 'nsp_label' else 2 for k in BATCH_KEYS}, sums=pretraining_sums,
                 totals=bert_totals, loss=bert_loss, summarize=summarize)


def elmo_sums(graphdef, params, batch, dropout_rng):
  """ELMo: summed forward (token t+1 from state t) and backward (token t-1 from state t) LM losses, within a
  document only; both directions count the same pairs (`lm_count`)."""
  from jaxssl.models import elmo  # noqa: PLC0415 (as lm_sums)
  model = nnx.merge(graphdef, params)
  forward, backward = model(batch['input_ids'], segment_ids=batch['segment_ids'], dropout_rng=dropout_rng)
  return elmo.bidirectional_lm_sums(forward, backward, batch['input_ids'], batch['segment_ids'])


def elmo_summarize(sums):
  """`loss` = the mean of the two directions' per-token losses; each direction's loss, perplexity, accuracy."""
  count = sums['lm_count'] + 1e-5
  out = {}
  for d in ('forward', 'backward'):
    out[f'{d}_loss'] = sums[f'{d}_loss'] / count
    out[f'{d}_perplexity'] = jnp.exp(out[f'{d}_loss'])
    out[f'{d}_accuracy'] = sums[f'{d}_correct'] / count
  return {'loss': (out['forward_loss'] + out['backward_loss']) / 2, **out}


ELMO = Objective(batch_ndims={k: 2 for k in LM_BATCH_KEYS}, sums=elmo_sums, totals=lm_totals,
                 loss=lambda sums, totals: (sums['forward_loss'] + sums['backward_loss']) / (2 * totals['lm']),
                 summarize=elmo_summarize)


ENCDEC_BATCH_KEYS = ('source_ids', 'source_mask', 'target_input_ids', 'target_ids', 'target_mask')


def encdec_sums(graphdef, params, batch, dropout_rng):
  """Encoder-decoder denoising: summed reconstruction cross-entropy and correct tokens over the real target
  positions (teacher forcing)."""
  model = nnx.merge(graphdef, params)
  logits = model(batch['source_ids'], batch['source_mask'], batch['target_input_ids'], batch['target_mask'],
                 dropout_rng=dropout_rng)
  weights = batch['target_mask'].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['target_ids'])
  correct = (jnp.argmax(logits, -1) == batch['target_ids']) * weights
  return {'rec_loss': jnp.sum(losses * weights), 'rec_correct': jnp.sum(correct), 'rec_count': jnp.sum(weights)}


def encdec_summarize(sums):
  count = sums['rec_count'] + 1e-5
  return {'loss': sums['rec_loss'] / count, 'accuracy': sums['rec_correct'] / count}


ENCDEC = Objective(batch_ndims={k: 2 for k in ENCDEC_BATCH_KEYS}, sums=encdec_sums,
                   totals=lambda batch: {'rec': jnp.sum(batch['target_mask'].astype(jnp.float32)) + 1e-5},
                   loss=lambda sums, totals: sums['rec_loss'] / totals['rec'], summarize=encdec_summarize)


def make_eval_step(graphdef, objective: 'Objective | None' = None):
  """Returns `eval_step(params, batch) -> sums` (no dropout); sum over batches, then `summarize`."""
  objective = objective or BERT

  def eval_step(params, batch):
    return objective.sums(graphdef, params, batch, None)
  return eval_step


def _batch_shardings(mesh, objective: 'Objective | None' = None):
  return {k: mesh_lib.batch_sharding(mesh, ndim) for k, ndim in (objective or BERT).batch_ndims.items()}


def jit_train_step(train_step, state_shardings, mesh, objective: 'Objective | None' = None):
  """Explicit in/out shardings; the old state is donated so params and moments are updated in place."""
  return jax.jit(train_step, in_shardings=(state_shardings, _batch_shardings(mesh, objective)),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


def jit_eval_step(eval_step, param_shardings, mesh, objective: 'Objective | None' = None):
  return jax.jit(eval_step, in_shardings=(param_shardings, _batch_shardings(mesh, objective)),
                 out_shardings=NamedSharding(mesh, P()))

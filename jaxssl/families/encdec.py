"""The encoder-decoder family: denoising reconstruction (BART / MASS corruptions).

Batches come from data/examples/denoising.py; the loss is the cross-entropy of the original piece given its
corruption (teacher forcing), over the real target tokens of the global batch.
"""
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxssl.data.examples import denoising
from jaxssl.families import family as family_lib
from jaxssl.models import encdec

ENCDEC_BATCH_KEYS = denoising.BATCH_KEYS  # source_ids, source_mask, target_input_ids, target_ids, target_mask


def encdec_sums(graphdef, params, batch, dropout_rng):
  """Summed reconstruction cross-entropy and correct tokens over the real target positions (teacher forcing)."""
  model = nnx.merge(graphdef, params)
  logits = model(batch['source_ids'], batch['source_mask'], batch['target_input_ids'], batch['target_mask'],
                 dropout_rng=dropout_rng)
  weights = batch['target_mask'].astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch['target_ids'])
  correct = (jnp.argmax(logits, -1) == batch['target_ids']) * weights
  return {'rec_loss': jnp.sum(losses * weights), 'rec_correct': jnp.sum(correct), 'rec_count': jnp.sum(weights)}


def encdec_summarize(sums):
  """Per-token reconstruction loss and accuracy."""
  count = sums['rec_count'] + 1e-5
  return {'loss': sums['rec_loss'] / count, 'accuracy': sums['rec_correct'] / count}


OBJECTIVE = family_lib.Objective(
    batch_ndims={k: 2 for k in ENCDEC_BATCH_KEYS}, sums=encdec_sums,
    totals=lambda batch: {'rec': jnp.sum(batch['target_mask'].astype(jnp.float32)) + 1e-5},
    loss=lambda sums, totals: sums['rec_loss'] / totals['rec'], summarize=encdec_summarize)


def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  """Endless iterator over this process's share of the denoising batches from `start_step` on."""
  return denoising.make_denoising_iterator(source, tokenizer, config.data, seed=seed, start_step=start_step,
                                           global_batch_size=config.train.batch_size, process_index=process_index,
                                           process_count=process_count)


def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  """The fixed held-out denoising batches (same corruptions every call)."""
  return denoising.make_denoising_eval_batches(source, tokenizer, config.data, seed=seed,
                                               batch_size=config.train.batch_size, num_batches=config.eval.batches,
                                               process_index=process_index, process_count=process_count)


def batch_shapes(config) -> dict:
  """{key: (per-row shape, dtype)} of a denoising batch."""
  return {k: ((config.data.seq_len,), np.int32) for k in ENCDEC_BATCH_KEYS}


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """Sources `[CLS] corrupted [SEP]` and targets `piece` (decoder input `[CLS] piece`) of 3/4 to all of seq_len,
  padded with id 0; the masks are 1 on real tokens (ids 1 and 2 stand in for [CLS] and [SEP])."""
  rng = np.random.default_rng(seed)
  b, n = config.train.batch_size, config.data.seq_len
  tokens = rng.integers(5, vocab_size, (b, n), dtype=np.int32)
  source_len = rng.integers(max(2, 3 * n // 4), n + 1, (b,))
  target_len = rng.integers(max(1, 3 * n // 4), n, (b,))  # + the decoder-start token fits in n
  out = {k: np.zeros((b, n), np.int32) for k in ENCDEC_BATCH_KEYS}
  for r in range(b):
    s, t = source_len[r], target_len[r]
    out['source_ids'][r, :s] = [1, *tokens[r, :s - 2], 2]
    out['target_ids'][r, :t + 1] = [*tokens[r, :t], 2]
    out['target_input_ids'][r, :t + 1] = [1, *tokens[r, :t]]
    out['source_mask'][r, :s] = 1
    out['target_mask'][r, :t + 1] = 1
  return out


SHAPE_KEYS = ('name', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position',
              'num_decoder_layers')


def shape_value(model: dict, key: str):
  """`model[key]`; no `num_decoder_layers` (or 0) means as many decoder layers as encoder layers."""
  value = model.get(key)
  if key == 'num_decoder_layers' and not value:
    return model.get('num_layers')
  return value


def check_config(config) -> None:
  """Corruption settings fail here, not after the tokenizer is trained."""
  denoising.DenoisingConfig.from_config(config.data)


FAMILY = family_lib.Family(
    name='encdec', model_class=encdec.EncoderDecoder, build=encdec.EncoderDecoder,
    flops_per_token=encdec.flops_per_token, validate=encdec.EncDecConfig.from_config, objective=OBJECTIVE,
    train_batches=train_batches, eval_batches=eval_batches, batch_shapes=batch_shapes,
    synthetic_batch=synthetic_batch, shape_keys=SHAPE_KEYS, shape_value=shape_value, check_config=check_config)

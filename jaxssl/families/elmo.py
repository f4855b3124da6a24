"""The ELMo family: forward + backward LSTM language models on the same packed documents as GPT.

The loss is the mean of the two directions' per-token losses; eval reports each direction's perplexity (no
per-word figure).
"""
import jax.numpy as jnp
from flax import nnx

from jaxssl.families import family as family_lib
from jaxssl.families import gpt as gpt_family
from jaxssl.models import elmo


def elmo_sums(graphdef, params, batch, dropout_rng):
  """Summed forward (token t+1 from state t) and backward (token t-1 from state t) LM losses, within a document
  only; both directions count the same pairs (`lm_count`)."""
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


OBJECTIVE = family_lib.Objective(
    batch_ndims=gpt_family.OBJECTIVE.batch_ndims, sums=elmo_sums, totals=gpt_family.lm_totals,
    loss=lambda sums, totals: (sums['forward_loss'] + sums['backward_loss']) / (2 * totals['lm']),
    summarize=elmo_summarize)

SHAPE_KEYS = ('name', 'num_layers', 'max_position', 'tie_embeddings', 'embed_size', 'lstm_size')


def shape_value(model: dict, key: str):
  """`model[key]`; configs without `tie_embeddings` tie (as every config written so far)."""
  return model.get(key, True if key == 'tie_embeddings' else None)


def frozen_in_finetuning(model_cfg):
  """ELMo's paper setting unless `finetune_bilm`: the biLM stays as pretrained; only its layer mix (ScalarMix)
  and the head learn."""
  if model_cfg.get('finetune_bilm', False):
    return None
  return lambda path: path[0] == 'body' and 'scalar_mix' not in path


# Embeddings: the sentence; embed(): 0 = token embedding (both directions), l = concat(fwd_l, bwd_l).
EMBEDDINGS = family_lib.EmbeddingHooks(
    frame=lambda tokenizer, ids: (list(ids), 0),
    # padding is its own segment: no leak either way
    layer_stack=lambda model, input_ids, mask: model.embed(input_ids, mask).astype(jnp.float32),
    static_table=lambda model: model.token_embeddings, num_layers=lambda model: model.config.num_layers + 1)


FAMILY = family_lib.Family(
    name='elmo', model_class=elmo.ElmoModel, build=elmo.ElmoModel, flops_per_token=elmo.flops_per_token,
    validate=elmo.ElmoConfig.from_config, objective=OBJECTIVE, train_batches=gpt_family.train_batches,
    eval_batches=gpt_family.eval_batches, batch_shapes=gpt_family.batch_shapes,
    synthetic_batch=gpt_family.synthetic_batch, shape_keys=SHAPE_KEYS, shape_value=shape_value,
    embeddings=EMBEDDINGS, frozen_in_finetuning=frozen_in_finetuning)

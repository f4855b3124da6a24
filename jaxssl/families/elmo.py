"""The ELMo family: forward + backward LSTM language models on the same packed documents as GPT.

Batches are GPT's packed rows plus `char_ids` [B, T, max_chars] (data/examples/elmo_chars.py; width 0 for a
token_input=tokens model). The loss is the mean of the two directions' per-token losses; eval reports each
direction's perplexity (no per-word figure).
"""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.data.examples import elmo_chars as char_examples
from jaxssl.errors import UserError
from jaxssl.families import family as family_lib
from jaxssl.families import gpt as gpt_family
from jaxssl.models import elmo, elmo_chars


def elmo_sums(graphdef, params, batch, dropout_rng):
  """Summed forward (token t+1 from state t) and backward (token t-1 from state t) LM losses, within a document
  only; both directions count the same pairs (`lm_count`)."""
  model = nnx.merge(graphdef, params)
  forward, backward = model(batch['input_ids'], segment_ids=batch['segment_ids'], char_ids=batch.get('char_ids'),
                            dropout_rng=dropout_rng)
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
    batch_ndims={**gpt_family.OBJECTIVE.batch_ndims, 'char_ids': 3}, sums=elmo_sums, totals=gpt_family.lm_totals,
    loss=lambda sums, totals: (sums['forward_loss'] + sums['backward_loss']) / (2 * totals['lm']),
    summarize=elmo_summarize)

# ----- batches: GPT's packed rows + char ids -----

def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  """Endless iterator over this process's share of the packed batches (with char ids) from `start_step` on."""
  return char_examples.make_lm_iterator(
      source, tokenizer, char_examples.char_table(tokenizer, config.model), seq_len=config.data.seq_len, seed=seed,
      global_batch_size=config.train.batch_size, start_step=start_step, num_threads=config.data.num_threads,
      num_workers=config.data.num_workers, process_index=process_index, process_count=process_count)


def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  """The first `eval.batches` packed batches (with char ids) of the held-out split."""
  return char_examples.make_lm_eval_batches(
      source, tokenizer, char_examples.char_table(tokenizer, config.model), seq_len=config.data.seq_len, seed=seed,
      batch_size=config.train.batch_size, num_batches=config.eval.batches, process_index=process_index,
      process_count=process_count)


def char_width(model_cfg) -> int:
  """Width of the batches' char ids: max_chars for token_input=chars, else 0."""
  return int(model_cfg.get('max_chars', 50)) if model_cfg.get('token_input', 'tokens') == 'chars' else 0


def batch_shapes(config) -> dict:
  """{key: (per-row shape, dtype)}: GPT's packed rows and char ids [seq_len, char_width]."""
  return {**gpt_family.batch_shapes(config), 'char_ids': ((config.data.seq_len, char_width(config.model)), np.int32)}


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """GPT's synthetic rows, each token's char ids random words of 1..max_chars - 2 bytes (bench)."""
  batch = gpt_family.synthetic_batch(config, vocab_size, seed)
  width, rng = char_width(config.model), np.random.default_rng([seed, 1])
  words = {i: bytes(rng.integers(97, 123, int(rng.integers(1, max(2, width - 1))), dtype=np.uint8))
           for i in np.unique(batch['input_ids'])} if width else {}
  table = np.zeros((vocab_size, width), np.int32)
  for i, word in words.items():
    table[i] = char_examples.word_char_ids(word, width)
  return char_examples.with_char_ids(batch, table)


# ----- checkpoint shape keys -----

SHAPE_KEYS = ('name', 'num_layers', 'max_position', 'tie_embeddings', 'embed_size', 'lstm_size', 'token_input',
              'char_embed_size', 'char_filters', 'highway_layers')
CHAR_SHAPE_DEFAULTS = {'char_embed_size': 16, 'char_filters': elmo_chars.PAPER_FILTERS, 'highway_layers': 2}


def shape_value(model: dict, key: str):
  """`model[key]` as it shapes params: configs without `tie_embeddings` tie and read tokens (as every config
  written before the char encoder); the char encoder's keys count only for token_input=chars."""
  token_input = model.get('token_input', 'tokens')
  if key == 'token_input':
    return token_input
  if key in CHAR_SHAPE_DEFAULTS:
    if token_input != 'chars':
      return None
    value = model.get(key, CHAR_SHAPE_DEFAULTS[key])
    return elmo_chars.filters_tuple(value) if key == 'char_filters' else value
  return model.get(key, True if key == 'tie_embeddings' else None)


def frozen_in_finetuning(model_cfg):
  """ELMo's paper setting unless `finetune_bilm`: the biLM stays as pretrained; only its layer mix (ScalarMix)
  and the head learn."""
  if model_cfg.get('finetune_bilm', False):
    return None
  return lambda path: path[0] == 'body' and 'scalar_mix' not in path


# ----- embeddings: the sentence; embed(): 0 = the token's input vector (both directions), l = concat(fwd_l, bwd_l)

def embedding_inputs(model, tokenizer, input_ids) -> dict:
  """Extra keyword inputs of `layer_stack` for `input_ids` [B, T]: a chars model's char ids, else none."""
  if model.config.token_input != 'chars':
    return {}
  table = char_examples.vocabulary_char_ids(tokenizer, model.config.max_chars)
  return {'char_ids': jnp.asarray(table[np.asarray(input_ids)])}


def layer_stack(model, input_ids, mask, char_ids=None):
  """[L + 1, B, T, 2E] float32; padding is its own segment: no leak either way."""
  return model.embed(input_ids, mask, char_ids=char_ids).astype(jnp.float32)


def static_table(model):
  """The input token-embedding table; a chars model has none: its context-free vectors are `static_rows`."""
  if model.config.token_input == 'chars':
    raise UserError('a token_input=chars ELMo has no token table: its static vectors come from its char encoder '
                    '(families.elmo.static_rows)')
  return model.token_embeddings


def static_rows(model, tokenizer, ids) -> np.ndarray:
  """[N, E] float32 context-free vectors of token ids `ids` [N]: embedding rows, or a chars model's char CNN
  vectors of those pieces (ELMo's layer 0, one half)."""
  ids = np.asarray(ids, np.int32)
  if model.config.token_input != 'chars':
    return np.asarray(model.token_embeddings.embedding[...], np.float32)[ids]
  char_ids = char_examples.vocabulary_char_ids(tokenizer, model.config.max_chars)[ids]
  return np.asarray(model.token_vectors(None, jnp.asarray(char_ids[None]))[0], np.float32)


EMBEDDINGS = family_lib.EmbeddingHooks(
    frame=lambda tokenizer, ids: (list(ids), 0), layer_stack=layer_stack, static_table=static_table,
    num_layers=lambda model: model.config.num_layers + 1, model_inputs=embedding_inputs, static_rows=static_rows)


FAMILY = family_lib.Family(
    name='elmo', model_class=elmo.ElmoModel, build=elmo.ElmoModel, flops_per_token=elmo.flops_per_token,
    validate=elmo.ElmoConfig.from_config, objective=OBJECTIVE, train_batches=train_batches,
    eval_batches=eval_batches, batch_shapes=batch_shapes, synthetic_batch=synthetic_batch, shape_keys=SHAPE_KEYS, shape_value=shape_value,
    embeddings=EMBEDDINGS, frozen_in_finetuning=frozen_in_finetuning)

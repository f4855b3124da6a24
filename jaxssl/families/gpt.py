"""The GPT family (GPT-2 and the Llama and Gemma 3 variants): next-token LM on documents packed into full rows.

Batches come from data/examples/packed_lm.py; the loss is the next-token cross-entropy over the pairs inside one
document, divided by their count in the global batch. ELMo (families/elmo.py) trains on the same batches.
"""
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.families import family as family_lib
from jaxssl.models import gpt, lm_loss, parts

LM_BATCH_KEYS = ('input_ids', 'segment_ids', 'positions')


# ----- objective -----

def lm_sums(graphdef, params, batch, dropout_rng):
  """Summed next-token loss, correct predictions and predicted pairs (within a document only)."""
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
  """The number of predicted pairs (within a document) in the global batch."""
  return {'lm': jnp.sum(parts.next_token_pairs(batch['segment_ids'])).astype(jnp.float32) + 1e-5}


def lm_summarize(sums):
  """Per-token loss and accuracy."""
  loss = sums['lm_loss'] / (sums['lm_count'] + 1e-5)
  return {'loss': loss, 'accuracy': sums['lm_correct'] / (sums['lm_count'] + 1e-5)}


OBJECTIVE = family_lib.Objective(batch_ndims={k: 2 for k in LM_BATCH_KEYS}, sums=lm_sums, totals=lm_totals,
                                 loss=lambda sums, totals: sums['lm_loss'] / totals['lm'], summarize=lm_summarize)


# ----- batches (shared with ELMo) -----

def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  """Endless iterator over this process's share of the packed batches from `start_step` on."""
  from jaxssl.data.examples import packed_lm  # reason: grain's import (0.1 s) only where batches are made
  return packed_lm.make_lm_iterator(source, tokenizer, seq_len=config.data.seq_len, seed=seed,
                                    global_batch_size=config.train.batch_size, start_step=start_step,
                                    num_threads=config.data.num_threads, num_workers=config.data.num_workers,
                                    process_index=process_index, process_count=process_count)


def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  """The first `eval.batches` packed batches of the held-out split."""
  from jaxssl.data.examples import packed_lm  # reason: as train_batches
  return packed_lm.make_lm_eval_batches(source, tokenizer, seq_len=config.data.seq_len, seed=seed,
                                        batch_size=config.train.batch_size, num_batches=config.eval.batches,
                                        process_index=process_index, process_count=process_count)


def predicted_words(batches, tokenizer) -> float:
  """How many words the held-out LM batches predict: targets that start a word or end a document.

  A piece starts a word when it carries the tokenizer's space marker: sentencepiece's '▁', or 'Ġ' of byte-level
  BPE (GPT-2; there a word after a newline has no marker and is not counted, so the figure is approximate).
  PTB's per-word perplexity counts every word and one end-of-sentence per sentence; here the end token closes a
  document, so the figure is close to (slightly above) the literature's convention, not identical.
  """
  starts = np.array([(tokenizer.id_to_piece(i) or '').startswith(('\u2581', '\u0120'))
                     for i in range(tokenizer.vocab_size)])
  starts[tokenizer.sep_id] = True
  count = 0
  for b in batches:
    count += int(np.sum(starts[b['input_ids'][:, 1:]] & np.asarray(parts.next_token_pairs(b['segment_ids']))))
  return float(count)


def batch_shapes(config) -> dict:
  """{key: (per-row shape, dtype)} of a packed batch."""
  return {k: ((config.data.seq_len,), np.int32) for k in LM_BATCH_KEYS}


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """Full rows packed with 2-4 document pieces each: segment_ids 1, 2, ... and positions restarting at 0."""
  rng = np.random.default_rng(seed)
  b, length = config.train.batch_size, config.data.seq_len
  segment_ids, positions = np.zeros((b, length), np.int32), np.zeros((b, length), np.int32)
  for r in range(b):
    docs = min(int(rng.integers(2, 5)), length)
    cuts = np.sort(rng.choice(np.arange(1, length), docs - 1, replace=False)) if docs > 1 else np.array([], int)
    for s, (start, end) in enumerate(zip([0, *cuts], [*cuts, length])):
      segment_ids[r, start:end] = s + 1
      positions[r, start:end] = np.arange(end - start)
  return {'input_ids': rng.integers(5, vocab_size, (b, length), dtype=np.int32), 'segment_ids': segment_ids,
          'positions': positions}


# ----- checkpoint shape keys -----

SHAPE_KEYS = ('name', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position',
              'num_kv_heads', 'head_dim', 'norm', 'position', 'mlp', 'tie_embeddings', 'use_bias', 'attention_bias',
              'qk_norm', 'sandwich_norm')
# What a config without the key means (configs written before the Llama / Gemma variants are GPT-2 / Llama ones).
SHAPE_DEFAULTS = {'norm': 'layernorm', 'position': 'learned', 'mlp': 'gelu', 'tie_embeddings': True,
                  'use_bias': True, 'attention_bias': False, 'qk_norm': False, 'sandwich_norm': False}


def shape_value(model: dict, key: str):
  """`model[key]` as it shapes params: defaults filled in, 0 kv heads / head dim resolved as GPTConfig does."""
  value = model.get(key, SHAPE_DEFAULTS.get(key))
  if key == 'num_kv_heads' and not value:
    return model.get('num_heads')
  if key == 'head_dim' and not value and model.get('hidden_size') and model.get('num_heads'):
    return model['hidden_size'] // model['num_heads']
  return value


# ----- embeddings: the sentence (+ bos if any); only the final hidden state (after the final norm) -----

def _frame(tokenizer, ids):
  bos = [tokenizer.bos_id] if getattr(tokenizer, 'bos_id', None) is not None else []
  return [*bos, *ids], len(bos)


EMBEDDINGS = family_lib.EmbeddingHooks(
    # causal, so right padding cannot reach real tokens
    frame=_frame, layer_stack=lambda model, input_ids, mask: model.features(input_ids).astype(jnp.float32)[None],
    static_table=lambda model: model.token_embeddings, num_layers=lambda model: 1, last_layer_only=True)


FAMILY = family_lib.Family(
    name='gpt', model_class=gpt.GPT, build=gpt.GPT, flops_per_token=gpt.flops_per_token,
    validate=gpt.GPTConfig.from_config, objective=OBJECTIVE, train_batches=train_batches,
    eval_batches=eval_batches, batch_shapes=batch_shapes, synthetic_batch=synthetic_batch, shape_keys=SHAPE_KEYS,
    shape_value=shape_value, eval_context=lambda batches, tokenizer: (predicted_words(batches, tokenizer), {}),
    embeddings=EMBEDDINGS, generates=True)

"""Pretraining families by `model.name`: what each trains on (its step.Objective) and where its batches come from.

  family = families.family_for(config.model)
  batches = family.train_batches(sources['train'], tokenizer, config, start_step=s, **where)

The loop, compile-only and bench code are the same for every family; a new family (encoder-decoder, ELMo)
adds one `Family` here and nothing in them. Batch functions are pure in (seed, step), like the pipelines.
"""
import dataclasses
from typing import Callable

import numpy as np

from jaxssl.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Family:
  """How one model family pretrains."""
  objective: step_lib.Objective
  # (source, tokenizer, config, *, start_step, seed, process_index, process_count) -> iterator of local batches
  train_batches: Callable
  # (source, tokenizer, config, *, seed, process_index, process_count) -> fixed list of held-out local batches
  eval_batches: Callable
  # (config) -> {batch key: (per-row shape, numpy dtype)}: the layout train_batches yields (compile-only, bench)
  batch_shapes: Callable
  # (eval batches, tokenizer) -> (words the eval batches predict, or 0; extra fixed eval metrics)
  eval_context: Callable = lambda batches, tokenizer: (0.0, {})
  # (config, vocab_size, seed) -> one global batch of random but valid content in train_batches' layout (bench)
  synthetic_batch: Callable = None


# ----- BERT: masked LM + next-sentence prediction -----

def _bert_data_args(config, seed, process_index, process_count) -> dict:
  from jaxssl.data.examples import bert_pipeline as pipeline
  d = config.data
  return dict(seq_len=d.seq_len, max_predictions=d.max_predictions, mask_rate=d.mask_rate,
              short_seq_prob=d.short_seq_prob, seed=seed, process_index=process_index, process_count=process_count,
              **pipeline.masking_args(d))  # masking units (token, whole word, span, entity), the same for eval


def _bert_train(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import bert_pipeline as pipeline
  return pipeline.make_pretrain_iterator(source, tokenizer, global_batch_size=config.train.batch_size,
                                         start_step=start_step, num_threads=config.data.num_threads,
                                         **_bert_data_args(config, seed, process_index, process_count))


def _bert_eval(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import bert_pipeline as pipeline
  return pipeline.make_eval_batches(source, tokenizer, batch_size=config.train.batch_size,
                                    num_batches=config.eval.batches,
                                    **_bert_data_args(config, seed, process_index, process_count))


def _bert_shapes(config) -> dict:
  seq, preds = config.data.seq_len, config.data.get('max_predictions', config.data.seq_len)
  shapes = {'input_ids': (seq,), 'token_type_ids': (seq,), 'attention_mask': (seq,), 'mlm_positions': (preds,),
            'mlm_ids': (preds,), 'mlm_weights': (preds,), 'nsp_label': ()}
  return {k: (s, np.float32 if k == 'mlm_weights' else np.int32) for k, s in shapes.items()}


def _bert_synthetic(config, vocab_size: int, seed: int = 0) -> dict:
  """Full sentence pairs (A then B) with `max_predictions` positions predicted, as the pipeline's layout."""
  rng = np.random.default_rng(seed)
  b, length = config.train.batch_size, config.data.seq_len
  shapes = _bert_shapes(config)
  p = shapes['mlm_positions'][0][0]
  positions = np.sort(np.stack([rng.choice(np.arange(1, length), p, replace=False) for _ in range(b)]), -1)
  return {
      'input_ids': rng.integers(5, vocab_size, (b, length), dtype=np.int32),
      'token_type_ids': (np.arange(length)[None] >= length // 2).repeat(b, 0).astype(np.int32),
      'attention_mask': np.ones((b, length), np.int32),
      'mlm_positions': positions.astype(np.int32),
      'mlm_ids': rng.integers(5, vocab_size, (b, p), dtype=np.int32),
      'mlm_weights': np.ones((b, p), np.float32),
      'nsp_label': rng.integers(0, 2, (b,), dtype=np.int32),
  }


def most_frequent_token_accuracy(batches) -> float:
  """MLM accuracy of always predicting the commonest masked token: the baseline a model must beat."""
  ids = np.concatenate([b['mlm_ids'][b['mlm_weights'] > 0] for b in batches])
  return float(np.bincount(ids).max() / max(1, ids.size)) if ids.size else 0.0


BERT = Family(step_lib.BERT, _bert_train, _bert_eval, _bert_shapes,
              lambda batches, tokenizer: (0.0, {'mlm_baseline_accuracy': most_frequent_token_accuracy(batches)}),
              _bert_synthetic)


# ----- GPT: next-token LM on packed documents -----

def _gpt_train(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import packed_lm as lm_pipeline
  return lm_pipeline.make_lm_iterator(source, tokenizer, seq_len=config.data.seq_len, seed=seed,
                                      global_batch_size=config.train.batch_size, start_step=start_step,
                                      num_threads=config.data.num_threads, process_index=process_index,
                                      process_count=process_count)


def _gpt_eval(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import packed_lm as lm_pipeline
  return lm_pipeline.make_lm_eval_batches(source, tokenizer, seq_len=config.data.seq_len, seed=seed,
                                          batch_size=config.train.batch_size, num_batches=config.eval.batches,
                                          process_index=process_index, process_count=process_count)


def predicted_words(batches, tokenizer) -> float:
  """How many words the held-out LM batches predict: targets that start a word or end a document.

  A piece starts a word when it carries the tokenizer's space marker: sentencepiece's '▁', or 'Ġ' of byte-level
  BPE (GPT-2; there a word after a newline has no marker and is not counted, so the figure is approximate).
  PTB's per-word perplexity counts every word and one end-of-sentence per sentence; here the end token closes a
  document, so the figure is close to (slightly above) the literature's convention, not identical.
  """
  from jaxssl.models import gpt
  starts = np.array([(tokenizer.id_to_piece(i) or '').startswith(('\u2581', '\u0120'))
                     for i in range(tokenizer.vocab_size)])
  starts[tokenizer.sep_id] = True
  count = 0
  for b in batches:
    count += int(np.sum(starts[b['input_ids'][:, 1:]] & np.asarray(gpt.next_token_pairs(b['segment_ids']))))
  return float(count)


def _lm_shapes(config) -> dict:
  return {k: ((config.data.seq_len,), np.int32) for k in step_lib.LM_BATCH_KEYS}


def _lm_synthetic(config, vocab_size: int, seed: int = 0) -> dict:
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


GPT = Family(step_lib.GPT, _gpt_train, _gpt_eval, _lm_shapes,
             lambda batches, tokenizer: (predicted_words(batches, tokenizer), {}), _lm_synthetic)


# ----- ELMo: forward + backward LM on the same packed documents as GPT -----

# Eval reports per-token perplexity of each direction (no per-word figure: `words` is for the loop's lm_loss).
ELMO = Family(step_lib.ELMO, _gpt_train, _gpt_eval, _lm_shapes, synthetic_batch=_lm_synthetic)


# ----- encoder-decoder: denoising reconstruction (BART / MASS) -----

def _encdec_train(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import denoising
  return denoising.make_denoising_iterator(source, tokenizer, config.data, seed=seed, start_step=start_step,
                                           global_batch_size=config.train.batch_size, process_index=process_index,
                                           process_count=process_count)


def _encdec_eval(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  from jaxssl.data.examples import denoising
  return denoising.make_denoising_eval_batches(source, tokenizer, config.data, seed=seed,
                                               batch_size=config.train.batch_size, num_batches=config.eval.batches,
                                               process_index=process_index, process_count=process_count)


def _encdec_synthetic(config, vocab_size: int, seed: int = 0) -> dict:
  """Sources `[CLS] corrupted [SEP]` and targets `piece` (decoder input `[CLS] piece`) of 3/4 to all of seq_len,
  padded with id 0; the masks are 1 on real tokens (ids 1 and 2 stand in for [CLS] and [SEP])."""
  rng = np.random.default_rng(seed)
  b, n = config.train.batch_size, config.data.seq_len
  tokens = rng.integers(5, vocab_size, (b, n), dtype=np.int32)
  source_len = rng.integers(max(2, 3 * n // 4), n + 1, (b,))
  target_len = rng.integers(max(1, 3 * n // 4), n, (b,))  # + the decoder-start token fits in n
  out = {k: np.zeros((b, n), np.int32) for k in step_lib.ENCDEC_BATCH_KEYS}
  for r in range(b):
    s, t = source_len[r], target_len[r]
    out['source_ids'][r, :s] = [1, *tokens[r, :s - 2], 2]
    out['target_ids'][r, :t + 1] = [*tokens[r, :t], 2]
    out['target_input_ids'][r, :t + 1] = [1, *tokens[r, :t]]
    out['source_mask'][r, :s] = 1
    out['target_mask'][r, :t + 1] = 1
  return out


ENCDEC = Family(step_lib.ENCDEC, _encdec_train, _encdec_eval,
                lambda config: {k: ((config.data.seq_len,), np.int32) for k in step_lib.ENCDEC_BATCH_KEYS},
                synthetic_batch=_encdec_synthetic)


FAMILIES = {'bert': BERT, 'gpt': GPT, 'elmo': ELMO, 'encdec': ENCDEC}


def family_for(model_cfg) -> Family:
  """The pretraining family of `model.name` (the model registry has already checked the name)."""
  return FAMILIES[model_cfg.name]

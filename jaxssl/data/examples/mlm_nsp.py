"""BERT pretraining examples in pure numpy: next-sentence pairs, packing, masked-LM masking.

Follows google-research/bert create_pretraining_data.py, but makes one example per call (the pipeline draws
a fresh example for every (seed, step, row)) instead of walking a whole document. Every function is a pure
function of its arguments and the numpy Generator it is given.
"""
from typing import Sequence

import numpy as np


def truncate_seq_pair(tokens_a: list[int], tokens_b: list[int], max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[list[int], list[int]]:
  """Trims the pair to at most `max_num_tokens`, like BERT's truncate_seq_pair.

  BERT removes one token at a time from the longer side (B on ties), from its front or back with
  probability 1/2. Which side loses how many tokens depends only on the lengths, and the front/back split of
  k removals is Binomial(k, 1/2), so this draws the same distribution without a per-token loop.
  """
  la, lb = len(tokens_a), len(tokens_b)
  excess = la + lb - max_num_tokens
  if excess <= 0:
    return tokens_a, tokens_b
  ka = kb = 0
  # First the longer side shrinks to the length of the shorter one...
  if la > lb:
    ka = min(excess, la - lb)
  elif lb > la:
    kb = min(excess, lb - la)
  rest = excess - ka - kb
  # ...then they alternate, B first (ties go to B).
  kb += (rest + 1) // 2
  ka += rest // 2
  front_a = int(rng.binomial(ka, 0.5)) if ka else 0
  front_b = int(rng.binomial(kb, 0.5)) if kb else 0
  return (tokens_a[front_a:la - (ka - front_a)], tokens_b[front_b:lb - (kb - front_b)])


def make_nsp_pair(doc_sentences: Sequence[Sequence[int]], random_doc_sentences: Sequence[Sequence[int]],
                  rng: np.random.Generator, max_num_tokens: int,
                  short_seq_prob: float) -> tuple[list[int], list[int], bool]:
  """Draws one next-sentence-prediction pair (tokens_a, tokens_b, is_random_next) from a document.

  `doc_sentences` and `random_doc_sentences` are non-empty lists of non-empty token-id lists (the pipeline
  drops empty sentences). As in BERT: the target length is `max_num_tokens` (= seq_len - 3), or with
  probability `short_seq_prob` a random length in [2, max_num_tokens]; a chunk of consecutive sentences is
  gathered until it reaches the target; A is its first 1..len-1 sentences; B is the rest of the chunk (the
  true continuation) with probability 1/2, else sentences of the random document from a random start until
  B reaches the remaining target (is_random_next=True). The pair is then truncated to max_num_tokens.

  Two deliberate differences from BERT, both to keep the IsNext/random split at exactly 1/2: the chunk
  starts at a random sentence that has a successor, and it always takes at least two sentences when the
  document has them (BERT forces a random B whenever a chunk holds one sentence, e.g. one long sentence).
  A single-sentence document always gets a random B.
  """
  if max_num_tokens < 2:
    raise ValueError(f'max_num_tokens must be >= 2, got {max_num_tokens}')
  if not doc_sentences or not random_doc_sentences:
    raise ValueError('make_nsp_pair needs non-empty documents')
  target = max_num_tokens
  if rng.random() < short_seq_prob:
    target = int(rng.integers(2, max_num_tokens + 1))
  n = len(doc_sentences)
  start = int(rng.integers(0, n - 1)) if n >= 2 else 0
  chunk = []
  length = 0
  for i in range(start, n):
    chunk.append(doc_sentences[i])
    length += len(doc_sentences[i])
    if length >= target and len(chunk) >= 2:
      break
  a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
  tokens_a = [t for s in chunk[:a_end] for t in s]
  is_random_next = len(chunk) == 1 or rng.random() < 0.5
  tokens_b = []
  if is_random_next:
    target_b = target - len(tokens_a)
    for s in random_doc_sentences[int(rng.integers(0, len(random_doc_sentences))):]:
      tokens_b.extend(s)
      if len(tokens_b) >= target_b:
        break
  else:
    tokens_b = [t for s in chunk[a_end:] for t in s]
  tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
  return tokens_a, tokens_b, bool(is_random_next)


def pack_pair(tokens_a: Sequence[int], tokens_b: Sequence[int], seq_len: int, cls_id: int, sep_id: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """Lays out `[CLS] A [SEP] B [SEP]` then padding, as int32 arrays of length seq_len.

  token_type_ids: 0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding; attention_mask: 1 on real tokens.
  """
  la, lb = len(tokens_a), len(tokens_b)
  n = la + lb + 3
  if n > seq_len:
    raise ValueError(f'pair of {la}+{lb} tokens does not fit seq_len={seq_len} (truncate to seq_len - 3)')
  input_ids = np.full(seq_len, pad_id, np.int32)
  input_ids[0] = cls_id
  input_ids[1:1 + la] = tokens_a
  input_ids[1 + la] = sep_id
  input_ids[2 + la:2 + la + lb] = tokens_b
  input_ids[n - 1] = sep_id
  token_type_ids = np.zeros(seq_len, np.int32)
  token_type_ids[2 + la:n] = 1
  attention_mask = np.zeros(seq_len, np.int32)
  attention_mask[:n] = 1
  return dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)


def mask_tokens(input_ids: np.ndarray, candidate_mask: np.ndarray, rng: np.random.Generator, *,
                mask_rate: float, max_predictions: int, mask_id: int, vocab_low: int,
                vocab_high: int) -> dict[str, np.ndarray]:
  """BERT masked-LM corruption of one sequence.

  Candidates are the positions where `candidate_mask` is true (the caller excludes special tokens and
  padding). num_to_predict = min(max_predictions, max(1, round(n_candidates * mask_rate))) positions are
  chosen uniformly without replacement; each, independently, becomes `mask_id` with probability 0.8, a
  uniform random id in [vocab_low, vocab_high) with 0.1, or stays unchanged with 0.1.

  Returns input_ids (the corrupted copy, int32 [L]), mlm_positions and mlm_ids (int32 [max_predictions]:
  chosen positions ascending and their original ids) and mlm_weights (float32 [max_predictions], 1 on real
  predictions). Unused slots have position 0, id 0, weight 0. With no candidates nothing is masked.
  """
  input_ids = np.asarray(input_ids)
  candidates = np.flatnonzero(np.asarray(candidate_mask))
  k = _num_to_predict(len(candidates), mask_rate, max_predictions)
  positions = np.sort(rng.choice(candidates, size=k, replace=False)) if k else np.zeros(0, np.int64)
  original = input_ids[positions]
  u = rng.random(k)
  random_ids = rng.integers(vocab_low, vocab_high, size=k)
  replaced = np.where(u < 0.8, mask_id, np.where(u < 0.9, random_ids, original))
  return _mlm_outputs(input_ids, positions, original, replaced, max_predictions)


def _num_to_predict(n_candidates: int, mask_rate: float, max_predictions: int) -> int:
  # round() like BERT (ties to even); the cap keeps the output shape fixed.
  return min(max_predictions, max(1, int(round(n_candidates * mask_rate)))) if n_candidates else 0


def _mlm_outputs(input_ids, positions, original, replaced, max_predictions) -> dict[str, np.ndarray]:
  masked = input_ids.astype(np.int32, copy=True)
  masked[positions] = replaced
  k = len(positions)
  mlm_positions = np.zeros(max_predictions, np.int32)
  mlm_ids = np.zeros(max_predictions, np.int32)
  mlm_weights = np.zeros(max_predictions, np.float32)
  mlm_positions[:k] = positions
  mlm_ids[:k] = original
  mlm_weights[:k] = 1.0
  return dict(input_ids=masked, mlm_positions=mlm_positions, mlm_ids=mlm_ids, mlm_weights=mlm_weights)


def _fill_budget(sizes: np.ndarray, budget: int) -> np.ndarray:
  """Which units (sizes in the order they are tried) are taken: each whole if it still fits, else skipped."""
  cum = np.cumsum(sizes)
  j = int(np.searchsorted(cum, budget, side='right'))  # units [0, j) fit together: no loop for them
  take = np.zeros(len(sizes), bool)
  take[:j] = True
  used = int(cum[j - 1]) if j else 0
  for i in range(j + 1, len(sizes)):  # unit j overflows by definition; later, smaller ones may still fit
    if used >= budget:
      break
    if used + sizes[i] <= budget:
      take[i] = True
      used += int(sizes[i])
  return take


def mask_units(input_ids: np.ndarray, units: np.ndarray, rng: np.random.Generator, *, mask_rate: float,
               max_predictions: int, mask_id: int, vocab_low: int, vocab_high: int,
               replace_per_unit: bool = False) -> dict[str, np.ndarray]:
  """Masked-LM corruption of one sequence by units (whole words, spans, phrases: data/examples/masking_units.py).

  `units` gives each token's unit id (0, 1, ...; -1 = never masked). The budget is mask_tokens's:
  k = min(max_predictions, max(1, round(n_candidates * mask_rate))) tokens. Units are tried in a random
  order (rng.permutation) and taken all or nothing: one that would overflow k is skipped and the next tried,
  as Google's whole-word masking does, so slightly fewer than k tokens may be masked (none when every unit is
  larger than k). Each masked token becomes `mask_id` (0.8), a random id in [vocab_low, vocab_high) (0.1) or
  stays (0.1): drawn per token, or with `replace_per_unit` once per unit for all its tokens (SpanBERT, ERNIE;
  a unit's random replacements are still independent ids). Returns what mask_tokens returns.
  """
  input_ids = np.asarray(input_ids)
  units = np.asarray(units)
  cand = units >= 0
  k = _num_to_predict(int(cand.sum()), mask_rate, max_predictions)
  n_units = int(units.max()) + 1 if k else 0
  sizes = np.bincount(units[cand], minlength=n_units)
  order = rng.permutation(n_units)
  take = np.zeros(n_units, bool)
  take[order[_fill_budget(sizes[order], k)]] = True
  positions = np.flatnonzero(cand & take[np.maximum(units, 0)]) if n_units else np.zeros(0, np.int64)
  original = input_ids[positions]
  if replace_per_unit:
    u = rng.random(n_units)[units[positions]]
  else:
    u = rng.random(len(positions))
  random_ids = rng.integers(vocab_low, vocab_high, size=len(positions))
  replaced = np.where(u < 0.8, mask_id, np.where(u < 0.9, random_ids, original))
  return _mlm_outputs(input_ids, positions, original, replaced, max_predictions)

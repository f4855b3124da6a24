"""The GPT pretraining input pipeline: documents packed into full sequences, as a pure function of (seed, step).

Each epoch e orders the documents by a permutation of (seed, e) and concatenates their tokens (each document's
sentences, then an end-of-document token) into one stream; row g of the global batches is the stream's tokens
[g * L, (g + 1) * L) (epochs follow one another). A row carries `segment_ids` (1, 2, ... per document piece in the row;
0 = padding, never used here since rows are full) and `positions` that restart at 0 for each piece, so the
model attends only within a document and no loss crosses a boundary. Resuming needs only the step.

The stream offsets need every document's token count: they are computed once at start (tokenizing the split),
which is fine for PTB-sized corpora; for billions of tokens a precomputed index belongs in the prepared dataset.
"""
from typing import Iterator

import numpy as np

from jaxssl.data.examples import rows
from jaxssl.errors import UserError

_EPOCH_CACHE = 4


class PackedDocuments:
  """Global row index → {'input_ids', 'segment_ids', 'positions'} of `seq_len` tokens."""

  def __init__(self, source, tokenizer, *, seq_len: int, seed: int, end_id: int | None = None):
    self.source, self.tokenizer, self.seq_len, self.seed = source, tokenizer, seq_len, seed
    self.end_id = tokenizer.sep_id if end_id is None else end_id
    self.num_docs = len(source)
    if self.num_docs < 1:
      raise UserError('the corpus split has no documents: pass a larger --config.data.corpus')
    if seq_len < 2 or seed < 0:
      raise UserError(f'data.seq_len={seq_len} must be >= 2 and train.seed={seed} >= 0')
    self.lengths = np.array([len(t) for t in self._tokens(range(self.num_docs))], np.int64)
    self.tokens_per_epoch = int(self.lengths.sum())
    self._epochs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

  def _tokens(self, docs) -> list[list[int]]:
    """Token ids of documents: their sentences' pieces, then the end-of-document token."""
    records = self.source.__getitems__(list(docs))
    per_doc = [[s for s in record['text'].decode('utf-8').split('\n') if s] for record in records]
    # One encode call for all the documents: a call per document (2,842 in the README's GPT run) cost more in
    # sentencepiece's per-call threads than in encoding.
    pieces = iter(self.tokenizer.encode([s for sentences in per_doc for s in sentences]))
    return [[i for _ in sentences for i in next(pieces)] + [self.end_id] for sentences in per_doc]

  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, stream offset of each position in that order) of `epoch`."""
    if epoch not in self._epochs:
      if len(self._epochs) >= _EPOCH_CACHE:
        self._epochs.pop(min(self._epochs))
      order = np.random.default_rng([self.seed, 3, epoch]).permutation(self.num_docs)
      starts = np.concatenate([[0], np.cumsum(self.lengths[order])[:-1]])
      self._epochs[epoch] = (order, starts)
    return self._epochs[epoch]

  def _pieces(self, start: int, stop: int):
    """(document, first token, count) pieces covering stream tokens [start, stop)."""
    pieces, position = [], start
    while position < stop:
      epoch, offset = divmod(position, self.tokens_per_epoch)
      order, starts = self._epoch(epoch)
      k = int(np.searchsorted(starts, offset, side='right') - 1)
      doc = int(order[k])
      first = offset - int(starts[k])
      count = min(int(self.lengths[doc]) - first, stop - position)
      pieces.append((doc, first, count))
      position += count
    return pieces

  def rows(self, indices) -> dict[str, np.ndarray]:
    """The packed rows of global row indices `indices`, stacked."""
    indices = list(indices)
    per_row = [self._pieces(g * self.seq_len, (g + 1) * self.seq_len) for g in indices]
    docs = sorted({doc for pieces in per_row for doc, _, _ in pieces})
    tokens = dict(zip(docs, self._tokens(docs)))
    out = {k: np.zeros((len(indices), self.seq_len), np.int32) for k in ('input_ids', 'segment_ids', 'positions')}
    for r, pieces in enumerate(per_row):
      at = 0
      for segment, (doc, first, count) in enumerate(pieces, 1):
        out['input_ids'][r, at:at + count] = tokens[doc][first:first + count]
        out['segment_ids'][r, at:at + count] = segment
        # Positions restart with every piece (a document cut at the row's start included): they stay below
        # seq_len, and the model never sees a position it was not trained on.
        out['positions'][r, at:at + count] = np.arange(count)
        at += count
    return out


def local_rows(packed: PackedDocuments, step: int, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global batch of `step`."""
  first, local = rows.process_rows(global_batch_size, process_index, process_count)
  start = step * global_batch_size + first
  return packed.rows(range(start, start + local))


def make_lm_iterator(source, tokenizer, *, seq_len: int, seed: int, global_batch_size: int, start_step: int = 0,
                     process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                     prefetch: int = 2, num_workers: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this process's share of the packed batches of steps start_step, start_step+1, ..."""
  rows.process_rows(global_batch_size, process_index, process_count)
  packed = PackedDocuments(source, tokenizer, seq_len=seq_len, seed=seed)
  return rows.step_batches(
      lambda step: local_rows(packed, step, global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count),
      start_step=start_step, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


def make_lm_eval_batches(source, tokenizer, *, seq_len: int, batch_size: int, num_batches: int, seed: int,
                         process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed held-out batches: the first `num_batches` batches of the held-out split's stream (epoch 0)."""
  packed = PackedDocuments(source, tokenizer, seq_len=seq_len, seed=seed)
  return [local_rows(packed, b, global_batch_size=batch_size, process_index=process_index,
                     process_count=process_count) for b in range(num_batches)]

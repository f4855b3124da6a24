"""The BERT pretraining input pipeline: documents -> (MLM + NSP) examples -> this process's share of a batch.

The batch at step s is a pure function of (seed, s): global row j of step s is the global example index
g = s * global_batch_size + j, and example g is built from document permutation(seed, g // N)[g % N] with the
rng default_rng([seed, 1, g]). Nothing depends on the process count or on what was read before, so a run
resumes at any step (the checkpoint only needs the step) on any number of hosts, and masks are fresh every
epoch (g differs) yet reproducible.

Token ids come from the tokenizer (`cls_id`, `sep_id`, `pad_id`, `mask_id`, `special_ids`, `random_token_range`),
so jaxssl's sentencepiece models and the WordPiece vocabularies of public BERT checkpoints both work.

`masking` picks the MLM unit (data/examples/masking_units.py): 'token' (BERT, the default), 'whole_word', 'span'
(SpanBERT) or 'entity' (ERNIE, phrases of `masking_lexicon`); `chinese_segmenter='jieba'` finds the words of
Chinese text. Units are drawn from the same per-example rng, so batches stay pure in (seed, step).
"""
import threading
from typing import Any, Iterator

import numpy as np

from jaxssl.data.examples import masking_units, mlm_nsp, rows
from jaxssl.errors import UserError

# jaxssl's sentencepiece layout (data/tokenizers.py): what a tokenizer that only has `num_special` gets.
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
_EPOCH_CACHE = 4  # permutations kept; a batch spans at most two epochs, prefetch threads a few steps


class PretrainExamples:
  """Global example index -> one BERT pretraining example, as a pure function of (seed, index).

  Per example: input_ids, token_type_ids, attention_mask (int32 [seq_len]), mlm_positions, mlm_ids
  (int32 [max_predictions]), mlm_weights (float32 [max_predictions]) and nsp_label (int32 scalar:
  0 = B is the real continuation "IsNext", 1 = B comes from a random document; BERT's convention).

  `examples(indices)` builds several at once and is much faster than one by one: it reads all documents with
  one `source.__getitems__` and tokenizes all their sentences with one `tokenizer.encode` call.
  """

  def __init__(self, source, tokenizer, *, seq_len: int, max_predictions: int, mask_rate: float,
               short_seq_prob: float, seed: int, masking: str = 'token', masking_lexicon: str = '',
               chinese_segmenter: str = ''):
    masking_units.check_masking_config(masking, masking_lexicon, chinese_segmenter)
    self.source = source
    self.tokenizer = tokenizer
    self.num_docs = len(source)
    if self.num_docs < 2:
      raise UserError(f'a corpus split has {self.num_docs} document(s); next-sentence prediction needs at least 2 '
                      'in each (split the text into documents, or use a larger corpus)')
    if seq_len < 5:
      raise UserError(f'data.seq_len={seq_len} is too short for [CLS] A [SEP] B [SEP]: use at least 5')
    if seed < 0:
      raise UserError(f'train.seed={seed}: the data pipeline needs a seed >= 0')
    self.seq_len = seq_len
    self.max_predictions = max_predictions
    self.mask_rate = mask_rate
    self.short_seq_prob = short_seq_prob
    self.seed = seed
    (self.cls_id, self.sep_id, self.pad_id, self.mask_id, special_ids,
     (self.vocab_low, self.vocab_high)) = _token_layout(tokenizer)
    # Specials that are exactly ids [0, n) (sentencepiece) need only a comparison; otherwise a lookup table.
    n = len(special_ids)
    self._special_prefix = n if special_ids == frozenset(range(n)) else None
    self._is_special = None
    if self._special_prefix is None:
      self._is_special = np.zeros(max(tokenizer.vocab_size, max(special_ids) + 1), bool)
      self._is_special[sorted(special_ids)] = True
    # 'token' keeps BERT's per-token masking (mask_tokens) untouched; other units go through a UnitMasker.
    self.masker = None
    if masking != 'token':
      self.masker = masking_units.UnitMasker(tokenizer, masking, lexicon_path=masking_lexicon,
                                             segmenter=chinese_segmenter)
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain maps from several threads

  def __getstate__(self):  # worker processes get a copy without the lock and the per-epoch cache
    return {**self.__dict__, '_lock': None, '_perms': {}}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def permutation(self, epoch: int) -> np.ndarray:
    """The document order of `epoch` (a fresh permutation per epoch, cached)."""
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = np.random.default_rng([self.seed, 0, epoch]).permutation(self.num_docs)
        if self.num_docs < 2**31:
          perm = perm.astype(np.int32)  # half the memory for corpora of millions of documents
        if len(self._perms) >= _EPOCH_CACHE:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = perm
      return perm

  def __len__(self):
    return 2**62  # the stream is endless: epochs repeat with new permutations

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.examples([index])[0]

  def _other_doc(self, rng: np.random.Generator, doc: int) -> int:
    if hasattr(self.source, 'other_document'):  # a language mixture: the random B comes from the same language
      return self.source.other_document(rng, doc)
    r = int(rng.integers(0, self.num_docs - 1))  # uniform over the N - 1 other documents
    return r + 1 if r >= doc else r

  def _read(self, indices: list[int]) -> dict[int, list[list[int]]]:
    """Documents -> their tokenized non-empty sentences, in one batched read and one encode call."""
    indices = sorted(set(indices))
    if hasattr(self.source, '__getitems__'):
      records = self.source.__getitems__(indices)
    else:
      records = [self.source[i] for i in indices]
    sentences, owners = rows.document_sentences(indices, records)
    docs = {i: [] for i in indices}
    encode = self.tokenizer.encode if self.masker is None else self.masker.encode
    for i, ids in zip(owners, encode(sentences) if sentences else []):
      if len(ids):
        docs[i].append(list(ids))
    return docs

  def examples(self, indices) -> list[dict[str, np.ndarray]]:
    """Builds the examples of global indices `indices` (any ints >= 0), in order."""
    indices = [int(g) for g in indices]
    rngs, docs, others = [], [], []
    for g in indices:
      rng = np.random.default_rng([self.seed, 1, g])
      doc = int(self.permutation(g // self.num_docs)[g % self.num_docs])
      rngs.append(rng)
      docs.append(doc)
      others.append(self._other_doc(rng, doc))
    cache = self._read(docs + others)

    def get(i):
      if i not in cache:  # only after an empty document: rare, so read one by one
        cache.update(self._read([i]))
      return cache[i]

    out = []
    for g, rng, doc, other in zip(indices, rngs, docs, others):
      doc = rows.nonempty_document(doc, g, get, self.permutation, self.num_docs)
      k = 0
      while other == doc or not get(other):
        k += 1
        if k > rows.MAX_EMPTY_RETRIES:
          raise UserError('could not find a non-empty second document for next-sentence prediction: '
                          'the corpus needs at least 2 documents with text')
        other = self._other_doc(rng, doc)
      out.append(self._build(get(doc), get(other), rng))
    return out

  def _build(self, doc_sentences, other_sentences, rng) -> dict[str, np.ndarray]:
    a, b, is_random = mlm_nsp.make_nsp_pair(doc_sentences, other_sentences, rng, self.seq_len - 3,
                                               self.short_seq_prob)
    ex = mlm_nsp.pack_pair(a, b, self.seq_len, self.cls_id, self.sep_id, self.pad_id)
    ids = ex['input_ids']
    word_starts = None
    if self.masker is not None and self.masker.carries_word_starts:
      ids, word_starts = masking_units.split_word_starts(ids)
      ex['input_ids'] = ids
    candidates = ids >= self._special_prefix if self._is_special is None else ~self._is_special[ids]
    kw = dict(mask_rate=self.mask_rate, max_predictions=self.max_predictions, mask_id=self.mask_id,
              vocab_low=self.vocab_low, vocab_high=self.vocab_high)
    if self.masker is None:
      ex.update(mlm_nsp.mask_tokens(ids, candidates, rng, **kw))
    else:
      units = self.masker.units(ids, word_starts, candidates, rng)
      ex.update(mlm_nsp.mask_units(ids, units, rng, replace_per_unit=self.masker.replace_per_unit, **kw))
    ex['nsp_label'] = np.int32(1 if is_random else 0)
    return ex

  def batch(self, indices) -> dict[str, np.ndarray]:
    """The examples of `indices` stacked: each value gets a leading dimension len(indices)."""
    exs = self.examples(indices)
    return {k: np.stack([e[k] for e in exs]) for k in exs[0]}


def _token_layout(tokenizer) -> tuple[int, int, int, int, frozenset, tuple[int, int]]:
  """(cls, sep, pad, mask, special ids, random-token range) of `tokenizer`.

  A tokenizer without `special_ids` (only `num_special` and `vocab_size`, as test fakes have) has jaxssl's
  sentencepiece layout: ids below num_special are special, random tokens come from [num_special, vocab_size).
  """
  if not hasattr(tokenizer, 'special_ids'):
    n = tokenizer.num_special
    return CLS_ID, SEP_ID, PAD_ID, MASK_ID, frozenset(range(n)), (n, tokenizer.vocab_size)
  special = frozenset(int(i) for i in tokenizer.special_ids)
  ids = (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id)
  if not set(ids) <= special:
    raise ValueError(f'tokenizer {tokenizer!r}: special_ids must hold the cls/sep/pad/mask ids {ids}')
  low, high = (int(x) for x in tokenizer.random_token_range)
  if not 0 <= low < high <= tokenizer.vocab_size:
    raise ValueError(f'tokenizer {tokenizer!r}: random_token_range {(low, high)} is not inside '
                     f'[0, {tokenizer.vocab_size})')
  return (*(int(i) for i in ids), special, (low, high))


def local_batch(examples: PretrainExamples, step: int, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows [p * B/P, (p + 1) * B/P) of the global batch of `step` (numpy, leading dim B/P)."""
  first, local = rows.process_rows(global_batch_size, process_index, process_count)
  start = step * global_batch_size + first
  return examples.batch(range(start, start + local))


def masking_args(data_config) -> dict[str, str]:
  """The masking keyword arguments of the pipeline functions from a config's `data` section (defaults for
  configs without the keys), validated: `**masking_args(config.data)`."""
  args = dict(masking=data_config.get('masking', 'token'), masking_lexicon=data_config.get('masking_lexicon', ''),
              chinese_segmenter=data_config.get('chinese_segmenter', ''))
  masking_units.check_masking_config(args['masking'], args['masking_lexicon'], args['chinese_segmenter'])
  return args


def make_pretrain_iterator(source, tokenizer, *, seq_len: int, max_predictions: int, mask_rate: float,
                           short_seq_prob: float, seed: int, global_batch_size: int, start_step: int = 0,
                           process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                           prefetch: int = 2, num_workers: int = 0, masking: str = 'token', masking_lexicon: str = '',
                           chinese_segmenter: str = '') -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this process's share of the global batches of steps start_step, start_step+1, ...

  Each item: input_ids, token_type_ids, attention_mask [B/P, seq_len] int32; mlm_positions, mlm_ids
  [B/P, max_predictions] int32; mlm_weights [B/P, max_predictions] float32; nsp_label [B/P] int32
  (0 = IsNext, 1 = random B). Rows are rows [p * B/P, (p + 1) * B/P) of the global batch, so concatenating
  the shares of all processes in process order (jax.make_array_from_process_local_data) gives the batch one
  process would see. Resuming = a new iterator with start_step = the checkpointed step.
  masking / masking_lexicon / chinese_segmenter: the MLM units (see the module docstring).
  """
  rows.process_rows(global_batch_size, process_index, process_count)  # validate before building anything
  examples = PretrainExamples(source, tokenizer, seq_len=seq_len, max_predictions=max_predictions,
                              mask_rate=mask_rate, short_seq_prob=short_seq_prob, seed=seed, masking=masking,
                              masking_lexicon=masking_lexicon, chinese_segmenter=chinese_segmenter)
  # One element per step: the batch-level map reads and tokenizes a step's documents together.
  return rows.step_batches(
      lambda step: local_batch(examples, step, global_batch_size=global_batch_size,
                               process_index=process_index, process_count=process_count),
      start_step=start_step, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


def make_eval_batches(source, tokenizer, *, seq_len: int, max_predictions: int, mask_rate: float,
                      short_seq_prob: float, batch_size: int, num_batches: int, seed: int,
                      process_index: int = 0, process_count: int = 1, masking: str = 'token',
                      masking_lexicon: str = '', chinese_segmenter: str = '') -> list[dict[str, Any]]:
  """A fixed list of `num_batches` held-out batches (this process's share of each, like the train iterator).

  The same arguments give the same batches, masks and NSP pairs every call, so MLM accuracy and perplexity
  are comparable across evaluations. `source` should be the held-out split; the seed is the caller's choice
  (the train seed is fine: it is a different source). Pass the training run's masking: accuracy is then that
  of the task trained.
  """
  rows.process_rows(batch_size, process_index, process_count)
  examples = PretrainExamples(source, tokenizer, seq_len=seq_len, max_predictions=max_predictions,
                              mask_rate=mask_rate, short_seq_prob=short_seq_prob, seed=seed, masking=masking,
                              masking_lexicon=masking_lexicon, chinese_segmenter=chinese_segmenter)
  return [local_batch(examples, b, global_batch_size=batch_size, process_index=process_index,
                      process_count=process_count) for b in range(num_batches)]

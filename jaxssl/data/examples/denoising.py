"""Denoising examples for encoder-decoder pretraining (BART, Lewis et al. 2019; MASS, Song et al. 2019).

Corruptions are pure functions of (token ids, a numpy Generator); `data.corruptions` picks any combination,
applied in the fixed order of CORRUPTIONS (whatever the order of the list):

  sentence_permutation  the piece's sentences in a random order (BART)
  document_rotation     the piece rotated to start at a uniformly chosen token (BART)
  word_shuffle          words moved at most `data.shuffle_window` places (Lample et al. 2018's local shuffle, k=3)
  token_deletion        round(mask_rate * n) random tokens deleted (BART)
  token_masking         round(mask_rate * n) random tokens replaced by [MASK] (BART)
  text_infilling        spans with Poisson(`data.poisson_lambda`) lengths covering round(mask_rate * n) tokens,
                        each replaced by one [MASK]; a 0-length span inserts a [MASK] (BART: 30%, lambda 3)
  mass                  one contiguous span of round(`data.mass_fraction` * n) tokens replaced by [MASK]s, token
                        for token; the target is that span alone (MASS: 50%). Combines with nothing else.

Examples are document pieces: example g reads document permutation(seed, g // N)[g % N], splits its sentences
greedily into pieces of at most seq_len - 2 tokens (a longer sentence is cut) and takes one piece at random. With
rng = default_rng([seed, 5, g]) everything is a pure function of (seed, g), so batches resume exactly:

  source_ids        [CLS] corrupted piece [SEP]  (padded with [PAD] to seq_len; source_mask 1 on real tokens)
  target_ids        piece [SEP]                  (MASS: span [SEP])
  target_input_ids  [CLS] piece                  (the target shifted right; [CLS] is the decoder-start token)
  target_mask       1 on the target's real tokens
"""
import dataclasses
import threading
from typing import Iterator

import numpy as np

from jaxssl.data.examples import rows
from jaxssl.errors import UserError

CORRUPTIONS = ('sentence_permutation', 'document_rotation', 'word_shuffle', 'token_deletion', 'token_masking',
               'text_infilling', 'mass')
BATCH_KEYS = ('source_ids', 'source_mask', 'target_input_ids', 'target_ids', 'target_mask')
_EPOCH_CACHE = 4


# ----- corruptions: pure functions of (ids, rng) -----

def _count(n: int, rate: float) -> int:
  return int(round(rate * n))


def mass_span(ids, rng: np.random.Generator, *, fraction: float, mask_id: int):
  """MASS: (source with one span of max(1, round(fraction * n)) tokens masked token for token, the span, its start)."""
  ids = np.asarray(ids, np.int32)
  n = len(ids)
  length = min(n, max(1, _count(n, fraction)))
  start = int(rng.integers(0, n - length + 1))
  source = ids.copy()
  source[start:start + length] = mask_id
  return source, ids[start:start + length].copy(), start


def token_masking(ids, rng: np.random.Generator, *, rate: float, mask_id: int) -> np.ndarray:
  """round(rate * n) tokens, chosen without replacement, replaced by `mask_id`."""
  ids = np.array(ids, np.int32)
  ids[rng.choice(len(ids), _count(len(ids), rate), replace=False)] = mask_id
  return ids


def token_deletion(ids, rng: np.random.Generator, *, rate: float) -> np.ndarray:
  """round(rate * n) tokens, chosen without replacement, deleted (the rest keep their order)."""
  ids = np.asarray(ids, np.int32)
  return np.delete(ids, rng.choice(len(ids), _count(len(ids), rate), replace=False))


def infilling_spans(n: int, rng: np.random.Generator, *, rate: float, poisson_lambda: float):
  """(starts, lengths) of text-infilling spans over n tokens, sorted by start: Poisson(lambda) lengths (the last
  one cut so they sum to exactly round(rate * n)), in distinct gaps between the unmasked tokens (so two spans are
  never adjacent, and each becomes its own [MASK])."""
  total = _count(n, rate)
  lengths = []
  while sum(lengths) < total:
    lengths.append(int(rng.poisson(poisson_lambda)))
  if lengths:
    lengths[-1] -= sum(lengths) - total
  lengths = rng.permutation(np.asarray(lengths, np.int64))  # the cut span anywhere, not always last
  gaps = n - total + 1  # before each unmasked token, and after the last
  k = len(lengths)
  chosen = np.sort(rng.choice(gaps, k, replace=k > gaps))
  starts = chosen + np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if k else chosen
  return starts.astype(np.int64), lengths


def text_infilling(ids, rng: np.random.Generator, *, rate: float, poisson_lambda: float,
                   mask_id: int) -> np.ndarray:
  """BART's text infilling: each span of `infilling_spans` replaced by a single `mask_id`."""
  ids = np.asarray(ids, np.int32)
  starts, lengths = infilling_spans(len(ids), rng, rate=rate, poisson_lambda=poisson_lambda)
  out, at = [], 0
  for start, length in zip(starts, lengths):
    out.extend(ids[at:start])
    out.append(mask_id)
    at = start + length
  out.extend(ids[at:])
  return np.asarray(out, np.int32)


def sentence_permutation(sentences, rng: np.random.Generator) -> list:
  """The sentences in a random order."""
  return [sentences[i] for i in rng.permutation(len(sentences))]


def document_rotation(ids, rng: np.random.Generator) -> np.ndarray:
  """The ids rotated to start at a uniformly chosen token."""
  ids = np.asarray(ids, np.int32)
  return np.roll(ids, -int(rng.integers(0, len(ids)))) if len(ids) else ids


def word_shuffle(ids, rng: np.random.Generator, *, window: int, word_starts=None) -> np.ndarray:
  """Words in a locally shuffled order: word i sorts by i + U[0, window + 1), so no word moves more than `window`
  places. `word_starts` [vocab] bool marks ids that begin a word (None: every token is a word)."""
  ids = np.asarray(ids, np.int32)
  if len(ids) < 2:
    return ids
  starts = np.ones(len(ids), bool) if word_starts is None else np.asarray(word_starts)[ids]
  starts[0] = True
  words = np.split(ids, np.flatnonzero(starts)[1:])
  order = np.argsort(np.arange(len(words)) + rng.uniform(0, window + 1, len(words)), kind='stable')
  return np.concatenate([words[i] for i in order])


# ----- config -----

@dataclasses.dataclass(frozen=True)
class DenoisingConfig:
  """The corruption settings of the `data` config section, validated."""
  corruptions: tuple = ('text_infilling', 'sentence_permutation')
  mask_rate: float = 0.3
  poisson_lambda: float = 3.0
  shuffle_window: int = 3
  mass_fraction: float = 0.5

  @classmethod
  def from_config(cls, data_cfg) -> 'DenoisingConfig':
    get = data_cfg.get if hasattr(data_cfg, 'get') else lambda k, d=None: getattr(data_cfg, k, d)
    kw = {f.name: get(f.name) for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in kw.items() if v is not None}
    names = kw.get('corruptions', cls.corruptions)
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
      raise UserError(f'data.corruptions={names!r}: use a non-empty list of {", ".join(CORRUPTIONS)}')
    if 'mass' in names and len(set(names)) > 1:
      raise UserError("data.corruptions: 'mass' (its target is the masked span) combines with no other corruption")
    c = cls(**{**kw, 'corruptions': tuple(dict.fromkeys(names))})
    if not 0.0 < c.mask_rate < 1.0:
      raise UserError(f'data.mask_rate={c.mask_rate} must be between 0 and 1 (BART: 0.3)')
    if not 0.0 < c.mass_fraction < 1.0:
      raise UserError(f'data.mass_fraction={c.mass_fraction} must be between 0 and 1 (MASS: 0.5)')
    if not c.poisson_lambda > 0:
      raise UserError(f'data.poisson_lambda={c.poisson_lambda} must be positive (BART: 3)')
    if int(c.shuffle_window) != c.shuffle_window or c.shuffle_window < 1:
      raise UserError(f'data.shuffle_window={c.shuffle_window} must be a positive integer (3 is usual)')
    return c


def corrupt(sentences, rng: np.random.Generator, cfg: DenoisingConfig, *, mask_id: int, word_starts=None):
  """A piece's sentences (lists of ids) -> (source ids, target ids), both int32, corruptions in CORRUPTIONS order."""
  original = np.asarray([i for s in sentences for i in s], np.int32)
  if 'mass' in cfg.corruptions:
    source, span, _ = mass_span(original, rng, fraction=cfg.mass_fraction, mask_id=mask_id)
    return source, span
  on = set(cfg.corruptions)
  if 'sentence_permutation' in on:
    sentences = sentence_permutation(sentences, rng)
  ids = np.asarray([i for s in sentences for i in s], np.int32)
  if 'document_rotation' in on:
    ids = document_rotation(ids, rng)
  if 'word_shuffle' in on:
    ids = word_shuffle(ids, rng, window=cfg.shuffle_window, word_starts=word_starts)
  if 'token_deletion' in on:
    ids = token_deletion(ids, rng, rate=cfg.mask_rate)
  if 'token_masking' in on:
    ids = token_masking(ids, rng, rate=cfg.mask_rate, mask_id=mask_id)
  if 'text_infilling' in on:
    ids = text_infilling(ids, rng, rate=cfg.mask_rate, poisson_lambda=cfg.poisson_lambda, mask_id=mask_id)
  return ids, original


def split_pieces(sentences, max_tokens: int) -> list[list[list[int]]]:
  """Consecutive sentences packed greedily into pieces of at most `max_tokens` tokens (a longer sentence is cut
  into several pieces)."""
  pieces, current, size = [], [], 0
  for s in sentences:
    for at in range(0, len(s), max_tokens):
      part = list(s[at:at + max_tokens])
      if current and size + len(part) > max_tokens:
        pieces.append(current)
        current, size = [], 0
      current.append(part)
      size += len(part)
  return pieces + [current] if current else pieces


def word_start_table(tokenizer) -> np.ndarray | None:
  """[vocab] bool: ids that begin a word (sentencepiece '▁', byte-level BPE 'Ġ'; WordPiece: not '##')."""
  if not hasattr(tokenizer, 'id_to_piece'):
    return None
  pieces = [tokenizer.id_to_piece(i) or '' for i in range(tokenizer.vocab_size)]
  if any(p.startswith('##') for p in pieces):
    return np.array([not p.startswith('##') for p in pieces])
  return np.array([p.startswith(('\u2581', '\u0120')) for p in pieces])


# ----- examples and batches -----

class DenoisingExamples:
  """Global example index -> one denoising example (the module docstring), a pure function of (seed, index)."""

  def __init__(self, source, tokenizer, *, seq_len: int, seed: int, cfg: DenoisingConfig):
    self.source, self.tokenizer, self.seq_len, self.seed, self.cfg = source, tokenizer, seq_len, seed, cfg
    self.num_docs = len(source)
    if self.num_docs < 1:
      raise UserError('the corpus split has no documents: pass a larger --config.data.corpus')
    if seq_len < 4 or seed < 0:
      raise UserError(f'data.seq_len={seq_len} must be >= 4 and train.seed={seed} >= 0')
    self.word_starts = word_start_table(tokenizer) if 'word_shuffle' in cfg.corruptions else None
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain maps from several threads

  def __getstate__(self):  # worker processes get a copy without the lock and the per-epoch cache
    return {**self.__dict__, '_lock': None, '_perms': {}}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= _EPOCH_CACHE:
          self._perms.pop(min(self._perms))
        self._perms[epoch] = np.random.default_rng([self.seed, 4, epoch]).permutation(self.num_docs)
      return self._perms[epoch]

  def _read(self, docs) -> dict[int, list[list[int]]]:
    """Documents -> their tokenized non-empty sentences (one batched read, one encode call)."""
    docs = sorted(set(docs))
    sentences, owners = rows.document_sentences(docs, self.source.__getitems__(docs))
    out = {d: [] for d in docs}
    for d, ids in zip(owners, self.tokenizer.encode(sentences) if sentences else []):
      if len(ids):
        out[d].append(list(ids))
    return out

  def examples(self, indices) -> list[dict[str, np.ndarray]]:
    indices = [int(g) for g in indices]
    docs = [int(self.permutation(g // self.num_docs)[g % self.num_docs]) for g in indices]
    cache = self._read(docs)

    def get(d):
      if d not in cache:  # only after an empty document: rare, so read one by one
        cache.update(self._read([d]))
      return cache[d]

    out = []
    for g, doc in zip(indices, docs):
      doc = rows.nonempty_document(doc, g, get, self.permutation, self.num_docs)
      out.append(self._build(cache[doc], np.random.default_rng([self.seed, 5, g])))
    return out

  def _build(self, sentences, rng) -> dict[str, np.ndarray]:
    t, n = self.tokenizer, self.seq_len
    pieces = split_pieces(sentences, n - 2)
    piece = pieces[int(rng.integers(0, len(pieces)))]
    source, target = corrupt(piece, rng, self.cfg, mask_id=t.mask_id, word_starts=self.word_starts)
    source = [t.cls_id, *source[:n - 2], t.sep_id]  # infilling's inserted [MASK]s may exceed the piece
    ex = {k: np.full((n,), t.pad_id, np.int32) for k in ('source_ids', 'target_input_ids', 'target_ids')}
    ex['source_ids'][:len(source)] = source
    ex['target_input_ids'][:len(target) + 1] = [t.cls_id, *target]
    ex['target_ids'][:len(target) + 1] = [*target, t.sep_id]
    ex['source_mask'] = (np.arange(n) < len(source)).astype(np.int32)
    ex['target_mask'] = (np.arange(n) < len(target) + 1).astype(np.int32)
    return ex

  def batch(self, indices) -> dict[str, np.ndarray]:
    exs = self.examples(indices)
    return {k: np.stack([e[k] for e in exs]) for k in BATCH_KEYS}


def local_batch(examples: DenoisingExamples, step: int, *, global_batch_size: int, process_index: int = 0,
                process_count: int = 1) -> dict[str, np.ndarray]:
  """This process's rows of the global batch of `step`."""
  first, local = rows.process_rows(global_batch_size, process_index, process_count)
  start = step * global_batch_size + first
  return examples.batch(range(start, start + local))


def _examples(source, tokenizer, data_cfg, seed) -> DenoisingExamples:
  return DenoisingExamples(source, tokenizer, seq_len=data_cfg.seq_len, seed=seed,
                           cfg=DenoisingConfig.from_config(data_cfg))


def make_denoising_iterator(source, tokenizer, data_cfg, *, seed: int, global_batch_size: int, start_step: int = 0,
                            process_index: int = 0, process_count: int = 1,
                            prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
  """Endless iterator over this process's share of the batches of steps start_step, start_step+1, ..."""
  rows.process_rows(global_batch_size, process_index, process_count)
  examples = _examples(source, tokenizer, data_cfg, seed)
  return rows.step_batches(
      lambda step: local_batch(examples, step, global_batch_size=global_batch_size, process_index=process_index,
                               process_count=process_count),
      start_step=start_step, num_threads=int(data_cfg.get('num_threads', 2)), prefetch=prefetch,
      num_workers=int(data_cfg.get('num_workers', 0)))


def make_denoising_eval_batches(source, tokenizer, data_cfg, *, seed: int, batch_size: int, num_batches: int,
                                process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Fixed held-out batches: the first `num_batches` batches of the held-out split (same corruptions each call)."""
  examples = _examples(source, tokenizer, data_cfg, seed)
  return [local_batch(examples, b, global_batch_size=batch_size, process_index=process_index,
                      process_count=process_count) for b in range(num_batches)]

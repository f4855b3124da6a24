"""Mixtures of corpora: several corpora, one tag each, mixed by XLM's language sampling or by given weights.

  --config.data.corpus=en=ptb,zh=/data/zh.txt  --config.data.language_temperature=0.3
  --config.data.corpus=web=gs://bucket/c4/*.jsonl.zst:0.7,books=/data/books/:0.3

Each `TAG=CORPUS[:WEIGHT]` part is any corpus `load_corpus` accepts ('ptb', local or bucket files, a TFDS name).
Without weights, part i is sampled with probability q_i ∝ p_i^α, where p_i is its share of the *training
documents* and α is `data.language_temperature` (XLM uses 0.5, XLM-R 0.3, the default here; 1 = proportional,
0 = uniform). With weights (every part then has one: a positive number after the last ':'), q is the weights
normalised. Documents, not tokens, because the BERT pipeline builds one example per document index; split a local
text file into documents with blank lines (a file without blank lines is a single document).

`MixtureSource` is the train split: one epoch of N = max_i ceil(len_i / q_i) document slots, so every document of
the most down-sampled part appears once and the others are repeated (small parts up-sampled). Exactly
round(q_i * N) slots belong to part i, assigned by a permutation pure in the seed; so slot g's document is a
function of (seed, g) alone and resuming stays exact. The pipelines then permute slots per epoch as usual.
The validation splits stay separate per part (`validation_by_language`, metrics eval_<tag>_*); 'validation' is
their concatenation.
"""
import math
import re

import numpy as np

from jaxssl import paths
from jaxssl.errors import UserError

DEFAULT_TEMPERATURE = 0.3  # XLM-R's α
_TAG = re.compile(r'^[a-z][a-z0-9_]*$')
# eval_<tag>_<metric> must not read as an overall metric (eval_mlm_loss, eval_word_perplexity, ...).
_RESERVED_TAGS = frozenset({'mlm', 'nsp', 'lm', 'word'})
_EXAMPLE = 'e.g. --config.data.corpus=en=ptb,zh=/data/zh.txt'
# What is a mixture and where a part's weight is: one rule, shared with jaxssl/paths.py (which makes local parts
# absolute when a job starts).
is_multilingual = paths.is_mixture
split_weight = paths.split_weight


def parse_parts(corpus: str) -> list[tuple[str, str, float | None]]:
  """[(tag, corpus, weight or None)] of 'web=c4.jsonl.zst:0.7,books=/data/books/:0.3'; UserError naming the bad
  part (no tag, a bad tag, no corpus, a tag twice, weights on some parts only, a weight that is not > 0)."""
  spec = []
  for part in (p.strip() for p in corpus.split(',')):
    tag, sep, rest = part.partition('=')
    tag = tag.strip()
    path, weight = split_weight(rest)
    if not sep:
      raise UserError(f'data.corpus part {part!r} has no language tag: write LANG=CORPUS pairs separated by '
                      f'commas, {_EXAMPLE}')
    if not _TAG.match(tag):
      raise UserError(f'data.corpus language tag {tag!r} is not lowercase letters, digits and _ (it names the '
                      f'eval_<tag>_* metrics): use tags like en, zh, zh_hant, {_EXAMPLE}')
    if tag in _RESERVED_TAGS:
      raise UserError(f'data.corpus language tag {tag!r} is reserved (eval_{tag}_* names an overall metric): '
                      f'use another tag, {_EXAMPLE}')
    if not path:
      raise UserError(f'data.corpus names no corpus for language {tag!r}: write {tag}=<ptb, text file, '
                      f'directory, glob or TFDS name>, {_EXAMPLE}')
    if weight is not None and not weight > 0:
      raise UserError(f'data.corpus part {part!r} has weight {weight:g}: weights must be > 0 (leave a part out '
                      'rather than give it 0), e.g. web=c4.jsonl.zst:0.7,books=/data/books/:0.3')
    spec.append((tag, path, weight))
  tags = [t for t, _, _ in spec]
  dupes = sorted({t for t in tags if tags.count(t) > 1})
  if dupes:
    raise UserError(f'data.corpus names language {dupes[0]!r} more than once: give each language one corpus '
                    '(a directory or glob can hold several files)')
  weighted = [t for t, _, w in spec if w is not None]
  if weighted and len(weighted) < len(spec):
    unweighted = [t for t, _, w in spec if w is None]
    raise UserError(f'data.corpus gives weights to {", ".join(weighted)} but not to {", ".join(unweighted)}: give '
                    'every part a weight (TAG=CORPUS:WEIGHT, the sampling probabilities) or none (then '
                    'data.language_temperature mixes the parts by size)')
  return spec


def parse_spec(corpus: str) -> list[tuple[str, str]]:
  """[(language tag, corpus)] of 'en=ptb,zh=/data/zh.txt' (weights dropped); UserError naming the bad part."""
  return [(tag, path) for tag, path, _ in parse_parts(corpus)]


def language_probabilities(sizes, alpha: float) -> np.ndarray:
  """XLM's sampling distribution q_i = p_i^α / Σ_j p_j^α with p_i = sizes_i / Σ sizes."""
  sizes = np.asarray(sizes, np.float64)
  p = sizes / sizes.sum()
  q = p ** alpha
  return q / q.sum()


def _allocate(total: int, q: np.ndarray) -> np.ndarray:
  """round(q_i * total) slots per language summing to `total` (largest remainders get the leftovers)."""
  exact = q * total
  counts = np.floor(exact).astype(np.int64)
  for i in np.argsort(-(exact - counts), kind='stable')[:total - counts.sum()]:
    counts[i] += 1
  return counts


class MixtureSource:
  """Per-language train sources mixed by language sampling; a Source (len, [i], __getitems__) of `{'text'}`.

  Slot g belongs to language `labels[g]` and is that language's `ranks[g]`-th slot; its document is
  (a_i * rank + b_i) mod len_i, a seeded bijection over each run of len_i ranks, so every full repetition of a
  language holds each document once and a partial one a spread-out subset. Memory: ~5 bytes per slot.
  """

  def __init__(self, sources: dict, alpha: float = DEFAULT_TEMPERATURE, seed: int = 0, weights=None):
    """`weights` (one per source, > 0), when given, are the sampling probabilities (normalised) instead of
    XLM's q ∝ p^α."""
    if not 0.0 <= alpha <= 1.0:
      raise UserError(f'data.language_temperature={alpha} must be in [0, 1] (q ∝ p^α: 1 = proportional, '
                      '0 = uniform): pass --config.data.language_temperature=0.3')
    self.languages = list(sources)
    self.sources = [sources[lang] for lang in self.languages]
    self.sizes = np.array([len(s) for s in self.sources], np.int64)
    empty = [lang for lang, n in zip(self.languages, self.sizes) if n == 0]
    if empty:
      raise UserError(f'language {empty[0]!r} has no training documents: give it more text in --config.data.corpus')
    self.alpha, self.seed = alpha, seed
    if weights is None:
      self.probabilities = language_probabilities(self.sizes, alpha)
    else:
      weights = np.asarray(weights, np.float64)
      if weights.shape != (len(self.sources),) or not np.all(np.isfinite(weights)) or not np.all(weights > 0):
        raise UserError(f'mixture weights {weights.tolist()} must be one positive number per part of '
                        f'{", ".join(self.languages)}: write TAG=CORPUS:WEIGHT in --config.data.corpus')
      self.probabilities = weights / weights.sum()
    # The shortest epoch that shows every language's documents at least once (at most total * L^(1-α) slots).
    # For the language with the largest n/q, floor(q * total) >= n: each of its documents appears.
    total = int(max(math.ceil(n / q) for n, q in zip(self.sizes, self.probabilities)))
    self.counts = np.maximum(_allocate(total, self.probabilities), 1)  # rounding never drops a language
    rng = np.random.default_rng([seed, 11])
    labels = np.repeat(np.arange(len(self.languages), dtype=np.int16), self.counts)
    rng.shuffle(labels)
    ranks = np.empty(len(labels), np.int64 if len(labels) >= 2**31 else np.int32)
    for i in range(len(self.languages)):
      where = np.flatnonzero(labels == i)
      ranks[where] = np.arange(len(where))
    self.labels, self.ranks = labels, ranks
    self._slots = [np.flatnonzero(labels == i) for i in range(len(self.languages))]  # slot of rank r, per language
    # Per language an affine bijection of [0, len_i): a coprime with len_i.
    self._affine = []
    for n in self.sizes:
      a = int(rng.integers(1, max(2, n)))
      while math.gcd(a, int(n)) != 1:
        a += 1
      self._affine.append((a, int(rng.integers(0, n))))

  def __len__(self) -> int:
    return len(self.labels)

  def locate(self, index: int) -> tuple[int, int]:
    """(language number, document index in that language's source) of slot `index`."""
    index = int(index)
    if not 0 <= index < len(self.labels):
      raise IndexError(f'slot {index} outside [0, {len(self.labels)})')
    lang = int(self.labels[index])
    a, b = self._affine[lang]
    return lang, (a * int(self.ranks[index]) + b) % int(self.sizes[lang])

  def other_document(self, rng: np.random.Generator, index: int) -> int:
    """A uniformly drawn slot of the same language as slot `index`, other than it: next-sentence negatives from
    another language would be told apart by the language alone. (Any other slot when the language has one.)"""
    lang, rank = int(self.labels[int(index)]), int(self.ranks[int(index)])
    slots = self._slots[lang]
    if len(slots) < 2:
      r = int(rng.integers(0, len(self.labels) - 1))
      return r + 1 if r >= int(index) else r
    r = int(rng.integers(0, len(slots) - 1))
    return int(slots[r + 1 if r >= rank else r])

  def language_of(self, index: int) -> str:
    return self.languages[int(self.labels[int(index)])]

  def __getitem__(self, index: int) -> dict:
    lang, doc = self.locate(index)
    return self.sources[lang][doc]

  def __getitems__(self, indices) -> list[dict]:
    return _gather([self.locate(i) for i in indices], self.sources)


class ConcatSource:
  """Sources one after another (the overall validation split)."""

  def __init__(self, sources: list):
    self.sources = list(sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def locate(self, index: int) -> tuple[int, int]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'document {index} outside [0, {len(self)})')
    part = int(np.searchsorted(self.offsets, index, side='right')) - 1
    return part, index - int(self.offsets[part])

  def __getitem__(self, index: int) -> dict:
    part, doc = self.locate(index)
    return self.sources[part][doc]

  def __getitems__(self, indices) -> list[dict]:
    return _gather([self.locate(i) for i in indices], self.sources)


def _gather(located: list[tuple[int, int]], sources: list) -> list[dict]:
  """Reads (source, document) pairs with one `__getitems__` per source, in the order asked."""
  out = [None] * len(located)
  by_source: dict[int, list[int]] = {}
  for k, (s, _) in enumerate(located):
    by_source.setdefault(s, []).append(k)
  for s, ks in by_source.items():
    docs = [located[k][1] for k in ks]
    source = sources[s]
    records = source.__getitems__(docs) if hasattr(source, '__getitems__') else [source[d] for d in docs]
    for k, record in zip(ks, records):
      out[k] = record
  return out


def load_multilingual(corpus: str, load_one, *, temperature: float = DEFAULT_TEMPERATURE, seed: int = 0,
                      check_one=None) -> dict:
  """{'train': MixtureSource, 'validation': ConcatSource, 'validation_by_language': {tag: source}}.

  `load_one(corpus)` opens one part's corpus (corpora.load_corpus with the run's settings); `check_one(corpus)`
  raises UserError for a missing one, so every part is checked before any is prepared. Parts with weights are
  sampled by them, others by `temperature`.
  """
  spec = parse_parts(corpus)
  loaded = {}
  for step in ((check_one,) if check_one else ()) + (load_one,):
    for tag, path, weight in spec:
      try:
        loaded[tag] = step(path)
      except UserError as e:
        shown = f'{tag}={path}' + (f':{weight:g}' if weight is not None else '')
        raise UserError(f'language {tag!r} ({shown}): {e}') from None
  weights = [w for _, _, w in spec] if spec[0][2] is not None else None
  validation = {tag: s['validation'] for tag, s in loaded.items()}
  return {'train': MixtureSource({tag: s['train'] for tag, s in loaded.items()}, temperature, seed, weights),
          'validation': ConcatSource(list(validation.values())),
          'validation_by_language': validation}

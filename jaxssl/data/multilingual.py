"""Multilingual pretraining corpora: several corpora, one language tag each, mixed by XLM's language sampling.

  --config.data.corpus=en=ptb,zh=/data/zh.txt  --config.data.language_temperature=0.3

Each `LANG=CORPUS` part is any corpus `load_corpus` accepts ('ptb', local text, a TFDS name). Language i is
sampled with probability q_i ∝ p_i^α, where p_i is its share of the *training documents* and α is
`data.language_temperature` (XLM uses 0.5, XLM-R 0.3, the default here; 1 = proportional, 0 = uniform). Documents,
not tokens, because the BERT pipeline builds one example per document index; split a local file into documents
with blank lines (a file without blank lines is a single document).

`MixtureSource` is the train split: one epoch of N = max_i ceil(len_i / q_i) document slots, so every document of
the most down-sampled language appears once and the others are repeated (small languages up-sampled). Exactly
round(q_i * N) slots belong to language i, assigned by a permutation pure in the seed; so slot g's document is a
function of (seed, g) alone and resuming stays exact. The pipelines then permute slots per epoch as usual.
The validation splits stay separate per language (`validation_by_language`); 'validation' is their concatenation.
"""
import math
import os
import re

import numpy as np

from jaxssl.errors import UserError

DEFAULT_TEMPERATURE = 0.3  # XLM-R's α
_TAG = re.compile(r'^[a-z][a-z0-9_]*$')
# eval_<tag>_<metric> must not read as an overall metric (eval_mlm_loss, eval_word_perplexity, ...).
_RESERVED_TAGS = frozenset({'mlm', 'nsp', 'lm', 'word'})
_EXAMPLE = 'e.g. --config.data.corpus=en=ptb,zh=/data/zh.txt'


def is_multilingual(corpus: str) -> bool:
  """Whether `corpus` is a LANG=CORPUS list rather than one corpus (an existing path with '=' is one corpus)."""
  return '=' in corpus and not os.path.exists(corpus)


def parse_spec(corpus: str) -> list[tuple[str, str]]:
  """[(language tag, corpus)] of 'en=ptb,zh=/data/zh.txt'; UserError naming the bad part."""
  parts = [p.strip() for p in corpus.split(',')]
  spec = []
  for part in parts:
    tag, sep, path = part.partition('=')
    tag, path = tag.strip(), path.strip()
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
    spec.append((tag, path))
  tags = [t for t, _ in spec]
  dupes = sorted({t for t in tags if tags.count(t) > 1})
  if dupes:
    raise UserError(f'data.corpus names language {dupes[0]!r} more than once: give each language one corpus '
                    '(a directory or glob can hold several files)')
  return spec


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

  def __init__(self, sources: dict, alpha: float = DEFAULT_TEMPERATURE, seed: int = 0):
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
    self.probabilities = language_probabilities(self.sizes, alpha)
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

  `load_one(corpus)` opens one language's corpus (corpora.load_corpus with the run's settings); `check_one(corpus)`
  raises UserError for a missing one, so every part is checked before any is prepared.
  """
  spec = parse_spec(corpus)
  loaded = {}
  for step in ((check_one,) if check_one else ()) + (load_one,):
    for tag, path in spec:
      try:
        loaded[tag] = step(path)
      except UserError as e:
        raise UserError(f'language {tag!r} ({tag}={path}): {e}') from None
  validation = {tag: s['validation'] for tag, s in loaded.items()}
  return {'train': MixtureSource({tag: s['train'] for tag, s in loaded.items()}, temperature, seed),
          'validation': ConcatSource(list(validation.values())),
          'validation_by_language': validation}

"""Masking units for BERT's masked LM: whole words, SpanBERT spans, lexicon phrases and entities (ERNIE).

A unit is a group of maskable tokens that `mlm_nsp.mask_units` masks all or nothing. The unit functions here
are pure: they map one packed sequence (ids, per-token word-start flags, the candidate mask) to a unit id per
token (int32 [L]; 0, 1, ... in order of position; -1 on tokens that are never masked, i.e. specials and
padding). A unit never spans a non-candidate token, so units stay inside segment A or B.

Word starts come from the tokenizer's pieces (`word_start_table`: sentencepiece '▁' begins a word, WordPiece
'##' continues one), or, for Chinese text (no spaces), from jieba's segmentation mapped onto the pieces through
their character offsets (`jieba_word_starts`). `UnitMasker` bundles what the pipeline needs per tokenizer.
"""
import logging
import re
import threading

import numpy as np

from jaxssl import storage
from jaxssl.errors import UserError

MASKINGS = ('token', 'whole_word', 'span', 'entity')
SEGMENTERS = ('', 'jieba')
SPAN_P, SPAN_MAX_WORDS = 0.2, 10  # SpanBERT
JIEBA_PIN = 'jieba==0.42.1'  # as in requirements.txt
_HAN = re.compile('[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f]')


def check_masking_config(masking: str, lexicon_path: str = '', segmenter: str = '') -> None:
  """Raises a one-line UserError for a masking setup that cannot work (before any data is read)."""
  if masking not in MASKINGS:
    raise UserError(f'data.masking={masking!r} is unknown: use one of {", ".join(MASKINGS)}')
  if segmenter not in SEGMENTERS:
    raise UserError(f'data.chinese_segmenter={segmenter!r} is unknown: use \'\' (none) or \'jieba\'')
  if masking == 'entity':
    if not lexicon_path:
      raise UserError("data.masking='entity' needs a phrase list: set --config.data.masking_lexicon=FILE "
                      '(one phrase or entity per line)')
    if not storage.isfile(lexicon_path):
      raise UserError(f'data.masking_lexicon {lexicon_path!r} not found: pass an existing file, one phrase per line')
  elif lexicon_path:
    raise UserError(f"data.masking_lexicon is set but data.masking={masking!r}: use --config.data.masking=entity "
                    "(or drop the lexicon)")


def word_start_table(tokenizer) -> np.ndarray:
  """bool [vocab_size]: does the piece of each id begin a word? Computed once per tokenizer.

  The marker convention is read off the vocabulary: '##' continues a word (WordPiece), '▁' (sentencepiece,
  Metaspace) or 'Ġ' (byte-level BPE) begins one; whichever marks the most pieces wins.
  """
  pieces = [tokenizer.id_to_piece(i) or '' for i in range(tokenizer.vocab_size)]
  counts = {m: sum(p.startswith(m) for p in pieces) for m in ('##', '\u2581', '\u0120')}
  marker = max(counts, key=counts.get)
  if not counts[marker]:
    raise UserError(f'cannot tell word boundaries from the pieces of {tokenizer!r} (no "▁" or "##" markers): '
                    "use data.masking='token'")
  if marker == '##':
    return np.array([not p.startswith('##') for p in pieces], bool)
  return np.array([p.startswith(marker) for p in pieces], bool)


def _unit_starts(word_starts: np.ndarray, candidate_mask: np.ndarray) -> np.ndarray:
  """Candidate tokens that begin a word: flagged ones, and the first candidate after a non-candidate."""
  cand = np.asarray(candidate_mask, bool)
  after_gap = np.ones_like(cand)
  after_gap[1:] = ~cand[:-1]
  return cand & (np.asarray(word_starts, bool) | after_gap)


def _ids_from_starts(starts: np.ndarray, candidate_mask: np.ndarray) -> np.ndarray:
  units = np.cumsum(starts, dtype=np.int32) - 1
  return np.where(np.asarray(candidate_mask, bool), units, -1).astype(np.int32)


def word_units(word_starts: np.ndarray, candidate_mask: np.ndarray) -> np.ndarray:
  """Whole-word units: a word's pieces share a unit id. int32 [L], -1 off the candidates."""
  return _ids_from_starts(_unit_starts(word_starts, candidate_mask), candidate_mask)


def span_length_probs(p: float = SPAN_P, max_words: int = SPAN_MAX_WORDS) -> np.ndarray:
  """P(span = l words), l = 1..max_words: geometric(p) truncated at max_words and renormalised, as SpanBERT
  samples it (mean 3.8 words for p=0.2, max 10; clipping instead would put 13% of spans at exactly 10)."""
  probs = p * (1 - p) ** np.arange(max_words)
  return probs / probs.sum()


def span_units(word_starts: np.ndarray, candidate_mask: np.ndarray, rng: np.random.Generator, *,
               p: float = SPAN_P, max_words: int = SPAN_MAX_WORDS) -> np.ndarray:
  """SpanBERT units: each segment's words are cut into consecutive spans of span_length_probs lengths.

  The cut points restart at every segment (a run of candidates), so the last span of a segment may be
  shorter. Draws one length per word from `rng` (deterministic in its state). int32 [L], -1 off candidates.
  """
  words = word_units(word_starts, candidate_mask)
  n_words = int(words.max()) + 1 if words.size else 0
  if n_words == 0:
    return words
  first_token = np.flatnonzero(_unit_starts(word_starts, candidate_mask))
  cand = np.asarray(candidate_mask, bool)
  opens_segment = (first_token == 0) | ~cand[np.maximum(first_token - 1, 0)]
  bounds = np.append(np.flatnonzero(opens_segment), n_words)
  lengths = rng.choice(np.arange(1, max_words + 1), size=n_words, p=span_length_probs(p, max_words))
  span_start = np.zeros(n_words, bool)
  used = 0
  for a, b in zip(bounds[:-1], bounds[1:]):
    cuts = np.cumsum(lengths[used:used + b - a])  # b - a lengths always reach the segment's end
    inner = cuts[cuts < b - a]
    span_start[a] = True
    span_start[a + inner] = True
    used += len(inner) + 1
  span_of_word = np.cumsum(span_start, dtype=np.int32) - 1
  return np.where(cand, span_of_word[np.maximum(words, 0)], -1).astype(np.int32)


_END = -1  # trie key marking "a phrase ends here" (ids are >= 0)


class Lexicon:
  """Phrases as token-id sequences in a trie (nested dicts keyed by id), for `lexicon_units`."""

  def __init__(self, phrases: list[str], phrase_ids: list[list[int]], path: str = ''):
    self.phrases = phrases
    self.path = path
    self.trie: dict = {}
    for ids in phrase_ids:
      if len(ids) < 2:  # a one-token phrase is a one-token word: a unit already
        continue
      node = self.trie
      for i in ids:
        node = node.setdefault(int(i), {})
      node[_END] = True
    self.first_ids = np.array(sorted(self.trie), np.int64)

  def __len__(self):
    return len(self.phrases)


def load_lexicon(path: str, tokenizer) -> Lexicon:
  """Reads a phrase/entity list (UTF-8, one per line; blank lines and lines starting with '#' skipped) and
  tokenizes it with `tokenizer`. Write phrases as they appear in the text: a cased tokenizer matches case."""
  try:
    with storage.open(path) as f:  # local or in a bucket
      phrases = [s.strip() for s in f]
  except OSError as e:
    raise UserError(f'cannot read data.masking_lexicon {path!r} ({e.strerror or e}): pass a readable file') from None
  except UnicodeDecodeError as e:
    raise UserError(f'data.masking_lexicon {path!r} is not UTF-8 ({e.reason}): re-encode it as UTF-8') from None
  phrases = list(dict.fromkeys(s for s in phrases if s and not s.startswith('#')))
  if not phrases:
    raise UserError(f'data.masking_lexicon {path!r} has no phrases: write one phrase or entity per line')
  return Lexicon(phrases, tokenizer.encode(phrases), path)


def lexicon_units(input_ids: np.ndarray, word_starts: np.ndarray, candidate_mask: np.ndarray,
                  lexicon: Lexicon) -> np.ndarray:
  """ERNIE phrase/entity units: lexicon phrases matched on word sequences, longest match first, left to right.

  A match starts at a word start, covers the phrase's ids exactly and ends where a word (or the segment) ends;
  its words become one unit. Other words are single-word units. int32 [L], -1 off the candidates.
  """
  starts = _unit_starts(word_starts, candidate_mask)
  cand = np.asarray(candidate_mask, bool)
  # A phrase may end at position e when e begins a word or is not a candidate (segment end).
  ends_ok = np.append(starts | ~cand, True).tolist()
  ids, cand_list = np.asarray(input_ids).tolist(), cand.tolist()
  merged = starts.copy()
  n, covered = len(ids), 0
  # Only words whose first id begins some phrase are tried (a vectorised filter: most words begin none).
  for i in np.flatnonzero(starts & np.isin(input_ids, lexicon.first_ids)).tolist():
    if i < covered:
      continue
    node, j, longest = lexicon.trie[ids[i]], i + 1, 0
    while True:  # walk the trie as far as the ids follow a phrase; keep the longest phrase ending at a word end
      if _END in node and ends_ok[j]:
        longest = j
      if j == n or not cand_list[j] or ids[j] not in node:
        break
      node, j = node[ids[j]], j + 1
    if longest:
      merged[i + 1:longest] = False
      covered = longest
  return _ids_from_starts(merged, candidate_mask)


def has_han(text: str) -> bool:
  """Does `text` hold Chinese characters (the text jieba segments)?"""
  return _HAN.search(text) is not None


_plain_jieba = None
_jieba_lock = threading.Lock()


def make_jieba(phrases=()):
  """A private jieba segmenter (the global one is left alone), with `phrases` that have no spaces added as
  words so that lexicon entities tend to come out whole (jieba still weighs them against their context).
  The one without phrases is shared (loading the dictionary takes ~1 s). UserError when jieba is missing."""
  global _plain_jieba  # pylint: disable=global-statement
  phrases = [p for p in phrases if not any(c.isspace() for c in p)]
  if not phrases:
    with _jieba_lock:
      if _plain_jieba is None:
        _plain_jieba = _new_jieba(())
      return _plain_jieba
  return _new_jieba(phrases)


def _new_jieba(phrases):
  try:
    import jieba  # pylint: disable=import-outside-toplevel  (only for Chinese whole-word units)
  except ImportError:
    raise UserError(f"data.chinese_segmenter='jieba' needs the jieba package: pip install {JIEBA_PIN}") from None
  jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter
  segmenter = jieba.Tokenizer()
  segmenter.initialize()  # now, not lazily in a pipeline thread
  for phrase in phrases:
    segmenter.add_word(phrase)
  return segmenter


def jieba_word_starts(text: str, offsets, segmenter) -> np.ndarray:
  """bool [len(offsets)]: the pieces (character spans `offsets` into `text`) that begin a jieba word.

  A piece begins a word when its start is where a jieba word starts and it is not a continuation of a piece
  starting at the same place (a lone '▁' has an empty span there). A piece that starts inside a jieba word
  continues it, so a masked word always covers whole pieces: jieba words that split a piece merge.
  """
  bounds = {start for _, start, _ in segmenter.tokenize(text)}
  out = np.zeros(len(offsets), bool)
  previous = -1
  for i, (start, _) in enumerate(offsets):
    out[i] = start > previous and start in bounds
    previous = start
  if len(out):
    out[0] = True
  return out


def carry_word_starts(ids, word_starts) -> list[int]:
  """Ids with word starts folded in as ~id (negative), so the flags survive the NSP pairing and truncation,
  which only move list items; `split_word_starts` undoes it on the packed int32 row."""
  return [~i if s else i for i, s in zip(ids, np.asarray(word_starts).tolist())]


def split_word_starts(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(ids, word_starts) of a row built from `carry_word_starts` lists (specials stay >= 0: no start)."""
  starts = packed < 0
  return np.where(starts, ~packed, packed).astype(packed.dtype), starts


class UnitMasker:
  """What the pipeline needs for one masking setup: encoding (with word starts for Chinese) and units.

  `masking` is one of MASKINGS except 'token' (which the pipeline handles with mlm_nsp.mask_tokens).
  80/10/10 is decided per token for 'whole_word' (Google's whole-word masking) and per unit for 'span'
  (SpanBERT) and 'entity' (ERNIE): `replace_per_unit`.
  """

  def __init__(self, tokenizer, masking: str, *, lexicon_path: str = '', segmenter: str = ''):
    check_masking_config(masking, lexicon_path, segmenter)
    if masking == 'token':
      raise ValueError("UnitMasker is for unit maskings; 'token' uses mlm_nsp.mask_tokens")
    self.tokenizer = tokenizer
    self.masking = masking
    self.replace_per_unit = masking != 'whole_word'
    self.table = word_start_table(tokenizer)
    self.lexicon = load_lexicon(lexicon_path, tokenizer) if masking == 'entity' else None
    self.segmenter = make_jieba(self.lexicon.phrases if self.lexicon else ()) if segmenter == 'jieba' else None

  @property
  def carries_word_starts(self) -> bool:
    """True when `encode` folds word starts into the ids (they depend on context, not only on the id)."""
    return self.segmenter is not None

  def encode(self, sentences: list[str]) -> list[list[int]]:
    """tokenizer.encode(sentences); with a segmenter, as `carry_word_starts` lists (jieba on Chinese ones)."""
    if self.segmenter is None:
      return self.tokenizer.encode(sentences)
    han = [i for i, s in enumerate(sentences) if has_han(s)]
    plain = [i for i, s in enumerate(sentences) if not has_han(s)]
    out: list = [None] * len(sentences)
    for i, ids in zip(plain, self.tokenizer.encode([sentences[i] for i in plain]) if plain else []):
      out[i] = carry_word_starts(ids, self.table[np.asarray(ids, np.int64)])
    for i, (ids, offsets) in zip(han, self.tokenizer.encode_with_offsets([sentences[i] for i in han])
                                 if han else []):
      out[i] = carry_word_starts(ids, jieba_word_starts(sentences[i], offsets, self.segmenter))
    return out

  def units(self, input_ids: np.ndarray, word_starts: np.ndarray | None, candidate_mask: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Unit ids of one packed row; word_starts None = from the vocabulary table."""
    if word_starts is None:
      word_starts = self.table[input_ids]
    if self.masking == 'whole_word':
      return word_units(word_starts, candidate_mask)
    if self.masking == 'span':
      return span_units(word_starts, candidate_mask, rng)
    return lexicon_units(input_ids, word_starts, candidate_mask, self.lexicon)

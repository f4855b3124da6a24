"""Extractive QA decoding (pure numpy): best span from start/end logits, document windows, answers as text.

As BERT's run_squad: a span (i, j) is valid when i <= j, j - i + 1 <= max_answer_length and both tokens are
context tokens; its score is start_logits[i] + end_logits[j]. Unlike run_squad, which pairs only the n-best (20)
start and end positions, every valid pair is scored (exact; L x L per window is small).

Long contexts are split into overlapping windows (`make_windows`, run_squad's doc_stride loop). Which window
scores a token follows run_squad's "max context" rule by default: a span may start only in the window where its
start token has the most context, min(tokens to the left, tokens to the right) + 0.01 x window length (the first
such window on ties); `max_context=False` takes the best score over all windows instead.
"""
from typing import NamedTuple, Sequence

import numpy as np

from jaxssl.errors import UserError


class Answer(NamedTuple):
  """A decoded answer: the exact substring `context[char_start:char_end]` and its score (-inf: no valid span)."""
  text: str
  char_start: int
  char_end: int
  score: float


def _span_scores(start_logits, end_logits, start_mask, end_mask, max_answer_length):
  """[..., L, L] scores s[i] + e[j], -inf where (i, j) is not a valid span."""
  s = np.asarray(start_logits, np.float64)
  e = np.asarray(end_logits, np.float64)
  n = s.shape[-1]
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  ok = (j >= i) & (j - i < max_answer_length)
  ok = ok & np.asarray(start_mask, bool)[..., :, None] & np.asarray(end_mask, bool)[..., None, :]
  return np.where(ok, s[..., :, None] + e[..., None, :], -np.inf)


def best_spans(start_logits, end_logits, context_mask, max_answer_length: int, *, start_mask=None):
  """Batched `best_span`: [B, L] arrays -> (starts [B], ends [B], scores [B]); (-1, -1, -inf) where none is valid.

  `start_mask` [B, L] (optional) further restricts where a span may start (the max-context rule).
  """
  if max_answer_length < 1:
    raise UserError(f'max_answer_length={max_answer_length}: use at least 1')
  ctx = np.asarray(context_mask, bool)
  smask = ctx if start_mask is None else ctx & np.asarray(start_mask, bool)
  scores = _span_scores(start_logits, end_logits, smask, ctx, max_answer_length)
  b, n = scores.shape[0], scores.shape[-1]
  flat = scores.reshape(b, n * n)
  best = np.argmax(flat, axis=-1)  # the first maximum: earliest start, then earliest end
  score = flat[np.arange(b), best]
  none = ~np.isfinite(score)
  starts = np.where(none, -1, best // n)
  ends = np.where(none, -1, best % n)
  return starts.astype(np.int64), ends.astype(np.int64), score


def best_span(start_logits, end_logits, context_mask, max_answer_length: int, *, start_mask=None):
  """The best valid span of one window: [L] arrays -> (start, end, score = start_logit + end_logit).

  (-1, -1, -inf) when no span is valid (no context token).
  """
  sm = None if start_mask is None else np.asarray(start_mask)[None]
  s, e, sc = best_spans(np.asarray(start_logits)[None], np.asarray(end_logits)[None],
                        np.asarray(context_mask)[None], max_answer_length, start_mask=sm)
  return int(s[0]), int(e[0]), float(sc[0])


def make_windows(context_len: int, max_tokens: int, stride: int) -> list[tuple[int, int]]:
  """Overlapping windows [(offset, length)] over `context_len` context tokens, exactly run_squad's loop.

  Each window holds min(max_tokens, rest) tokens; the next one starts min(length, stride) tokens after the
  previous start (`stride` is the step between window starts, so consecutive full windows overlap by
  max_tokens - stride tokens); the last window ends at the context's end. An empty context gives [(0, 0)], so
  every question still gets one window (whose prediction is the empty answer).
  """
  if max_tokens < 1 or stride < 1:
    raise UserError(f'QA windows need max context tokens >= 1 and doc stride >= 1 (got {max_tokens}, {stride}); '
                    'raise data.seq_len / lower data.max_query_length, or set data.doc_stride >= 1')
  windows, offset = [], 0
  while offset < context_len:
    length = min(context_len - offset, max_tokens)
    windows.append((offset, length))
    if offset + length == context_len:
      break
    offset += min(length, stride)
  return windows or [(0, 0)]


def max_context_masks(windows: Sequence[tuple[int, int]]) -> list[np.ndarray]:
  """For each window, a bool [length] array: True where this window is the max-context one for the token."""
  context_len = max((o + n for o, n in windows), default=0)
  best_score = np.full(context_len, -np.inf)
  best_window = np.full(context_len, -1)
  for w, (offset, length) in enumerate(windows):
    pos = np.arange(length)
    score = np.minimum(pos, length - 1 - pos) + 0.01 * length
    better = score > best_score[offset:offset + length]  # strict: the first window wins ties, as run_squad
    best_score[offset:offset + length][better] = score[better]
    best_window[offset:offset + length][better] = w
  return [best_window[o:o + n] == w for w, (o, n) in enumerate(windows)]


def best_answer_over_windows(per_window_logits, windows, token_char_offsets, context_text: str,
                             max_answer_length: int, *, context_starts=None, max_context: bool = True) -> Answer:
  """The best span over all windows of one context, as text.

  per_window_logits: one (start_logits, end_logits) per window. Entry k of window w scores context token
    windows[w][0] + k; with `context_starts[w]` = p, the arrays are the whole feature's logits and entry p + k is
    context token windows[w][0] + k (the question and specials before p, and anything after the window, are
    ignored).
  windows: from `make_windows`. token_char_offsets: (char_start, char_end) of every context token in
    `context_text` (end exclusive). The answer is context_text[char_start of its first token : char_end of its
    last token], so it is an exact substring of the original context (whitespace inside kept).
  """
  best = (-np.inf, -1, -1)
  starts_ok = max_context_masks(windows) if max_context else [None] * len(windows)
  for w, ((offset, length), (s, e)) in enumerate(zip(windows, per_window_logits)):
    if length == 0:
      continue
    p = 0 if context_starts is None else int(context_starts[w])
    s = np.asarray(s, np.float64)[p:p + length]
    e = np.asarray(e, np.float64)[p:p + length]
    i, j, score = best_span(s, e, np.ones(length, bool), max_answer_length, start_mask=starts_ok[w])
    if i >= 0 and score > best[0]:
      best = (score, offset + i, offset + j)
  score, i, j = best
  if i < 0:
    return Answer('', 0, 0, float('-inf'))
  char_start, char_end = int(token_char_offsets[i][0]), int(token_char_offsets[j][1])
  return Answer(context_text[char_start:char_end], char_start, char_end, float(score))

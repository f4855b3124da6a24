"""ELMo's batches: GPT's packed rows (packed_lm.py) plus `char_ids` [B, T, max_chars], each token's characters.

A token's characters come from its text in the tokenizer's vocabulary, built once into a table [vocab, max_chars]
and gathered by `input_ids` on the host (in the pipeline's threads), so a batch stays a pure function of
(seed, step) and resuming is unchanged. The softmax still predicts the tokenizer's ids.

  text: a piece's surface text, its word-start mark ('▁' of sentencepiece, 'Ġ' of byte-level BPE) as a leading
        space ('▁the' -> ' the', 'ing' -> 'ing'; WordPiece's '##ing' -> 'ing'); sentencepiece's byte pieces
        '<0xE4>' -> that byte
  ids:  [begin-of-word, UTF-8 bytes + 1 ..., end-of-word, 0 ...] cut to max_chars (the end mark kept); special
        tokens ([CLS], [SEP], ...) get [begin, special mark, their name's bytes ..., end], so no text collides
        with them; the padding token gets all zeros.

A model with token_input=tokens gets `char_ids` of width 0 (one batch layout for both inputs: the generic train
step's shardings are per family, not per config); nothing is gathered then.
"""
import re

import numpy as np

from jaxssl.data.examples import packed_lm, rows

# Char ids: 0 = padding, 1..256 = UTF-8 byte + 1, then the marks; the char encoder's table has CHAR_VOCAB_SIZE rows.
PAD_CHAR = 0
BEGIN_WORD, END_WORD, SPECIAL_MARK = 257, 258, 259
CHAR_VOCAB_SIZE = 260
WORD_START_MARKS = ('\u2581', '\u0120')  # sentencepiece '▁', byte-level BPE 'Ġ'
_BYTE_PIECE = re.compile(r'^<0x([0-9A-Fa-f]{2})>$')


def word_char_ids(text: str | bytes, max_chars: int, *, special: bool = False) -> np.ndarray:
  """[max_chars] int32 char ids of one token's text (bytes are taken as they are): begin mark, bytes + 1, end mark,
  zeros; cut so the end mark stays. `special` puts the special-token mark after the begin mark."""
  data = text if isinstance(text, bytes) else text.encode('utf-8')
  head = [BEGIN_WORD] + ([SPECIAL_MARK] if special else [])
  body = [b + 1 for b in data][:max_chars - len(head) - 1]
  ids = np.zeros(max_chars, np.int32)
  ids[:len(head) + len(body) + 1] = head + body + [END_WORD]
  return ids


def piece_text(piece: str) -> str | bytes:
  """The surface text of a vocabulary piece, its word-start mark as a leading space (see the module docstring)."""
  byte = _BYTE_PIECE.match(piece)
  if byte:
    return bytes([int(byte.group(1), 16)])
  if piece.startswith(WORD_START_MARKS):
    return ' ' + piece[1:]
  if piece.startswith('##') and len(piece) > 2:
    return piece[2:]
  return piece


def vocabulary_char_ids(tokenizer, max_chars: int) -> np.ndarray:
  """[tokenizer.vocab_size, max_chars] int32: the char ids of every id's piece (padding: zeros)."""
  table = np.zeros((tokenizer.vocab_size, max_chars), np.int32)
  for i in range(tokenizer.vocab_size):
    if i == tokenizer.pad_id:
      continue
    piece = tokenizer.id_to_piece(i) or ''
    if i in tokenizer.special_ids:
      table[i] = word_char_ids(piece, max_chars, special=True)
    else:
      table[i] = word_char_ids(piece_text(piece), max_chars)
  return table


def char_table(tokenizer, model_cfg) -> np.ndarray:
  """The table a model config reads: the vocabulary's char ids (token_input=chars) or an empty [vocab, 0] one."""
  if model_cfg.get('token_input', 'tokens') != 'chars':
    return np.zeros((tokenizer.vocab_size, 0), np.int32)
  return vocabulary_char_ids(tokenizer, int(model_cfg.get('max_chars', 50)))


def with_char_ids(batch: dict, table: np.ndarray) -> dict:
  """`batch` plus 'char_ids' = table[input_ids] [B, T, table width]."""
  return {**batch, 'char_ids': table[batch['input_ids']]}


def make_lm_iterator(source, tokenizer, table: np.ndarray, *, seq_len: int, seed: int, global_batch_size: int,
                     start_step: int = 0, process_index: int = 0, process_count: int = 1, num_threads: int = 2,
                     prefetch: int = 2, num_workers: int = 0):
  """packed_lm.make_lm_iterator's batches with their char ids, gathered in the pipeline's threads."""
  rows.process_rows(global_batch_size, process_index, process_count)
  packed = packed_lm.PackedDocuments(source, tokenizer, seq_len=seq_len, seed=seed)
  return rows.step_batches(
      lambda step: with_char_ids(packed_lm.local_rows(packed, step, global_batch_size=global_batch_size,
                                                      process_index=process_index, process_count=process_count),
                                 table),
      start_step=start_step, num_threads=num_threads, prefetch=prefetch, num_workers=num_workers)


def make_lm_eval_batches(source, tokenizer, table: np.ndarray, **kw) -> list[dict]:
  """packed_lm.make_lm_eval_batches' batches with their char ids."""
  return [with_char_ids(b, table) for b in packed_lm.make_lm_eval_batches(source, tokenizer, **kw)]

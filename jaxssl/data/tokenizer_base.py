"""What every tokenizer kind shares (sentencepiece in tokenizers.py, WordPiece in wordpiece.py, HF BPE/Unigram in
hf_tokenizer.py): jaxssl's special pieces, HF file names and tokenizer_config.json, the random-replacement range and
the trimming of character offsets."""
import json

from jaxssl import storage
from jaxssl.errors import UserError

SPECIAL_PIECES = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # jaxssl sentencepiece ids 0..4, in order
JSON_FILENAME = 'tokenizer.json'
CONFIG_FILENAME = 'tokenizer_config.json'


def trim_span(text: str, start: int, end: int) -> tuple[int, int]:
  """(start, end) without surrounding whitespace; whitespace only -> the empty span at its end."""
  while start < end and text[start].isspace():
    start += 1
  while end > start and text[end - 1].isspace():
    end -= 1
  return (start, end) if start < end else (end, end)


def read_tokenizer_config(directory: str) -> dict:
  """`directory`'s tokenizer_config.json as a dict ({} when there is none); unreadable JSON is a UserError."""
  path = storage.join(directory, CONFIG_FILENAME)
  if not storage.isfile(path):
    return {}
  try:
    return json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not readable JSON ({e}): fix or delete it') from None


def random_token_range(vocab_size: int, special_ids: frozenset) -> tuple[int, int]:
  """[low, high): ids past the leading block of special/reserved ids and before a trailing one.

  bert-base-uncased gives (999, 30522): ids 0..998 are [PAD], [unused*], [UNK], [CLS], [SEP], [MASK]. Google's
  BERT draws from the whole vocabulary; skipping the block keeps random replacements real tokens. Special ids
  scattered inside the range (none in BERT vocabularies) could still be drawn.
  """
  low, high = 0, vocab_size
  while low < high and low in special_ids:
    low += 1
  while high > low and high - 1 in special_ids:
    high -= 1
  if low >= high:
    raise UserError(f'the tokenizer has no ordinary tokens (all {vocab_size} ids are special)')
  return low, high

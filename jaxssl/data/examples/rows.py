"""What every family's example pipeline shares: this process's rows of a global batch, and skipping empty
documents while staying a pure function of (seed, example index)."""
from jaxssl.errors import UserError

# Bounded retries for empty documents (a corpus should not have many; corpora.py filters them).
MAX_EMPTY_RETRIES = 64


def process_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
  """(first row, number of rows) of this process's share of a global batch; UserError when it does not divide."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'bad process_index={process_index} / process_count={process_count}')
  if global_batch_size % process_count:
    raise UserError(f'train.batch_size={global_batch_size} is not divisible by the {process_count} processes: '
                    f'use a multiple of {process_count}')
  local = global_batch_size // process_count
  return process_index * local, local


def document_sentences(indices: list[int], records) -> tuple[list[str], list[int]]:
  """(non-empty lines, the document index each came from) of corpus records {'text': bytes or str}; UserError
  naming the document when its text is not UTF-8."""
  sentences, owners = [], []
  for i, record in zip(indices, records):
    text = record['text']
    try:
      text = text.decode('utf-8') if isinstance(text, bytes) else text
    except UnicodeDecodeError as e:
      raise UserError(f'document {i} of the corpus is not valid UTF-8 ({e}): re-encode the text as UTF-8') from None
    for s in text.split('\n'):
      if s.strip():
        sentences.append(s)
        owners.append(i)
  return sentences, owners


def nonempty_document(doc: int, g: int, get, permutation, num_docs: int) -> int:
  """`doc` (example g's document in its epoch's permutation), or when it has no tokens the next non-empty one of
  the same permutation: still a pure function of (seed, g). `get(d)` gives document d's tokenized sentences."""
  k = 0
  while not get(doc):
    k += 1
    if k > MAX_EMPTY_RETRIES:
      raise UserError(f'more than {MAX_EMPTY_RETRIES} consecutive empty documents in the corpus: '
                      'remove empty documents (or check the tokenizer)')
    doc = int(permutation(g // num_docs)[(g + k) % num_docs])
  return doc

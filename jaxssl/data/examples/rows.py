"""What every family's example pipeline shares: this process's rows of a global batch, skipping empty
documents while staying a pure function of (seed, example index), and the iterator over steps (threads or
worker processes)."""
from typing import Callable, Iterator

from absl import flags
import grain

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


def step_batches(batch_of_step: Callable[[int], dict], *, start_step: int, num_threads: int = 1, prefetch: int = 2,
                 num_workers: int = 0) -> Iterator[dict]:
  """Endless iterator over `batch_of_step(start_step)`, `batch_of_step(start_step + 1)`, ...

  One element per step, so the batch of a step is the same whatever the threads or workers: resuming is a new
  iterator at the checkpointed step. `num_threads` read ahead in this process (tokenizers release the GIL for
  part of the work); `num_workers` > 0 adds that many worker processes (grain's mp_prefetch, each taking every
  n-th step, merged back in order) for what the GIL bounds. `batch_of_step` must then pickle (cloudpickle).
  """
  if num_workers < 0 or num_threads < 0:
    raise UserError(f'data.num_workers={num_workers} and data.num_threads={num_threads} must be >= 0')
  ds = grain.MapDataset.range(start_step, 2**62).map(batch_of_step)
  options = grain.ReadOptions(num_threads=max(1, num_threads), prefetch_buffer_size=max(1, prefetch))
  it = ds.to_iter_dataset(options)
  if num_workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; jaxssl's jobs parse their own arguments
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch)))
  return iter(it)

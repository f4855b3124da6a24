"""Fine-tuning batches of text tasks packed: several short examples share one row.

Tweets and GLUE sentences average 20-40 pieces, tagged sentences (POS, NER) about as many. Length buckets
(length_buckets.py) cut a batch to the bucket of its longest example, so every short example still fills a whole
row of that length. Packing lays a batch's examples end to end instead ([CLS] a [SEP] [CLS] b [SEP] ...; first-fit,
longest first) into rows of `data.seq_len`, as many as the smallest multiple of batch_size/16 that holds them:
about the batch's real tokens, not its longest example times its size. Long rows pack tightest; a batch of 32
tweets (~33 pieces) fills 9-10 rows of 128 where buckets gave 32 rows of 64, and the row counts seen are two or
three: few shapes to compile (measured on tweets against rows of the bucket length: 1,211 tokens a step in 3
shapes against 1,299 in 5). The attention over longer rows costs little beside the projections. Each row count
is a train step to compile (~5 s for MiniLM or BERT-base in XLA's loop on 2 cores) and each saves padding rows, so
`row_counts` weighs the two over the job's first steps: on CPU it keeps the counts whose saved padded tokens, at the
body's FLOPs per token, pay for their compiles (a 60-step MiniLM job of 16 tweets packs to one count; the same job on
BERT-base to three: its steps cost 8x more). Elsewhere, where a compile's cost is not measured yet, the multiple
grows until the first steps need at most MAX_ROW_COUNTS counts (`few_shapes_multiple`; short rows and small batches
spread widest: 16 sentences of ~13 pieces in rows of 24 needed 8 to 14), and at most one per STEPS_PER_ROW_COUNT
steps of the job (`row_counts_for`). Padding rows change nothing a real token
computes, its dropout masks included (dropout.keep_mask hashes each element's row-major index: a row's bits do not
depend on the rows after it).

A packed row tells the model where its examples are:
  attention_mask   [R, L]: each example's tokens carry its own id 1, 2, ... in the row (0 = padding); a token
                   attends only the tokens of its example (MultiHeadAttention reads the mask as segment ids)
  position_ids     [R, L]: positions restart at 0 at each example's [CLS]
  pool_positions   [E]: where each example's [CLS] is, as an index into the flattened [R * L] batch; the
                   pooler reads these rows, so the head gives [E, classes] logits in the batch's example order
and per-example keys (a class `labels` [E]) stay [E]; per-token keys (tagging's `labels` and `word_mask` [N, L])
are laid out with their tokens, [R, L], so a token head's logits [R, L, C] meet their labels. Outputs, loss and
gradients equal the padded computation's (tests/test_packing.py; up to float summation order); dropout draws its
masks for the packed shape.

`data.packing`: 'auto' packs the text kinds whose head reads the pooled [CLS] vector (classification, pair,
regression) or every token on its own (tagging) on a BERT-family body with full attention; not QA, whose labels are
positions in its row and whose head reads a context mask. 'none' never packs. Dev and evaluate batches are not
packed: they go shortest first, so their buckets already fit them.
"""
import numpy as np

from jaxssl.errors import UserError
from jaxssl.tasks.base import INPUT_KEYS
from jaxssl.tasks.model import PACKED_INPUTS
from jaxssl.train import length_buckets

SETTINGS = ('auto', 'none')
ROW_STEPS = 16  # the row count is a multiple of batch_size / ROW_STEPS (rounded to the batch divisor): few shapes
MAX_ROW_COUNTS = 3  # at most this many packed row counts (train-step shapes) over the steps sampled
# ... and, off CPU, one per this many steps of the job: a short job pays more for compiling a shape (~4.6 s for
# MiniLM on CPU, with an empty compile cache) than the padding it saves (60 steps of MiniLM: one shape 43.4 s against
# three 48.8 s cold, 29.5 against 28.2 s warm; BENCHMARKS.md §37). On CPU `row_counts` weighs it per body.
STEPS_PER_ROW_COUNT = 100
# The steps sampled hold at most this many examples: first-fit takes ~4 us an example (a pod's global batch of 4,096:
# 17 ms a step, 8.6 s for 500 steps), and a large batch's row counts spread little.
SAMPLE_EXAMPLES = 16_384
NDIMS = {'position_ids': 2, 'pool_positions': 1}  # of PACKED_INPUTS
TOKEN_FILL = {'labels': -1}  # a per-token key's value at padding (tagging's -1: no label); other keys 0


def check_setting(setting) -> str:
  """`data.packing` lower-cased; UserError unless auto or none."""
  text = str(setting).strip().lower()
  if text not in SETTINGS:
    raise UserError(f'data.packing={setting!r}: use auto (pack text tasks but QA) or none')
  return text


def packs(setting, kind, model_cfg) -> bool:
  """Whether fine-tuning packs its batches: `data.packing` (auto | none) for task kind `kind` and the body."""
  text = check_setting(setting)
  # QA is the text kind with head inputs (its context mask); its labels are positions in the row.
  text_kind = tuple(kind.input_keys) == INPUT_KEYS and not kind.model_inputs
  bert_body = model_cfg.get('name', 'bert') == 'bert' and model_cfg.get('attention_type', 'full') == 'full'
  return text == 'auto' and text_kind and bert_body


def row_multiple(batch_size: int, divisor: int, processes: int) -> int:
  """The packed row count is a multiple of this: batch_size / ROW_STEPS, rounded up to a multiple of the batch
  shards (`divisor`) and of the processes (each feeds an equal share of the rows)."""
  unit = int(np.lcm(divisor, processes))
  return -(-max(batch_size // ROW_STEPS, 1) // unit) * unit


def first_fit(lengths: np.ndarray, row_len: int) -> list[list[int]]:
  """Example indices per row: longest first, each into the first row with room (first-fit decreasing). The search
  for a row is one numpy scan per example: a pod's global batch of thousands packs in milliseconds."""
  room = np.full(len(lengths) + 1, row_len)  # never more rows than examples; row len(rows) is always empty
  rows: list[list[int]] = []
  for i in np.argsort(-lengths, kind='stable'):
    n = int(lengths[i])
    slot = int(np.argmax(room[:len(rows) + 1] >= n))  # the empty row fits any example: argmax finds a True
    if slot == len(rows):
      rows.append([])
    rows[slot].append(int(i))
    room[slot] -= n
  return rows


def rows_needed(example_lengths: np.ndarray, row_len: int) -> int:
  """How many rows first-fit fills with examples of these lengths (before rounding to the row multiple)."""
  return len(first_fit(example_lengths, row_len))


def rounded(rows: int, multiple: int) -> int:
  """`rows` rounded up to a multiple of `multiple`: the packed batch's row count (its shape)."""
  return -(-rows // multiple) * multiple


def row_counts_for(steps: int) -> int:
  """How many packed row counts (train-step shapes) a job of `steps` steps may compile: one per
  STEPS_PER_ROW_COUNT steps, at least 1 and at most MAX_ROW_COUNTS."""
  return max(1, min(MAX_ROW_COUNTS, steps // STEPS_PER_ROW_COUNT))


def row_counts(needed, unit: int, steps: int, row_len: int, worth: float) -> tuple[int, ...]:
  """The packed row counts (train-step shapes) a job of `steps` steps compiles, from the rows its sampled steps need
  (`needed`, first-fit, before rounding). On CPU (`worth` > 0: the padded tokens one more train-step compile costs,
  length_buckets.compile_worth(training=True)) the counts, multiples of `unit`, that minimise the job's padded
  tokens plus their compiles: a MiniLM job of 60 steps of 16 tweets packs to one count, BERT-base's to three.
  Elsewhere the counts of `few_shapes_multiple`, one per STEPS_PER_ROW_COUNT steps (at most MAX_ROW_COUNTS)."""
  needed = list(needed)
  if worth <= 0:
    multiple = few_shapes_multiple(needed, unit, row_counts_for(steps))
    return tuple(sorted({rounded(n, multiple) for n in needed}))
  at_unit = [rounded(n, unit) for n in needed]
  return length_buckets.fewest_cost_lengths(at_unit, row_len * steps / len(at_unit), worth)


def row_count(rows: int, counts: tuple[int, ...], unit: int) -> int:
  """The row count a batch that fills `rows` rows is packed to: the smallest of `counts` that holds it (a step past
  the sampled ones may need more: then `rows` rounded up to `unit`, one more shape)."""
  return next((c for c in counts if c >= rows), rounded(rows, unit))


def few_shapes_multiple(needed, unit: int, most: int = MAX_ROW_COUNTS) -> int:
  """The smallest multiple of `unit` (`row_multiple`) at which the row counts `needed` (first-fit rows of the
  sampled steps' batches) round up to at most `most` distinct values."""
  needed, multiple = set(needed), unit
  while len({rounded(n, multiple) for n in needed}) > most:  # ends: at max(needed) every count rounds alike
    multiple += unit
  return multiple


def pack(features: dict, examples: np.ndarray, lengths: np.ndarray, row_len: int, multiple: int, keys) -> dict:
  """The global batch of `examples` (row indices into `features`) packed into rows of `row_len`, as many rows as
  a multiple of `multiple` holds; `keys` the batch's keys. Every process builds the same global batch and feeds
  its share (`share`), so the batch, and with it every dropout mask, is the same on any number of processes.
  Padding holds token id 0: no example attends it and nothing reads it. Keys of `features` shaped like its
  input_ids ([N, L]: per-token labels) go with their tokens; padding holds TOKEN_FILL's value there, else 0."""
  layout = first_fit(lengths[examples], row_len)
  rows = rounded(len(layout), multiple)
  seq_len = features['input_ids'].shape[1]
  per_token = [k for k in keys if k in features and k not in INPUT_KEYS and features[k].shape[1:] == (seq_len,)]
  laid = {k: np.full((rows, row_len), TOKEN_FILL.get(k, 0), features[k].dtype)
          for k in ('input_ids', 'token_type_ids', *per_token)}
  segments, positions = np.zeros((rows, row_len), np.int32), np.zeros((rows, row_len), np.int32)
  pool = np.zeros(len(examples), np.int32)
  for r, members in enumerate(layout):
    at = 0
    for segment, i in enumerate(members, start=1):
      n, src = int(lengths[examples[i]]), examples[i]
      for k, out in laid.items():
        out[r, at:at + n] = features[k][src, :n]
      segments[r, at:at + n] = segment
      positions[r, at:at + n] = np.arange(n)
      pool[i] = r * row_len + at
      at += n
  batch = {k: features[k][examples] for k in keys if k in features and k not in (*laid, *INPUT_KEYS)}
  batch.update(laid, attention_mask=segments, position_ids=positions, pool_positions=pool)
  return batch


def share(batch: dict, process_index: int, process_count: int) -> dict:
  """This process's contiguous share of a packed global batch: its part of the rows and of the examples."""
  return {k: np.split(v, process_count)[process_index] for k, v in batch.items()}

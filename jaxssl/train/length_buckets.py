"""Fine-tuning batches padded to a few lengths, not all to `data.seq_len`.

Sentence tasks average 20-40 pieces while `data.seq_len` is 128 (384 for QA): padding every row to it makes most
of the work padding. Each batch is cut instead to the shortest of a handful of bucket lengths that holds its
longest row, so XLA compiles one program per bucket actually used (a few shapes, as TPUs need) rather than one
per batch (transformers' dynamic padding). Cutting the padding changes nothing a real token computes: attention
masks padding keys out, the pooled vector is [CLS]'s, and the losses weight padding by 0, so outputs and
gradients equal the padded computation's (tests/test_length_buckets.py; up to float summation order). Dropout
draws its masks for the batch's shape, so a run with dropout samples other masks than a padded run.

`data.length_buckets`: 'auto' (seq_len/8, /4, /2 and seq_len, each a multiple of 8, at least 16), 'none' (every
batch at seq_len, as before), or lengths such as '32,64,128' (seq_len is always one of them).
"""
import jax
import numpy as np

from jaxssl import families
from jaxssl.errors import UserError

PAD_LOGIT = -1e9  # per-token outputs at cut positions: a logit no decoder picks (the QA head's masked value)
# What one more shape costs on CPU, to weigh against the padding it saves (`compile_worth`): a forward program (dev,
# evaluate) or a fine-tuning train step in XLA's layer loop, traced and compiled (forward: MiniLM 0.6-0.9 s,
# BERT-base 0.6-1.4 s; train step: MiniLM 4.3-4.7 s, BERT-base's gradient alone 3.9-4.2 s; BENCHMARKS.md §24, §38),
# against a float32 matmul rate (a 2-core Zen 4 runs MiniLM's forward at ~150 GFLOP/s). The rate is fixed, not read
# from the host: every process of a job must choose the same shapes.
FORWARD_COMPILE_SECONDS = 0.9
TRAIN_COMPILE_SECONDS = 5.0
CPU_FLOPS = 150e9


def bucket_lengths(setting, seq_len: int) -> tuple[int, ...]:
  """The bucket lengths of `data.length_buckets` for `seq_len`, ascending, ending with seq_len."""
  text = str(setting).strip().lower()
  if text == 'none':
    return (seq_len,)
  if text == 'auto':
    wanted = [max(16, -(-seq_len // d // 8) * 8) for d in (8, 4, 2)]
  else:
    try:
      wanted = [int(v) for v in text.replace(' ', '').split(',') if v]
    except ValueError:
      wanted = [0]
    if not wanted or min(wanted) <= 0:
      raise UserError(f'data.length_buckets={setting!r}: use auto, none or positive lengths such as 32,64,128')
  return tuple(sorted({min(v, seq_len) for v in wanted} | {seq_len}))


def eval_lengths(setting, seq_len: int) -> tuple[int, ...]:
  """The lengths dev and evaluate batches may be cut to. With 'auto' on CPU: every multiple of seq_len/16 (at least
  8, a multiple of 8), finer than the training buckets. There their forward programs run XLA's layer loop
  (train/layer_loop.py) and compile in about a second: 600 tweets of ~33 pieces padded to 16/32/64 cost 18,432
  tokens, to multiples of 8 13,312. The predictor keeps only those that pay for their compile
  (`fewest_cost_lengths`). Elsewhere, or any other setting, the training buckets (bucket_lengths)."""
  buckets = bucket_lengths(setting, seq_len)
  if str(setting).strip().lower() != 'auto' or jax.default_backend() != 'cpu':
    return buckets
  step = max(8, -(-seq_len // 16 // 8) * 8)
  return tuple(sorted({*range(step, seq_len, step), seq_len}))


def compile_worth(model_cfg, vocab_size: int, seq_len: int, runs: int, *, training: bool = False) -> float:
  """How many padded tokens' forward pass (train step, with `training`) costs about what compiling one more such
  program does, per run of the compiled shapes (`runs`: how often the same rows are predicted, e.g. a fine-tuning
  job's dev evaluations). 0 off CPU, where the shapes stay the training buckets and one packed row count per 100
  steps. Forward, once: MiniLM ~7,000 tokens, BERT-base ~800; a train step: MiniLM ~12,000, BERT-base ~1,500."""
  if jax.default_backend() != 'cpu':
    return 0.0
  flops = families.flops_per_token(model_cfg, vocab_size, seq_len, 0)  # a training step's; a forward is a third
  seconds, flops = (TRAIN_COMPILE_SECONDS, flops) if training else (FORWARD_COMPILE_SECONDS, flops / 3)
  return seconds * CPU_FLOPS / max(flops, 1.0) / max(runs, 1)


def fewest_cost_lengths(needed, tokens_per: int, worth: float) -> tuple[int, ...]:
  """The lengths to compile for batches that each need a length of `needed` (their buckets; or packed row counts),
  a batch at length v costing v x `tokens_per` padded tokens (its rows; or the row length): the subset, always with
  the longest, that minimises the batches' padded tokens (each at the shortest kept length that holds it) plus
  `worth` tokens for each length kept (`compile_worth`). Exact, over the distinct lengths in order (a batch's kept
  length is the next one up, so the kept lengths split them into runs)."""
  values, counts = np.unique(np.asarray(needed, np.int64), return_counts=True)
  if worth <= 0 or len(values) <= 1:
    return tuple(int(v) for v in values)
  best, came_from = [0.0] + [np.inf] * len(values), [0] * (len(values) + 1)
  for j in range(1, len(values) + 1):  # best[j]: the lowest cost of the first j lengths with values[j-1] kept
    for i in range(j):
      cost = best[i] + worth + values[j - 1] * tokens_per * counts[i:j].sum()
      if cost < best[j]:
        best[j], came_from[j] = cost, i
  kept, j = [], len(values)
  while j:
    kept.append(int(values[j - 1]))
    j = came_from[j]
  return tuple(sorted(kept))


def describe(lengths: tuple[int, ...]) -> str:
  """'16/32/64/128', or 'multiples of 8 to 128' for a long even ladder (what a banner says)."""
  step = lengths[0]
  if len(lengths) > 4 and lengths[:-1] == tuple(range(step, lengths[-1], step)):
    return f'multiples of {step} to {lengths[-1]}'
  return '/'.join(map(str, lengths))


def real_lengths(features: dict) -> np.ndarray | None:
  """Each row's length up to its last real token (from `attention_mask`), or None for inputs without one
  (images, audio: nothing to cut)."""
  mask = features.get('attention_mask')
  if mask is None:
    return None
  mask = np.asarray(mask)
  last = mask.shape[1] - np.argmax(mask[:, ::-1] != 0, axis=1)
  return np.where(mask.any(axis=1), last, 1).astype(np.int32)


def batch_length(lengths: np.ndarray | None, rows: np.ndarray, buckets: tuple[int, ...]) -> int | None:
  """The bucket that holds the longest of `rows` (a global batch, the same on every process), or None."""
  if lengths is None:
    return None
  longest = int(lengths[rows].max()) if len(rows) else 1
  return next(b for b in buckets if b >= longest)


def cut(batch: dict, length: int | None, seq_len: int) -> dict:
  """`batch` with every per-token feature ([N, seq_len, ...]) cut to `length`; others as they are."""
  if length is None or length >= seq_len:
    return batch
  return {k: v[:, :length] if np.ndim(v) >= 2 and np.shape(v)[1] == seq_len else v for k, v in batch.items()}


def pad_outputs(outputs, length: int | None, seq_len: int, fill: float):
  """Per-token outputs ([N, length, ...], each array of a tuple) padded back to seq_len with `fill` (a logit
  no decoder picks), so batches of different buckets concatenate."""
  if length is None or length >= seq_len:
    return outputs
  if isinstance(outputs, (tuple, list)):
    return type(outputs)(pad_outputs(o, length, seq_len, fill) for o in outputs)
  widths = [(0, 0), (0, seq_len - length)] + [(0, 0)] * (outputs.ndim - 2)
  return np.pad(outputs, widths, constant_values=fill)

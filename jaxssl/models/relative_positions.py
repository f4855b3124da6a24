"""Relative position schemes of imported encoders (models/bert.py): MPNet's bucketed bias and DeBERTa's
disentangled attention.

MPNet (convert/hf_mpnet.py) adds to every layer's scores a learned per-head bias for the bucket of each key's
distance from the query (T5's bidirectional buckets): `bucket_bias`.

DeBERTa-v2/v3 (He et al. 2020; convert/hf_deberta.py), as transformers' DebertaV2Model computes it: besides
content-to-content scores q_i . k_j, each head scores content against relative position:
  c2p(i, j) = q_i . Kr[d(i, j)]   (the query's content against the key's distance from it)
  p2c(i, j) = k_j . Qr[d(i, j)]   (the key's content against the same distance)
where d(i, j) is the log bucket of i - j shifted into [0, 2S) (S = position_buckets, 256 in v3), and Qr, Kr are
one table of relative embeddings [2S, H] (shared by every layer, LayerNorm-ed) put through each layer's own query
and key projections (DeBERTa's share_att_key). All three terms are divided by sqrt(3 * head_dim). It plugs into
layers.MultiHeadAttention as a callable `bias` (DisentangledBias). Distances use the row index, so packed rows
(examples attend only within themselves) get the same scores as rows of one example.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.models.layers import dropout

# MPNet's (HF's MPNetEncoder fixes it, as T5's default): distances from this on share the last bucket.
RELATIVE_MAX_DISTANCE = 128


def relative_position_buckets(seq_len: int, num_buckets: int) -> np.ndarray:
  """int32 [T, T]: the bucket of key j's offset from query i (HF MPNet's relative_position_bucket, T5's
  bidirectional scheme): half the buckets for keys before the query, half for keys at or after it; in each half
  one bucket per distance below num_buckets // 4, then log-spaced ones up to RELATIVE_MAX_DISTANCE. Computed in
  float32 in HF's order, so bucket edges round as they do there."""
  n = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]  # query - key
  half = num_buckets // 2
  exact = half // 2
  ret = (n < 0).astype(np.int64) * half
  n = np.abs(n)
  with np.errstate(divide='ignore'):
    log = np.log(n.astype(np.float32) / np.float32(exact)) / np.float32(math.log(RELATIVE_MAX_DISTANCE / exact))
  large = exact + np.where(n >= exact, log * np.float32(half - exact), 0).astype(np.int64)
  return (ret + np.where(n < exact, n, np.minimum(large, half - 1))).astype(np.int32)


def bucket_bias(table: jax.Array, seq_len: int) -> jax.Array:
  """float32 [1, N, T, T]: `table` [buckets, N] read at each (query, key) pair's bucket."""
  buckets = relative_position_buckets(seq_len, table.shape[0])
  return jnp.transpose(table.astype(jnp.float32)[buckets], (2, 0, 1))[None]


# ----- DeBERTa -----

SCORE_TERMS = 3  # content-content, c2p, p2c: the scores' common divisor is sqrt(3 * head_dim)


def log_bucket_positions(seq_len: int, buckets: int, max_position: int) -> np.ndarray:
  """int32 [T, T]: the bucket of query i's offset i - j from key j (transformers' make_log_bucket_position):
  offsets under buckets // 2 keep their value, larger ones are log-spaced up to `max_position`. float32 arithmetic
  in transformers' order, so bucket edges round as there."""
  rel = np.arange(seq_len)[:, None] - np.arange(seq_len)[None, :]
  mid = buckets // 2
  abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel)).astype(np.float32)
  scale = np.float32(math.log((max_position - 1) / mid))
  log_pos = np.ceil(np.log(abs_pos / np.float32(mid)) / scale * np.float32(mid - 1)) + np.float32(mid)
  return np.where(abs_pos <= mid, rel.astype(np.float32), log_pos * np.sign(rel)).astype(np.int32)


def relative_index(seq_len: int, buckets: int, max_position: int) -> np.ndarray:
  """int32 [T, T]: the row of the relative table that (query i, key j) reads, log bucket + S clipped to [0, 2S)."""
  return np.clip(log_bucket_positions(seq_len, buckets, max_position) + buckets, 0, 2 * buckets - 1)


class DisentangledBias:
  """MultiHeadAttention's `bias` for DeBERTa: `(q, k, project, dropout_rng) -> (q / sqrt(3), c2p + p2c scores)`.

  `relative` [2S, H]: the normalised relative embeddings; `index` [T, T] from relative_index. q, k [B, T, N, D]
  (the query rows are all T: no query subset); `project(x, name)` is the layer's projection ('query' / 'key').
  In training (`dropout_rng`, the layer's attention key) each layer drops out the table at `dropout_rate`, as
  transformers' pos_dropout does.

  A score depends on (i, j) only through the offset i - j, so each term is computed against the table rows of the
  2T - 1 offsets -(T - 1) .. T - 1 (all different rows while T <= S / 2; longer sequences repeat the log-bucketed
  ones), then skewed into [T, T] by a reshape. transformers gathers [T, T] entries from scores against all 2S rows;
  done that way here, the gather and its scatter-add gradient made a DeBERTa-base gradient step 1.44x BERT-base's
  (8 x 128 tokens, 2-core CPU), against 1.18x now and 1.34x for PyTorch's pair (BENCHMARKS.md §31).
  """

  def __init__(self, relative: jax.Array, index: np.ndarray, dropout_rate: float = 0.0):
    self.relative, self.dropout_rate = relative, dropout_rate
    # Row k of the skewed layout is offset d = T - 1 - k: table rows for c2p (i - j = d) and p2c (j - i = d).
    offset_of = np.concatenate([index[0, ::-1], index[1:, 0]])  # idx of offsets i - j = -(T - 1) .. T - 1
    self.c2p_rows = jnp.asarray(offset_of[::-1].copy())
    self.p2c_rows = jnp.asarray(offset_of.copy())

  def __call__(self, q, k, project, dropout_rng=None):
    head_dim = q.shape[-1]
    key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)  # not the probabilities' mask
    rel = dropout(self.relative, self.dropout_rate, key).astype(q.dtype)
    pos_key = project(rel[self.c2p_rows][None], 'key')[0]       # [2T - 1, N, D]
    pos_query = project(rel[self.p2c_rows][None], 'query')[0]
    c2p = _skew(jnp.einsum('bqnd,rnd->bnqr', q, pos_key, preferred_element_type=jnp.float32))
    p2c = jnp.swapaxes(_skew(jnp.einsum('bknd,rnd->bnkr', k, pos_query, preferred_element_type=jnp.float32)), -1, -2)
    scale = 1 / math.sqrt(head_dim * SCORE_TERMS)
    return q * jnp.asarray(1 / math.sqrt(SCORE_TERMS), q.dtype), (c2p + p2c) * scale


def _skew(x: jax.Array) -> jax.Array:
  """[..., T, 2T - 1] -> [..., T, T]: out[i, j] = x[i, T - 1 - i + j] (row k of the last axis is offset T - 1 - k,
  so column j of row i reads offset i - j), by slicing the flattened rows at a stride of 2T - 2."""
  t = x.shape[-2]
  if t == 1:
    return x
  lead = x.shape[:-2]
  flat = x.reshape(*lead, t * (2 * t - 1))[..., t - 1:t - 1 + t * (2 * t - 2)]
  return flat.reshape(*lead, t, 2 * t - 2)[..., :t]


def flops_per_token(hidden: int, seq_len: int) -> float:
  """Training FLOPs per token per layer of the c2p and p2c terms (3x forward), as DisentangledBias computes them:
  each token's q (or k) against the table rows of the 2T - 1 offsets (2 x 2 H (2T - 1)), plus those rows' query
  and key projections once per sequence (2 x 2 H^2 (2T - 1))."""
  rows = 2 * seq_len - 1
  return 3 * (2 * 2 * hidden * rows + 2 * 2 * hidden * hidden * rows / seq_len)

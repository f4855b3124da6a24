"""Big Bird block-sparse attention (Zaheer et al. 2020, the ITC layout of HF `BigBirdModel`, block_sparse).

The sequence is cut into nb blocks of `block_size` tokens. Query blocks 0 and nb-1 are global: they attend to
every key, and every query attends to them. Every other query block i attends to its sliding window (blocks
i-1, i, i+1), the two global blocks, and r random blocks, so each of its rows scores (5 + r) x block_size keys:

      keys ->  0  1  2  3  4  5  6  7        G = global, W = window, R = random (r = 1 here)
  query 0      G  G  G  G  G  G  G  G
        1      G  W  W  .  R  .  .  G        (block 1's left window neighbour is global block 0:
        2      G  W  W  W  .  .  R  G         one copy of it is masked, so no key is counted twice)
        ...
        7      G  G  G  G  G  G  G  G

Memory and time grow linearly in the sequence length: the two global query blocks score [2 x block_size, T]
keys and the middle blocks gather their (5 + r) key/value blocks into [B, nb - 2, (5 + r) x block_size, N, D]
arrays; no [T, T] score matrix is ever formed (tests/test_bigbird.py checks the jaxpr at T = 4096).

The random blocks. `random_block_table(num_blocks, r, seed, num_heads)` draws, for each head and each middle
query block, r distinct key blocks outside its window and the global blocks, from numpy's
`default_rng([*seed, head, num_blocks, r])`: a pure function of (seed, head, shape), computed when the step is
traced, so the pattern is fixed per compiled shape and identical in training and evaluation. BERT passes
seed = layer index (like HF, whose layer i is seeded with i) so layers get different patterns; heads differ too
(as in HF). It does not reproduce HF's numpy draws: HF restricts random blocks to the first 1024 tokens for
seq_len in {1024, 3072, 4096}, bans two extra wrap-around blocks for the second and second-to-last rows, and
(since transformers 4.3x) uses block 0 for every random block at evaluation time.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxssl.errors import UserError
from jaxssl.models.layers import dropout

WINDOW_AND_GLOBAL = 5  # key blocks every middle query block attends besides its random ones: 3 window + 2 global


def min_blocks(num_random_blocks: int) -> int:
  """The fewest blocks the layout needs: each middle row must find r random blocks outside its 5 others."""
  return WINDOW_AND_GLOBAL + num_random_blocks


def check_layout(seq_len: int, block_size: int, num_random_blocks: int) -> int:
  """The number of blocks of a `seq_len` sequence; raises UserError when the layout does not fit it."""
  if block_size < 1 or num_random_blocks < 0:
    raise UserError(f'model.block_size={block_size}, model.num_random_blocks={num_random_blocks}: use a '
                    'block_size >= 1 and num_random_blocks >= 0')
  if seq_len % block_size:
    raise UserError(f'block-sparse attention needs the sequence length ({seq_len}) to be a multiple of '
                    f'model.block_size={block_size}: set data.seq_len to a multiple of {block_size} '
                    f'(e.g. {-(-seq_len // block_size) * block_size}) or use model.attention_type=\'full\'')
  need = min_blocks(num_random_blocks)
  if seq_len // block_size < need:
    raise UserError(f'block-sparse attention with model.num_random_blocks={num_random_blocks} needs at least '
                    f'{need} blocks of model.block_size={block_size} ({need * block_size} tokens) but the sequence '
                    f'has {seq_len}: use a longer data.seq_len, a smaller block_size or fewer random blocks, or '
                    'raise model.sparse_min_length so this length uses full attention')
  return seq_len // block_size


def _entropy(seed) -> list[int]:
  return [int(s) for s in (seed if isinstance(seed, (tuple, list)) else (seed,))]


def _fixed_blocks(num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
  """Per middle query block (rows 1..nb-2): its 5 fixed key blocks [left, self, right, first, last] and which
  of them count (block 1's left neighbour and block nb-2's right neighbour are the global blocks again)."""
  rows = np.arange(1, num_blocks - 1)
  fixed = np.stack([rows - 1, rows, rows + 1, np.zeros_like(rows), np.full_like(rows, num_blocks - 1)], axis=1)
  keep = np.ones(fixed.shape, bool)
  keep[0, 0] = False   # block 1: left neighbour = block 0, already a global key
  keep[-1, 2] = False  # block nb-2: right neighbour = block nb-1, already a global key
  return fixed.astype(np.int32), keep


def random_block_table(num_blocks: int, num_random_blocks: int, seed: int | Sequence[int] = 0,
                       num_heads: int = 1) -> np.ndarray:
  """int32 [num_heads, num_blocks - 2, r]: the random key blocks of each middle query block (rows 1..nb-2).

  Row i draws r distinct blocks uniformly from those outside its window (i-1, i, i+1) and the global blocks
  (0, nb-1), from `default_rng([*seed, head, num_blocks, r])`: head h of any table equals the one-head table of
  the same seed when h = 0, and the table is a pure function of its arguments. Indices are sorted per row.
  """
  nb, r = int(num_blocks), int(num_random_blocks)
  if nb - min_blocks(0) < r:
    raise UserError(f'{nb} blocks leave fewer than num_random_blocks={r} candidates per row: use at least '
                    f'{min_blocks(r)} blocks')
  fixed, _ = _fixed_blocks(nb)
  banned = np.zeros((nb - 2, nb), bool)
  np.put_along_axis(banned, fixed, True, axis=1)
  out = np.empty((num_heads, nb - 2, r), np.int32)
  for h in range(num_heads):
    # Random sort keys with the banned blocks last: the first r are a uniform draw without replacement.
    keys = np.random.default_rng([*_entropy(seed), h, nb, r]).random((nb - 2, nb))
    keys[banned] = np.inf
    out[h] = np.sort(np.argsort(keys, axis=1)[:, :r], axis=1)
  return out


def block_pattern(random_blocks) -> np.ndarray:
  """bool [N, nb, nb] block-level mask (query block, key block) of a `random_block_table` [N, nb - 2, r]."""
  random_blocks = np.asarray(random_blocks)
  n, m, _ = random_blocks.shape
  nb = m + 2
  fixed, _ = _fixed_blocks(nb)
  pattern = np.zeros((n, nb, nb), bool)
  pattern[:, [0, -1], :] = True  # global rows
  rows = np.arange(1, nb - 1)
  pattern[:, rows[:, None], fixed] = True
  pattern[np.arange(n)[:, None, None], rows[None, :, None], random_blocks] = True
  return pattern


def block_sparse_mask(seq_len: int, block_size: int, num_random_blocks: int, seed: int | Sequence[int] = 0,
                      num_heads: int | None = None) -> np.ndarray:
  """The dense bool mask (query, key) of the pattern block_sparse_attention computes: [T, T] (head 0), or
  [num_heads, T, T] when `num_heads` is given. For tests and pictures: it is quadratic in T."""
  nb = check_layout(seq_len, block_size, num_random_blocks)
  table = random_block_table(nb, num_random_blocks, seed, num_heads or 1)
  ones = np.ones((block_size, block_size), bool)
  dense = np.stack([np.kron(p, ones) for p in block_pattern(table)]).astype(bool)
  return dense if num_heads is not None else dense[0]


def _softmax_dropout(logits, valid, dropout_rate, rng):
  # Same masking as the dense path (finfo.min, not -inf: a row with no valid key stays finite).
  logits = jnp.where(valid, logits, jnp.finfo(jnp.float32).min)
  return dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, rng)


def _gather_blocks(x, idx):
  """x [B, nb, bs, N, ...]; idx [N or 1, m, s] block indices -> [B, m, s, bs, N, ...]."""
  if idx.shape[0] == 1:  # one pattern for all heads: a plain gather along the block axis
    return jnp.take(x, idx[0], axis=1)
  # One pattern per head: gather each head's blocks (vmap over the head axis).
  return jax.vmap(lambda xh, ih: jnp.take(xh, ih, axis=1), in_axes=(3, 0), out_axes=4)(x, idx)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array,
                           dropout_rng: jax.Array | None = None, *, random_blocks,
                           dropout_rate: float = 0.0) -> jax.Array:
  """Big Bird ITC attention: q, k, v [B, T, N, D]; key_mask [B, T] (True = real token) -> [B, T, N, D].

  `random_blocks` is a `random_block_table` [N or 1, nb - 2, r] (numpy, or traced inside a scan over layers);
  its shape fixes the layout: nb = random_blocks.shape[1] + 2 blocks of T / nb tokens. Scores, softmax and
  dropout (on the probabilities, as the dense path does) run in float32; the weighted sum in v's dtype.
  Equals softmax attention under `block_sparse_mask` (and the key mask) up to float rounding.
  """
  b, t, n, d = q.shape
  nb = random_blocks.shape[1] + 2
  if t % nb or random_blocks.shape[0] not in (1, n):
    raise ValueError(f'random_blocks {random_blocks.shape} does not fit q {q.shape}: want [{n} or 1, nb - 2, r] '
                     'with T a multiple of nb')
  bs = t // nb
  scale = 1.0 / math.sqrt(d)
  key_mask = key_mask.astype(bool)
  rng_g, rng_m = (None, None) if dropout_rng is None else (
      jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
  qb, kb, vb = (x.reshape(b, nb, bs, n, d) for x in (q, k, v))

  # Global query blocks 0 and nb-1: ordinary attention over all T keys ([B, N, 2, bs, T] scores: linear in T).
  qg = jnp.stack([qb[:, 0], qb[:, -1]], axis=1)
  logits = jnp.einsum('bgqnd,bknd->bngqk', qg, k, preferred_element_type=jnp.float32) * scale
  probs = _softmax_dropout(logits, key_mask[:, None, None, None, :], dropout_rate, rng_g)
  out_g = jnp.einsum('bngqk,bknd->bgqnd', probs.astype(v.dtype), v)

  # Middle query blocks 1..nb-2: gather the 5 + r key/value blocks each one attends to.
  fixed, keep = _fixed_blocks(nb)
  heads = random_blocks.shape[0]
  idx = jnp.concatenate([jnp.broadcast_to(jnp.asarray(fixed), (heads, *fixed.shape)),
                         jnp.asarray(random_blocks, jnp.int32)], axis=-1)  # [N or 1, m, s]
  s = idx.shape[-1]
  kg, vg = _gather_blocks(kb, idx), _gather_blocks(vb, idx)  # [B, m, s, bs, N, D]
  mask_blocks = key_mask.reshape(b, nb, bs)
  valid = jax.vmap(lambda ih: jnp.take(mask_blocks, ih, axis=1), out_axes=1)(idx)  # [B, N or 1, m, s, bs]
  # Random blocks never repeat a fixed one; among the fixed ones drop the two duplicated global blocks.
  dedup = np.concatenate([keep, np.ones((nb - 2, s - keep.shape[1]), bool)], axis=1)
  valid = (valid & dedup[None, None, :, :, None]).reshape(b, heads, nb - 2, 1, s * bs)
  logits = jnp.einsum('bmqnd,bmsknd->bnmqsk', qb[:, 1:-1], kg, preferred_element_type=jnp.float32) * scale
  probs = _softmax_dropout(logits.reshape(b, n, nb - 2, bs, s * bs), valid, dropout_rate, rng_m)
  out_m = jnp.einsum('bnmqsk,bmsknd->bmqnd', probs.reshape(b, n, nb - 2, bs, s, bs).astype(v.dtype), vg)

  out = jnp.concatenate([out_g[:, :1], out_m, out_g[:, 1:]], axis=1)  # [B, nb, bs, N, D]
  return out.reshape(b, t, n, d)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Reference softmax attention: q, k, v [B, T, N, D]; mask bool, broadcastable to [B, N, T, T] (query, key).

  Quadratic in T; for checking block_sparse_attention against `block_sparse_mask`."""
  logits = jnp.einsum('bqnd,bknd->bnqk', q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
  probs = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
  return jnp.einsum('bnqk,bknd->bqnd', probs.astype(v.dtype), v)

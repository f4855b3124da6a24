"""How the models' matrix products are laid out for XLA: `project` (a kernel product as one 2-D matmul, its kernel
in either layout; in bfloat16 on CPU, `bf16_matmul`), `add_bias` (its bias, whose gradient sums in float32),
`product_nt` and `transposed` (a product against a transposed operand: left to the dot where YNNPACK takes it, a
copy where it does not), `out_major_perm` (the layout decoding stores big kernels in) and `vocab_logits` (the
output projection onto a vocabulary-major table, in the form XLA:CPU runs fastest at the few rows of a decoding
step).
"""
import math

import jax
import jax.numpy as jnp

from jaxssl import mesh as mesh_lib

# Decoding steps of 2..FEW_ROWS rows (a batch of sequences, one new token each) take vocab_logits' broadcast form.
FEW_ROWS = 16


def project(x: jax.Array, kernel: jax.Array, in_axes: int = 1, out_major: bool = False) -> jax.Array:
  """x [..., *I] @ kernel [*I, *O] -> [..., *O]: contracts x's last `in_axes` axes with kernel's first, as one
  2-D matmul [prod(...), prod(I)] @ [prod(I), prod(O)]. `out_major`: the kernel is stored [*O, *I] (out_major_perm
  of the logical one) and its last `in_axes` axes are contracted.

  Why not an einsum such as 'blh,hnd->blnd': its kernel gradient contracts two axes (batch and length) at once,
  and XLA:CPU ran that ~2.7x slower than the same matmul on [B*L, H] (BENCHMARKS.md §10). Merging leading axes
  keeps their sharding (batch is the major one; length and the merged feature axes are split at most over their
  major axis), so the partitioner still sees a data-parallel matmul.
  """
  lead = x.shape[:x.ndim - in_axes]
  if out_major:
    outs, ins = kernel.shape[:kernel.ndim - in_axes], kernel.shape[kernel.ndim - in_axes:]
  else:
    ins, outs = kernel.shape[:in_axes], kernel.shape[in_axes:]
  if x.shape[x.ndim - in_axes:] != ins:
    raise ValueError(f'project: x {x.shape} does not end in the kernel input axes {ins}')
  x2 = x.reshape(math.prod(lead), math.prod(ins))
  if out_major:  # the dot's own dimension numbers: an explicit transpose would be copied whole first
    y = jax.lax.dot_general(x2, kernel.reshape(math.prod(outs), math.prod(ins)), (((1,), (1,)), ((), ())))
  else:
    matmul = bf16_matmul if cpu_bfloat16(x.dtype, kernel.dtype) else jnp.matmul
    y = matmul(x2, kernel.reshape(math.prod(ins), math.prod(outs)))
  return y.reshape(*lead, *outs)


def cpu_bfloat16(*dtypes) -> bool:
  """Whether `dtypes` are all bfloat16 on XLA:CPU: where products take the layouts YNNPACK's bfloat16 kernels run
  (`bf16_matmul` here, the attention core, the LM loss's vocabulary slices)."""
  return all(d == jnp.bfloat16 for d in dtypes) and mesh_lib.backend() == 'cpu'


@jax.custom_vjp
def bf16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [M, K] @ kernel [K, N] in bfloat16 on XLA:CPU, accumulated in float32, every product of the gradient too in
  the one layout YNNPACK's bfloat16 kernels take (BENCHMARKS.md §39).

  XLA:CPU gives YNNPACK a bfloat16 dot only in the layouts [M, K] @ [K, N] and [M, K] @ [N, K]^T and converts any
  other (a contraction over the left operand's rows) to float32 first; and a dot with a bfloat16 result ran no
  faster than float32, one with a float32 result 1.6x faster. The plain `x @ kernel` (a bfloat16 result) and the
  kernel's gradient x^T g were slow, so bfloat16 ran slower than float32. Here each product asks for a float32
  result; dx = g kernel^T leaves the transpose to the dot (`product_nt`), and the kernel gradient's left operand
  is copied, transposed, once (`transposed`, which XLA does not fold back into the dot).
  2-core Zen 4: a [4096, 512] x [512, 2048] gradient's products 330 GFLOP/s against 125-135 before (float32 ~180).
  """
  return jnp.dot(x, kernel, preferred_element_type=jnp.float32).astype(x.dtype)


def _bf16_matmul_fwd(x, kernel):
  return bf16_matmul(x, kernel), (x, kernel)


def _bf16_matmul_bwd(saved, g):
  x, kernel = saved
  dx = product_nt(g, kernel).astype(x.dtype)
  (m, k), n = x.shape, g.shape[1]
  if m * n + k * n < m * k:
    # Transposing g [M, N] and the result [N, K] copies less than x [M, K] (an MLP's output kernel, K = 4H):
    # dkernel = (g^T x)^T. GPT-2 small: x^T [3072, 2048] took ~30 ms a layer in the step (BENCHMARKS.md §42).
    dkernel = transposed(jnp.dot(transposed(g), x, preferred_element_type=jnp.float32).astype(kernel.dtype))
  else:
    dkernel = jnp.dot(transposed(x), g, preferred_element_type=jnp.float32).astype(kernel.dtype)
  return dx, dkernel


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y [..., *F] + bias [*F] (float32, as stored), in y's dtype. The bias's gradient is y's summed over the leading
  axes in float32.

  The plain `y + bias.astype(y.dtype)` differentiates into a sum in y's dtype: in bfloat16 that rounds the running
  sum to 8 bits after every add, and XLA:CPU, which cannot vectorize such a reducer, ran each of GPT-2 small's
  bias sums as a reduce-window at ~25 ms ([2048, 3072]; 0.7 ms in float32): ~8% of the step (BENCHMARKS.md §41).
  """
  return _add_bias(y, bias)


@jax.custom_vjp
def _add_bias(y, bias):
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return _add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  lead = tuple(range(g.ndim - bias.ndim))
  return g, jnp.sum(g.astype(jnp.float32), axis=lead).astype(bias.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def product_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a [..., M, K] @ b [..., N, K]^T -> [..., M, N] in float32, b's transpose left to the dot's dimension numbers:
  XLA:CPU (jax 0.10.2) hands YNNPACK this layout in bfloat16 as it is, at the plain layout's speed or better
  ([2048, 3072] x [768, 3072]^T: 909 GFLOP/s, against 863 for [3072, 768] stored and 811 with the copy that
  `transposed` makes; BENCHMARKS.md §43). A transposed *left* operand (a contraction over M) is still converted to
  float32 first (~200 GFLOP/s): there `transposed` copies it."""
  batch = tuple(range(a.ndim - 2))
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (b.ndim - 1,)), (batch, batch)), preferred_element_type=jnp.float32)


def transposed(a: jax.Array) -> jax.Array:
  """a [..., R, C] with its last two axes swapped, [..., C, R], materialized: spelled as a transpose of 16 x 16
  blocks (or 8, 4, 2), which XLA's transpose folding leaves alone (a plain swap would become the dot's dimension
  numbers again, and XLA:CPU converts a bfloat16 dot whose left operand is transposed to float32). Sides no block
  size divides: the plain swap."""
  *lead, rows, cols = a.shape
  n = len(lead)
  for block in (16, 8, 4, 2):
    if rows % block == 0 and cols % block == 0:
      blocks = a.reshape(*lead, rows // block, block, cols // block, block)
      return blocks.transpose(*range(n), n + 2, n + 3, n, n + 1).reshape(*lead, cols, rows)
  return jnp.swapaxes(a, -1, -2)


def out_major_perm(ndim: int, in_axes: int) -> tuple[int, ...]:
  """The axes order that stores a kernel [*I, *O] (`in_axes` input axes) output-major, [*O, *I]."""
  return (*range(in_axes, ndim), *range(in_axes))


def vocab_logits(x: jax.Array, table: jax.Array, *, decoding: bool = False) -> jax.Array:
  """x [..., H] @ table [V, H]^T -> logits [..., V] float32 (accumulated in float32).

  `decoding` (one new token per sequence, no gradient): where 2..FEW_ROWS rows meet a float32 table on XLA:CPU,
  the product is formed as the table times the rows, broadcast, summed over H. XLA's GEMMs pack the whole table
  ([V, H]: SmolLM2's 113 MB, Gemma 3's 671 MB) at every call and ran at ~40 GFLOP/s at 8 rows (11.3 ms for
  SmolLM2's table), where one row reads it at the memory bandwidth (4 ms); YNNPACK's fused multiply-reduce
  streams the table once: 6.9 ms, and batch 8 decodes 6-23% faster (BENCHMARKS.md §32). Equal to the dot up to
  float32 rounding (another summation order). One row keeps the dot: a matrix-vector product already streams.
  """
  rows = math.prod(x.shape[:-1])
  if (decoding and 2 <= rows <= FEW_ROWS and x.dtype == table.dtype == jnp.float32
      and mesh_lib.backend() == 'cpu'):
    summed = (table[:, None, :] * x.reshape(rows, x.shape[-1])[None]).sum(-1)  # [V, rows]
    return summed.T.reshape(*x.shape[:-1], table.shape[0])
  return jnp.einsum('...h,vh->...v', x, table, preferred_element_type=jnp.float32)

"""models/products.py: the bfloat16 matmul of XLA:CPU (values, gradients, and the layout its products compile to)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models import products


def _operands(shape_x, shape_k, seed=0):
  kx, kk = jax.random.split(jax.random.key(seed))
  return (jax.random.normal(kx, shape_x, jnp.float32).astype(jnp.bfloat16),
          (jax.random.normal(kk, shape_k, jnp.float32) * 0.1).astype(jnp.bfloat16))


def _loss(x, kernel):
  y = products.project(x, kernel, in_axes=1)
  return jnp.sum(jnp.sin(y.astype(jnp.float32)))


@pytest.mark.parametrize('shape_x,shape_k', [((4, 32, 64), (64, 96)),     # blocks of 16
                                              ((3, 6, 40), (40, 24)),      # blocks of 2 and 8
                                              ((4, 32, 96), (96, 16)),     # dkernel as (g^T x)^T: K > N
                                              ((5, 7), (7, 9))])           # no block: the plain transpose
def test_bf16_project_matches_float32(shape_x, shape_k):
  x, kernel = _operands(shape_x, shape_k)
  y = products.project(x, kernel)
  assert y.dtype == jnp.bfloat16 and y.shape == (*shape_x[:-1], shape_k[-1])
  want = x.astype(jnp.float32) @ kernel.astype(jnp.float32)
  np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2, atol=1e-2)
  dx, dk = jax.grad(_loss, argnums=(0, 1))(x, kernel)
  assert dx.dtype == dk.dtype == jnp.bfloat16
  f32 = jax.grad(_loss, argnums=(0, 1))(x.astype(jnp.float32), kernel.astype(jnp.float32))
  for got, ref in zip((dx, dk), f32):
    scale = float(jnp.abs(ref).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=2e-2 * scale)


def test_transposed_is_the_transpose():
  a = jnp.arange(48 * 80, dtype=jnp.float32).reshape(48, 80).astype(jnp.bfloat16)
  for rows, cols in ((48, 80), (6, 10), (5, 7)):
    part = a[:rows, :cols]
    np.testing.assert_array_equal(products.transposed(part), part.T)
  batched = jnp.arange(2 * 3 * 32 * 48, dtype=jnp.float32).reshape(2, 3, 32, 48)  # leading axes stay in place
  np.testing.assert_array_equal(products.transposed(batched), jnp.swapaxes(batched, -1, -2))


@pytest.mark.parametrize('shape_k', [(128, 256), (256, 64)])  # x^T g, and (g^T x)^T (K > N)
def test_bf16_gradient_products_stay_bfloat16_on_cpu(shape_k):
  """Every dot of the compiled gradient reads bfloat16 operands: XLA:CPU converts a dot's operands to float32 when
  YNNPACK's bfloat16 kernels cannot take its layout, which made bfloat16 slower than float32 (BENCHMARKS.md §39).
  A change in XLA's transpose folding would show here first."""
  x, kernel = _operands((8, 64, shape_k[0]), shape_k)
  hlo = jax.jit(jax.grad(_loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  computations = re.findall(r'^%[\w.\-]+ \((.*?)\) -> .*?\n\}', hlo, re.M | re.S)
  with_dots = [c for c in re.findall(r'^%[\w.\-]+ \(.*?\n\}', hlo, re.M | re.S) if ' dot(' in c]
  assert computations and len(with_dots) == 3, hlo  # the forward and both gradient products
  for body in with_dots:
    for operand in re.findall(r'= (\w+)\[[\d,]*\]\{[\d,]*\} parameter', body):
      assert operand == 'bf16', body


def test_compiling_for_a_tpu_takes_the_tpus_products_and_dtype():
  """A TPU program compiled ahead of time on this CPU host (train/compile_only.py) is built as a TPU builds it: the
  plain bfloat16 product, not the CPU's custom one, and model.dtype=auto's TPU dtype."""
  from jaxssl import mesh as mesh_lib
  from jaxssl.models import precision
  x, kernel = jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 16), jnp.bfloat16)
  # A new function each time: JAX caches a trace by function and arguments, not by compiling_for.
  on_cpu = str(jax.make_jaxpr(lambda a, b: products.project(a, b))(x, kernel))
  with mesh_lib.compiling_for('tpu'):
    on_tpu = str(jax.make_jaxpr(lambda a, b: products.project(a, b))(x, kernel))
    assert precision.compute_dtype('auto', 'wav2vec2') == ('bfloat16', 'compute bfloat16 (auto, tpu)')
  assert 'custom_vjp' in on_cpu and 'custom_vjp' not in on_tpu
  assert mesh_lib.backend() == jax.default_backend()


def test_add_bias_sums_its_gradient_in_float32():
  """A bias added to bfloat16 activations gets the float32 sum of their gradient: the plain sum in bfloat16 rounds
  its running total to 8 bits (and ran ~35x slower on XLA:CPU)."""
  rows, features = 4096, 64
  y = jax.random.normal(jax.random.key(1), (rows // 64, 64, features)).astype(jnp.bfloat16)
  bias = jax.random.normal(jax.random.key(2), (features,), jnp.float32)
  weights = (1.0 + jax.random.uniform(jax.random.key(3), y.shape)).astype(jnp.bfloat16)  # a gradient of one sign

  def loss(add, bias):
    return jnp.sum((add(y, bias) * weights).astype(jnp.float32))
  plain = lambda y, b: y + b.astype(y.dtype)
  np.testing.assert_array_equal(products.add_bias(y, bias), plain(y, bias))
  got = jax.grad(loss, argnums=1)(products.add_bias, bias)
  assert got.dtype == jnp.float32
  want = np.asarray(weights, np.float64).sum(axis=(0, 1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  rounded = jax.grad(loss, argnums=1)(plain, bias)  # what the plain add's gradient gives
  assert np.abs(np.asarray(rounded) - want).max() > 100 * np.abs(np.asarray(got) - want).max()


def test_product_nt_leaves_the_transpose_to_the_dot():
  """a @ b^T with b as stored: values as the plain product, and on XLA:CPU one dot reading both bfloat16 operands
  in place (no transposed copy of b, no conversion to float32: BENCHMARKS.md §43)."""
  a, b = _operands((3, 40, 64), (3, 24, 64))
  want = jnp.einsum('bmk,bnk->bmn', a.astype(jnp.float32), b.astype(jnp.float32))
  got = products.product_nt(a, b)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(products.product_nt(a[0], b[0]), want[0], rtol=1e-5, atol=1e-5)
  hlo = jax.jit(products.product_nt).lower(a[0], b[0]).compile().as_text()
  dots = re.findall(r'= f32\[40,24\]\{1,0\} dot\((.*?)\), lhs_contracting_dims=\{1\}, rhs_contracting_dims=\{1\}', hlo)
  assert len(dots) == 1, hlo
  assert not re.search(r' (transpose|copy|convert)\(', hlo), hlo

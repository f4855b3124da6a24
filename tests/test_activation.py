"""layers.float32_activation: the MLP activations computed in float32 with a gradient that saves only the input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.models.layers import ACTIVATIONS, float32_activation


@pytest.mark.parametrize('name', ['gelu', 'gelu_new'])
def test_float32_is_autodiff_as_it_is(name):
  fn = ACTIVATIONS[name]
  approximate = name == 'gelu_new'
  x = jax.random.normal(jax.random.key(0), (4, 33)) * 3
  g = jax.random.normal(jax.random.key(1), x.shape)

  def reference(x):
    return jax.nn.gelu(x, approximate=approximate)

  def gradient(f):
    return jax.jit(lambda x, g: jax.vjp(f, x)[1](g)[0])

  np.testing.assert_array_equal(jax.jit(fn)(x), jax.jit(reference)(x))
  np.testing.assert_array_equal(gradient(fn)(x, g), gradient(reference)(x, g))  # float32: autodiff as it is


def test_bfloat16_rounds_once_and_gradient_stays_bfloat16():
  fn = ACTIVATIONS['gelu_new']
  x = (jax.random.normal(jax.random.key(2), (8, 64)) * 3).astype(jnp.bfloat16)
  g = jax.random.normal(jax.random.key(3), x.shape).astype(jnp.bfloat16)
  exact = jax.nn.gelu(x.astype(jnp.float32), approximate=True)
  y = fn(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, exact.astype(jnp.bfloat16))  # one rounding of the float32 value
  dx = jax.vjp(fn, x)[1](g)[0]
  assert dx.dtype == jnp.bfloat16
  exact_dx = jax.vjp(lambda v: jax.nn.gelu(v, approximate=True), x.astype(jnp.float32))[1](g.astype(jnp.float32))[0]
  np.testing.assert_array_equal(dx, exact_dx.astype(jnp.bfloat16))
  # autodiff of the bfloat16 operations rounds after each: further from the float32 gradient than ours
  theirs = jax.vjp(lambda v: jax.nn.gelu(v, approximate=True), x)[1](g)[0].astype(jnp.float32)
  assert float(jnp.abs(dx.astype(jnp.float32) - exact_dx).max()) <= float(jnp.abs(theirs - exact_dx).max())


def test_float16_too():
  fn = ACTIVATIONS['gelu']
  x = jnp.linspace(-4, 4, 50, dtype=jnp.float16)
  np.testing.assert_array_equal(fn(x), jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(jnp.float16))


def test_gradient_saves_only_the_input():
  fn = float32_activation(jnp.tanh)
  x = jnp.linspace(-2, 2, 12, dtype=jnp.bfloat16)
  residuals = jax.vjp(fn, x)[1]
  saved = [leaf for leaf in jax.tree.leaves(residuals) if hasattr(leaf, 'shape') and leaf.shape == x.shape]
  assert len(saved) == 1 and saved[0].dtype == jnp.bfloat16

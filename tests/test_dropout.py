"""The dropout mask (models/dropout.py: keep_mask, a keyed hash of each element's index): its rate, its
independence across positions and keys, determinism, sharded == unsharded, and the threefry fallback for huge
arrays."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl.mesh import make_mesh
from jaxssl.models.dropout import dropout, keep_mask

SHAPE = (8, 4, 128, 256)  # [batch, heads, queries, keys]: 1M elements


@pytest.mark.parametrize('keep', [0.9, 0.5, 0.1])
def test_keep_rate(keep):
  m = np.asarray(keep_mask(jax.random.key(0), keep, SHAPE))
  n = m.size
  assert m.dtype == bool and m.shape == SHAPE
  assert abs(m.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / n), m.mean()
  # And in every slice along every axis (no row or head is stuck).
  for axis in range(m.ndim):
    rest = tuple(a for a in range(m.ndim) if a != axis)
    per = m.mean(axis=rest)
    sigma = np.sqrt(keep * (1 - keep) / (n // m.shape[axis]))
    assert np.all(np.abs(per - keep) < 6 * sigma), (axis, per.min(), per.max())


def _corr(a, b):
  a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
  return np.corrcoef(a, b)[0, 1]


def test_no_correlation_between_neighbours_or_keys():
  key = jax.random.key(1)
  m = np.asarray(keep_mask(key, 0.5, SHAPE))
  bound = 5 / np.sqrt(m.size)
  for axis in range(m.ndim):  # each element against its neighbour along every axis
    a, b = np.take(m, range(m.shape[axis] - 1), axis), np.take(m, range(1, m.shape[axis]), axis)
    assert abs(_corr(a, b)) < bound * 1.5, axis
  for other in (jax.random.fold_in(key, 1), jax.random.split(key)[0], jax.random.key(2)):
    assert abs(_corr(m, np.asarray(keep_mask(other, 0.5, SHAPE)))) < bound
  # Bits of consecutive elements, two at a time, take all four values equally often.
  pairs = (m[..., 0::2].astype(int) * 2 + m[..., 1::2]).ravel()
  counts = np.bincount(pairs, minlength=4)
  expected = pairs.size / 4
  assert ((counts - expected) ** 2 / expected).sum() < 25  # chi-square, 3 dof: p < 1e-4


def test_same_key_same_mask_and_dropout_scales():
  key = jax.random.key(3)
  np.testing.assert_array_equal(keep_mask(key, 0.8, (64, 33)), keep_mask(key, 0.8, (64, 33)))
  x = jnp.ones((512, 512))
  y = dropout(x, 0.2, key)
  assert set(np.unique(np.asarray(y))) == {0.0, np.float32(1 / 0.8)}
  assert abs(float(y.mean()) - 1.0) < 0.02
  assert dropout(x, 0.2, None) is x and dropout(x, 0.0, key) is x


def test_sharded_equals_unsharded():
  assert jax.device_count() >= 8, 'tests/conftest.py should give 8 CPU devices'
  key = jax.random.key(4)
  expected = keep_mask(key, 0.7, SHAPE)
  mesh = make_mesh((2, 2, 2))
  sharding = NamedSharding(mesh, P(('data', 'fsdp'), 'tensor'))
  got = jax.jit(lambda k: keep_mask(k, 0.7, SHAPE), out_shardings=sharding)(key)
  assert got.sharding == sharding
  np.testing.assert_array_equal(got, expected)


def test_arrays_of_2_to_the_32_elements_use_threefry():
  """The index would wrap past 2**32 elements, so such masks come from jax.random.bernoulli instead."""
  key = jax.random.key(5)
  big = str(jax.make_jaxpr(lambda k: keep_mask(k, 0.9, (2**16, 2**16)))(key))
  small = str(jax.make_jaxpr(lambda k: keep_mask(k, 0.9, (2**16, 2**15)))(key))
  assert 'random_bits[bit_width=32 shape=(65536, 65536)]' in big
  assert 'random_bits[bit_width=32 shape=(2,)]' in small and 'iota' in small

"""The boundary between two unrolled layers of a stack: each layer's output gradient computed once (XLA:CPU).

In a pre-norm stack with dropout the residual stream's gradient at layer i is the sum of every later layer's
contributions. XLA:CPU copies cheap elementwise producers into each of their consumers, so with the layers unrolled
every backward fusion recomputed that sum from the top: GPT-2 small's backward had 48 fusions of 250-900 ops, reading
up to 200 inputs each, quadratic in depth (BENCHMARKS.md §36). A loop's carry is materialized anyway.
"""
import jax

from jaxssl import mesh as mesh_lib


@jax.custom_vjp
def _cotangent_once(x):
  return x


def _cotangent_once_fwd(x):
  return x, None


def _cotangent_once_bwd(_, g):
  # g / (g * 0 + 1) is g (an infinite entry becomes NaN): a divide of two arrays, which XLA:CPU counts as expensive
  # and so computes once; it would fold a divide by a constant and turn one by a broadcast scalar into a multiply.
  return (g / (g * 0 + 1),)


_cotangent_once.defvjp(_cotangent_once_fwd, _cotangent_once_bwd)


def layer_boundary(fn, unrolled: bool):
  """`fn` (one layer of a stack: its output is the next layer's input) with the gradient of its output computed
  once per layer when the layers are unrolled on CPU; otherwise `fn` as is (XLA's GPU and TPU fusion passes are
  other code, not measured here). Forward values and finite gradients are unchanged."""
  if not unrolled or mesh_lib.backend() != 'cpu':
    return fn
  return lambda *args: _cotangent_once(fn(*args))

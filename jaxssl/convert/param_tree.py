"""Paths into nested param dicts ('decoder/layers/mlp/wo/kernel'), shared by the checkpoint layouts."""
import numpy as np


def put(tree: dict, path: str, value) -> None:
  """Sets `tree[a][b]...[last] = value` for path 'a/b/.../last', creating the dicts on the way."""
  *parents, last = path.split('/')
  for k in parents:
    tree = tree.setdefault(k, {})
  tree[last] = value


def get(tree: dict, path: str):
  """`tree[a][b]...` for path 'a/b/...'."""
  for k in path.split('/'):
    tree = tree[k]
  return tree


def stacked_layers(layers) -> dict:
  """The decoder/layers subtree with a leading layer axis (stacks an unscanned model's {0: ..., 1: ...})."""
  if all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in layers):
    per_layer = [layers[k] for k in sorted(layers, key=int)]
    def stack(*xs):
      return np.stack(xs) if not isinstance(xs[0], dict) else {k: stack(*(x[k] for x in xs)) for k in xs[0]}
    return stack(*per_layer)
  return layers

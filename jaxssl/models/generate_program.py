"""The generate program's half that needs neither flax nor the model: its arguments, and loading a program that
generation.compile_generate saved (jax.export) on an earlier run, with the layout of the weights it takes.

The generate job's second start runs on this alone: it restores the weights straight onto that layout while the
saved program compiles (from XLA's compile cache), so it never imports flax nor traces the model (0.4 s and 0.9 s of
SmolLM2-135M's start).
"""
import contextlib
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxssl import program_cache
from jaxssl.errors import UserError


# Layer kernels of at least this many bytes are stored output-major for decoding ([out, in], torch's layout): XLA:CPU's
# matrix-vector product reads them 1.2-1.7x faster than [in, out] at batch 1 and ~1.7x at batch 8; smaller ones
# (SmolLM2's 576 x 1536) were slower so at batch 8 (BENCHMARKS.md §28).
OUT_MAJOR_MIN_BYTES = 4 << 20


def out_major_min_bytes() -> int:
  """OUT_MAJOR_MIN_BYTES, or the environment's JAXSSL_OUT_MAJOR_MIN_BYTES (0: every layer kernel)."""
  return int(os.environ.get('JAXSSL_OUT_MAJOR_MIN_BYTES', OUT_MAJOR_MIN_BYTES))


# How the settings are spelled in errors: as `generation.generate`'s keywords, or as the generate job's flags.
KEYWORDS = {'max_new_tokens': 'max_new_tokens', 'temperature': 'temperature', 'top_k': 'top_k', 'top_p': 'top_p',
            'greedy': 'greedy=True', 'padding_side': 'padding_side'}
FLAGS = {'max_new_tokens': '--max-new-tokens', 'temperature': '--temperature', 'top_k': '--top-k', 'top_p': '--top-p',
         'greedy': '--greedy', 'padding_side': 'padding_side'}


def check_settings(max_position: int, width: int, max_new_tokens: int, *, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, greedy: bool = False, padding_side: str = 'right', names=None) -> None:
  """UserError for settings `generate` cannot run with (before anything is compiled), for a model of
  `max_position` positions; the settings named as `names` spells them (KEYWORDS, or the job's FLAGS)."""
  n = names or KEYWORDS
  if max_new_tokens < 1:
    raise UserError(f'{n["max_new_tokens"]}={max_new_tokens} must be at least 1')
  if width + max_new_tokens > max_position:
    raise UserError(f'prompt width {width} + {n["max_new_tokens"]} {max_new_tokens} exceeds model.max_position='
                    f'{max_position}; shorten the prompts or generate fewer tokens')
  if padding_side not in ('left', 'right'):
    raise UserError(f"{n['padding_side']}={padding_side!r}: use 'left' or 'right'")
  if not greedy and not temperature > 0:
    raise UserError(f'{n["temperature"]}={temperature} must be positive (or pass {n["greedy"]})')
  if top_k < 0 or not 0.0 < top_p <= 1.0:
    raise UserError(f'{n["top_k"]}={top_k} must be >= 0 and {n["top_p"]}={top_p} in (0, 1]')


def arguments(prompt_ids, prompt_lengths, rng, temperature, top_k, top_p, stop_ids, pad_id) -> tuple:
  """The program's arguments after the weights, as arrays of its dtypes (`rng`: a typed key, passed as its data)."""
  stop = jnp.asarray(tuple(stop_ids) or (-1,), jnp.int32)  # -1: no stop id (never sampled)
  return (jnp.asarray(prompt_ids), jnp.asarray(prompt_lengths), jax.random.key_data(rng), jnp.float32(temperature),
          jnp.int32(top_k), jnp.float32(top_p), stop, jnp.int32(pad_id))


def compile_exported(exported, *, lapack: bool = True):
  """An exported program compiled for the avals it was exported with (one device): the same lowering at every
  start, hence the same entry of XLA's compile cache. `lapack`: whether it calls LAPACK (calls_lapack)."""
  specs, _ = exported.in_tree.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype) for a in exported.in_avals])
  with contextlib.nullcontext() if lapack else _lapack_setup_skipped():
    return jax.jit(exported.call).lower(*specs).compile()


def calls_lapack(exported) -> bool:
  """Whether an exported program calls one of jaxlib's LAPACK kernels (a custom call named lapack_...)."""
  return re.search(r'custom_call @lapack_', exported.mlir_module()) is not None


@contextlib.contextmanager
def _lapack_setup_skipped():
  """Calling an Exported on CPU sets up jaxlib's LAPACK kernels first, for any program: jaxlib then imports
  scipy.linalg (0.15-0.2 s of the generate job's start, BENCHMARKS.md §20). A program that calls none does
  not need them. The hook is jax's own (private): where a jax lacks it, nothing is skipped."""
  from jax._src.export import _export  # reason: private module, read only here
  ensure = getattr(_export, '_ensure_backends_initialized', None)
  if ensure is None:
    yield
    return
  _export._ensure_backends_initialized = lambda platforms: None
  try:
    yield
  finally:
    _export._ensure_backends_initialized = ensure


def weights_layout(params) -> list:
  """[[path keys], shape, dtype] of each leaf of a nested dict of params, in the program's order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [[[k.key for k in path], list(leaf.shape), str(leaf.dtype)] for path, leaf in flat]


def weights_target(weights: list) -> dict:
  """The nested dict of jax.ShapeDtypeStruct (on the one device) that restores weights of `weights_layout`."""
  target = {}
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for keys, shape, dtype in weights:
    node = target
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=device)
  return target


def _stacked(keys: list) -> tuple[tuple, int | None]:
  """(an input's keys without its layer index, where that index was)."""
  layer = next((j for j, key in enumerate(keys) if isinstance(key, int)), None)
  return (tuple(keys), None) if layer is None else (tuple(keys[:layer] + keys[layer + 1:]), layer)


def _kept_plan(inputs: list) -> dict:
  """{kept leaf's keys: (axes order or None, [keys of the export's leaves it concatenates] or None, their axis)}
  for the inputs that are not an export's leaf as it is (a 4th entry, generation.program_inputs). A stacked leaf
  keeps its layer axis first and then its layers' slices' order; a leaf of its own (an untied output layer) the
  program's order. A fused kernel's parts are each put in that order, then concatenated along their first output
  axis (its logical axis 1)."""
  plan = {}
  for keys, *_, how in (entry for entry in inputs if len(entry) > 3):
    kept, layer = _stacked(keys)
    lead = 0 if layer is None else 1
    perm = None if 'perm' not in how else (*range(lead), *(lead + p for p in how['perm']))
    parts = [_stacked(part)[0] for part in how['parts']] if 'parts' in how else None
    axis = lead + (list(how['perm']).index(1) if 'perm' in how else 1)
    plan[kept] = (perm, parts, axis)
  return plan


def _as_kept(plan_entry, leaves: list, transpose, concatenate):
  """One kept leaf from the export's leaves it is made of (one, or a fused kernel's parts)."""
  perm, parts, axis = plan_entry
  leaves = [leaf if perm is None else transpose(leaf, perm) for leaf in leaves]
  return leaves[0] if parts is None else concatenate(leaves, axis=axis)


def kept_layout(weights: list, inputs: list) -> list:
  """The layout the program's weights are kept in (`to_kept`, weights_cache): `weights` (the export's
  weights_layout) with each stacked leaf whose layers the program takes output-major stored so, [L, *O, *I], and
  the parts of a fused kernel as that kernel, in the place of the last of them, so that each layer's slice is the
  program's input itself (a view of a memory-mapped file, no copy)."""
  plan, shapes = _kept_plan(inputs), {tuple(keys): shape for keys, shape, _ in weights}
  order = {keys: i for i, keys in enumerate(shapes)}
  made_at = {max(entry[1] or [kept], key=order.get): kept for kept, entry in plan.items()}
  parts = {p for _, entry_parts, _ in plan.values() for p in entry_parts or ()}
  out = []
  for keys, shape, dtype in weights:
    kept = made_at.get(tuple(keys))
    if kept is None:
      if tuple(keys) not in parts:  # (a fused kernel's earlier parts are not kept apart)
        out.append([keys, shape, dtype])
      continue
    perm, kept_parts, axis = plan[kept]
    sources = [[shapes[p][a] for a in perm] if perm else list(shapes[p]) for p in kept_parts or [kept]]
    shape = sources[0]
    if kept_parts:
      shape[axis] = sum(s[axis] for s in sources)
    out.append([list(kept), shape, dtype])
  return out


def to_kept(weights: dict, inputs: list) -> dict:
  """`weights` (the export's nested dict of jax arrays, as restored) in `kept_layout`: the stacked leaves the
  program takes output-major transposed, a fused kernel's parts concatenated (one copy each), in place."""
  def pop(keys, node):
    leaf = node[keys[0]] if len(keys) == 1 else pop(keys[1:], node[keys[0]])
    if len(keys) == 1 or not node[keys[0]]:
      del node[keys[0]]  # the leaf, or a folder it left empty
    return leaf

  for kept, entry in _kept_plan(inputs).items():
    leaves = [pop(p, weights) for p in entry[1] or [kept]]
    node = weights
    for key in kept[:-1]:
      node = node.setdefault(key, {})
    node[kept[-1]] = _as_kept(entry, leaves, jnp.transpose, jnp.concatenate)
  return weights


def kept_leaves(leaves, inputs: list):
  """The export's leaves ((keys, array) pairs in weights_layout order, e.g. checkpoint.export_leaves) as arrays in
  `kept_layout`, one at a time (a fused kernel's parts held until its last): what to_kept does to the whole dict.
  numpy's transpose is a view that weights_cache.save copies out once (XLA's held its input and output, and the
  1.5B's start peaked higher)."""
  plan = _kept_plan(inputs)
  fused_of = {tuple(p): kept for kept, (_, parts, _) in plan.items() if parts for p in parts}
  held = {}
  for keys, leaf in leaves:
    kept = fused_of.get(tuple(keys), tuple(keys))
    if kept not in plan:
      yield leaf
      continue
    parts = plan[kept][1] or [kept]
    held[tuple(keys)] = np.asarray(leaf)
    if all(p in held for p in parts):
      yield _as_kept(plan[kept], [held.pop(p) for p in parts], np.transpose, np.concatenate)


def program_leaves(weights: dict, inputs: list) -> list:
  """The saved program's weight arguments in its order (`inputs`: generation.program_inputs), from `weights`, the
  export's nested dict in `kept_layout` (jax arrays, or numpy views of a memory-mapped file): an input under a layer
  index (decoder/layers/<i>/..., generation.layers_apart) is layer i's slice of the stacked leaf (a copy of a jax
  array, a view of a numpy one), any other the leaf itself. A shape or dtype other than the program's is a
  ValueError (the caller's cache lookup went wrong)."""
  leaves = []
  for keys, shape, dtype, *_ in inputs:
    layer = next((j for j, key in enumerate(keys) if isinstance(key, int)), None)
    leaf = weights
    for key in keys if layer is None else keys[:layer] + keys[layer + 1:]:
      leaf = leaf[key]
    if layer is not None:
      leaf = leaf[keys[layer]]
    if list(leaf.shape) != list(shape) or str(leaf.dtype) != dtype:
      raise ValueError(f'weight {keys} is {leaf.dtype}{list(leaf.shape)}; the program takes {dtype}{shape}')
    leaves.append(leaf)
  return leaves


def save(path: str, exported, statics: dict, weights: list, inputs: list, lapack: bool) -> None:
  """Keeps `exported` at `path` with its settings, the layout of the export's weights it is run on (`weights`,
  what a start restores), that of the weight arguments it takes (`inputs`: program_leaves) and whether it calls
  LAPACK."""
  program_cache.write(path, {'statics': statics, 'weights': weights, 'inputs': inputs, 'lapack': lapack},
                      exported.serialize())


def read(path: str) -> tuple[dict, bytes] | None:
  """(metadata, serialized program) saved at `path`, or None."""
  found = program_cache.read(path)
  return found if found is not None and {'statics', 'weights', 'inputs', 'lapack'} <= set(found[0]) else None


def load(meta: dict, blob: bytes):
  """`read`'s program compiled (jax.stages.Compiled over (weight leaves, *arguments(...))); None where it cannot
  be (a damaged file: the caller compiles afresh)."""
  try:
    return compile_exported(jax.export.deserialize(bytearray(blob)), lapack=bool(meta['lapack']))
  except Exception:  # noqa: BLE001 (reason: a damaged or foreign file is a cache miss, not the user's error)
    return None

"""The device mesh (data, fsdp, tensor) and the one table mapping logical axis names to it.

Every parameter carries logical axis names (`nnx.with_partitioning(init, ('embed', 'mlp'))`); activations are
constrained at layer boundaries with `constrain(x, ('batch', 'length', 'act_embed'))`. `LOGICAL_AXIS_RULES` is the
only place that says which mesh axis each logical name is split over.
"""
import contextlib
import math

import flax.core.spmd
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl.errors import UserError

MESH_AXES = ('data', 'fsdp', 'tensor')

LOGICAL_AXIS_RULES = (
    ('batch', ('data', 'fsdp')),   # examples are split over data and fsdp
    ('length', None),
    ('embed', 'fsdp'),             # weights are sharded over fsdp on their model dimension (ZeRO-3)
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),        # k/v heads (GQA: num_kv_heads a multiple of the tensor size)
    ('kv', None),
    ('vocab', 'tensor'),
    ('layers', None),              # the scanned layer axis of stacked weights
    ('norm', None),
    ('embed_factor', None),        # a factorised embedding's width (ELECTRA: 128 before a projection to hidden)
    ('classes', None),
    ('relative_buckets', None),    # MPNet's relative position bias table: [buckets, heads]
    ('position', None),
    ('token_type', None),
    ('predictions', None),
    ('lstm', None),                # ELMo LSTM cell units (the recurrence needs them whole at every step)
    ('lstm_gates', None),          # ELMo's 4 x cell units of gate pre-activations
    # activations: the model dimension stays whole (fsdp already splits the batch); heads/mlp over tensor
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
)


def resolve_mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 in `shape` by what is left of `num_devices`; checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise UserError(f'mesh.shape={shape} must have {len(MESH_AXES)} entries {MESH_AXES}, e.g. (-1, 1, 1)')
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise UserError(f'mesh.shape={shape}: use positive sizes and at most one -1')
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise UserError(f'mesh.shape={shape} does not divide {num_devices} devices')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise UserError(f'mesh.shape={shape} needs {math.prod(shape)} devices but {num_devices} are present; '
                    'set --config.mesh.shape to match (e.g. (-1, 1, 1))')
  return shape


def make_mesh(shape, devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names) -> P:
  """The PartitionSpec that `LOGICAL_AXIS_RULES` gives a tuple of logical axis names."""
  return flax.core.spmd.get_pspec(tuple(names), LOGICAL_AXIS_RULES)


def constrain(x, names):
  """Sharding constraint on an activation by logical names; a no-op outside a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names))


def batch_sharding(mesh, ndim: int = 2) -> NamedSharding:
  """Sharding of a global batch array: leading axis over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(('data', 'fsdp'), *([None] * (ndim - 1))))


def batch_divisor(mesh) -> int:
  """The global batch must be a multiple of this (the number of batch shards)."""
  return int(np.prod([mesh.shape[a] for a in ('data', 'fsdp')]))


def global_batch(local: dict, mesh) -> dict:
  """Assembles each process's rows of a batch into global arrays sharded over (data, fsdp)."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v) for k, v in local.items()}


# The platforms `compiling_for` names, innermost last (train/compile_only.py compiles a TPU slice's program on a
# CPU host, where jax.default_backend() is 'cpu').
_TARGETS: list[str] = []


def backend() -> str:
  """The platform the programs being built will run on: jax.default_backend(), or what `compiling_for` names. The
  choices made per platform (the layer loop, the attention kernel, the CPU's bfloat16 product, model.dtype=auto)
  read this, so a program compiled ahead of time is the one its platform would build."""
  return _TARGETS[-1] if _TARGETS else jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, `backend()` is `platform` ('tpu', 'gpu' or 'cpu'). JAX caches traces by function and arguments,
  not by this: build the target's programs (train/compile_only.py's, in a process of their own) inside it."""
  _TARGETS.append(platform)
  try:
    yield
  finally:
    _TARGETS.pop()

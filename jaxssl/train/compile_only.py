"""Will it fit? Compile the train step ahead of time for a target slice, without its hardware.

  python -m jaxssl.pretrain --config configs/bert.py:large --compile-only --topology v5e-256 --config.mesh.shape=...

TPU targets (`v5e-256`, `v4-32`, `v5p-128`, `v6e-64`, or a raw `v5e:16x16`) need libtpu installed
(`pip install -r requirements-tpu.txt`), whose compile-only client lays out a slice's devices without the chips,
as MaxText's train_compile does. `cpu:N` compiles for N CPU devices. The report gives per-device bytes of the
params, the optimizer state and the compiled step's temporaries (activations and workspace), the step's FLOPs,
and whether it fits the chip's memory; a config that does not fit is a UserError before any TPU is paid for.
"""
import json
import re

import jax
import numpy as np
from jax.sharding import NamedSharding

from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl.errors import UserError
from jaxssl.models import fused_attention, layers, precision
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib

GIB = 2**30
# Per-chip high-bandwidth memory; chips in a 2-D slice (v5e, v6e) are counted by chips, 3-D ones (v4, v5p)
# by TensorCores (two per chip), as Cloud TPU names them.
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}
_2D = {1: '1x1', 4: '2x2', 8: '2x4', 16: '4x4', 32: '4x8', 64: '8x8', 128: '8x16', 256: '16x16'}
_3D = {4: '2x2x1', 8: '2x2x2', 16: '2x2x4', 32: '2x4x4', 64: '4x4x4', 128: '4x4x8', 256: '4x8x8', 512: '8x8x8'}


def tpu_topology_name(topology: str) -> tuple[str, str]:
  """('v5e:16x16', 'v5e') for 'v5e-256' (or a raw 'v5e:16x16'); UserError for an unknown one."""
  raw = re.fullmatch(r'(v4|v5e|v5p|v6e):([0-9x]+)', topology)
  if raw:
    return topology, raw.group(1)
  named = re.fullmatch(r'(v4|v5e|v5litepod|v5p|v6e)-(\d+)', topology)
  if named:
    generation = 'v5e' if named.group(1) == 'v5litepod' else named.group(1)
    n = int(named.group(2))
    shape = (_2D.get(n) if generation in ('v5e', 'v6e') else _3D.get(n // 2))
    if shape:
      return f'{generation}:{shape}', generation
  raise UserError(f'--topology {topology!r} is not a slice jaxssl knows: use e.g. v5e-256, v4-32, v5p-128, '
                  'v6e-64, a raw v5e:16x16, or cpu:8')


def target_devices(topology: str):
  """(devices to compile for, memory per device in bytes or None, a description)."""
  cpu = re.fullmatch(r'cpu:(\d+)', topology)
  if cpu:
    n = int(cpu.group(1))
    if n > len(jax.devices('cpu')):
      raise UserError(f'--topology {topology} needs {n} CPU devices but this process has '
                      f'{len(jax.devices("cpu"))}: set XLA_FLAGS=--xla_force_host_platform_device_count={n}')
    return jax.devices('cpu')[:n], None, f'{n} CPU devices'
  name, generation = tpu_topology_name(topology)
  try:
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    devices = topologies.get_topology_desc(topology_name=name, platform='tpu').devices
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'cannot lay out TPU slice {name} here ({type(e).__name__}: {str(e).splitlines()[0][:160]}): '
                    'install libtpu with pip install -r requirements-tpu.txt') from None
  return devices, HBM_GIB[generation] * GIB, f'TPU {name} ({len(devices)} chips)'


def _per_device_bytes(abstract_tree) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if isinstance(leaf.sharding, NamedSharding) else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def compile_report(config, topology: str, vocab_size: int, memory_per_device: float | None = None) -> dict:
  """Compiles the pretraining train step for `topology` and returns the report (raises UserError if it won't fit).
  The choices made per platform (model.dtype=auto, the layer loop, the attention kernel) are the target's."""
  devices, hbm, described = target_devices(topology)
  with mesh_lib.compiling_for(devices[0].platform):
    return _compile_report(config, devices, hbm, described, vocab_size, memory_per_device)


def _compile_report(config, devices, hbm, described: str, vocab_size: int, memory_per_device: float | None) -> dict:
  compute = precision.resolve(config.model)  # model.dtype=auto: the target's dtype
  if memory_per_device:
    hbm = memory_per_device
  mesh = mesh_lib.make_mesh(config.mesh.shape, devices)
  t = config.train
  divisor = mesh_lib.batch_divisor(mesh)
  if t.batch_size % divisor or (t.batch_size // t.microbatches) % divisor:
    raise UserError(f'train.batch_size={t.batch_size} (per microbatch {t.batch_size // t.microbatches}) must be a '
                    f'multiple of the data*fsdp mesh size {divisor} on {described}')
  setup = state_lib.setup_model(config.model, vocab_size, mesh, t.seed)
  tx, schedule = state_lib.make_optimizer(t), state_lib.make_schedule(t)
  state = state_lib.abstract_state(setup, tx)
  seq, preds = config.data.seq_len, config.data.get('max_predictions', config.data.seq_len)
  family = families.family_for(config.model)
  objective = family.objective
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, *s), dtype, sharding=mesh_lib.batch_sharding(mesh, 1 + len(s)))
           for k, (s, dtype) in family.batch_shapes(config).items()}
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, t.microbatches, objective),
      state_lib.state_shardings(setup, tx), mesh, objective)
  with jax.set_mesh(mesh):
    compiled = train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  params = _per_device_bytes(state['params'])
  optimizer = _per_device_bytes(state['opt_state'])
  temp = int(getattr(memory, 'temp_size_in_bytes', 0) or 0)
  batch_bytes = _per_device_bytes(batch)
  # Donated state is updated in place, so the step needs the state once, the batch and its temporaries.
  total = params + optimizer + batch_bytes + temp
  tokens = t.batch_size * seq
  model_flops = float(family.flops_per_token(config.model, vocab_size, seq, preds)) * tokens
  report = {
      'topology': described, 'devices': len(devices), 'mesh': dict(mesh.shape), 'compute': compute,
      'layers': layers.describe_layer_loop(config.model),
      'attention': fused_attention.describe(config.model, config.data.seq_len),
      'per_device_bytes': {'params': params, 'optimizer_state': optimizer, 'batch': batch_bytes,
                           'activations_and_temporaries': temp, 'total': total},
      'param_bytes': sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state['params'])),
      'device_memory_bytes': hbm,
      'fits': None if hbm is None else total <= hbm,
      # XLA counts a loop body once, so with scanned layers its figure is about one layer's worth.
      'xla_flops_per_device': float(cost.get('flops', 0.0)) if cost else None,
      'model_flops_per_device': model_flops / len(devices),
      'model_flops_per_step': model_flops,
      'tokens_per_step': tokens,
  }
  return report


def print_report(report: dict) -> None:
  """A readable table, then the one-line JSON."""
  b = report['per_device_bytes']
  notes = ', '.join(n for n in (report['compute'], report['layers'], report['attention']) if n)
  print(f'compiled the train step for {report["topology"]}, mesh {report["mesh"]}: {notes}')
  for key in ('params', 'optimizer_state', 'batch', 'activations_and_temporaries', 'total'):
    print(f'  {key:<28}{b[key] / GIB:10.3f} GiB per device')
  if report['device_memory_bytes']:
    print(f'  {"device memory":<28}{report["device_memory_bytes"] / GIB:10.3f} GiB: '
          f'{"fits" if report["fits"] else "DOES NOT FIT"}')
  print(f'  model FLOPs per step: {report["model_flops_per_step"]:.4g} for {report["tokens_per_step"]} tokens, '
        f'{report["model_flops_per_device"]:.4g} per device (XLA counts {report["xla_flops_per_device"] or 0:.4g}; '
        'it counts a scanned layer once)')
  print(json.dumps(report), flush=True)


def check_fits(report: dict) -> None:
  if report['fits'] is False:
    need, have = report['per_device_bytes']['total'] / GIB, report['device_memory_bytes'] / GIB
    raise UserError(f'the train step needs {need:.2f} GiB per device but {report["topology"]} has {have:.0f} GiB: '
                    'lower train.batch_size (or raise train.microbatches), set model.remat, or shard more '
                    '(a larger fsdp axis in mesh.shape)')

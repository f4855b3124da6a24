"""How a fine-tuning or evaluation job runs the body's layer stack when `model.layer_loop` is 'auto'.

Unrolling the stack makes XLA compile every layer on its own: on CPU and GPU the training step runs faster, but
compiles 3-4x longer, once per batch shape. A pretraining job runs one shape for thousands of steps; a fine-tuning
job compiles two to five (packed row counts, length buckets) and is often short. On this 2-core CPU a 60-step job
on a BERT-base body spent 80 s of its 234 compiling with everything unrolled, and 18 s of 187 with the loop
(BENCHMARKS.md §24). So here 'auto' unrolls the train step only when its shapes run often enough to pay back the
compile (`layers.UNROLL_MIN_RUNS` a shape), and dev batches, the checkpoint check and the evaluate job keep the
loop, as every forward-only program does (`layers.unroll_layers(..., gradient=False)`: as fast on CPU). The decision is a function of the config and the data
alone (the shapes of the job's first steps, from step 0), so a resumed run takes the same one. The params are
stacked either way: checkpoints and exports do not change.
"""
import collections
import copy

import jax

from jaxssl.models import layers

SAMPLE_STEPS = 500  # the train-step shapes of at most this many steps are counted (numpy only: milliseconds)


def _auto(model_cfg) -> bool:
  return bool(model_cfg.get('scan_layers', False)) and model_cfg.get('layer_loop', 'auto') == 'auto'


def _with_loop(model_cfg, unrolled: bool):
  resolved = copy.deepcopy(model_cfg)
  resolved.layer_loop = 'unrolled' if unrolled else 'scan'
  return resolved


def forward_config(model_cfg):
  """`model_cfg` for forward-only programs (dev and evaluation batches): 'auto' resolved by
  `layers.unroll_layers(..., gradient=False)`; any other setting as it is."""
  if not _auto(model_cfg):
    return model_cfg
  return _with_loop(model_cfg, layers.unroll_layers('auto', gradient=False))


def shapes_per_step(shape_at, steps: int, sample_steps: int = SAMPLE_STEPS) -> collections.Counter:
  """How often each train-step shape (`shape_at(step)`, hashable) occurs over the first `sample_steps` steps."""
  return collections.Counter(shape_at(step) for step in range(min(steps, sample_steps)))


def finetune_configs(model_cfg, steps: int, shape_at, sample_steps: int = SAMPLE_STEPS) -> tuple:
  """(model config of the train step, model config of forward-only programs, the banner's note) for a job of
  `steps` train steps whose batch at step s has shape `shape_at(s)` (called only when 'auto' needs the count, for
  at most `sample_steps` steps: a pod's packed batches take milliseconds a step to lay out)."""
  if not _auto(model_cfg):
    return model_cfg, model_cfg, layers.describe_layer_loop(model_cfg)
  backend = jax.default_backend()
  if backend not in layers.UNROLL_MIN_RUNS:
    return model_cfg, forward_config(model_cfg), f'layers in a loop (auto, {backend})'
  shapes = len(shapes_per_step(shape_at, steps, sample_steps))
  train_unrolled = layers.unroll_layers('auto', runs=steps / shapes)
  forward = forward_config(model_cfg)
  how = layers.loops_phrase(train_unrolled, forward.layer_loop == 'unrolled', 'dev')
  why = (f'{steps} steps over {shapes} train shape{"s" if shapes > 1 else ""}, '
         f'{"at least" if train_unrolled else "under"} {layers.UNROLL_MIN_RUNS[backend]} a shape')
  return _with_loop(model_cfg, train_unrolled), forward, f'layers {how} (auto, {backend}: {why})'

"""How the fine-tuning and evaluation jobs set up the body: the layer loop 'auto' picks per program and job length
(train/layer_loop.py), the loop and the unrolled stack give the same outputs, and only the new head is initialised."""
import collections
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl.config import load_config
from jaxssl.models import layers
from jaxssl.train import finetune, layer_loop
from jaxssl.train import state as state_lib

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs')


def tiny_body(**overrides) -> ml_collections.ConfigDict:
  c = load_config(os.path.join(CONFIGS, 'bert.py') + ':tiny').model
  c.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position=32, **overrides)
  return c


def on_backend(monkeypatch, backend):
  monkeypatch.setattr(layers.jax, 'default_backend', lambda: backend)
  monkeypatch.setattr(layer_loop.jax, 'default_backend', lambda: backend)


def test_auto_unrolls_a_training_step_only_when_it_runs_often_enough(monkeypatch):
  """layers.unroll_layers('auto', gradient=..., runs=...) per backend, at UNROLL_MIN_RUNS (BENCHMARKS.md §23-§24)."""
  for backend, least in (('cpu', 100), ('gpu', 10_000)):
    on_backend(monkeypatch, backend)
    assert layers.UNROLL_MIN_RUNS[backend] == least
    assert layers.unroll_layers('auto') is True  # a pretraining step (no run count): unrolled, as before
    assert layers.unroll_layers('auto', runs=least) is True
    assert layers.unroll_layers('auto', runs=least - 1) is False
    assert layers.unroll_layers('auto', gradient=False) is False  # forward passes keep the loop
    assert layers.unroll_layers('unrolled', gradient=False, runs=1) is True  # an explicit setting is kept
    assert layers.unroll_layers('scan', runs=10**9) is False
  on_backend(monkeypatch, 'tpu')
  assert layers.unroll_layers('auto') is False and layers.unroll_layers('auto', runs=10**9) is False


def test_shapes_are_counted_over_the_first_steps_only():
  seen = []
  counts = layer_loop.shapes_per_step(lambda step: seen.append(step) or step % 3, 10_000)
  assert seen == list(range(layer_loop.SAMPLE_STEPS)) and sorted(counts) == [0, 1, 2]
  assert layer_loop.shapes_per_step(lambda step: 7, 4) == collections.Counter({7: 4})


def test_finetune_configs_short_job_loops_long_job_unrolls_its_train_step(monkeypatch):
  on_backend(monkeypatch, 'cpu')
  body = tiny_body()
  assert body.layer_loop == 'auto' and body.scan_layers
  three_shapes = lambda step: step % 3  # noqa: E731
  train, forward, note = layer_loop.finetune_configs(body, 60, three_shapes)
  assert (train.layer_loop, forward.layer_loop) == ('scan', 'scan')
  assert note == 'layers in a loop (auto, cpu: 60 steps over 3 train shapes, under 100 a shape)'
  train, forward, note = layer_loop.finetune_configs(body, 300, three_shapes)
  assert (train.layer_loop, forward.layer_loop) == ('unrolled', 'scan')
  assert note == ('layers unrolled in training, in a loop for dev '
                  '(auto, cpu: 300 steps over 3 train shapes, at least 100 a shape)')
  assert body.layer_loop == 'auto'  # the body's own config (exported, checkpointed) keeps 'auto'
  _, _, note = layer_loop.finetune_configs(body, 99, lambda step: None)
  assert note == 'layers in a loop (auto, cpu: 99 steps over 1 train shape, under 100 a shape)'
  on_backend(monkeypatch, 'gpu')
  train, forward, note = layer_loop.finetune_configs(body, 30_000, three_shapes)
  assert (train.layer_loop, forward.layer_loop) == ('unrolled', 'scan') and '(auto, gpu: 30000 steps' in note
  on_backend(monkeypatch, 'tpu')
  train, forward, note = layer_loop.finetune_configs(body, 10**6, three_shapes)
  assert not layers.unroll_layers(train.layer_loop) and forward.layer_loop == 'scan'
  assert note == 'layers in a loop (auto, tpu)'


def test_finetune_configs_keep_an_explicit_setting_and_unstacked_layers(monkeypatch):
  on_backend(monkeypatch, 'cpu')
  never = lambda step: pytest.fail('shapes are counted only for auto')  # noqa: E731
  for loop, note in (('unrolled', 'layers unrolled'), ('scan', 'layers in a loop')):
    body = tiny_body(layer_loop=loop)
    train, forward, said = layer_loop.finetune_configs(body, 10, never)
    assert (train.layer_loop, forward.layer_loop, said) == (loop, loop, note)
    assert layer_loop.forward_config(body).layer_loop == loop
  train, forward, said = layer_loop.finetune_configs(tiny_body(scan_layers=False), 10, never)
  assert said == '' and train.layer_loop == forward.layer_loop == 'auto'
  assert layer_loop.forward_config(tiny_body()).layer_loop == 'scan'


def test_loop_and_unrolled_task_models_give_the_same_outputs_and_losses():
  """The train step and the dev/evaluation programs may run the same params with different loops."""
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 50, (4, 16)))
  mask = jnp.asarray((np.arange(16)[None] < np.array([16, 9, 12, 5])[:, None]).astype(np.int32))
  results = []
  for loop in ('scan', 'unrolled'):
    setup = finetune.task_model_setup(tiny_body(layer_loop=loop), 50, 'classification', 3, mesh)
    params = state_lib.init_params(setup)
    forward = lambda p, key: nnx.merge(setup.graphdef, p)(ids, ids * 0, mask, dropout_rng=key)  # noqa: E731
    results.append([jax.jit(forward)(params, None), jax.jit(forward)(params, jax.random.key(3))])
  for ours, theirs in zip(*results):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_a_new_head_alone_is_initialised_as_in_the_whole_model():
  setup = finetune.task_model_setup(tiny_body(), 50, 'classification', 3, mesh_lib.make_mesh((-1, 1, 1)), seed=5)
  whole, head = state_lib.init_params(setup), state_lib.init_params(setup, only='head')
  assert list(head) == ['head']
  jax.tree.map(np.testing.assert_array_equal, head['head'], whole['head'])
  assert jax.tree.map(lambda a: a.sharding, head['head']) == setup.param_shardings['head']

"""models/precision.py: which compute dtype a run's model.dtype picks, and why (pretraining and fine-tuning)."""
import re

import ml_collections
import numpy as np
import pytest

from jaxssl.errors import UserError
from jaxssl.models import precision


def test_explicit_settings_are_kept():
  assert precision.compute_dtype('float32', 'bert') == ('float32', 'compute float32')
  assert precision.compute_dtype('bfloat16', 'mae', 'cpu') == ('bfloat16', 'compute bfloat16')


def test_auto_follows_the_cpu(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  assert precision.compute_dtype('auto', 'bert', 'cpu') == (
      'bfloat16', 'compute bfloat16 (auto: this CPU has bfloat16 instructions)')
  monkeypatch.setenv(precision.CPU_BF16_ENV, '0')
  assert precision.compute_dtype('auto', 'bert', 'cpu') == (
      'float32', 'compute float32 (auto: this CPU has no bfloat16 instructions)')


def test_auto_on_cpu_is_float32_for_families_not_measured_faster_in_bfloat16(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  for name in ('wav2vec2', 'elmo'):
    assert precision.compute_dtype('auto', name, 'cpu') == (
        'float32', f'compute float32 (auto: {name} is not measured faster in bfloat16 on CPU)'), name
  for name in ('bert', 'gpt', 'encdec', 'mae', 'simclr'):
    assert precision.compute_dtype('auto', name, 'cpu')[0] == 'bfloat16', name


def test_auto_on_accelerators_is_bfloat16_for_every_family(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '0')
  for backend in ('tpu', 'gpu'):
    for name in ('bert', 'gpt', 'encdec', 'mae', 'simclr', 'wav2vec2', 'elmo'):
      assert precision.compute_dtype('auto', name, backend) == ('bfloat16', f'compute bfloat16 (auto, {backend})')


def test_resolve_writes_the_dtype_into_the_config(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  model = ml_collections.ConfigDict(dict(name='bert', dtype='auto'))
  assert precision.resolve(model, 'cpu') == 'compute bfloat16 (auto: this CPU has bfloat16 instructions)'
  assert model.dtype == 'bfloat16'
  assert precision.resolve(model, 'tpu') == 'compute bfloat16'  # resolved once: now an explicit setting
  assert precision.resolve(ml_collections.ConfigDict(dict(name='x'))) == ''  # a family without the setting


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
  monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
  try:
    flags = open('/proc/cpuinfo').read()
  except OSError:
    flags = ''
  assert precision.cpu_has_bf16() == bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))


def test_unknown_setting_is_refused():
  with pytest.raises(UserError, match=r"model.dtype='half': use one of auto, float32, bfloat16"):
    precision.compute_dtype('half', 'bert')


# model.dtype=auto computes every family in bfloat16 on TPU and GPU: on the same params and batch, each family's
# held-out loss in bfloat16 must stay near its float32 loss (a product or norm left in the wrong dtype shows here).
FAMILY_CONFIGS = ('configs/bert.py:tiny', 'configs/gpt.py:tiny', 'configs/gpt.py:llama_tiny',
                  'configs/gpt.py:gemma3_tiny', 'configs/encdec.py:tiny', 'configs/mae.py:tiny',
                  'configs/simclr.py:tiny', 'configs/elmo.py:tiny')


@pytest.mark.parametrize('spec', FAMILY_CONFIGS)
def test_bfloat16_loss_is_near_float32_for_every_family(spec):
  import jax
  from jaxssl import config as config_lib
  from jaxssl import families
  from jaxssl import mesh as mesh_lib
  from jaxssl.train import state as state_lib
  from jaxssl.train import step as step_lib
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = config_lib.load_config(spec)
    config_lib.parse_overrides(config, ['--config.train.batch_size=4', '--config.tokenizer.vocab_size=300',
                                        f'--config.model.dtype={dtype}'])
    if 'seq_len' in config.data and config.model.name != 'elmo':
      config.data.seq_len = min(config.data.seq_len, 32)
      if 'max_predictions' in config.data:
        config.data.max_predictions = 5
    family = families.family_for(config.model)
    setup = state_lib.setup_model(config.model, 300, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
    batch = family.synthetic_batch(config, 300, 0)
    sums = jax.jit(step_lib.make_eval_step(setup.graphdef, family.objective))(state_lib.init_params(setup), batch)
    losses[dtype] = float(family.objective.summarize(sums)['loss'])
  assert np.isfinite(losses['bfloat16'])
  assert abs(losses['bfloat16'] - losses['float32']) <= 2e-3 * abs(losses['float32']), losses
  assert losses['bfloat16'] != losses['float32'], losses  # it did compute in bfloat16


def test_remat_auto_takes_none_in_bfloat16_on_cpu_and_dots_elsewhere():
  """model.remat=auto (the published configs' default): recomputing costs more than it saves in bfloat16 on CPU
  (BENCHMARKS.md §41); 'dots' in float32 on CPU and on TPU/GPU. Explicit settings pass through; resolve() sets it
  in the config section and a model config no job resolved takes it in check_compute_settings."""
  import ml_collections
  from jaxssl.models import gpt as gpt_lib
  assert precision.remat_policy('auto', 'bfloat16', 'cpu') == ('none', 'remat none (auto: bfloat16 on CPU)')
  assert precision.remat_policy('auto', 'float32', 'cpu') == ('dots', 'remat dots (auto, cpu, float32)')
  assert precision.remat_policy('auto', 'bfloat16', 'tpu')[0] == 'dots'
  assert precision.remat_policy('auto', 'bfloat16', 'gpu')[0] == 'dots'
  assert precision.remat_policy('full', 'bfloat16', 'cpu') == ('full', 'remat full')
  section = ml_collections.ConfigDict(dict(name='gpt', dtype='bfloat16', remat='auto'))
  precision.resolve(section, 'cpu')
  assert section.remat == 'none'
  section = ml_collections.ConfigDict(dict(name='gpt', dtype='auto', remat='auto'))
  precision.resolve(section, 'tpu')
  assert (section.dtype, section.remat) == ('bfloat16', 'dots')
  c = gpt_lib.GPTConfig.from_config(dict(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32,
                                          dtype='float32', remat='auto'), vocab_size=64)
  assert c.remat == 'dots'  # from_config's check (layers.check_compute_settings) resolved it

"""models/precision.py: which compute dtype a run's model.dtype picks, and why (pretraining and fine-tuning)."""
import re

import ml_collections
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


def test_auto_on_cpu_is_float32_for_families_not_faster_in_bfloat16(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  for name in ('gpt', 'encdec', 'mae', 'simclr', 'wav2vec2', 'elmo'):
    assert precision.compute_dtype('auto', name, 'cpu') == (
        'float32', 'compute float32 (auto: bfloat16 on CPU is for bert models)'), name


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

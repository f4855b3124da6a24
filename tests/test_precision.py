"""train/precision.py: which compute dtype a fine-tuning run's model.dtype picks, and why."""
import re

import ml_collections
import pytest

from jaxssl.errors import UserError
from jaxssl.train import precision


def body(name='bert', dtype='float32'):
  return ml_collections.ConfigDict(dict(name=name, dtype=dtype))


def test_explicit_settings_are_kept():
  assert precision.finetune_dtype('float32', body(dtype='bfloat16')) == ('float32', 'compute float32')
  assert precision.finetune_dtype('bfloat16', body('mae')) == ('bfloat16', 'compute bfloat16')


def test_auto_follows_the_cpu(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  assert precision.finetune_dtype('auto', body()) == (
      'bfloat16', 'compute bfloat16 (auto: this CPU has bfloat16 instructions)')
  monkeypatch.setenv(precision.CPU_BF16_ENV, '0')
  assert precision.finetune_dtype('auto', body()) == (
      'float32', 'compute float32 (auto: this CPU has no bfloat16 instructions)')
  assert precision.finetune_dtype('auto', body(dtype='bfloat16'))[0] == 'bfloat16'  # the body's own


def test_auto_keeps_the_dtype_of_bodies_other_than_text_encoders(monkeypatch):
  monkeypatch.setenv(precision.CPU_BF16_ENV, '1')
  for name in ('mae', 'wav2vec2', 'elmo'):
    assert precision.finetune_dtype('auto', body(name)) == ('float32', '')


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch):
  monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
  try:
    flags = open('/proc/cpuinfo').read()
  except OSError:
    flags = ''
  assert precision.cpu_has_bf16() == bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', flags))


def test_unknown_setting_is_refused():
  with pytest.raises(UserError, match=r"model.dtype='half': use one of auto, float32, bfloat16"):
    precision.finetune_dtype('half', body())

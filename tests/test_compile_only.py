"""`python -m jaxssl.pretrain --compile-only`: the train step compiled for a target slice without its hardware, with
per-device memory and FLOPs, and a config that cannot fit reported as one line (exit 2)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from jaxssl.errors import UserError
from jaxssl.train import compile_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--config', 'configs/bert.py:tiny', '--config.model.num_layers=2', '--config.model.hidden_size=64',
         '--config.model.num_heads=2', '--config.model.intermediate_size=128', '--config.model.max_position=64',
         '--config.data.seq_len=64', '--config.data.max_predictions=10', '--config.tokenizer.vocab_size=1000',
         '--config.train.batch_size=16']


def run(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'jaxssl.pretrain', *SMALL, '--compile-only', *args], cwd=ROOT,
                        env=dict(env, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=600)


def test_tpu_topology_names():
  assert compile_only.tpu_topology_name('v5e-256') == ('v5e:16x16', 'v5e')
  assert compile_only.tpu_topology_name('v5litepod-16') == ('v5e:4x4', 'v5e')
  assert compile_only.tpu_topology_name('v4-32') == ('v4:2x2x4', 'v4')  # v4-N counts TensorCores, 2 per chip
  assert compile_only.tpu_topology_name('v5p-128') == ('v5p:4x4x4', 'v5p')
  assert compile_only.tpu_topology_name('v6e:8x8') == ('v6e:8x8', 'v6e')
  with pytest.raises(UserError, match="--topology 'v5e-300' is not a slice"):
    compile_only.tpu_topology_name('v5e-300')


def test_cpu_mesh_report_sharded_params_and_a_config_that_cannot_fit():
  result = run('--topology', 'cpu:8', '--config.mesh.shape=(2,2,2)', '--device-memory-gib=0.001')
  # It does not fit in 1 MiB: the report is printed, then one line says so (exit 2).
  assert result.returncode == 2, result.stderr[-3000:]
  assert 'GiB per device but 8 CPU devices has 0 GiB' in result.stderr
  assert 'lower train.batch_size' in result.stderr.strip().splitlines()[-1]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['fits'] is False
  assert report['devices'] == 8 and report['mesh'] == {'data': 2, 'fsdp': 2, 'tensor': 2}
  per_device = report['per_device_bytes']
  # fsdp x tensor = 4 shards of every large weight: each device holds well under half of the params.
  assert per_device['params'] < report['param_bytes'] / 2
  assert per_device['optimizer_state'] < 2 * report['param_bytes'] / 2  # Adam: two moments per param
  assert per_device['activations_and_temporaries'] > 0 and report['xla_flops_per_device'] > 0
  assert report['model_flops_per_device'] == pytest.approx(report['model_flops_per_step'] / 8)
  assert 'GiB per device' in result.stdout
  # What this CPU builds (conftest pins JAXSSL_CPU_BF16=0): float32, the layers unrolled for training.
  assert report['compute'] == 'compute float32 (auto: this CPU has no bfloat16 instructions)'
  assert report['layers'] == 'layers unrolled in training, in a loop for eval (auto, cpu)'


def test_unknown_topology_is_one_line_exit_2():
  bad = run('--topology', 'v9x-8')
  assert bad.returncode == 2 and 'is not a slice jaxssl knows' in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None,
                    reason='libtpu not installed (pip install -r requirements-tpu.txt)')
def test_small_bert_on_v5e_256_without_a_tpu():
  """libtpu's compiler for a 256-chip slice. The model is SMALL, not bert mini: the TPU compile took 50 s of the
  suite's 15 minutes for mini (and as long for 16 chips), 12 s for SMALL; the slice and the mesh are what count."""
  result = subprocess.run([sys.executable, '-m', 'jaxssl.pretrain', *SMALL, '--compile-only', '--topology', 'v5e-256',
                           '--config.mesh.shape=(64,4,1)', '--config.train.batch_size=256',
                           # A fused kernel may run (splash on TPU), on 128-token tiles.
                           '--config.model.attention_dropout_rate=0', '--config.model.max_position=128',
                           '--config.data.seq_len=128'],
                          cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['devices'] == 256 and report['fits'] is True
  assert report['device_memory_bytes'] == 16 * 2**30
  # The per-platform choices are the TPU's, not this CPU host's: bfloat16, XLA's layer loop, Pallas splash
  # attention compiled for the TPU (on this CPU they would be float32, unrolled layers and XLA's attention).
  assert report['compute'] == 'compute bfloat16 (auto, tpu)', report
  assert report['layers'] == 'layers in a loop (auto, tpu)', report
  assert report['attention'] == 'attention splash (auto, tpu)', report
  assert 'compiled the train step for TPU v5e:16x16 (256 chips), mesh' in result.stdout
  assert ': compute bfloat16 (auto, tpu), layers in a loop (auto, tpu), attention splash (auto, tpu)' in result.stdout

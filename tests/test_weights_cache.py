"""jaxssl/weights_cache.py: an export's weights as one memory-mapped file, read back without a copy."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import weights_cache
from jaxssl.models import generate_program


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'cache'))
  monkeypatch.delenv('JAXSSL_WEIGHTS_CACHE_GB', raising=False)
  return tmp_path / 'cache'


def fake_export(path, payload=b'x' * 100):
  """An export folder as path_for sees it: files under params/."""
  (path / 'params' / 'd').mkdir(parents=True)
  (path / 'params' / 'manifest.ocdbt').write_bytes(payload)
  (path / 'params' / 'd' / 'chunk').write_bytes(payload * 3)
  return str(path)


def weights():
  rng = np.random.default_rng(0)
  return {'decoder': {'layers': {'kernel': rng.standard_normal((3, 8, 16), np.float32),
                                 'scale': jnp.asarray(rng.standard_normal((3, 7)), jnp.bfloat16)}},
          'embedding': rng.standard_normal((11, 5), np.float32)}


def test_save_and_load_give_the_same_weights_without_a_copy(cache, tmp_path):
  w = weights()
  layout = generate_program.weights_layout(w)
  path = weights_cache.path_for(fake_export(tmp_path / 'export'), layout)
  assert path.startswith(str(cache / 'jaxssl_weights'))
  assert weights_cache.load(path, layout) is None  # nothing kept yet
  weights_cache.save(path, layout, w)
  views = weights_cache.load(path, layout)
  for (keys, _, dtype), want in zip(layout, jax.tree.leaves(w)):
    got = views
    for key in keys:
      got = got[key]
    assert str(got.dtype) == dtype and not got.flags.writeable
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Each layer's slice of a stacked leaf is a view, and jax takes every one without a copy (each starts 64-byte
  # aligned, as every layer of a real model's weights does; jax copies one that does not).
  inputs = [[['decoder', 'layers', i, 'kernel'], [8, 16], 'float32'] for i in range(3)] + [
      [['embedding'], [11, 5], 'float32']]
  leaves = generate_program.program_leaves(views, inputs)
  assert all(isinstance(a, np.memmap) for a in leaves)
  on_device = jax.device_put(leaves)
  assert [a.unsafe_buffer_pointer() for a in on_device] == [a.ctypes.data for a in leaves]
  np.testing.assert_array_equal(on_device[1], w['decoder']['layers']['kernel'][1])
  scale = generate_program.program_leaves(views, [[['decoder', 'layers', 1, 'scale'], [7], 'bfloat16']])
  np.testing.assert_array_equal(jax.device_put(scale)[0], w['decoder']['layers']['scale'][1])  # 14 bytes in: copied
  with pytest.raises(ValueError, match=r'the program takes float32\[8, 8\]'):
    generate_program.program_leaves(views, [[['decoder', 'layers', 0, 'kernel'], [8, 8], 'float32']])


def test_a_damaged_or_foreign_file_is_a_miss(cache, tmp_path):
  w = weights()
  layout = generate_program.weights_layout(w)
  path = weights_cache.path_for(fake_export(tmp_path / 'export'), layout)
  weights_cache.save(path, layout, w)
  other = [[keys, shape, 'float16' if dtype == 'float32' else dtype] for keys, shape, dtype in layout]
  assert weights_cache.load(path, other) is None
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 1)
  assert weights_cache.load(path, layout) is None
  with open(path, 'wb') as f:
    f.write(b'not json\n')
  assert weights_cache.load(path, layout) is None
  assert weights_cache.load(str(tmp_path / 'never-saved.bin'), layout) is None


def test_the_key_follows_the_export_and_where_nothing_is_kept(cache, tmp_path, monkeypatch):
  layout = generate_program.weights_layout(weights())
  export = fake_export(tmp_path / 'export')
  path = weights_cache.path_for(export, layout)
  assert path == weights_cache.path_for(export, layout)
  assert path != weights_cache.path_for(fake_export(tmp_path / 'other'), layout)
  assert path != weights_cache.path_for(export, layout[:2])
  chunk = os.path.join(export, 'params', 'd', 'chunk')
  os.utime(chunk, ns=(time.time_ns(), time.time_ns() + 10**9))  # the export written again
  assert path != weights_cache.path_for(export, layout)
  assert weights_cache.path_for(str(tmp_path / 'no-export'), layout) is None
  assert weights_cache.path_for('gs://bucket/export', layout) is None
  monkeypatch.setenv('JAXSSL_WEIGHTS_CACHE_GB', '0')
  assert weights_cache.path_for(export, layout) is None
  monkeypatch.setenv('JAXSSL_WEIGHTS_CACHE_GB', '1')
  assert weights_cache.path_for(export, [[['big'], [300_000_000], 'float32']]) is None  # 1.2 GB over the limit
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', '')
  assert weights_cache.path_for(export, layout) is None


def test_the_folder_keeps_to_its_limit_least_recently_used_out(cache, tmp_path, monkeypatch):
  w = {'a': np.zeros((1000,), np.float32)}  # 4 kB + header: two 4 kB pages a file
  layout = generate_program.weights_layout(w)
  paths = [weights_cache.path_for(fake_export(tmp_path / f'e{i}'), layout) for i in range(3)]
  monkeypatch.setenv('JAXSSL_WEIGHTS_CACHE_GB', str(2.5 * 8192 / 1e9))  # room for two files
  weights_cache.save(paths[0], layout, w)
  weights_cache.save(paths[1], layout, w)
  past = time.time() - 100
  os.utime(paths[1], (past, past))
  assert weights_cache.load(paths[0], layout) is not None  # used now: paths[1] is the least recently used
  weights_cache.save(paths[2], layout, w)
  assert sorted(os.listdir(cache / 'jaxssl_weights')) == sorted(os.path.basename(p) for p in (paths[0], paths[2]))


def _mapped_from(path) -> list[tuple[int, int]]:
  """The address ranges this process maps from the file at `path` (/proc/self/maps)."""
  with open('/proc/self/maps') as f:
    rows = [line.split() for line in f]
  return [tuple(int(x, 16) for x in row[0].split('-')) for row in rows if len(row) > 5 and row[5] == str(path)]


def test_the_generate_job_passes_views_of_the_file_it_keeps(cache, tmp_path, monkeypatch):
  """A start that restores the export restores it leaf by leaf into the file and passes views of it, not arrays
  of its own (one leaf in memory at a time, not the weights twice); a later start (another prompt shape) maps it
  without restoring; an export that does not fit leaves no file behind."""
  import orbax.checkpoint as ocp
  from jaxssl import generate
  from jaxssl.errors import UserError
  from jaxssl.train import checkpoint as ckpt_lib
  w = weights()
  rng = np.random.default_rng(1)
  for name, width in (('a', 1), ('b', 3), ('gate', 6), ('up', 10)):  # kernels the program takes fused
    w['decoder']['layers'][name] = rng.standard_normal((3, 8, width), np.float32)
  export = str(tmp_path / 'export')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(export, 'params'), jax.tree.map(jnp.asarray, w))
  checkpointer.wait_until_finished()
  layout = generate_program.weights_layout(w)
  # The embedding stands for an untied output layer: a leaf of its own, also taken output-major. a|b and gate|up
  # are taken as one kernel each (q/k/v, gate/up: generation.layers_apart), the second output-major. (Each layer's
  # slice a multiple of 64 bytes, as a real model's are: jax takes it without a copy.)
  layer = lambda i, name: ['decoder', 'layers', i, name]  # noqa: E731
  inputs = [entry for i in range(3) for entry in (
      [layer(i, 'ab'), [8, 4], 'float32', {'parts': [layer(i, 'a'), layer(i, 'b')]}],
      [layer(i, 'gate_up'), [16, 8], 'float32', {'perm': [1, 0], 'parts': [layer(i, 'gate'), layer(i, 'up')]}],
      [layer(i, 'kernel'), [16, 8], 'float32', {'perm': [1, 0]}])] + [
      [['embedding'], [5, 11], 'float32', {'perm': [1, 0]}]]
  kept_layout = generate_program.kept_layout(layout, inputs)
  assert [(keys[-1], shape) for keys, shape, _ in kept_layout] == [
      ('ab', [3, 8, 4]), ('kernel', [3, 16, 8]), ('scale', [3, 7]), ('gate_up', [3, 16, 8]), ('embedding', [5, 11])]
  layers = w['decoder']['layers']
  want = [a for i in range(3) for a in (
      np.concatenate([layers['a'][i], layers['b'][i]], axis=1),
      np.concatenate([layers['gate'][i].T, layers['up'][i].T], axis=0),
      layers['kernel'][i].T)] + [w['embedding'].T]
  calls = []
  for name in ('export_leaves', 'load_export_params'):
    monkeypatch.setattr(ckpt_lib, name, lambda *a, f=getattr(ckpt_lib, name), n=name: calls.append(n) or f(*a))
  for _ in range(2):
    leaves = generate._program_weights(export, layout, inputs)
    assert len(leaves) == len(want)
    for got, expected in zip(leaves, want):
      np.testing.assert_array_equal(got, expected)
    [kept] = os.listdir(cache / 'jaxssl_weights')
    mapped = _mapped_from(cache / 'jaxssl_weights' / kept)
    assert mapped and all(any(lo <= a.unsafe_buffer_pointer() < hi for lo, hi in mapped) for a in leaves)
  assert calls == ['export_leaves']  # the second call found the file
  sliced = generate._program_weights(export, layout, inputs, keep=False)  # nothing kept: restored whole, sliced
  assert calls == ['export_leaves', 'load_export_params']
  assert len(sliced) == len(want)
  for got, expected in zip(sliced, want):
    np.testing.assert_array_equal(got, expected)
  wrong = [[keys, [11, 6] if keys == ['embedding'] else shape, dtype] for keys, shape, dtype in layout]
  with pytest.raises(UserError, match=r'its params do not fit .*re-export'):
    generate._program_weights(export, wrong, inputs[:-1] + [[['embedding'], [6, 11], 'float32', {'perm': [1, 0]}]])
  assert os.listdir(cache / 'jaxssl_weights') == [kept]  # no partial file

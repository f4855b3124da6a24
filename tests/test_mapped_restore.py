"""Exports restored through memory-mapped files (jaxssl/train/mapped_restore.py) equal orbax's own restore."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxssl.errors import UserError
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import mapped_restore


def saved_params(tmp_path):
  rng = np.random.default_rng(0)
  params = {'layers': {'kernel': jnp.asarray(rng.standard_normal((3, 64, 48)), jnp.float32),
                       'scale': jnp.asarray(rng.standard_normal((3, 48)), jnp.bfloat16)},
            'embeddings': jnp.asarray(rng.standard_normal((1000, 64)), jnp.float32),
            'count': jnp.asarray(7, jnp.int32)}
  path = str(tmp_path / 'export' / 'params')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params)
  return path, params


def abstract(tree):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)


def test_mapped_restore_equals_orbax_and_maps_the_files(tmp_path, monkeypatch):
  path, params = saved_params(tmp_path)
  modes = []
  original = mapped_restore._MappedArrayHandler.deserialize

  async def spy(self, infos, args=None):
    out = await original(self, infos, args)
    modes.extend(info.ts_context['file_io_mode'].to_json() for info in infos)
    return out

  monkeypatch.setattr(mapped_restore._MappedArrayHandler, 'deserialize', spy)
  mapped = mapped_restore.restore(path, abstract(params))
  assert modes and all(m == {'mode': 'memmap'} for m in modes)
  with ocp.StandardCheckpointer() as checkpointer:
    plain = checkpointer.restore(path, abstract(params))
  for name, got, want, orig in zip(['kernel', 'scale', 'count', 'embeddings'], jax.tree.leaves(mapped),
                                   jax.tree.leaves(plain), jax.tree.leaves(params)):
    assert got.dtype == want.dtype == orig.dtype, name
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(orig), err_msg=name)


def test_export_params_that_do_not_fit_are_a_user_error(tmp_path):
  path, params = saved_params(tmp_path)
  export = os.path.dirname(path)
  with open(os.path.join(export, 'config.json'), 'w') as f:
    json.dump({}, f)
  wrong = dict(params, embeddings=jnp.zeros((1000, 32), jnp.float32))
  with pytest.raises(UserError, match='its params do not fit the model its config.json describes'):
    ckpt_lib.load_export_params(export, abstract(wrong))
  restored = ckpt_lib.load_export_params(export, abstract(params))
  np.testing.assert_array_equal(np.asarray(restored['embeddings']), np.asarray(params['embeddings']))

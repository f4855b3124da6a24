"""Restoring an export's params (train/checkpoint.load_export_params): a mismatch is a user error."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxssl.errors import UserError
from jaxssl.train import checkpoint as ckpt_lib


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

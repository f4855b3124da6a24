"""BERT model: shapes, masking, dropout keys, scan vs list, remat, bf16, sharding, math vs a numpy reference."""
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

from jaxssl.config import load_config
from jaxssl.errors import UserError
from jaxssl.mesh import LOGICAL_AXIS_RULES, make_mesh
from jaxssl.families import build_model, flops_per_token
from jaxssl.models.layers import MultiHeadAttention, describe_layer_loop

V, B, L, P = 100, 4, 16, 5


def tiny_cfg(**kw):
  c = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'bert.py') + ':tiny').model
  c.update(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, max_position=32)
  c.update(**kw)
  return c


@functools.cache  # models are never mutated below (except a fresh one in test_scan_equals_unscanned)
def make(seed=0, **kw):
  """A tiny BERT; cached because eager creation of the stacked layers costs seconds on CPU."""
  return build_model(tiny_cfg(**kw), V, rngs=nnx.Rngs(params=seed))


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([L, 10, 7, 12])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, V, (B, L)) * mask
  types = (np.arange(L)[None] >= (lengths // 2)[:, None]).astype(np.int32) * mask
  pos = np.stack([np.sort(rng.choice(n, P, replace=False)) for n in lengths])
  return dict(input_ids=jnp.asarray(ids, jnp.int32), token_type_ids=jnp.asarray(types, jnp.int32),
              attention_mask=jnp.asarray(mask), mlm_positions=jnp.asarray(pos, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, batch, key):
  return nnx.merge(graphdef, state)(**batch, dropout_rng=key)


def forward(model, batch, key=None):
  """The functional way a train step applies the model: split once, merge inside jit."""
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, batch, key)


def copy_into_unscanned(src, dst):
  """Copies a scanned model's weights into an unscanned one (layer i = slice i of the stacked params)."""
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings', 'embedding_norm',
               'pooler', 'nsp_classifier', 'mlm_transform', 'mlm_norm'):
    nnx.update(getattr(dst, name), nnx.state(getattr(src, name)))
  dst.mlm_bias[...] = src.mlm_bias[...]
  stacked = nnx.state(src.encoder.layers)
  for i, layer in enumerate(dst.encoder.layers):
    nnx.update(layer, jax.tree.map(lambda a: a[i], stacked))


def test_shapes_dtypes_and_bad_heads():
  mlm, nsp = forward(make(), make_batch())
  assert mlm.shape == (B, P, V) and mlm.dtype == jnp.float32
  assert nsp.shape == (B, 2) and nsp.dtype == jnp.float32
  with pytest.raises(UserError, match='num_heads'):
    make(num_heads=3)


def test_padding_does_not_leak():
  model, batch = make(), make_batch()
  mlm, nsp = forward(model, batch)
  pad = batch['attention_mask'] == 0
  changed = dict(batch, input_ids=jnp.where(pad, 7, batch['input_ids']),
                 token_type_ids=jnp.where(pad, 1, batch['token_type_ids']))
  mlm2, nsp2 = forward(model, changed)
  np.testing.assert_allclose(mlm, mlm2, atol=1e-5)  # all mlm_positions are real tokens
  np.testing.assert_allclose(nsp, nsp2, atol=1e-5)


def test_dropout_keys():
  model, batch = make(), make_batch()
  a = forward(model, batch)
  np.testing.assert_array_equal(a[0], forward(model, batch)[0])
  k0, k1 = jax.random.key(0), jax.random.key(1)
  d0 = forward(model, batch, k0)
  np.testing.assert_array_equal(d0[0], forward(model, batch, k0)[0])
  assert not np.allclose(d0[0], forward(model, batch, k1)[0])
  assert not np.allclose(d0[0], a[0])


def test_scan_equals_unscanned():
  scanned = make()
  unscanned = build_model(tiny_cfg(scan_layers=False), V, rngs=nnx.Rngs(params=1))
  copy_into_unscanned(scanned, unscanned)
  batch = make_batch()
  for key in (None, jax.random.key(3)):  # same per-layer keys on both paths, so dropout matches too
    for x, y in zip(forward(scanned, batch, key), forward(unscanned, batch, key)):
      np.testing.assert_allclose(x, y, atol=1e-5)


def test_dot_product_attention_equals_explicit():
  with nnx.use_eager_sharding(False):  # a bare layer outside a mesh: keep the names, place nothing
    attn = MultiHeadAttention(64, 4, stddev=0.5, attention_dropout_rate=0.1, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(0), (B, L, 64))
  mask = make_batch()['attention_mask']
  fast = nnx.jit(lambda m, x: m(x, mask))(attn, x)
  explicit = nnx.jit(lambda m, x: m(x, mask, explicit=True))(attn, x)
  np.testing.assert_allclose(fast, explicit, atol=1e-5)


def _loss(graphdef, state, batch, key):
  mlm, nsp = nnx.merge(graphdef, state)(**batch, dropout_rng=key)
  return jnp.mean(jax.nn.logsumexp(mlm, -1) - mlm[..., 0]) + jnp.mean(nsp[:, 0])


def test_remat_same_loss_and_grads():
  # The scanned stack only: the remat wrapper is the same function on the unscanned path.
  batch, key, results = make_batch(), jax.random.key(5), []
  for remat in ('none', 'full', 'dots'):
    graphdef, state = nnx.split(make(remat=remat))
    results.append(jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(graphdef, state, batch, key))
  for loss, grads in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, results[0][1])


@pytest.mark.parametrize('subset', [False, True])
def test_layer_loop_scan_equals_unrolled(subset):
  """model.layer_loop: the stacked layers in XLA's while loop (TPU/GPU's default) or unrolled (CPU's): the same
  loss and gradients, with dropout; `subset` takes the final-layer-subset path (its own scan over L - 1 layers)."""
  batch, key, results, loops = make_batch(), jax.random.key(5), [], []
  for loop in ('scan', 'unrolled'):
    graphdef, state = nnx.split(make(layer_loop=loop, final_layer_subset=subset, num_layers=3))
    step = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)
    loops.append(step.lower(graphdef, state, batch, key).as_text().count('stablehlo.while'))
    results.append(step(graphdef, state, batch, key))
  assert loops[0] >= loops[1] + 2, loops  # the layers' loop, forward and backward
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[1][1], results[0][1])
  with pytest.raises(UserError, match="model.layer_loop='loop': use 'auto', 'scan' or 'unrolled'"):
    make(layer_loop='loop')
  # What the banners say (the tests run on CPU); an imported checkpoint's section has no layer_loop: 'auto'.
  assert describe_layer_loop({'scan_layers': True}) == 'layers unrolled in training, in a loop for eval (auto, cpu)'
  assert describe_layer_loop({'scan_layers': True, 'layer_loop': 'scan'}) == 'layers in a loop'
  assert describe_layer_loop({'scan_layers': False, 'layer_loop': 'auto'}) == describe_layer_loop({}) == ''


def test_auto_layer_loop_unrolls_on_cpu_and_gpu_and_loops_on_tpu(monkeypatch):
  """'auto' per backend, as measured (BENCHMARKS.md §15 CPU, §23 GPU); TPU keeps the loop's flat compile time."""
  from jaxssl.models import layers
  for backend, unrolled in (('cpu', True), ('gpu', True), ('tpu', False)):
    monkeypatch.setattr(layers.jax, 'default_backend', lambda backend=backend: backend)
    assert layers.unroll_layers('auto') is unrolled
    assert layers.unroll_layers('scan') is False and layers.unroll_layers('unrolled') is True
    how = 'unrolled in training, in a loop for eval' if unrolled else 'in a loop'
    assert describe_layer_loop({'scan_layers': True}) == f'layers {how} (auto, {backend})'


@pytest.mark.parametrize('scan,remat', [(True, 'none'), (True, 'dots'), (False, 'full')])
def test_final_layer_subset_equals_full_last_layer(scan, remat):
  """The last layer at [CLS] + mlm_positions only: the same logits and gradients as the whole last layer."""
  batch, results = make_batch(), []
  for subset in (False, True):
    graphdef, state = nnx.split(make(scan_layers=scan, remat=remat, final_layer_subset=subset))
    results.append(jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(graphdef, state, batch, None))
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[1][1], results[0][1])
  # With dropout the masks of the last layer differ in shape, so only the training signal is compared loosely.
  key = jax.random.key(7)
  losses = [jax.jit(_loss, static_argnums=0)(*nnx.split(make(scan_layers=scan, remat=remat, final_layer_subset=s)),
                                              batch, key) for s in (False, True)]
  assert np.isfinite(losses).all() and abs(losses[0] - losses[1]) < 0.5


def test_bfloat16_compute():
  batch = make_batch()
  f32, bf16 = forward(make(), batch), forward(make(dtype='bfloat16'), batch)
  assert nnx.state(make(dtype='bfloat16'), nnx.Param)['word_embeddings']['embedding'][...].dtype == jnp.float32
  for x, y in zip(f32, bf16):
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(x, y, atol=0.1 * float(np.abs(x).max()))


def test_every_param_has_logical_names():
  for scan in (True, False):
    params = nnx.state(make(scan_layers=scan), nnx.Param)
    for path, var in nnx.to_flat_state(params):
      names = var.get_metadata().get('out_sharding')
      assert names is not None and len(names) == var[...].ndim, (path, names)
      assert set(names) <= {n for n, _ in LOGICAL_AXIS_RULES}, (path, names)
      stacked = scan and path[:2] == ('encoder', 'layers')
      assert (names[0] == 'layers') == stacked, (path, names)


def test_sharded_equals_unsharded():
  assert jax.device_count() >= 8, 'tests/conftest.py should give 8 CPU devices'
  batch, cfg = make_batch(), tiny_cfg()
  expected = forward(make(), batch)
  mesh = make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    model = build_model(cfg, V, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    shardings = nnx.get_named_sharding(state, mesh)
    emb = model.word_embeddings.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec('tensor', 'fsdp')
    assert model.encoder.layers.mlp.wi.kernel[...].sharding.spec[1:] == ('fsdp', 'tensor')
    got = jax.jit(_apply.__wrapped__, static_argnums=0, in_shardings=(shardings, None, None))(
        graphdef, state, batch, None)
  for x, y in zip(expected, got):
    np.testing.assert_allclose(x, y, atol=1e-5)


# ---- a straightforward numpy BERT, to guard the math (post-LN, exact GELU, LN eps 1e-12, tied decoder) ----

def _ln(x, p, eps=1e-12):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def _gelu(x):
  return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _np_layer(x, mask, p):
  a = p['attention']
  h = x.shape[-1]
  n = a['query_kernel'].shape[1]
  q, k, v = (np.einsum('blh,hnd->bnld', x, a[f'{t}_kernel']) + a[f'{t}_bias'][None, :, None]
             for t in ('query', 'key', 'value'))
  s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h // n) + np.where(mask[:, None, None, :] > 0, 0, -1e30)
  s = np.exp(s - s.max(-1, keepdims=True))
  ctx = (s / s.sum(-1, keepdims=True)) @ v  # [b, n, l, d]
  attn = np.einsum('bnld,ndh->blh', ctx, a['out_kernel']) + a['out_bias']
  x = _ln(x + attn, p['attention_norm'])
  m = p['mlp']
  ff = _gelu(x @ m['wi']['kernel'] + m['wi']['bias']) @ m['wo']['kernel'] + m['wo']['bias']
  return _ln(x + ff, p['mlp_norm'])


def test_matches_numpy_reference():
  model, batch = make(), make_batch()
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  b = {k: np.asarray(v) for k, v in batch.items()}
  x = (p['word_embeddings']['embedding'][b['input_ids']] + p['position_embeddings']['embedding'][:L][None]
       + p['token_type_embeddings']['embedding'][b['token_type_ids']])
  x = _ln(x, p['embedding_norm'])
  for i in range(2):
    x = _np_layer(x, b['attention_mask'], jax.tree.map(lambda a: a[i], p['encoder']['layers']))
  pooled = np.tanh(x[:, 0] @ p['pooler']['kernel'] + p['pooler']['bias'])
  nsp = pooled @ p['nsp_classifier']['kernel'] + p['nsp_classifier']['bias']
  h = np.take_along_axis(x, b['mlm_positions'][:, :, None], axis=1)
  h = _ln(_gelu(h @ p['mlm_transform']['kernel'] + p['mlm_transform']['bias']), p['mlm_norm'])
  mlm = h @ p['word_embeddings']['embedding'].T + p['mlm_bias']
  got_mlm, got_nsp = forward(model, batch)
  np.testing.assert_allclose(got_mlm, mlm, atol=2e-5)
  np.testing.assert_allclose(got_nsp, nsp, atol=2e-5)


def test_mlm_gather_equals_full_sequence_logits():
  model, batch = make(), make_batch()
  full = dict(batch, mlm_positions=jnp.tile(jnp.arange(L), (B, 1)))
  all_logits = forward(model, full)[0]
  picked = jnp.take_along_axis(all_logits, batch['mlm_positions'][:, :, None], axis=1)
  np.testing.assert_allclose(forward(model, batch)[0], picked, atol=1e-5)


def test_flops_per_token_hand_count():
  cfg = tiny_cfg(num_layers=2, hidden_size=4, num_heads=2, intermediate_size=8)
  # per layer: q,k,v,out 4*4*4 = 64 + mlp 2*4*8 = 64 -> 128 params -> 768 FLOPs; attention 12*4*10 = 480
  # mlm: 6*(16 + 4*100)*3/10 = 748.8; nsp: 6*(16 + 8)/10 = 14.4
  cfg.update(final_layer_subset=False)
  assert flops_per_token(cfg, 100, 10, 3) == pytest.approx(2 * (768 + 480) + 748.8 + 14.4)
  # the last layer at 1 + 3 of 10 rows: k,v 6*2*16 = 192 everywhere; q,out,mlp 6*(32 + 64) = 576 and attention
  # 480 at 0.4 of the rows
  cfg.update(final_layer_subset=True)
  assert flops_per_token(cfg, 100, 10, 3) == pytest.approx(768 + 480 + 192 + 0.4 * (576 + 480) + 748.8 + 14.4)
  # DeBERTa's c2p + p2c per layer (every layer whole): q and k against the 2*10 - 1 = 19 offsets' rows,
  # 3*2*2*4*19 = 912, and those rows' query and key projections once per sequence, 3*2*2*16*19/10 = 364.8
  cfg.update(position_buckets=8)
  assert flops_per_token(cfg, 100, 10, 3) == pytest.approx(2 * (768 + 480 + 912 + 364.8) + 748.8 + 14.4)
  with pytest.raises(UserError, match='model.name'):
    build_model(tiny_cfg(name='nope'), V, rngs=nnx.Rngs(params=0))

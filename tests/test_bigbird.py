"""Big Bird block-sparse attention: equal to dense attention under its mask, linear memory, and wired into BERT."""
import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.errors import UserError
from jaxssl.mesh import LOGICAL_AXIS_RULES, make_mesh
from jaxssl.families import build_model, flops_per_token, validate_config
from jaxssl.models import attention

CONFIGS = os.path.join(os.path.dirname(__file__), '..', 'configs', 'bert.py')


def qkv(b, t, n, d, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, t, n, d)), jnp.float32) for _ in range(3))


def key_mask(t, lengths):
  return jnp.asarray(np.arange(t)[None] < np.asarray(lengths)[:, None])


@functools.partial(jax.jit, static_argnames='rate')
def sparse_fn(q, k, v, mask, table, rng=None, rate=0.0):
  return attention.block_sparse_attention(q, k, v, mask, rng, random_blocks=table, dropout_rate=rate)


@pytest.mark.parametrize('t,bs,r,shared', [(48, 8, 1, False), (96, 8, 3, True), (80, 16, 0, False),
                                           (160, 16, 2, False)])
def test_sparse_equals_dense_under_mask(t, bs, r, shared):
  n = 2
  q, k, v = qkv(3, t, n, 8)
  mask = key_mask(t, [t, t - 5, bs + 3])  # padding inside a middle block and in whole blocks
  table = attention.random_block_table(t // bs, r, seed=7, num_heads=1 if shared else n)
  dense_mask = attention.block_sparse_mask(t, bs, r, seed=7, num_heads=n)
  if shared:
    dense_mask = dense_mask[:1]
  full = jnp.asarray(dense_mask)[None] & mask[:, None, None, :]

  def loss(fn, q, k, v):
    out = fn(q, k, v)
    return jnp.sum(out * jnp.cos(out)), out
  sparse = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *x: sparse_fn(*x, mask, table), *a),
                                      argnums=(0, 1, 2), has_aux=True))
  dense = jax.jit(jax.value_and_grad(lambda *a: loss(lambda *x: attention.dense_attention(*x, full), *a),
                                     argnums=(0, 1, 2), has_aux=True))
  (_, out_s), grads_s = sparse(q, k, v)
  (_, out_d), grads_d = dense(q, k, v)
  np.testing.assert_allclose(out_s, out_d, atol=1e-5)
  for gs, gd in zip(grads_s, grads_d):
    np.testing.assert_allclose(gs, gd, atol=1e-5)


def test_pattern_layout_and_determinism():
  t, bs, r, n = 256, 16, 3, 4
  nb = t // bs
  table = attention.random_block_table(nb, r, seed=(1, 2), num_heads=n)
  assert table.shape == (n, nb - 2, r)
  np.testing.assert_array_equal(table, attention.random_block_table(nb, r, seed=(1, 2), num_heads=n))
  np.testing.assert_array_equal(table[:1], attention.random_block_table(nb, r, seed=(1, 2)))
  assert not np.array_equal(table, attention.random_block_table(nb, r, seed=(1, 3), num_heads=n))
  assert not np.array_equal(table[0], table[1])  # heads get their own random blocks
  pattern = attention.block_pattern(table)
  assert pattern[:, [0, -1]].all() and pattern[:, :, [0, -1]].all()  # global rows and columns
  for i in range(1, nb - 1):
    window = {i - 1, i, i + 1}
    for h in range(n):
      rand = set(table[h, i - 1].tolist())
      assert len(rand) == r and not rand & (window | {0, nb - 1})
      assert set(np.flatnonzero(pattern[h, i]).tolist()) == window | {0, nb - 1} | rand
  dense = attention.block_sparse_mask(t, bs, r, seed=(1, 2))
  assert dense.shape == (t, t) and dense.dtype == bool
  np.testing.assert_array_equal(dense, np.kron(pattern[0], np.ones((bs, bs))).astype(bool))


def test_layout_errors():
  with pytest.raises(UserError, match='multiple of model.block_size=64'):
    attention.check_layout(1000, 64, 3)
  with pytest.raises(UserError, match='at least 8 blocks'):
    attention.check_layout(448, 64, 3)
  assert attention.check_layout(512, 64, 3) == 8


def test_attention_dropout():
  t, bs, r = 64, 8, 2
  q, k, v = qkv(2, t, 2, 8)
  mask = key_mask(t, [t, 40])
  table = attention.random_block_table(t // bs, r, seed=0, num_heads=2)
  plain = sparse_fn(q, k, v, mask, table)
  np.testing.assert_array_equal(plain, sparse_fn(q, k, v, mask, table, jax.random.key(0), 0.0))
  a = sparse_fn(q, k, v, mask, table, jax.random.key(0), 0.3)
  np.testing.assert_array_equal(a, sparse_fn(q, k, v, mask, table, jax.random.key(0), 0.3))
  assert not np.allclose(a, plain, atol=1e-3)
  assert not np.allclose(a, sparse_fn(q, k, v, mask, table, jax.random.key(1), 0.3), atol=1e-3)
  # Inverted dropout keeps the expected output: the mean over many keys approaches the plain output.
  many = jax.vmap(lambda key: sparse_fn(q, k, v, mask, table, key, 0.3))(jax.random.split(jax.random.key(2), 256))
  np.testing.assert_allclose(many.mean(0), plain, atol=0.15)


def _walk_shapes(jaxpr):
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      yield var.aval.shape
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _walk_shapes(sub)


def test_no_quadratic_intermediate_at_4096():
  t, bs, r, d = 4096, 64, 3, 16
  q, k, v = qkv(1, t, 1, d)
  mask = key_mask(t, [t - 100])
  table = attention.random_block_table(t // bs, r, seed=0)

  def grad_fn(fn):
    return jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
  sparse = grad_fn(lambda q, k, v: attention.block_sparse_attention(q, k, v, mask, random_blocks=table))
  shapes = list(_walk_shapes(jax.make_jaxpr(sparse)(q, k, v).jaxpr))
  assert shapes and max(int(np.prod(s)) for s in shapes) <= 2 * bs * t * (r + 5)  # the [.., nb - 2, bs, 8 bs]
  assert not [s for s in shapes if sum(x >= t for x in s) >= 2], 'a [T, T] intermediate'
  dense = grad_fn(lambda q, k, v: attention.dense_attention(q, k, v, mask[:, None, None, :]))
  temp = {name: jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
          for name, fn in (('sparse', sparse), ('dense', dense))}
  assert temp['sparse'] * 4 < temp['dense'], temp
  assert temp['dense'] >= t * t * 4  # at least one float32 [T, T] buffer


# ---- BERT with attention_type='block_sparse' ----

V, B, L = 100, 2, 32
SPARSE = dict(attention_type='block_sparse', block_size=4, num_random_blocks=1, sparse_min_length=24)


def bert_cfg(**kw):
  c = load_config(CONFIGS + ':tiny').model
  c.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position=64)
  c.update(**kw)
  return c


@functools.cache
def bert(seed=0, **kw):
  return build_model(bert_cfg(**kw), V, rngs=nnx.Rngs(params=seed))


def bert_batch(length=L, seed=0):
  rng = np.random.default_rng(seed)
  mask = (np.arange(length)[None] < np.array([[length], [length - 9]])).astype(np.int32)
  return dict(input_ids=jnp.asarray(rng.integers(5, V, (B, length)) * mask, jnp.int32),
              token_type_ids=jnp.zeros((B, length), jnp.int32), attention_mask=jnp.asarray(mask),
              mlm_positions=jnp.asarray(np.tile([1, 5, 20], (B, 1)), jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, batch, key):
  return nnx.merge(graphdef, state)(**batch, dropout_rng=key)


def forward(model, batch, key=None):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, batch, key)


def _dense_from_table(q, k, v, key_mask, dropout_rng=None, *, random_blocks, dropout_rate=0.0):
  """Dense attention under the mask that the (traced) per-layer table describes: the reference for BERT."""
  del dropout_rng, dropout_rate
  heads, m, _ = random_blocks.shape
  nb, t = m + 2, q.shape[1]
  fixed = jnp.asarray(attention.block_pattern(np.zeros((1, m, 0), np.int32)))  # window + global
  rand = jax.nn.one_hot(random_blocks, nb, dtype=bool).any(-2)  # [heads, m, nb]
  blocks = fixed | jnp.pad(rand, ((0, 0), (1, 1), (0, 0)))
  mask = jnp.repeat(jnp.repeat(blocks, t // nb, 1), t // nb, 2)
  return attention.dense_attention(q, k, v, mask[None] & key_mask[:, None, None, :])


def test_bert_block_sparse_equals_dense_masked(monkeypatch):
  model, batch = bert(**SPARSE), bert_batch()
  sparse_out = forward(model, batch)
  tables = np.asarray(model.encoder.random_blocks(L))
  assert tables.shape == (2, 2, L // 4 - 2, 1) and not np.array_equal(tables[0], tables[1])  # per layer
  monkeypatch.setattr(attention, 'block_sparse_attention', _dense_from_table)
  _apply.clear_cache()
  try:
    dense_out = forward(model, batch)
  finally:
    monkeypatch.undo()
    _apply.clear_cache()
  for x, y in zip(sparse_out, dense_out):
    np.testing.assert_allclose(x, y, atol=1e-5)
  full = forward(bert(), batch)  # the same parameters with full attention differ at this length
  assert not np.allclose(full[0], sparse_out[0], atol=1e-4)


def test_bert_short_sequences_use_full_attention():
  batch = bert_batch(20)  # below sparse_min_length=24
  for x, y in zip(forward(bert(**SPARSE), batch), forward(bert(), batch)):
    np.testing.assert_array_equal(x, y)
  assert bert(**SPARSE).encoder.random_blocks(20) is None


def test_bert_scan_equals_unscanned_with_dropout():
  scanned, batch = bert(**SPARSE), bert_batch()
  unscanned = build_model(bert_cfg(scan_layers=False, **SPARSE), V, rngs=nnx.Rngs(params=1))
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings', 'embedding_norm',
               'pooler', 'nsp_classifier', 'mlm_transform', 'mlm_norm'):
    nnx.update(getattr(unscanned, name), nnx.state(getattr(scanned, name)))
  unscanned.mlm_bias[...] = scanned.mlm_bias[...]
  layers = nnx.state(scanned.encoder.layers)
  for i, layer in enumerate(unscanned.encoder.layers):
    nnx.update(layer, jax.tree.map(lambda a: a[i], layers))
  key = jax.random.key(3)  # same per-layer keys and random blocks on both paths (no dropout: test above)
  dropped = forward(scanned, batch, key)
  for x, y in zip(dropped, forward(unscanned, batch, key)):
    assert np.isfinite(x).all()
    np.testing.assert_allclose(x, y, atol=1e-5)
  assert not np.allclose(dropped[0], forward(scanned, batch)[0])


def test_bert_sparse_sharded_equals_unsharded():
  batch = bert_batch()
  expected = forward(bert(**SPARSE), batch)
  mesh = make_mesh((2, 2, 2))
  with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
    model = build_model(bert_cfg(**SPARSE), V, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    got = jax.jit(_apply.__wrapped__, static_argnums=0,
                  in_shardings=(nnx.get_named_sharding(state, mesh), None, None))(graphdef, state, batch, None)
  for x, y in zip(expected, got):
    np.testing.assert_allclose(x, y, atol=1e-5)


def test_bert_config_checks():
  with pytest.raises(UserError, match="attention_type='dense'"):
    validate_config(bert_cfg(attention_type='dense'), V)
  with pytest.raises(UserError, match='sparse_min_length=24 or more'):
    validate_config(bert_cfg(**dict(SPARSE, sparse_min_length=16)), V)
  with pytest.raises(UserError, match='multiple of model.block_size=4'):
    forward(bert(**SPARSE), bert_batch(26))
  validate_config(bert_cfg(sparse_min_length=16), V)  # only checked for block_sparse


def test_bigbird_configs_and_flops():
  for variant in ('bigbird_tiny', 'bigbird_base'):
    c = load_config(f'{CONFIGS}:{variant}')
    validate_config(c.model, c.tokenizer.vocab_size)
    assert c.model.attention_type == 'block_sparse' and c.data.seq_len == c.model.max_position == 4096
    assert c.data.max_predictions == 614 and c.data.seq_len % c.model.block_size == 0
  c = load_config(f'{CONFIGS}:bigbird_base')
  c.model.final_layer_subset = False  # (block-sparse lengths never subset; keep the full-attention count alike)
  sparse = flops_per_token(c.model, 30522, 4096, 614)
  c.model.attention_type = 'full'
  full = flops_per_token(c.model, 30522, 4096, 614)
  h, layers, nb = 768, 12, 64
  keys = (2 * 4096 + (nb - 2) * 8 * 64) / nb  # global rows see all, the others 8 blocks of 64
  assert full - sparse == pytest.approx(layers * 12 * h * (4096 - keys))
  assert flops_per_token(c.model, 30522, 512, 77) == flops_per_token(
      dict(c.model, attention_type='block_sparse'), 30522, 512, 77)  # below sparse_min_length: full

"""Packed fine-tuning batches (train/packing.py) compute what the padded batches compute: the same logits per
example (per token for tagging), loss and gradients; the packing places every example once, whole, inside its
row; and the job packs where `data.packing=auto` says so."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl import tasks
from jaxssl.errors import UserError
from jaxssl.tasks.model import task_loss
from jaxssl.train import finetune, packing
from test_heads import NUM_LABELS, V, tiny_cfg

L = 32


def pair_batch(n=8, seed=0):
  """`n` [CLS] a [SEP] b [SEP]-like rows of lengths 3..15 padded to L, token types 0 then 1, labels 0..2."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, 16, n)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  types = ((np.arange(L)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return dict(input_ids=(rng.integers(1, V, (n, L)) * mask).astype(np.int32), token_type_ids=types,
              attention_mask=mask, labels=rng.integers(0, 3, n).astype(np.int32))


def test_first_fit_places_every_example_once_within_its_row():
  lengths = np.array([9, 3, 14, 7, 7, 2, 16, 5])
  layout = packing.first_fit(lengths, 16)
  assert sorted(i for row in layout for i in row) == list(range(8))
  assert all(sum(lengths[row]) <= 16 for row in layout)
  assert layout == [[6], [2, 5], [0, 3], [4, 7, 1]]  # 63 tokens in 4 rows of 16: longest first, first fit


def test_pack_lays_examples_end_to_end_with_their_own_ids_positions_and_cls():
  b = pair_batch()
  lengths = b['attention_mask'].sum(1)
  packed = packing.pack(b, np.arange(8), lengths, 24, 2, ['input_ids', 'token_type_ids', 'attention_mask',
                                                          'position_ids', 'pool_positions', 'labels'])
  rows = packed['input_ids'].shape[0]
  assert rows % 2 == 0 and rows < 8 and packed['input_ids'].shape[1] == 24
  np.testing.assert_array_equal(packed['labels'], b['labels'])
  flat = {k: packed[k].reshape(-1) for k in ('input_ids', 'token_type_ids', 'attention_mask', 'position_ids')}
  for i, at in enumerate(packed['pool_positions']):
    n = lengths[i]
    np.testing.assert_array_equal(flat['input_ids'][at:at + n], b['input_ids'][i, :n])
    np.testing.assert_array_equal(flat['token_type_ids'][at:at + n], b['token_type_ids'][i, :n])
    np.testing.assert_array_equal(flat['position_ids'][at:at + n], np.arange(n))
    segment = flat['attention_mask'][at]
    assert segment > 0 and (flat['attention_mask'][at:at + n] == segment).all()
    assert at // 24 == (at + n - 1) // 24  # whole, inside one row
  assert (packed['attention_mask'] > 0).sum() == lengths.sum()


def test_processes_feed_equal_shares_of_one_global_batch():
  b = pair_batch(n=8, seed=1)
  whole = packing.pack(b, np.arange(8), b['attention_mask'].sum(1), 16, 2,
                       ['input_ids', 'token_type_ids', 'attention_mask', 'labels'])
  first, second = (packing.share(whole, p, 2) for p in (0, 1))
  assert first['input_ids'].shape == second['input_ids'].shape and first['labels'].shape == (4,)
  for k, v in whole.items():
    np.testing.assert_array_equal(np.concatenate([first[k], second[k]]), v)


def test_a_short_job_compiles_fewer_row_counts():
  """One train-step shape per 100 steps, 1 to 3: a 60-step job packs every batch to one row count."""
  assert [packing.row_counts_for(s) for s in (1, 60, 150, 250, 300, 10_000)] == [1, 1, 1, 2, 3, 3]
  assert packing.few_shapes_multiple(range(8, 15), 1, packing.row_counts_for(60)) == 7  # 8..14 rows -> 14 each


def test_row_counts_weigh_compiles_against_padding_on_cpu():
  """packing.row_counts: on CPU (a compile's worth in padded tokens) a cheap body keeps one row count where a costly
  one keeps every count its steps need; off CPU (worth 0) one count per 100 steps; row_count takes the smallest
  kept count that holds a batch, or rounds a batch past them up to the unit."""
  needed = [5] * 41 + [4] * 18 + [6]  # a 60-step MiniLM job's first-fit rows (batches of 16 tweets in rows of 128)
  assert packing.row_counts(needed, 1, 60, 128, 13_000.0) == (6,)  # MiniLM: a compile is worth ~13,000 tokens
  assert packing.row_counts(needed, 1, 60, 128, 1_500.0) == (4, 5, 6)  # BERT-base: ~1,500
  assert packing.row_counts(needed, 2, 60, 128, 1_500.0) == (4, 6)  # counts are multiples of the unit
  assert packing.row_counts(needed, 1, 60, 128, 0.0) == (6,) and packing.row_counts(needed, 1, 300, 128, 0.0) == (
      4, 5, 6)
  assert [packing.row_count(r, (4, 6), 2) for r in (1, 4, 5, 6, 7, 9)] == [4, 4, 6, 6, 8, 10]


def test_few_shapes_multiple_bounds_the_row_counts():
  """Batches of 16 short sentences (~13 pieces) in rows of 24 needed 8 to 14 rows: at the multiple 1 that is 7
  train-step shapes; 3 at the multiple 3. Counts already few (tweets: 8-10 rows at the multiple 2) keep theirs."""
  assert packing.few_shapes_multiple(range(8, 15), 1) == 3
  assert {packing.rounded(n, 3) for n in range(8, 15)} == {9, 12, 15}
  assert packing.few_shapes_multiple(range(8, 15), 2) == 4  # a multiple of the unit (batch shards, processes)
  assert packing.few_shapes_multiple([8, 9, 10, 9], 2) == 2
  assert packing.few_shapes_multiple([7], 1) == 1 and packing.few_shapes_multiple(range(1, 100), 1, most=1) == 99
  assert packing.rows_needed(np.array([9, 3, 14, 7, 7, 2, 16, 5]), 16) == 4


def test_padding_rows_change_no_example_dropout_included():
  """A packed batch with more padding rows (a coarser row multiple) gives each example the same logits and the
  same loss in training mode: dropout's masks for the real rows do not depend on how many rows follow."""
  cfg = tiny_cfg()
  cfg.update(dropout_rate=0.3, attention_dropout_rate=0.3)
  kind = 'pair'
  setup = finetune.task_model_setup(cfg, V, kind, NUM_LABELS[kind], mesh_lib.make_mesh((-1, 1, 1)))
  params = finetune.state_lib.init_params(setup)
  task = tasks.get(kind)
  b = pair_batch()
  keys = [*task.input_keys, 'labels']
  tight, loose = (packing.pack(b, np.arange(8), b['attention_mask'].sum(1), L, m, keys) for m in (1, 7))
  assert tight['input_ids'].shape[0] < loose['input_ids'].shape[0] == 7

  @jax.jit
  def outputs_loss(params, b, key):
    model = nnx.merge(setup.graphdef, params)
    out = model(*(b[k] for k in task.input_keys), dropout_rng=key, **{k: b[k] for k in packing.PACKED_INPUTS})
    return out, task_loss(kind, out, b)[0]

  key = jax.random.key(3)
  out_tight, loss_tight = outputs_loss(params, {k: jnp.asarray(v) for k, v in tight.items()}, key)
  out_loose, loss_loose = outputs_loss(params, {k: jnp.asarray(v) for k, v in loose.items()}, key)
  out_eval, _ = outputs_loss(params, {k: jnp.asarray(v) for k, v in tight.items()}, None)
  assert not np.allclose(out_tight, out_eval, atol=1e-3)  # dropout is on
  np.testing.assert_allclose(out_loose, out_tight, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_loose, loss_tight, rtol=1e-6)


def test_row_multiple_and_settings():
  assert packing.row_multiple(32, 1, 1) == 2
  assert packing.row_multiple(32, 8, 1) == 8
  assert packing.row_multiple(4, 1, 2) == 2
  classification, tagging = tasks.get('classification'), tasks.get('tagging')
  bert = ml_collections.ConfigDict(dict(name='bert', attention_type='full'))
  assert packing.packs('auto', classification, bert) and packing.packs('auto', tasks.get('pair'), bert)
  assert not packing.packs('none', classification, bert)
  assert packing.packs('auto', tagging, bert) and not packing.packs('auto', tasks.get('qa'), bert)
  assert not packing.packs('auto', classification, ml_collections.ConfigDict(dict(name='bert',
                                                                                 attention_type='block_sparse')))
  with pytest.raises(UserError, match='data.packing=.*use auto .* or none'):
    packing.check_setting('yes')


@pytest.mark.parametrize('kind,relative', [('pair', {}), ('regression', {}), ('pair', dict(relative_attention_buckets=8)),
                                           ('pair', dict(position_buckets=4, max_relative_positions=16,
                                                         absolute_positions=False))],
                         ids=['pair', 'regression', 'mpnet', 'deberta'])
def test_packed_batches_give_the_padded_logits_loss_and_gradients(kind, relative):
  """MPNet's relative position bias and DeBERTa's disentangled attention, read at each example's own distances
  within its packed row."""
  cfg = tiny_cfg()
  with cfg.unlocked():
    cfg.update(relative)
  setup = finetune.task_model_setup(cfg, V, kind, NUM_LABELS.get(kind, 1), mesh_lib.make_mesh((-1, 1, 1)))
  params = finetune.state_lib.init_params(setup)
  task = tasks.get(kind)
  padded = pair_batch()
  if kind == 'regression':
    padded['labels'] = padded['labels'].astype(np.float32) / 2
  keys = [*task.input_keys, 'labels']
  packed = packing.pack(padded, np.arange(8), padded['attention_mask'].sum(1), L, 2, keys)
  assert packed['input_ids'].shape[0] < 8  # really packed: several examples share rows

  @jax.jit
  def outputs_loss_grads(params, b):
    def loss(params):
      model = nnx.merge(setup.graphdef, params)
      out = model(*(b[k] for k in task.input_keys), **{k: b[k] for k in packing.PACKED_INPUTS if k in b})
      return task_loss(kind, out, b)[0], out
    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, value, grads

  out_padded, loss_padded, grads_padded = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in padded.items()})
  out_packed, loss_packed, grads_packed = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in packed.items()})
  np.testing.assert_allclose(out_packed, out_padded, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_packed, grads_padded)


def tagging_batch(n=8, seed=2):
  """pair_batch's rows as tagged sentences: a tag (0..2) on some pieces, -1 on [CLS], the last piece and padding;
  `word_mask` 1 where a tag is."""
  b = pair_batch(n, seed)
  rng = np.random.default_rng(seed)
  lengths = b['attention_mask'].sum(1)
  inside = (np.arange(L)[None] >= 1) & (np.arange(L)[None] < lengths[:, None] - 1)
  tagged = inside & (rng.random((n, L)) < 0.7)
  b.update(token_type_ids=np.zeros_like(b['token_type_ids']), word_mask=tagged.astype(np.int32),
           labels=np.where(tagged, rng.integers(0, 3, (n, L)), -1).astype(np.int32))
  return b


def test_tagging_packs_its_per_token_labels_with_their_tokens():
  b = tagging_batch()
  lengths = b['attention_mask'].sum(1)
  keys = ['input_ids', 'token_type_ids', 'attention_mask', 'position_ids', 'pool_positions', 'labels', 'word_mask']
  packed = packing.pack(b, np.arange(8), lengths, L, 2, keys)
  assert packed['labels'].shape == packed['input_ids'].shape == packed['word_mask'].shape
  for i, at in enumerate(packed['pool_positions']):
    n = lengths[i]
    np.testing.assert_array_equal(packed['labels'].reshape(-1)[at:at + n], b['labels'][i, :n])
    np.testing.assert_array_equal(packed['word_mask'].reshape(-1)[at:at + n], b['word_mask'][i, :n])
  padding = packed['attention_mask'] == 0
  assert (packed['labels'][padding] == -1).all() and (packed['word_mask'][padding] == 0).all()
  assert (packed['labels'] >= 0).sum() == (b['labels'] >= 0).sum()


def test_packed_tagging_gives_the_padded_logits_loss_and_gradients():
  setup = finetune.task_model_setup(tiny_cfg(), V, 'tagging', NUM_LABELS['tagging'], mesh_lib.make_mesh((-1, 1, 1)))
  params = finetune.state_lib.init_params(setup)
  task = tasks.get('tagging')
  padded = tagging_batch()
  lengths = padded['attention_mask'].sum(1)
  packed = packing.pack(padded, np.arange(8), lengths, L, 2, [*task.input_keys, 'labels'])
  assert packed['input_ids'].shape[0] < 8

  @jax.jit
  def outputs_loss_grads(params, b):
    def loss(params):
      model = nnx.merge(setup.graphdef, params)
      out = model(*(b[k] for k in task.input_keys), **{k: b[k] for k in packing.PACKED_INPUTS if k in b})
      return task_loss('tagging', out, b)[0], out
    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, value, grads

  out_padded, loss_padded, grads_padded = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in padded.items()})
  out_packed, loss_packed, grads_packed = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in packed.items()})
  flat = np.asarray(out_packed).reshape(-1, out_packed.shape[-1])
  for i, at in enumerate(packed['pool_positions']):  # each sentence's tokens, where the packing put them
    np.testing.assert_allclose(flat[at:at + lengths[i]], out_padded[i, :lengths[i]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_packed, loss_padded, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_packed, grads_padded)

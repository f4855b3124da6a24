"""Fine-tuning batches cut to length buckets compute what the padded batches compute: the same outputs at every
real position, the same loss and gradients (train/length_buckets.py), and the predictor gives back every row's
outputs in order, per-token outputs padded to the full length."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl import tasks
from jaxssl.errors import UserError
from jaxssl.tasks.model import task_loss
from jaxssl.train import finetune, length_buckets, predict
from test_heads import NUM_LABELS, V, tiny_cfg

L = 32


def test_bucket_lengths_auto_none_and_lists():
  assert length_buckets.bucket_lengths('auto', 128) == (16, 32, 64, 128)
  assert length_buckets.bucket_lengths('auto', 384) == (48, 96, 192, 384)
  assert length_buckets.bucket_lengths('auto', 24) == (16, 24)
  assert length_buckets.bucket_lengths('none', 128) == (128,)
  assert length_buckets.bucket_lengths('64, 32,500', 128) == (32, 64, 128)


def test_dev_and_evaluate_batches_are_cut_finer_on_cpu(monkeypatch):
  """eval_lengths: on CPU, 'auto' gives every multiple of seq_len/16 (forward programs compile in about a second
  there); elsewhere, or another setting, the training buckets. describe: what the banner says."""
  assert length_buckets.eval_lengths('auto', 128) == tuple(range(8, 129, 8))
  assert length_buckets.eval_lengths('auto', 384) == tuple(range(24, 385, 24))
  assert length_buckets.eval_lengths('auto', 100) == (*range(8, 100, 8), 100)
  assert length_buckets.eval_lengths('auto', 24) == (8, 16, 24)
  assert length_buckets.eval_lengths('none', 128) == (128,)
  assert length_buckets.eval_lengths('32,64', 128) == (32, 64, 128)
  assert length_buckets.describe(length_buckets.eval_lengths('auto', 128)) == 'multiples of 8 to 128'
  assert length_buckets.describe(length_buckets.eval_lengths('auto', 100)) == 'multiples of 8 to 100'
  assert length_buckets.describe((16, 32, 64, 128)) == '16/32/64/128'
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(length_buckets.jax, 'default_backend', lambda backend=backend: backend)
    assert length_buckets.eval_lengths('auto', 128) == (16, 32, 64, 128)
  for bad in ('0,64', 'short', ''):
    with pytest.raises(UserError, match='data.length_buckets'):
      length_buckets.bucket_lengths(bad, 128)


def batch(kind, seed=0, n=8):
  """`n` rows of lengths 5..20 (padded to L) with the kind's labels."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, 21, n)
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  out = dict(input_ids=rng.integers(1, V, (n, L)) * mask, token_type_ids=np.zeros((n, L), np.int32),
             attention_mask=mask)
  if kind == 'classification':
    out['labels'] = rng.integers(0, 3, n).astype(np.int32)
  elif kind == 'tagging':
    out['labels'] = np.where(mask == 1, rng.integers(0, 3, (n, L)), -1).astype(np.int32)
  else:
    out['context_mask'] = mask * (np.arange(L)[None] >= 2)
    out['start_positions'], out['end_positions'] = np.full(n, 2, np.int32), np.full(n, 3, np.int32)
  return out


@pytest.mark.parametrize('kind', ['classification', 'tagging', 'qa'])
def test_cut_batches_give_the_padded_outputs_loss_and_gradients(kind):
  setup = finetune.task_model_setup(tiny_cfg(), V, kind, NUM_LABELS[kind], mesh_lib.make_mesh((-1, 1, 1)))
  params = finetune.state_lib.init_params(setup)
  task = tasks.get(kind)

  @jax.jit
  def outputs_loss_grads(params, b):
    def loss(params):
      model = nnx.merge(setup.graphdef, params)
      out = model(*(b[k] for k in task.input_keys), **{k: b[k] for k in task.model_inputs})
      return task_loss(kind, out, b)[0], out
    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return out, value, grads

  full = batch(kind)
  length = length_buckets.batch_length(length_buckets.real_lengths(full), np.arange(8),
                                       length_buckets.bucket_lengths('16,24', L))
  assert length == 24  # rows up to 20 tokens: the bucket of 24
  cut = length_buckets.cut(full, length, L)
  assert all(v.shape == (8, length) if full[k].ndim == 2 else v.shape == (8,) for k, v in cut.items())
  out_full, loss_full, grads_full = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in full.items()})
  out_cut, loss_cut, grads_cut = outputs_loss_grads(params, {k: jnp.asarray(v) for k, v in cut.items()})
  np.testing.assert_allclose(loss_cut, loss_full, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_cut, grads_full)
  if task.token_outputs:  # every real position; the cut ones are padding
    out_full = jax.tree.map(lambda x: x[:, :length], out_full)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), out_cut, out_full)


def test_bucketed_predictor_returns_rows_in_order_with_padded_token_outputs():
  kind = tasks.get('tagging')
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  setup = finetune.task_model_setup(tiny_cfg(), V, 'tagging', 3, mesh)
  params = finetune.state_lib.init_params(setup)
  rows = batch('tagging', seed=1, n=13)
  rows['input_ids'][3], rows['attention_mask'][3] = 7, 1  # one row of the full length: its batch is not cut
  padded = predict.make_predictor(setup, mesh, rows, 8, kind)(params, rows)
  bucketed = predict.make_predictor(setup, mesh, rows, 8, kind, (16, 24, L))(params, rows)
  real = rows['attention_mask'] == 1
  assert bucketed.shape == padded.shape == (13, L, 3)
  np.testing.assert_allclose(bucketed[real], padded[real], rtol=1e-5, atol=1e-5)
  # Shortest first, 8 rows a batch (as many as devices here): the first batch holds the 8 shortest rows (at most
  # 20 long), cut to 16 or 24, where the rest is the pad logit; the second holds row 3, so it is not cut.
  shortest = np.argsort(rows['attention_mask'].sum(1), kind='stable')[:8]
  assert (bucketed[shortest, 24:] == length_buckets.PAD_LOGIT).all()


def test_fewest_cost_lengths_is_the_cheapest_subset():
  """fewest_cost_lengths keeps the subset of the needed lengths (always the longest) whose padded tokens plus
  `worth` a kept length cost least: the same as trying every subset; no worth keeps them all."""
  import itertools
  rng = np.random.default_rng(0)

  def cost(kept, needed, rows, worth):
    return sum(rows * next(k for k in kept if k >= n) for n in needed) + worth * len(kept)

  for _ in range(60):
    needed = sorted(rng.choice(range(8, 129, 8), size=int(rng.integers(1, 9))))
    rows, worth = int(rng.integers(1, 64)), float(rng.choice([0.0, 50.0, 500.0, 5000.0, 1e6]))
    kept = length_buckets.fewest_cost_lengths(needed, rows, worth)
    distinct = sorted(set(int(n) for n in needed))
    assert kept[-1] == distinct[-1] and set(kept) <= set(distinct)
    subsets = [(*s, distinct[-1]) for r in range(len(distinct)) for s in itertools.combinations(distinct[:-1], r)]
    assert cost(kept, needed, rows, worth) == min(cost(s, needed, rows, worth) for s in subsets)
  assert length_buckets.fewest_cost_lengths([24, 32, 40, 48, 72], 64, 0.0) == (24, 32, 40, 48, 72)
  assert length_buckets.fewest_cost_lengths([24, 32, 40, 48, 72], 64, 1e6) == (72,)


def test_compile_worth_weighs_the_body_and_the_runs(monkeypatch):
  """compile_worth: fewer tokens for a bigger body (each costs more), divided by the runs; 0 off CPU."""
  small, big = tiny_cfg(), tiny_cfg()
  with big.unlocked():
    big.hidden_size, big.intermediate_size = 4 * small.hidden_size, 4 * small.intermediate_size
  once, five = (length_buckets.compile_worth(small, V, L, runs) for runs in (1, 5))
  assert once > length_buckets.compile_worth(big, V, L, 1) > 0 and five == pytest.approx(once / 5)
  monkeypatch.setattr(length_buckets.jax, 'default_backend', lambda: 'gpu')
  assert length_buckets.compile_worth(small, V, L, 1) == 0.0


def test_predictor_shares_lengths_when_a_compile_costs_more_than_the_padding(monkeypatch):
  """With compile_worth, batches that needed different lengths run at fewer (here one: the longest), and every
  row's outputs equal the padded computation's."""
  kind = tasks.get('classification')
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  setup = finetune.task_model_setup(tiny_cfg(), V, 'classification', NUM_LABELS['classification'], mesh)
  params = finetune.state_lib.init_params(setup)
  rows = batch('classification', seed=2, n=24)
  cut_to, cut = [], length_buckets.cut
  monkeypatch.setattr(length_buckets, 'cut', lambda b, length, seq_len: cut_to.append(length) or cut(b, length, seq_len))
  lengths = tuple(range(8, L + 1, 8))
  every = predict.make_predictor(setup, mesh, rows, 8, kind, lengths)(params, rows)
  needed = sorted(set(cut_to))
  cut_to.clear()
  shared = predict.make_predictor(setup, mesh, rows, 8, kind, lengths, 1e9)(params, rows)
  assert len(needed) > 1 and set(cut_to) == {needed[-1]}, (needed, cut_to)
  padded = predict.make_predictor(setup, mesh, rows, 8, kind)(params, rows)
  np.testing.assert_allclose(shared, padded, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(every, padded, rtol=1e-5, atol=1e-5)

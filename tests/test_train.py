"""Train step: schedule, weight-decay mask, accumulation == full batch, sharded (2,2,2) == one device."""
import jax
import numpy as np
import pytest

from jaxssl import bench
from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl.families import bert as bert_family
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib

VOCAB = 128  # divisible by the tensor axis, so the vocabulary is really sharded


def tiny_config(**train):
  config = config_lib.load_config('configs/bert.py:tiny')
  config_lib.parse_overrides(config, [
      '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
      '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=24',
      '--config.data.max_predictions=5', f'--config.tokenizer.vocab_size={VOCAB}', '--config.train.batch_size=8',
      '--config.train.warmup_steps=3', '--config.train.steps=20'] + [f'--config.train.{k}={v}' for k, v in train.items()])
  return config


def run_steps(config, mesh, n, *, dropout=True):
  if not dropout:
    with config.unlocked():
      config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  setup = state_lib.setup_model(config.model, VOCAB, mesh, 0)
  tx, schedule = state_lib.make_optimizer(config.train), state_lib.make_schedule(config.train)
  state = state_lib.init_state(setup, tx)
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, config.train.microbatches, bert_family.OBJECTIVE),
      state_lib.state_shardings(setup, tx), mesh, bert_family.OBJECTIVE)
  losses = []
  with jax.set_mesh(mesh):
    for i in range(n):
      batch = mesh_lib.global_batch(bench.synthetic_batch(config, VOCAB, seed=i), mesh)
      state, metrics = train_step(state, batch)
      losses.append(float(metrics['loss']))
  return losses, jax.device_get(state['params'])


def test_schedule_is_linear_warmup_then_linear_decay():
  config = tiny_config(learning_rate=1.0, warmup_steps=4, steps=12)
  schedule = state_lib.make_schedule(config.train)
  assert [float(schedule(s)) for s in (0, 2, 4, 8, 12)] == pytest.approx([0.0, 0.5, 1.0, 0.5, 0.0])


@pytest.mark.parametrize('max_norm', [0.5, 100.0])  # clipping and not
def test_clip_by_global_norm_equals_optax(max_norm):
  import optax  # noqa: PLC0415
  grads = {'a': np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), 'b': np.full((5,), 0.3, np.float32)}
  ours, state = jax.jit(state_lib.clip_by_global_norm(max_norm).update)(grads, optax.EmptyState())
  ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), ours, ref)
  assert state == optax.EmptyState()
  assert float(optax.tree.norm(ours)) == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)


def test_no_weight_decay_on_biases_and_layernorm():
  config = tiny_config()
  setup = state_lib.setup_model(config.model, VOCAB, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  mask = state_lib.decay_mask(setup.abstract_params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(flat.values()) and not all(flat.values())
  for path, decayed in flat.items():
    excluded = "['bias']" in path or 'norm' in path.lower()
    assert decayed == (not excluded), path


def test_gradient_accumulation_equals_full_batch():
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  full_losses, full = run_steps(tiny_config(microbatches=1), mesh, 3, dropout=False)
  acc_losses, acc = run_steps(tiny_config(microbatches=4), mesh, 3, dropout=False)
  np.testing.assert_allclose(acc_losses, full_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), acc, full)


def test_sharded_2x2x2_equals_one_device_over_20_steps():
  one, _ = run_steps(tiny_config(), mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), 20)
  sharded, _ = run_steps(tiny_config(), mesh_lib.make_mesh((2, 2, 2)), 20)
  np.testing.assert_allclose(sharded, one, rtol=1e-5)
  assert len(set(one)) > 1 and np.isfinite(one).all()


@pytest.mark.parametrize('vocab,shape', [(128, (2, 2, 2)), (300, (2, 2, 2)), (300, (1, 4, 2)), (101, (2, 2, 2))])
def test_sharded_gradients_equal_one_device(vocab, shape):
  """Gradients, not just losses: a partitioning bug can leave the loss right and the gradients wrong."""
  config = tiny_config()
  with config.unlocked():
    config.model.dropout_rate = config.model.attention_dropout_rate = 0.0
  batch = bench.synthetic_batch(config, vocab)

  def grads(mesh):
    setup = state_lib.setup_model(config.model, vocab, mesh, 0)
    params = state_lib.init_params(setup)
    def loss(p, b):
      sums = bert_family.bert_sums(setup.graphdef, p, b, None)
      return sums['mlm_loss'] / sums['mlm_count'] + sums['nsp_loss'] / sums['nsp_count']
    with jax.set_mesh(mesh):
      return jax.device_get(jax.jit(jax.grad(loss))(params, mesh_lib.global_batch(batch, mesh)))

  one = grads(mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  sharded = grads(mesh_lib.make_mesh(shape))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), one, sharded)


def test_params_are_sharded_by_the_rules():
  config = tiny_config()
  setup = state_lib.setup_model(config.model, VOCAB, mesh_lib.make_mesh((2, 2, 2)))
  specs = {jax.tree_util.keystr(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(setup.param_shardings)}
  assert any('fsdp' in str(s) for s in specs.values()) and any('tensor' in str(s) for s in specs.values())


def test_nonfinite_skip_keeps_params_and_stops_after_too_many_in_a_row():
  """train.nonfinite='skip': a NaN gradient leaves params and moments as they were; the loop's check stops the
  run (JobFailed naming the step) only after max_skipped_steps non-finite losses in a row."""
  import jax.numpy as jnp
  import optax
  from jaxssl.errors import JobFailed
  from jaxssl.train import nonfinite
  from jaxssl.train import state as state_lib
  config = config_lib.load_config('configs/bert.py:tiny')
  config_lib.parse_overrides(config, ['--config.train.nonfinite=skip', '--config.train.warmup_steps=0'])
  tx = state_lib.make_optimizer(config.train)
  params = {'w': jnp.ones(3)}
  opt_state = tx.init(params)
  updates, opt_state = tx.update({'w': jnp.array([1.0, jnp.nan, 1.0])}, opt_state, params)
  np.testing.assert_array_equal(optax.apply_updates(params, updates)['w'], params['w'])
  updates, opt_state = tx.update({'w': jnp.ones(3)}, opt_state, params)
  assert np.all(np.isfinite(optax.apply_updates(params, updates)['w']))

  class Kept:
    def latest_step(self):
      return 7

  class Writer:
    def __init__(self):
      self.logged, self.records = [], []

    def log(self, message):
      self.logged.append(message)

    def write(self, step, record):
      self.records.append({'step': step, **record})

    def flush(self):
      pass

  writer = Writer()
  logged = writer.logged
  check = nonfinite.FiniteLossCheck('skip', 2, Kept(), writer)
  check.check(8, {'loss': np.float32(1.0)})
  check.check(9, {'loss': np.float32(np.nan)})
  check.check(10, {'loss': np.float32(np.inf)})
  check.check(11, {'loss': np.float32(2.0)})  # a finite loss resets the count
  check.check(12, {'loss': np.float32(np.nan)})
  check.check(13, {'loss': np.float32(np.nan)})
  with pytest.raises(JobFailed, match='non-finite for 3 steps in a row up to step 14; the newest checkpoint is step 7'):
    check.check(14, {'loss': np.float32(np.nan)})
  assert len(logged) == 5 and 'update skipped' in logged[0]
  assert [(r['step'], r['value'], r['action']) for r in writer.records] == [
      (9, 'nan', 'update skipped'), (10, 'inf', 'update skipped'), (12, 'nan', 'update skipped'),
      (13, 'nan', 'update skipped'), (14, 'nan', 'stopped')]
  with pytest.raises(JobFailed, match='the loss is nan at step 3'):
    nonfinite.FiniteLossCheck('stop', 2, Kept(), Writer()).check(3, {'loss': np.float32(np.nan)})


def test_check_compatible_knows_the_llama_shape_keys():
  """A workdir of another architecture is refused by name; a config written before the keys existed still fits."""
  from jaxssl.config import load_config
  from jaxssl.errors import UserError
  from jaxssl.train import checkpoint as ckpt_lib
  gpt2 = load_config('configs/gpt.py:tiny')
  old = {k: v for k, v in gpt2.model.to_dict().items()
         if k not in ('norm', 'position', 'mlp', 'num_kv_heads', 'head_dim', 'tie_embeddings', 'use_bias',
                      'attention_bias', 'rope_theta', 'rope_scaling')}
  ckpt_lib.check_compatible({'model': old}, gpt2.model, 4000, 'w')
  llama = load_config('configs/gpt.py:llama_tiny')
  ckpt_lib.check_compatible({'model': llama.model.to_dict()}, llama.model, 4000, 'w')
  with pytest.raises(UserError, match=r"model.norm: 'layernorm' there, 'rmsnorm' here; model.position: 'learned' there, 'rope' here"):
    ckpt_lib.check_compatible({'model': old}, llama.model, 4000, 'w')


def test_frozen_params_do_not_move_even_with_weight_decay():
  """make_optimizer(frozen=...) leaves frozen params exactly as they were (AdamW's decay alone would shrink them)."""
  import jax.numpy as jnp
  import ml_collections
  import optax
  from jaxssl.train import state as state_lib
  tc = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_steps=0, steps=10, end_learning_rate=0.1,
                                      weight_decay=0.5, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0))
  params = {'body': {'lstm': {'kernel': jnp.ones((2, 2))}, 'scalar_mix': {'weights': jnp.ones((3,))}},
            'head': {'kernel': jnp.ones((2, 2))}}
  tx = state_lib.make_optimizer(tc, lambda path: path[0] == 'body' and 'scalar_mix' not in path)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['body']['lstm']['kernel'], params['body']['lstm']['kernel'])
  assert not np.allclose(new['head']['kernel'], params['head']['kernel'])
  assert not np.allclose(new['body']['scalar_mix']['weights'], params['body']['scalar_mix']['weights'])


@pytest.mark.parametrize('microbatches', [1, 4])
def test_checkpoint_check_is_the_next_steps_loss(microbatches):
  """The check a checkpoint must pass computes, forward only, the loss the next train step logs from that state on
  its batch (same dropout keys and microbatches), and says whether the params and moments are finite."""
  config = tiny_config(microbatches=microbatches)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  setup = state_lib.setup_model(config.model, VOCAB, mesh, 0)
  tx, schedule = state_lib.make_optimizer(config.train), state_lib.make_schedule(config.train)
  shardings = state_lib.state_shardings(setup, tx)
  objective = bert_family.OBJECTIVE
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, microbatches, objective), shardings, mesh, objective)
  check = step_lib.jit_checkpoint_check(step_lib.make_checkpoint_check(setup.graphdef, microbatches, objective),
                                        shardings, mesh, objective)
  state = state_lib.init_state(setup, tx)
  with jax.set_mesh(mesh):
    for i in range(3):
      batch = mesh_lib.global_batch(bench.synthetic_batch(config, VOCAB, seed=i), mesh)
      predicted, finite = check(state, batch)  # before the step donates `state`
      predicted, finite = float(predicted), bool(finite)
      state, metrics = train_step(state, batch)
      assert finite and predicted == pytest.approx(float(metrics['loss']), rel=1e-6)
    broken = dict(state, params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(np.nan), state['params']))
    assert not bool(check(broken, batch)[1])


def test_all_finite_finds_any_nan_or_infinity():
  """step.all_finite (the checkpoint check's test of params and moments): False for a NaN, +inf or -inf in any
  float leaf of any dtype, True otherwise; integer and empty leaves are ignored."""
  import jax.numpy as jnp
  check = jax.jit(step_lib.all_finite)
  tree = {'w': jnp.ones((3, 4)) * -1e30, 'b': jnp.zeros((5,), jnp.bfloat16), 'step': jnp.int32(7),
          'empty': jnp.zeros((0, 3))}
  assert bool(check(tree)) and bool(check({'step': jnp.int32(1)}))
  for key, bad in [('w', np.nan), ('w', np.inf), ('b', -np.inf), ('b', np.nan)]:
    broken = dict(tree, **{key: tree[key].at[-1].set(bad)})
    assert not bool(check(broken)), (key, bad)

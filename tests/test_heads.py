"""Fine-tuning heads (shapes, loading a pre-trained body, losses vs numpy, QA masking, overfitting) and QA decoding
(best span vs brute force, windows, answers mapped back to the context text)."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.special import log_softmax

from jaxssl.config import load_config
from jaxssl.errors import UserError
from jaxssl.families import build_model
from jaxssl.mesh import LOGICAL_AXIS_RULES
from jaxssl import tasks
from jaxssl.tasks import KINDS
from jaxssl.tasks.base import INPUT_KEYS
from jaxssl.tasks import qa_decoding as qa
from jaxssl.tasks.model import TaskModel, summarize_task, task_loss
from jaxssl.tasks.qa import QA_MASK_VALUE

V, B, L, C = 50, 4, 16, 3
NUM_LABELS = {'classification': C, 'pair': C, 'regression': 1, 'tagging': C, 'qa': 2}


def tiny_cfg():
  c = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'bert.py') + ':tiny').model
  c.update(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_position=32)
  return c


def task_model(kind, num_labels, seed=0):
  """A tiny BERT body and a new head of `kind`, both from params seed `seed` (as the fine-tune job builds it)."""
  rngs = nnx.Rngs(params=seed)
  return TaskModel(build_model(tiny_cfg(), V, rngs=rngs), kind=kind, num_labels=num_labels, rngs=rngs)


@functools.cache  # never mutated below except by the optimizer test, which works on a split copy
def make(kind, seed=0):
  return task_model(kind, NUM_LABELS[kind], seed)


def make_batch(kind, seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([L, 12, 9, 14])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, V, (B, L)) * mask
  types = (np.arange(L)[None] >= (lengths // 2)[:, None]).astype(np.int32) * mask
  batch = dict(input_ids=ids, token_type_ids=types, attention_mask=mask)
  if kind in ('classification', 'pair'):
    batch['labels'] = np.array([0, 2, 1, 2])
  elif kind == 'regression':
    batch['labels'] = np.array([0.5, -1.0, 2.0, 1.5], np.float32)
  elif kind == 'tagging':
    labels = rng.integers(0, C, (B, L))
    labels[:, 0] = -1
    labels[mask == 0] = -1
    labels[:, 3] = -1  # e.g. non-first word pieces
    batch['labels'] = labels
  else:  # context = the token-type-1 part without the final token, as [CLS] q [SEP] context [SEP]
    batch['context_mask'] = types * (np.arange(L)[None] < (lengths - 1)[:, None])
    batch['start_positions'] = lengths // 2 + 1
    batch['end_positions'] = lengths // 2 + np.array([2, 1, 3, 1])
  return {k: jnp.asarray(v) for k, v in batch.items()}


def apply(model, batch, key=None, use_context_mask=True):
  inputs = {k: batch[k] for k in ('input_ids', 'token_type_ids', 'attention_mask')}
  return model(**inputs, dropout_rng=key, context_mask=batch.get('context_mask') if use_context_mask else None)


@functools.partial(jax.jit, static_argnums=0)
def _forwards(graphdef, state, batch, key):
  """Eval outputs, outputs under dropout `key` (if any), and (qa) eval outputs without a context mask."""
  model = nnx.merge(graphdef, state)
  out = {'eval': apply(model, batch)}
  if key is not None:
    out['dropout'] = apply(model, batch, key)
  if 'context_mask' in batch:
    out['no_context_mask'] = apply(model, batch, use_context_mask=False)
  return out


@functools.cache
def forwards(kind, seed=3):
  """One compile per kind (eager application of the scanned layers is slow on CPU); `seed` of the dropout key.

  Dropout only for classification (the pooled path) and qa (the sequence path): it doubles the CPU compile time.
  """
  key = jax.random.key(seed) if kind in ('classification', 'qa') else None
  return _forwards(*nnx.split(make(kind)), make_batch(kind), key)


# pair: same module as classification; the image and audio kinds put their heads on a ViT / wav2vec2 body
# (tests/test_images.py, tests/test_speech.py)
@pytest.mark.parametrize('kind', [k for k in KINDS if k != 'pair' and tasks.get(k).input_keys == INPUT_KEYS])
def test_shapes_dtypes_dropout_and_axis_names(kind):
  model, outs = make(kind), forwards(kind)
  out = outs['eval']
  want = {'classification': (B, C), 'pair': (B, C), 'regression': (B,), 'tagging': (B, L, C)}
  for o in (out if kind == 'qa' else [out]):
    assert o.shape == want.get(kind, (B, L)) and o.dtype == jnp.float32
  if 'dropout' in outs:
    for other in (forwards(kind, seed=4)['dropout'], out):  # dropout is on under a key, and the key matters
      assert not any(np.allclose(x, y) for x, y in zip(jax.tree.leaves(outs['dropout']), jax.tree.leaves(other)))
  if kind == 'classification':
    assert make('pair').head.kernel.shape == model.head.kernel.shape == (32, C)
  names = {n for v in jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
           for n in (v.get_metadata().get('out_sharding') or ()) if n}
  assert names <= {name for name, _ in LOGICAL_AXIS_RULES}
  assert model.head.kernel.get_metadata()['out_sharding'] == ('embed', 'classes')


def test_bad_kind_and_num_labels():
  for kind, n, match in [('sentiment', 2, 'task.kind'), ('classification', 0, 'num_labels'),
                         ('tagging', -1, 'num_labels'), ('regression', 2, 'num_labels=1')]:
    with pytest.raises(UserError, match=match):
      task_model(kind, n)
  with pytest.raises(UserError, match='task.kind'):
    task_loss('ner', None, {})


def test_body_loads_pretrained_params_and_head_stays_new():
  pre = build_model(tiny_cfg(), V, rngs=nnx.Rngs(params=7))  # stands in for an exported pretraining model
  model = task_model('classification', C)
  head_before = jax.tree.map(np.array, nnx.state(model.head))
  exported = nnx.state(pre, nnx.Param)
  assert jax.tree.structure(nnx.state(model.body, nnx.Param)) == jax.tree.structure(exported)
  nnx.update(model.body, exported)
  for got, want in zip(jax.tree.leaves(nnx.state(model.body, nnx.Param)), jax.tree.leaves(exported)):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(jax.tree.leaves(nnx.state(model.head)), jax.tree.leaves(head_before)):
    np.testing.assert_array_equal(got, want)
  batch = make_batch('classification')
  _, pooled = pre.encode(batch['input_ids'], batch['token_type_ids'], batch['attention_mask'])
  want = pooled @ model.head.kernel[...] + model.head.bias[...]
  np.testing.assert_allclose(apply(model, batch), want, rtol=1e-5, atol=1e-6)


def _np_ce(logits, labels):
  return -np.take_along_axis(log_softmax(logits, -1), labels[..., None], -1)[..., 0]


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(B, C)).astype(np.float32)
  labels = np.array([0, 2, -1, 1])
  weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
  loss, sums = task_loss('pair', jnp.asarray(logits), {'labels': labels, 'example_weights': weights})
  np.testing.assert_allclose(loss, _np_ce(logits[:2], labels[:2]).mean(), rtol=1e-6)
  assert sums['count'] == 2 and sums['correct'] == np.sum(logits[:2].argmax(-1) == labels[:2])

  pred, target = rng.normal(size=B).astype(np.float32), rng.normal(size=B).astype(np.float32)
  loss, _ = task_loss('regression', jnp.asarray(pred), {'labels': target})
  np.testing.assert_allclose(loss, np.mean((pred - target) ** 2), rtol=1e-6)

  tag_logits = rng.normal(size=(B, L, C)).astype(np.float32)
  tags = rng.integers(-1, C, (B, L))
  label_weights = (rng.random((B, L)) > 0.2).astype(np.float32)
  keep = (tags >= 0) & (label_weights > 0)
  loss, sums = task_loss('tagging', jnp.asarray(tag_logits), {'labels': tags, 'label_weights': label_weights})
  np.testing.assert_allclose(loss, _np_ce(tag_logits[keep], tags[keep]).mean(), rtol=1e-5)
  assert sums['count'] == keep.sum()
  assert sums['correct'] == np.sum(tag_logits[keep].argmax(-1) == tags[keep])

  s, e = rng.normal(size=(2, B, L)).astype(np.float32)
  starts, ends = np.array([1, 5, 3, 0]), np.array([2, 5, 7, 0])
  loss, sums = task_loss('qa', (jnp.asarray(s), jnp.asarray(e)), {'start_positions': starts, 'end_positions': ends})
  np.testing.assert_allclose(loss, np.mean((_np_ce(s, starts) + _np_ce(e, ends)) / 2), rtol=1e-6)
  np.testing.assert_allclose(summarize_task(sums)['loss'], loss, rtol=1e-6)
  # Everything ignored: 0, not NaN.
  loss, _ = task_loss('tagging', jnp.asarray(tag_logits), {'labels': np.full((B, L), -1)})
  assert loss == 0.0


def test_qa_masking_gives_zero_probability_outside_context():
  outs, batch = forwards('qa'), make_batch('qa')
  for start, end in (outs['eval'], outs['dropout']):
    for logits in (start, end):
      probs = np.asarray(jax.nn.softmax(logits, -1))
      outside = np.asarray(batch['context_mask']) == 0
      assert np.all(probs[outside] == 0.0) and np.all(probs[~outside] > 0.0)
      np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  # Without a context mask only padding is excluded.
  start, _ = outs['no_context_mask']
  np.testing.assert_array_equal(np.asarray(start) == QA_MASK_VALUE, np.asarray(batch['attention_mask']) == 0)


@pytest.mark.parametrize('kind', ['classification', 'regression', 'tagging', 'qa'])
def test_a_few_adam_steps_overfit_a_fixed_batch(kind):
  graphdef, params, rest = nnx.split(make(kind), nnx.Param, ...)
  batch = make_batch(kind)
  tx = optax.adam(3e-3)

  def loss_fn(p, key):
    return task_loss(kind, apply(nnx.merge(graphdef, p, rest), batch, key), batch)[0]

  @jax.jit
  def step(p, opt_state):  # dropout off: deterministic, and it halves the compile time on CPU
    loss, grads = jax.value_and_grad(loss_fn)(p, None)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for _ in range(30):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  first, last = losses[0], losses[-1]
  assert last < 0.25 * first, (kind, first, last)


def _brute_best_span(s, e, mask, max_len, start_ok=None):
  best = (-1, -1, -np.inf)
  for i in range(len(s)):
    for j in range(i, min(len(s), i + max_len)):
      if mask[i] and mask[j] and (start_ok is None or start_ok[i]) and s[i] + e[j] > best[2]:
        best = (i, j, s[i] + e[j])
  return best


def test_best_span_matches_brute_force():
  rng = np.random.default_rng(0)
  for trial in range(200):
    n = int(rng.integers(1, 20))
    s, e = rng.normal(size=(2, n))
    mask = rng.random(n) < 0.7
    start_ok = rng.random(n) < 0.8 if trial % 2 else None
    max_len = int(rng.integers(1, 6))
    i, j, score = qa.best_span(s, e, mask, max_len, start_mask=start_ok)
    bi, bj, bscore = _brute_best_span(s, e, mask, max_len, start_ok)
    assert (i, j) == (bi, bj) and (score == bscore or np.isclose(score, bscore))
    if i >= 0:
      assert i <= j and j - i + 1 <= max_len and mask[i] and mask[j]
  s, e = rng.normal(size=(2, B, L))
  mask = rng.random((B, L)) < 0.6
  starts, ends, scores = qa.best_spans(s, e, mask, 4)
  for b in range(B):
    assert (starts[b], ends[b]) == _brute_best_span(s[b], e[b], mask[b], 4)[:2]


def _run_squad_windows(n, max_tokens, stride):
  """BERT run_squad.py's doc_spans loop, verbatim in spirit."""
  spans, start = [], 0
  while start < n:
    length = min(n - start, max_tokens)
    spans.append((start, length))
    if start + length == n:
      break
    start += min(length, stride)
  return spans


def test_windows_cover_the_context_with_stride_overlaps():
  assert qa.make_windows(0, 8, 4) == [(0, 0)]
  assert qa.make_windows(10, 4, 2) == [(0, 4), (2, 4), (4, 4), (6, 4)]
  assert qa.make_windows(5, 8, 3) == [(0, 5)]
  for n in range(1, 60):
    for max_tokens, stride in [(8, 3), (8, 8), (5, 9), (7, 1)]:
      windows = qa.make_windows(n, max_tokens, stride)
      assert windows == _run_squad_windows(n, max_tokens, stride)
      assert windows[0][0] == 0 and sum(windows[-1]) == n
      assert all(0 < length <= max_tokens for _, length in windows)
      for (o1, l1), (o2, _) in zip(windows, windows[1:]):
        assert o2 - o1 == min(stride, max_tokens) and o2 <= o1 + l1  # no gap; overlap max_tokens - stride
  with pytest.raises(UserError, match='stride'):
    qa.make_windows(10, 4, 0)


def test_max_context_rule_matches_run_squad():
  windows = qa.make_windows(23, 8, 3)
  masks = qa.max_context_masks(windows)
  for t in range(23):
    scores = [min(t - o, o + n - 1 - t) + 0.01 * n if o <= t < o + n else -np.inf for o, n in windows]
    owner = int(np.argmax(scores))
    assert [bool(m[t - o]) if o <= t < o + n else False for m, (o, n) in zip(masks, windows)] == [
        w == owner for w in range(len(windows))]


def test_answer_mapped_back_to_exact_substring_across_windows():
  words = [f'w{i}' + ('.' if i % 5 == 4 else '') for i in range(30)]
  context = '  '.join(words[:10]) + '\n' + ' '.join(words[10:])
  offsets, pos = [], 0
  for w in words:
    pos = context.index(w, pos)
    offsets.append((pos, pos + len(w)))
    pos += len(w)
  windows = qa.make_windows(len(words), 10, 4)
  prefix = 3  # [CLS] q [SEP] before each window's context in the feature
  rng = np.random.default_rng(0)
  for gold_start, gold_end in [(8, 11), (17, 17), (26, 29), (0, 1)]:
    logits = []
    for offset, length in windows:
      s, e = rng.normal(0, 0.1, (2, prefix + length + 1))
      s[:prefix] = e[:prefix] = 50.0  # question tokens must be ignored
      for k in range(length):
        s[prefix + k] += 5.0 * (offset + k == gold_start)
        e[prefix + k] += 5.0 * (offset + k == gold_end)
      logits.append((s, e))
    for max_context in (True, False):
      ans = qa.best_answer_over_windows(logits, windows, offsets, context, 5, max_context=max_context,
                                        context_starts=[prefix] * len(windows))
      want = context[offsets[gold_start][0]:offsets[gold_end][1]]
      assert ans.text == want and (ans.char_start, ans.char_end) == (offsets[gold_start][0], offsets[gold_end][1])
      assert ans.text.startswith(words[gold_start]) and ans.text.endswith(words[gold_end])
  assert qa.best_answer_over_windows([([0.0], [0.0])], [(0, 0)], [], '', 5).text == ''

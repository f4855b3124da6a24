"""BERT MLM/NSP examples (data/examples/mlm_nsp.py): masking statistics, NSP pairs, packing layout, truncation."""
import numpy as np
import pytest

from jaxssl.data.examples import mlm_nsp

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
LOW, HIGH = 5, 1000


def _bert_truncate(a, b, max_num_tokens, rng):
  """google-research/bert truncate_seq_pair, verbatim but for the rng."""
  a, b = list(a), list(b)
  while len(a) + len(b) > max_num_tokens:
    trunc = a if len(a) > len(b) else b
    if rng.random() < 0.5:
      del trunc[0]
    else:
      trunc.pop()
  return a, b


@pytest.mark.parametrize('la,lb,m', [(10, 3, 8), (3, 10, 8), (7, 7, 9), (50, 49, 10), (5, 5, 20), (2, 9, 2),
                                     (1, 30, 5), (100, 2, 3)])
def test_truncate_matches_bert(la, lb, m):
  a, b = list(range(100, 100 + la)), list(range(500, 500 + lb))
  rng = np.random.default_rng(0)
  for _ in range(20):
    ta, tb = mlm_nsp.truncate_seq_pair(a, b, m, rng)
    ra, rb = _bert_truncate(a, b, m, rng)
    assert (len(ta), len(tb)) == (len(ra), len(rb))  # which side loses how much: deterministic
    assert len(ta) + len(tb) == min(m, la + lb) and ta and tb
    # What is left is a contiguous piece of each side.
    assert ta == a[a.index(ta[0]):a.index(ta[0]) + len(ta)]
    assert tb == b[b.index(tb[0]):b.index(tb[0]) + len(tb)]


def test_truncate_front_back_balanced():
  rng = np.random.default_rng(1)
  fronts = [mlm_nsp.truncate_seq_pair(list(range(40)), [7], 21, rng)[0][0] for _ in range(2000)]
  assert abs(np.mean(fronts) - 10) < 0.5  # 20 removals, Binomial(20, 1/2) from the front


def _masking_runs(n, seq_len, real_len, rate=0.15, max_pred=1000, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(LOW, HIGH, size=(n, seq_len)).astype(np.int32)
  ids[:, real_len:] = PAD
  ids[:, 0] = CLS
  ids[:, real_len // 2] = SEP
  ids[:, real_len - 1] = SEP
  ids[:, 3] = UNK
  outs = [mlm_nsp.mask_tokens(x, x >= LOW, rng, mask_rate=rate, max_predictions=max_pred, mask_id=MASK,
                                 vocab_low=LOW, vocab_high=HIGH) for x in ids]
  return ids, outs


def test_mask_rates_and_layout():
  seq_len, real_len, max_pred = 128, 100, 40
  ids, outs = _masking_runs(3000, seq_len, real_len, max_pred=max_pred)
  n_cand = real_len - 4
  k = int(round(n_cand * 0.15))
  counts = {'mask': 0, 'random': 0, 'keep': 0}
  changed_to_random = []
  for x, o in zip(ids, outs):
    w = o['mlm_weights']
    assert o['input_ids'].dtype == np.int32 and o['mlm_positions'].dtype == np.int32
    assert o['mlm_ids'].dtype == np.int32 and w.dtype == np.float32
    assert o['mlm_positions'].shape == o['mlm_ids'].shape == w.shape == (max_pred,)
    assert w.sum() == k and np.all(w[:k] == 1) and np.all(w[k:] == 0)
    pos = o['mlm_positions'][:k]
    assert np.all(np.diff(pos) > 0)  # sorted, distinct
    assert np.all(o['mlm_positions'][k:] == 0) and np.all(o['mlm_ids'][k:] == 0)
    assert np.all(x[pos] >= LOW)  # never special or padding
    np.testing.assert_array_equal(o['mlm_ids'][:k], x[pos])
    # Positions not chosen are untouched.
    untouched = np.ones(seq_len, bool)
    untouched[pos] = False
    np.testing.assert_array_equal(o['input_ids'][untouched], x[untouched])
    new = o['input_ids'][pos]
    counts['mask'] += int(np.sum(new == MASK))
    counts['keep'] += int(np.sum(new == x[pos]))
    rand = (new != MASK) & (new != x[pos])
    counts['random'] += int(np.sum(rand))
    changed_to_random.extend(new[rand])
  total = sum(counts.values())
  # A random draw equal to the original counts as "keep": expected keep = 0.1 + 0.1 / (HIGH - LOW).
  assert abs(counts['mask'] / total - 0.8) < 0.01
  assert abs(counts['random'] / total - 0.1) < 0.01
  assert abs(counts['keep'] / total - 0.1) < 0.01
  assert min(changed_to_random) >= LOW and max(changed_to_random) < HIGH
  assert len(set(changed_to_random)) > 0.9 * (HIGH - LOW)  # uniform over the whole range


def test_mask_positions_uniform():
  _, outs = _masking_runs(4000, 64, 64, max_pred=64)
  hits = np.zeros(64)
  for o in outs:
    hits[o['mlm_positions'][o['mlm_weights'] > 0]] += 1
  cand = np.ones(64, bool)
  cand[[0, 3, 32, 63]] = False
  assert np.all(hits[~cand] == 0)
  rate = hits[cand] / 4000
  assert abs(rate.mean() - 9 / 60) < 1e-9  # round(60 * 0.15) = 9 of 60 candidates, always
  assert rate.min() > 0.12 and rate.max() < 0.18


def test_mask_cap_and_minimum():
  _, outs = _masking_runs(50, 128, 128, max_pred=5)
  assert all(o['mlm_weights'].sum() == 5 for o in outs)  # 0.15 * 124 = 19 capped at 5
  _, outs = _masking_runs(50, 16, 6, max_pred=5)
  assert all(o['mlm_weights'].sum() == 1 for o in outs)  # 2 candidates * 0.15 rounds to 0: at least 1
  x = np.array([CLS, SEP, SEP, PAD], np.int32)
  o = mlm_nsp.mask_tokens(x, x >= LOW, np.random.default_rng(0), mask_rate=0.15, max_predictions=3,
                             mask_id=MASK, vocab_low=LOW, vocab_high=HIGH)
  assert o['mlm_weights'].sum() == 0 and np.array_equal(o['input_ids'], x)


def test_mask_pure_function_of_rng():
  x = np.arange(LOW, LOW + 50, dtype=np.int32)
  a = mlm_nsp.mask_tokens(x, x >= LOW, np.random.default_rng(7), mask_rate=0.15, max_predictions=10,
                             mask_id=MASK, vocab_low=LOW, vocab_high=HIGH)
  b = mlm_nsp.mask_tokens(x, x >= LOW, np.random.default_rng(7), mask_rate=0.15, max_predictions=10,
                             mask_id=MASK, vocab_low=LOW, vocab_high=HIGH)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_pack_pair_layout():
  ex = mlm_nsp.pack_pair([10, 11, 12], [20, 21], 10, CLS, SEP, PAD)
  np.testing.assert_array_equal(ex['input_ids'], [CLS, 10, 11, 12, SEP, 20, 21, SEP, PAD, PAD])
  np.testing.assert_array_equal(ex['token_type_ids'], [0, 0, 0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(ex['attention_mask'], [1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
  assert all(v.dtype == np.int32 and v.shape == (10,) for v in ex.values())
  full = mlm_nsp.pack_pair([10] * 4, [20] * 3, 10, CLS, SEP, PAD)
  assert full['attention_mask'].sum() == 10
  with pytest.raises(ValueError):
    mlm_nsp.pack_pair([10] * 4, [20] * 4, 10, CLS, SEP, PAD)


def _doc(d, lengths):
  """Sentences whose ids encode (document, sentence, word): 10000 * d + 100 * s + w + 5."""
  return [[10000 * d + 100 * s + w + 5 for w in range(n)] for s, n in enumerate(lengths)]


def _where(t):
  t -= 5
  return t // 10000, (t % 10000) // 100, t % 100


def test_nsp_pairs_structure():
  rng = np.random.default_rng(0)
  n_random = 0
  n = 4000
  for i in range(n):
    doc = _doc(1, rng.integers(1, 8, size=rng.integers(2, 10)))
    other = _doc(2, rng.integers(1, 8, size=rng.integers(1, 10)))
    a, b, is_random = mlm_nsp.make_nsp_pair(doc, other, rng, max_num_tokens=500, short_seq_prob=0.0)
    assert a and b
    flat = [t for s in doc for t in s]
    wa = [_where(t) for t in a]
    wb = [_where(t) for t in b]
    assert all(d == 1 for d, _, _ in wa) and wa[0][2] == 0  # A starts at a sentence of the document
    i0 = flat.index(a[0])
    assert a == flat[i0:i0 + len(a)]
    if is_random:
      n_random += 1
      assert all(d == 2 for d, _, _ in wb) and wb[0][2] == 0
      fo = [t for s in other for t in s]
      j0 = fo.index(b[0])
      assert b == fo[j0:j0 + len(b)]
    else:
      # The true continuation: A + B is a run of consecutive sentences, split at a sentence boundary.
      assert a + b == flat[i0:i0 + len(a) + len(b)] and wb[0][2] == 0
  assert abs(n_random / n - 0.5) < 0.03


def test_nsp_single_sentence_document_is_random():
  rng = np.random.default_rng(0)
  for _ in range(50):
    a, b, is_random = mlm_nsp.make_nsp_pair(_doc(1, [5]), _doc(2, [3, 3]), rng, 100, 0.1)
    assert is_random and _where(b[0])[0] == 2 and len(a) == 5


def test_nsp_truncation():
  rng = np.random.default_rng(0)
  for _ in range(1000):
    doc = _doc(1, rng.integers(1, 60, size=12))
    other = _doc(2, rng.integers(1, 60, size=12))
    a, b, _ = mlm_nsp.make_nsp_pair(doc, other, rng, max_num_tokens=61, short_seq_prob=0.1)
    assert a and b and len(a) + len(b) <= 61
    ex = mlm_nsp.pack_pair(a, b, 64, CLS, SEP, PAD)
    assert ex['attention_mask'].sum() == len(a) + len(b) + 3


def test_short_seq_prob():
  # Long documents of short sentences: without short targets nearly every pair is full.
  rng = np.random.default_rng(0)
  docs = [(_doc(1, rng.integers(1, 5, size=400)), _doc(2, rng.integers(1, 5, size=400))) for _ in range(10)]

  def short_fraction(p):
    rng = np.random.default_rng(0)
    lengths = []
    for i in range(3000):
      a, b, _ = mlm_nsp.make_nsp_pair(*docs[i % 10], rng, max_num_tokens=61, short_seq_prob=p)
      lengths.append(len(a) + len(b))
    return np.mean(np.array(lengths) < 58)
  base = short_fraction(0.0)
  assert base < 0.06
  # A short target t < 54 or so gives a pair < 58 tokens: ~0.1 * 56/60 more short pairs.
  assert 0.06 < short_fraction(0.1) - base < 0.13

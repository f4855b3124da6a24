"""The pretraining pipeline: examples, determinism in (seed, step), process shares, errors, throughput."""
import time
import zlib

import numpy as np
import pytest

from jaxssl.data.examples import bert_pipeline
from jaxssl.errors import UserError

SEQ, PRED = 64, 10
KW = dict(seq_len=SEQ, max_predictions=PRED, mask_rate=0.15, short_seq_prob=0.1)


class FakeSource:
  """A list of documents behind the random-access source interface (counts batched reads)."""

  def __init__(self, docs):
    self.docs = [d.encode() if isinstance(d, str) else d for d in docs]
    self.batched_reads = 0

  def __len__(self):
    return len(self.docs)

  def __getitem__(self, i):
    return {'text': self.docs[i]}

  def __getitems__(self, indices):
    self.batched_reads += 1
    return [{'text': self.docs[i]} for i in indices]


class IntTokenizer:
  """Words are decimal ids: lets tests see exactly where every token came from."""
  num_special = 5
  vocab_size = 10**6

  def encode(self, texts):
    return [[int(w) for w in t.split()] for t in texts]


class HashTokenizer:
  """A fast fake of a sentencepiece tokenizer: words hashed into [5, vocab_size)."""
  num_special = 5
  vocab_size = 8000

  def __init__(self):
    self._cache = {}

  def encode(self, texts):
    c = self._cache
    out = []
    for t in texts:
      ids = []
      for w in t.split():
        i = c.get(w)
        if i is None:
          i = c[w] = 5 + zlib.crc32(w.encode()) % (self.vocab_size - 5)
        ids.append(i)
      out.append(ids)
    return out


def _tagged_docs(n_docs, n_sents=8, rng=None):
  """Token id 5 + 10000 * doc + 100 * sentence + word: the origin of every token is readable."""
  rng = rng or np.random.default_rng(0)
  docs = []
  for d in range(n_docs):
    sents = [' '.join(str(5 + 10000 * d + 100 * s + w) for w in range(rng.integers(2, 12)))
             for s in range(n_sents)]
    docs.append('\n'.join(sents))
  return docs


def _ptb_like_docs(n_docs, rng):
  words = np.array([f'w{i}' for i in range(10000)])
  return ['\n'.join(' '.join(rng.choice(words, size=rng.integers(10, 40))) for _ in range(16))
          for _ in range(n_docs)]


def _iter(source, tok, **kw):
  args = dict(KW, seed=3, global_batch_size=8, start_step=0)
  args.update(kw)
  return bert_pipeline.make_pretrain_iterator(source, tok, **args)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _unmask(ex):
  ids = ex['input_ids'].copy()
  w = ex['mlm_weights'] > 0
  ids[ex['mlm_positions'][w]] = ex['mlm_ids'][w]
  return ids


def test_batch_shapes_and_dtypes():
  it = _iter(FakeSource(_tagged_docs(20)), IntTokenizer())
  b = next(it)
  for k in ('input_ids', 'token_type_ids', 'attention_mask'):
    assert b[k].shape == (8, SEQ) and b[k].dtype == np.int32
  for k in ('mlm_positions', 'mlm_ids'):
    assert b[k].shape == (8, PRED) and b[k].dtype == np.int32
  assert b['mlm_weights'].shape == (8, PRED) and b['mlm_weights'].dtype == np.float32
  assert b['nsp_label'].shape == (8,) and b['nsp_label'].dtype == np.int32


def test_examples_are_valid_nsp_pairs():
  n_docs = 40
  ex = bert_pipeline.PretrainExamples(FakeSource(_tagged_docs(n_docs)), IntTokenizer(), seed=0,
                                 **dict(KW, seq_len=256, short_seq_prob=0.0))
  labels = []
  for g, e in enumerate(ex.examples(range(600))):
    ids = _unmask(e)
    n = int(e['attention_mask'].sum())
    seps = np.flatnonzero(ids == bert_pipeline.SEP_ID)
    assert ids[0] == bert_pipeline.CLS_ID and len(seps) == 2 and seps[1] == n - 1 and np.all(ids[n:] == 0)
    a, b = ids[1:seps[0]] - 5, ids[seps[0] + 1:n - 1] - 5
    np.testing.assert_array_equal(e['token_type_ids'][:n], [0] * (seps[0] + 1) + [1] * (n - seps[0] - 1))
    doc_a = a // 10000
    doc = ex.permutation(g // n_docs)[g % n_docs]
    assert np.all(doc_a == doc)  # A comes from the document of this index
    # No truncation at seq_len 256: A and B each start at a sentence.
    assert a[0] % 100 == 0 and b[0] % 100 == 0
    sent_a, sent_b = (a % 10000) // 100, (b % 10000) // 100
    if e['nsp_label'] == 0:  # IsNext: B continues A with the next sentence of the same document
      assert np.all(b // 10000 == doc) and sent_b[0] == sent_a[-1] + 1
    else:
      assert np.all(b // 10000 == b[0] // 10000) and b[0] // 10000 != doc
    labels.append(int(e['nsp_label']))
  assert abs(np.mean(labels) - 0.5) < 0.06


def test_random_documents_are_uniform_over_others():
  n_docs = 5
  ex = bert_pipeline.PretrainExamples(FakeSource(_tagged_docs(n_docs, n_sents=1)), IntTokenizer(), seed=0, **KW)
  pairs = np.zeros((n_docs, n_docs))
  for e in ex.examples(range(2000)):
    ids = _unmask(e)
    seps = np.flatnonzero(ids == bert_pipeline.SEP_ID)
    pairs[(ids[1] - 5) // 10000, (ids[seps[0] + 1] - 5) // 10000] += 1
  assert np.all(np.diag(pairs) == 0)
  off = pairs[~np.eye(n_docs, dtype=bool)]
  assert off.min() > 0.6 * off.mean()


def test_same_seed_and_step_same_batch():
  src, tok = FakeSource(_tagged_docs(30)), IntTokenizer()
  it1, it2 = _iter(src, tok), _iter(src, tok, num_threads=1, prefetch=1)
  first = [next(it1) for _ in range(8)]
  for b in first:
    _assert_batches_equal(b, next(it2))
  _assert_batches_equal(next(_iter(src, tok, start_step=5)), first[5])
  other_seed = next(_iter(src, tok, seed=4))
  assert not np.array_equal(other_seed['input_ids'], first[0]['input_ids'])


def test_process_shares_concatenate_to_the_global_batch():
  src, tok = FakeSource(_tagged_docs(30)), IntTokenizer()
  full = [next(_iter(src, tok, start_step=3))]
  full.append(next(_iter(src, tok, start_step=4)))
  for p in (2, 4):
    shares = [_iter(src, tok, start_step=3, process_index=i, process_count=p) for i in range(p)]
    for step_batch in full:
      parts = [next(s) for s in shares]
      assert all(part['input_ids'].shape[0] == 8 // p for part in parts)
      _assert_batches_equal({k: np.concatenate([part[k] for part in parts]) for k in step_batch}, step_batch)


def test_epochs_reshuffle_and_remask():
  n_docs = 16
  src = FakeSource(_tagged_docs(n_docs, n_sents=20))
  ex = bert_pipeline.PretrainExamples(src, IntTokenizer(), seed=0, **KW)
  p0, p1 = ex.permutation(0), ex.permutation(1)
  assert sorted(p0) == list(range(n_docs)) and not np.array_equal(p0, p1)
  different = 0
  for doc in range(n_docs):
    g0, g1 = int(np.flatnonzero(p0 == doc)[0]), n_docs + int(np.flatnonzero(p1 == doc)[0])
    e0, e1 = ex[g0], ex[g1]
    assert (_unmask(e0)[1] - 5) // 10000 == (_unmask(e1)[1] - 5) // 10000 == doc
    different += not np.array_equal(e0['mlm_positions'], e1['mlm_positions'])
  assert different >= n_docs - 1


def test_batched_reads():
  src = FakeSource(_tagged_docs(50))
  it = _iter(src, IntTokenizer(), global_batch_size=16, num_threads=1)
  next(it)
  assert src.batched_reads <= 3  # one read per step (prefetch may have started a second or third)


def test_empty_documents_are_skipped():
  docs = _tagged_docs(10)
  docs[3] = ''
  docs[7] = '\n  \n'
  ex = bert_pipeline.PretrainExamples(FakeSource(docs), IntTokenizer(), seed=0, **KW)
  for e in ex.examples(range(200)):
    ids = _unmask(e)
    seps = np.flatnonzero(ids == bert_pipeline.SEP_ID)
    assert seps[0] > 1 and seps[1] > seps[0] + 1  # A and B non-empty


def test_eval_batches_fixed():
  src, tok = FakeSource(_tagged_docs(30)), IntTokenizer()
  kw = dict(KW, batch_size=8, num_batches=3, seed=1)
  a, b = bert_pipeline.make_eval_batches(src, tok, **kw), bert_pipeline.make_eval_batches(src, tok, **kw)
  assert len(a) == 3
  for x, y in zip(a, b):
    _assert_batches_equal(x, y)
  halves = [bert_pipeline.make_eval_batches(src, tok, process_index=i, process_count=2, **kw) for i in range(2)]
  for j in range(3):
    _assert_batches_equal({k: np.concatenate([h[j][k] for h in halves]) for k in a[j]}, a[j])


def test_errors():
  tok = IntTokenizer()
  with pytest.raises(UserError, match='at least 2'):
    _iter(FakeSource(_tagged_docs(1)), tok)
  with pytest.raises(UserError, match='not divisible'):
    _iter(FakeSource(_tagged_docs(5)), tok, global_batch_size=6, process_count=4)
  with pytest.raises(UserError, match='UTF-8'):
    bert_pipeline.PretrainExamples(FakeSource([b'1 2 3', b'\xff\xfe']), tok, seed=0, **KW).examples([0, 1])
  with pytest.raises(UserError, match='empty'):
    bert_pipeline.PretrainExamples(FakeSource(['5 6', '', '']), tok, seed=0, **KW).examples(range(3))


def test_throughput():
  rng = np.random.default_rng(0)
  src, tok = FakeSource(_ptb_like_docs(500, rng)), HashTokenizer()
  it = bert_pipeline.make_pretrain_iterator(src, tok, seq_len=128, max_predictions=20, mask_rate=0.15,
                                       short_seq_prob=0.1, seed=0, global_batch_size=32, num_threads=1)
  next(it)
  t0 = time.perf_counter()
  steps = 20
  for _ in range(steps):
    next(it)
  tokens_per_s = steps * 32 * 128 / (time.perf_counter() - t0)
  print(f'pipeline throughput: {tokens_per_s:,.0f} tokens/s')
  assert tokens_per_s > 20_000  # loose for shared CI machines; ~250k on an idle core here


class ScatteredTokenizer:
  """A fake with BERT-like scattered specials: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103,
  [unused] ids 1..99 and 104..105; words are decimal ids (0 and 100..103 in the text appear as themselves)."""
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 100, 101, 102, 103
  special_ids = frozenset(range(106))
  vocab_size = 1000
  random_token_range = (106, 1000)

  def encode(self, texts):
    return [[int(w) for w in t.split()] for t in texts]


def _check_scattered(examples, tok):
  low, high = tok.random_token_range
  n_random = 0
  for e in examples:
    ids, orig = e['input_ids'], _unmask(e)
    n = int(e['attention_mask'].sum())
    assert orig[0] == tok.cls_id and np.all(orig[n:] == tok.pad_id) and np.all(ids[n:] == tok.pad_id)
    b_start = int(np.argmax(e['token_type_ids']))  # text may hold the [SEP] id too: locate by segment
    assert orig[b_start - 1] == orig[n - 1] == tok.sep_id
    w = e['mlm_weights'] > 0
    pos = e['mlm_positions'][w]
    assert w.sum() >= 1 and not set(e['mlm_ids'][w].tolist()) & tok.special_ids  # specials are never targets
    unchanged = np.ones(len(ids), bool)
    unchanged[pos] = False
    assert np.array_equal(ids[unchanged], orig[unchanged])  # only chosen positions change
    replaced = ids[pos]
    other = replaced[(replaced != tok.mask_id) & (replaced != orig[pos])]
    assert np.all((other >= low) & (other < high))  # random replacements from the tokenizer's range
    n_random += len(other)
  return n_random


def test_scattered_special_ids():
  # Documents hold special ids as text too (e.g. [UNK] from the tokenizer): they must never be masked.
  rng = np.random.default_rng(0)
  docs = ['\n'.join(' '.join(str(int(rng.choice([0, 100, 101, 102, 103, 50]) if rng.random() < 0.2
                                     else rng.integers(106, 1000))) for _ in range(rng.integers(3, 12)))
                    for _ in range(6)) for _ in range(30)]
  tok = ScatteredTokenizer()
  exs = bert_pipeline.PretrainExamples(FakeSource(docs), tok, seed=0, **KW).examples(range(400))
  assert _check_scattered(exs, tok) > 50


def test_real_wordpiece(tmp_path):
  from jaxssl.data import tokenizers
  words = ['the', 'company', 'said', 'its', 'stock', 'rose', 'in', 'new', 'york', 'play', '##ing', '##ed', '.']
  vocab = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
  (tmp_path / 'vocab.txt').write_text(''.join(w + '\n' for w in vocab))
  tok = tokenizers.load_tokenizer(str(tmp_path))
  assert (tok.cls_id, tok.sep_id, tok.mask_id, tok.random_token_range) == (101, 102, 103, (104, len(vocab)))
  rng = np.random.default_rng(1)
  plain = ['the', 'company', 'said', 'its', 'stock', 'rose', 'in', 'new', 'york', 'playing', 'played', 'zebra']
  docs = ['\n'.join(' '.join(rng.choice(plain, size=rng.integers(3, 10))) + ' .' for _ in range(6))
          for _ in range(20)]
  exs = bert_pipeline.PretrainExamples(FakeSource(docs), tok, seed=0, **KW).examples(range(300))
  assert any(tok.unk_id in _unmask(e) for e in exs)  # 'zebra' is [UNK]: present, never a target
  assert _check_scattered(exs, tok) > 20

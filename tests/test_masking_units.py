"""MLM masking units: whole words, SpanBERT spans, lexicon phrases (ERNIE), jieba words; 'token' unchanged."""
import hashlib

import numpy as np
import pytest

from jaxssl.data import tokenizers
from jaxssl.data.examples import bert_pipeline
from jaxssl.data.examples import masking_units
from jaxssl.data.examples import mlm_nsp
from jaxssl.errors import UserError
from test_pipeline import FakeSource, HashTokenizer, _ptb_like_docs  # tests/ is on sys.path under pytest

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
KW = dict(mask_rate=0.15, mask_id=MASK)


class PieceTokenizer:
  """A sentencepiece-like fake over a fixed word list: a word is '▁' + its first 3 letters, then 3-letter
  pieces ('exchange' -> '▁exc' 'han' 'ge'), so words of several pieces are common. Layout: 5 specials first."""
  num_special = 5

  def __init__(self, words):
    self.pieces = list(SPECIAL)
    self._ids = {}
    for w in words:
      for p in self._split(w):
        if p not in self._ids:
          self._ids[p] = len(self.pieces)
          self.pieces.append(p)
    self.vocab_size = len(self.pieces)

  @staticmethod
  def _split(word):
    return ['\u2581' + word[:3]] + [word[i:i + 3] for i in range(3, len(word), 3)]

  def encode(self, texts):
    return [[self._ids[p] for w in t.split() for p in self._split(w)] for t in texts]

  def id_to_piece(self, i):
    return self.pieces[i]


WORDS = ('the new york stock exchange opened higher in yorker city as traders bought shares of '
         'international companies after central bank announcements yesterday').split()


def _row(tok, text, seq_len=None):
  """[CLS] text [SEP] (+ padding) and its candidate mask."""
  ids = [CLS] + tok.encode([text])[0] + [SEP]
  ids += [PAD] * ((seq_len or len(ids)) - len(ids))
  ids = np.array(ids, np.int32)
  return ids, ids >= 5


def _old_mask_tokens(input_ids, candidate_mask, rng, *, mask_rate, max_predictions, mask_id, vocab_low, vocab_high):
  """mlm_nsp.mask_tokens as it was before masking units (verbatim): 'token' must not change."""
  input_ids = np.asarray(input_ids)
  candidates = np.flatnonzero(np.asarray(candidate_mask))
  k = min(max_predictions, max(1, int(round(len(candidates) * mask_rate)))) if len(candidates) else 0
  positions = np.sort(rng.choice(candidates, size=k, replace=False)) if k else np.zeros(0, np.int64)
  original = input_ids[positions]
  u = rng.random(k)
  random_ids = rng.integers(vocab_low, vocab_high, size=k)
  replaced = np.where(u < 0.8, mask_id, np.where(u < 0.9, random_ids, original))
  masked = input_ids.astype(np.int32, copy=True)
  masked[positions] = replaced
  mlm_positions = np.zeros(max_predictions, np.int32)
  mlm_ids = np.zeros(max_predictions, np.int32)
  mlm_weights = np.zeros(max_predictions, np.float32)
  mlm_positions[:k] = positions
  mlm_ids[:k] = original
  mlm_weights[:k] = 1.0
  return dict(input_ids=masked, mlm_positions=mlm_positions, mlm_ids=mlm_ids, mlm_weights=mlm_weights)


def test_token_masking_bit_identical():
  ids = np.random.default_rng(0).integers(5, 1000, size=(50, 64)).astype(np.int32)
  ids[:, 40:] = PAD
  for seed, x in enumerate(ids):
    args = dict(mask_rate=0.15, max_predictions=10, mask_id=MASK, vocab_low=5, vocab_high=1000)
    new = mlm_nsp.mask_tokens(x, x >= 5, np.random.default_rng(seed), **args)
    old = _old_mask_tokens(x, x >= 5, np.random.default_rng(seed), **args)
    for k in old:
      np.testing.assert_array_equal(new[k], old[k])
  # The whole pipeline, default and explicit 'token' (also with a segmenter, which 'token' ignores): the
  # digest was taken before masking units existed.
  for extra in ({}, dict(masking='token'), dict(masking='token', chinese_segmenter='jieba')):
    src = FakeSource(_ptb_like_docs(40, np.random.default_rng(3)))
    bs = bert_pipeline.make_eval_batches(src, HashTokenizer(), seq_len=64, max_predictions=10, mask_rate=0.15,
                                    short_seq_prob=0.1, batch_size=8, num_batches=3, seed=7, **extra)
    h = hashlib.sha256()
    for b in bs:
      for k in sorted(b):
        h.update(k.encode())
        h.update(np.ascontiguousarray(b[k]).tobytes())
    assert h.hexdigest() == '648cef0c30fba1e52b418ab668db5ac32bfc36749d7547e24098ae2070d02f5e', extra


def test_word_units_layout():
  tok = PieceTokenizer(WORDS)
  table = masking_units.word_start_table(tok)
  ids, cand = _row(tok, 'the international exchange', seq_len=12)
  # [CLS] ▁the ▁int ern ati ona l ▁exc han ge [SEP] [PAD]
  units = masking_units.word_units(table[ids], cand)
  assert units.tolist() == [-1, 0, 1, 1, 1, 1, 1, 2, 2, 2, -1, -1]
  # A truncated front (continuation piece first) and a unit never crosses a special token.
  ids = np.array([CLS, tok._ids['han'], tok._ids['ge'], SEP, tok._ids['ern'], tok._ids['\u2581the'], SEP])
  assert masking_units.word_units(table[ids], ids >= 5).tolist() == [-1, 0, 0, -1, 1, 2, -1]


def _units(kind, tok, ids, cand, rng, lexicon=None):
  starts = masking_units.word_start_table(tok)[ids]
  if kind == 'whole_word':
    return masking_units.word_units(starts, cand)
  if kind == 'span':
    return masking_units.span_units(starts, cand, rng)
  return masking_units.lexicon_units(ids, starts, cand, lexicon)


@pytest.mark.parametrize('kind', ['whole_word', 'span', 'entity'])
def test_units_all_or_nothing_within_budget(kind, tmp_path):
  tok = PieceTokenizer(WORDS)
  (tmp_path / 'lex.txt').write_text('new york stock exchange\nnew york\ncentral bank\n')
  lexicon = masking_units.load_lexicon(str(tmp_path / 'lex.txt'), tok)
  rng = np.random.default_rng(0)
  masked_share, shortfall = [], []
  for seed in range(400):
    text = ' '.join(rng.choice(WORDS, size=rng.integers(20, 60)))
    ids, cand = _row(tok, text, seq_len=256)
    r = np.random.default_rng(seed)
    units = _units(kind, tok, ids, cand, r, lexicon)
    out = mlm_nsp.mask_units(ids, units, r, max_predictions=40, vocab_low=5, vocab_high=tok.vocab_size,
                                replace_per_unit=kind != 'whole_word', **KW)
    w = out['mlm_weights'] > 0
    pos = out['mlm_positions'][w]
    assert np.all(np.diff(pos) > 0) and np.all(cand[pos])
    np.testing.assert_array_equal(out['mlm_ids'][w], ids[pos])
    chosen = np.zeros(len(ids), bool)
    chosen[pos] = True
    for u in range(units.max() + 1):  # every unit: all of its tokens or none
      assert len(set(chosen[units == u].tolist())) == 1, (kind, seed, u)
    k = min(40, max(1, round(cand.sum() * 0.15)))
    assert len(pos) <= k
    masked_share.append(len(pos) / cand.sum())
    shortfall.append(k - len(pos))
  # 15% of the maskable tokens, less a little when the last units do not fit (more for long spans).
  assert abs(np.mean(masked_share) - 0.15) < (0.01 if kind != 'span' else 0.02)
  assert np.mean(shortfall) < (0.5 if kind != 'span' else 1.5)


def test_span_lengths_follow_truncated_geometric():
  cand = np.ones(60_000, bool)
  units = masking_units.span_units(np.ones_like(cand), cand, np.random.default_rng(0))
  lengths = np.bincount(units)[:-1]  # the last span is cut by the end
  probs = masking_units.span_length_probs(0.2, 10)
  expected_mean = float(np.dot(np.arange(1, 11), probs))
  assert abs(expected_mean - 3.797) < 1e-3  # SpanBERT's 3.8
  assert lengths.max() == 10 and lengths.min() == 1
  assert abs(lengths.mean() - expected_mean) < 0.06
  np.testing.assert_allclose(np.bincount(lengths, minlength=11)[1:] / len(lengths), probs, atol=0.015)
  # Spans are of whole words and restart at every segment.
  tok = PieceTokenizer(WORDS)
  ids, cand = _row(tok, 'the international exchange opened', seq_len=20)
  ids[8] = SEP  # split into two segments
  cand = ids >= 5
  words = masking_units.word_units(masking_units.word_start_table(tok)[ids], cand)
  for seed in range(50):
    spans = masking_units.span_units(masking_units.word_start_table(tok)[ids], cand, np.random.default_rng(seed))
    for w in range(words.max() + 1):
      assert len(set(spans[words == w].tolist())) == 1
    assert set(spans[:8].tolist()).isdisjoint(spans[9:][spans[9:] >= 0].tolist())


def test_lexicon_phrases_longest_first(tmp_path):
  tok = PieceTokenizer(WORDS)
  (tmp_path / 'lex.txt').write_text('# finance\nnew york\n\nnew york stock exchange\nyork city\nbank\n')
  lexicon = masking_units.load_lexicon(str(tmp_path / 'lex.txt'), tok)
  assert len(lexicon) == 4
  text = 'the new york stock exchange opened in new york city as new yorker traders bought'
  ids, cand = _row(tok, text)
  starts = masking_units.word_start_table(tok)[ids]
  units = masking_units.lexicon_units(ids, starts, cand, lexicon)
  words = masking_units.word_units(starts, cand)
  word_text = text.split()

  def unit_words(u):
    return ' '.join(word_text[w] for w in sorted(set(words[units == u].tolist())))

  groups = [unit_words(u) for u in range(units.max() + 1)]
  # Longest match first ('new york stock exchange', not 'new york'); left to right ('new york' then 'city');
  # a phrase ends at a word end ('new yorker' is no 'new york').
  assert 'new york stock exchange' in groups and groups.count('new york') == 1
  assert 'city' in groups and 'york city' not in groups
  assert 'new' in groups and 'yorker' in groups
  # Masked as wholes, over many seeds (a high rate: the 8-piece phrase must fit the budget).
  phrase = units == units[words == 1][0]
  seen = 0
  for seed in range(300):
    r = np.random.default_rng(seed)
    out = mlm_nsp.mask_units(ids, units, r, max_predictions=20, vocab_low=5, vocab_high=tok.vocab_size,
                                replace_per_unit=True, mask_rate=0.4, mask_id=MASK)
    pos = out['mlm_positions'][out['mlm_weights'] > 0]
    hit = np.isin(np.flatnonzero(phrase), pos)
    assert hit.all() or not hit.any()
    seen += hit.all()
    # 80/10/10 per unit: a masked unit is all [MASK] or has none.
    for u in set(units[pos].tolist()):
      at = np.flatnonzero(units == u)
      is_mask = out['input_ids'][at] == MASK
      assert is_mask.all() or not is_mask.any()
  assert seen > 30


def test_replacement_rates_per_token():
  tok = PieceTokenizer(WORDS)
  ids, cand = _row(tok, ' '.join(WORDS * 3))
  units = masking_units.word_units(masking_units.word_start_table(tok)[ids], cand)
  counts = np.zeros(3)
  for seed in range(300):
    out = mlm_nsp.mask_units(ids, units, np.random.default_rng(seed), max_predictions=60, vocab_low=5,
                                vocab_high=tok.vocab_size, **KW)
    pos = out['mlm_positions'][out['mlm_weights'] > 0]
    new, old = out['input_ids'][pos], ids[pos]
    counts += [(new == MASK).sum(), (new == old).sum(), ((new != MASK) & (new != old)).sum()]
  share = counts / counts.sum()
  assert abs(share[0] - 0.8) < 0.02 and abs(share[1] - 0.1 - 0.1 / tok.vocab_size) < 0.02


def test_unit_larger_than_budget_is_skipped():
  ids = np.array([CLS, 10, 11, 12, 13, SEP], np.int32)
  out = mlm_nsp.mask_units(ids, np.array([-1, 0, 0, 0, 0, -1]), np.random.default_rng(0), max_predictions=3,
                              vocab_low=5, vocab_high=50, **KW)
  assert out['mlm_weights'].sum() == 0 and np.array_equal(out['input_ids'], ids)


ZH = ['我来到北京清华大学学习计算机科学', '他在纽约证券交易所工作了十年', '今天天气很好我们去公园散步吧',
      '中国的首都是北京上海是最大的城市', '机器学习和深度学习是人工智能的重要方向', '小明每天早上喝一杯牛奶然后去学校']


@pytest.fixture(scope='module')
def zh_tokenizer(tmp_path_factory):
  rng = np.random.default_rng(0)
  sents = [''.join(rng.permutation(list(s))) for s in ZH for _ in range(30)] + ZH * 20 + ['new york city'] * 5
  return tokenizers.train_tokenizer(sents, 160, str(tmp_path_factory.mktemp('zh') / 'tok'))


def test_jieba_units_cover_whole_pieces_and_words(zh_tokenizer):
  pytest.importorskip('jieba')
  segmenter = masking_units.make_jieba()
  merged_some = False
  for text in ZH:
    ids, offsets = zh_tokenizer.encode_with_offsets([text])[0]
    starts = masking_units.jieba_word_starts(text, offsets, segmenter)
    units = masking_units.word_units(starts, np.ones(len(ids), bool))
    words = list(segmenter.tokenize(text))
    word_starts = {s for _, s, _ in words}
    word_ends = {e for _, _, e in words}
    assert 1 < units.max() + 1 <= len(words)
    for u in range(units.max() + 1):
      pieces = np.flatnonzero(units == u)
      lo, hi = offsets[pieces[0]][0], offsets[pieces[-1]][1]
      assert lo in word_starts and hi in word_ends, (text, u)  # a unit is whole jieba words of whole pieces
      merged_some |= sum(lo <= s < hi for s in word_starts) > 1
  assert merged_some  # some piece crossed a jieba boundary, so its words became one unit


def test_jieba_with_lexicon_entities(zh_tokenizer, tmp_path):
  pytest.importorskip('jieba')
  (tmp_path / 'lex.txt').write_text('来到北京\nnew york city\n', encoding='utf-8')
  masker = masking_units.UnitMasker(zh_tokenizer, 'entity', lexicon_path=str(tmp_path / 'lex.txt'),
                                    segmenter='jieba')
  assert masker.replace_per_unit and masker.carries_word_starts
  text = ZH[0]  # 我 来到 北京 ...: the lexicon entry makes 来到北京 one jieba word
  ids, offsets = zh_tokenizer.encode_with_offsets([text])[0]
  packed = np.array(masker.encode([text, 'new york city'])[0], np.int32)
  plain, starts = masking_units.split_word_starts(packed)
  assert plain.tolist() == ids
  units = masker.units(plain, starts, np.ones(len(ids), bool), np.random.default_rng(0))
  inside = [i for i, (s, e) in enumerate(offsets) if 1 <= s and e <= 5]
  assert len(inside) >= 2 and len(set(units[inside].tolist())) == 1


def test_jieba_pipeline_whole_words(zh_tokenizer):
  pytest.importorskip('jieba')
  docs = ['\n'.join(ZH[(d + i) % len(ZH)] for i in range(4)) for d in range(12)]
  exs = bert_pipeline.PretrainExamples(FakeSource(docs), zh_tokenizer, seq_len=128, max_predictions=8, mask_rate=0.15,
                                  short_seq_prob=0.0, seed=0, masking='whole_word',
                                  chinese_segmenter='jieba').examples(range(40))
  segmenter = masking_units.make_jieba()
  starts_of = {}
  for text in ZH:
    ids, offsets = zh_tokenizer.encode_with_offsets([text])[0]
    starts_of[tuple(ids)] = masking_units.jieba_word_starts(text, offsets, segmenter)
  for e in exs:
    ids = e['input_ids'].copy()
    w = e['mlm_weights'] > 0
    ids[e['mlm_positions'][w]] = e['mlm_ids'][w]
    assert ids.min() >= 0 and e['mlm_weights'].sum() >= 1  # word starts were folded out again
    chosen = np.zeros(len(ids), bool)
    chosen[e['mlm_positions'][w]] = True
    # Rebuild the jieba word starts of each sentence (the pairs are whole sentences: short_seq_prob 0 and at
    # most 2 x 4 sentences, so no truncation) and check whole words are masked.
    starts = np.zeros(len(ids), bool)
    i = 1
    while i < len(ids) and ids[i] != 0:
      for key, flags in starts_of.items():
        if tuple(ids[i:i + len(key)].tolist()) == key:
          starts[i:i + len(key)] = flags
          i += len(key)
          break
      else:
        assert ids[i] == zh_tokenizer.sep_id
        i += 1
    units = masking_units.word_units(starts, ids >= 5)
    for u in range(units.max() + 1):
      assert len(set(chosen[units == u].tolist())) == 1


def _wordpiece(tmp_path):
  words = ['the', 'company', 'said', 'its', 'stock', 'rose', 'in', 'new', 'york', 'play', '##ing', '##ed', '.',
           'ex', '##chan', '##ge']
  vocab = ['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
  (tmp_path / 'vocab.txt').write_text(''.join(w + '\n' for w in vocab))
  return tokenizers.load_tokenizer(str(tmp_path))


@pytest.mark.parametrize('masking', ['whole_word', 'span', 'entity'])
def test_pipeline_masks_whole_words(masking, tmp_path):
  tok = _wordpiece(tmp_path)
  (tmp_path / 'lex.txt').write_text('new york stock exchange\nnew york\n')
  rng = np.random.default_rng(1)
  plain = ['the', 'company', 'said', 'its', 'stock', 'rose', 'in', 'new', 'york', 'playing', 'played', 'exchange']
  docs = ['\n'.join(' '.join(rng.choice(plain, size=rng.integers(3, 10))) + ' .' for _ in range(6))
          for _ in range(20)]
  it = bert_pipeline.make_pretrain_iterator(
      FakeSource(docs), tok, seq_len=64, max_predictions=10, mask_rate=0.15, short_seq_prob=0.1, seed=3,
      global_batch_size=8, num_threads=1, masking=masking,
      masking_lexicon=str(tmp_path / 'lex.txt') if masking == 'entity' else '')
  table = masking_units.word_start_table(tok)
  n_masked = n_cand = multi = 0
  for _ in range(4):
    b = next(it)
    for row in range(8):
      ids = b['input_ids'][row].copy()
      w = b['mlm_weights'][row] > 0
      pos = b['mlm_positions'][row][w]
      ids[pos] = b['mlm_ids'][row][w]
      cand = ~np.isin(ids, sorted(tok.special_ids))
      words = masking_units.word_units(table[ids], cand)
      chosen = np.isin(np.arange(len(ids)), pos)
      for u in range(words.max() + 1):
        assert len(set(chosen[words == u].tolist())) == 1  # whole words, whatever the unit
        multi += chosen[words == u].sum() > 1
      n_masked += len(pos)
      n_cand += cand.sum()
  assert multi > 0 and abs(n_masked / n_cand - 0.15) < 0.03


def test_jieba_on_text_without_chinese_is_plain_whole_word(tmp_path):
  pytest.importorskip('jieba')
  tok = _wordpiece(tmp_path)
  docs = ['\n'.join(['the company said its stock rose .', 'new york playing played exchange .'] * 3)] * 6
  args = dict(seq_len=32, max_predictions=5, mask_rate=0.15, short_seq_prob=0.1, batch_size=4, num_batches=2,
              seed=0, masking='whole_word')
  a = bert_pipeline.make_eval_batches(FakeSource(docs), tok, **args)
  b = bert_pipeline.make_eval_batches(FakeSource(docs), tok, chinese_segmenter='jieba', **args)
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_bad_config(tmp_path):
  tok = PieceTokenizer(WORDS)
  src = FakeSource(['the new york', 'stock exchange'])
  kw = dict(seq_len=16, max_predictions=3, mask_rate=0.15, short_seq_prob=0.1, seed=0)
  (tmp_path / 'empty.txt').write_text('# nothing\n\n')
  (tmp_path / 'lex.txt').write_text('new york\n')
  cases = [
      (dict(masking='words'), 'data.masking'),
      (dict(masking='whole_word', chinese_segmenter='pkuseg'), 'chinese_segmenter'),
      (dict(masking='entity'), 'masking_lexicon'),
      (dict(masking='entity', masking_lexicon=str(tmp_path / 'missing.txt')), 'not found'),
      (dict(masking='entity', masking_lexicon=str(tmp_path / 'empty.txt')), 'no phrases'),
      (dict(masking='span', masking_lexicon=str(tmp_path / 'lex.txt')), 'masking=entity'),
  ]
  for args, needle in cases:
    with pytest.raises(UserError, match=needle) as e:
      bert_pipeline.PretrainExamples(src, tok, masking=args.pop('masking'), **args, **kw)
    assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='data.masking'):
    bert_pipeline.masking_args({'masking': 'wwm'})
  assert bert_pipeline.masking_args({}) == dict(masking='token', masking_lexicon='', chinese_segmenter='')
  # A tokenizer whose pieces mark no words cannot give word units.
  class Bare(PieceTokenizer):
    def id_to_piece(self, i):
      return self.pieces[i].lstrip('\u2581')
  with pytest.raises(UserError, match="masking='token'"):
    bert_pipeline.PretrainExamples(src, Bare(WORDS), masking='whole_word', **kw)

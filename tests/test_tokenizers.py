"""Tokenizers: fixed special ids, round trips, control symbols, clear errors, determinism, workdir reuse;
the shared interface (offsets, save, load_tokenizer) and WordPiece against transformers' BertTokenizerFast."""
import json
import os
import threading
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from jaxssl.data import tokenizers  # noqa: E402
from jaxssl.data.corpus_builders import ptb_sentences  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

SENTENCES = ptb_sentences('train')[:3000]


def _cfg(vocab_size=400):
  return ml_collections.ConfigDict(dict(vocab_size=vocab_size, model_type='unigram', character_coverage=0.9995,
                                        max_training_sentences=2_000_000))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  return tokenizers.train_tokenizer(SENTENCES, 400, str(tmp_path_factory.mktemp('tok') / 'sp'))


def test_special_ids(tok):
  assert tok.vocab_size == 400
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id, tok.num_special) == (0, 1, 2, 3, 4, 5)
  assert [tok.id_to_piece(i) for i in range(5)] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  ids = [i for row in tok.encode(SENTENCES[:200]) for i in row]
  # plain text never yields [PAD]/[CLS]/[SEP]/[MASK] ([UNK] only for characters beyond character_coverage)
  assert min(set(ids) - {1}) >= 5 and max(ids) < 400
  assert os.path.isfile(tok.model_path) and tok.model_path.endswith('sp.model')


def test_round_trip_and_batch(tok):
  texts = SENTENCES[100:150]
  batch = tok.encode(texts)
  assert batch == [tok.encode_one(t) for t in texts]
  assert [tok.decode(ids) for ids in batch] == texts
  # special ids vanish in decoding
  assert tok.decode([tok.cls_id] + batch[0] + [tok.sep_id, tok.pad_id]) == texts[0]


def test_mask_text_is_not_the_mask_token(tok):
  for text in ['[MASK]', 'the [MASK] said', '[CLS] [SEP] [PAD]']:
    ids = tok.encode_one(text)
    assert not {tok.pad_id, tok.cls_id, tok.sep_id, tok.mask_id} & set(ids), (text, ids)


def test_load_and_serialized(tok):
  again = tokenizers.Tokenizer.load(tok.model_path)
  assert again.vocab_size == tok.vocab_size and again.encode(SENTENCES[:5]) == tok.encode(SENTENCES[:5])
  copy = tokenizers.Tokenizer.from_serialized(tok.serialized())
  assert copy.encode_one(SENTENCES[7]) == tok.encode_one(SENTENCES[7])
  with open(tok.model_path, 'rb') as f:
    assert f.read() == tok.serialized()


def test_vocab_too_large_names_the_limit(tmp_path):
  with pytest.raises(UserError, match=r'--config\.tokenizer\.vocab_size=<=\d+') as e:
    tokenizers.train_tokenizer(SENTENCES[:30], 50_000, str(tmp_path / 'sp'))
  assert '\n' not in str(e.value)
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_vocab_too_small(tmp_path):
  with pytest.raises(UserError, match='special tokens'):
    tokenizers.train_tokenizer(SENTENCES[:30], 5, str(tmp_path / 'sp'))
  with pytest.raises(UserError, match=r'vocab_size=>\d+'):
    tokenizers.train_tokenizer(SENTENCES[:300], 12, str(tmp_path / 'sp'))


def test_deterministic(tmp_path):
  a = tokenizers.train_tokenizer(iter(SENTENCES[:1500]), 300, str(tmp_path / 'a'))
  b = tokenizers.train_tokenizer(list(SENTENCES[:1500]), 300, str(tmp_path / 'b'))
  assert a.serialized() == b.serialized()


def test_max_training_sentences(tmp_path):
  a = tokenizers.train_tokenizer(SENTENCES[:800], 300, str(tmp_path / 'a'))
  b = tokenizers.train_tokenizer(SENTENCES, 300, str(tmp_path / 'b'), max_training_sentences=800)
  assert a.serialized() == b.serialized()


def test_get_or_train_reuses_and_checks_vocab(tmp_path):
  calls = []

  def sentences():
    calls.append(1)
    return iter(SENTENCES[:1500])

  workdir = str(tmp_path / 'work')
  with pytest.raises(RuntimeError, match='waited 0 s for process 0'):
    tokenizers.get_or_train_tokenizer(workdir, sentences, _cfg(300), process_index=1, wait_timeout_s=0)
  assert not calls  # only process 0 trains
  first = tokenizers.get_or_train_tokenizer(workdir, sentences, _cfg(300))
  assert os.path.isfile(os.path.join(workdir, 'tokenizer.model')) and len(calls) == 1
  second = tokenizers.get_or_train_tokenizer(workdir, sentences, _cfg(300))
  assert len(calls) == 1 and second.serialized() == first.serialized()
  other = tokenizers.get_or_train_tokenizer(workdir, sentences, _cfg(300), process_index=3)
  assert other.serialized() == first.serialized()
  with pytest.raises(UserError, match=r'vocab 300 but config asks 400.*vocab_size=300'):
    tokenizers.get_or_train_tokenizer(workdir, sentences, _cfg(400))
  assert not [f for f in os.listdir(workdir) if '.tmp.' in f]


def test_other_process_waits_for_process_0(tmp_path):
  workdir = str(tmp_path / 'work')
  result = {}
  waiter = threading.Thread(target=lambda: result.setdefault('tok', tokenizers.get_or_train_tokenizer(
      workdir, lambda: pytest.fail('process 1 must not train'), _cfg(300), process_index=1, wait_timeout_s=60)))
  waiter.start()
  time.sleep(0.5)
  assert 'tok' not in result
  trained = tokenizers.get_or_train_tokenizer(workdir, lambda: SENTENCES[:1500], _cfg(300), process_index=0)
  waiter.join(timeout=30)
  assert result['tok'].serialized() == trained.serialized()


# ----- one interface: sentencepiece offsets, save, load_tokenizer; WordPiece vs transformers -----

# A BERT-like layout: [PAD]=0, [unused*] around [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103, then ordinary entries.
WP_WORDS = ['!', ',', '.', "'", '?', 'the', 'a', 'company', 'said', 'hello', 'world', 'un', '##aff', '##able',
            'cafe', 'na', '##ive', '中', '文', 'new', 'york', 'stock', '##s', 'is', 'was', 'in', 'of', 'to', 'it',
            'play', '##ing', '##ed', 'run', '##ner', 'mask', '[', ']', 'x', '##y', 'shares', 'rose', 'and']
WP_VOCAB = (['[PAD]'] + [f'[unused{i}]' for i in range(99)] + ['[UNK]', '[CLS]', '[SEP]', '[MASK]', '[unused99]',
            '[unused100]'] + WP_WORDS)
WP_SENTENCES = ['Hello, World! the unaffable café naïve 中文', 'The company said its stock rose in New York.',
                '  playing   and running  ', 'xyzzy is unknown ; so is qq', "it's a play-ed run?", 'Ünaff ABLE',
                '', 'a\tb\u00a0c\u3000new']


def _write_vocab(directory, words=WP_VOCAB, config=None):
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'vocab.txt'), 'w', encoding='utf-8') as f:
    f.write(''.join(w + '\n' for w in words))
  if config is not None:
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f)
  return os.path.join(directory, 'vocab.txt')


@pytest.fixture(scope='module')
def wp_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('wp'))
  _write_vocab(directory, config={'do_lower_case': True})
  return directory


def test_wordpiece_special_ids_and_range(wp_dir):
  wp = tokenizers.load_tokenizer(wp_dir)
  assert isinstance(wp, tokenizers.WordPieceTokenizer) and wp.filename == 'tokenizer.json'
  assert wp.vocab_size == len(WP_VOCAB)
  assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 100, 101, 102, 103)
  assert wp.special_ids == frozenset(range(106))  # the five specials and every [unusedN]
  assert wp.random_token_range == (106, len(WP_VOCAB))
  assert [wp.id_to_piece(i) for i in (0, 100, 103, 106)] == ['[PAD]', '[UNK]', '[MASK]', '!']
  for text in ['[MASK]', 'the [MASK] said', '[CLS] [SEP] [PAD]']:  # text never forges a special token
    assert not {0, 101, 102, 103} & set(wp.encode_one(text)), text


def test_wordpiece_matches_transformers(wp_dir):
  transformers = pytest.importorskip('transformers')
  ref = transformers.BertTokenizerFast.from_pretrained(wp_dir)
  wp = tokenizers.load_tokenizer(os.path.join(wp_dir, 'vocab.txt'))
  batch = wp.encode(WP_SENTENCES)
  with_offsets = wp.encode_with_offsets(WP_SENTENCES)
  for text, ids, (ids2, offsets) in zip(WP_SENTENCES, batch, with_offsets):
    expected = ref(text, add_special_tokens=False, return_offsets_mapping=True)
    assert ids == ids2 == wp.encode_one(text) == expected['input_ids'], text
    assert offsets == [tuple(o) for o in expected['offset_mapping']], text
    assert wp.decode([wp.cls_id] + ids + [wp.sep_id, wp.pad_id]) == ref.decode(ids, skip_special_tokens=True)
  assert batch[0][:3] == [WP_VOCAB.index('hello'), WP_VOCAB.index(','), WP_VOCAB.index('world')]
  ids, offsets = with_offsets[0]
  assert [WP_SENTENCES[0][s:e] for s, e in offsets][5:8] == ['un', 'aff', 'able']
  assert 100 in batch[3]  # unknown words become [UNK]


def test_wordpiece_save_round_trip(wp_dir, tmp_path):
  wp = tokenizers.load_tokenizer(wp_dir)
  path = wp.save(str(tmp_path / 'out'))
  assert path == str(tmp_path / 'out' / 'tokenizer.json')
  again = tokenizers.load_tokenizer(str(tmp_path / 'out'))
  assert again.path == path and again.encode(WP_SENTENCES) == wp.encode(WP_SENTENCES)
  assert again.encode_with_offsets(WP_SENTENCES) == wp.encode_with_offsets(WP_SENTENCES)
  assert again.special_ids == wp.special_ids and again.random_token_range == wp.random_token_range
  assert not {103} & set(again.encode_one('the [MASK] said'))  # the setting is reapplied on load
  # a directory with both files: tokenizer.json wins (it holds the whole pipeline)
  _write_vocab(str(tmp_path / 'out'))
  assert tokenizers.load_tokenizer(str(tmp_path / 'out')).path == path


def test_wordpiece_casing(tmp_path):
  cased = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'The', 'the', 'Company', 'company']
  tok = tokenizers.load_tokenizer(_write_vocab(str(tmp_path / 'cased'), cased))  # inferred: cased
  assert tok.encode_one('The company') == [5, 8] and tok.random_token_range == (5, 9)
  tok = tokenizers.load_tokenizer(_write_vocab(str(tmp_path / 'cfg'), cased, {'do_lower_case': True}))
  assert tok.encode_one('The Company') == [6, 8]
  tok = tokenizers.load_tokenizer(_write_vocab(str(tmp_path / 'lower'), WP_VOCAB))  # inferred: uncased
  assert tok.encode_one('The COMPANY') == [WP_VOCAB.index('the'), WP_VOCAB.index('company')]
  with pytest.raises(UserError, match=r'no \[MASK\] token'):
    tokenizers.load_tokenizer(_write_vocab(str(tmp_path / 'nomask'), cased[:4] + cased[5:]))


def test_sentencepiece_interface_and_offsets(tok):
  assert tok.special_ids == frozenset(range(5)) and tok.random_token_range == (5, 400)
  assert tok.filename == 'tokenizer.model' and tokenizers.Tokenizer is tokenizers.SentencePieceTokenizer
  texts = SENTENCES[:50] + ['café naïve 中文', '  two  spaces ', 'x\u00a0y 1,000 !', '', 'Ünïcödé ok']
  out = tok.encode_with_offsets(texts)
  assert [ids for ids, _ in out] == tok.encode(texts)
  for text, (ids, offsets) in zip(texts, out):
    assert len(ids) == len(offsets)
    previous_end = 0
    for i, (start, end) in zip(ids, offsets):
      assert previous_end <= start <= end <= len(text), (text, offsets)
      previous_end = end
      piece = tok.id_to_piece(i).replace('\u2581', '')
      if i == tok.unk_id:  # unknown characters: the span holds exactly them
        assert end > start and not text[start:end].isspace()
      else:
        assert text[start:end] == piece, (text, piece, start, end)
  ids, offsets = out[50]
  assert ''.join(texts[50][s:e] for s, e in offsets) == 'cafénaïve中文'
  assert [texts[50][s:e] for s, e in offsets if s < e][-1] == '中文'


def test_save_and_load_tokenizer(tok, wp_dir, tmp_path):
  path = tok.save(str(tmp_path / 'sp'))
  assert path == str(tmp_path / 'sp' / 'tokenizer.model')
  with open(path, 'rb') as f:
    assert f.read() == tok.serialized()
  for where in (str(tmp_path / 'sp'), path, tok.model_path):
    loaded = tokenizers.load_tokenizer(where)
    assert isinstance(loaded, tokenizers.SentencePieceTokenizer) and loaded.serialized() == tok.serialized()
  assert isinstance(tokenizers.load_tokenizer(os.path.join(wp_dir, 'vocab.txt')), tokenizers.WordPieceTokenizer)
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(UserError, match=r'no tokenizer in .*tokenizer\.model.*tokenizer\.json.*vocab\.txt'):
    tokenizers.load_tokenizer(str(tmp_path / 'empty'))
  with pytest.raises(UserError, match='not found'):
    tokenizers.load_tokenizer(str(tmp_path / 'missing'))
  (tmp_path / 'bad.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError, match='not a HuggingFace tokenizer.json'):
    tokenizers.load_tokenizer(str(tmp_path / 'bad.json'))


def test_write_export_saves_either_tokenizer(tok, wp_dir, tmp_path):
  import numpy as np
  from jaxssl.train import checkpoint as ckpt_lib
  params = {'w': np.arange(3, dtype=np.float32)}
  ckpt_lib.write_export(str(tmp_path / 'sp'), params, '{}', tok)
  assert sorted(os.listdir(tmp_path / 'sp')) == ['config.json', 'params', 'tokenizer.model']
  ckpt_lib.write_export(str(tmp_path / 'wp'), params, '{}', tokenizers.load_tokenizer(wp_dir))
  assert sorted(os.listdir(tmp_path / 'wp')) == ['config.json', 'params', 'tokenizer.json', 'tokenizer_config.json']
  loaded = tokenizers.load_tokenizer(str(tmp_path / 'wp'))
  assert loaded.cls_id == 101 and loaded.encode(WP_SENTENCES) == tokenizers.load_tokenizer(wp_dir).encode(WP_SENTENCES)
  ckpt_lib.write_export(str(tmp_path / 'old'), params, '{}', tok.model_path)  # a path, as callers passed before
  assert tokenizers.load_tokenizer(str(tmp_path / 'old')).serialized() == tok.serialized()

"""Tokenizer: fixed special ids, round trips, control symbols, clear errors, determinism, workdir reuse."""
import os
import threading
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import ml_collections  # noqa: E402
import pytest  # noqa: E402

from jaxssl.data import tokenizers  # noqa: E402
from jaxssl.data.corpora import ptb_sentences  # noqa: E402
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

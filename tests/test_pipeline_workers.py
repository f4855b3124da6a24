"""Input worker processes (data.num_workers): the same batches, step for step, as the single-process pipeline,
from the start and from a resumed step, for the MLM/NSP, packed-LM and denoising pipelines."""
import ml_collections
import numpy as np
import pytest

from jaxssl.data import corpora, tokenizers
from jaxssl.data.examples import bert_pipeline, denoising, packed_lm
from jaxssl.errors import UserError

WORDS = ('the model reads every sentence of the corpus and predicts the words it cannot see while '
         'workers prepare batches in other processes so the accelerator never waits for input').split()


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A prepared local corpus (TFDS array_record source, as jobs read it) and a sentencepiece tokenizer."""
  root = tmp_path_factory.mktemp('workers')
  rng = np.random.default_rng(0)
  docs = ['\n'.join(' '.join(rng.choice(WORDS, rng.integers(5, 15))) for _ in range(rng.integers(3, 8)))
          for _ in range(40)]
  (root / 'corpus.txt').write_text('\n\n'.join(docs) + '\n')
  sources = corpora.load_corpus(str(root / 'corpus.txt'), str(root / 'data'))
  cfg = ml_collections.ConfigDict(dict(vocab_size=48, model_type='unigram', character_coverage=1.0,
                                       max_training_sentences=10_000))
  tok = tokenizers.get_or_train_tokenizer(str(root / 'tok'), lambda: corpora.iter_sentences(sources['train']), cfg)
  return sources['train'], tok


def _take(it, n):
  try:
    return [next(it) for _ in range(n)]
  finally:
    close = getattr(it, 'close', None)
    if close:
      close()


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_bert_workers_match_one_process(corpus):
  source, tok = corpus
  kw = dict(seq_len=32, max_predictions=5, mask_rate=0.15, short_seq_prob=0.1, seed=3, global_batch_size=4)
  one = _take(bert_pipeline.make_pretrain_iterator(source, tok, num_threads=1, **kw), 6)
  two = _take(bert_pipeline.make_pretrain_iterator(source, tok, num_threads=1, num_workers=2, **kw), 6)
  _assert_same(one, two)
  resumed = _take(bert_pipeline.make_pretrain_iterator(source, tok, start_step=3, num_workers=2, **kw), 3)
  _assert_same(one[3:], resumed)


def test_packed_lm_workers_match_one_process(corpus):
  source, tok = corpus
  kw = dict(seq_len=32, seed=1, global_batch_size=4)
  one = _take(packed_lm.make_lm_iterator(source, tok, num_threads=1, **kw), 5)
  three = _take(packed_lm.make_lm_iterator(source, tok, start_step=2, num_workers=3, **kw), 3)
  _assert_same(one[2:], three)


def test_denoising_workers_match_one_process(corpus):
  source, tok = corpus
  data = ml_collections.ConfigDict(dict(seq_len=32, num_threads=1, num_workers=0,
                                        corruptions=('text_infilling', 'sentence_permutation')))
  one = _take(denoising.make_denoising_iterator(source, tok, data, seed=2, global_batch_size=4), 4)
  data.num_workers = 2
  two = _take(denoising.make_denoising_iterator(source, tok, data, seed=2, global_batch_size=4), 4)
  _assert_same(one, two)


def test_negative_workers_is_a_user_error(corpus):
  source, tok = corpus
  with pytest.raises(UserError, match='num_workers=-1'):
    packed_lm.make_lm_iterator(source, tok, seq_len=32, seed=0, global_batch_size=4, num_workers=-1)

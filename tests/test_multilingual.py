"""Multilingual pretraining: the LANG=CORPUS spec, XLM language sampling (q ∝ p^α, pure in (seed, slot)), one
sentencepiece vocabulary that covers Chinese, and per-language eval metrics from a real pretrain run."""
import json
import os
import pickle
import subprocess
import sys
import unicodedata

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import treebank  # noqa: E402

from jaxssl.data import corpora, multilingual, tokenizers  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ordinary Chinese sentences (no spaces); the test corpus combines them into a few hundred lines.
ZH_SENTENCES = [
    '今天天气很好，我们去公园散步。', '他每天早上六点起床，然后去学校上课。', '这本书讲的是中国古代的历史。',
    '我喜欢喝茶，不太喜欢喝咖啡。', '北京是中国的首都，也是一座历史悠久的城市。', '学生们在图书馆里安静地看书。',
    '妈妈在厨房里做饭，爸爸在客厅看报纸。', '这个问题很难，我们需要更多的时间来研究。', '火车站离这里不远，走路十分钟就到了。',
    '春天来了，花都开了，到处都是绿色。', '他的中文说得非常流利。', '明天下午我们一起去看电影吧。',
    '经济发展需要科学技术的支持。', '孩子们在河边高兴地玩水。', '请把门关上，外面的风很大。',
    '老师告诉我们要认真复习功课。',
]


class _Docs:
  """A Source of n documents whose text names the language and the index."""

  def __init__(self, tag, n):
    self.tag, self.n = tag, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    assert 0 <= i < self.n
    return {'text': f'{self.tag} {i}'.encode()}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def _zh_text(num_docs=60, lines_per_doc=6):
  rng = np.random.default_rng(0)
  docs = []
  for _ in range(num_docs):
    docs.append('\n'.join(''.join(rng.choice(ZH_SENTENCES, 2)) for _ in range(lines_per_doc)))
  return '\n\n'.join(docs) + '\n'


def _en_text(num_docs=60, lines_per_doc=6):
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:num_docs * lines_per_doc]
  return '\n\n'.join('\n'.join(lines[i:i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)) + '\n'


@pytest.fixture(scope='module')
def text_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('multi')
  (root / 'en.txt').write_text(_en_text(), encoding='utf-8')
  (root / 'zh.txt').write_text(_zh_text(), encoding='utf-8')
  return str(root / 'en.txt'), str(root / 'zh.txt')


def test_parse_spec_and_errors():
  assert multilingual.parse_spec('en=ptb, zh=/data/zh.txt') == [('en', 'ptb'), ('zh', '/data/zh.txt')]
  assert multilingual.is_multilingual('en=ptb') and not multilingual.is_multilingual('ptb')
  for bad, words in [('en=ptb,zh=', 'names no corpus'), ('en=ptb,/data/zh.txt', 'no language tag'),
                     ('EN-us=ptb', 'language tag'), ('en=ptb,en=/x', 'more than once'),
                     ('en=ptb,mlm=/x', 'reserved')]:
    with pytest.raises(UserError, match=words):
      multilingual.parse_spec(bad)


def test_language_probabilities_follow_xlm():
  q = multilingual.language_probabilities([900, 100], 0.3)
  expected = np.array([0.9, 0.1]) ** 0.3
  np.testing.assert_allclose(q, expected / expected.sum())
  np.testing.assert_allclose(multilingual.language_probabilities([900, 100], 1.0), [0.9, 0.1])
  np.testing.assert_allclose(multilingual.language_probabilities([900, 100], 0.0), [0.5, 0.5])


def test_mixture_matches_q_is_pure_and_covers_every_document():
  sizes = {'en': 5000, 'zh': 200, 'sw': 37}
  mix = multilingual.MixtureSource({k: _Docs(k, n) for k, n in sizes.items()}, 0.3, seed=1)
  q = multilingual.language_probabilities(list(sizes.values()), 0.3)
  labels = np.array([mix.language_of(g) for g in range(len(mix))])
  shares = np.array([(labels == k).mean() for k in sizes])
  np.testing.assert_allclose(shares, q, atol=1e-3)  # a whole epoch follows q
  # Any long stretch of slots (e.g. the first 2000, which the tokenizer reads) is mixed by q too.
  head = labels[:2000]
  np.testing.assert_allclose([(head == k).mean() for k in sizes], q, atol=0.03)
  # Every document of every language appears; the small ones are repeated about evenly.
  for k, n in sizes.items():
    docs = [mix.locate(g)[1] for g in np.flatnonzero(labels == k)]
    counts = np.bincount(docs, minlength=n)
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1, k
  # Pure in (seed, slot): a fresh mixture agrees document for document; another seed differs.
  again = multilingual.MixtureSource({k: _Docs(k, n) for k, n in sizes.items()}, 0.3, seed=1)
  slots = list(range(0, len(mix), 7))
  assert again.__getitems__(slots) == mix.__getitems__(slots) == [mix[g] for g in slots]
  assert pickle.loads(pickle.dumps(mix)).__getitems__(slots) == mix.__getitems__(slots)  # grain workers
  other = multilingual.MixtureSource({k: _Docs(k, n) for k, n in sizes.items()}, 0.3, seed=2)
  assert other.__getitems__(slots) != mix.__getitems__(slots)


def test_bad_temperature_and_empty_language():
  with pytest.raises(UserError, match='language_temperature'):
    multilingual.MixtureSource({'en': _Docs('en', 3)}, 1.5)
  with pytest.raises(UserError, match="'zh' has no training documents"):
    multilingual.MixtureSource({'en': _Docs('en', 3), 'zh': _Docs('zh', 0)})


def test_load_corpus_and_tokenizer_covers_chinese(text_files, tmp_path):
  en, zh = text_files
  sources = corpora.load_corpus(f'en={en},zh={zh}', str(tmp_path / 'tfds'), seed=0)
  assert set(sources['validation_by_language']) == {'en', 'zh'}
  assert len(sources['validation']) == sum(len(s) for s in sources['validation_by_language'].values())
  with pytest.raises(UserError, match="language 'zh'.*does not exist"):
    corpora.load_corpus(f'en={en},zh={tmp_path}/missing.txt', str(tmp_path / 'tfds'))
  with pytest.raises(UserError, match='data.corpus is empty'):
    corpora.load_corpus('', str(tmp_path / 'tfds'))
  sentences = list(corpora.iter_sentences(sources['train'], limit=2000))
  share_zh = np.mean([not s.isascii() for s in sentences])
  q_zh = sources['train'].probabilities[1]
  assert abs(share_zh - q_zh) < 0.15, (share_zh, q_zh)
  tok = tokenizers.train_tokenizer(sentences, 600, str(tmp_path / 'tok' / 'tokenizer'), character_coverage=0.9995)
  for sentence in ZH_SENTENCES[:5] + ['the company said it would buy shares']:
    ids = tok.encode_one(sentence)
    assert tokenizers.UNK_ID not in ids, sentence
    # Nothing lowercased or lost; sentencepiece's nmt_nfkc folds full-width punctuation ('，' -> ',').
    assert tok.decode(ids) == unicodedata.normalize('NFKC', sentence)


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'jaxssl.pretrain', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


TINY = ['--config', 'configs/bert.py:multilingual_tiny',
        '--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=32',
        '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=400', '--config.train.batch_size=8',
        '--config.train.warmup_steps=2', '--config.log.every_steps=1', '--config.eval.batches=1',
        '--config.data.num_threads=1', '--config.train.steps=4', '--config.eval.every_steps=4',
        '--config.checkpoint.every_steps=4']


def test_pretrain_writes_per_language_eval(text_files, tmp_path):
  en, zh = text_files
  result = _run([*TINY, f'--config.data.corpus=en={en},zh={zh}', f'--config.data.data_dir={tmp_path}/tfds',
                 '--workdir', str(tmp_path / 'w')])
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    records = [json.loads(l) for l in f]
  evals = [r for r in records if 'eval_mlm_loss' in r]
  assert [r['step'] for r in evals] == [4]
  keys = set(evals[0])  # overall and per-language figures in one record
  for key in ('eval_mlm_loss', 'eval_en_mlm_loss', 'eval_zh_mlm_loss', 'eval_en_mlm_accuracy', 'eval_zh_nsp_loss'):
    assert key in keys, sorted(keys)
  saved = json.load(open(tmp_path / 'w' / 'config.json'))
  assert saved['data']['corpus'] == f'en={en},zh={zh}' and saved['data']['language_temperature'] == 0.3


@pytest.mark.parametrize('corpus, words', [('en=ptb,zh=', 'names no corpus'), ('en=ptb,Zh-CN=x', 'language tag'),
                                           ('en=ptb,zh=/no/such/zh.txt', "language 'zh'")])
def test_bad_spec_exits_2_with_one_line(corpus, words, tmp_path):
  result = _run([*TINY, f'--config.data.corpus={corpus}', f'--config.data.data_dir={tmp_path}/tfds',
                 '--workdir', str(tmp_path / 'w')])
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and words in lines[0], result.stderr[-2000:]


def test_next_sentence_negatives_come_from_the_same_language():
  """A random B from another language would be an easy negative: the mixture draws it from the query's language."""
  from jaxssl.data import multilingual
  sources = {'en': [{'text': f'en {i}'} for i in range(50)], 'zh': [{'text': f'zh {i}'} for i in range(7)]}
  mix = multilingual.MixtureSource(sources, alpha=0.3, seed=3)
  rng = np.random.default_rng(0)
  for slot in range(len(mix)):
    other = mix.other_document(rng, slot)
    assert other != slot and mix.language_of(other) == mix.language_of(slot)

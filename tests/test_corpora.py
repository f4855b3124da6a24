"""Corpora: local text as TFDS (documents, splits, caching, errors), PTB pseudo-documents, TFDS names."""
import math
import os
import pickle
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from jaxssl.data import corpora, corpus_builders  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text, mode='w'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, mode) as f:
    f.write(text)


def _docs(source):
  return [r['text'] for r in source.__getitems__(list(range(len(source))))]


def _all_docs(sources):
  return sorted(d for s in ('train', 'validation') for d in _docs(sources[s]))


@pytest.fixture
def corpus_dir(tmp_path):
  root = tmp_path / 'corpus'
  _write(str(root / 'a.txt'), '  first sentence. \nsecond one\n\n\n third doc line\n   \nlast doc\n')
  _write(str(root / 'sub' / 'b.txt'), 'one doc per file\nstill the same doc\n')  # no blank line: one document
  _write(str(root / '.hidden'), 'ignored\n')
  return root


def test_blank_lines_and_one_doc_per_file(corpus_dir, tmp_path):
  sources = corpora.load_corpus(str(corpus_dir), str(tmp_path / 'data'))
  assert _all_docs(sources) == sorted([b'first sentence.\nsecond one', b'third doc line', b'last doc',
                                       b'one doc per file\nstill the same doc'])
  assert len(sources['validation']) == 2  # 4 documents: 2 held out, 2 to train on (NSP needs 2 in each)
  assert sources['train'][0]['text'] in _docs(sources['train'])


def test_sources_pickle(corpus_dir, tmp_path):
  # grain worker processes receive the source pickled
  sources = corpora.load_corpus(str(corpus_dir), str(tmp_path / 'data'))
  copy = pickle.loads(pickle.dumps(sources['train']))
  assert _docs(copy) == _docs(sources['train'])


def test_glob_and_single_file(corpus_dir, tmp_path):
  data = str(tmp_path / 'data')
  assert _all_docs(corpora.load_corpus(str(corpus_dir / '**' / 'b.txt'), data)) == [
      b'one doc per file\nstill the same doc'] * 2  # one document is its own validation set
  assert len(_all_docs(corpora.load_corpus(str(corpus_dir / '*.txt'), data))) == 3
  assert len(_all_docs(corpora.load_corpus(str(corpus_dir / 'a.txt'), data))) == 3


def test_validation_split_nonempty_disjoint_stable(tmp_path):
  text = '\n\n'.join(f'doc {i} sentence one\ndoc {i} sentence two' for i in range(200))
  _write(str(tmp_path / 'c.txt'), text)
  sources = corpora.load_corpus(str(tmp_path / 'c.txt'), str(tmp_path / 'd1'), validation_fraction=0.05)
  train, val = set(_docs(sources['train'])), set(_docs(sources['validation']))
  assert len(val) == 10 and len(train) == 190 and not train & val
  again = corpora.load_corpus(str(tmp_path / 'c.txt'), str(tmp_path / 'd2'), validation_fraction=0.05)
  assert set(_docs(again['validation'])) == val
  tiny = corpora.load_corpus(str(tmp_path / 'c.txt'), str(tmp_path / 'd3'), validation_fraction=0.0)
  assert len(tiny['validation']) == 2  # never fewer: NSP needs another document to draw B from


def test_cached_then_rebuilt_on_change(corpus_dir, tmp_path, monkeypatch):
  data = str(tmp_path / 'data')
  corpora.load_corpus(str(corpus_dir), data)
  calls = []
  original = corpus_builders.JaxsslLocalText._generate_examples

  def counting(self, *args):
    calls.append(1)
    return original(self, *args)

  monkeypatch.setattr(corpus_builders.JaxsslLocalText, '_generate_examples', counting)
  sources = corpora.load_corpus(str(corpus_dir), data)
  assert calls == [] and len(_all_docs(sources)) == 4
  _write(str(corpus_dir / 'c.txt'), 'a new document\n')
  sources = corpora.load_corpus(str(corpus_dir), data)
  assert calls and b'a new document' in _all_docs(sources)
  calls.clear()
  _write(str(corpus_dir / 'a.txt'), 'edited in place\n')
  sources = corpora.load_corpus(str(corpus_dir), data)
  assert calls and b'edited in place' in _all_docs(sources) and b'last doc' not in _all_docs(sources)
  # a different validation share is a different dataset too
  calls.clear()
  corpora.load_corpus(str(corpus_dir), data, validation_fraction=0.5)
  assert calls


_FRESH = """
import sys
from jaxssl.data import corpora, corpus_builders
def boom(*a):
  raise AssertionError('regenerated')
corpus_builders.JaxsslLocalText._generate_examples = boom
corpus_builders.JaxsslPtb._generate_examples = boom
s = corpora.load_corpus(sys.argv[1], sys.argv[2])
print(len(s['train']) + len(s['validation']))
"""


def test_fresh_process_reuses_prepared(corpus_dir, tmp_path):
  data = str(tmp_path / 'data')
  corpora.load_corpus(str(corpus_dir), data)
  out = subprocess.run([sys.executable, '-c', _FRESH, str(corpus_dir), data], cwd=REPO, capture_output=True,
                       text=True, check=True)
  assert out.stdout.strip().splitlines()[-1] == '4'


_RACE = """
import sys
from jaxssl.data import corpora, corpus_builders
original = corpus_builders.JaxsslLocalText._generate_examples
def counting(self, *a):
  with open(sys.argv[3], 'a') as f:
    f.write('x')
  return original(self, *a)
corpus_builders.JaxsslLocalText._generate_examples = counting
s = corpora.load_corpus(sys.argv[1], sys.argv[2])
print(len(s['train']) + len(s['validation']))
"""


def test_concurrent_processes_prepare_once(corpus_dir, tmp_path):
  data, counter = str(tmp_path / 'data'), str(tmp_path / 'counter')
  procs = [subprocess.Popen([sys.executable, '-c', _RACE, str(corpus_dir), data, counter], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs
  assert [o[0].strip().splitlines()[-1] for o in outs] == ['4', '4']
  with open(counter) as f:
    assert f.read() == 'xx'  # one preparation: one train and one validation generator


def test_not_utf8_names_file_and_line_and_writes_nothing(tmp_path):
  _write(str(tmp_path / 'c' / 'ok.txt'), 'fine\n')
  _write(str(tmp_path / 'c' / 'bad.txt'), b'good line\n\nstill good\n\xff\xfe broken\n', mode='wb')
  data = tmp_path / 'data'
  with pytest.raises(UserError) as e:
    corpora.load_corpus(str(tmp_path / 'c'), str(data))
  msg = str(e.value)
  assert 'bad.txt line 4 is not valid UTF-8' in msg and 'fix or remove it' in msg and '\n' not in msg
  assert not (data / 'jaxssl_local_text').exists()


def test_missing_path_and_glob(tmp_path):
  with pytest.raises(UserError, match=r"corpus path '.*nope' does not exist: pass --config\.data\.corpus"):
    corpora.load_corpus(str(tmp_path / 'nope'), str(tmp_path / 'data'))
  with pytest.raises(UserError, match='matches no files'):
    corpora.load_corpus(str(tmp_path / '*.txt'), str(tmp_path / 'data'))
  with pytest.raises(UserError, match='does not exist'):
    corpora.load_corpus('no_such_dataset/en', str(tmp_path / 'data'))
  os.makedirs(tmp_path / 'emptydir')
  with pytest.raises(UserError, match='holds no files'):
    corpora.load_corpus(str(tmp_path / 'emptydir'), str(tmp_path / 'data'))


def test_empty_corpus(tmp_path):
  _write(str(tmp_path / 'c' / 'a.txt'), '\n  \n\t\n')
  _write(str(tmp_path / 'c' / 'b.txt'), '')
  with pytest.raises(UserError, match=r"corpus '.*' is empty"):
    corpora.load_corpus(str(tmp_path / 'c'), str(tmp_path / 'data'))
  assert not (tmp_path / 'data' / 'jaxssl_local_text').exists()


def test_ptb_pseudo_documents(tmp_path):
  sources = corpora.load_corpus('ptb', str(tmp_path / 'data'), ptb_sentences_per_doc=10)
  counts = {'train': 42068, 'validation': 3370, 'test': 3761}
  for split, n in counts.items():
    assert len(sources[split]) == math.ceil(n / 10)
    assert sum(1 for _ in corpora.iter_sentences(sources[split])) == n
    sizes = sorted(len(d.split(b'\n')) for d in _docs(sources[split]))
    assert sizes[-1] == 10 and sizes[1] == 10 and sizes[0] == (n % 10 or 10)
  assert len(list(corpora.iter_sentences(sources['train'], limit=25))) == 25
  assert any(d.startswith(b'aer banknote') for d in _docs(sources['train']))  # the first line is kept


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv('JAXSSL_DATA_DIR', str(tmp_path / 'env'))
  assert corpora.default_data_dir() == str(tmp_path / 'env')
  monkeypatch.delenv('JAXSSL_DATA_DIR')
  assert corpora.default_data_dir().endswith(os.path.join('.cache', 'jaxssl', 'tfds'))


class JaxsslTestWiki(tfds.core.GeneratorBasedBuilder):
  """Stands in for a public TFDS text corpus (registered under its name, train split only)."""
  name = 'jaxssl_test_wiki'
  VERSION = tfds.core.Version('1.0.0')
  code_path = None
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {'text': tfds.features.Text(), 'title': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(300):
      yield i, {'title': f't{i}', 'text': f'\nArticle {i} starts.\n\n  It goes on.  \nEnd {i}.\n'}


def test_public_tfds_name_without_validation_split(tmp_path):
  sources = corpora.load_corpus('jaxssl_test_wiki', str(tmp_path / 'data'))
  assert (len(sources['train']), len(sources['validation'])) == (297, 3)
  docs = _docs(sources['train']) + _docs(sources['validation'])
  assert len(set(docs)) == 300
  assert all(d.startswith(b'Article ') and d.count(b'\n') == 2 and b'\n\n' not in d for d in docs)
  assert sources['validation'][0]['text'].endswith(b'.')
  assert list(corpora.iter_sentences(sources['validation'], limit=2))[1] == 'It goes on.'
  copy = pickle.loads(pickle.dumps(sources['validation']))
  assert _docs(copy) == _docs(sources['validation'])

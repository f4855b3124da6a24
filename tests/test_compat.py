"""Checkpoints and exports written by earlier jaxssl code still restore (tests/fixtures/compat/, written by
tests/fixtures/make_compat.py at commit 0f9bf42): each family's export computes the outputs it
computed then, and each pretraining checkpoint resumes to the same next loss."""
import json
import os
import shutil

import numpy as np
import pytest

from tests.fixtures import make_compat

EXPECTED = json.load(open(os.path.join(make_compat.OUT, 'expected.json')))


@pytest.mark.parametrize('family', sorted(make_compat.TINY))
def test_old_export_computes_the_same_outputs(family):
  outputs = make_compat.outputs(os.path.join(make_compat.OUT, family, 'export'))
  np.testing.assert_allclose(outputs, EXPECTED[family]['outputs'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('family', sorted(make_compat.TINY))
def test_old_checkpoint_resumes_to_the_same_loss(family, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(os.path.join(make_compat.OUT, family, 'run'), workdir)
  corpus = os.path.join(make_compat.OUT, 'corpus.txt')
  make_compat.run('jaxssl.pretrain', *make_compat.job_args(family, workdir, corpus, 3))
  assert make_compat.last_loss(workdir)['step'] == 3
  assert make_compat.last_loss(workdir)['loss'] == pytest.approx(EXPECTED[family]['resumed_step3_loss'], abs=1e-5)

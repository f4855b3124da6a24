"""Failure drills on real job processes, the CI subset of `python benchmarks/drills.py` (same functions, fewer
kills): kill -9 inside an async checkpoint write and inside a keep-rule deletion, SIGTERM to a single process, the
export job killed mid-write and mid-overwrite, SIGTERM to a fine-tune job. Each outcome is compared with an
uninterrupted run bit for bit. The full set (10 kills, the 2x4 → 4x2 → 1x8 elastic legs, NaN, two jobs, changed
corpus, full disk) is the script's."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import drills  # noqa: E402


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  site = drills.Site.create(str(tmp_path_factory.mktemp('drills')), steps=150)
  site.reference()
  return site


def test_kill9_inside_an_async_save_then_sigterm_resume_exactly(site):
  """kill -9 while orbax writes a checkpoint, SIGTERM (exit 0, 'saved step N'), kill -9 while orbax deletes a
  checkpoint past checkpoint.keep: each rerun resumes from the newest finished checkpoint, every checkpoint equals
  the uninterrupted run's, and so does metrics.jsonl, record for record."""
  result = drills.interrupted_run(site, 'ci', ['kill-save', 'sigterm', 'kill-delete'], seed=1)
  kill_save, sigterm, _ = result['interruptions']
  assert kill_save['this_write_cut'], 'the kill did not land inside the checkpoint write'
  assert sigterm['rc'] == 0 and sigterm['saved'] >= sigterm['target_step']
  assert not result['set_aside'] and not result['unreadable_reported']
  assert result['records_compared'] >= 150


def test_export_killed_mid_write_and_mid_overwrite(site):
  result = drills.export_drill(site, kills=1, seed=1)
  assert set(result['overwrite_kills']) <= {'older', 'newer', 'finished first'}


def test_finetune_sigterm_resumes_exactly(site):
  result = drills.finetune_sigterm_drill(site, seed=1)
  assert result['saved'] >= result['target_step']

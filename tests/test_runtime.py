"""Joining a multi-process job: flag/environment precedence and every incomplete or impossible setting's message."""
import argparse

import pytest

from jaxssl import runtime
from jaxssl.errors import UserError


def args(**kwargs):
  parser = argparse.ArgumentParser()
  runtime.add_distributed_args(parser)
  flags = [f'--{k.replace("_", "-")}={v}' for k, v in kwargs.items()]
  return parser.parse_args(flags)


@pytest.mark.parametrize('given, message', [
    (dict(coordinator='127.0.0.1:1234'), 'needs all of --coordinator HOST:PORT, --num-processes N and --process-id'),
    (dict(coordinator='127.0.0.1:1234', num_processes=2, process_id=2), r'--process-id=2 must be in \[0, '),
    (dict(heartbeat_timeout=0), '--heartbeat-timeout=0 must be at least 1 second'),
])
def test_incomplete_or_impossible_settings(given, message, monkeypatch):
  for name in ('JAXSSL_COORDINATOR', 'JAXSSL_NUM_PROCESSES', 'JAXSSL_PROCESS_ID', 'JAXSSL_DISTRIBUTED'):
    monkeypatch.delenv(name, raising=False)
  with pytest.raises(UserError, match=message):
    runtime.setup(args(**given))


def test_environment_fills_in_and_flags_win(monkeypatch):
  monkeypatch.setenv('JAXSSL_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAXSSL_PROCESS_ID', '7')
  monkeypatch.delenv('JAXSSL_COORDINATOR', raising=False)
  # The flag's process id (1) wins over the environment's (7); the count comes from the environment.
  with pytest.raises(UserError, match='needs all of --coordinator'):
    runtime.setup(args(process_id=1))
  assert runtime._setting(args(process_id=1), 'process_id', 'JAXSSL_PROCESS_ID', int) == 1
  assert runtime._setting(args(), 'num_processes', 'JAXSSL_NUM_PROCESSES', int) == 4
  monkeypatch.setenv('JAXSSL_NUM_PROCESSES', 'four')
  with pytest.raises(UserError, match="JAXSSL_NUM_PROCESSES='four' must be an integer"):
    runtime.setup(args())


def test_cluster_detection(monkeypatch):
  for name in ('JAXSSL_DISTRIBUTED', 'SLURM_JOB_ID', 'SLURM_NTASKS', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(name, raising=False)
  assert not runtime._cluster_detected()
  monkeypatch.setenv('SLURM_JOB_ID', '42')
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not runtime._cluster_detected()  # one task: nothing to join
  monkeypatch.setenv('SLURM_NTASKS', '16')
  assert runtime._cluster_detected()
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  assert runtime._cluster_detected()


def test_bucket_workdir_is_refused():
  runtime.check_workdir('/mnt/bucket/run')
  with pytest.raises(UserError, match='--config.checkpoint.directory=gs://'):
    runtime.check_workdir('gs://bucket/run')

"""tpu/pod.py (the gcloud command lines of every subcommand, checked in --dry-run) and tpu/slurm/pretrain.sbatch."""
import importlib.util
import os
import re
import shlex
import subprocess
import tarfile
import types

import pytest

TPU_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tpu')
SPEC = importlib.util.spec_from_file_location('pod', os.path.join(TPU_DIR, 'pod.py'))
pod = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(pod)

WHERE = ['--name', 'bert-pod', '--zone', 'us-west4-a']
BASH_N = subprocess.run  # kept for `bash -n`, the one process these tests start


def dry_run(capsys, *argv: str) -> list[str]:
  """The lines pod.py prints for argv with --dry-run."""
  assert pod.main([*argv[:1], *WHERE, '--dry-run', *argv[1:]]) == 0
  out, err = capsys.readouterr()
  assert err == ''
  return out.splitlines()


def remote_command(line: str) -> str:
  """The --command argument of a printed gcloud ssh line, as the worker's shell receives it."""
  argv = shlex.split(line)
  return argv[argv.index('--command') + 1]


@pytest.fixture(autouse=True)
def no_subprocess(monkeypatch):
  """Nothing here may start gcloud (or anything else) unless a test says so."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'unexpected subprocess: {args}')
  monkeypatch.setattr(subprocess, 'run', refuse)


def test_create_prints_the_request_and_the_poll(capsys):
  assert dry_run(capsys, 'create') == [
      'gcloud compute tpus queued-resources create bert-pod --node-id bert-pod --zone us-west4-a '
      '--accelerator-type v5litepod-256 --runtime-version v2-alpha-tpuv5-lite',
      "gcloud compute tpus queued-resources describe bert-pod --zone us-west4-a '--format=value(state.state)'",
  ]


def test_create_with_project_spot_and_queued_resource_id(capsys):
  lines = dry_run(capsys, 'create', '--project', 'my-proj', '--spot', '--queued-resource-id', 'qr-1',
                  '--accelerator-type', 'v5litepod-16')
  assert lines == [
      'gcloud compute tpus queued-resources create qr-1 --node-id bert-pod --zone us-west4-a --project my-proj '
      '--accelerator-type v5litepod-16 --runtime-version v2-alpha-tpuv5-lite --spot',
      "gcloud compute tpus queued-resources describe qr-1 --zone us-west4-a --project my-proj "
      "'--format=value(state.state)'",
  ]


def test_create_best_effort_uses_the_alpha_track(capsys):
  # gcloud has --best-effort only in its alpha track.
  lines = dry_run(capsys, 'create', '--best-effort', '--no-wait')
  assert lines == [
      'gcloud alpha compute tpus queued-resources create bert-pod --node-id bert-pod --zone us-west4-a '
      '--accelerator-type v5litepod-256 --runtime-version v2-alpha-tpuv5-lite --best-effort',
  ]


def test_spot_and_best_effort_together_is_an_argument_error(capsys):
  with pytest.raises(SystemExit) as e:
    pod.main(['create', *WHERE, '--spot', '--best-effort', '--dry-run'])
  assert e.value.code == 2
  assert 'not allowed with' in capsys.readouterr().err


def test_install_copies_a_tarball_and_installs_the_pinned_jax_tpu(capsys, tmp_path):
  (tmp_path / 'requirements.txt').write_text('# pins\njaxlib==1.2.3\njax==1.2.3\nflax==0.1\n')
  lines = dry_run(capsys, 'install', '--repo-dir', str(tmp_path), '--remote-dir', '~/my jaxssl',
                  '--python', 'python3.11', '--project', 'p')
  assert lines[0] == (f'# (in Python) cd {tmp_path} && git ls-files --cached --others --exclude-standard | '
                      "tar czf '<tmpdir>/jaxssl.tar.gz' -T -")
  assert lines[1:] == [
      "gcloud compute tpus tpu-vm scp --worker=all --zone us-west4-a --project p '<tmpdir>/jaxssl.tar.gz' "
      'bert-pod:jaxssl.tar.gz',
      'gcloud compute tpus tpu-vm ssh bert-pod --zone us-west4-a --project p --worker=all --command '
      + shlex.quote("mkdir -p ~/'my jaxssl' && cd ~/'my jaxssl' && tar xzf ~/jaxssl.tar.gz && "
                    "python3.11 -m venv .venv && .venv/bin/pip install -r requirements.txt 'jax[tpu]==1.2.3'"),
  ]


def test_install_reads_the_jax_pin_of_this_repository(capsys):
  with open(os.path.join(os.path.dirname(TPU_DIR), 'requirements.txt')) as f:
    pin = re.search(r'^jax==(\S+)$', f.read(), re.M).group(1)
  setup = remote_command(dry_run(capsys, 'install')[-1])
  assert setup.startswith('mkdir -p ~/jaxssl && cd ~/jaxssl && tar xzf ~/jaxssl.tar.gz && python3 -m venv .venv')
  assert setup.endswith(f".venv/bin/pip install -r requirements.txt 'jax[tpu]=={pin}'")


def test_install_without_a_jax_pin_is_one_error_line(capsys, tmp_path):
  (tmp_path / 'requirements.txt').write_text('flax==0.1\n')
  assert pod.main(['install', *WHERE, '--repo-dir', str(tmp_path), '--dry-run']) == 2
  out, err = capsys.readouterr()
  assert out == ''
  assert err.count('\n') == 1 and 'has no `jax==VERSION` line' in err


def test_run_starts_the_job_on_every_worker(capsys):
  lines = dry_run(capsys, 'run', '--workdir', '/mnt/bucket/run', '--job-id', 'base-1', '--',
                  'python', '-m', 'jaxssl.pretrain', '--config', 'configs/bert.py:base')
  assert lines == [
      'gcloud compute tpus tpu-vm ssh bert-pod --zone us-west4-a --worker=all --command '
      "'cd ~/jaxssl && JAXSSL_DISTRIBUTED=auto nohup .venv/bin/python -m jaxssl.pretrain --config "
      "configs/bert.py:base --workdir /mnt/bucket/run > ~/jaxssl-base-1.log 2>&1 < /dev/null &'",
  ]


def test_run_quotes_the_job_command_and_sets_the_data_dir(capsys):
  job = ['python3', '-m', 'jaxssl.pretrain', '--config', 'configs/bert.py:base',
         "--config.data.corpus=/data/it's here/*.txt", '--config.note="a b"', '$HOME;rm -rf /']
  lines = dry_run(capsys, 'run', '--data-dir', 'gs://bucket/tfds', '--job-id', 'j', '--project', 'p', '--', *job)
  assert len(lines) == 1
  assert shlex.split(lines[0])[:10] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'bert-pod', '--zone',
                                        'us-west4-a', '--project', 'p']
  remote = remote_command(lines[0])
  prefix = 'cd ~/jaxssl && JAXSSL_DISTRIBUTED=auto JAXSSL_DATA_DIR=gs://bucket/tfds nohup '
  suffix = ' > ~/jaxssl-j.log 2>&1 < /dev/null &'
  assert remote.startswith(prefix) and remote.endswith(suffix)
  # The worker's shell splits the job back into exactly the words given, nothing expanded.
  assert shlex.split(remote[len(prefix):-len(suffix)]) == ['.venv/bin/python3', *job[1:]]


def test_run_leaves_other_programs_and_paths_alone(capsys):
  lines = dry_run(capsys, 'run', '--job-id', 'j', '--', '/opt/py/bin/python', '-m', 'jaxssl.bench')
  assert 'nohup /opt/py/bin/python -m jaxssl.bench > ' in remote_command(lines[0])
  lines = dry_run(capsys, 'run', '--job-id', 'j', '--', 'bash', '-c', 'echo hi')
  assert "nohup bash -c 'echo hi' > " in remote_command(lines[0])


def test_run_default_job_id_is_the_time(capsys):
  remote = remote_command(dry_run(capsys, 'run', '--', 'python', '-m', 'jaxssl.pretrain')[0])
  assert re.search(r' > ~/jaxssl-\d{8}-\d{6}\.log 2>&1', remote)


def test_run_functions_can_be_called_directly():
  args = pod.parse_args(['run', *WHERE, '--job-id', 'x', '--', 'python', '-m', 'jaxssl.pretrain'])
  (command,) = pod.run_commands(args)
  assert command[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'bert-pod', '--zone', 'us-west4-a',
                         '--worker=all']
  assert command[9] == '--command'


@pytest.mark.parametrize('argv', [
    ['run', *WHERE, '--dry-run'],  # no job command
    ['run', *WHERE, '--dry-run', '--'],  # an empty one
    ['stop', *WHERE, '--dry-run', '--', 'python'],  # a job command where none belongs
    ['run', *WHERE, '--job-id', 'a b', '--dry-run', '--', 'python'],
    ['logs', *WHERE, '--worker', '-1', '--dry-run'],
    ['logs', *WHERE, '--worker', 'all', '--dry-run'],
    ['status', '--zone', 'us-west4-a', '--dry-run'],  # no --name
    ['status', '--name', 'bert-pod', '--dry-run'],  # no --zone
    ['reboot', *WHERE, '--dry-run'],
    [],
])
def test_argument_mistakes_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    pod.main(argv)
  assert e.value.code == 2
  out, err = capsys.readouterr()
  assert out == '' and 'error:' in err


def test_workdir_given_twice_is_refused(capsys):
  argv = ['run', *WHERE, '--workdir', '/mnt/b/r', '--dry-run', '--', 'python', '-m', 'jaxssl.pretrain',
          '--workdir=/mnt/b/other']
  assert pod.main(argv) == 2
  out, err = capsys.readouterr()
  assert out == '' and err.count('\n') == 1 and 'given twice' in err


def test_bucket_workdir_goes_to_the_job(capsys):
  """A gs:// workdir needs no shared file system (jaxssl/storage.py): pod.py passes it to the job as it is."""
  lines = dry_run(capsys, 'run', '--workdir', 'gs://b/r', '--job-id', 'j', '--', 'python', '-m', 'jaxssl.pretrain')
  assert '--workdir gs://b/r' in lines[-1]


def test_logs_follows_the_newest_log_on_worker_0(capsys):
  assert dry_run(capsys, 'logs') == [
      'gcloud compute tpus tpu-vm ssh bert-pod --zone us-west4-a --worker=0 --command '
      '\'tail -F "$(ls -t ~/jaxssl-*.log | head -1)"\'',
  ]
  assert dry_run(capsys, 'logs', '--worker', '3', '--job-id', 'base-1', '--project', 'p') == [
      "gcloud compute tpus tpu-vm ssh bert-pod --zone us-west4-a --project p --worker=3 --command "
      "'tail -F ~/jaxssl-base-1.log'",
  ]


def test_stop_sends_sigterm_on_every_worker(capsys):
  lines = dry_run(capsys, 'stop')
  assert lines == [
      'gcloud compute tpus tpu-vm ssh bert-pod --zone us-west4-a --worker=all --command '
      + shlex.quote('pkill -TERM -f "[p]ython -m jaxssl" || echo "no jaxssl job on $(hostname)"'),
  ]
  # The pattern matches the job's command line but not the one of the shell that runs pkill.
  pattern = shlex.split(remote_command(lines[0]))[3]
  assert re.search(pattern, '.venv/bin/python -m jaxssl.pretrain --config configs/bert.py:base')
  assert not re.search(pattern, remote_command(lines[0]))


def test_delete_and_status(capsys):
  assert dry_run(capsys, 'delete') == [
      'gcloud compute tpus queued-resources delete bert-pod --zone us-west4-a --force --quiet']
  assert dry_run(capsys, 'delete', '--queued-resource-id', 'qr-1', '--project', 'p') == [
      'gcloud compute tpus queued-resources delete qr-1 --zone us-west4-a --project p --force --quiet']
  assert dry_run(capsys, 'status') == ['gcloud compute tpus queued-resources describe bert-pod --zone us-west4-a']
  assert dry_run(capsys, 'status', '--project', 'p') == [
      'gcloud compute tpus queued-resources describe bert-pod --zone us-west4-a --project p']


@pytest.mark.parametrize('command', ['create', 'install', 'logs', 'stop', 'delete', 'status'])
def test_missing_gcloud_is_one_line_and_exit_2(command, capsys, monkeypatch):
  monkeypatch.setattr(pod.shutil, 'which', lambda name: None)
  assert pod.main([command, *WHERE]) == 2
  out, err = capsys.readouterr()
  assert out == ''
  assert err.count('\n') == 1
  assert err.startswith('error: gcloud not found: install the Google Cloud SDK') and '--dry-run' in err


def test_dry_run_needs_no_gcloud(capsys, monkeypatch):
  monkeypatch.setattr(pod.shutil, 'which', lambda name: None)
  assert len(dry_run(capsys, 'stop')) == 1


class FakeGcloud:
  """Stands in for subprocess.run: records commands; `describe` answers the next of the given states."""

  def __init__(self, states=(), returncode=0):
    self.calls = []
    self.states = list(states)
    self.returncode = returncode

  def __call__(self, argv, **kwargs):
    self.calls.append(list(argv))
    if 'describe' in argv:
      return types.SimpleNamespace(returncode=0, stdout=self.states.pop(0) + '\n', stderr='')
    return types.SimpleNamespace(returncode=self.returncode, stdout='', stderr='')


@pytest.fixture
def gcloud(monkeypatch):
  monkeypatch.setattr(pod.shutil, 'which', lambda name: '/usr/bin/gcloud')
  monkeypatch.setattr(pod.time, 'sleep', lambda seconds: None)
  def install(**kwargs):
    fake = FakeGcloud(**kwargs)
    monkeypatch.setattr(subprocess, 'run', fake)
    return fake
  return install


def test_create_waits_until_active_printing_each_state_once(gcloud, capsys):
  fake = gcloud(states=['WAITING_FOR_RESOURCES', 'WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  assert pod.main(['create', *WHERE]) == 0
  assert len(fake.calls) == 5 and fake.calls[0][4] == 'create' and not fake.states
  assert capsys.readouterr().out.splitlines() == [
      'queued resource bert-pod: WAITING_FOR_RESOURCES',
      'queued resource bert-pod: PROVISIONING',
      'queued resource bert-pod: ACTIVE',
  ]


@pytest.mark.parametrize('state', ['FAILED', 'SUSPENDED'])
def test_create_fails_with_one_line_when_the_request_fails(state, gcloud, capsys):
  gcloud(states=['ACCEPTED', state])
  assert pod.main(['create', *WHERE]) == 2
  err_lines = [l for l in capsys.readouterr().err.splitlines() if not l.startswith('+ ')]
  assert len(err_lines) == 1 and err_lines[0].startswith(f'error: queued resource bert-pod is {state}')


def test_create_no_wait_does_not_poll(gcloud):
  fake = gcloud()
  assert pod.main(['create', *WHERE, '--no-wait']) == 0
  assert len(fake.calls) == 1


def test_a_failing_gcloud_command_passes_its_status_on(gcloud, capsys):
  fake = gcloud(returncode=1)
  assert pod.main(['stop', *WHERE]) == 1
  assert fake.calls == [pod.stop_commands(pod.parse_args(['stop', *WHERE]))[0]]
  assert 'exited with status 1' in capsys.readouterr().err


def test_run_for_real_says_how_to_follow_the_job(gcloud, capsys):
  fake = gcloud()
  assert pod.main(['run', *WHERE, '--job-id', 'j7', '--', 'python', '-m', 'jaxssl.pretrain']) == 0
  assert len(fake.calls) == 1 and fake.calls[0][5] == 'bert-pod'
  assert '--job-id j7' in capsys.readouterr().out


def test_install_for_real_ships_a_tarball_of_the_listed_files(gcloud, monkeypatch, tmp_path):
  (tmp_path / 'requirements.txt').write_text('jax==1.2.3\n')
  (tmp_path / 'pkg').mkdir()
  (tmp_path / 'pkg' / 'a.py').write_text('A = 1\n')
  (tmp_path / 'untracked.txt').write_text('not listed\n')
  monkeypatch.setattr(pod, 'tracked_files', lambda repo: ['requirements.txt', 'pkg/a.py', 'deleted.py'])
  shipped = {}
  fake = gcloud()
  def run(argv, **kwargs):
    if argv[4] == 'scp':  # read the tarball while it exists
      with tarfile.open(argv[-2]) as tar:
        shipped.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return fake(argv, **kwargs)
  monkeypatch.setattr(subprocess, 'run', run)
  assert pod.main(['install', *WHERE, '--repo-dir', str(tmp_path)]) == 0
  assert [c[4] for c in fake.calls] == ['scp', 'ssh']
  assert shipped == {'requirements.txt': b'jax==1.2.3\n', 'pkg/a.py': b'A = 1\n'}
  assert not os.path.exists(fake.calls[0][-2])  # the temporary tarball is gone


SBATCH = os.path.join(TPU_DIR, 'slurm', 'pretrain.sbatch')


def test_sbatch_script_parses_and_has_the_key_lines():
  result = BASH_N(['bash', '-n', SBATCH], capture_output=True, text=True, timeout=30, check=False)
  assert result.returncode == 0, result.stderr
  with open(SBATCH) as f:
    text = f.read()
  lines = text.splitlines()
  assert lines[0] == '#!/bin/bash'
  for line in ['#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
               '#SBATCH --time=24:00:00', '#SBATCH --signal=B:USR1@120', '#SBATCH --requeue',
               'export JAXSSL_DISTRIBUTED=auto']:
    assert line in lines, line
  # sbatch reads #SBATCH lines only up to the first command.
  first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith('#'))
  assert all(i < first_command for i, l in enumerate(lines) if l.startswith('#SBATCH'))
  assert re.search(r'^srun .*-m jaxssl\.pretrain --config configs/bert\.py:base --workdir "\$WORKDIR"', text, re.M)
  assert 'JAX_LOCAL_DEVICE_IDS' in text  # else each process would get one GPU of its node
  assert 'scontrol requeue' in text

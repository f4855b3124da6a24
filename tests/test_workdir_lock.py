"""One job per workdir (jaxssl/train/workdir_lock.py): a second job on a workdir in use refuses with one line naming
the first; a lock whose holder was killed (-9) is taken over, locally (flock) and in a bucket (a lease with a
heartbeat); the jobs take the lock before writing anything and release it however they end."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import treebank
from gcs_server import gcs_bucket  # noqa: F401  (a pytest fixture)

from jaxssl import storage
from jaxssl.errors import UserError
from jaxssl.train import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config', 'configs/bert.py:tiny',
        '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=32',
        '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8',
        '--config.train.warmup_steps=5', '--config.log.every_steps=1', '--config.eval.batches=2',
        '--config.data.num_threads=1']


def job(args, module='jaxssl.pretrain', wait=True, extra_env=None):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu',
             PYTHONUNBUFFERED='1', **(extra_env or {}))
  cmd = [sys.executable, '-m', module, *args]
  if wait:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_line(result) -> str:
  """The one `error:` line a refused job ends with (exit status 2, no traceback)."""
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = [l for l in result.stderr.strip().split('\n') if l.strip()]
  assert [l for l in lines if l.startswith('error: ')] == lines[-1:], result.stderr[-3000:]
  assert 'Traceback' not in result.stderr
  return lines[-1]


def holder_process(workdir):
  """Another process holding the lock on `workdir` (as a job would), and the line it printed once it did."""
  code = ('import sys, time\nfrom jaxssl.train import workdir_lock\n'
          f'workdir_lock.acquire({str(workdir)!r}, "pretrain")\nprint("held", flush=True)\ntime.sleep(300)\n')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.stdout.readline().strip() == 'held'
  return proc


# ----- a local workdir -----

def test_local_lock_refuses_then_releases(tmp_path):
  workdir = str(tmp_path / 'run')
  lock = workdir_lock.acquire(workdir, 'pretrain')
  recorded = json.loads(open(os.path.join(workdir, 'job.lock')).read())
  assert recorded['pid'] == os.getpid() and recorded['job'] == 'pretrain'
  assert recorded['host'] == socket.gethostname()
  with pytest.raises(UserError) as refused:  # another open file description: flock refuses it, as another process
    workdir_lock.acquire(workdir, 'finetune')
  line = str(refused.value)
  assert '\n' not in line
  for words in (f'--workdir {workdir} is in use by a pretrain job', f'pid {os.getpid()} on {socket.gethostname()}',
                'started 20', 'running `', 'or use another --workdir'):
    assert words in line, line
  lock.release()
  assert not os.path.exists(workdir)  # the lock made it; empty again, it is removed
  os.makedirs(os.path.join(workdir, 'checkpoints'))
  again = workdir_lock.acquire(workdir, 'pretrain')
  again.release()
  assert os.listdir(workdir) == ['checkpoints']  # a workdir with files stays


def test_local_lock_of_a_killed_holder_is_taken_over(tmp_path):
  workdir = tmp_path / 'run'
  holder = holder_process(workdir)
  with pytest.raises(UserError, match=f'pid {holder.pid} on'):
    workdir_lock.acquire(str(workdir), 'pretrain')
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert (workdir / 'job.lock').exists()  # nothing released it: the kernel dropped the flock
  said = []
  lock = workdir_lock.acquire(str(workdir), 'pretrain', say=lambda *a, **k: said.append(a[0]))
  assert len(said) == 1 and f'taking over {workdir} from a pretrain job: pid {holder.pid}' in said[0], said
  assert 'ended without releasing it' in said[0]
  lock.release()


# ----- a bucket workdir -----

def _write_lease(url, **fields):
  holder = {**workdir_lock.describe_self('pretrain', 30.0), **fields}
  storage.write_text(storage.join(url, 'job.lock'), json.dumps(holder))
  return holder


def _lease(url):
  return json.loads(storage.read_text(storage.join(url, 'job.lock')))


def test_bucket_lease_fresh_is_refused_stale_is_taken_over(gcs_bucket):
  url = f'{gcs_bucket}/lock-stale'
  other = _write_lease(url, host='other-host', pid=4242, command='python -m jaxssl.pretrain --workdir X')
  with pytest.raises(UserError) as refused:
    workdir_lock.acquire_lease(url, 'pretrain', stale_s=60, settle_s=0.1)
  line = str(refused.value)
  assert 'pid 4242 on other-host' in line and 'last heartbeat 0 s ago' in line and '--workdir X' in line, line
  assert _lease(url)['token'] == other['token']  # refused: untouched

  _write_lease(url, host='other-host', pid=4242, heartbeat=time.time() - 100, heartbeat_s=10)
  said = []
  lease = workdir_lock.acquire_lease(url, 'finetune', say=lambda *a, **k: said.append(a[0]), stale_s=60,
                                     settle_s=0.1)
  try:
    assert len(said) == 1 and 'from a pretrain job: pid 4242 on other-host' in said[0], said
    assert 'no heartbeat for 100 s' in said[0]
    assert _lease(url)['pid'] == os.getpid() and _lease(url)['job'] == 'finetune'
  finally:
    lease.release()
  assert not storage.exists(storage.join(url, 'job.lock'))


def test_bucket_lease_of_a_dead_process_on_this_machine_is_stale_at_once(gcs_bucket):
  url = f'{gcs_bucket}/lock-dead'
  gone = subprocess.Popen(['true'])
  gone.wait()
  _write_lease(url, pid=gone.pid)  # this host and boot, heartbeat just now
  said = []
  lease = workdir_lock.acquire_lease(url, 'pretrain', say=lambda *a, **k: said.append(a[0]), settle_s=0.1)
  lease.release()
  assert len(said) == 1 and f'its process {gone.pid} on this machine is gone' in said[0], said


def test_bucket_lease_heartbeat_and_lost_lease(gcs_bucket):
  url = f'{gcs_bucket}/lock-beat'
  lost = threading.Event()
  messages = []
  lease = workdir_lock.acquire_lease(url, 'pretrain', heartbeat_s=0.3, settle_s=0.1,
                                     on_lost=lambda m: (messages.append(m), lost.set()))
  try:
    first = _lease(url)['heartbeat']
    deadline = time.time() + 20
    while _lease(url)['heartbeat'] == first and time.time() < deadline:
      time.sleep(0.1)
    assert _lease(url)['heartbeat'] > first  # the daemon thread keeps it fresh
    # A job on another host that found it stale took it over: this holder must notice and stop.
    _write_lease(url, host='other-host', pid=777)
    assert lost.wait(20), 'the holder did not notice its lease was taken'
    assert 'pid 777 on other-host' in messages[0]
  finally:
    lease.release()
  assert _lease(url)['pid'] == 777  # release never deletes another job's lease


def test_bucket_lease_two_jobs_at_once_one_wins(gcs_bucket, monkeypatch):
  """Four jobs find no lease at the same moment, then write theirs 0.2 s apart (slow requests), on a server without
  preconditions: writing, waiting settle_s (longer than those gaps) and reading back leaves exactly one holding
  it. (With settle_s=0 the first two would both go on.)"""
  url = f'{gcs_bucket}/lock-race'
  outcomes, start, delay = [], threading.Barrier(4), threading.local()
  create = workdir_lock.LeaseObject.create

  def slow_create(self, holder):
    time.sleep(delay.s)
    return create(self, holder)

  monkeypatch.setattr(workdir_lock.LeaseObject, 'create', slow_create)

  def take(i):
    delay.s = 0.2 * i
    start.wait()
    try:
      outcomes.append(workdir_lock.acquire_lease(url, 'pretrain', settle_s=1.0))
    except UserError as e:
      outcomes.append(str(e))

  threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(60)
  held = [o for o in outcomes if isinstance(o, workdir_lock.Lease)]
  assert len(outcomes) == 4 and len(held) == 1, outcomes
  assert all('is in use by a pretrain job' in o for o in outcomes if isinstance(o, str))
  held[0].release()


# ----- the jobs -----

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp('corpus') / 'ptb_docs.txt'
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:1200]
  path.write_text('\n\n'.join('\n'.join(lines[i:i + 12]) for i in range(0, len(lines), 12)) + '\n')
  return str(path)


def test_second_pretrain_job_refused_then_takes_over_after_kill9(corpus, tmp_path):
  workdir = tmp_path / 'run'
  args = [*TINY, f'--config.data.corpus={corpus}', '--config.train.steps=100000', '--config.checkpoint.every_steps=5',
          '--config.eval.every_steps=50000', '--workdir', str(workdir)]
  first = job(args, wait=False)
  try:
    deadline = time.time() + 120
    while not [d for d in (os.listdir(workdir / 'checkpoints') if (workdir / 'checkpoints').exists() else [])
               if d.isdigit()]:
      assert first.poll() is None, first.communicate()[1][-3000:]
      assert time.time() < deadline, 'no checkpoint in 120 s'
      time.sleep(0.1)
    second = job(args)
    line = error_line(second)
    assert f'is in use by a pretrain job: pid {first.pid} on {socket.gethostname()}' in line, line
    assert 'jaxssl.pretrain' in line and 'resuming' not in second.stdout and 'step ' not in second.stdout
  finally:
    first.send_signal(signal.SIGKILL)
    first.communicate()
  saved = max(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit())

  third = job(args, wait=False)
  out = []
  for text in iter(third.stdout.readline, ''):  # until it trains (its SIGTERM handler is in place by then)
    out.append(text)
    if text.startswith('step ') and any('resuming from step' in l for l in out):
      break
  third.send_signal(signal.SIGTERM)  # preempted: saves, releases the lock, exits 0
  rest, err = third.communicate(timeout=120)
  out = ''.join(out) + rest
  assert third.returncode == 0, err[-3000:]
  assert f'taking over {workdir} from a pretrain job: pid {first.pid}' in out, out[-3000:]
  assert int(out.split('resuming from step ')[1].split()[0]) >= saved  # from the killed job's checkpoint
  assert not (workdir / 'job.lock').exists()


@pytest.mark.parametrize('module', ['jaxssl.pretrain', 'jaxssl.finetune'])
def test_refused_job_touches_nothing(corpus, tmp_path, module):
  workdir = tmp_path / 'held'
  lock = workdir_lock.acquire(str(workdir), 'finetune')
  before = (workdir / 'job.lock').read_bytes()
  try:
    if module == 'jaxssl.pretrain':
      args = [*TINY, f'--config.data.corpus={corpus}', '--workdir', str(workdir)]
    else:
      export = os.path.join(os.path.dirname(__file__), 'fixtures', 'compat', 'bert', 'export')  # read before the lock
      args = ['--config', 'configs/finetune.py:classification', f'--config.init_from={export}',
              f'--config.task.train={corpus}', f'--config.task.dev={corpus}', '--workdir', str(workdir)]
    line = error_line(job(args, module=module))
    assert f'is in use by a finetune job: pid {os.getpid()}' in line, line
    assert os.listdir(workdir) == ['job.lock'] and (workdir / 'job.lock').read_bytes() == before
  finally:
    lock.release()


def test_pod_refused_on_every_process_with_one_line(corpus, tmp_path):
  """Process 0 finds the lock taken; both processes stop with its line, status 2, at once (no hang)."""
  workdir = tmp_path / 'pod'
  lock = workdir_lock.acquire(str(workdir), 'pretrain')
  try:
    start = time.time()
    result = subprocess.run([sys.executable, os.path.join(ROOT, 'tpu', 'local_pod.py'), '--processes', '2',
                             '--devices-per-process', '1', '--', sys.executable, '-m', 'jaxssl.pretrain', *TINY,
                             f'--config.data.corpus={corpus}', '--workdir', str(workdir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = {i: [l for l in result.stderr.splitlines() if l.startswith(f'[{i}] error: ')] for i in (0, 1)}
    assert len(lines[0]) == 1 and lines[0][0][4:] == lines[1][0][4:], result.stderr[-3000:]
    assert f'pid {os.getpid()}' in lines[1][0]
    assert time.time() - start < 150
  finally:
    lock.release()

"""One job per workdir: the lock the pretraining and fine-tuning jobs hold from start to end (WORKDIR/job.lock).

Two jobs writing one workdir would interleave checkpoints and metrics: the second one started refuses with one
line naming the first (host, pid, start time, command). A lock whose holder died (kill -9, a lost VM) is taken
over by the next job, which says so in one line naming the old holder.
  * Local: `fcntl.flock` on WORKDIR/job.lock, which the kernel drops when its holder dies (nothing is ever
    stale); the file describes the holder. Close-on-exec: worker processes (grain spawns them) never hold it.
  * A bucket (gs://, s3://): a lease object describing the holder, whose heartbeat time the holder rewrites every
    JAXSSL_LOCK_HEARTBEAT_S seconds (30) from a daemon thread. It is stale when that time is more than
    JAXSSL_LOCK_STALE_S (120, and at least 3 of the holder's intervals) old by this host's clock (cloud VMs keep
    NTP time: skew is far below that), or at once when it was written here (same host, boot and pid namespace)
    by a process that no longer exists.
In a job of several processes only process 0 takes the lock and all learn the outcome from it (`hold`).
"""
import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxssl import storage
from jaxssl.errors import JobFailed, UserError

LOCK_NAME = 'job.lock'
_MESSAGE_BYTES = 4096  # the refusal line sent from process 0 to the others


def _env_seconds(name: str, default: float) -> float:
  try:
    return float(os.environ.get(name, '') or default)
  except ValueError:
    raise UserError(f'{name}={os.environ[name]!r} must be a number of seconds') from None


def _process_space() -> str:
  """Where this process's pid means something: this boot of this machine (boot id) and this pid namespace (two
  containers sharing the host's name and boot id, e.g. with host networking, each have their own)."""
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      return f'{f.read().strip()} {os.readlink("/proc/self/ns/pid")}'
  except OSError:
    return ''


def _command(job: str) -> str:
  """The command line of this process as the user typed it (`python -m jaxssl.JOB ...`), at most 300 characters."""
  argv = sys.argv
  if argv and argv[0].endswith(os.path.join('jaxssl', f'{job}.py')):
    text = ' '.join(['python -m', f'jaxssl.{job}', shlex.join(argv[1:])]).strip()
  else:
    text = shlex.join(argv)
  return text if len(text) <= 300 else text[:297] + '...'


def describe_self(job: str, heartbeat_s: float = 0.0) -> dict:
  """What a lock records of its holder: job, host, pid (and where it is valid), command, start and heartbeat
  times, a token."""
  now = time.time()
  return {'job': job, 'host': socket.gethostname(), 'pid_space': _process_space(), 'pid': os.getpid(),
          'command': _command(job), 'started': now, 'heartbeat': now, 'heartbeat_s': heartbeat_s,
          'token': uuid.uuid4().hex}


def _when(t) -> str:
  return datetime.datetime.fromtimestamp(float(t), datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')


def _who(holder: dict) -> str:
  if 'pid' not in holder:
    return 'another job (its lock file names none)'
  return (f'a {holder.get("job", "jaxssl")} job: pid {holder.get("pid", "?")} on {holder.get("host", "?")}, '
          f'started {_when(holder.get("started", 0))}')


def refusal(workdir: str, holder: dict, lease: bool = False) -> str:
  """The one line a job that finds `workdir` taken ends with: who holds it and what to do."""
  beat = f', last heartbeat {time.time() - float(holder.get("heartbeat", 0)):.0f} s ago' if lease else ''
  pid, host = holder.get('pid', '?'), holder.get('host', '?')
  return (f'--workdir {workdir} is in use by {_who(holder)}{beat}, running `{holder.get("command", "?")}`: '
          f'wait for it to end, stop it (kill {pid} on {host}: it saves a checkpoint and exits; rerunning resumes '
          'from it), or use another --workdir')


def _takeover_line(workdir: str, holder: dict, why: str) -> str:
  return f'workdir lock: taking over {workdir} from {_who(holder)} (`{holder.get("command", "?")}`): {why}'


# ----- a local workdir: flock -----

class LocalLock:
  """flock held on WORKDIR/job.lock; `release` removes the file (and the workdir, if this lock made it empty)."""

  def __init__(self, fd: int, lock_path: str, made_dir: str):
    self.fd, self.path, self._made_dir = fd, lock_path, made_dir

  def release(self) -> None:
    if self.fd is None:
      return
    with contextlib.suppress(OSError):
      if _same_file(self.fd, self.path):
        os.unlink(self.path)  # while still locked: a job that opened it meanwhile sees it was replaced and retries
    os.close(self.fd)  # drops the lock
    self.fd = None
    if self._made_dir:
      with contextlib.suppress(OSError):
        os.rmdir(self._made_dir)  # only if empty: a refused or failed first run leaves no empty workdir behind


def _same_file(fd: int, lock_path: str) -> bool:
  try:
    here, there = os.fstat(fd), os.stat(lock_path)
  except OSError:
    return False
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _read_holder(fd: int, wait_s: float = 1.0) -> dict:
  """The description in a lock file; the holder writes it just after locking, so an empty one is read again."""
  deadline = time.time() + wait_s
  while True:
    text = os.pread(fd, 1 << 16, 0)
    if text:
      with contextlib.suppress(ValueError):
        return json.loads(text.decode('utf-8'))
    if time.time() >= deadline:
      return {}
    time.sleep(0.05)


def acquire_local(workdir: str, job: str, say=print) -> LocalLock:
  """Locks the local folder `workdir` for `job`, or raises UserError naming the job that holds it."""
  folder = workdir[len('file://'):] if workdir.startswith('file://') else workdir
  lock_path = os.path.join(folder, LOCK_NAME)
  for _ in range(20):  # a holder releasing removes the file; a job that opened it just before then retries
    made_dir = '' if os.path.isdir(folder) else folder
    try:
      os.makedirs(folder, exist_ok=True)
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except FileNotFoundError:  # the folder was just removed by a holder releasing it (it made it, it was empty)
      continue
    except OSError as e:
      raise UserError(f'--workdir {workdir}: cannot create {lock_path} ({e.strerror}): use a folder you can '
                      'write to') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise UserError(refusal(workdir, holder)) from None
    except OSError as e:  # a file system without flock (some FUSE mounts): run unguarded rather than not at all
      print(f'warning: workdir lock: {folder} does not support file locks ({e.strerror}); not guarded against a '
            'second job', file=sys.stderr, flush=True)
      return LocalLock(fd, lock_path, made_dir)
    if not _same_file(fd, lock_path):
      os.close(fd)
      continue
    previous = _read_holder(fd, wait_s=0)
    if previous:
      say(_takeover_line(workdir, previous, 'it ended without releasing it (killed?)'), flush=True)
    data = json.dumps(describe_self(job)).encode('utf-8')
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    return LocalLock(fd, lock_path, made_dir)
  raise JobFailed(f'could not lock {lock_path}: it kept being replaced')


def _process_gone(holder: dict) -> bool:
  """Whether the holder ran here (same host, boot and pid namespace) and its process no longer exists."""
  space = _process_space()
  if not space or holder.get('host') != socket.gethostname() or holder.get('pid_space') != space:
    return False
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return True
  except (OSError, KeyError, ValueError, TypeError):  # alive but not ours (PermissionError), or no pid recorded
    pass
  return False


def stale_reason(holder: dict, stale_s: float, now: float | None = None) -> str:
  """Why the lease of `holder` may be taken over ('' while it is alive)."""
  if _process_gone(holder):
    return f'its process {holder.get("pid")} on this machine is gone'
  age = (time.time() if now is None else now) - float(holder.get('heartbeat', 0))
  limit = max(stale_s, 3 * float(holder.get('heartbeat_s', 0) or 0))
  return f'no heartbeat for {age:.0f} s (stale after {limit:.0f} s)' if age > limit else ''


# ----- a bucket workdir: a lease object with a heartbeat -----

class LeaseObject:
  """WORKDIR/job.lock in a bucket: read (with its generation), create if absent, delete if unchanged, rewrite.

  On GCS, creating uses the precondition ifGenerationMatch=0 (exactly one of two jobs creating it at once
  succeeds) and deleting a stale lease ifGenerationMatch=<the generation judged stale> (a lease rewritten since
  is not deleted). A local GCS server (gcp-storage-emulator) and other stores ignore or lack preconditions:
  there `acquire_lease` writes, waits and reads back instead (see there).
  """

  def __init__(self, url: str):
    import fsspec  # reason: only bucket workdirs need it
    self.url = url
    self.fs, self.inner = fsspec.core.url_to_fs(url, use_listings_cache=False)
    self.gcs = url.startswith(('gs://', 'gcs://'))
    self.atomic = self.gcs and not os.environ.get('STORAGE_EMULATOR_HOST')

  def read(self):
    """(the holder's description or None when there is no lease, the object's generation or None)."""
    try:
      generation = self.fs.info(self.inner).get('generation')
      data = self.fs.cat_file(self.inner)  # after the generation: if it changed between, the delete is refused
    except FileNotFoundError:
      return None, None
    try:
      holder = json.loads(data.decode('utf-8'))
    except ValueError:
      holder = None
    if not isinstance(holder, dict) or 'token' not in holder:
      raise UserError(f'{self.url} is not a jaxssl workdir lock: if no job uses this workdir, remove it')
    return holder, generation

  def create(self, holder: dict) -> bool:
    """Writes the lease if there is none (on GCS: atomically); False if another job's is there."""
    data = json.dumps(holder).encode('utf-8')
    if not self.gcs:
      self.fs.pipe_file(self.inner, data)
      return True
    try:
      self.fs.pipe_file(self.inner, data, mode='create')  # ifGenerationMatch=0
    except FileExistsError:  # gcsfs's name for HTTP 412, precondition failed
      return False
    return True

  def delete(self, generation) -> bool:
    """Deletes the lease if it is still `generation`; False if it was rewritten meanwhile."""
    if self.gcs and generation:
      bucket, key, _ = self.fs.split_path(self.inner)
      try:
        self.fs.call('DELETE', 'b/{}/o/{}', bucket, key, ifGenerationMatch=str(generation))
      except FileExistsError:
        return False
      except FileNotFoundError:
        pass  # deleted by another job taking over too: the create decides between us
      return True
    with contextlib.suppress(FileNotFoundError):
      self.fs.rm_file(self.inner)
    return True

  def rewrite(self, holder: dict) -> None:
    self.fs.pipe_file(self.inner, json.dumps(holder).encode('utf-8'))


def _exit_now(message: str) -> None:
  print(f'failed: {message}', file=sys.stderr, flush=True)
  os._exit(1)  # pylint: disable=protected-access  # at once: every further write would mix with the new holder's


class Lease:
  """A held bucket lease: a daemon thread rewrites its heartbeat; `release` stops it and deletes the lease."""

  def __init__(self, lease: LeaseObject, holder: dict, heartbeat_s: float, on_lost=_exit_now):
    self.lease, self.holder, self.heartbeat_s, self.on_lost = lease, holder, heartbeat_s, on_lost
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        current, _ = self.lease.read()
        if current is None and self.lease.create(self.holder):  # removed by hand: put back
          continue
        if current is None or current.get('token') != self.holder['token']:
          holder = current or {}
          self.on_lost(f'{self.lease.url} was taken over by {_who(holder)} after this job missed its heartbeats: '
                       'stopping before writing anything more')
          return
        # Read, then rewrite: not one conditional step (gcsfs has no ifGenerationMatch=N upload), so a job taking
        # over in the milliseconds between would be overwritten; it then finds its lease lost at its own next
        # heartbeat and stops. That needs this job to have missed heartbeats for stale_s first.
        self.holder = {**self.holder, 'heartbeat': time.time()}
        self.lease.rewrite(self.holder)
      except UserError as e:
        self.on_lost(str(e))
        return
      except Exception as e:  # pylint: disable=broad-except  # a network blip: the next heartbeat tries again
        print(f'warning: workdir lock: heartbeat of {self.lease.url} failed ({type(e).__name__}: {e})',
              file=sys.stderr, flush=True)

  def release(self) -> None:
    if self._stop.is_set():
      return
    self._stop.set()
    self._thread.join(timeout=60)
    try:
      current, generation = self.lease.read()
      if current is not None and current.get('token') == self.holder['token']:
        self.lease.delete(generation)
    except Exception as e:  # pylint: disable=broad-except  # a lease left behind goes stale: never fail the job here
      print(f'warning: workdir lock: could not remove {self.lease.url} ({type(e).__name__}: {e}); it goes stale '
            'by itself', file=sys.stderr, flush=True)


def acquire_lease(workdir: str, job: str, say=print, *, heartbeat_s: float | None = None,
                  stale_s: float | None = None, settle_s: float | None = None, on_lost=_exit_now) -> Lease:
  """Takes the lease WORKDIR/job.lock in a bucket for `job`, taking over a stale one; UserError if a live job
  holds it. Defaults: JAXSSL_LOCK_HEARTBEAT_S (30), JAXSSL_LOCK_STALE_S (120), JAXSSL_LOCK_SETTLE_S (2).

  Where preconditions hold (GCS) two jobs starting at once cannot both create the lease. Elsewhere (a local GCS
  server, S3) each job writes its lease, waits settle_s and reads it back, and only the one whose lease is there
  goes on (Fischer's mutual exclusion): both go on only if one job took longer than settle_s between reading
  "no lease" and writing its own (a stalled process or request), the race that remains there.
  """
  heartbeat_s = heartbeat_s or _env_seconds('JAXSSL_LOCK_HEARTBEAT_S', 30)
  stale_s = stale_s or _env_seconds('JAXSSL_LOCK_STALE_S', 120)
  settle_s = _env_seconds('JAXSSL_LOCK_SETTLE_S', 2) if settle_s is None else settle_s
  lease = LeaseObject(storage.join(workdir, LOCK_NAME))
  me = describe_self(job, heartbeat_s)
  for _ in range(5):  # each round: another job changed the lease between our reading and writing it
    holder, generation = lease.read()
    why = ''
    if holder is not None:
      why = stale_reason(holder, stale_s)
      if not why:
        raise UserError(refusal(workdir, holder, lease=True))
      if not lease.delete(generation):
        continue
    if not lease.create(me):
      continue
    if not lease.atomic:
      time.sleep(settle_s)
    mine, _ = lease.read()
    if mine is None:
      continue
    if mine['token'] != me['token']:
      raise UserError(refusal(workdir, mine, lease=True))
    if why:
      say(_takeover_line(workdir, holder, why), flush=True)
    return Lease(lease, me, heartbeat_s, on_lost)
  raise JobFailed(f'could not take the lock {lease.url}: other jobs kept changing it')


# ----- what the jobs call -----

def acquire(workdir: str, job: str, say=print):
  """Locks `workdir` (local folder or bucket) for `job` in this process; UserError if another job holds it."""
  if storage.is_remote(workdir):
    return acquire_lease(workdir, job, say)
  return acquire_local(workdir, job, say)


def _from_process_0(code: int, message: str) -> tuple[int, str]:
  """(code, message) as process 0 has them, on every process of the job."""
  if jax.process_count() == 1:
    return code, message
  data = np.frombuffer(message.encode('utf-8')[:_MESSAGE_BYTES], np.uint8)
  packed = np.zeros(_MESSAGE_BYTES + 2, np.int32)
  packed[0], packed[1], packed[2:2 + len(data)] = code, len(data), data
  packed = np.asarray(multihost_utils.broadcast_one_to_all(packed))
  return int(packed[0]), bytes(packed[2:2 + int(packed[1])].astype(np.uint8)).decode('utf-8', 'replace')


@contextlib.contextmanager
def hold(workdir: str, job: str):
  """Holds the workdir lock for the block (a job's whole run); raises UserError on every process if another job
  holds it. Process 0 takes it; the others learn the outcome from it, so all stop together with the same line.
  Released when the block ends, however it ends (a SIGTERM'd job returns normally and releases it too)."""
  lock, failure, outcome = None, None, (0, '')
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, job)
    except UserError as e:
      outcome = (1, str(e))
    except Exception as e:  # pylint: disable=broad-except  # told to the others first, then raised here
      failure, outcome = e, (2, f'{type(e).__name__}: {e}')
  code, message = _from_process_0(*outcome)
  if failure is not None:
    raise failure
  if code == 1:
    raise UserError(message)
  if code == 2:
    raise JobFailed(f'process 0 could not lock --workdir {workdir}: {message}')
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()

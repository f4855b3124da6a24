"""Launch jaxssl on a Cloud TPU pod slice: create, install, run, logs, stop, delete, status.

Every subcommand is a function that returns the gcloud command lines it needs (list[list[str]]); `main` prints
them with --dry-run or runs them. Standard library only, so it runs from any checkout without installing jaxssl.

  python tpu/pod.py create  --name NODE --zone us-west4-a --accelerator-type v5litepod-256 [--spot]
  python tpu/pod.py install --name NODE --zone us-west4-a
  python tpu/pod.py run     --name NODE --zone us-west4-a --workdir /mnt/bucket/run -- \\
                            python -m jaxssl.pretrain --config configs/bert.py:base \\
                            --config.checkpoint.directory=gs://BUCKET/run/checkpoints
  python tpu/pod.py logs    --name NODE --zone us-west4-a
  python tpu/pod.py stop    --name NODE --zone us-west4-a
  python tpu/pod.py delete  --name NODE --zone us-west4-a
"""
import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GCLOUD_MISSING = ('gcloud not found: install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install) '
                  'or use --dry-run to see the commands')
NEED_JOB = 'run needs the job command after --, e.g. -- python -m jaxssl.pretrain --config configs/bert.py:base'
# Queued-resource states after which waiting for ACTIVE is pointless.
FAILED_STATES = ('FAILED', 'SUSPENDED')
# The tarball lands in the home directory of each worker: a path without `~` means the same under every scp.
REMOTE_TARBALL = 'jaxssl.tar.gz'
# The files shipped to the workers: tracked plus untracked-but-not-ignored, i.e. the working tree as you see it.
LS_FILES = ['git', 'ls-files', '--cached', '--others', '--exclude-standard']


class PodError(Exception):
  """A mistake or failure reported as one `error:` line; `code` is the exit status."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


# --- command builders -----------------------------------------------------------------------------------------

def _where(args) -> list[str]:
  """The location flags every gcloud command takes."""
  flags = ['--zone', args.zone]
  if args.project:
    flags += ['--project', args.project]
  return flags


def _ssh(args, worker: str, command: str) -> list[str]:
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.name, *_where(args), f'--worker={worker}',
          '--command', command]


def _queued_resource_id(args) -> str:
  return args.queued_resource_id or args.name


def _remote_path(path: str) -> str:
  """Shell-quotes a path for the remote shell, leaving a leading `~/` unquoted so it still means home there."""
  if path.startswith('~/'):
    return '~/' + shlex.quote(path[2:])
  return shlex.quote(path)


def create_commands(args) -> list[list[str]]:
  """Requests the slice as a queued resource, then (unless --no-wait) the describe that is polled until ACTIVE."""
  qr_id = _queued_resource_id(args)
  # --best-effort exists only in gcloud's alpha track (checked with Cloud SDK 528).
  gcloud = ['gcloud', 'alpha'] if args.best_effort else ['gcloud']
  create = [*gcloud, 'compute', 'tpus', 'queued-resources', 'create', qr_id, '--node-id', args.name,
            *_where(args), '--accelerator-type', args.accelerator_type, '--runtime-version', args.runtime_version]
  if args.spot:
    create.append('--spot')
  if args.best_effort:
    create.append('--best-effort')
  if args.no_wait:
    return [create]
  describe = ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', qr_id, *_where(args),
              '--format=value(state.state)']
  return [create, describe]


def jax_version(repo_dir: str) -> str:
  """The version of the `jax==X` pin in repo_dir/requirements.txt (jax[tpu] must match it)."""
  path = os.path.join(repo_dir, 'requirements.txt')
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise PodError(f'cannot read {path} ({e.strerror}): pass --repo-dir, the root of a jaxssl checkout') from None
  for line in lines:
    match = re.match(r'\s*jax\s*==\s*([^\s;#]+)', line)
    if match:
      return match.group(1)
  raise PodError(f'{path} has no `jax==VERSION` line: pin jax there so the workers get the same version')


def install_commands(args, tarball: str = '<tmpdir>/jaxssl.tar.gz') -> list[list[str]]:
  """Copies the checkout to every worker and installs it in a venv there, with jax[tpu] at the pinned version.

  The first step is a note (a one-element list starting with '#'): main builds the tarball in Python.
  """
  repo_dir = os.path.abspath(args.repo_dir)
  jax_pin = f'jax[tpu]=={jax_version(repo_dir)}'
  note = (f'# (in Python) cd {shlex.quote(repo_dir)} && {shlex.join(LS_FILES)} | '
          f'tar czf {shlex.quote(tarball)} -T -')
  scp = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', '--worker=all', *_where(args), tarball,
         f'{args.name}:{REMOTE_TARBALL}']
  remote = _remote_path(args.remote_dir)
  setup = ' && '.join([
      f'mkdir -p {remote}', f'cd {remote}', f'tar xzf ~/{REMOTE_TARBALL}',
      f'{shlex.quote(args.python)} -m venv .venv',
      f'.venv/bin/pip install -r requirements.txt {shlex.quote(jax_pin)}'])
  return [[note], scp, _ssh(args, 'all', setup)]


def _job_argv(args) -> list[str]:
  job = list(args.job)
  if not job:
    raise PodError(NEED_JOB)
  if args.workdir:
    if any(a == '--workdir' or a.startswith('--workdir=') for a in job):
      raise PodError('--workdir is given twice: to pod.py and in the job command; keep one')
    job += ['--workdir', args.workdir]
  # A bare `python` means the venv that `install` made on every worker.
  if re.fullmatch(r'python[0-9.]*', job[0]):
    job[0] = f'.venv/bin/{job[0]}'
  return job


def run_commands(args) -> list[list[str]]:
  """Starts the job on every worker at once, in the background, logging to ~/jaxssl-JOBID.log."""
  job = _job_argv(args)
  env = ['JAXSSL_DISTRIBUTED=auto']  # each worker calls jax.distributed.initialize(); JAX finds the pod itself
  if args.data_dir:
    env.append(f'JAXSSL_DATA_DIR={_remote_path(args.data_dir)}')
  # nohup + redirected stdin/stdout/stderr: the job outlives the ssh session and ssh does not wait for it.
  command = (f'cd {_remote_path(args.remote_dir)} && {" ".join(env)} nohup {shlex.join(job)} '
             f'> ~/jaxssl-{args.job_id}.log 2>&1 < /dev/null &')
  return [_ssh(args, 'all', command)]


def logs_commands(args) -> list[list[str]]:
  """Follows the job's log on one worker (worker 0 runs process 0, which logs the metrics)."""
  if args.job_id:
    log = f'~/jaxssl-{args.job_id}.log'
  else:
    log = '"$(ls -t ~/jaxssl-*.log | head -1)"'  # the newest job's log
  return [_ssh(args, str(args.worker), f'tail -F {log}')]


def stop_commands(args) -> list[list[str]]:
  """Sends SIGTERM to the job on every worker: jaxssl then saves a checkpoint and exits, as on preemption."""
  # `[p]ython` matches `python` but not this command line itself, so pkill spares the shell that runs it; the
  # echo keeps a worker with nothing running from failing the whole ssh.
  command = 'pkill -TERM -f "[p]ython -m jaxssl" || echo "no jaxssl job on $(hostname)"'
  return [_ssh(args, 'all', command)]


def delete_commands(args) -> list[list[str]]:
  """Deletes the queued resource and its slice (--force), without a prompt (--quiet)."""
  return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', _queued_resource_id(args), *_where(args),
           '--force', '--quiet']]


def status_commands(args) -> list[list[str]]:
  """Describes the queued resource (its state, and the slice once it is ACTIVE)."""
  return [['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', _queued_resource_id(args),
           *_where(args)]]


COMMANDS = {
    'create': create_commands, 'install': install_commands, 'run': run_commands, 'logs': logs_commands,
    'stop': stop_commands, 'delete': delete_commands, 'status': status_commands,
}


# --- running them ---------------------------------------------------------------------------------------------

def _is_note(step: list[str]) -> bool:
  return len(step) == 1 and step[0].startswith('#')


def format_commands(steps: list[list[str]]) -> str:
  """One line per command, shell-quoted so it can be pasted into a shell; notes as they are."""
  return '\n'.join(step[0] if _is_note(step) else shlex.join(step) for step in steps)


def _check_call(step: list[str]) -> None:
  print(f'+ {shlex.join(step)}', file=sys.stderr, flush=True)
  returncode = subprocess.run(step, check=False).returncode
  if returncode:
    raise PodError(f'{shlex.join(step[:5])} ... exited with status {returncode}', code=returncode)


def wait_until_active(args, describe: list[str]) -> None:
  """Polls the queued resource's state, printing each new one, until ACTIVE; raises on FAILED/SUSPENDED."""
  qr_id = _queued_resource_id(args)
  status = f'python tpu/pod.py status --name {args.name} --zone {args.zone}'
  last = None
  try:
    while True:
      result = subprocess.run(describe, capture_output=True, text=True, check=False)
      if result.returncode:
        reason = (result.stderr.strip().splitlines() or ['no output'])[-1]
        raise PodError(f'cannot read the queued resource state: {reason}', code=result.returncode)
      state = result.stdout.strip() or 'UNKNOWN'
      if state != last:
        print(f'queued resource {qr_id}: {state}', flush=True)
        last = state
      if state == 'ACTIVE':
        return
      if state in FAILED_STATES:
        raise PodError(f'queued resource {qr_id} is {state}: `{status}` shows why; delete it and create it again')
      time.sleep(args.poll_seconds)
  except KeyboardInterrupt:
    raise PodError(f'stopped waiting; the request stays queued (`{status}` shows its state)', code=130) from None


def tracked_files(repo_dir: str) -> list[str]:
  """The checkout's files as git lists them (relative paths)."""
  try:
    out = subprocess.run([*LS_FILES, '-z'], cwd=repo_dir, capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    raise PodError(f'`git ls-files` failed in {repo_dir}: --repo-dir must be a git checkout of jaxssl') from None
  return [f for f in out.split('\0') if f]


def make_tarball(repo_dir: str, files: list[str], out: str) -> None:
  """Writes the files (relative to repo_dir) to a gzipped tar; files deleted since git last saw them are skipped."""
  with tarfile.open(out, 'w:gz') as tar:
    for name in files:
      path = os.path.join(repo_dir, name)
      if os.path.isfile(path):
        tar.add(path, arcname=name, recursive=False)


def execute(args, steps: list[list[str]]) -> None:
  """Runs the steps of one subcommand for real."""
  if args.command == 'create':
    _check_call(steps[0])
    if len(steps) > 1:
      wait_until_active(args, steps[1])
    return
  if args.command == 'install':
    # `steps` name a placeholder tarball; the real one exists only inside this block.
    with tempfile.TemporaryDirectory(prefix='jaxssl-pod-') as tmp:
      tarball = os.path.join(tmp, 'jaxssl.tar.gz')
      repo_dir = os.path.abspath(args.repo_dir)
      make_tarball(repo_dir, tracked_files(repo_dir), tarball)
      for step in install_commands(args, tarball):
        if not _is_note(step):
          _check_call(step)
    return
  for step in steps:
    _check_call(step)
  if args.command == 'run':
    print(f'job {args.job_id} started on every worker of {args.name}; follow it with: python tpu/pod.py logs '
          f'--name {args.name} --zone {args.zone} --job-id {args.job_id}')


# --- command line ---------------------------------------------------------------------------------------------

def _worker(text: str) -> int:
  if not text.isdigit():
    raise argparse.ArgumentTypeError(f'{text!r} is not a worker number (0, 1, ...)')
  return int(text)


def _job_id(text: str) -> str:
  # The id goes into a file name in an unquoted remote command: keep it to plain characters.
  if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9._-]*', text):
    raise argparse.ArgumentTypeError(f'{text!r}: use letters, digits, ".", "_" and "-"')
  return text


def build_parser() -> argparse.ArgumentParser:
  """The pod.py command line: one subcommand per step of a pod run."""
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument('--name', required=True, help='TPU node name (the slice)')
  common.add_argument('--zone', required=True, help='e.g. us-west4-a; a zone that offers the accelerator type')
  common.add_argument('--project', help='Google Cloud project (default: gcloud config)')
  common.add_argument('--dry-run', action='store_true', help='print the gcloud commands and run nothing')
  queued = argparse.ArgumentParser(add_help=False)
  queued.add_argument('--queued-resource-id', help='queued resource id (default: --name)')

  parser = argparse.ArgumentParser(prog='pod.py', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')

  p = sub.add_parser('create', parents=[common, queued], help='request a slice as a queued resource')
  p.add_argument('--accelerator-type', default='v5litepod-256')
  p.add_argument('--runtime-version', default='v2-alpha-tpuv5-lite')
  tier = p.add_mutually_exclusive_group()
  tier.add_argument('--spot', action='store_true', help='Spot capacity: cheaper, may be preempted')
  tier.add_argument('--best-effort', action='store_true', help='best-effort tier (gcloud alpha); may be preempted')
  p.add_argument('--no-wait', action='store_true', help='return once the request is queued')
  p.add_argument('--poll-seconds', type=float, default=30, help='how often to check the state while waiting')

  p = sub.add_parser('install', parents=[common], help='copy this checkout to every worker and pip install it')
  p.add_argument('--repo-dir', default=REPO_ROOT, help='the checkout to copy (default: this one)')
  p.add_argument('--remote-dir', default='~/jaxssl', help="where on the workers ('~/x' in quotes: their home)")
  p.add_argument('--python', default='python3', help="the workers' Python (3.11+) for the venv")

  p = sub.add_parser('run', parents=[common], help='start a job on every worker: run ... -- python -m jaxssl.X ...')
  p.add_argument('--workdir', help='appended to the job as --workdir; every worker must reach it (gs://...)')
  p.add_argument('--data-dir', help='JAXSSL_DATA_DIR on the workers (prepared datasets)')
  p.add_argument('--remote-dir', default='~/jaxssl', help='where install put jaxssl')
  p.add_argument('--job-id', type=_job_id, default=None, help='names the log ~/jaxssl-ID.log (default: the time)')

  p = sub.add_parser('logs', parents=[common], help="follow a job's log on one worker")
  p.add_argument('--worker', type=_worker, default=0)
  p.add_argument('--job-id', type=_job_id, help='default: the newest log')

  sub.add_parser('stop', parents=[common], help='SIGTERM the job on every worker (it checkpoints and exits)')
  sub.add_parser('delete', parents=[common, queued], help='delete the queued resource and its slice')
  sub.add_parser('status', parents=[common, queued], help='describe the queued resource')
  return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
  """Parses argv; everything after the first `--` is the job command of `run`, passed on verbatim."""
  job: list[str] = []
  if '--' in argv:
    cut = argv.index('--')
    argv, job = argv[:cut], argv[cut + 1:]
  parser = build_parser()
  args = parser.parse_args(argv)
  args.job = job
  if args.command == 'run':
    if not job:
      parser.error(NEED_JOB)
    if args.job_id is None:
      args.job_id = time.strftime('%Y%m%d-%H%M%S')
  elif job:
    parser.error(f'only run takes a command after --; {args.command} does not')
  return args


def main(argv: list[str] | None = None) -> int:
  """Prints (--dry-run) or runs one subcommand; returns the exit status."""
  args = parse_args(list(sys.argv[1:] if argv is None else argv))
  try:
    if not args.dry_run and shutil.which('gcloud') is None:
      raise PodError(GCLOUD_MISSING)
    steps = COMMANDS[args.command](args)
    if args.dry_run:
      print(format_commands(steps))
    else:
      execute(args, steps)
  except PodError as e:
    print(f'error: {e}', file=sys.stderr)
    return e.code
  except KeyboardInterrupt:  # how `logs` is meant to end
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())

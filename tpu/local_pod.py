"""A pod on one machine: N real processes on localhost, each with D CPU devices, run one job together.

  python tpu/local_pod.py --processes 2 --devices-per-process 4 -- python -m jaxssl.pretrain --config ... --workdir W

Every process gets JAXSSL_COORDINATOR (a free localhost port), JAXSSL_NUM_PROCESSES, JAXSSL_PROCESS_ID,
JAX_PLATFORMS=cpu and D forced host devices, so `jax.distributed.initialize` makes one job of N*D devices with
gloo collectives: the same code path as the hosts of a TPU pod. Output lines are prefixed with `[i]`.

SIGTERM or Ctrl-C to the launcher goes to every process as SIGTERM (as a TPU VM's preemption notice: jaxssl saves
a checkpoint at a step all processes agree on and exits 0). If a process dies, the others are left to notice
through JAX's heartbeats and stop by themselves; any still running after `--grace` seconds are killed. Exit
status: 0 when every process succeeded, else the first failure's status (128 + signal for a signal).
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def process_env(base: dict, *, port: int, processes: int, index: int, devices: int) -> dict:
  """The environment of local process `index`."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', base.get('XLA_FLAGS', '')).strip()
  return {**base, 'JAXSSL_COORDINATOR': f'127.0.0.1:{port}', 'JAXSSL_NUM_PROCESSES': str(processes),
          'JAXSSL_PROCESS_ID': str(index), 'JAX_PLATFORMS': 'cpu',
          'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}


def _pump(stream, out, prefix: str) -> None:
  for line in iter(stream.readline, ''):
    out.write(prefix + line)
    out.flush()


def _status(code: int) -> int:
  return 128 - code if code < 0 else code  # Popen reports death by signal s as -s


def run_pod(command: list[str], *, processes: int, devices: int, grace_s: float = 90.0, port: int = 0) -> int:
  """Runs `command` as `processes` processes of one job; returns the pod's exit status."""
  port = port or free_port()
  procs = []
  for i in range(processes):
    env = process_env(dict(os.environ), port=port, processes=processes, index=i, devices=devices)
    # Own session: a terminal's Ctrl-C reaches the launcher only, which forwards it as SIGTERM exactly once.
    procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True))
  pumps = [threading.Thread(target=_pump, args=(stream, out, f'[{i}] '), daemon=True)
           for i, p in enumerate(procs) for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    print(f'local_pod: got signal {signum}; sending SIGTERM to every process', file=sys.stderr, flush=True)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}

  first_failure, deadline = None, None
  try:
    while any(p.poll() is None for p in procs):
      for i, p in enumerate(procs):
        code = p.poll()
        if code not in (None, 0) and first_failure is None:
          first_failure = (i, _status(code))
          deadline = time.monotonic() + grace_s
          print(f'local_pod: process {i} exited with status {_status(code)}; the others should stop within their '
                f'heartbeat timeout (killed after {grace_s:.0f} s)', file=sys.stderr, flush=True)
      if deadline is not None and time.monotonic() > deadline:
        for i, p in enumerate(procs):
          if p.poll() is None:
            print(f'local_pod: killing process {i}, still running {grace_s:.0f} s after a failure',
                  file=sys.stderr, flush=True)
            p.kill()
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for t in pumps:
    t.join(timeout=5)
  if first_failure is None:
    failed = [(i, _status(p.returncode)) for i, p in enumerate(procs) if p.returncode]
    first_failure = failed[0] if failed else None
  return 0 if first_failure is None else first_failure[1]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python tpu/local_pod.py', description=__doc__.split('\n')[0])
  parser.add_argument('--processes', type=int, default=2)
  parser.add_argument('--devices-per-process', type=int, default=4)
  parser.add_argument('--grace', type=float, default=90.0,
                      help='seconds the survivors of a failed process get to stop by themselves')
  parser.add_argument('--port', type=int, default=0, help='coordinator port (default: a free one)')
  parser.add_argument('command', nargs=argparse.REMAINDER, help='-- then the job command line')
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command:
    parser.error('give the job after --, e.g. -- python -m jaxssl.pretrain --config configs/bert.py:tiny ...')
  if args.processes < 1 or args.devices_per_process < 1:
    parser.error('--processes and --devices-per-process must be at least 1')
  return run_pod(command, processes=args.processes, devices=args.devices_per_process, grace_s=args.grace,
                 port=args.port)


if __name__ == '__main__':
  sys.exit(main())

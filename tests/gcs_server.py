"""A real GCS JSON API server on localhost (gcp-storage-emulator) for the bucket tests, as a pytest fixture.

`gcs_bucket` starts `gcp-storage-emulator` on a free port (in memory), waits until it answers, creates a bucket,
points gcsfs (etils.epath, jaxssl.storage) and tensorstore (orbax checkpoints) at it through the environment,
so that job subprocesses the tests start inherit it, and yields the bucket's URL, `gs://NAME`. Import it into a
test module (`from gcs_server import gcs_bucket`) to use it.
"""
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

BUCKET = 'jaxssl-test'


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def emulator_env(endpoint: str) -> dict[str, str]:
  """The environment that sends gcsfs and tensorstore to the GCS server at `endpoint` (http://HOST:PORT)."""
  return {
      'STORAGE_EMULATOR_HOST': endpoint,  # gcsfs, google-cloud-storage
      'TENSORSTORE_GCS_HTTP_URL': endpoint,  # tensorstore's gcs kvstore (orbax)
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # else gcsfs probes the bucket type over gRPC (60 s timeout)
      'FSSPEC_GCS_TOKEN': 'anon',  # gcsfs: no credential lookup (fsspec reads FSSPEC_<PROTOCOL>_<OPTION>)
      'GCE_METADATA_HOST': '127.0.0.1:1',  # google-auth / tensorstore: no GCE metadata server to wait for
      'GCE_METADATA_ROOT': '127.0.0.1:1',
      'GCE_METADATA_IP': '127.0.0.1:1',
  }


def _emulator_command() -> list[str]:
  """tpu/local_gcs.py: gcp-storage-emulator with the object generation headers real GCS sends (tensorstore needs
  them to read checkpoints back)."""
  try:
    import gcp_storage_emulator  # noqa: F401  # reason: skip, not fail, where the test requirements are missing
  except ImportError:
    pytest.skip('gcp-storage-emulator is not installed (pip install -r requirements-test.txt)')
  return [sys.executable, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tpu',
                                       'local_gcs.py')]


@pytest.fixture(scope='session')
def gcs_bucket():
  """`gs://BUCKET` on a fresh in-memory GCS server, with the environment set for this process and its children."""
  port = _free_port()
  endpoint = f'http://127.0.0.1:{port}'
  saved = {k: os.environ.get(k) for k in emulator_env(endpoint)}
  log = tempfile.TemporaryFile()  # not a pipe: the server logs every request and would block on a full one
  server = subprocess.Popen(_emulator_command() + ['start', '--host=127.0.0.1', f'--port={port}', '--in-memory'],
                            stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 60
    while True:
      try:
        urllib.request.urlopen(f'{endpoint}/storage/v1/b', timeout=2).read()
        break
      except OSError:
        if server.poll() is not None or time.time() > deadline:
          log.seek(0)
          raise RuntimeError(f'gcp-storage-emulator did not start: {log.read().decode()[-2000:]}')
        time.sleep(0.2)
    os.environ.update(emulator_env(endpoint))
    import gcsfs  # reason: only the bucket tests need it
    gcsfs.GCSFileSystem(token='anon').mkdir(BUCKET)
    yield f'gs://{BUCKET}'
  finally:
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
    log.close()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value

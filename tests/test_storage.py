"""jaxssl.storage on local paths and on a real GCS JSON API server (tests/gcs_server.py): the same behaviour on both."""
import os
import subprocess
import sys

import pytest
from gcs_server import gcs_bucket  # noqa: F401 (a pytest fixture)

from jaxssl import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=['local', 'gcs'])
def root(request, tmp_path):
  """A fresh folder: a local one, or a prefix in the test bucket."""
  if request.param == 'local':
    return str(tmp_path / 'root')
  bucket = request.getfixturevalue('gcs_bucket')
  return f'{bucket}/{request.node.name.replace("[", "-").replace("]", "")}-{os.getpid()}'


def test_write_read_list_remove(root):
  target = storage.join(root, 'a', 'b', 'config.json')
  assert not storage.exists(target)
  storage.write_text(target, '{"x": "é"}\n')  # makes the folders a/b
  assert storage.read_text(target) == '{"x": "é"}\n'
  assert storage.read_bytes(target) == '{"x": "é"}\n'.encode()
  assert storage.exists(target) and storage.isfile(target) and not storage.isdir(target)
  assert storage.isdir(storage.join(root, 'a')) and storage.isdir(storage.join(root, 'a', 'b'))
  storage.write_bytes(target, b'new')  # replaces it
  assert storage.read_bytes(target) == b'new'
  storage.write_text(storage.join(root, 'a', 'c.txt'), 'c')
  assert storage.listdir(storage.join(root, 'a')) == ['b', 'c.txt']
  assert storage.listdir(root) == ['a']
  with pytest.raises(FileNotFoundError):
    storage.listdir(storage.join(root, 'missing'))
  with pytest.raises(FileNotFoundError):
    storage.read_bytes(storage.join(root, 'missing.txt'))
  storage.remove(target)
  assert not storage.exists(target) and storage.exists(storage.join(root, 'a', 'c.txt'))
  storage.remove(storage.join(root, 'a'))
  assert not storage.exists(storage.join(root, 'a', 'c.txt'))
  storage.remove(storage.join(root, 'a'), missing_ok=True)
  with pytest.raises(FileNotFoundError):
    storage.remove(storage.join(root, 'a'))


def test_local_write_leaves_no_temp_file_and_no_partial_content(tmp_path):
  target = tmp_path / 'x' / 'model.bin'
  storage.write_bytes(str(target), b'1' * 1000)
  assert os.listdir(target.parent) == ['model.bin']
  with pytest.raises(TypeError):  # fails while writing: the old content stays, the temp file goes
    storage.write_bytes(str(target), 'text, not bytes')
  assert target.read_bytes() == b'1' * 1000 and os.listdir(target.parent) == ['model.bin']


def test_append_keeps_earlier_lines_and_is_one_object(root):
  log = storage.join(root, 'metrics.jsonl')
  lines = [f'{{"step": {i}}}\n' for i in range(5)]
  for line in lines:
    storage.append_text(log, line)
    assert storage.read_text(log).endswith(line)  # readable after every append
  assert storage.read_text(log) == ''.join(lines)
  assert storage.listdir(root) == ['metrics.jsonl']  # the appended pieces are composed in and removed


def test_append_removes_pieces_left_by_a_killed_writer(gcs_bucket):  # noqa: F811 (a pytest fixture)
  folder = f'{gcs_bucket}/killed-{os.getpid()}'
  log = f'{folder}/metrics.jsonl'
  storage.append_text(log, 'a\n')
  storage.write_text(log + '.append-0123456789abcdef0123456789abcdef', 'b\n')  # what a writer killed mid-append leaves
  # and a piece of a log the rerun does not append to (the killed run's TensorBoard file: the rerun names its own)
  storage.write_bytes(f'{folder}/events.out.tfevents.1.host.7.0.append-{"f" * 32}', b'event')
  storage.write_text(log + '.appendix', 'kept\n')  # not a piece
  storage._SWEPT.discard(folder.split('://', 1)[1])  # as a new process: the rerun of the killed job
  storage.append_text(log, 'c\n')
  assert storage.read_text(log) == 'a\nc\n'
  assert storage.listdir(folder) == ['metrics.jsonl', 'metrics.jsonl.appendix']


def test_bytes_come_back_exactly_whatever_they_end_with(root):
  """Every byte value, and a last byte of '\\r' (which the bare GCS emulator's multipart parsing dropped)."""
  for i, data in enumerate([bytes(range(256)) * 4 + b'\r', b'\r', b'x\r\n', b'\n\r']):
    storage.write_bytes(storage.join(root, f'{i}.bin'), data)
    assert storage.read_bytes(storage.join(root, f'{i}.bin')) == data
    storage.append_bytes(storage.join(root, 'log.bin'), data)
  assert storage.read_bytes(storage.join(root, 'log.bin')) == bytes(range(256)) * 4 + b'\r\rx\r\n\n\r'


def test_append_on_a_scheme_without_compose_rewrites():
  log = 'memory://jaxssl-test-append/log.txt'
  storage.append_text(log, 'a\n')
  storage.append_text(log, 'b\n')
  assert storage.read_text(log) == 'a\nb\n'
  storage.remove(log)


def test_glob_any_depth(root):
  for name in ('x/1.jsonl', 'x/2.txt', 'x/y/3.jsonl', 'z.jsonl'):
    storage.write_text(storage.join(root, name), name)
  assert storage.glob(storage.join(root, 'x', '*.jsonl')) == [storage.join(root, 'x', '1.jsonl')]
  assert storage.glob(storage.join(root, '**', '*.jsonl')) == [
      storage.join(root, n) for n in ('x/1.jsonl', 'x/y/3.jsonl', 'z.jsonl')]
  assert storage.glob(storage.join(root, 'nothing*')) == []
  found = storage.glob(storage.join(root, '?.jsonl'))
  assert found == [storage.join(root, 'z.jsonl')] and storage.read_text(found[0]) == 'z.jsonl'


def test_copy_open_and_local_file(root, tmp_path):
  source = storage.join(root, 'in', 'data.bin')
  storage.write_bytes(source, bytes(range(256)) * 4)
  copied = storage.join(root, 'out', 'copy.bin')
  storage.copy(source, copied)
  assert storage.read_bytes(copied) == bytes(range(256)) * 4
  local_copy = str(tmp_path / 'here' / 'copy.bin')
  storage.copy(source, local_copy)  # remote -> local (local -> local for the local root)
  storage.copy(local_copy, storage.join(root, 'back.bin'))
  assert storage.read_bytes(storage.join(root, 'back.bin')) == bytes(range(256)) * 4

  with storage.local_file(source) as name:
    assert os.path.isfile(name) and open(name, 'rb').read() == bytes(range(256)) * 4
  written = storage.join(root, 'made', 'by_a_library.txt')
  with storage.local_file(written, 'w') as name:
    with open(name, 'w') as f:
      f.write('from a library that takes a filename')
    assert not storage.exists(written)  # appears when the block ends
  assert storage.read_text(written) == 'from a library that takes a filename'
  with pytest.raises(RuntimeError):
    with storage.local_file(storage.join(root, 'failed.txt'), 'w') as name:
      open(name, 'w').write('half')
      raise RuntimeError('the library failed')
  assert not storage.exists(storage.join(root, 'failed.txt'))

  streamed = storage.join(root, 'stream', 'lines.txt')
  with storage.open(streamed, 'w') as f:
    f.write('ünïcode\nline 2\n')
  with storage.open(streamed) as f:
    assert list(f) == ['ünïcode\n', 'line 2\n']
  with storage.open(streamed, 'rb') as f:
    assert f.read() == 'ünïcode\nline 2\n'.encode()


def test_paths_helpers():
  assert storage.is_remote('gs://b/x') and storage.is_remote('s3://b/x') and not storage.is_remote('/tmp/x')
  assert not storage.is_remote('file:///tmp/x') and not storage.is_remote('relative/x')
  assert storage.join('gs://b/run', 'checkpoints', '10') == 'gs://b/run/checkpoints/10'
  assert storage.join('/w/run', 'config.json') == '/w/run/config.json'
  assert storage.parent('gs://b/run/config.json') == 'gs://b/run' and storage.parent('/w/a') == '/w'
  assert storage.basename('gs://b/run/config.json') == 'config.json' and storage.basename('/w/a') == 'a'
  assert os.fspath(storage.path('gs://b/run') / 'x') == 'gs://b/run/x'


def test_a_second_reader_sees_objects_another_process_wrote(gcs_bucket):
  """No listing cache: process 0 writes the tokenizer while the others poll for it."""
  target = f'{gcs_bucket}/poll/tokenizer.model'
  assert not storage.exists(target) and not storage.isdir(f'{gcs_bucket}/poll')
  assert storage.listdir(gcs_bucket) == sorted(storage.listdir(gcs_bucket))
  subprocess.run([sys.executable, '-c', f'from jaxssl import storage; storage.write_bytes({target!r}, b"model")'],
                 check=True, cwd=ROOT)  # inherits the fixture's environment
  assert storage.exists(target) and storage.listdir(f'{gcs_bucket}/poll') == ['tokenizer.model']


def test_rename_moves_a_folder_whole(root):
  for name in ('params/a.bin', 'params/sub/b.bin', 'config.json'):
    storage.write_text(storage.join(root, 'tmp-export', name), name)
  storage.rename(storage.join(root, 'tmp-export'), storage.join(root, 'deep', 'export'))
  assert not storage.exists(storage.join(root, 'tmp-export'))
  moved = storage.join(root, 'deep', 'export')
  assert storage.glob(storage.join(moved, '**', '*.*')) == [
      storage.join(moved, n) for n in ('config.json', 'params/a.bin', 'params/sub/b.bin')]
  assert storage.read_text(storage.join(moved, 'params', 'sub', 'b.bin')) == 'params/sub/b.bin'
  with pytest.raises(FileExistsError):
    storage.rename(storage.join(moved, 'config.json'), storage.join(moved, 'params', 'a.bin'))
  storage.append_bytes(storage.join(root, 'events'), b'\x00\x01')
  storage.append_bytes(storage.join(root, 'events'), b'\x02')
  assert storage.read_bytes(storage.join(root, 'events')) == b'\x00\x01\x02'


def test_local_folder_uploads_what_a_library_wrote(root):
  target = storage.join(root, 'trace')
  with storage.local_folder(target) as folder:
    os.makedirs(os.path.join(folder, 'plugins', 'profile'))
    with open(os.path.join(folder, 'plugins', 'profile', 'host.xplane.pb'), 'wb') as f:
      f.write(b'trace')
  assert storage.read_bytes(storage.join(target, 'plugins', 'profile', 'host.xplane.pb')) == b'trace'


def test_local_files_get_the_umask_permissions(tmp_path):
  old = os.umask(0o022)
  try:
    storage.write_text(str(tmp_path / 'config.json'), '{}')
  finally:
    os.umask(old)
  assert (tmp_path / 'config.json').stat().st_mode & 0o777 == 0o644  # readable by the other hosts' users


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  a.mkdir()
  b.mkdir()
  (a / 'x').write_text('from a')
  (b / 'x').write_text('from b')
  if not storage.exchange(str(a), str(b)):
    pytest.skip('renameat2 RENAME_EXCHANGE is not available here')
  assert (a / 'x').read_text() == 'from b' and (b / 'x').read_text() == 'from a'


def test_export_overwrite_is_whole_at_every_instant_and_a_cut_swap_is_put_back(tmp_path):
  """An overwrite replaces the export in one step (no OUT.tmp-export or OUT.old-export left); an overwrite cut
  between two renames (OUT missing, OUT.old-export whole) is named to readers and put back by the next export."""
  import json
  import numpy as np
  from jaxssl.data import tokenizers
  from jaxssl.errors import UserError
  from jaxssl.train import checkpoint as ckpt_lib
  from tests.fixtures import make_compat
  tokenizer = tokenizers.load_tokenizer(os.path.join(make_compat.FIXTURES['compat_v1'], 'bert', 'export'))
  out = str(tmp_path / 'export')
  ckpt_lib.write_export(out, {'w': np.zeros(3, np.float32)}, json.dumps({'n': 1}), tokenizer)
  ckpt_lib.write_export(out, {'w': np.ones(3, np.float32)}, json.dumps({'n': 2}), tokenizer, overwrite=True)
  assert ckpt_lib.read_export_config(out)['n'] == 2
  assert sorted(os.listdir(tmp_path)) == ['export']
  os.rename(out, out + '.old-export')  # what a kill between the two renames of the fallback swap leaves
  with pytest.raises(UserError, match=r'export is missing: an export --overwrite was cut short .*export.old-export: rerun the export'):
    ckpt_lib.read_export_config(out)
  with pytest.raises(UserError, match='already exists and is not empty'):  # put back first, then refused as usual
    ckpt_lib.write_export(out, {'w': np.ones(3, np.float32)}, json.dumps({'n': 3}), tokenizer)
  assert ckpt_lib.read_export_config(out)['n'] == 2 and sorted(os.listdir(tmp_path)) == ['export']

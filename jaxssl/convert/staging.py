"""Bucket folders for the convert job: a remote source read from a local copy, a remote output written locally and
uploaded.

The readers need local files: safetensors weights are memory-mapped, `gguf.GGUFReader` memory-maps the whole
.gguf file, HuggingFace `tokenizers` opens file names. So `from-hf --src gs://B/hf` first copies the files the
conversion reads (config.json, the tokenizer files, one set of weights: model.safetensors or its shards, else
pytorch_model.bin or its shards) into a temporary folder, and `--src gs://B/model.gguf` the .gguf file; that takes
local disk space the size of the weights. An output folder in a bucket (`to-hf --out gs://B/hf`, the BERT export
of `from-hf`) is written to a temporary local folder and uploaded file by file, config.json last: a folder cut
short by a crash has no config.json, which every reader refuses. Local paths pass through untouched.
"""
import contextlib
import json
import os
import tempfile
from typing import Iterator

from jaxssl import storage
from jaxssl.errors import UserError

CONFIG = 'config.json'
TOKENIZER_NAMES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt', 'vocab.json',
                   'merges.txt', 'tokenizer.model', 'spm.model')
# (single file, sharded index) of each weight layout, in the order the converters look for them.
WEIGHT_LAYOUTS = (('model.safetensors', 'model.safetensors.index.json'),
                  ('pytorch_model.bin', 'pytorch_model.bin.index.json'))


def _names_to_copy(src: str, names: list[str]) -> list[str]:
  """The files of HF folder `src` (listing `names`) a conversion reads: config, tokenizer, one set of weights."""
  wanted = [n for n in names if n == CONFIG or n in TOKENIZER_NAMES]
  for single, index in WEIGHT_LAYOUTS:
    if single in names:
      return wanted + [single]
    if index in names:
      try:
        shards = json.loads(storage.read_text(storage.join(src, index))).get('weight_map', {}).values()
      except (OSError, ValueError, AttributeError):
        shards = []  # the converter reads the copied index and names what is wrong with it
      return wanted + [index] + sorted({s for s in shards if s in names})
  return wanted


@contextlib.contextmanager
def _renamed_errors(local: str, src: str) -> Iterator[None]:
  """UserErrors raised on the local copy name `src`, the path the user gave, instead."""
  try:
    yield
  except UserError as e:
    raise UserError(str(e).replace(local, src)) from None


@contextlib.contextmanager
def local_source(src: str) -> Iterator[str]:
  """A local path holding what `src` (an HF folder or a .gguf file) holds: `src` itself when local, else a
  temporary copy (removed when the block ends)."""
  if not storage.is_remote(src):
    yield src
    return
  if src.endswith('.gguf'):
    if not storage.isfile(src):
      raise UserError(f'GGUF file {src} does not exist (or is not a file): give the path of a .gguf file')
    with storage.local_file(src) as local, _renamed_errors(local, src):
      yield local
    return
  if not storage.isdir(src):
    raise UserError(f'{src} is neither a folder nor a .gguf file: pass a HuggingFace checkpoint folder '
                    '(config.json + weights + tokenizer) or a llama.cpp .gguf file')
  with tempfile.TemporaryDirectory(prefix='jaxssl-convert-src-') as tmp:
    local = os.path.join(tmp, storage.basename(src) or 'src')
    os.makedirs(local)
    names = [n for n in storage.listdir(src) if storage.isfile(storage.join(src, n))]
    for name in _names_to_copy(src, names):
      storage.copy(storage.join(src, name), os.path.join(local, name))
    with _renamed_errors(local, src):
      yield local


def check_output(out: str, overwrite: bool) -> None:
  """UserError when the output folder `out` (local or in a bucket) exists with files in it and not `overwrite`."""
  if storage.exists(out) and (not storage.isdir(out) or storage.listdir(out)) and not overwrite:
    raise UserError(f'output directory {out} already exists and is not empty: choose a new --out or pass --overwrite')


def upload_folder(local: str, out: str) -> None:
  """Replaces the bucket folder `out` by the local folder `local`, file by file, the top-level config.json last."""
  files = []
  for root, _, names in os.walk(local):
    files += [os.path.relpath(os.path.join(root, n), local) for n in names]
  files.sort(key=lambda rel: (rel == CONFIG, rel))
  storage.remove(out, missing_ok=True)
  for rel in files:
    storage.copy(os.path.join(local, rel), storage.join(out, *rel.split(os.sep)))


@contextlib.contextmanager
def local_output(out: str, overwrite: bool) -> Iterator[str]:
  """The folder path a converter writes the output `out` to: `out` itself when local; for a bucket folder a
  temporary local one (checked first: not empty needs `overwrite`), uploaded to `out` when the block succeeds."""
  if not storage.is_remote(out):
    yield out
    return
  check_output(out, overwrite)
  with tempfile.TemporaryDirectory(prefix='jaxssl-convert-out-') as tmp:
    local = os.path.join(tmp, storage.basename(out) or 'out')
    with _renamed_errors(local, out):
      yield local
    upload_folder(local, out)

"""GGUF file access for the importer (gguf_file.py, gguf_tokenizer.py): the file opened and checked, its metadata as
Python values, its tensors dequantised to float32 numpy arrays on request. Mistakes in the file are UserErrors."""
import os

import gguf
import numpy as np

from jaxssl.errors import UserError

K = gguf.Keys


def open_file(path: str) -> gguf.GGUFReader:
  """The GGUF reader of `path`; a missing, foreign or unreadable file is a UserError."""
  if not os.path.isfile(path):
    raise UserError(f'GGUF file {path} does not exist (or is not a file): give the path of a .gguf file')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'GGUF':
    raise UserError(f'{path} is not a GGUF file (it starts with {magic!r}, not b"GGUF"): give a llama.cpp '
                    '.gguf file, or a HuggingFace directory')
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError) as e:  # a truncated/corrupt file or an unknown version
    raise UserError(f'{path} cannot be read as GGUF ({e}): is the file complete and from a recent llama.cpp?')


class Metadata:
  """The file's key/values as python values; a missing required key is a UserError naming it."""
  _REQUIRED = object()

  def __init__(self, reader: gguf.GGUFReader, path: str):
    self.fields, self.path = reader.fields, path
    self.arch = None
    arch = self.fields.get(K.General.ARCHITECTURE)
    if arch is not None:
      self.arch = arch.contents()

  def has(self, key: str) -> bool:
    return key.format(arch=self.arch) in self.fields

  def get(self, key: str, default=_REQUIRED):
    """The value of `key` ('{arch}' filled in); strings in arrays are decoded leniently."""
    key = key.format(arch=self.arch)
    field = self.fields.get(key)
    if field is None:
      if default is self._REQUIRED:
        raise UserError(f'{self.path} has no metadata key {key!r}: was it written by llama.cpp\'s converter?')
      return default
    types = field.types
    if types and types[0] == gguf.GGUFValueType.ARRAY:
      if types[-1] == gguf.GGUFValueType.STRING:
        # Not field.contents(): a token that is not valid UTF-8 must not make the whole file unreadable.
        return [bytes(field.parts[i]).decode('utf-8', errors='replace') for i in field.data]
      if not field.data:
        return []
      return np.concatenate([field.parts[i] for i in field.data]).tolist()
    return field.contents()

  def get_float(self, key: str, default=_REQUIRED):
    """A float32 value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    value = self.get(key, default)
    return value if value is None else float(str(np.float32(value)))


class Tensors:
  """The file's tensors by GGUF name, dequantised to float32 numpy arrays on request (numpy/PyTorch order)."""

  def __init__(self, reader: gguf.GGUFReader, path: str):
    self.path = path
    self.by_name = {t.name: t for t in reader.tensors}
    self.used = set()

  def __contains__(self, name: str) -> bool:
    return name in self.by_name

  def take(self, name: str, shape: tuple) -> np.ndarray:
    """Tensor `name` as float32 of `shape` (numpy order; GGUF lists dims reversed, the reader undoes that)."""
    t = self.by_name.get(name)
    if t is None:
      raise UserError(f'{self.path} lacks tensor {name!r} that its metadata implies: is the file complete?')
    self.used.add(name)
    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F64):
      a = np.asarray(t.data, np.float32)
    else:
      try:
        a = gguf.quants.dequantize(t.data, qtype)
      except NotImplementedError:
        raise UserError(f'tensor {name!r} in {self.path} is stored as {qtype.name}, which the gguf package '
                        'cannot dequantise: use a file quantised as e.g. Q8_0, Q4_K_M or F16') from None
      a = np.asarray(a, np.float32)
    if a.shape != tuple(shape):
      raise UserError(f'tensor {name!r} in {self.path} has shape {a.shape}, expected {tuple(shape)} from the '
                      'file\'s metadata: is the file consistent?')
    return a

  def unused(self) -> list:
    return sorted(set(self.by_name) - self.used)


def tensor_name(tensor: 'gguf.MODEL_TENSOR', suffix: str = 'weight', bid: int | None = None) -> str:
  """The GGUF tensor name, e.g. 'blk.0.attn_q.weight' (names from gguf.TENSOR_NAMES, not typed here)."""
  base = gguf.TENSOR_NAMES[tensor]
  return f'{base.format(bid=bid) if bid is not None else base}.{suffix}'


def check_unused(tensors: Tensors) -> None:
  """A tensor left over is a variant the mapping does not know: refused rather than silently dropped."""
  left = tensors.unused()
  if left:
    raise UserError(f'{tensors.path} has {len(left)} tensors with no place in the HF model, e.g. {left[:3]}: '
                    'is it a variant (MoE, biases, extra norms) of the architecture that is not supported?')

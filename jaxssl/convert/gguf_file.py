"""GGUF files (llama.cpp's format) read into HuggingFace form: config dict, state dict and tokenizer.

  ckpt = read_gguf('model.Q8_0.gguf')
  ckpt.hf_config                 # what config.json would say (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)
  ckpt.state_dict                # HF tensor names -> float32 numpy arrays in HF shapes/layouts
  ckpt.write_tokenizer(out_dir)  # tokenizer.json + tokenizer_config.json

so the HF -> jaxssl mappings (hf_gpt2, hf_llama) serve GGUF files too. Architectures: 'llama' (which also
covers Mistral-style files), 'qwen2' (Qwen2 / Qwen2.5: Llama's layout with q/k/v biases) and 'gpt2'.
Quantised tensors are dequantised with the `gguf` package, so the state dict holds what llama.cpp computes
with, not the original weights. Where the file stores F32 the arrays are read-only views of the memory-mapped
file (no copy of a large model until it is used).

What llama.cpp's converter (convert_hf_to_gguf.py) changed is undone:
  * llama attn_q / attn_k rows are permuted for llama.cpp's RoPE (it rotates adjacent pairs, HF rotates
    dims i and i + head_dim/2 of each head); the inverse permutation restores HF's q_proj / k_proj. qwen2 files
    are not permuted (llama.cpp's converter keeps HF's rows there and runs qwen2 with its NEOX RoPE, HF's).
  * GPT-2's Conv1D weights (c_attn, c_proj, c_fc) are stored transposed to (out, in); they come back (in, out).
  * Llama 3.1+ RoPE scaling is stored as a per-frequency `rope_freqs.weight` tensor instead of HF's
    rope_scaling parameters; those are recovered from it (see `_llama3_rope_scaling`) and the result is checked
    to reproduce the tensor exactly, otherwise the file is refused (HF has no way to take the raw factors).

Tokenizers: 'llama' (sentencepiece BPE with byte fallback; merges from the file or derived from the scores, as
transformers' GGUF loader does) and 'gpt2' (byte-level BPE) with any pre-tokenizer (`tokenizer.ggml.pre`) whose
split rule llama.cpp publishes as regexes: gpt-2, llama-bpe, qwen2, smollm, deepseek-llm, ... (the table is
gguf_pretokenizers.py). `read_gguf_tokenizer` reads only the tokenizer. No torch or transformers import here.
"""
import dataclasses
import json
import os

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from jaxssl.convert import gguf_pretokenizers
from jaxssl.errors import UserError

K = gguf.Keys
T = gguf.MODEL_TENSOR
LLAMA = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
QWEN2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]
GPT2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, GPT2)

SPIECE_SPACE = '\u2581'  # '▁', sentencepiece's visible space


@dataclasses.dataclass
class GGUFCheckpoint:
  """A GGUF file in HuggingFace form.

  hf_config: config.json as a dict. state_dict: HF tensor name -> float32 numpy array (HF names, shapes and
  layouts; no 'lm_head.weight' when the embeddings are tied). tokenizer: a `tokenizers.Tokenizer` equal to the
  file's vocabulary (ids included). tokenizer_config: tokenizer_config.json as a dict.
  """
  hf_config: dict
  state_dict: dict
  tokenizer: Tokenizer
  tokenizer_config: dict

  def write_tokenizer(self, directory: str) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` into `directory` (created if missing)."""
    os.makedirs(directory, exist_ok=True)
    self.tokenizer.save(os.path.join(directory, 'tokenizer.json'))
    with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
      json.dump(self.tokenizer_config, f, indent=2, ensure_ascii=False)


def read_gguf(path: str) -> GGUFCheckpoint:
  """Reads a llama.cpp GGUF file (architecture 'llama', 'qwen2' or 'gpt2', any tensor type the gguf package can
  dequantise) into HF config, float32 HF state dict and tokenizer. Mistakes in the file are UserErrors."""
  reader = _open(path)
  meta = _Metadata(reader, path)
  arch = meta.get(K.General.ARCHITECTURE)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UserError(f'{path} holds a {arch!r} model: only GGUF architectures {list(SUPPORTED_ARCHITECTURES)} '
                    'can be imported')
  split_count = meta.get(K.Split.LLM_KV_SPLIT_COUNT, 1)
  if split_count > 1:
    raise UserError(f'{path} is part of a {split_count}-file split GGUF: merge it first '
                    '(llama-gguf-split --merge FIRST.gguf OUT.gguf)')
  tokenizer, tokenizer_config = _tokenizer(meta)  # first: cheap, so its errors come before dequantising
  tensors = _Tensors(reader, path)
  if arch in (LLAMA, QWEN2):
    hf_config, state_dict = _llama(meta, tensors, qwen2=arch == QWEN2)
  else:
    hf_config, state_dict = _gpt2(meta, tensors)
  for name, key in (('bos', K.Tokenizer.BOS_ID), ('eos', K.Tokenizer.EOS_ID), ('pad', K.Tokenizer.PAD_ID)):
    if meta.get(key, None) is not None:
      hf_config[f'{name}_token_id'] = int(meta.get(key))
  if 'model_max_length' not in tokenizer_config:
    tokenizer_config['model_max_length'] = int(hf_config.get('max_position_embeddings')
                                               or hf_config.get('n_positions'))
  return GGUFCheckpoint(hf_config, state_dict, tokenizer, tokenizer_config)


def read_gguf_tokenizer(path: str) -> tuple[Tokenizer, dict]:
  """(HF tokenizer, tokenizer_config dict) of a GGUF file's tokenizer.ggml.* metadata alone, whatever the model
  architecture; no tensor is read. Mistakes in the file are UserErrors."""
  return _tokenizer(_Metadata(_open(path), path))


# ---------------------------------------------------------------------------------------------------------------
# File access


def _open(path: str) -> gguf.GGUFReader:
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


class _Metadata:
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


class _Tensors:
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


def _name(tensor: 'gguf.MODEL_TENSOR', suffix: str = 'weight', bid: int | None = None) -> str:
  """The GGUF tensor name, e.g. 'blk.0.attn_q.weight' (names from gguf.TENSOR_NAMES, not typed here)."""
  base = gguf.TENSOR_NAMES[tensor]
  return f'{base.format(bid=bid) if bid is not None else base}.{suffix}'


def _check_unused(tensors: _Tensors) -> None:
  """A tensor left over is a variant the mapping does not know: refused rather than silently dropped."""
  left = tensors.unused()
  if left:
    raise UserError(f'{tensors.path} has {len(left)} tensors with no place in the HF model, e.g. {left[:3]}: '
                    'is it a variant (MoE, biases, extra norms) of the architecture that is not supported?')


# ---------------------------------------------------------------------------------------------------------------
# Llama


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `LlamaModel.permute` of q/k rows: it interleaves each head's two rotary halves because
  its RoPE rotates adjacent pairs, where HF rotates dims i and i + head_dim/2."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama(meta: _Metadata, tensors: _Tensors, qwen2: bool = False) -> tuple[dict, dict]:
  """(LlamaConfig dict, LlamaForCausalLM state dict) of a 'llama' file; with `qwen2`, (Qwen2Config dict,
  Qwen2ForCausalLM state dict) of a 'qwen2' one: the same tensors plus q/k/v biases (llama.cpp requires them,
  and has none on attn_output or the MLP), q/k rows not permuted, and no sliding window (llama.cpp's qwen2
  attends to the whole context, as Qwen2 configs with use_sliding_window=false do)."""
  if meta.get(K.LLM.EXPERT_COUNT, 0):
    raise UserError(f'{meta.path} is a mixture-of-experts {meta.arch} '
                    f'(expert_count={meta.get(K.LLM.EXPERT_COUNT)}): only dense {meta.arch} models can be imported')
  n_layers = int(meta.get(K.LLM.BLOCK_COUNT))
  hidden = int(meta.get(K.LLM.EMBEDDING_LENGTH))
  n_head = meta.get(K.Attention.HEAD_COUNT)
  n_kv = meta.get(K.Attention.HEAD_COUNT_KV, n_head)
  if isinstance(n_head, list) or isinstance(n_kv, list):
    raise UserError(f'{meta.path} has per-layer head counts: only uniform {meta.arch} models can be imported')
  n_head, n_kv = int(n_head), int(n_kv)
  head_dim = int(meta.get(K.Attention.KEY_LENGTH, hidden // n_head))
  if int(meta.get(K.Attention.VALUE_LENGTH, head_dim)) != head_dim:
    raise UserError(f'{meta.path} has different key and value head sizes: HF Llama needs them equal')
  rope_dim = int(meta.get(K.Rope.DIMENSION_COUNT, head_dim))
  if rope_dim != head_dim:
    raise UserError(f'{meta.path} rotates {rope_dim} of {head_dim} head dims (partial RoPE): HF Llama rotates '
                    'all of them')
  emb_name = _name(T.TOKEN_EMBD)
  if emb_name not in tensors:
    raise UserError(f'{meta.path} lacks {emb_name!r}: is the file complete?')
  vocab = int(tensors.by_name[emb_name].shape[-1])  # GGML order: (hidden, vocab)
  up_name = _name(T.FFN_UP, bid=0)
  inter = meta.get(K.LLM.FEED_FORWARD_LENGTH, None)
  if inter is None and up_name in tensors:
    inter = int(tensors.by_name[up_name].shape[-1])
  if inter is None or isinstance(inter, list):
    raise UserError(f'{meta.path} gives no single feed_forward_length: only uniform {meta.arch} models can be '
                    'imported')
  inter = int(inter)
  q_out, kv_out = n_head * head_dim, n_kv * head_dim

  sd = {}
  sd['model.embed_tokens.weight'] = tensors.take(emb_name, (vocab, hidden))
  sd['model.norm.weight'] = tensors.take(_name(T.OUTPUT_NORM), (hidden,))
  tied = _name(T.OUTPUT) not in tensors
  if not tied:
    sd['lm_head.weight'] = tensors.take(_name(T.OUTPUT), (vocab, hidden))
  if qwen2:  # a missing q/k/v bias is then an incomplete file, an o/MLP bias a variant (both refused below)
    qkv_bias, o_bias, mlp_bias = True, False, False
  else:  # HF Llama's attention_bias covers q/k/v and o alike
    qkv_bias = o_bias = _name(T.ATTN_Q, 'bias', 0) in tensors
    mlp_bias = _name(T.FFN_UP, 'bias', 0) in tensors
  q_heads, kv_heads = (None, None) if qwen2 else (n_head, n_kv)
  # (GGUF tensor, HF module under model.layers.i, weight shape, bias shape, heads for the RoPE un-permutation)
  layer = (
      (T.ATTN_NORM, 'input_layernorm', (hidden,), None, None),
      (T.ATTN_Q, 'self_attn.q_proj', (q_out, hidden), (q_out,) if qkv_bias else None, q_heads),
      (T.ATTN_K, 'self_attn.k_proj', (kv_out, hidden), (kv_out,) if qkv_bias else None, kv_heads),
      (T.ATTN_V, 'self_attn.v_proj', (kv_out, hidden), (kv_out,) if qkv_bias else None, None),
      (T.ATTN_OUT, 'self_attn.o_proj', (hidden, q_out), (hidden,) if o_bias else None, None),
      (T.FFN_NORM, 'post_attention_layernorm', (hidden,), None, None),
      (T.FFN_GATE, 'mlp.gate_proj', (inter, hidden), (inter,) if mlp_bias else None, None),
      (T.FFN_UP, 'mlp.up_proj', (inter, hidden), (inter,) if mlp_bias else None, None),
      (T.FFN_DOWN, 'mlp.down_proj', (hidden, inter), (hidden,) if mlp_bias else None, None),
  )
  for i in range(n_layers):
    for tensor, hf, w_shape, b_shape, heads in layer:
      for suffix, shape in (('weight', w_shape), ('bias', b_shape)):
        if shape is None:
          continue
        name = _name(tensor, suffix, i)
        if name not in tensors:
          raise UserError(f'{meta.path} lacks tensor {name!r} (layer {i} of {n_layers}): is the file complete?')
        a = tensors.take(name, shape)
        sd[f'model.layers.{i}.{hf}.{suffix}'] = _unpermute_rope(a, heads) if heads else a

  rope_theta = meta.get_float(K.Rope.FREQ_BASE, 10000.0)
  rope_scaling = _rope_scaling(meta, tensors, rope_theta, head_dim)
  # attn_rot_embd: an old converter's precomputed RoPE table, which every runtime recomputes.
  tensors.used.update(_name(T.ATTN_ROT_EMBD, bid=i) for i in range(n_layers))
  _check_unused(tensors)
  cfg = {
      'architectures': ['LlamaForCausalLM'],
      'model_type': 'llama',
      'vocab_size': vocab,
      'hidden_size': hidden,
      'intermediate_size': inter,
      'num_hidden_layers': n_layers,
      'num_attention_heads': n_head,
      'num_key_value_heads': n_kv,
      'head_dim': head_dim,
      'hidden_act': 'silu',
      'max_position_embeddings': int(meta.get(K.LLM.CONTEXT_LENGTH)),
      'rms_norm_eps': meta.get_float(K.Attention.LAYERNORM_RMS_EPS, 1e-5),
      'rope_theta': rope_theta,
      'rope_scaling': rope_scaling,
      'tie_word_embeddings': tied,
  }
  if qwen2:
    cfg.update(architectures=['Qwen2ForCausalLM'], model_type='qwen2', use_sliding_window=False,
               sliding_window=None)
  else:
    cfg.update(attention_bias=qkv_bias, mlp_bias=mlp_bias)
  return cfg, sd


def _rope_scaling(meta: _Metadata, tensors: _Tensors, theta: float, head_dim: int) -> dict | None:
  """HF rope_scaling from the file: the scaling.* keys (linear, yarn) or a Llama 3 `rope_freqs` tensor."""
  kind = meta.get(K.Rope.SCALING_TYPE, None)
  factor = meta.get_float(K.Rope.SCALING_FACTOR, None)
  freqs_name = _name(T.ROPE_FREQS)
  if freqs_name in tensors:
    if kind not in (None, gguf.RopeScalingType.NONE.value):
      raise UserError(f'{meta.path} has both rope scaling type {kind!r} and a {freqs_name!r} tensor: '
                      'not a layout llama.cpp\'s converter writes for llama')
    factors = tensors.take(freqs_name, (head_dim // 2,))
    return _llama3_rope_scaling(factors, theta, head_dim, meta.path)
  linear = gguf.RopeScalingType.LINEAR.value
  if kind in (None, gguf.RopeScalingType.NONE.value) or (kind == linear and factor in (None, 1.0)):
    return None
  if kind == linear:
    return {'rope_type': 'linear', 'factor': factor}
  if kind == gguf.RopeScalingType.YARN.value:
    out = {'rope_type': 'yarn', 'factor': factor,
           'original_max_position_embeddings': int(meta.get(K.Rope.SCALING_ORIG_CTX_LEN))}
    for key, hf in ((K.Rope.SCALING_YARN_BETA_FAST, 'beta_fast'), (K.Rope.SCALING_YARN_BETA_SLOW, 'beta_slow'),
                    (K.Rope.SCALING_ATTN_FACTOR, 'attention_factor')):
      if meta.has(key):
        out[hf] = meta.get_float(key)
    return out
  raise UserError(f'{meta.path} uses rope scaling {kind!r}: only linear, yarn and Llama 3 (rope_freqs) '
                  'scaling can be imported')


def _llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
  """The rope_freqs tensor llama.cpp's converter writes for HF's llama3 rope_scaling (the same formula as
  transformers' _compute_llama3_parameters, as a divisor per frequency)."""
  freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  wavelen = 2 * np.pi / freqs.astype(np.float64)
  smooth = (old_ctx / wavelen - low) / (high - low)
  medium = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium))


def _llama3_rope_scaling(factors: np.ndarray, theta: float, dim: int, path: str) -> dict | None:
  """HF's llama3 rope_scaling that reproduces llama.cpp's per-frequency `rope_freqs` divisors.

  The divisors are 1 (high frequencies), `factor` (low ones) and, between, 1 / ((1 - s) / factor + s) with
  s = (old_ctx / wavelen - low_freq_factor) / (high - low) linear in 1/wavelen. That line is fitted from the
  in-between divisors; it fixes old_ctx / low and old_ctx / high, which are all the formula depends on, so
  low_freq_factor is taken as 1 (Llama 3.1-3.3's value; then the recovered numbers are the published ones).
  With fewer than two in-between divisors the published Llama 3 values (low 1, high 4, 8192) are tried. The
  candidate must reproduce every divisor, otherwise the file is refused rather than imported with a wrong RoPE.
  """
  r = np.asarray(factors, np.float64)
  if np.allclose(r, 1.0, rtol=0, atol=1e-6):
    return None
  factor = float(r.max())
  freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  inv_wavelen = freqs.astype(np.float64) / (2 * np.pi)
  mid = (r > 1 + 1e-6) & (r < factor * (1 - 1e-6))
  candidates = []
  if mid.sum() >= 2:
    s = (1 / r[mid] - 1 / factor) / (1 - 1 / factor)
    a, b = np.polyfit(inv_wavelen[mid], s, 1)  # s = a / wavelen + b = (old_ctx / wavelen - low) / (high - low)
    if b < 0:
      high, old_ctx = 1 - 1 / b, -a / b
      candidates.append((1.0, _round(high), int(round(old_ctx))))
  candidates.append((1.0, 4.0, 8192))
  factor = _round(factor)
  for low, high, old_ctx in candidates:
    if np.allclose(_llama3_factors(theta, dim, factor, low, high, old_ctx), r, rtol=1e-4, atol=1e-6):
      return {'rope_type': 'llama3', 'factor': factor, 'low_freq_factor': low, 'high_freq_factor': high,
              'original_max_position_embeddings': old_ctx}
  raise UserError(f'{path} has a rope_freqs tensor that no Llama 3 rope_scaling reproduces: HF Llama cannot '
                  'apply these RoPE factors, so the model would compute differently')


def _round(x: float) -> float:
  """x with the float noise of a fit removed (8191.9999 -> 8192.0) when it is that close to a short decimal."""
  r = round(x, 3)
  return float(r) if abs(r - x) <= 1e-4 * max(1.0, abs(x)) else float(x)


# ---------------------------------------------------------------------------------------------------------------
# GPT-2


def _gpt2(meta: _Metadata, tensors: _Tensors) -> tuple[dict, dict]:
  """(GPT2Config dict, GPT2LMHeadModel state dict) of a 'gpt2' file."""
  n_layers = int(meta.get(K.LLM.BLOCK_COUNT))
  hidden = int(meta.get(K.LLM.EMBEDDING_LENGTH))
  n_head = int(meta.get(K.Attention.HEAD_COUNT))
  for needed in (_name(T.TOKEN_EMBD), _name(T.POS_EMBD), _name(T.FFN_UP, bid=0)):
    if needed not in tensors:
      raise UserError(f'{meta.path} lacks tensor {needed!r}: is the file complete?')
  vocab = int(tensors.by_name[_name(T.TOKEN_EMBD)].shape[-1])
  n_pos = int(tensors.by_name[_name(T.POS_EMBD)].shape[-1])
  # llama.cpp writes feed_forward_length = 4 * n_embd whatever n_inner is: the tensor says the truth.
  inner = int(tensors.by_name[_name(T.FFN_UP, bid=0)].shape[-1])

  sd = {
      'transformer.wte.weight': tensors.take(_name(T.TOKEN_EMBD), (vocab, hidden)),
      'transformer.wpe.weight': tensors.take(_name(T.POS_EMBD), (n_pos, hidden)),
      'transformer.ln_f.weight': tensors.take(_name(T.OUTPUT_NORM), (hidden,)),
      'transformer.ln_f.bias': tensors.take(_name(T.OUTPUT_NORM, 'bias'), (hidden,)),
  }
  tied = True
  if _name(T.OUTPUT) in tensors:
    out = tensors.take(_name(T.OUTPUT), (vocab, hidden))
    tied = bool(np.array_equal(out, sd['transformer.wte.weight']))
    sd['lm_head.weight'] = out
  # (GGUF tensor, HF module under transformer.h.i, weight shape as stored (out, in) for Conv1D, Conv1D?)
  layer = (
      (T.ATTN_NORM, 'ln_1', (hidden,), False),
      (T.ATTN_QKV, 'attn.c_attn', (3 * hidden, hidden), True),
      (T.ATTN_OUT, 'attn.c_proj', (hidden, hidden), True),
      (T.FFN_NORM, 'ln_2', (hidden,), False),
      (T.FFN_UP, 'mlp.c_fc', (inner, hidden), True),
      (T.FFN_DOWN, 'mlp.c_proj', (hidden, inner), True),
  )
  for i in range(n_layers):
    for tensor, hf, shape, conv1d in layer:
      for suffix in ('weight', 'bias'):
        name = _name(tensor, suffix, i)
        if name not in tensors:
          raise UserError(f'{meta.path} lacks tensor {name!r} (layer {i} of {n_layers}): is the file complete?')
        a = tensors.take(name, shape if suffix == 'weight' else shape[:1])
        # llama.cpp stores Conv1D weights transposed to Linear's (out, in); HF's Conv1D wants (in, out).
        sd[f'transformer.h.{i}.{hf}.{suffix}'] = np.ascontiguousarray(a.T) if conv1d and suffix == 'weight' else a
  _check_unused(tensors)
  cfg = {
      'architectures': ['GPT2LMHeadModel'],
      'model_type': 'gpt2',
      'vocab_size': vocab,
      'n_embd': hidden,
      'n_layer': n_layers,
      'n_head': n_head,
      'n_positions': n_pos,
      'n_ctx': n_pos,
      'n_inner': inner,
      'layer_norm_epsilon': meta.get_float(K.Attention.LAYERNORM_EPS, 1e-5),
      'activation_function': 'gelu_new',
      'tie_word_embeddings': tied,
  }
  return cfg, sd


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict]:
  """The HF tokenizer and tokenizer_config the file's tokenizer.ggml.* metadata describe."""
  kind = meta.get(K.Tokenizer.MODEL, None)
  if kind is None:
    raise UserError(f'{meta.path} carries no tokenizer (no {K.Tokenizer.MODEL!r}): use a GGUF file with its '
                    'vocabulary, or convert from the HuggingFace directory')
  tokens = meta.get(K.Tokenizer.LIST)
  types = meta.get(K.Tokenizer.TOKEN_TYPE, None) or [gguf.TokenType.NORMAL] * len(tokens)
  pre = meta.get(K.Tokenizer.PRE, None)
  if kind == 'llama':
    tok = _sentencepiece_bpe(meta, tokens, types)
    add_bos_default = True  # llama.cpp adds BOS for sentencepiece vocabularies that do not say otherwise
  elif kind == 'gpt2':
    rule = gguf_pretokenizers.split_rule(pre)
    if rule is None:
      known = len(gguf_pretokenizers.PRE_TOKENIZERS)
      raise UserError(f'{meta.path} has a byte-level BPE tokenizer with pre-tokenizer {pre!r}, which jaxssl does '
                      f'not know: the {known} it reads (llama.cpp\'s names: gpt-2, llama-bpe, qwen2, smollm, '
                      'deepseek-llm, ...) are listed in jaxssl/convert/gguf_pretokenizers.py')
    tok = _byte_level_bpe(meta, tokens, rule)
    add_bos_default = rule.add_bos  # as llama.cpp: e.g. Llama 3 vocabularies add BOS, Qwen2's do not
  else:
    raise UserError(f'{meta.path} has tokenizer model {kind!r}: only \'llama\' (sentencepiece BPE) and \'gpt2\' '
                    '(byte-level BPE) can be imported')

  # Control (and the unknown) tokens match whole in text and are skipped when decoding, as in HF's tokenizers;
  # user-defined ones match whole but are ordinary text. Their content is in the vocab, so ids do not change.
  special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
             if ty in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)]
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
          if ty == gguf.TokenType.USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(user)

  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False}
  for name, key in (('bos_token', K.Tokenizer.BOS_ID), ('eos_token', K.Tokenizer.EOS_ID),
                    ('unk_token', K.Tokenizer.UNK_ID), ('pad_token', K.Tokenizer.PAD_ID)):
    token_id = meta.get(key, None)
    if token_id is None:
      continue
    if not 0 <= token_id < len(tokens):
      raise UserError(f'{meta.path} has {key}={token_id}, outside its {len(tokens)}-token vocabulary')
    config[name] = tokens[token_id]
  add_bos = bool(meta.get(K.Tokenizer.ADD_BOS, add_bos_default))
  add_eos = bool(meta.get(K.Tokenizer.ADD_EOS, False))
  config['add_bos_token'], config['add_eos_token'] = add_bos, add_eos
  chat_template = meta.get(K.Tokenizer.CHAT_TEMPLATE, None)
  if chat_template:
    config['chat_template'] = chat_template

  post = [processors.ByteLevel(trim_offsets=False)] if kind == 'gpt2' else []
  if add_bos or add_eos:
    # The tokenizer itself adds BOS/EOS (HF's Llama tokenizer.json does the same), so encode(...,
    # add_special_tokens=True) differs from add_special_tokens=False exactly when the model expects them.
    needed = [(n, config.get(n + '_token')) for n, on in (('bos', add_bos), ('eos', add_eos)) if on]
    missing = [n for n, t in needed if t is None]
    if missing:
      raise UserError(f'{meta.path} asks to add {missing[0]} tokens but gives no {missing[0]}_token_id')
    bos = f'{config["bos_token"]}:0 ' if add_bos else ''
    eos = f' {config["eos_token"]}:0' if add_eos else ''
    bos1 = f' {config["bos_token"]}:1' if add_bos else ''
    eos1 = f' {config["eos_token"]}:1' if add_eos else ''
    specials = {(t, tokens.index(t)) for _, t in needed}
    post.append(processors.TemplateProcessing(single=f'{bos}$A:0{eos}', pair=f'{bos}$A:0{eos}{bos1} $B:1{eos1}',
                                              special_tokens=sorted(specials, key=lambda x: x[1])))
  if post:
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
  return tok, config


def _vocab(tokens: list) -> dict:
  """token -> id; a repeated token keeps its first id (BPE vocabularies must be one-to-one)."""
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  return vocab


def _file_merges(meta: _Metadata) -> list | None:
  merges = meta.get(K.Tokenizer.MERGES, None)
  if merges is None:
    return None
  return [tuple(m.split(' ', 1)) for m in merges]


def _merges_from_scores(tokens: list, scores: list, types: list) -> list:
  """BPE merges implied by a sentencepiece BPE vocabulary: each normal piece with score s is made from any two
  normal pieces that concatenate to it, ranked by s (best first). That reproduces sentencepiece's encoder,
  which merges the adjacent pair whose concatenation is the highest-scoring piece."""
  normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
  merges = []
  for piece, i in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        merges.append((-scores[i], i, cut, left, right))
  merges.sort(key=lambda m: m[:3])
  return [(left, right) for *_, left, right in merges]


def _sentencepiece_bpe(meta: _Metadata, tokens: list, types: list) -> Tokenizer:
  """llama.cpp's 'llama' vocabulary (sentencepiece BPE with byte fallback) as HF's Llama tokenizer.json does it:
  Metaspace (space -> '▁', one '▁' before the text), BPE with `<0xXX>` byte fallback, and the reverse decoder."""
  scores = meta.get(K.Tokenizer.SCORES, None)
  merges = _file_merges(meta)
  if merges is None:
    if scores is None:
      raise UserError(f'{meta.path} has a sentencepiece vocabulary with neither merges nor scores')
    merges = _merges_from_scores(tokens, scores, types)
  unk_id = meta.get(K.Tokenizer.UNK_ID, None)
  unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
  tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  add_prefix = bool(meta.get(K.Tokenizer.ADD_PREFIX, True))
  # A normalizer (as HF's Llama 2 tokenizer.json), not HF's Metaspace(prepend_scheme='first'): Metaspace adds
  # no '▁' to text that starts with a space (' hi' -> '▁hi'), where sentencepiece and llama.cpp always do
  # ('▁▁hi'). Text after an added token (e.g. '<s>', user-defined '<sep>') gets its own '▁' too, as llama.cpp
  # does; sentencepiece itself, which does not split on those, would not add it there.
  steps = [normalizers.Prepend(SPIECE_SPACE)] if add_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(' ', SPIECE_SPACE)])
  steps = [decoders.Replace(SPIECE_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if add_prefix:
    steps.append(decoders.Strip(content=' ', left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok


def _byte_level_bpe(meta: _Metadata, tokens: list, rule: gguf_pretokenizers.SplitRule) -> Tokenizer:
  """llama.cpp's 'gpt2' vocabulary (byte-level BPE), split as `rule` says (the file's tokenizer.ggml.pre)."""
  merges = _file_merges(meta)
  if merges is None:
    raise UserError(f'{meta.path} has a byte-level BPE vocabulary without {K.Tokenizer.MERGES!r}')
  # ignore_merges (Llama 3, Tekken, ...): a split that is a whole vocabulary token is taken as is, as llama.cpp
  # and those models' tokenizer.json do.
  tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=rule.ignore_merges))
  tok.pre_tokenizer = gguf_pretokenizers.pre_tokenizer(rule)
  tok.decoder = decoders.ByteLevel()
  return tok

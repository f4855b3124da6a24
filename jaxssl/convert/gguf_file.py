"""GGUF files (llama.cpp's format) read into HuggingFace form: config dict, state dict and tokenizer.

  ckpt = read_gguf('model.Q8_0.gguf')
  ckpt.hf_config                 # what config.json would say (LlamaForCausalLM, Qwen2ForCausalLM, GPT2LMHeadModel)
  ckpt.state_dict                # HF tensor names -> float32 numpy arrays in HF shapes/layouts
  ckpt.write_tokenizer(out_dir)  # tokenizer.json + tokenizer_config.json

so the HF -> jaxssl mappings (hf_gpt2, hf_llama, hf_gemma3) serve GGUF files too. Architectures: 'llama' (which
also covers Mistral-style files), 'qwen2' (Qwen2 / Qwen2.5: Llama's layout with q/k/v biases), 'qwen3' (no
biases; an RMSNorm of each q/k head), 'gpt2' and 'gemma3' (gguf_file_gemma3.py).
Quantised tensors are dequantised with the `gguf` package, so the state dict holds what llama.cpp computes
with, not the original weights. Where the file stores F32 the arrays are read-only views of the memory-mapped
file (no copy of a large model until it is used).

What llama.cpp's converter (convert_hf_to_gguf.py) changed is undone:
  * llama attn_q / attn_k rows are permuted for llama.cpp's RoPE (it rotates adjacent pairs, HF rotates
    dims i and i + head_dim/2 of each head); the inverse permutation restores HF's q_proj / k_proj. qwen2/qwen3
    files are not permuted (llama.cpp's converter keeps HF's rows there and runs qwen2 with its NEOX RoPE, HF's).
  * GPT-2's Conv1D weights (c_attn, c_proj, c_fc) are stored transposed to (out, in); they come back (in, out).
  * Llama 3.1+ RoPE scaling is stored as a per-frequency `rope_freqs.weight` tensor instead of HF's
    rope_scaling parameters; those are recovered from it (see `llama3_rope_scaling`) and the result is checked
    to reproduce the tensor exactly, otherwise the file is refused (HF has no way to take the raw factors).

The tokenizer is read by gguf_tokenizer.py (`read_gguf_tokenizer` reads only it), the file itself by
gguf_reader.py. No torch or transformers import here.
"""
import dataclasses
import json
import os

import gguf
import numpy as np
from tokenizers import Tokenizer

from jaxssl.convert import gguf_file_gemma3
from jaxssl.convert.gguf_reader import K, Metadata, Tensors, check_unused, open_file, tensor_name
from jaxssl.convert.gguf_tokenizer import tokenizer_from_metadata
from jaxssl.errors import UserError

T = gguf.MODEL_TENSOR
LLAMA = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
QWEN2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2]
QWEN3 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3]
GPT2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2]
SUPPORTED_ARCHITECTURES = (LLAMA, QWEN2, QWEN3, GPT2, gguf_file_gemma3.ARCH)


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
  """Reads a llama.cpp GGUF file (architecture 'llama', 'qwen2', 'qwen3', 'gpt2' or 'gemma3', any tensor type the gguf
  package can dequantise) into HF config, float32 HF state dict and tokenizer. Mistakes in the file are UserErrors."""
  reader = open_file(path)
  meta = Metadata(reader, path)
  arch = meta.get(K.General.ARCHITECTURE)
  if arch not in SUPPORTED_ARCHITECTURES:
    raise UserError(f'{path} holds a {arch!r} model: only GGUF architectures {list(SUPPORTED_ARCHITECTURES[:4])} '
                    f'and {gguf_file_gemma3.ARCH!r} can be imported')
  split_count = meta.get(K.Split.LLM_KV_SPLIT_COUNT, 1)
  if split_count > 1:
    raise UserError(f'{path} is part of a {split_count}-file split GGUF: merge it first '
                    '(llama-gguf-split --merge FIRST.gguf OUT.gguf)')
  tokenizer, tokenizer_config = tokenizer_from_metadata(meta)  # first: cheap, so its errors come before dequantising
  tensors = Tensors(reader, path)
  if arch in (LLAMA, QWEN2, QWEN3):
    hf_config, state_dict = _llama(meta, tensors, arch)
  elif arch == gguf_file_gemma3.ARCH:
    hf_config, state_dict = gguf_file_gemma3.gemma3(meta, tensors)
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
  return tokenizer_from_metadata(Metadata(open_file(path), path))


# ---------------------------------------------------------------------------------------------------------------
# Llama


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's `LlamaModel.permute` of q/k rows: it interleaves each head's two rotary halves because
  its RoPE rotates adjacent pairs, where HF rotates dims i and i + head_dim/2."""
  return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_sizes(meta: Metadata, tensors: Tensors) -> tuple[int, ...]:
  """(layers, hidden, heads, kv heads, head dim, vocab, intermediate) of a 'llama'/'qwen2' file; a variant HF
  Llama cannot hold (mixture of experts, per-layer sizes, partial RoPE) is a UserError."""
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
  emb_name = tensor_name(T.TOKEN_EMBD)
  if emb_name not in tensors:
    raise UserError(f'{meta.path} lacks {emb_name!r}: is the file complete?')
  vocab = int(tensors.by_name[emb_name].shape[-1])  # GGML order: (hidden, vocab)
  up_name = tensor_name(T.FFN_UP, bid=0)
  inter = meta.get(K.LLM.FEED_FORWARD_LENGTH, None)
  if inter is None and up_name in tensors:
    inter = int(tensors.by_name[up_name].shape[-1])
  if inter is None or isinstance(inter, list):
    raise UserError(f'{meta.path} gives no single feed_forward_length: only uniform {meta.arch} models can be '
                    'imported')
  inter = int(inter)
  return n_layers, hidden, n_head, n_kv, head_dim, vocab, inter


def _llama(meta: Metadata, tensors: Tensors, arch: str = LLAMA) -> tuple[dict, dict]:
  """(LlamaConfig dict, LlamaForCausalLM state dict) of a 'llama' file; for 'qwen2', (Qwen2Config dict,
  Qwen2ForCausalLM state dict): the same tensors plus q/k/v biases (llama.cpp requires them, and has none on
  attn_output or the MLP), q/k rows not permuted, and no sliding window (llama.cpp's qwen2 attends to the whole
  context, as Qwen2 configs with use_sliding_window=false do); for 'qwen3', Qwen3's: no biases, q/k norms of
  head_dim each layer, rows not permuted, no sliding window."""
  n_layers, hidden, n_head, n_kv, head_dim, vocab, inter = _llama_sizes(meta, tensors)
  emb_name = tensor_name(T.TOKEN_EMBD)
  q_out, kv_out = n_head * head_dim, n_kv * head_dim

  sd = {}
  sd['model.embed_tokens.weight'] = tensors.take(emb_name, (vocab, hidden))
  sd['model.norm.weight'] = tensors.take(tensor_name(T.OUTPUT_NORM), (hidden,))
  tied = tensor_name(T.OUTPUT) not in tensors
  if not tied:
    sd['lm_head.weight'] = tensors.take(tensor_name(T.OUTPUT), (vocab, hidden))
  qwen2, qwen3 = arch == QWEN2, arch == QWEN3
  if qwen2 or qwen3:  # a missing q/k/v bias is then an incomplete file, an o/MLP bias a variant (both refused below)
    qkv_bias, o_bias, mlp_bias = qwen2, False, False
  else:  # HF Llama's attention_bias covers q/k/v and o alike
    qkv_bias = o_bias = tensor_name(T.ATTN_Q, 'bias', 0) in tensors
    mlp_bias = tensor_name(T.FFN_UP, 'bias', 0) in tensors
  q_heads, kv_heads = (None, None) if qwen2 or qwen3 else (n_head, n_kv)
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
  ) + (((T.ATTN_Q_NORM, 'self_attn.q_norm', (head_dim,), None, None),
        (T.ATTN_K_NORM, 'self_attn.k_norm', (head_dim,), None, None)) if qwen3 else ())
  for i in range(n_layers):
    for tensor, hf, w_shape, b_shape, heads in layer:
      for suffix, shape in (('weight', w_shape), ('bias', b_shape)):
        if shape is None:
          continue
        name = tensor_name(tensor, suffix, i)
        if name not in tensors:
          raise UserError(f'{meta.path} lacks tensor {name!r} (layer {i} of {n_layers}): is the file complete?')
        a = tensors.take(name, shape)
        sd[f'model.layers.{i}.{hf}.{suffix}'] = _unpermute_rope(a, heads) if heads else a

  rope_theta = meta.get_float(K.Rope.FREQ_BASE, 10000.0)
  rope_scaling = _rope_scaling(meta, tensors, rope_theta, head_dim)
  # attn_rot_embd: an old converter's precomputed RoPE table, which every runtime recomputes.
  tensors.used.update(tensor_name(T.ATTN_ROT_EMBD, bid=i) for i in range(n_layers))
  check_unused(tensors)
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
  if qwen2 or qwen3:
    cfg.update(architectures=[f'{arch.capitalize()}ForCausalLM'], model_type=arch, use_sliding_window=False,
               sliding_window=None)
    if qwen3:
      cfg.update(attention_bias=False)
  else:
    cfg.update(attention_bias=qkv_bias, mlp_bias=mlp_bias)
  return cfg, sd


def _rope_scaling(meta: Metadata, tensors: Tensors, theta: float, head_dim: int) -> dict | None:
  """HF rope_scaling from the file: the scaling.* keys (linear, yarn) or a Llama 3 `rope_freqs` tensor."""
  kind = meta.get(K.Rope.SCALING_TYPE, None)
  factor = meta.get_float(K.Rope.SCALING_FACTOR, None)
  freqs_name = tensor_name(T.ROPE_FREQS)
  if freqs_name in tensors:
    if kind not in (None, gguf.RopeScalingType.NONE.value):
      raise UserError(f'{meta.path} has both rope scaling type {kind!r} and a {freqs_name!r} tensor: '
                      'not a layout llama.cpp\'s converter writes for llama')
    factors = tensors.take(freqs_name, (head_dim // 2,))
    return llama3_rope_scaling(factors, theta, head_dim, meta.path)
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


def llama3_factors(theta: float, dim: int, factor: float, low: float, high: float, old_ctx: float) -> np.ndarray:
  """The rope_freqs tensor llama.cpp's converter writes for HF's llama3 rope_scaling (the same formula as
  transformers' _compute_llama3_parameters, as a divisor per frequency)."""
  freqs = 1.0 / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
  wavelen = 2 * np.pi / freqs.astype(np.float64)
  smooth = (old_ctx / wavelen - low) / (high - low)
  medium = 1 / ((1 - smooth) / factor + smooth)
  return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, medium))


def llama3_rope_scaling(factors: np.ndarray, theta: float, dim: int, path: str) -> dict | None:
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
    if np.allclose(llama3_factors(theta, dim, factor, low, high, old_ctx), r, rtol=1e-4, atol=1e-6):
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


def _gpt2(meta: Metadata, tensors: Tensors) -> tuple[dict, dict]:
  """(GPT2Config dict, GPT2LMHeadModel state dict) of a 'gpt2' file."""
  n_layers = int(meta.get(K.LLM.BLOCK_COUNT))
  hidden = int(meta.get(K.LLM.EMBEDDING_LENGTH))
  n_head = int(meta.get(K.Attention.HEAD_COUNT))
  for needed in (tensor_name(T.TOKEN_EMBD), tensor_name(T.POS_EMBD), tensor_name(T.FFN_UP, bid=0)):
    if needed not in tensors:
      raise UserError(f'{meta.path} lacks tensor {needed!r}: is the file complete?')
  vocab = int(tensors.by_name[tensor_name(T.TOKEN_EMBD)].shape[-1])
  n_pos = int(tensors.by_name[tensor_name(T.POS_EMBD)].shape[-1])
  # llama.cpp writes feed_forward_length = 4 * n_embd whatever n_inner is: the tensor says the truth.
  inner = int(tensors.by_name[tensor_name(T.FFN_UP, bid=0)].shape[-1])

  sd = {
      'transformer.wte.weight': tensors.take(tensor_name(T.TOKEN_EMBD), (vocab, hidden)),
      'transformer.wpe.weight': tensors.take(tensor_name(T.POS_EMBD), (n_pos, hidden)),
      'transformer.ln_f.weight': tensors.take(tensor_name(T.OUTPUT_NORM), (hidden,)),
      'transformer.ln_f.bias': tensors.take(tensor_name(T.OUTPUT_NORM, 'bias'), (hidden,)),
  }
  tied = True
  if tensor_name(T.OUTPUT) in tensors:
    out = tensors.take(tensor_name(T.OUTPUT), (vocab, hidden))
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
        name = tensor_name(tensor, suffix, i)
        if name not in tensors:
          raise UserError(f'{meta.path} lacks tensor {name!r} (layer {i} of {n_layers}): is the file complete?')
        a = tensors.take(name, shape if suffix == 'weight' else shape[:1])
        # llama.cpp stores Conv1D weights transposed to Linear's (out, in); HF's Conv1D wants (in, out).
        sd[f'transformer.h.{i}.{hf}.{suffix}'] = np.ascontiguousarray(a.T) if conv1d and suffix == 'weight' else a
  check_unused(tensors)
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

"""GGUF architecture 'gemma3' (llama.cpp) read into HF Gemma3ForCausalLM form (config 'gemma3_text' + state
dict), for hf_gemma3; gguf_file.read_gguf dispatches here.

What llama.cpp's converter (convert_hf_to_gguf.py, Gemma3Model) changed is undone or filled in:
  * every '*norm.weight' is stored as 1 + w (llama.cpp then runs a plain RMSNorm): 1 is subtracted again, as
    transformers' own GGUF loader does (Gemma2TensorProcessor).
  * q/k rows are not permuted (llama.cpp runs Gemma with the NEOX RoPE, HF's rotate_half).
  * the file has no layer pattern, local RoPE base or query_pre_attn_scalar: llama.cpp hard-codes every 6th
    layer global, a local base of 10000, and scores scaled by head_dim^-1/2 (hidden / heads for the 62-layer
    27B); the same values are used here unless the file names them (sliding_window_pattern, rope.freq_base_swa).
"""
import gguf
import numpy as np

from jaxssl.convert.gguf_reader import K, Metadata, Tensors, check_unused, tensor_name
from jaxssl.errors import UserError

T = gguf.MODEL_TENSOR
ARCH = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3]
LLAMA_CPP_PATTERN, LLAMA_CPP_LOCAL_BASE = 6, 10000.0
# (GGUF tensor, HF module under model.layers.i, shape key: 'h' hidden, 'd' head_dim, or an (out, in) pair)
LAYER = (
    (T.ATTN_NORM, 'input_layernorm', 'h'), (T.ATTN_POST_NORM, 'post_attention_layernorm', 'h'),
    (T.FFN_NORM, 'pre_feedforward_layernorm', 'h'), (T.FFN_POST_NORM, 'post_feedforward_layernorm', 'h'),
    (T.ATTN_Q_NORM, 'self_attn.q_norm', 'd'), (T.ATTN_K_NORM, 'self_attn.k_norm', 'd'),
    (T.ATTN_Q, 'self_attn.q_proj', ('q', 'h')), (T.ATTN_K, 'self_attn.k_proj', ('kv', 'h')),
    (T.ATTN_V, 'self_attn.v_proj', ('kv', 'h')), (T.ATTN_OUT, 'self_attn.o_proj', ('h', 'q')),
    (T.FFN_GATE, 'mlp.gate_proj', ('i', 'h')), (T.FFN_UP, 'mlp.up_proj', ('i', 'h')),
    (T.FFN_DOWN, 'mlp.down_proj', ('h', 'i')),
)


def layer_types(meta: Metadata, n_layers: int) -> list[str]:
  """HF layer_types from the file's sliding_window_pattern (an N, or a per-layer bool list: True = sliding),
  llama.cpp's fixed 6 when absent."""
  pattern = meta.get(K.Attention.SLIDING_WINDOW_PATTERN, LLAMA_CPP_PATTERN)
  if isinstance(pattern, list):
    if len(pattern) != n_layers:
      raise UserError(f'{meta.path} has a sliding_window_pattern of {len(pattern)} layers for {n_layers}')
    return ['sliding_attention' if s else 'full_attention' for s in pattern]
  return ['sliding_attention' if (i + 1) % int(pattern) else 'full_attention' for i in range(n_layers)]


def gemma3(meta: Metadata, tensors: Tensors) -> tuple[dict, dict]:
  """(Gemma3TextConfig dict, Gemma3ForCausalLM state dict) of a 'gemma3' file."""
  n_layers = int(meta.get(K.LLM.BLOCK_COUNT))
  hidden = int(meta.get(K.LLM.EMBEDDING_LENGTH))
  n_head, n_kv = meta.get(K.Attention.HEAD_COUNT), meta.get(K.Attention.HEAD_COUNT_KV)
  inter = meta.get(K.LLM.FEED_FORWARD_LENGTH)
  if any(isinstance(v, list) for v in (n_head, n_kv, inter)):
    raise UserError(f'{meta.path} has per-layer sizes: only uniform Gemma 3 models can be imported')
  n_head, n_kv, inter = int(n_head), int(n_kv), int(inter)
  head_dim = int(meta.get(K.Attention.KEY_LENGTH, hidden // n_head))
  if int(meta.get(K.Attention.VALUE_LENGTH, head_dim)) != head_dim:
    raise UserError(f'{meta.path} has different key and value head sizes: Gemma 3 has them equal')
  emb_name = tensor_name(T.TOKEN_EMBD)
  if emb_name not in tensors:
    raise UserError(f'{meta.path} lacks {emb_name!r}: is the file complete?')
  vocab = int(tensors.by_name[emb_name].shape[-1])  # GGML order: (hidden, vocab)
  sizes = {'h': hidden, 'd': head_dim, 'q': n_head * head_dim, 'kv': n_kv * head_dim, 'i': inter}

  def norm(a: np.ndarray) -> np.ndarray:
    return (a - np.float32(1.0)).astype(np.float32)  # the converter stored 1 + w

  sd = {'model.embed_tokens.weight': tensors.take(emb_name, (vocab, hidden)),
        'model.norm.weight': norm(tensors.take(tensor_name(T.OUTPUT_NORM), (hidden,)))}
  tied = tensor_name(T.OUTPUT) not in tensors
  if not tied:
    sd['lm_head.weight'] = tensors.take(tensor_name(T.OUTPUT), (vocab, hidden))
  for i in range(n_layers):
    for tensor, hf, shape in LAYER:
      name = tensor_name(tensor, 'weight', i)
      if name not in tensors:
        raise UserError(f'{meta.path} lacks tensor {name!r} (layer {i} of {n_layers}): is the file complete?')
      a = tensors.take(name, (sizes[shape],) if isinstance(shape, str) else tuple(sizes[s] for s in shape))
      sd[f'model.layers.{i}.{hf}.weight'] = norm(a) if isinstance(shape, str) else a
  check_unused(tensors)
  scaling = None
  kind, factor = meta.get(K.Rope.SCALING_TYPE, None), meta.get_float(K.Rope.SCALING_FACTOR, None)
  if kind == gguf.RopeScalingType.LINEAR.value and factor not in (None, 1.0):
    scaling = {'rope_type': 'linear', 'factor': factor}
  elif kind not in (None, gguf.RopeScalingType.NONE.value, gguf.RopeScalingType.LINEAR.value):
    raise UserError(f'{meta.path} uses rope scaling {kind!r}: Gemma 3 imports with none or linear')
  return {
      'architectures': ['Gemma3ForCausalLM'], 'model_type': 'gemma3_text', 'vocab_size': vocab,
      'hidden_size': hidden, 'intermediate_size': inter, 'num_hidden_layers': n_layers,
      'num_attention_heads': n_head, 'num_key_value_heads': n_kv, 'head_dim': head_dim,
      'hidden_activation': 'gelu_pytorch_tanh',
      'max_position_embeddings': int(meta.get(K.LLM.CONTEXT_LENGTH)),
      'rms_norm_eps': meta.get_float(K.Attention.LAYERNORM_RMS_EPS, 1e-6),
      'rope_theta': meta.get_float(K.Rope.FREQ_BASE, 1_000_000.0),
      'rope_local_base_freq': meta.get_float(K.Rope.FREQ_BASE_SWA, LLAMA_CPP_LOCAL_BASE),
      'rope_scaling': scaling,
      'sliding_window': int(meta.get(K.Attention.SLIDING_WINDOW)),
      'layer_types': layer_types(meta, n_layers),
      # llama.cpp: 1/sqrt(hidden / heads) for the 27B (62 layers), 1/sqrt(head_dim) otherwise
      'query_pre_attn_scalar': hidden // n_head if n_layers == 62 else head_dim,
      'tie_word_embeddings': tied, 'attention_bias': False, 'final_logit_softcapping': None,
      'attn_logit_softcapping': None,
  }, sd

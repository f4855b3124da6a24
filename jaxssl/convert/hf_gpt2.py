"""HuggingFace GPT-2 weights <-> the jaxssl GPT param tree (jaxssl/models/gpt.py), as numpy arrays.

  model_cfg, params = params_from_hf(state_dict, hf_config)   # GPT2LMHeadModel / GPT2Model tensors
  state_dict, hf_config = params_to_hf(params, model_cfg)     # GPT2LMHeadModel tensors (lm_head tied)

`state_dict` maps names to numpy arrays (`safetensors.numpy.load_file`, or torch tensors' `.numpy()`);
`hf_config` is GPT2Config as a dict (`config.json`). The vocabulary size is `hf_config['vocab_size']`
(= params['token_embeddings']['embedding'].shape[0]). No torch or transformers import here.

HF's Conv1D stores weights as (in, out), so kernels are reshaped, not transposed; the fused c_attn (H, 3H) is
split into the q, k, v kernels (H, heads, head_dim). Per-layer tensors fill slice i of the stacked params
(leading 'layers' axis, as `scan_layers=True` builds them).
"""
import re

import numpy as np
from safetensors.numpy import load_file

from jaxssl.convert import hf_defaults
from jaxssl.convert import param_tree
from jaxssl.errors import UserError

# HF buffers (causal-mask tables in older checkpoints), not parameters: dropped silently.
IGNORED_HF_KEYS = re.compile(r'(^|\.)attn\.(bias|masked_bias)$')
# GELU variants that are the tanh approximation jaxssl GPT computes.
TANH_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')

# (HF name after 'transformer.', jaxssl path under decoder/layers). Conv1D weights are (in, out) already.
LAYER = (
    ('ln_1.weight', 'attention_norm/scale'),
    ('ln_1.bias', 'attention_norm/bias'),
    ('attn.c_proj.weight', 'attention/out_kernel'),
    ('attn.c_proj.bias', 'attention/out_bias'),
    ('ln_2.weight', 'mlp_norm/scale'),
    ('ln_2.bias', 'mlp_norm/bias'),
    ('mlp.c_fc.weight', 'mlp/wi/kernel'),
    ('mlp.c_fc.bias', 'mlp/wi/bias'),
    ('mlp.c_proj.weight', 'mlp/wo/kernel'),
    ('mlp.c_proj.bias', 'mlp/wo/bias'),
)
TOP = (
    ('wte.weight', 'token_embeddings/embedding'),
    ('wpe.weight', 'position_embeddings/embedding'),
    ('ln_f.weight', 'final_norm/scale'),
    ('ln_f.bias', 'final_norm/bias'),
)
QKV = ('query', 'key', 'value')


def model_config_from_hf(hf: dict) -> dict:
  """The jaxssl `model` config section (configs/gpt.py fields) for a GPT2Config dict; keys it omits take
  GPT2Config's defaults (n_positions 1024, ...). Checks the math matches."""
  if (hf.get('model_type') or 'gpt2') != 'gpt2':
    raise UserError(f"HF config has model_type={hf.get('model_type')!r}: only 'gpt2' converts here")
  hf = hf_defaults.with_defaults(hf, 'gpt2')
  act = hf['activation_function']
  if act not in TANH_GELUS:
    raise UserError(f'HF config has activation_function={act!r}: jaxssl GPT uses the tanh GELU (gelu_new) only')
  unsupported = {'scale_attn_by_inverse_layer_idx': False, 'add_cross_attention': False,
                 'scale_attn_weights': True, 'tie_word_embeddings': True}
  for key, want in unsupported.items():
    if bool(hf[key]) != want:
      raise UserError(f'HF config has {key}={hf[key]}: jaxssl GPT supports only {key}={want}')
  hidden = int(hf['n_embd'])
  return {
      'name': 'gpt',
      'num_layers': int(hf['n_layer']),
      'hidden_size': hidden,
      'num_heads': int(hf['n_head']),
      'intermediate_size': int(hf['n_inner'] or 4 * hidden),  # GPT2Config's n_inner None means 4 * n_embd
      'max_position': int(hf['n_positions']),
      'dropout_rate': float(hf['resid_pdrop']),
      'attention_dropout_rate': float(hf['attn_pdrop']),
      'initializer_range': float(hf['initializer_range']),
      'layer_norm_eps': float(hf['layer_norm_epsilon']),
      'scan_layers': True,
  }


def hf_config_from_model(model_cfg, vocab_size: int) -> dict:
  """GPT2Config (as a dict, for config.json) for a jaxssl GPT model config section."""
  get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': int(vocab_size),
      'n_embd': int(get('hidden_size')), 'n_layer': int(get('num_layers')), 'n_head': int(get('num_heads')),
      'n_inner': int(get('intermediate_size')), 'n_positions': int(get('max_position', 1024)),
      'activation_function': 'gelu_new', 'layer_norm_epsilon': float(get('layer_norm_eps', 1e-5)),
      'resid_pdrop': float(get('dropout_rate', 0.1)), 'embd_pdrop': float(get('dropout_rate', 0.1)),
      'attn_pdrop': float(get('attention_dropout_rate', 0.1)),
      'initializer_range': float(get('initializer_range', 0.02)),
      'scale_attn_weights': True, 'scale_attn_by_inverse_layer_idx': False, 'reorder_and_upcast_attn': False,
      'tie_word_embeddings': True,
  }


def _check_shape(name: str, a: np.ndarray, shape) -> np.ndarray:
  if a.shape != tuple(shape):
    raise UserError(f'{name} has shape {a.shape}, expected {tuple(shape)} from the HF config: '
                    'do the weights and config.json belong together?')
  return a


def params_from_hf(state_dict: dict, hf_config: dict) -> tuple[dict, dict]:
  """(jaxssl model config section, params pure dict of float32 numpy arrays) from HF GPT-2 tensors.

  Accepts GPT2LMHeadModel names ('transformer.' prefix, optional 'lm_head.weight', which must equal the token
  embedding: jaxssl ties them) and bare GPT2Model names. A missing or misshapen tensor is a UserError, and
  so is a tensor left unused (other than the old attn.bias/masked_bias buffers).
  """
  cfg = model_config_from_hf(hf_config)
  n_layers, h, n_heads, inner = cfg['num_layers'], cfg['hidden_size'], cfg['num_heads'], cfg['intermediate_size']
  vocab, n_pos = int(hf_defaults.with_defaults(hf_config, 'gpt2')['vocab_size']), cfg['max_position']
  if h % n_heads:
    raise UserError(f'HF config has n_embd={h} not divisible by n_head={n_heads}')
  d = h // n_heads
  tensors = {(k[len('transformer.'):] if k.startswith('transformer.') else k): v for k, v in state_dict.items()}
  used = set()

  def take(name: str, shape) -> np.ndarray:
    if name not in tensors:
      raise UserError(f'the checkpoint lacks {name!r}: is it a GPT-2 checkpoint with {n_layers} layers?')
    used.add(name)
    return _check_shape(name, np.asarray(tensors[name], np.float32), shape)

  params: dict = {}
  top_shapes = {'wte.weight': (vocab, h), 'wpe.weight': (n_pos, h), 'ln_f.weight': (h,), 'ln_f.bias': (h,)}
  for hf, path in TOP:
    param_tree.put(params, path, take(hf, top_shapes[hf]))
  layer_shapes = {'ln_1.weight': (h,), 'ln_1.bias': (h,), 'attn.c_proj.weight': (h, h), 'attn.c_proj.bias': (h,),
                  'ln_2.weight': (h,), 'ln_2.bias': (h,), 'mlp.c_fc.weight': (h, inner), 'mlp.c_fc.bias': (inner,),
                  'mlp.c_proj.weight': (inner, h), 'mlp.c_proj.bias': (h,)}
  jax_shapes = {'attention/out_kernel': (n_heads, d, h)}  # the rest keep the HF shape
  for hf, path in LAYER:
    stacked = np.stack([take(f'h.{i}.{hf}', layer_shapes[hf]) for i in range(n_layers)])
    param_tree.put(params, f'decoder/layers/{path}', stacked.reshape(n_layers, *jax_shapes.get(path, layer_shapes[hf])))
  # c_attn: (H, 3H) = [q | k | v] along the output axis, each output laid out as (heads, head_dim).
  w = np.stack([take(f'h.{i}.attn.c_attn.weight', (h, 3 * h)) for i in range(n_layers)])
  b = np.stack([take(f'h.{i}.attn.c_attn.bias', (3 * h,)) for i in range(n_layers)])
  w = w.reshape(n_layers, h, 3, n_heads, d)
  b = b.reshape(n_layers, 3, n_heads, d)
  for j, name in enumerate(QKV):
    param_tree.put(params, f'decoder/layers/attention/{name}_kernel', np.ascontiguousarray(w[:, :, j]))
    param_tree.put(params, f'decoder/layers/attention/{name}_bias', np.ascontiguousarray(b[:, j]))

  for head in ('lm_head.weight',):
    if head in tensors:
      used.add(head)
      if not np.array_equal(np.asarray(tensors[head], np.float32), params['token_embeddings']['embedding']):
        raise UserError(f'{head} differs from transformer.wte.weight: jaxssl ties the output projection to the '
                        'token embedding, so this untied checkpoint cannot be converted exactly')
  unused = sorted(k for k in tensors if k not in used and not IGNORED_HF_KEYS.search(k))
  if unused:
    raise UserError(f'{len(unused)} checkpoint tensors have no place in jaxssl GPT, e.g. {unused[:3]}')
  return cfg, params


def params_to_hf(params: dict, model_cfg) -> tuple[dict, dict]:
  """(GPT2LMHeadModel state dict of float32 numpy arrays, GPT2Config dict) from jaxssl GPT params.

  `params` is the pure dict of the model's Params (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), scanned
  or not. 'lm_head.weight' is written as a copy of the token embedding (tied).
  """
  layers = param_tree.stacked_layers(params['decoder']['layers'])
  as_np = lambda a: np.asarray(a, np.float32)  # noqa: E731
  emb = as_np(param_tree.get(params, 'token_embeddings/embedding'))
  out = {}
  for hf, path in TOP:
    out[f'transformer.{hf}'] = as_np(param_tree.get(params, path))
  n_layers = as_np(param_tree.get(layers, 'attention_norm/scale')).shape[0]
  for i in range(n_layers):
    for hf, path in LAYER:
      a = as_np(param_tree.get(layers, path))[i]
      # Conv1D (in, out): the attention output kernel (heads, head_dim, H) flattens its first two axes.
      out[f'transformer.h.{i}.{hf}'] = np.ascontiguousarray(a.reshape(-1, a.shape[-1]) if a.ndim > 1 else a)
    att = param_tree.get(layers, 'attention')
    w = np.stack([as_np(att[f'{n}_kernel'])[i] for n in QKV], axis=1)  # (H, 3, heads, head_dim)
    b = np.stack([as_np(att[f'{n}_bias'])[i] for n in QKV])            # (3, heads, head_dim)
    out[f'transformer.h.{i}.attn.c_attn.weight'] = np.ascontiguousarray(w.reshape(w.shape[0], -1))
    out[f'transformer.h.{i}.attn.c_attn.bias'] = b.reshape(-1)
  out['lm_head.weight'] = emb.copy()
  return out, hf_config_from_model(model_cfg, emb.shape[0])


def load_safetensors(path: str) -> dict:
  """HF `model.safetensors` -> {name: numpy array}; a clear UserError when it cannot be read."""
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises its own error types (and numpy has no bfloat16)
    raise UserError(f'cannot read {path} ({e}): re-save it as float32 safetensors') from None


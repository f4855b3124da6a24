"""HuggingFace Gemma 3 (Gemma3ForCausalLM, model_type 'gemma3_text'; or the text part of a 'gemma3'
Gemma3ForConditionalGeneration, config.json nesting it under text_config) <-> jaxssl GPT params, Gemma options on
(models/gemma.py). Pure numpy: `state_dict` maps HF names to numpy arrays, `hf_config` is the config.json dict in
transformers 4's layout (rope_theta, rope_local_base_freq, rope_scaling) or 5's (rope_parameters per layer type).

Gemma3RMSNorm scales by (1 + w) and stores w: jaxssl's norm='rmsnorm_plus_one' stores the same w, so norms load
as they are. HF's rotate_half RoPE is jaxssl's, so q/k need no permutation. Which layers slide comes from
layer_types (or the older sliding_window_pattern), and must be periodic: every Nth layer global.
"""
import numpy as np

from jaxssl.convert import hf_llama, param_tree
from jaxssl.errors import UserError

TYPES = ('gemma3_text', 'gemma3')
# Gemma3TextConfig's defaults (transformers 5.24) for keys a config.json leaves out.
DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, hidden_activation='gelu_pytorch_tanh',
                max_position_embeddings=131_072, initializer_range=0.02, rms_norm_eps=1e-6,
                tie_word_embeddings=True, attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=256,
                sliding_window=4096, final_logit_softcapping=None, attn_logit_softcapping=None,
                use_bidirectional_attention=False, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
GELU_TANH = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_tanh')
# (HF name under 'layers.{i}.', jaxssl path under decoder/layers)
NORMS = (('input_layernorm', 'attention_norm'), ('post_attention_layernorm', 'post_attention_norm'),
         ('pre_feedforward_layernorm', 'mlp_norm'), ('post_feedforward_layernorm', 'post_mlp_norm'),
         ('self_attn.q_norm', 'attention/query_norm'), ('self_attn.k_norm', 'attention/key_norm'))
MLP = (('mlp.gate_proj', 'mlp/wi_gate'), ('mlp.up_proj', 'mlp/wi_up'), ('mlp.down_proj', 'mlp/wo'))
QKV = (('self_attn.q_proj', 'query'), ('self_attn.k_proj', 'key'), ('self_attn.v_proj', 'value'))
# Prefixes of the text model's tensors (Gemma3ForCausalLM; Gemma3ForConditionalGeneration in transformers 5 / 4).
TEXT_PREFIXES = ('model.language_model.', 'language_model.model.', 'model.')
VISION_PREFIXES = ('model.vision_tower.', 'vision_tower.', 'model.multi_modal_projector.', 'multi_modal_projector.')


def text_config(hf: dict) -> dict:
  """The text model's config dict, defaults filled: config.json itself ('gemma3_text') or its text_config
  ('gemma3'); other model types are a UserError."""
  kind = hf.get('model_type')
  if kind not in TYPES:
    raise UserError(f'HF config has model_type={kind!r}: hf_gemma3 converts {", ".join(TYPES)}')
  if kind == 'gemma3':
    if not isinstance(hf.get('text_config'), dict):
      raise UserError("config.json has model_type='gemma3' but no text_config dict: is it complete?")
    hf = dict(hf['text_config'], model_type='gemma3_text')
  out = dict(hf)
  for key, value in DEFAULTS.items():
    out.setdefault(key, value)
  return out


def _rope(hf: dict) -> tuple[float, float, dict | None]:
  """(global theta, local theta, global rope_scaling or None) from rope_parameters (5.x, per layer type) or
  rope_theta / rope_local_base_freq / rope_scaling (4.x)."""
  params = hf.get('rope_parameters') or {}
  full = dict(params.get('full_attention') or hf.get('rope_scaling') or {})
  local = dict(params.get('sliding_attention') or {})
  theta = float(full.pop('rope_theta', None) or hf['rope_theta'])
  local_theta = float(local.pop('rope_theta', None) or hf['rope_local_base_freq'])
  if local.get('rope_type', 'default') != 'default':
    raise UserError(f'HF config scales the local layers\' RoPE ({local}): jaxssl scales only the global layers\'')
  kind = full.pop('rope_type', None) or full.pop('type', None) or 'default'
  if kind == 'default':
    return theta, local_theta, None
  if kind != 'linear' or 'factor' not in full:
    raise UserError(f"HF config has global rope_type={kind!r}: jaxssl imports Gemma 3 with 'default' or 'linear'")
  return theta, local_theta, {'rope_type': 'linear', 'factor': float(full['factor'])}


def window_pattern(hf: dict) -> tuple[int, int]:
  """(sliding_window, every Nth layer global) of layer_types (or sliding_window_pattern); (0, 0) when no layer
  slides. Layer types that no single N describes are a UserError."""
  n_layers = int(hf['num_hidden_layers'])
  pattern = hf.get('sliding_window_pattern') or hf.get('_sliding_window_pattern') or 6
  types = hf.get('layer_types') or ['sliding_attention' if (i + 1) % int(pattern) else 'full_attention'
                                    for i in range(n_layers)]
  if len(types) != n_layers or set(types) - {'sliding_attention', 'full_attention'}:
    raise UserError(f'HF config has layer_types={types}: want {n_layers} of sliding_attention / full_attention')
  if 'sliding_attention' not in types or hf.get('sliding_window') is None:
    return 0, 0
  full = [i for i, t in enumerate(types) if t == 'full_attention']
  every = full[0] + 1 if full else 0
  if [i for i in range(n_layers) if every and (i + 1) % every == 0] != full:
    raise UserError(f'HF config has layer_types {types}: jaxssl needs every Nth layer global (Gemma 3: N = 6)')
  return int(hf['sliding_window']), every


def model_config_from_hf(hf: dict) -> dict:
  """The jaxssl `model` section (configs/gpt.py fields, Gemma options on) of a Gemma 3 config dict; math jaxssl
  does not compute (softcapping, bidirectional attention, biases, another activation) is a UserError."""
  hf = text_config(hf)
  act = hf.get('hidden_activation') or hf.get('hidden_act')
  if act not in GELU_TANH:
    raise UserError(f'HF config has hidden_activation={act!r}: jaxssl\'s GeGLU uses the tanh GELU')
  for key in ('final_logit_softcapping', 'attn_logit_softcapping'):
    if hf.get(key) is not None:
      raise UserError(f'HF config has {key}={hf[key]}: jaxssl\'s Gemma 3 has no logit softcapping (Gemma 2 has)')
  if hf.get('use_bidirectional_attention') or hf.get('attention_bias'):
    raise UserError('HF config has use_bidirectional_attention or attention_bias set: jaxssl imports the causal '
                    'Gemma 3 decoder without biases')
  theta, local_theta, scaling = _rope(hf)
  window, every = window_pattern(hf)
  hidden, heads, head_dim = int(hf['hidden_size']), int(hf['num_attention_heads']), int(hf['head_dim'])
  return {
      'name': 'gpt', 'num_layers': int(hf['num_hidden_layers']), 'hidden_size': hidden, 'num_heads': heads,
      'num_kv_heads': int(hf['num_key_value_heads']), 'head_dim': head_dim,
      'intermediate_size': int(hf['intermediate_size']), 'max_position': int(hf['max_position_embeddings']),
      'dropout_rate': 0.0, 'attention_dropout_rate': float(hf['attention_dropout'] or 0.0),
      'initializer_range': float(hf['initializer_range']), 'layer_norm_eps': float(hf['rms_norm_eps']),
      'norm': 'rmsnorm_plus_one', 'position': 'rope', 'mlp': 'geglu',
      'rope_theta': theta, 'rope_scaling': scaling, 'rope_local_theta': local_theta,
      'tie_embeddings': bool(hf['tie_word_embeddings']), 'use_bias': False, 'attention_bias': False,
      'qk_norm': True, 'sandwich_norm': True, 'query_pre_attn_scalar': float(hf['query_pre_attn_scalar']),
      'sliding_window': window, 'sliding_window_pattern': every, 'scale_embeddings': True, 'scan_layers': True,
  }


def _text_tensors(state_dict: dict) -> dict:
  """The text model's tensors under bare names ('layers.0...', 'embed_tokens.weight', 'lm_head.weight'); a
  multimodal checkpoint's vision tower and projector are left out."""
  out = {}
  for name, value in state_dict.items():
    if name.startswith(VISION_PREFIXES):
      continue
    if name in ('lm_head.weight', 'language_model.lm_head.weight'):
      out['lm_head.weight'] = value
      continue
    prefix = next((p for p in TEXT_PREFIXES if name.startswith(p)), '')
    out[name[len(prefix):]] = value
  return out


def params_from_hf(state_dict: dict, hf_config: dict) -> tuple[dict, dict]:
  """(jaxssl model config section, params pure dict of float32 numpy arrays) from HF Gemma 3 tensors. A missing
  or misshapen tensor is a UserError, and so is one left unused."""
  cfg = model_config_from_hf(hf_config)
  n_layers, h, inner = cfg['num_layers'], cfg['hidden_size'], cfg['intermediate_size']
  n, kv, d = cfg['num_heads'], cfg['num_kv_heads'], cfg['head_dim']
  vocab = int(text_config(hf_config)['vocab_size'])
  tensors = _text_tensors(state_dict)
  used = set()
  take, stack = hf_llama.tensor_takers(tensors, used, n_layers, 'Gemma 3')

  params: dict = {}
  param_tree.put(params, 'token_embeddings/embedding', take('embed_tokens.weight', (vocab, h)))
  param_tree.put(params, 'final_norm/scale', take('norm.weight', (h,)))
  layers: dict = {}
  for hf, path in NORMS:
    param_tree.put(layers, f'{path}/scale', stack(f'{hf}.weight', (d,) if hf.startswith('self_attn.') else (h,)))
  for (hf, name), heads in zip(QKV, (n, kv, kv)):
    w = stack(f'{hf}.weight', (heads * d, h))  # (L, out, in)
    param_tree.put(layers, f'attention/{name}_kernel',
                   np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(n_layers, h, heads, d))
  w = stack('self_attn.o_proj.weight', (h, n * d))
  param_tree.put(layers, 'attention/out_kernel', np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(n_layers, n, d, h))
  for hf, path in MLP:
    out_in = (h, inner) if hf.endswith('down_proj') else (inner, h)
    param_tree.put(layers, f'{path}/kernel', np.ascontiguousarray(stack(f'{hf}.weight', out_in).transpose(0, 2, 1)))
  params['decoder'] = {'layers': layers}
  if cfg['tie_embeddings']:
    if 'lm_head.weight' in tensors and not np.array_equal(take('lm_head.weight', (vocab, h)),
                                                          params['token_embeddings']['embedding']):
      raise UserError('lm_head.weight differs from embed_tokens.weight although the config has '
                      'tie_word_embeddings=true: set it to false in config.json to keep a separate head')
  else:
    params['lm_head'] = {'kernel': np.ascontiguousarray(take('lm_head.weight', (vocab, h)).T)}
  unused = sorted(k for k in tensors if k not in used)
  if unused:
    raise UserError(f'{len(unused)} checkpoint tensors have no place in jaxssl GPT (Gemma 3 variant), e.g. '
                    f'{unused[:3]}: does config.json match the weights?')
  return cfg, params

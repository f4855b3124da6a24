"""HuggingFace Llama weights <-> the jaxssl GPT param tree in its Llama variant (jaxssl/models/gpt.py), as numpy.

  model_cfg, params = params_from_hf(state_dict, hf_config)   # LlamaForCausalLM / LlamaModel tensors
  state_dict, hf_config = params_to_hf(params, model_cfg)     # LlamaForCausalLM tensors + LlamaConfig dict

Also reads Mistral (without a sliding window), Qwen2 (q/k/v biases) and Qwen3 (an RMSNorm of each q/k head before
RoPE: model.qk_norm) checkpoints, which are Llama with other names on the config; a model with attention_bias and
no other bias is written back as Qwen2, one with qk_norm as Qwen3. `state_dict` maps
names to numpy arrays (safetensors.numpy, or torch tensors' `.numpy()`); `hf_config` is the config.json dict, in
transformers 4's form (rope_theta + rope_scaling) or 5's (rope_parameters). No torch or transformers import here.

nn.Linear stores weights as (out, in): kernels are transposed, then the out axis is split into (heads, head_dim).
HF's rotate_half RoPE is what jaxssl computes, so q/k need no permutation. Per-layer tensors fill slice i of the
stacked params (leading 'layers' axis, as `scan_layers=True` builds them).
"""
import re

import numpy as np

from jaxssl.convert import hf_defaults
from jaxssl.convert import param_tree
from jaxssl.errors import UserError

# Rotary frequency buffers that some checkpoints carry: recomputed from the config, dropped silently.
IGNORED_HF_KEYS = re.compile(r'(^|\.)rotary_emb\.inv_freq$')
SUPPORTED_TYPES = ('llama', 'mistral', 'qwen2', 'qwen3')
QWEN = ('qwen2', 'qwen3')  # slide only with use_sliding_window
SILU = ('silu', 'swish')

# (HF name under 'model.layers.{i}.', jaxssl path under decoder/layers, how: 'T' = transpose nn.Linear weight).
NORMS = (('input_layernorm.weight', 'attention_norm/scale'), ('post_attention_layernorm.weight', 'mlp_norm/scale'))
MLP = (('mlp.gate_proj', 'mlp/wi_gate'), ('mlp.up_proj', 'mlp/wi_up'), ('mlp.down_proj', 'mlp/wo'))
QKV = (('self_attn.q_proj', 'query'), ('self_attn.k_proj', 'key'), ('self_attn.v_proj', 'value'))
QK_NORMS = (('self_attn.q_norm.weight', 'attention/query_norm/scale'), ('self_attn.k_norm.weight',
                                                                       'attention/key_norm/scale'))  # Qwen3


def _rope(hf: dict) -> tuple[float, dict | None]:
  """(rope_theta, rope_scaling dict or None) of a config.json in either transformers layout, read with transformers
  5's precedence: the rope_scaling (4.x) or rope_parameters (5.x) dict; its rope_theta, else the top-level
  rope_theta (4.x), else the default; its rope_type, else the older `type` (4.x before 4.45 wrote only that)."""
  params = hf.get('rope_scaling') or hf.get('rope_parameters') or {}
  per_layer_type = [params[t] for t in dict.fromkeys(hf.get('layer_types') or ()) if t in params]
  if per_layer_type:  # 5.x nests the dict by layer type for models with several attention kinds
    if any(p != per_layer_type[0] for p in per_layer_type):
      raise UserError('HF config has a different RoPE per layer type: jaxssl applies one RoPE to every layer')
    params = per_layer_type[0] or {}
  params = dict(params)
  theta = params.pop('rope_theta', None)
  theta = float(hf.get('rope_theta') or hf_defaults.DEFAULT_ROPE_THETA) if theta is None else float(theta)
  legacy_kind = params.pop('type', None)
  kind = params.pop('rope_type', None) or legacy_kind or 'default'
  partial = params.pop('partial_rotary_factor', None) or hf.get('partial_rotary_factor') or 1.0
  if float(partial) != 1.0:
    raise UserError('HF config has partial_rotary_factor != 1: jaxssl rotates the whole head')
  if kind == 'default':
    return theta, None
  keys = {'linear': ('factor',),
          'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')}
  if kind not in keys:
    raise UserError(f"HF config has rope_type={kind!r}: jaxssl supports 'default', 'linear' and 'llama3' RoPE")
  if kind == 'llama3' and params.get('original_max_position_embeddings') is None:  # transformers' fallback
    params['original_max_position_embeddings'] = hf['max_position_embeddings']
  missing = [k for k in keys[kind] if params.get(k) is None]
  if missing:
    raise UserError(f'HF config rope_scaling ({kind}) lacks {missing}')
  return theta, {'rope_type': kind, **{k: params[k] for k in keys[kind]}}


def _sliding_window(hf: dict) -> int | None:
  """The window some layer's attention is limited to, or None when every layer attends to the whole context (as
  transformers decides it: Qwen2 and Qwen3 slide only with use_sliding_window, in layers from max_window_layers on or
  those layer_types names 'sliding_attention'; Mistral slides in every layer)."""
  if hf['model_type'] not in QWEN:
    return hf.get('sliding_window')
  window = hf['sliding_window'] if hf['use_sliding_window'] else None
  layer_types = hf.get('layer_types') or [
      'sliding_attention' if window is not None and i >= hf['max_window_layers'] else 'full_attention'
      for i in range(hf['num_hidden_layers'])]
  return window if 'sliding_attention' in layer_types else None


def resolved_config(hf: dict) -> dict:
  """The config.json dict `hf` with transformers' defaults of its model_type in place of omitted keys
  (hf_defaults), after checking the model_type is one this module converts."""
  kind = hf.get('model_type') or 'llama'
  if kind not in SUPPORTED_TYPES:
    raise UserError(f'HF config has model_type={kind!r}: hf_llama converts {", ".join(SUPPORTED_TYPES)} '
                    '(GPT-2 converts with hf_gpt2)')
  return hf_defaults.with_defaults(hf, kind)


def model_config_from_hf(hf: dict) -> dict:
  """The jaxssl `model` config section (configs/gpt.py fields) for a Llama/Mistral/Qwen2 config dict in either
  transformers layout (4.x: rope_theta + rope_scaling; 5.x: rope_parameters); keys it omits take the model
  type's transformers defaults. Checks that the math matches (a sliding window, another activation or RoPE type
  is a UserError)."""
  hf = resolved_config(hf)
  kind = hf['model_type']
  act = hf['hidden_act']
  if act not in SILU:
    raise UserError(f'HF config has hidden_act={act!r}: the jaxssl Llama MLP is SwiGLU with silu only')
  window = _sliding_window(hf)
  if window is not None and int(window) < int(hf['max_position_embeddings']):
    raise UserError(f'HF config has sliding_window={window}: jaxssl attends to the whole context; only '
                    'checkpoints with sliding_window null (e.g. Mistral v0.2+) convert')
  if kind == 'qwen2':  # q/k/v biases, none on o_proj or the MLP
    use_bias, attention_bias = False, True
  elif kind == 'qwen3':  # its attention_bias puts biases on q/k/v and o_proj, none on the MLP
    if hf['attention_bias']:
      raise UserError('HF config has model_type=qwen3 with attention_bias=true: jaxssl has biases on q/k/v only '
                      '(Qwen2) or on every projection (model.use_bias), not on the attention alone')
    use_bias, attention_bias = False, False
  else:
    attention_bias, mlp_bias = bool(hf.get('attention_bias', False)), bool(hf.get('mlp_bias', False))
    if attention_bias != mlp_bias:
      raise UserError(f'HF config has attention_bias={attention_bias} but mlp_bias={mlp_bias}: jaxssl has '
                      'biases on all projections or none (model.use_bias)')
    use_bias, attention_bias = attention_bias, False
  hidden, heads, head_dim = int(hf['hidden_size']), int(hf['num_attention_heads']), int(hf['head_dim'])
  theta, scaling = _rope(hf)
  return {
      'name': 'gpt',
      'num_layers': int(hf['num_hidden_layers']),
      'hidden_size': hidden,
      'num_heads': heads,
      'num_kv_heads': int(hf['num_key_value_heads']),
      'head_dim': 0 if head_dim * heads == hidden else head_dim,
      'intermediate_size': int(hf['intermediate_size']),
      'max_position': int(hf['max_position_embeddings']),
      'dropout_rate': 0.0,
      'attention_dropout_rate': float(hf['attention_dropout'] or 0.0),
      'initializer_range': float(hf['initializer_range']),
      'layer_norm_eps': float(hf['rms_norm_eps']),
      'norm': 'rmsnorm', 'position': 'rope', 'mlp': 'swiglu',
      'rope_theta': theta, 'rope_scaling': scaling,
      'tie_embeddings': bool(hf['tie_word_embeddings']),
      'use_bias': use_bias, 'attention_bias': attention_bias,
      **({'qk_norm': True} if kind == 'qwen3' else {}),  # RMSNorm of each q/k head before RoPE
      'scan_layers': True,
  }


def hf_config_from_model(model_cfg, vocab_size: int) -> dict:
  """LlamaConfig (Qwen2Config for q/k/v-only biases, Qwen3Config for q/k norms) as a dict, for config.json, for a
  jaxssl GPT model config section in its Llama variant (rmsnorm, rope, swiglu)."""
  from jaxssl.models.gpt import GPTConfig  # noqa: PLC0415 (keeps `import hf_llama` free of jax)
  c = GPTConfig.from_config(model_cfg, vocab_size)
  wrong = {k: getattr(c, k) for k, want in (('norm', 'rmsnorm'), ('position', 'rope'), ('mlp', 'swiglu'))
           if getattr(c, k) != want}
  if wrong:
    raise UserError(f'model has {wrong}: only the Llama variant (norm=rmsnorm, position=rope, mlp=swiglu) '
                    'converts to HF Llama; GPT-2 models convert with hf_gpt2')
  if c.qk_norm and (c.use_bias or c.attention_bias):
    raise UserError('model has qk_norm with biases: HF Qwen3 (the Llama variant with q/k norms) has none')
  kind = 'qwen3' if c.qk_norm else 'qwen2' if c.attention_bias and not c.use_bias else 'llama'
  out = {
      'architectures': [{'qwen3': 'Qwen3ForCausalLM', 'qwen2': 'Qwen2ForCausalLM'}.get(kind, 'LlamaForCausalLM')],
      'model_type': kind,
      'vocab_size': int(vocab_size),
      'hidden_size': c.hidden_size, 'intermediate_size': c.intermediate_size,
      'num_hidden_layers': c.num_layers, 'num_attention_heads': c.num_heads,
      'num_key_value_heads': c.num_kv_heads, 'head_dim': c.head_dim,
      'hidden_act': 'silu', 'max_position_embeddings': c.max_position,
      'initializer_range': c.initializer_range, 'rms_norm_eps': c.layer_norm_eps,
      # transformers 4's spelling, which 5 reads too (into rope_parameters)
      'rope_theta': c.rope_theta, 'rope_scaling': dict(c.rope_scaling) if c.rope_scaling else None,
      'attention_dropout': c.attention_dropout_rate,
      'tie_word_embeddings': c.tie_embeddings,
      'torch_dtype': 'float32', 'use_cache': True,
  }
  if kind in QWEN:
    out.update(use_sliding_window=False, sliding_window=None)
    if kind == 'qwen3':
      out.update(attention_bias=False)
  else:
    out.update(attention_bias=c.use_bias, mlp_bias=c.use_bias, pretraining_tp=1)
  return out


def tensor_takers(tensors: dict, used: set, n_layers: int, kind: str):
  """(take(name, shape), stack(suffix, shape)): a float32 tensor of an HF checkpoint checked against the shape its
  config implies (UserError if missing or misshapen; its name goes into `used`), and one per layer stacked."""
  def take(name: str, shape) -> np.ndarray:
    if name not in tensors:
      raise UserError(f'the checkpoint lacks {name!r}: is it a {kind} checkpoint with {n_layers} layers that '
                      'matches config.json?')
    used.add(name)
    a = np.asarray(tensors[name], np.float32)
    if a.shape != tuple(shape):
      raise UserError(f'{name} has shape {a.shape}, expected {tuple(shape)} from the HF config: '
                      'do the weights and config.json belong together?')
    return a

  def stack(suffix: str, shape) -> np.ndarray:
    return np.stack([take(f'layers.{i}.{suffix}', shape) for i in range(n_layers)])

  return take, stack


def params_from_hf(state_dict: dict, hf_config: dict) -> tuple[dict, dict]:
  """(jaxssl model config section, params pure dict of float32 numpy arrays) from HF Llama tensors.

  Accepts LlamaForCausalLM names ('model.' prefix, 'lm_head.weight': absent or equal to the embedding when the
  config ties them) and bare LlamaModel names when tied. A missing or misshapen tensor is a UserError, and so is
  a tensor left unused (other than rotary inv_freq buffers).
  """
  cfg = model_config_from_hf(hf_config)
  n_layers, h, inner = cfg['num_layers'], cfg['hidden_size'], cfg['intermediate_size']
  n, kv = cfg['num_heads'], cfg['num_kv_heads']
  d = cfg['head_dim'] or h // n
  vocab = int(resolved_config(hf_config)['vocab_size'])
  if n % kv:
    raise UserError(f'HF config has num_key_value_heads={kv}, which does not divide num_attention_heads={n}')
  tensors = {(k[len('model.'):] if k.startswith('model.') else k): v for k, v in state_dict.items()}
  used = set()
  take, stack = tensor_takers(tensors, used, n_layers, hf_config.get('model_type', 'llama'))

  params: dict = {}
  param_tree.put(params, 'token_embeddings/embedding', take('embed_tokens.weight', (vocab, h)))
  param_tree.put(params, 'final_norm/scale', take('norm.weight', (h,)))
  layers: dict = {}
  for hf, path in NORMS:
    param_tree.put(layers, path, stack(hf, (h,)))
  for hf, path in QK_NORMS if cfg.get('qk_norm') else ():
    param_tree.put(layers, path, stack(hf, (d,)))
  qkv_bias = cfg['use_bias'] or cfg['attention_bias']
  for (hf, name), heads in zip(QKV, (n, kv, kv)):
    w = stack(f'{hf}.weight', (heads * d, h))  # (L, out, in)
    kernel = np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(n_layers, h, heads, d)
    param_tree.put(layers, f'attention/{name}_kernel', kernel)
    if qkv_bias:
      param_tree.put(layers, f'attention/{name}_bias', stack(f'{hf}.bias', (heads * d,)).reshape(n_layers, heads, d))
  w = stack('self_attn.o_proj.weight', (h, n * d))
  param_tree.put(layers, 'attention/out_kernel', np.ascontiguousarray(w.transpose(0, 2, 1)).reshape(n_layers, n, d, h))
  if cfg['use_bias']:
    param_tree.put(layers, 'attention/out_bias', stack('self_attn.o_proj.bias', (h,)))
  for hf, path in MLP:
    out_in = (h, inner) if hf.endswith('down_proj') else (inner, h)
    param_tree.put(layers, f'{path}/kernel', np.ascontiguousarray(stack(f'{hf}.weight', out_in).transpose(0, 2, 1)))
    if cfg['use_bias']:
      param_tree.put(layers, f'{path}/bias', stack(f'{hf}.bias', out_in[:1]))
  params['decoder'] = {'layers': layers}

  if cfg['tie_embeddings']:
    if 'lm_head.weight' in tensors:
      if not np.array_equal(take('lm_head.weight', (vocab, h)), params['token_embeddings']['embedding']):
        raise UserError('lm_head.weight differs from model.embed_tokens.weight although the config has '
                        'tie_word_embeddings=true: set it to false in config.json to keep a separate head')
  else:
    params['lm_head'] = {'kernel': np.ascontiguousarray(take('lm_head.weight', (vocab, h)).T)}
  unused = sorted(k for k in tensors if k not in used and not IGNORED_HF_KEYS.search(k))
  if unused:
    raise UserError(f'{len(unused)} checkpoint tensors have no place in jaxssl GPT (Llama variant), e.g. '
                    f'{unused[:3]}: does config.json match the weights?')
  return cfg, params


def params_to_hf(params: dict, model_cfg) -> tuple[dict, dict]:
  """(LlamaForCausalLM state dict of float32 numpy arrays, LlamaConfig dict) from jaxssl GPT (Llama variant)
  params.

  `params` is the pure dict of the model's Params (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), scanned
  or not. With tied embeddings 'lm_head.weight' is written as a copy of the embedding (HF's state_dict has it).
  """
  as_np = lambda a: np.asarray(a, np.float32)  # noqa: E731
  emb = as_np(param_tree.get(params, 'token_embeddings/embedding'))
  hf_config = hf_config_from_model(model_cfg, emb.shape[0])
  if hf_config['tie_word_embeddings'] == ('lm_head' in params):
    raise UserError(f"model.tie_embeddings={hf_config['tie_word_embeddings']} but the params "
                    f"{'have' if 'lm_head' in params else 'lack'} an lm_head: do params and config belong together?")
  layers = param_tree.stacked_layers(params['decoder']['layers'])
  att = layers['attention']
  out = {'model.embed_tokens.weight': emb, 'model.norm.weight': as_np(param_tree.get(params, 'final_norm/scale'))}
  for i in range(as_np(param_tree.get(layers, 'attention_norm/scale')).shape[0]):
    pre = f'model.layers.{i}.'
    for hf, path in NORMS + (QK_NORMS if hf_config['model_type'] == 'qwen3' else ()):
      out[pre + hf] = as_np(param_tree.get(layers, path))[i]
    for hf, name in QKV:
      k = as_np(att[f'{name}_kernel'])[i]  # (H, heads, D) -> (heads * D, H)
      out[f'{pre}{hf}.weight'] = np.ascontiguousarray(k.reshape(k.shape[0], -1).T)
      if f'{name}_bias' in att:
        out[f'{pre}{hf}.bias'] = as_np(att[f'{name}_bias'])[i].reshape(-1)
    o = as_np(att['out_kernel'])[i]  # (N, D, H) -> (H, N * D)
    out[pre + 'self_attn.o_proj.weight'] = np.ascontiguousarray(o.reshape(-1, o.shape[-1]).T)
    if 'out_bias' in att:
      out[pre + 'self_attn.o_proj.bias'] = as_np(att['out_bias'])[i]
    for hf, path in MLP:
      out[f'{pre}{hf}.weight'] = np.ascontiguousarray(as_np(param_tree.get(layers, path + '/kernel'))[i].T)
      if 'bias' in param_tree.get(layers, path):
        out[f'{pre}{hf}.bias'] = as_np(param_tree.get(layers, path + '/bias'))[i]
  if 'lm_head' in params:
    out['lm_head.weight'] = np.ascontiguousarray(as_np(params['lm_head']['kernel']).T)
  else:
    out['lm_head.weight'] = emb.copy()
  return out, hf_config

"""Public decoder checkpoints (GPT-2, Llama family) to and from jaxssl GPT exports.

  from_hf(SRC, OUT)   SRC: a HuggingFace directory (GPT-2, Llama/Mistral/Qwen2/Qwen3, Gemma 3) (config.json;
                      model.safetensors, sharded safetensors with model.safetensors.index.json, or
                      pytorch_model.bin; tokenizer.json or vocab.json + merges.txt) or a llama.cpp `.gguf` file
                      (tokenizer from its metadata)
  to_hf(EXPORT, OUT)  a GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM directory
                      transformers opens with from_pretrained

The weight layouts live in hf_gpt2.py and hf_llama.py (which one: config.json's model_type); this module
reads and writes the files. Weights are converted to float32 (bfloat16 safetensors included, GGUF
quantisations dequantised): jaxssl keeps float32 params and computes in `model.dtype`. config.json may be in
transformers 4's layout (rope_theta, rope_scaling, torch_dtype) or 5's (rope_parameters, dtype); keys it omits
take the model type's transformers defaults (hf_defaults). A pytorch_model.bin needs torch; without it the
error says how to re-save the checkpoint as safetensors.
"""
import importlib
import json
import math
import os
import shutil
import tempfile

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl import paths
from jaxssl.convert import gguf_file
from jaxssl.convert import hf_defaults
from jaxssl.convert import staging
from jaxssl.data import hf_tokenizer, tokenizers
from jaxssl.errors import UserError
from jaxssl.models import vocab
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import state as state_lib

BASE_CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'gpt.py') + ':small'
# model_type in config.json -> the module holding its weight layout.
LAYOUTS = {'gpt2': 'hf_gpt2', 'llama': 'hf_llama', 'mistral': 'hf_llama', 'qwen2': 'hf_llama',
           'qwen3': 'hf_llama', 'gemma3_text': 'hf_gemma3', 'gemma3': 'hf_gemma3'}
_SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'I64': np.int64, 'I32': np.int32,
                       'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_}


def _layout(model_type: str):
  if model_type not in LAYOUTS:
    raise UserError(f'config.json has model_type={model_type!r}: decoders convert from {sorted(LAYOUTS)} '
                    f'(and BERT-family encoders from {list(hf_defaults.ENCODER_TYPES)})')
  return importlib.import_module(f'jaxssl.convert.{LAYOUTS[model_type]}')


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({e}): pass a HuggingFace checkpoint directory or a .gguf file') from None


# ----- reading weights -----

def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: float32-or-integer numpy array} of one safetensors file, memory-mapped.

  Read here rather than with `safetensors.numpy` because numpy has no bfloat16, the dtype most public decoder
  checkpoints ship in; ml_dtypes (a JAX dependency) supplies it, and it is widened to float32 here.
  """
  dtypes = {**_SAFETENSORS_DTYPES, 'BF16': ml_dtypes.bfloat16}
  try:
    with open(path, 'rb') as f:
      header_len = int.from_bytes(f.read(8), 'little')
      if not 0 < header_len <= os.fstat(f.fileno()).st_size - 8:  # a damaged file: not a read of its garbage length
        raise ValueError(f'a header of {header_len} bytes')
      header = json.loads(f.read(header_len))
    data = np.memmap(path, np.uint8, mode='r', offset=8 + header_len)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({str(e)[:200]}): is it a safetensors file?') from None
  out = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in dtypes:
      raise UserError(f'{path}: tensor {name} has dtype {info["dtype"]}, which jaxssl does not read; '
                      're-save the checkpoint in float32, float16 or bfloat16')
    start, end = info['data_offsets']
    if end > data.size:  # an interrupted download: the header promises more than the file holds
      raise UserError(f'{path} is truncated: tensor {name} ends at byte {end} of its data, which holds {data.size}; '
                      'download the file again')
    a = data[start:end].view(dtypes[info['dtype']]).reshape(info['shape'])
    out[name] = a.astype(np.float32) if a.dtype.kind == 'f' or info['dtype'] == 'BF16' else np.array(a)
  return out


def _import_torch():
  """torch, or None where it is not installed (jaxssl needs it only to read pytorch_model.bin files)."""
  try:
    import torch  # noqa: PLC0415 (optional: only pytorch_model.bin files need it)
  except ImportError:
    return None
  return torch


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
  torch = _import_torch()
  try:
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (torch raises many types for a bad file)
    raise UserError(f'cannot read {path} ({str(e)[:200]})') from None
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


# (single file, sharded index, reader), in the order they are looked for.
_WEIGHT_LAYOUTS = (('model.safetensors', 'model.safetensors.index.json', read_safetensors),
                   ('pytorch_model.bin', 'pytorch_model.bin.index.json', _read_torch_bin))


def weight_files(directory: str, architecture: str = 'AutoModelForCausalLM') -> tuple[list[str], object]:
  """(paths of the weight files of a HF checkpoint directory, the reader for them), without reading them.

  safetensors first; a pytorch_model.bin (or its shards) without torch installed is a UserError that says how to
  re-save it as safetensors (with transformers' `architecture` class, config.json's architectures[0]).
  """
  for single, index, reader in _WEIGHT_LAYOUTS:
    if os.path.isfile(os.path.join(directory, single)):
      paths = [os.path.join(directory, single)]
    elif os.path.isfile(os.path.join(directory, index)):
      shards = sorted(set(_read_json(os.path.join(directory, index)).get('weight_map', {}).values()))
      missing = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
      if missing or not shards:
        raise UserError(f'{directory}/{index} names shards that are not there ({missing[:3]}): copy all of them')
      paths = [os.path.join(directory, s) for s in shards]
    else:
      continue
    if reader is _read_torch_bin and _import_torch() is None:
      raise UserError(
          f'{paths[0]} is a PyTorch pickle and torch is not installed: pip install torch (the CPU build) and rerun, '
          'or re-save the checkpoint as safetensors where torch is installed: python -c "from transformers import '
          f'{architecture}; {architecture}.from_pretrained({directory!r}).save_pretrained({directory!r})"')
    return paths, reader
  raise UserError(f'{directory} has no model.safetensors, pytorch_model.bin or sharded index: pass a '
                  'HuggingFace checkpoint directory')


def read_hf_weights(directory: str, architecture: str = 'AutoModelForCausalLM') -> dict[str, np.ndarray]:
  """All tensors of a HF checkpoint directory: model.safetensors, its shards (via the .index.json), or
  pytorch_model.bin and its shards (torch needed; `architecture` names the class to re-save it with otherwise)."""
  paths, reader = weight_files(directory, architecture)
  tensors = {}
  for path in paths:
    tensors.update(reader(path))
  return tensors


def saved_class(hf_config: dict, default: str) -> str:
  """The transformers class that saved a checkpoint (config.json's architectures[0]), else `default`."""
  names = hf_config.get('architectures') or [default]
  return names[0] if isinstance(names[0], str) and names[0].isidentifier() else default


def read_tokenizer(directory: str):
  """The checkpoint's tokenizer (tokenizer.json, else vocab.json + merges.txt) as an HFTokenizer."""
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    return hf_tokenizer.HFTokenizer.from_file(os.path.join(directory, 'tokenizer.json'))
  if os.path.isfile(os.path.join(directory, hf_tokenizer.VOCAB_JSON)):
    return hf_tokenizer.HFTokenizer.from_vocab_merges(os.path.join(directory, hf_tokenizer.VOCAB_JSON),
                                                      os.path.join(directory, hf_tokenizer.MERGES_TXT))
  raise UserError(f'{directory} has no tokenizer.json (or vocab.json + merges.txt): copy the checkpoint\'s '
                  'tokenizer files into it')


def read_checkpoint(src: str):
  """(HF config dict, {HF name: numpy array}, HFTokenizer) of a local HF directory or .gguf file."""
  if src.endswith('.gguf'):
    if not os.path.isfile(src):
      raise UserError(f'{src} not found: pass a .gguf file or a HuggingFace checkpoint directory')
    ckpt = gguf_file.read_gguf(src)
    with tempfile.TemporaryDirectory() as tmp:
      ckpt.write_tokenizer(tmp)
      tokenizer = hf_tokenizer.HFTokenizer.from_file(os.path.join(tmp, 'tokenizer.json'))
    tokenizer.path = src
    return ckpt.hf_config, ckpt.state_dict, tokenizer
  if not os.path.isdir(src):
    raise UserError(f'{src} is neither a directory nor a .gguf file: pass a HuggingFace checkpoint directory '
                    '(config.json + weights + tokenizer) or a llama.cpp .gguf file')
  hf_config = _read_json(os.path.join(src, 'config.json'))
  _layout(hf_config.get('model_type', ''))  # an unsupported architecture fails before reading gigabytes
  hf_class = saved_class(hf_config, 'AutoModelForCausalLM')
  weight_files(src, hf_class)  # so do weights that cannot be read here (a .bin without torch)
  tokenizer = read_tokenizer(src)
  return hf_config, read_hf_weights(src, hf_class), tokenizer


# ----- export <-> HF -----

def one_device_mesh():
  """A mesh of the first device: conversions place every parameter there."""
  return mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])


def jaxssl_config(model_cfg: dict, vocab_size: int):
  """The full jaxssl config of a converted decoder: configs/gpt.py:small with this model section."""
  config = config_lib.load_config(BASE_CONFIG)
  with config.unlocked():
    config.model.update(model_cfg)
    config.model.dtype = 'float32'  # as transformers computes it (generation's greedy text matches it)
    config.tokenizer.vocab_size = int(vocab_size)
    config.data.seq_len = config.data.max_predictions = min(config.data.seq_len, int(config.model.max_position))
  return config


def _check_tree(params: dict, abstract: dict, where: str = '') -> None:
  """Same keys and shapes as the model's abstract params (a layout bug must not reach orbax)."""
  if set(params) != set(abstract):
    raise UserError(f'converted params at {where or "/"} have keys {sorted(map(str, params))}, the model '
                    f'{sorted(map(str, abstract))}: the checkpoint does not fit this model')
  for k, v in abstract.items():
    if isinstance(v, dict):
      _check_tree(params[k], v, f'{where}/{k}')
    elif tuple(np.shape(params[k])) != tuple(v.shape):
      raise UserError(f'converted param {where}/{k} has shape {np.shape(params[k])}, the model {tuple(v.shape)}')


def from_hf(src: str, out: str, *, overwrite: bool = False) -> dict:
  """Converts the decoder checkpoint `src` (HF directory or .gguf) into the jaxssl export `out`.

  `out` holds params/ (orbax), config.json (a configs/gpt.py config) and tokenizer.json, readable by
  `jaxssl.train.checkpoint.load_export` (generate, ICL evaluation, fine-tuning, continued pretraining via init_from).
  Returns the export's config dict. `src` may be in a bucket (read from a local copy: staging.py), `out` too.
  """
  with staging.local_source(src) as local_src:  # the memory-mapped weights stay readable until the block ends
    hf_config, tensors, tokenizer = read_checkpoint(local_src)
    if src.endswith('.gguf'):
      tokenizer.path = src
    layout = _layout(hf_config.get('model_type', ''))
    model_cfg, params = layout.params_from_hf(tensors, hf_config)
    del tensors
    vocab_size = int(params['token_embeddings']['embedding'].shape[0])
    if tokenizer.vocab_size > vocab_size:
      raise UserError(f'{src}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only {vocab_size} '
                      'rows: the tokenizer files belong to another checkpoint')
    config = jaxssl_config(model_cfg, vocab_size)
    setup = state_lib.setup_model(config.model, vocab_size, one_device_mesh())
    _check_tree(params, setup.abstract_params)
    params = jax.device_put(params, setup.param_shardings)
    export_config = {**config.to_dict(), 'vocab_size': vocab_size, 'converted_from': {'src': paths.absolute(src)}}
    ckpt_lib.write_export(out, params, json.dumps(export_config, indent=2, sort_keys=True), tokenizer,
                          overwrite=overwrite)
    m = config.model
    print(f'converted {src} ({state_lib.param_count(params) / 1e6:.2f}M params, {hf_config.get("model_type")}: '
          f'{m.num_layers} layers, hidden {m.hidden_size}, vocab {vocab_size}) to {out}')
    return export_config


def is_llama_layout(model_cfg) -> bool:
  """Whether an export's model section is the Llama variant (RoPE/RMSNorm/SwiGLU) rather than GPT-2."""
  get = model_cfg.get
  return get('position', 'learned') == 'rope' or get('norm', 'layernorm') == 'rmsnorm' or get('mlp', 'gelu') == 'swiglu'


def to_hf(src: str, out: str, *, overwrite: bool = False) -> dict:
  """Writes the jaxssl GPT export `src` as a HF directory `out` (GPT2LMHeadModel, or LlamaForCausalLM / Qwen2 /
  Qwen3 by its model section); returns the written config.json dict."""
  saved = ckpt_lib.read_export_config(src)
  if saved.get('model', {}).get('name') != 'gpt':
    raise UserError(f"{src} holds model.name={saved.get('model', {}).get('name')!r}: this converts GPT exports "
                    '(a BERT export converts with the same command through the BERT layout)')
  if 'task' in saved:
    raise UserError(f'{src} is a fine-tuned export (task {saved["task"].get("kind")!r}): convert the pretrained one')
  config = config_lib.from_json(json.dumps(saved))
  gemma_keys = ('sandwich_norm', 'sliding_window', 'query_pre_attn_scalar', 'scale_embeddings')
  if any(config.model.get(k) for k in gemma_keys) or config.model.get('norm') == 'rmsnorm_plus_one':
    raise UserError(f'{src} is a Gemma-style model: to-hf writes GPT-2, Llama, Qwen2 and Qwen3 layouts only (Gemma 3 '
                    'exports are used in jaxssl: generate, evaluate, finetune, init_from)')
  vocab_size = saved['vocab_size']
  setup = state_lib.setup_model(config.model, vocab_size, one_device_mesh())
  params = jax.device_get(ckpt_lib.load_export_params(src, setup.abstract_params))
  layout = _layout('llama' if is_llama_layout(config.model) else 'gpt2')
  tensors, hf_config = layout.params_to_hf(params, config.model.to_dict())
  tokenizer = tokenizers.load_tokenizer(src)
  vocab.check_rows(tokenizer.vocab_size, vocab_size, src)  # padding rows past the ids are written back unchanged
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):  # a jaxssl-pretrained GPT: give HF a tokenizer.json
    tokenizer = hf_tokenizer.from_sentencepiece(tokenizer)
  for role in ('bos', 'eos', 'pad'):
    token_id = getattr(tokenizer, 'sep_id' if role == 'eos' else f'{role}_id', None)
    if token_id is not None:
      hf_config[f'{role}_token_id'] = int(token_id)
  with staging.local_output(out, overwrite) as local_out:  # a bucket folder: written locally, then uploaded
    written = _write_hf_dir(local_out, tensors, hf_config, tokenizer, overwrite)
  n = sum(math.prod(v.shape) for v in tensors.values())
  print(f'wrote {out} ({hf_config["architectures"][0]}, {n / 1e6:.2f}M values, tokenizer: '
        f'{os.path.basename(written)})')
  return hf_config


def _write_hf_dir(out: str, tensors: dict, hf_config: dict, tokenizer, overwrite: bool) -> str:
  """Writes the local HF folder `out` (via a temporary folder renamed into place); returns the tokenizer file."""
  out_dir = out.rstrip(os.sep)
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) and not overwrite:
    raise UserError(f'output directory {out} already exists and is not empty: choose a new --out or pass --overwrite')
  tmp = f'{out_dir}.tmp-convert'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  # transformers refuses safetensors files without a 'format' entry in their metadata.
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
            os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(tmp, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  written = tokenizer.save(tmp)
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  os.rename(tmp, out_dir)
  return written

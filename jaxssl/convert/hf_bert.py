"""HuggingFace BERT checkpoints <-> jaxssl exports (params/ + config.json + tokenizer files).

  from_hf('bert-dir', 'PARAMS')  # config.json + model.safetensors (+ tokenizer.json / vocab.txt) -> export
  to_hf('PARAMS', 'bert-dir')    # export -> config.json + model.safetensors (torch layout) + tokenizer files

Weights are read as decoder.read_hf_weights reads them (model.safetensors, shards, bfloat16; pytorch_model.bin
only where torch is installed, the one use of torch); transformers is never imported. config.json may be in
transformers 4's or 5's layout; keys it omits take transformers' defaults (hf_defaults). Accepted HF layouts:
BertModel (no prefix), BertForPreTraining and BertForMaskedLM (prefix 'bert.'); heads a checkpoint lacks
(pooler, NSP, MLM) are initialised fresh and named in one printed line.

RoBERTa / XLM-R / CamemBERT (model_type 'roberta' / 'xlm-roberta' / 'camembert': XLMRobertaModel, ...) import too
(from-hf only): the same body under prefix 'roberta.', an MLM head `lm_head.*` (= BERT's cls.predictions.*), no
NSP head (fresh), LayerNorm eps 1e-5 (model.layer_norm_eps). Positions: RoBERTa numbers the tokens of a sequence
from pad_token_id + 1 (= 2), so its table has max_position + 2 rows and token t reads row t + 2. The import drops
the first pad_token_id + 1 rows, so jaxssl's position t is HF's row t + 2: exact for every real token of
jaxssl's right-padded inputs (HF gives padding row 1, jaxssl its own t, but attention masks padding, so real
tokens' outputs do not see the difference). Its single token-type row is repeated into the 2 rows jaxssl's pair
inputs use, so segment ids change nothing, as in RoBERTa. RoBERTa packs a pair `<s> A </s></s> B </s>`; jaxssl
pipelines pack `<s> A </s> B </s>` (its [CLS]/[SEP] roles), fine for fine-tuning but not RoBERTa's exact format.
DistilBERT, ELECTRA, MPNet, ALBERT, ERNIE and DeBERTa-v3 (model_type 'distilbert', 'electra', 'mpnet', 'albert',
'ernie', 'deberta-v2') import too (from-hf only): BERT under other names (hf_distilbert.py), with factorised
embeddings (hf_electra.py: model.embedding_size, embedding_projection), with a relative position bias (hf_mpnet.py:
model.relative_attention_buckets), with shared layers repeated and the tanh GELU (hf_albert.py: model.hidden_act),
with a task-type table folded in (hf_ernie.py), with disentangled attention (hf_deberta.py: model.position_buckets).
"""
import json
import math
import os
import re
import shutil

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxssl import config as config_lib
from jaxssl import paths
from jaxssl import storage
from jaxssl.convert import decoder  # its weight-file readers (safetensors, shards, bfloat16, pytorch_model.bin)
from jaxssl.convert import hf_albert, hf_deberta, hf_defaults, hf_distilbert, hf_electra, hf_ernie, hf_gpt2, hf_mpnet
from jaxssl.convert.hf_roberta import ROBERTA_TYPES, position_offset, roberta_to_bert_tensors
from jaxssl.convert import param_tree
from jaxssl.convert import staging
from jaxssl.data import tokenizers
from jaxssl.errors import UserError
from jaxssl.models import vocab
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import state as state_lib

BASE_CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'bert.py') + ':base'
LAYER_NORM_EPS = 1e-12  # the eps jaxssl's LayerNorm uses
TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json')
# HF buffers that are not parameters (older checkpoints saved them): dropped without a warning.
IGNORED_HF_KEYS = re.compile(r'(^|\.)(position_ids|token_type_ids)$')

# HF hidden_act -> jaxssl's model.hidden_act (layers.ACTIVATIONS): every spelling of the tanh GELU is gelu_new.
HIDDEN_ACTS = {'gelu': 'gelu', 'relu': 'relu', **{name: 'gelu_new' for name in hf_gpt2.TANH_GELUS}}
# Encoders imported as BERT under their own names and config keys (from-hf only).
BERT_UNDER_OTHER_NAMES = {'distilbert': hf_distilbert, 'electra': hf_electra, 'mpnet': hf_mpnet, 'albert': hf_albert,
                          'ernie': hf_ernie, 'deberta-v2': hf_deberta}

# (HF name without the 'bert.' prefix, jaxssl param path, kind). kind: 'copy' (same layout), 'bias' (reshape
# only), or ('linear', n) for a torch Linear weight (out, in): transposed to (in, out), then reshaped so the
# first n jaxssl dims are the input (q/k/v kernels (H, heads, head_dim): n=1; attention output (heads,
# head_dim, H): n=2). '{i}' marks per-layer names; those fill slice i of the stacked ('layers' axis 0) param.
_LINEAR1 = ('linear', 1)
BODY = (
    ('embeddings.word_embeddings.weight', 'word_embeddings/embedding', 'copy'),
    ('embeddings.position_embeddings.weight', 'position_embeddings/embedding', 'copy'),
    ('embeddings.token_type_embeddings.weight', 'token_type_embeddings/embedding', 'copy'),
    ('embeddings.LayerNorm.weight', 'embedding_norm/scale', 'copy'),
    ('embeddings.LayerNorm.bias', 'embedding_norm/bias', 'copy'),
    *((f'encoder.layer.{{i}}.attention.self.{n}.weight', f'encoder/layers/attention/{n}_kernel', _LINEAR1)
      for n in ('query', 'key', 'value')),
    *((f'encoder.layer.{{i}}.attention.self.{n}.bias', f'encoder/layers/attention/{n}_bias', 'bias')
      for n in ('query', 'key', 'value')),
    ('encoder.layer.{i}.attention.output.dense.weight', 'encoder/layers/attention/out_kernel', ('linear', 2)),
    ('encoder.layer.{i}.attention.output.dense.bias', 'encoder/layers/attention/out_bias', 'bias'),
    ('encoder.layer.{i}.attention.output.LayerNorm.weight', 'encoder/layers/attention_norm/scale', 'copy'),
    ('encoder.layer.{i}.attention.output.LayerNorm.bias', 'encoder/layers/attention_norm/bias', 'copy'),
    ('encoder.layer.{i}.intermediate.dense.weight', 'encoder/layers/mlp/wi/kernel', _LINEAR1),
    ('encoder.layer.{i}.intermediate.dense.bias', 'encoder/layers/mlp/wi/bias', 'bias'),
    ('encoder.layer.{i}.output.dense.weight', 'encoder/layers/mlp/wo/kernel', _LINEAR1),
    ('encoder.layer.{i}.output.dense.bias', 'encoder/layers/mlp/wo/bias', 'bias'),
    ('encoder.layer.{i}.output.LayerNorm.weight', 'encoder/layers/mlp_norm/scale', 'copy'),
    ('encoder.layer.{i}.output.LayerNorm.bias', 'encoder/layers/mlp_norm/bias', 'copy'),
    ('pooler.dense.weight', 'pooler/kernel', _LINEAR1),
    ('pooler.dense.bias', 'pooler/bias', 'bias'),
)
PROJECTION = (('embeddings_project.weight', 'embedding_projection/kernel', _LINEAR1),  # factorised embeddings
              ('embeddings_project.bias', 'embedding_projection/bias', 'bias'))
RELATIVE = (('encoder.relative_attention_bias.weight', 'relative_attention_bias', 'copy'),)  # MPNet's
# The tables of the params only some imports have (by their top-level name; DeBERTa's also fill relative_norm).
OPTIONAL = {'embedding_projection': PROJECTION, 'relative_attention_bias': RELATIVE,
            'relative_embeddings': hf_deberta.TABLE}
# The heads live outside the 'bert.' prefix. The MLM decoder is tied to the word embeddings (not stored).
HEADS = (
    ('cls.predictions.transform.dense.weight', 'mlm_transform/kernel', _LINEAR1),
    ('cls.predictions.transform.dense.bias', 'mlm_transform/bias', 'bias'),
    ('cls.predictions.transform.LayerNorm.weight', 'mlm_norm/scale', 'copy'),
    ('cls.predictions.transform.LayerNorm.bias', 'mlm_norm/bias', 'copy'),
    ('cls.predictions.bias', 'mlm_bias', 'bias'),
    ('cls.seq_relationship.weight', 'nsp_classifier/kernel', _LINEAR1),
    ('cls.seq_relationship.bias', 'nsp_classifier/bias', 'bias'),
)
HEAD_NAMES = {'pooler': 'pooler', 'nsp_classifier': 'NSP classifier', 'mlm_transform': 'MLM head',
              'mlm_norm': 'MLM head', 'mlm_bias': 'MLM head'}


def _entries(num_layers: int, params: dict):
  """(HF name, jaxssl path, kind, layer index or None) for every tensor of a BertForPreTraining whose top-level
  params are those of `params` (ELECTRA's embedding projection, DeBERTa-v3's lack of position embeddings, ...)."""
  for hf, path, kind in BODY + sum((table for name, table in OPTIONAL.items() if name in params), ()):
    if path.split('/')[0] not in params:
      continue
    if '{i}' in hf:
      yield from (('bert.' + hf.format(i=i), path, kind, i) for i in range(num_layers))
    else:
      yield 'bert.' + hf, path, kind, None
  for hf, path, kind in HEADS:
    yield hf, path, kind, None


def _to_jax(w: np.ndarray, kind, shape, name: str = '') -> np.ndarray:
  w = np.asarray(w, np.float32)
  if kind != 'copy' and kind != 'bias':
    w = w.T
  if math.prod(w.shape) != math.prod(shape):
    raise UserError(f'tensor {name} of shape {w.shape} cannot fill a parameter of shape {tuple(shape)}: does '
                    'config.json describe these weights (its sizes)?')
  return w.reshape(shape)


def _to_hf(a: np.ndarray, kind) -> np.ndarray:
  if kind == 'copy':
    return a
  if kind == 'bias':
    return a.reshape(-1)
  n_in = kind[1]
  return np.ascontiguousarray(a.reshape(math.prod(a.shape[:n_in]), -1).T)


# ----- configs -----

def jaxssl_config(hf: dict):
  """The full jaxssl config (configs/bert.py:base with model.* and the vocab size from HF `config.json`, keys it
  omits taking its model_type's transformers defaults: max_position_embeddings 512, ...)."""
  model_type = named = hf.get('model_type') or 'bert'
  offset = position_offset(hf)  # of the config as written: the importers below rename MPNet's type to BERT's
  if model_type in BERT_UNDER_OTHER_NAMES:
    hf, model_type = BERT_UNDER_OTHER_NAMES[model_type].bert_config(hf), 'bert'
  if model_type != 'bert' and model_type not in ROBERTA_TYPES:
    raise UserError(f'HF config.json has model_type={model_type!r}: only {list(hf_defaults.ENCODER_TYPES)} convert '
                    'here')
  hf = hf_defaults.with_defaults(hf, 'bert')
  act = HIDDEN_ACTS.get(hf['hidden_act'])
  if act is None:
    raise UserError(f"HF config.json has hidden_act={hf['hidden_act']!r}: jaxssl BERT computes {sorted(HIDDEN_ACTS)} "
                    'only, so this checkpoint would compute something else')
  # transformers 4 wrote position_embedding_type (absolute, relative_key, ...); 5 has absolute positions only.
  if hf.get('position_embedding_type', 'absolute') != 'absolute':
    raise UserError(f"HF config.json has position_embedding_type={hf['position_embedding_type']!r}: "
                    "jaxssl BERT supports 'absolute' positions only")
  eps = float(hf['layer_norm_eps'])
  max_position = int(hf['max_position_embeddings']) - offset
  if max_position < 1:
    raise UserError(f"HF config.json has max_position_embeddings={hf['max_position_embeddings']}, not more than "
                    f'the {offset} rows {named} reserves before position 0: is the config complete?')
  type_vocab_size = int(hf['type_vocab_size'])
  if model_type in ROBERTA_TYPES:
    type_vocab_size = max(type_vocab_size, 2)  # its one row is repeated (hf_to_params) for pair inputs
  config = config_lib.load_config(BASE_CONFIG)
  with config.unlocked():
    config.model.update(
        num_layers=int(hf['num_hidden_layers']), hidden_size=int(hf['hidden_size']),
        num_heads=int(hf['num_attention_heads']), intermediate_size=int(hf['intermediate_size']),
        max_position=max_position, type_vocab_size=type_vocab_size, embedding_size=int(hf.get('embedding_size', 0)),
        relative_attention_buckets=int(hf.get('relative_attention_buckets', 0)),
        position_buckets=int(hf.get('position_buckets', 0)),  # DeBERTa's (hf_deberta.bert_config); BERT: none
        max_relative_positions=int(hf.get('max_relative_positions', config.model.max_relative_positions)),
        absolute_positions=bool(hf.get('absolute_positions', True)),
        dropout_rate=float(hf['hidden_dropout_prob']),
        attention_dropout_rate=float(hf['attention_probs_dropout_prob']),
        initializer_range=float(hf['initializer_range']), scan_layers=True, dtype='float32')  # as transformers
    if not math.isclose(eps, LAYER_NORM_EPS, rel_tol=1e-6):
      config.model.layer_norm_eps = eps  # only when not BERT's, so BERT exports keep their config unchanged
    if act != 'gelu':
      config.model.hidden_act = act  # likewise
    config.tokenizer.vocab_size = int(hf['vocab_size'])
    config.data.seq_len = min(config.data.seq_len, config.model.max_position)
  return config


def hf_config(config: dict, vocab_size: int) -> dict:
  """HF `config.json` (BertForPreTraining) for a jaxssl BERT config dict.

  An imported RoBERTa / XLM-R export is written as BERT too (its positions already start at row 0, its eps kept).
  """
  m = config['model']
  return {
      'architectures': ['BertForPreTraining'], 'model_type': 'bert', 'vocab_size': int(vocab_size),
      'hidden_size': m['hidden_size'], 'num_hidden_layers': m['num_layers'],
      'num_attention_heads': m['num_heads'], 'intermediate_size': m['intermediate_size'],
      'max_position_embeddings': m['max_position'], 'type_vocab_size': m['type_vocab_size'],
      'hidden_act': m.get('hidden_act', 'gelu'), 'hidden_dropout_prob': m['dropout_rate'],
      'attention_probs_dropout_prob': m['attention_dropout_rate'], 'initializer_range': m['initializer_range'],
      'layer_norm_eps': m.get('layer_norm_eps', LAYER_NORM_EPS), 'position_embedding_type': 'absolute',
      'pad_token_id': 0, 'tie_word_embeddings': True, 'torch_dtype': 'float32',
  }


# ----- weights -----

def hf_to_params(tensors: dict, abstract_params: dict, num_layers: int):
  """Fills a tree shaped like `abstract_params` from HF `tensors` (name -> numpy array).

  Returns (params as numpy arrays, None at leaves the checkpoint lacks; sorted unused HF names). Every leaf is
  filled at most once and its shape checked; a missing body tensor is a UserError.
  """
  tensors = {re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', k)): v
             for k, v in tensors.items()}  # TF-converted checkpoints name LayerNorm params gamma/beta
  if not any(k.startswith('bert.') for k in tensors):  # a bare BertModel: add the prefix the table uses
    tensors = {k if k.startswith('cls.') else 'bert.' + k: v for k, v in tensors.items()}
  params = _empty_like(abstract_params)
  stacked: dict[str, list] = {}
  used = set()
  entries = list(_entries(num_layers, abstract_params))
  for hf, path, kind, layer in entries:
    if hf not in tensors:
      continue
    used.add(hf)
    shape = param_tree.get(abstract_params, path).shape
    if layer is None:
      param_tree.put(params, path, _to_jax(tensors[hf], kind, shape, hf))
    else:
      stacked.setdefault(path, [None] * num_layers)[layer] = _to_jax(tensors[hf], kind, shape[1:], hf)
  for path, slices in stacked.items():
    if all(s is not None for s in slices):
      param_tree.put(params, path, np.stack(slices))
  missing = [hf for hf, path, _, _ in entries if hf not in tensors and path.split('/')[0] not in HEAD_NAMES]
  for group in sorted(set(HEAD_NAMES.values())):  # a head is either all there or all new, never half
    leaves = [hf for hf, path, _, _ in entries if HEAD_NAMES.get(path.split('/')[0]) == group]
    if 0 < sum(hf in tensors for hf in leaves) < len(leaves):
      missing += [hf for hf in leaves if hf not in tensors]
  if missing:
    raise UserError(f'the checkpoint lacks {len(missing)} BERT tensors, e.g. {missing[:3]}: is it a BERT '
                    'checkpoint with the sizes its config.json states?')
  decoder = tensors.get('cls.predictions.decoder.weight')
  if decoder is not None:
    used.add('cls.predictions.decoder.weight')
    if not np.array_equal(np.asarray(decoder, np.float32), params['word_embeddings']['embedding']):
      raise UserError('cls.predictions.decoder.weight differs from the word embeddings: jaxssl ties the MLM '
                      'decoder to them, so this untied checkpoint cannot be converted exactly')
  dec_bias = tensors.get('cls.predictions.decoder.bias')
  if dec_bias is not None and params['mlm_bias'] is not None:
    used.add('cls.predictions.decoder.bias')  # HF ties it to cls.predictions.bias
    if not np.array_equal(np.asarray(dec_bias, np.float32), params['mlm_bias']):
      raise UserError('cls.predictions.decoder.bias differs from cls.predictions.bias: the checkpoint is inconsistent')
  unused = sorted(k for k in tensors if k not in used and not IGNORED_HF_KEYS.search(k))
  return params, unused


def params_to_hf(params: dict, num_layers: int) -> dict:
  """HF BertForPreTraining tensors (torch layout, float32 numpy) from jaxssl params (the decoder stays tied)."""
  out = {}
  for hf, path, kind, layer in _entries(num_layers, params):
    a = np.asarray(param_tree.get(params, path), np.float32)
    out[hf] = _to_hf(a if layer is None else a[layer], kind)
  return out


def _empty_like(abstract):
  """A nested dict like `abstract` with None leaves (to be filled)."""
  return {k: _empty_like(v) if isinstance(v, dict) else None for k, v in abstract.items()}


# ----- files -----

def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {path} ({e}): pass a HuggingFace BERT directory') from None


def _fresh_dir(out: str, overwrite: bool) -> str:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
    raise UserError(f'output directory {out} already exists and is not empty: choose a new --out or pass --overwrite')
  tmp = f'{out.rstrip(os.sep)}.tmp-convert'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  return tmp


def _move_into_place(tmp: str, out: str) -> None:
  if os.path.exists(out):
    shutil.rmtree(out)
  os.rename(tmp, out)


def _copy_tokenizer(src: str, dst: str) -> list[str]:
  """Copies the tokenizer files of `src` (local or in a bucket) into the local folder `dst`; returns their names."""
  copied = [n for n in (*TOKENIZER_FILES, 'tokenizer.model') if storage.isfile(storage.join(src, n))]
  for name in copied:
    storage.copy(storage.join(src, name), os.path.join(dst, name))
  return copied


def from_hf(src: str, out: str, *, overwrite: bool = False, seed: int = 0) -> dict:
  """Converts the HF BERT directory `src` into the jaxssl export `out`; returns the jaxssl config dict.

  `out` holds params/ (orbax), config.json and the HF tokenizer files, readable by
  `jaxssl.train.checkpoint.load_export`. Heads the checkpoint lacks are initialised from `seed`. Either may be a
  bucket folder (staging.py: read from a local copy, written locally and uploaded).
  """
  with (staging.local_output(out, overwrite) as local_out, staging.local_source(src) as local_src,
        hf_deberta.tokenizer_files(local_src) as tokenizer_src):
    return _from_local_hf(local_src, tokenizer_src, local_out, overwrite=overwrite, seed=seed, named=(src, out))


def _from_local_hf(src: str, tokenizer_src: str, out: str, *, overwrite: bool, seed: int, named: tuple) -> dict:
  """`from_hf` between local folders, the tokenizer's files from `tokenizer_src` (`src`, or the tokenizer.json
  built from DeBERTa's spm.model); `named` holds the (src, out) the user gave, for the config and messages."""
  hf = _read_json(os.path.join(src, 'config.json'))
  hf_class = decoder.saved_class(hf, 'AutoModel')
  weights, _ = decoder.weight_files(src, hf_class)  # checked before anything is read: a .bin without torch fails here
  if not any(os.path.isfile(os.path.join(tokenizer_src, n)) for n in ('tokenizer.json', 'vocab.txt')):
    raise UserError(f'{src} has no tokenizer.json, vocab.txt or (DeBERTa) spm.model: copy the checkpoint\'s '
                    'tokenizer files into it')
  config = jaxssl_config(hf)
  vocab_size = config.tokenizer.vocab_size
  # More rows than the tokenizer's ids (XLM-R-vocabulary encoders such as multilingual-e5) converts as it is.
  vocab.check_rows(tokenizers.load_tokenizer(tokenizer_src).vocab_size, vocab_size, src)
  tensors = decoder.read_hf_weights(src, hf_class)
  if hf.get('model_type') in ROBERTA_TYPES:
    tensors = roberta_to_bert_tensors(tensors, position_offset(hf), config.model.type_vocab_size)
  elif hf.get('model_type') in BERT_UNDER_OTHER_NAMES:
    tensors = BERT_UNDER_OTHER_NAMES[hf['model_type']].bert_tensors(tensors, hf)
  mesh = decoder.one_device_mesh()
  setup = state_lib.setup_model(config.model, vocab_size, mesh, seed)
  params, unused = hf_to_params(tensors, setup.abstract_params, config.model.num_layers)
  fresh_paths = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(
      params, is_leaf=lambda x: x is None) if v is None]
  if unused:
    print(f'warning: {len(unused)} tensors of {", ".join(weights)} are not used: {", ".join(unused)}')
  if fresh_paths:
    heads = sorted({HEAD_NAMES[p.split("'")[1]] for p in fresh_paths})
    print(f'new heads (not in the checkpoint, initialised with seed {seed}): {", ".join(heads)}')
    init = jax.device_get(state_lib.init_params(setup))  # setup_model was given `seed`
    params = jax.tree.map(lambda v, i: i if v is None else v, params, init, is_leaf=lambda x: x is None)
  params = jax.device_put(params, setup.param_shardings)
  tmp = _fresh_dir(out, overwrite)
  ckpt_lib.save_export_params(os.path.abspath(os.path.join(tmp, 'params')), params)
  export_config = {**config.to_dict(), 'vocab_size': vocab_size, 'converted_from': {'hf': paths.absolute(named[0])},
                   **ckpt_lib.format_stamp()}
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(export_config, f, indent=2, sort_keys=True)
  copied = _copy_tokenizer(tokenizer_src, tmp)
  _move_into_place(tmp, out)
  print(f'converted {named[0]} ({state_lib.param_count(params) / 1e6:.2f}M params, {config.model.num_layers} '
        f'layers, hidden {config.model.hidden_size}, tokenizer: {", ".join(copied)}) to {named[1]}')
  return export_config


def to_hf(src: str, out: str, *, overwrite: bool = False) -> dict:
  """Writes the jaxssl export `src` as a HF directory `out` (BertForPreTraining; DebertaV2ForMaskedLM for a DeBERTa,
  hf_deberta); returns its config.json."""
  saved = ckpt_lib.read_export_config(src)
  if saved.get('model', {}).get('name') != 'bert':
    raise UserError(f"{src} holds model.name={saved.get('model', {}).get('name')!r}: only 'bert' converts to HF BERT")
  config = config_lib.from_json(json.dumps(saved))
  if not config.model.get('scan_layers', True):
    raise UserError(f'{src} was trained with model.scan_layers=False: only stacked (scanned) layers convert')
  for key, what in (('embedding_size', 'factorised embeddings (an imported ELECTRA)'),
                    ('relative_attention_buckets', 'a relative position bias (an imported MPNet)')):
    if config.model.get(key) not in (None, 0, config.model.hidden_size if key == 'embedding_size' else 0):
      raise UserError(f'{src} has {what}, model.{key}={config.model.get(key)}: to-hf writes BertForPreTraining, '
                      'which has none')
  vocab_size = saved['vocab_size']  # every row, padding included: config.json's vocab_size as the original's
  vocab.check_rows(tokenizers.load_tokenizer(src).vocab_size, vocab_size, src)
  setup = state_lib.setup_model(config.model, vocab_size, decoder.one_device_mesh())
  params = jax.device_get(ckpt_lib.load_export_params(src, setup.abstract_params))
  tensors, hf = params_to_hf(params, config.model.num_layers), hf_config(saved, vocab_size)
  if hf_deberta.is_deberta(config.model):
    tensors, hf = hf_deberta.hf_tensors(tensors), hf_deberta.hf_config(hf, config.model)
  with staging.local_output(out, overwrite) as local_out:  # a bucket folder: written locally, then uploaded
    tmp = _fresh_dir(local_out, overwrite)
    # transformers refuses safetensors files without a 'format' entry in their metadata.
    save_file(tensors, os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf, f, indent=2, sort_keys=True)
    copied = _copy_tokenizer(src, tmp)
    _move_into_place(tmp, local_out)
  print(f'wrote {out} (HF {hf["architectures"][0]}, {len(tensors)} tensors, tokenizer: {", ".join(copied) or "none"})')
  if 'tokenizer.model' in copied:
    print('note: the tokenizer is a jaxssl sentencepiece model (tokenizer.model); transformers needs a matching '
          'tokenizer class for it, BertTokenizer will not read it')
  return hf

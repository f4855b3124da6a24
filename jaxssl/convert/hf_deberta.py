"""HuggingFace DeBERTa-v2 / v3 checkpoints as BERT ones, for hf_bert's importer (from-hf only).

DeBERTa-v3 (model_type 'deberta-v2': DebertaV2Model, DebertaV2ForMaskedLM, DebertaV2For*; microsoft/deberta-v3-base,
mdeberta-v3-base, ...) is BERT's post-LayerNorm encoder under the prefix 'deberta.' (q/k/v named query_proj,
key_proj, value_proj) with disentangled attention: one table of relative embeddings (`encoder.rel_embeddings`,
LayerNorm-ed by `encoder.LayerNorm`) scored against every layer's queries and keys through that layer's own
projections (jaxssl's model.position_buckets, models/relative_positions.py). v3 also has no absolute position
embeddings (position_biased_input false: model.absolute_positions) and no token types (type_vocab_size 0).
Converted: relative_attention with position_buckets > 0, share_att_key and pos_att_type c2p + p2c (every v3
model), or no relative attention at all. Refused with a line saying so: DeBERTa-v2-xlarge's convolution
(conv_kernel_size), separate position projections (share_att_key false), one-sided pos_att_type, unbucketed
distances, an embedding projection.

The MLM head is `lm_predictions.lm_head` (what the DeBERTa checkpoints hold; transformers reads it with
legacy=false) or, with legacy=true, BERT's `cls.predictions`; either is BERT's transform + tied decoder + bias.
The discriminator head of v3's replaced-token detection (mask_predictions) and task heads are named as unused;
DeBERTa's classification pooler (dense + GELU) is not BERT's (dense + tanh), so a fine-tune starts a fresh one.
An export of an imported DeBERTa is a BERT export with model.position_buckets set; `to-hf` writes it (and any
BERT export without absolute positions or token types) back as a DebertaV2ForMaskedLM (legacy=false: the MLM head
under lm_predictions, tied to the word embeddings); the pooler and NSP head, which DeBERTa lacks, are left out.

The hub's DeBERTa-v3 folders ship their tokenizer as a sentencepiece `spm.model` (no tokenizer.json). `tokenizer_files`
builds the tokenizer.json transformers 5's DebertaV2Tokenizer builds from it (the pieces and scores as a Unigram
model, its normaliser, Metaspace and [CLS] A [SEP] B [SEP]; [MASK] added after the pieces), so the import and
every job after it read it as any encoder's tokenizer.json.
"""
import contextlib
import json
import os
import shutil
import tempfile

from jaxssl.convert import hf_defaults
from jaxssl.errors import UserError

SPM_FILE = 'spm.model'

# Relative embeddings and their LayerNorm, under the 'bert.' prefix: (HF name, jaxssl path, kind) as hf_bert.BODY.
TABLE = (('encoder.rel_embeddings.weight', 'relative_embeddings', 'copy'),
         ('encoder.LayerNorm.weight', 'relative_norm/scale', 'copy'),
         ('encoder.LayerNorm.bias', 'relative_norm/bias', 'copy'))
RENAMES = (('deberta.', 'bert.'), ('lm_predictions.lm_head.dense.', 'cls.predictions.transform.dense.'),
           ('lm_predictions.lm_head.LayerNorm.', 'cls.predictions.transform.LayerNorm.'),
           ('lm_predictions.lm_head.bias', 'cls.predictions.bias'))
PROJECTIONS = tuple((f'.attention.self.{n}_proj.', f'.attention.self.{n}.') for n in ('query', 'key', 'value'))


def _refuse(what: str) -> None:
  raise UserError(f'HF config.json has {what}: jaxssl imports DeBERTa-v3\'s attention (relative_attention with '
                  'position_buckets > 0, share_att_key, pos_att_type c2p and p2c) or none, so this DeBERTa would '
                  'compute something else')


def bert_config(hf: dict) -> dict:
  """A DeBERTa-v2 config.json dict as a BERT one (DebertaV2Config's defaults for omitted keys; the keys transformers
  reads with getattr take its defaults there), with the disentangled attention's sizes."""
  hf = hf_defaults.with_defaults(hf, 'deberta-v2')
  att_types = hf.get('pos_att_type') or []
  att_types = sorted(t.strip() for t in (att_types.lower().split('|') if isinstance(att_types, str) else att_types))
  buckets = int(hf.get('position_buckets', -1))
  heads, hidden = int(hf['num_attention_heads']), int(hf['hidden_size'])
  if int(hf.get('conv_kernel_size', 0)) > 0:
    _refuse(f"conv_kernel_size={hf['conv_kernel_size']} (DeBERTa-v2's convolution beside the first layer)")
  if int(hf.get('embedding_size', hidden)) != hidden:
    _refuse(f"embedding_size={hf['embedding_size']} (an embedding projection)")
  if int(hf.get('attention_head_size', hidden // heads)) != hidden // heads:
    _refuse(f"attention_head_size={hf['attention_head_size']} (not hidden_size / num_attention_heads)")
  if hf['relative_attention']:
    if buckets <= 0:
      _refuse(f'position_buckets={buckets} (distances not bucketed)')
    if not hf.get('share_att_key', False):
      _refuse('share_att_key=false (position projections of their own)')
    if att_types != ['c2p', 'p2c']:
      _refuse(f"pos_att_type={hf['pos_att_type']!r}")
    if 'layer_norm' not in str(hf.get('norm_rel_ebd', 'none')).lower():
      _refuse(f"norm_rel_ebd={hf.get('norm_rel_ebd', 'none')!r} (relative embeddings not LayerNorm-ed)")
  elif att_types:
    _refuse(f"pos_att_type={hf['pos_att_type']!r} without relative_attention")
  max_relative = int(hf['max_relative_positions'])
  max_relative = max_relative if max_relative >= 1 else int(hf['max_position_embeddings'])
  return dict(hf, model_type='bert', position_buckets=buckets if hf['relative_attention'] else 0,
              max_relative_positions=max_relative, absolute_positions=bool(hf['position_biased_input']))


def bert_tensors(tensors: dict, hf: dict | None = None) -> dict:  # hf: config.json (ALBERT's needs it)
  """DeBERTa tensors under BertForPreTraining's names (a bare DebertaV2Model's keep theirs: hf_bert prefixes them);
  other tensors (the replaced-token head, task heads) keep their names. The position table v3 files carry without
  using it (position_biased_input false; transformers ignores it too) is dropped."""
  out = {}
  unused_positions = not hf_defaults.with_defaults(hf or {}, 'deberta-v2')['position_biased_input']
  for k, v in tensors.items():
    if unused_positions and k.endswith('embeddings.position_embeddings.weight'):
      continue
    out[_renamed(k, RENAMES, PROJECTIONS)] = v
  return out


def _renamed(name: str, prefixes, parts) -> str:
  """`name` with its first (old, new) prefix of `prefixes` and every (old, new) part of `parts` replaced."""
  name = next((new + name[len(old):] for old, new in prefixes if name.startswith(old)), name)
  for old, new in parts:
    name = name.replace(old, new)
  return name


def is_deberta(model_cfg) -> bool:
  """Whether a jaxssl BERT config needs DeBERTa's layout in HF: disentangled attention, or no absolute positions or
  no token types (which BertModel cannot express)."""
  return bool(model_cfg.get('position_buckets')) or not model_cfg.get('absolute_positions', True) or not int(
      model_cfg.get('type_vocab_size', 2))


def hf_config(bert: dict, model_cfg) -> dict:
  """DebertaV2ForMaskedLM's config.json from hf_bert.hf_config's BERT one and the jaxssl model section."""
  buckets = int(model_cfg.get('position_buckets', 0))
  out = {k: v for k, v in bert.items() if k != 'position_embedding_type'}
  out.update(architectures=['DebertaV2ForMaskedLM'], model_type='deberta-v2', legacy=False,
             relative_attention=bool(buckets), position_biased_input=bool(model_cfg.get('absolute_positions', True)))
  if buckets:
    out.update(position_buckets=buckets, max_relative_positions=int(model_cfg.get('max_relative_positions', 512)),
               pos_att_type='p2c|c2p', share_att_key=True, norm_rel_ebd='layer_norm')
  return out


def hf_tensors(bert_tensors: dict) -> dict:
  """BertForPreTraining tensors (hf_bert.params_to_hf) under DebertaV2ForMaskedLM's names, without the pooler and
  NSP head DeBERTa has no place for: the inverse of bert_tensors."""
  out = {}
  for k, v in bert_tensors.items():
    if k.startswith(('bert.pooler.', 'cls.seq_relationship.')):
      continue
    out[_renamed(k, [pair[::-1] for pair in RENAMES], [pair[::-1] for pair in PROJECTIONS])] = v
  return out


@contextlib.contextmanager
def tokenizer_files(src: str):
  """Yields `src`, or where it holds DeBERTa's spm.model and no tokenizer.json or vocab.txt, a temporary folder
  with the tokenizer.json built from it (spm_tokenizer) beside copies of its tokenizer_config.json and
  special_tokens_map.json."""
  if not os.path.isfile(os.path.join(src, SPM_FILE)) or any(
      os.path.isfile(os.path.join(src, n)) for n in ('tokenizer.json', 'vocab.txt')):
    yield src
    return
  with tempfile.TemporaryDirectory(prefix='jaxssl-deberta-tokenizer-') as tmp:
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      if os.path.isfile(os.path.join(src, name)):
        shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
    spm_tokenizer(os.path.join(src, SPM_FILE), _token_settings(tmp)).save(os.path.join(tmp, 'tokenizer.json'))
    yield tmp


def _token_settings(directory: str) -> dict:
  """tokenizer_config.json's settings (DebertaV2Tokenizer's defaults for those it omits), tokens as strings."""
  path = os.path.join(directory, 'tokenizer_config.json')
  try:
    saved = {}
    if os.path.isfile(path):
      with open(path) as f:
        saved = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise UserError(f'cannot read {path} ({e}): is the DeBERTa folder complete?') from None
  out = dict(do_lower_case=False, split_by_punct=False, add_prefix_space=True, pad_token='[PAD]', unk_token='[UNK]',
             cls_token='[CLS]', sep_token='[SEP]', mask_token='[MASK]', unk_id=1)
  for key in out:
    value = saved.get(key, out[key])
    out[key] = value.get('content', out[key]) if isinstance(value, dict) else value  # AddedToken dicts
  return out


def spm_tokenizer(spm_path: str, settings: dict):
  """A HuggingFace `tokenizers.Tokenizer` for DeBERTa's sentencepiece model, as transformers 5's DebertaV2Tokenizer
  (tokenization_deberta_v2.py) builds it from the model's pieces and scores."""
  # reason: sentencepiece and tokenizers load only for this conversion.
  import sentencepiece  # noqa: PLC0415
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa
  try:
    sp = sentencepiece.SentencePieceProcessor(model_file=spm_path)
  except (RuntimeError, OSError) as e:
    raise UserError(f'{spm_path} is not a sentencepiece model ({e}): download it again') from None
  vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
  unk = (settings['unk_token'], 0.0)
  tokenizer = Tokenizer(models.Unigram(vocab, unk_id=vocab.index(unk) if unk in vocab else int(settings['unk_id']),
                                       byte_fallback=False))
  tokenizer.normalizer = normalizers.Sequence(
      [normalizers.Lowercase()] * bool(settings['do_lower_case'])
      + [normalizers.Replace(Regex(r'\s{2,}|[\n\r\t]'), ' '), normalizers.NFC(), normalizers.Strip(left=False)])
  prepend = 'always' if settings['add_prefix_space'] else 'first'
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Punctuation(behavior='isolated')] * bool(settings['split_by_punct'])
      + [pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme=prepend)])
  tokenizer.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme=prepend)
  # transformers' order: pieces the model has keep their ids; the others ([MASK]) follow the last piece.
  names = [settings[k] for k in ('cls_token', 'sep_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token',
                                 'mask_token')]
  tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(names)])
  cls, sep = settings['cls_token'], settings['sep_token']
  tokenizer.post_processor = processors.TemplateProcessing(
      single=f'{cls}:0 $A:0 {sep}:0', pair=f'{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1',
      special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))])
  return tokenizer

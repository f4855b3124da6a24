"""HuggingFace RoBERTa / XLM-R / CamemBERT checkpoints as BERT ones, for hf_bert's importer (its module docstring
says how the positions and token types are carried over)."""
import numpy as np

from jaxssl.convert import hf_defaults

ROBERTA_TYPES = ('roberta', 'xlm-roberta', 'camembert')  # CamemBERT: RoBERTa's layout and names
# RoBERTa layout -> BERT names (HF's RobertaLMHead is BERT's prediction head under other names).
ROBERTA_RENAMES = (('roberta.', 'bert.'), ('lm_head.dense.', 'cls.predictions.transform.dense.'),
                   ('lm_head.layer_norm.', 'cls.predictions.transform.LayerNorm.'),
                   ('lm_head.decoder.', 'cls.predictions.decoder.'), ('lm_head.bias', 'cls.predictions.bias'))


MPNET_POSITION_OFFSET = 2  # MPNetEmbeddings.padding_idx is fixed at 1, whatever config.json's pad_token_id says


def position_offset(hf: dict) -> int:
  """Rows of the HF position table before position 0: pad_token_id + 1 for RoBERTa / XLM-R, 2 for MPNet, 0 for
  BERT."""
  model_type = hf.get('model_type') or 'bert'
  if model_type == 'mpnet':
    return MPNET_POSITION_OFFSET
  if model_type not in ROBERTA_TYPES:
    return 0
  return int(hf_defaults.with_defaults(hf, model_type)['pad_token_id']) + 1


def roberta_to_bert_tensors(tensors: dict, offset: int, type_vocab_size: int) -> dict:
  """RoBERTa / XLM-R tensors under BERT names: position rows shifted by `offset`, token-type rows repeated."""
  out = {}
  for k, v in tensors.items():
    for old, new in ROBERTA_RENAMES:
      if k.startswith(old):
        k = new + k[len(old):]
        break
    out[k] = v
  for prefix in ('bert.', ''):  # with or without the model prefix (XLMRobertaModel saves none)
    pos, types = prefix + 'embeddings.position_embeddings.weight', prefix + 'embeddings.token_type_embeddings.weight'
    if pos in out:
      out[pos] = out[pos][offset:]
    if types in out and out[types].shape[0] < type_vocab_size:
      out[types] = np.concatenate([out[types]] * type_vocab_size)[:type_vocab_size]
  return out

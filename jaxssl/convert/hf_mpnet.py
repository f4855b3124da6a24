"""HuggingFace MPNet checkpoints as BERT ones, for hf_bert's importer (from-hf only).

MPNet (model_type 'mpnet': MPNetModel, MPNetForMaskedLM, MPNetFor*Classification; sentence-transformers'
all-mpnet-base-v2 is one) is BERT's post-LayerNorm encoder under other names, with three differences:
  * a relative position bias: one learned table [32 buckets, heads] (`encoder.relative_attention_bias`) whose
    entry for each (query, key) distance bucket is added to every layer's attention scores, on top of the
    absolute position embeddings: jaxssl's model.relative_attention_buckets and `relative_attention_bias`
    (models/bert.py). transformers buckets with 32 and a maximum distance of 128 whatever config.json says, so
    a config with another relative_attention_num_buckets is refused;
  * positions numbered from padding_idx + 1 = 2 as in RoBERTa (hf_roberta): the import drops the first two rows;
  * no token-type embeddings: the import gives jaxssl's two token-type rows zeros (as for DistilBERT).
Its pooler is BERT's; its MLM head (lm_head.*) is RoBERTa's, the decoder tied to the word embeddings. Task heads
of MPNetFor* checkpoints are left out with the warning hf_bert prints for any unused tensor.
An export of an imported MPNet is a BERT export with model.relative_attention_buckets set; `to-hf` refuses it.
"""
from jaxssl.convert import hf_defaults
from jaxssl.convert.hf_distilbert import renamed_without_token_types
from jaxssl.convert.hf_roberta import MPNET_POSITION_OFFSET as POSITION_OFFSET, ROBERTA_RENAMES
from jaxssl.errors import UserError

BUCKETS = 32         # what transformers' MPNetEncoder.compute_position_bias buckets with, whatever the config says
LAYER = r'encoder\.layer\.(\d+)\.attention\.'
# Tensor names after the 'mpnet.' prefix -> BERT's after 'bert.'; \1 is the layer index.
TENSOR_NAMES = (
    (LAYER + r'attn\.q\.', r'encoder.layer.\1.attention.self.query.'),
    (LAYER + r'attn\.k\.', r'encoder.layer.\1.attention.self.key.'),
    (LAYER + r'attn\.v\.', r'encoder.layer.\1.attention.self.value.'),
    (LAYER + r'attn\.o\.', r'encoder.layer.\1.attention.output.dense.'),
    (LAYER + r'LayerNorm\.', r'encoder.layer.\1.attention.output.LayerNorm.'),
)


def bert_config(hf: dict) -> dict:
  """An MPNet config.json dict as a BERT one (MPNetConfig's defaults for omitted keys), with two token-type rows and
  the relative buckets (hf_bert takes the two reserved position rows off, hf_roberta.position_offset)."""
  hf = hf_defaults.with_defaults(hf, 'mpnet')
  if int(hf['relative_attention_num_buckets']) != BUCKETS:
    raise UserError(f"HF config.json has relative_attention_num_buckets={hf['relative_attention_num_buckets']}: "
                    f'transformers computes MPNet\'s relative position bias with {BUCKETS} buckets whatever the '
                    'config says, so this checkpoint has no defined meaning there; only 32 converts')
  return dict(hf, model_type='bert', type_vocab_size=2, relative_attention_buckets=BUCKETS,
              position_embedding_type='absolute')


def bert_tensors(tensors: dict, hf: dict | None = None) -> dict:  # hf: config.json (ALBERT's needs it)
  """MPNet tensors (MPNetModel's bare names or MPNetFor*'s 'mpnet.' ones) under BertForPreTraining's names, the
  position table from row 2, zero token-type rows; other tensors (task heads) keep their names."""
  out = renamed_without_token_types(tensors, 'mpnet.', ('embeddings.', 'encoder.', 'pooler.'), TENSOR_NAMES,
                                    ROBERTA_RENAMES)
  pos = out.get('bert.embeddings.position_embeddings.weight')
  if pos is not None:
    out['bert.embeddings.position_embeddings.weight'] = pos[POSITION_OFFSET:]
  return out

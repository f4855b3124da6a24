"""HuggingFace ELECTRA checkpoints as BERT ones, for hf_bert's importer (from-hf only).

ELECTRA (model_type 'electra': ElectraModel, ElectraForPreTraining = the discriminator, ElectraForMaskedLM = the
generator, ElectraFor*Classification, ...) is BERT's encoder under the prefix 'electra.' with factorised
embeddings: word, position and token-type tables of `embedding_size` (128 in ELECTRA-small) normalised at that
width, then projected to hidden_size (`embeddings_project`; jaxssl's model.embedding_size and
`embedding_projection`). The generator's MLM head is BERT's ending at the embedding width (generator_predictions:
dense H -> E, gelu, LayerNorm; generator_lm_head tied to the word embeddings). The discriminator's replaced-token
head and fine-tuned task heads have no place in a BERT export: hf_bert names them as unused, and the pooler and NSP
head, which ELECTRA lacks, start fresh like any head a checkpoint lacks. An export of an imported ELECTRA is a
BERT export with model.embedding_size set; `to-hf` refuses it (it writes BertForPreTraining only).
"""
from jaxssl.convert import hf_defaults

# ELECTRA name prefixes -> BERT's (hf_bert's table).
RENAMES = (('electra.', 'bert.'), ('generator_predictions.dense.', 'cls.predictions.transform.dense.'),
           ('generator_predictions.LayerNorm.', 'cls.predictions.transform.LayerNorm.'),
           ('generator_lm_head.weight', 'cls.predictions.decoder.weight'),
           ('generator_lm_head.bias', 'cls.predictions.bias'))


def bert_config(hf: dict) -> dict:
  """An ELECTRA config.json dict as a BERT one with its embedding_size (ElectraConfig's defaults for omitted
  keys); embedding_size 0 where it equals hidden_size (no projection)."""
  hf = hf_defaults.with_defaults(hf, 'electra')
  size = int(hf['embedding_size'])
  return dict(hf, model_type='bert', embedding_size=0 if size == int(hf['hidden_size']) else size)


def bert_tensors(tensors: dict, hf: dict | None = None) -> dict:  # hf: config.json (ALBERT's needs it)
  """ELECTRA tensors under BertForPreTraining's names (a bare ElectraModel's keep theirs: hf_bert prefixes them);
  other tensors (the discriminator's head, task heads) keep their names."""
  out = {}
  for k, v in tensors.items():
    new = next((bert + k[len(old):] for old, bert in RENAMES if k.startswith(old)), k)
    out[new] = v
  return out

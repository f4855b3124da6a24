"""HuggingFace ALBERT checkpoints as BERT ones, for hf_bert's importer (from-hf only).

ALBERT (model_type 'albert': AlbertModel, AlbertForPreTraining, AlbertForMaskedLM, AlbertFor*Classification, ...)
is BERT's post-LayerNorm encoder with ELECTRA's factorised embeddings (tables of `embedding_size`, normalised at that
width, projected to hidden_size by encoder.embedding_hidden_mapping_in: jaxssl's model.embedding_size and
`embedding_projection`), the tanh GELU (hidden_act 'gelu_new': model.hidden_act) in the layers and the MLM head, and
one set of layer weights shared by every layer (num_hidden_groups groups of consecutive layers; 1 in every public
checkpoint). jaxssl's layers have weights of their own, so the import repeats the shared layer into each of them:
the same function exactly, though fine-tuning then updates each layer apart (ALBERT's own fine-tuning keeps them
tied). The sentence-order head (sop_classifier) has no place in a BERT export and is named as unused; the NSP head
starts fresh. An export of an imported ALBERT is a BERT export with model.embedding_size set; `to-hf` refuses it.
"""
import re

from jaxssl.convert import hf_defaults
from jaxssl.errors import UserError

# ALBERT layer names (under albert_layer_groups.G.albert_layers.0.) -> BERT's (under encoder.layer.I.).
LAYER_RENAMES = (('attention.query.', 'attention.self.query.'), ('attention.key.', 'attention.self.key.'),
                 ('attention.value.', 'attention.self.value.'), ('attention.dense.', 'attention.output.dense.'),
                 ('attention.LayerNorm.', 'attention.output.LayerNorm.'), ('ffn.', 'intermediate.dense.'),
                 ('ffn_output.', 'output.dense.'), ('full_layer_layer_norm.', 'output.LayerNorm.'))
# Other names, after the 'albert.' prefix (or at the top of a bare AlbertModel) or outside it (the MLM head).
RENAMES = (('encoder.embedding_hidden_mapping_in.', 'embeddings_project.'), ('pooler.', 'pooler.dense.'))
HEAD_RENAMES = (('predictions.dense.', 'cls.predictions.transform.dense.'),
                ('predictions.LayerNorm.', 'cls.predictions.transform.LayerNorm.'),
                ('predictions.decoder.', 'cls.predictions.decoder.'), ('predictions.bias', 'cls.predictions.bias'))
_LAYER = re.compile(r'encoder\.albert_layer_groups\.(\d+)\.albert_layers\.(\d+)\.(.*)')


def bert_config(hf: dict) -> dict:
  """An ALBERT config.json dict as a BERT one (AlbertConfig's defaults for omitted keys), with its embedding_size
  (0 where it equals hidden_size) and the layers' sharing checked."""
  hf = hf_defaults.with_defaults(hf, 'albert')
  layers, groups, inner = int(hf['num_hidden_layers']), int(hf['num_hidden_groups']), int(hf['inner_group_num'])
  if inner != 1 or groups < 1 or layers % groups:
    raise UserError(f'ALBERT config.json has num_hidden_groups={groups}, inner_group_num={inner} for '
                    f'{layers} layers: jaxssl imports groups that divide the layers, one layer each (as every '
                    'public ALBERT)')
  size = int(hf['embedding_size'])
  return dict(hf, model_type='bert', embedding_size=0 if size == int(hf['hidden_size']) else size)


def bert_tensors(tensors: dict, hf: dict) -> dict:
  """ALBERT tensors under BertForPreTraining's names, the shared layers repeated into every layer (layer i takes
  group i // (layers / groups)); other tensors (sop_classifier, task heads) keep their names."""
  hf = hf_defaults.with_defaults(hf, 'albert')
  layers, groups = int(hf['num_hidden_layers']), int(hf['num_hidden_groups'])
  out = {}
  for key, value in tensors.items():
    head = next((new + key[len(old):] for old, new in HEAD_RENAMES if key.startswith(old)), None)
    if head is not None:
      out[head] = value
      continue
    prefix = 'albert.' if key.startswith('albert.') else ''
    name = key[len(prefix):]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) == '0':
      group, rest = int(match.group(1)), match.group(3)
      rest = next((new + rest[len(old):] for old, new in LAYER_RENAMES if rest.startswith(old)), rest)
      for i in range(layers):
        if i * groups // layers == group:
          out[f'bert.encoder.layer.{i}.{rest}'] = value
      continue
    name = next((new + name[len(old):] for old, new in RENAMES if name.startswith(old)), name)
    out[('bert.' if prefix or name.startswith(('embeddings', 'pooler')) else '') + name] = value
  return out

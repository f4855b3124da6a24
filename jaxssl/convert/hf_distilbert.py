"""HuggingFace DistilBERT checkpoints as BERT ones, for hf_bert's importer (from-hf only).

DistilBERT (model_type 'distilbert': DistilBertModel, DistilBertForMaskedLM, DistilBertFor*Classification, ...) is
BERT's post-LayerNorm encoder under other names, with three differences:
  * no token-type embeddings: the import gives jaxssl's two token-type rows zeros, so segment ids add nothing (as
    in DistilBERT) until fine-tuning on sentence pairs trains them;
  * no pooler: jaxssl's (dense + tanh over [CLS]) is initialised fresh, like any head a checkpoint lacks, where
    transformers' classification heads put a fresh pre_classifier (dense + ReLU) in the same place;
  * its config names (dim, n_layers, n_heads, hidden_dim, dropout, activation; LayerNorm eps fixed at 1e-12).
Its MLM head (vocab_transform, activation, vocab_layer_norm, vocab_projector tied to the word embeddings) is BERT's.
Fine-tuning heads of DistilBertFor* checkpoints (pre_classifier, classifier, qa_outputs) are left out with the
warning hf_bert prints for any unused tensor.
An export of an imported DistilBERT is a BERT export; `to-hf` writes it as BertForPreTraining.
"""
import re

import numpy as np

from jaxssl.convert import hf_defaults

# DistilBERT config names -> BERT's (what hf_bert.jaxssl_config reads).
CONFIG_NAMES = (('dim', 'hidden_size'), ('n_layers', 'num_hidden_layers'), ('n_heads', 'num_attention_heads'),
                ('hidden_dim', 'intermediate_size'), ('dropout', 'hidden_dropout_prob'),
                ('attention_dropout', 'attention_probs_dropout_prob'), ('activation', 'hidden_act'))
# Tensor name patterns (after the 'distilbert.' prefix) -> BERT's (after 'bert.'); \1 is the layer index.
LAYER = r'transformer\.layer\.(\d+)\.'
TENSOR_NAMES = (
    (LAYER + r'attention\.q_lin\.', r'encoder.layer.\1.attention.self.query.'),
    (LAYER + r'attention\.k_lin\.', r'encoder.layer.\1.attention.self.key.'),
    (LAYER + r'attention\.v_lin\.', r'encoder.layer.\1.attention.self.value.'),
    (LAYER + r'attention\.out_lin\.', r'encoder.layer.\1.attention.output.dense.'),
    (LAYER + r'sa_layer_norm\.', r'encoder.layer.\1.attention.output.LayerNorm.'),
    (LAYER + r'ffn\.lin1\.', r'encoder.layer.\1.intermediate.dense.'),
    (LAYER + r'ffn\.lin2\.', r'encoder.layer.\1.output.dense.'),
    (LAYER + r'output_layer_norm\.', r'encoder.layer.\1.output.LayerNorm.'),
)
MLM_HEAD = (('vocab_transform.', 'cls.predictions.transform.dense.'),
            ('vocab_layer_norm.', 'cls.predictions.transform.LayerNorm.'),
            ('vocab_projector.weight', 'cls.predictions.decoder.weight'),
            ('vocab_projector.bias', 'cls.predictions.bias'))


def bert_config(hf: dict) -> dict:
  """A DistilBERT config.json dict as a BERT one (transformers' DistilBertConfig defaults for omitted keys)."""
  hf = hf_defaults.with_defaults(hf, 'distilbert')
  out = {k: v for k, v in hf.items() if k not in dict(CONFIG_NAMES)}
  out.update({bert: hf[name] for name, bert in CONFIG_NAMES}, model_type='bert', type_vocab_size=2,
             layer_norm_eps=1e-12, position_embedding_type='absolute')
  return out


def bert_tensors(tensors: dict, hf: dict | None = None) -> dict:  # hf: config.json (ALBERT's needs it)
  """DistilBERT tensors (DistilBertModel's bare names or DistilBertFor*'s 'distilbert.' ones) under BertForPreTraining's
  names, with zero token-type rows; other tensors (task heads) keep their names."""
  return renamed_without_token_types(tensors, 'distilbert.', ('embeddings.', 'transformer.'), TENSOR_NAMES, MLM_HEAD)


def renamed_without_token_types(tensors: dict, prefix: str, body: tuple, names: tuple, heads: tuple) -> dict:
  """`tensors` of an encoder without token types under BertForPreTraining's names: those whose name (`prefix`
  dropped) starts with one of `body` become 'bert.' + the name with `names`' (regex, replacement) pairs applied;
  the others take `heads`' (prefix, BERT prefix) renames or keep their names. Two zero token-type rows are added."""
  out = {}
  for k, v in tensors.items():
    name = k[len(prefix):] if k.startswith(prefix) else k
    if name.startswith(body):
      for pattern, bert in names:
        name = re.sub('^' + pattern, bert, name)
      out['bert.' + name] = v
    else:
      out[next((bert + k[len(old):] for old, bert in heads if k.startswith(old)), k)] = v
  emb = out.get('bert.embeddings.word_embeddings.weight')
  if emb is not None:
    out['bert.embeddings.token_type_embeddings.weight'] = np.zeros((2, emb.shape[1]), np.float32)
  return out

"""HuggingFace ERNIE checkpoints as BERT ones, for hf_bert's importer (from-hf only).

ERNIE 1.0 / 2.0 / 3.0 (model_type 'ernie': ErnieModel, ErnieForPreTraining, ErnieForMaskedLM, ... e.g.
nghuyong/ernie-3.0-base-zh) is BERT under the prefix 'ernie.' (ERNIE's gain is its knowledge masking in
pretraining: jaxssl's data.masking='entity'), with hidden_act 'relu' in ERNIE 1.0 (model.hidden_act) and, where
use_task_id, a task-type table whose row task_type_id is added to every token's embeddings. transformers' default
task_type_id is 0 everywhere, so the import adds row 0 to each token-type row: the same sum before the embedding
LayerNorm, exactly. An export of an imported ERNIE is a BERT export (`to-hf` writes it as BertForPreTraining).
"""
import numpy as np

from jaxssl.convert import hf_defaults

TASK_TYPES = 'embeddings.task_type_embeddings.weight'


def bert_config(hf: dict) -> dict:
  """An ERNIE config.json dict as a BERT one (ErnieConfig's defaults for omitted keys)."""
  return dict(hf_defaults.with_defaults(hf, 'ernie'), model_type='bert')


def bert_tensors(tensors: dict, hf: dict | None = None) -> dict:  # hf: config.json (ALBERT's needs it)
  """ERNIE tensors under BertForPreTraining's names, task type 0 folded into the token-type rows."""
  out = {('bert.' + k[len('ernie.'):] if k.startswith('ernie.') else k): v for k, v in tensors.items()}
  for prefix in ('bert.', ''):  # with or without the model prefix (ErnieModel saves none)
    task = out.pop(prefix + TASK_TYPES, None)
    types = prefix + 'embeddings.token_type_embeddings.weight'
    if task is not None and types in out:
      out[types] = np.asarray(out[types], np.float32) + np.asarray(task[0], np.float32)
  return out

"""Embedding tables padded past the tokenizer: more rows than token ids.

Many public checkpoints round their vocabulary up (for matmul tiling, or to reserve ids): XLM-R-vocabulary
encoders such as multilingual-e5 have 250037 rows for 250002 ids, Qwen2 151936 for about 151665, Pythia/GPT-NeoX
50304 for 50277. jaxssl keeps every row (the params, `vocab_size` in an export's config.json and `to-hf` stay
the checkpoint's), so an export may have rows >= the tokenizer's ids, never fewer.

The number of ids is the tokenizer's own `vocab_size`, read whenever an export is loaded (exports record no
separate key: the tokenizer beside the params is the one truth, and exports older than padding support load
unchanged). `load_export` builds the model with `model.num_token_ids` set to it, and the models hand every
token prediction (GPT's next-token logits, so generation and ICL scoring; BERT's MLM logits) through
`mask_padding_logits`: a padding row can never be argmax'd, sampled or given probability mass.
"""
import jax
import jax.numpy as jnp

from jaxssl.errors import UserError


def check_rows(token_ids: int, rows: int, where: str) -> None:
  """A one-line UserError when a tokenizer of `token_ids` ids meets an embedding of fewer `rows` (an id would
  index past the table); more rows than ids is a padded vocabulary, which every job accepts."""
  if int(token_ids) > int(rows):
    raise UserError(f'{where}: the tokenizer has {token_ids} ids but the embedding only {rows} rows: the tokenizer '
                    'files belong to another checkpoint')


def mask_padding_logits(logits: jax.Array, num_token_ids: int) -> jax.Array:
  """`logits` [..., V] with the entries of padding rows (ids >= num_token_ids) set to -inf.

  num_token_ids 0 (the default of a model config: a model trained by jaxssl has no padding) or >= V returns the
  logits unchanged, at no cost. -inf rather than a large negative number: argmax, sampling, top-k/top-p and
  logsumexp then all treat the padding rows as absent.
  """
  vocab = logits.shape[-1]
  if not num_token_ids or num_token_ids >= vocab:
    return logits
  return jnp.where(jnp.arange(vocab) < num_token_ids, logits, -jnp.inf)


def model_config_with_token_ids(model_cfg, num_token_ids: int, rows: int):
  """A copy of the export's `model` section (dict or ConfigDict) whose model masks the logits of the padding
  rows past `num_token_ids` (the tokenizer's ids); unchanged when there is no padding."""
  import ml_collections
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg))
  if int(num_token_ids) < int(rows):
    cfg.num_token_ids = int(num_token_ids)
  return cfg

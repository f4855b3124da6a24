"""The BERT family (incl. Big Bird's block-sparse attention): masked LM + next-sentence prediction.

Batches come from data/examples/bert_pipeline.py; the loss is BERT's: MLM cross-entropy over the masked positions
plus NSP cross-entropy, each divided by its count in the global batch.
"""
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxssl.data.examples import bert_pipeline
from jaxssl.families import family as family_lib
from jaxssl.models import attention, bert

BERT_BATCH_KEYS = ('input_ids', 'token_type_ids', 'attention_mask', 'mlm_positions', 'mlm_ids', 'mlm_weights',
                   'nsp_label')


# ----- objective -----

def bert_sums(graphdef, params, batch, dropout_rng):
  """Forward pass; returns per-objective sums (loss, correct, count) over the batch."""
  model = nnx.merge(graphdef, params)
  mlm_logits, nsp_logits = model(batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
                                 batch['mlm_positions'], dropout_rng=dropout_rng)
  weights = batch['mlm_weights'].astype(jnp.float32)
  mlm_losses = optax.softmax_cross_entropy_with_integer_labels(mlm_logits.astype(jnp.float32), batch['mlm_ids'])
  mlm_correct = (jnp.argmax(mlm_logits, -1) == batch['mlm_ids']) * weights
  nsp_losses = optax.softmax_cross_entropy_with_integer_labels(nsp_logits.astype(jnp.float32), batch['nsp_label'])
  nsp_correct = jnp.argmax(nsp_logits, -1) == batch['nsp_label']
  return {
      'mlm_loss': jnp.sum(mlm_losses * weights), 'mlm_correct': jnp.sum(mlm_correct), 'mlm_count': jnp.sum(weights),
      'nsp_loss': jnp.sum(nsp_losses), 'nsp_correct': jnp.sum(nsp_correct),
      'nsp_count': jnp.asarray(nsp_losses.shape[0], jnp.float32),
  }


def bert_totals(batch):
  """BERT divides by the number of predictions (+ a small epsilon) and of sequences in the *global* batch."""
  return {'mlm': jnp.sum(batch['mlm_weights'].astype(jnp.float32)) + 1e-5,
          'nsp': jnp.asarray(batch['nsp_label'].shape[0], jnp.float32)}


def bert_loss(sums, totals):
  """MLM + NSP, each normalised by the global batch's totals."""
  return sums['mlm_loss'] / totals['mlm'] + sums['nsp_loss'] / totals['nsp']


def bert_summarize(sums):
  """Per-token/per-sequence means from sums; `loss` = MLM + NSP as BERT."""
  mlm_loss = sums['mlm_loss'] / (sums['mlm_count'] + 1e-5)
  nsp_loss = sums['nsp_loss'] / sums['nsp_count']
  return {
      'loss': mlm_loss + nsp_loss, 'mlm_loss': mlm_loss, 'mlm_accuracy': sums['mlm_correct'] / (sums['mlm_count'] + 1e-5),
      'nsp_loss': nsp_loss, 'nsp_accuracy': sums['nsp_correct'] / sums['nsp_count'],
  }


OBJECTIVE = family_lib.Objective(
    batch_ndims={k: 1 if k == 'nsp_label' else 2 for k in BERT_BATCH_KEYS}, sums=bert_sums, totals=bert_totals,
    loss=bert_loss, summarize=bert_summarize,
    perplexities=lambda result, sums, words: {'mlm_perplexity': float(np.exp(result['mlm_loss']))})


# ----- batches -----

def _data_args(config, seed, process_index, process_count) -> dict:
  d = config.data
  return dict(seq_len=d.seq_len, max_predictions=d.max_predictions, mask_rate=d.mask_rate,
              short_seq_prob=d.short_seq_prob, seed=seed, process_index=process_index, process_count=process_count,
              **bert_pipeline.masking_args(d))  # masking units (token, whole word, span, entity), the same for eval


def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  """Endless iterator over this process's share of the MLM + NSP batches from `start_step` on."""
  return bert_pipeline.make_pretrain_iterator(source, tokenizer, global_batch_size=config.train.batch_size,
                                              start_step=start_step, num_threads=config.data.num_threads,
                                              num_workers=config.data.num_workers,
                                              **_data_args(config, seed, process_index, process_count))


def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  """The fixed held-out MLM + NSP batches (same masks every call)."""
  return bert_pipeline.make_eval_batches(source, tokenizer, batch_size=config.train.batch_size,
                                         num_batches=config.eval.batches,
                                         **_data_args(config, seed, process_index, process_count))


def batch_shapes(config) -> dict:
  """{key: (per-row shape, dtype)} of a BERT batch."""
  seq, preds = config.data.seq_len, config.data.get('max_predictions', config.data.seq_len)
  shapes = {'input_ids': (seq,), 'token_type_ids': (seq,), 'attention_mask': (seq,), 'mlm_positions': (preds,),
            'mlm_ids': (preds,), 'mlm_weights': (preds,), 'nsp_label': ()}
  return {k: (s, np.float32 if k == 'mlm_weights' else np.int32) for k, s in shapes.items()}


def synthetic_batch(config, vocab_size: int, seed: int = 0) -> dict:
  """Full sentence pairs (A then B) with `max_predictions` positions predicted, as the pipeline's layout."""
  rng = np.random.default_rng(seed)
  b, length = config.train.batch_size, config.data.seq_len
  p = batch_shapes(config)['mlm_positions'][0][0]
  positions = np.sort(np.stack([rng.choice(np.arange(1, length), p, replace=False) for _ in range(b)]), -1)
  return {
      'input_ids': rng.integers(5, vocab_size, (b, length), dtype=np.int32),
      'token_type_ids': (np.arange(length)[None] >= length // 2).repeat(b, 0).astype(np.int32),
      'attention_mask': np.ones((b, length), np.int32),
      'mlm_positions': positions.astype(np.int32),
      'mlm_ids': rng.integers(5, vocab_size, (b, p), dtype=np.int32),
      'mlm_weights': np.ones((b, p), np.float32),
      'nsp_label': rng.integers(0, 2, (b,), dtype=np.int32),
  }


def most_frequent_token_accuracy(batches) -> float:
  """MLM accuracy of always predicting the commonest masked token: the baseline a model must beat."""
  ids = np.concatenate([b['mlm_ids'][b['mlm_weights'] > 0] for b in batches])
  return float(np.bincount(ids).max() / max(1, ids.size)) if ids.size else 0.0


# ----- config checks -----

def config_checks(config) -> list:
  """MLM settings, checked with the generic ones."""
  d = config.data
  return [(0 < d.max_predictions <= d.seq_len, f'data.max_predictions={d.max_predictions} must be in [1, seq_len]'),
          (0.0 < d.mask_rate < 1.0, f'data.mask_rate={d.mask_rate} must be between 0 and 1')]


def check_config(config) -> None:
  """Masking units, and Big Bird's block layout at the run's sequence length."""
  bert_pipeline.masking_args(config.data)
  m = config.model
  if m.get('attention_type', 'full') == 'block_sparse' and config.data.seq_len >= m.sparse_min_length:
    attention.check_layout(config.data.seq_len, m.block_size, m.num_random_blocks)


SHAPE_KEYS = ('name', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'max_position',
              'type_vocab_size', 'embedding_size', 'relative_attention_buckets')


def shape_value(model: dict, key: str):
  """`model[key]` as it shapes params: embedding_size 0 (or absent: configs before it) is hidden_size, an absent
  relative_attention_buckets 0."""
  if key == 'embedding_size':
    return model.get(key) or model.get('hidden_size')
  if key == 'relative_attention_buckets':
    return model.get(key) or 0
  return model.get(key)


# ----- embeddings: [CLS] sentence [SEP]; hidden_states 0 = embedding output, l = layer l's output -----

def _layer_stack(model, input_ids, mask):
  _, _, hidden = model.encode(input_ids, jnp.zeros_like(input_ids), mask, return_hidden_states=True)
  return jnp.stack([h.astype(jnp.float32) for h in hidden])


EMBEDDINGS = family_lib.EmbeddingHooks(
    frame=lambda tokenizer, ids: ([tokenizer.cls_id, *ids, tokenizer.sep_id], 1),
    layer_stack=_layer_stack, static_table=lambda model: model.word_embeddings,
    num_layers=lambda model: model.config.num_layers + 1)


FAMILY = family_lib.Family(
    name='bert', model_class=bert.BertForPretraining, build=bert.BertForPretraining,
    flops_per_token=bert.flops_per_token, validate=bert.BertConfig.from_config, objective=OBJECTIVE,
    train_batches=train_batches, eval_batches=eval_batches, batch_shapes=batch_shapes,
    synthetic_batch=synthetic_batch, shape_keys=SHAPE_KEYS, shape_value=shape_value,
    config_checks=config_checks, check_config=check_config,
    eval_context=lambda batches, tokenizer: (0.0, {'mlm_baseline_accuracy': most_frequent_token_accuracy(batches)}),
    embeddings=EMBEDDINGS)

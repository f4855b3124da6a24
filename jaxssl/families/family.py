"""What a pretraining family is: the `Family` record (model, objective, batches, config checks, checkpoint shape
keys, embedding hooks) and the `Objective` record the generic train step runs. One instance per family module."""
import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Objective:
  """What a family trains on: its batch keys (with ndim), per-batch sums, global normalisers, the loss from both,
  the metrics from summed sums, and the held-out perplexities. The train step, accumulation and eval are shared.

  Losses are sums divided by the weight of the *whole* global batch, so accumulating gradients over microbatches
  gives exactly the full-batch gradient (not a mean of per-microbatch means).
  """
  batch_ndims: dict
  sums: Callable       # (graphdef, params, batch, dropout_rng) -> dict of sums
  totals: Callable     # (global batch) -> dict of normalisers
  loss: Callable       # (sums, totals) -> scalar
  summarize: Callable  # (sums) -> metrics
  # (summarized metrics, summed sums, words the batches predict or 0) -> extra held-out metrics
  perplexities: Callable = None

  def eval_metrics(self, sums, words: float = 0.0) -> dict:
    """Held-out metrics (floats) from sums added over the eval batches."""
    result = {k: float(v) for k, v in self.summarize(sums).items()}
    result.update((self.perplexities or token_perplexities)(result, sums, words))
    return result


def token_perplexities(result: dict, sums: dict, words: float) -> dict:
  """Per-token perplexity of `loss`; with `words` (GPT) also per-word perplexity from the summed `lm_loss`."""
  out = {'perplexity': float(np.exp(result['loss']))}
  if words:
    # The same total log-likelihood spread over words instead of pieces: comparable across tokenizers.
    out['word_perplexity'] = float(np.exp(float(sums['lm_loss']) / words))
  return out


@dataclasses.dataclass(frozen=True)
class EmbeddingHooks:
  """How contextual-embedding analysis (eval/embeddings.py) runs a family's model."""
  frame: Callable         # (tokenizer, sentence ids) -> (model input ids, offset of the first sentence id)
  layer_stack: Callable   # (model, input_ids [B, T], mask [B, T]) -> [layers, B, T, H] float32
  static_table: Callable  # (model) -> the input token-embedding table [V, E]
  num_layers: Callable    # (model) -> how many layers `embeddings.layer` counts
  last_layer_only: bool = False  # only the final hidden state is exposed (layer -1 or 'mix')
  # (model, tokenizer, input_ids [B, T]) -> extra keyword inputs of layer_stack (a chars ELMo's char ids)
  model_inputs: Callable = lambda model, tokenizer, input_ids: {}
  # (model, tokenizer, ids [N]) -> [N, E] context-free vectors of those ids; None = rows of static_table
  static_rows: Callable | None = None


def no_extra_checks(config) -> None:
  """A family whose data settings need no check beyond the generic ones."""


@dataclasses.dataclass(frozen=True)
class Family:
  """Everything one pretraining family adds; the loop, compile-only, bench, checkpoints and exports ask it."""
  name: str                 # the config's model.name
  model_class: type         # the nnx module `build` makes
  build: Callable           # (model_cfg, vocab_size, *, rngs) -> module
  flops_per_token: Callable  # (model_cfg, vocab_size, seq_len, max_predictions) -> training FLOPs per token
  validate: Callable        # (model_cfg, vocab_size) -> checked model config; raises UserError
  objective: Objective
  # (source, tokenizer, config, *, start_step, seed, process_index, process_count) -> iterator of local batches
  train_batches: Callable
  # (source, tokenizer, config, *, seed, process_index, process_count) -> fixed list of held-out local batches
  eval_batches: Callable
  # (config) -> {batch key: (per-row shape, numpy dtype)}: the layout train_batches yields (compile-only, bench)
  batch_shapes: Callable
  # (config, vocab_size, seed) -> one global batch of random but valid content in train_batches' layout (bench)
  synthetic_batch: Callable
  # model config keys whose change makes saved params unusable, and (model dict, key) -> the value as it shapes
  # params (defaults of older configs filled in)
  shape_keys: tuple
  shape_value: Callable
  # (config) -> [(ok, message)]: data settings checked with the generic ones, before anything is read
  config_checks: Callable = lambda config: []
  # (config) -> None: deeper checks after the model config validated (UserError), before the tokenizer is trained
  check_config: Callable = no_extra_checks
  # (eval batches, tokenizer) -> (words the eval batches predict, or 0; extra fixed eval metrics)
  eval_context: Callable = lambda batches, tokenizer: (0.0, {})
  embeddings: EmbeddingHooks | None = None
  # (model_cfg) -> a predicate on param paths fine-tuning keeps as pretrained, or None (everything learns)
  frozen_in_finetuning: Callable = lambda model_cfg: None
  # a causal LM with models/generation.py's decoding interface (init_cache / decode step): generate and ICL use it
  generates: bool = False

  def shape(self, model: dict) -> dict:
    """{key: value} of `model` (a config's model section as a dict) for every shape key."""
    return {k: self.shape_value(model, k) for k in self.shape_keys}

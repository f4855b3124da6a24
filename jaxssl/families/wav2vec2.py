"""The wav2vec 2.0 family: self-supervision on raw speech (contrastive prediction of quantised latent frames).

Batches (data/audio_batches.py) are crops of utterances with span-masked latent frames, the frames the loss scores
and each one's distractors (other masked frames of the same utterance). The loss, as fairseq's wav2vec criterion:

  contrastive: -log softmax(cos(c_t, q_t) / kappa over {q_t} + distractors), mean over scored frames
  + diversity_weight * (G V - perplexity of the batch's mean code distribution) / (G V)   (masked frames)
  + feature_penalty_weight * mean squared conv-encoder output

A distractor equal to the target (same codes) is left out of the softmax. With microbatches the diversity term is
each microbatch's, weighted by its masked frames (fairseq computes it per device batch); sharding changes nothing.

The audio corpus (data/audio.py) replaces the text corpus and the tokenizer: `AudioFamily.load_sources`.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.data import audio, audio_batches
from jaxssl.families import family as family_lib
from jaxssl.models import wav2vec2


def contrastive_sums(out: dict, batch: dict, c: wav2vec2.Wav2vec2Config) -> dict:
  """The objective's sums from the model's outputs (`Wav2vec2Model.__call__`) and the batch."""
  weights = batch['pred_weights']
  take = jax.vmap(lambda rows, idx: rows[idx])  # per row: rows [T, D], idx [...] -> [..., D]
  context = take(out['context'], batch['pred_positions'])                # [B, P, D]
  positive = take(out['targets'], batch['pred_positions'])               # [B, P, D]
  negatives = take(out['targets'], batch['distractors'])                 # [B, P, K, D]
  candidates = jnp.concatenate([positive[:, :, None], negatives], axis=2)  # [B, P, K + 1, D]
  norm = lambda x: jnp.maximum(jnp.linalg.norm(x, axis=-1), 1e-8)  # noqa: E731
  cosine = jnp.einsum('bpd,bpkd->bpk', context, candidates) / (norm(context)[..., None] * norm(candidates))
  logits = cosine / c.logit_temperature
  same = jnp.all(negatives == positive[:, :, None], axis=-1)
  same = jnp.concatenate([jnp.zeros_like(same[..., :1]), same], axis=-1)
  logits = jnp.where(same, -jnp.inf, logits)
  losses = jax.nn.logsumexp(logits, axis=-1) - logits[..., 0]
  best, worst = jnp.argmax(logits, -1) == 0, jnp.argmin(jnp.where(same, jnp.inf, logits), -1) == 0
  correct = (best & ~worst).astype(jnp.float32)  # all-equal logits (a collapsed model) count as wrong
  chance = 1.0 / jnp.sum(~same, axis=-1)

  masked = (batch['mask'] * batch['frame_mask']).astype(jnp.float32)
  probs = jax.nn.softmax(out['code_logits'], axis=-1)  # [B, T, G, V]
  mean_probs = jnp.einsum('bt,btgv->gv', masked, probs) / jnp.maximum(jnp.sum(masked), 1.0)
  perplexity = jnp.sum(jnp.exp(-jnp.sum(mean_probs * jnp.log(mean_probs + 1e-7), axis=-1)))
  num_codes = c.codebooks * c.codebook_size
  frames = batch['frame_mask'].astype(jnp.float32)
  return {
      'contrastive_loss': jnp.sum(losses * weights), 'contrastive_correct': jnp.sum(correct * weights),
      'chance_correct': jnp.sum(chance * weights), 'predictions': jnp.sum(weights),
      'diversity': jnp.sum(masked) * (num_codes - perplexity) / num_codes, 'masked': jnp.sum(masked),
      'feature_sq': jnp.sum(jnp.mean(out['feature_sq'], axis=-1) * frames), 'frames': jnp.sum(frames),
  }


def wav2vec2_sums(graphdef, params, batch, dropout_rng):
  """Contrastive, diversity and feature-penalty sums of a (micro)batch; the Gumbel noise comes from the step's
  key (none in eval: codes by plain argmax)."""
  model = nnx.merge(graphdef, params)
  out = model(batch['audio'], batch['frame_mask'], batch['mask'], batch['gumbel_temperature'],
              dropout_rng=dropout_rng)
  c = model.config
  sums = contrastive_sums(out, batch, c)
  # The two extra terms' weights ride in the sums (the objective is the same object for every config).
  sums['diversity_weight'] = jnp.float32(c.diversity_weight) * sums['masked']
  sums['feature_penalty_weight'] = jnp.float32(c.feature_penalty_weight) * sums['frames']
  return sums


def wav2vec2_totals(batch):
  """The global batch's scored frames, masked frames and real frames."""
  masked = jnp.sum((batch['mask'] * batch['frame_mask']).astype(jnp.float32))
  return {'predictions': jnp.maximum(jnp.sum(batch['pred_weights']), 1.0), 'masked': jnp.maximum(masked, 1.0),
          'frames': jnp.maximum(jnp.sum(batch['frame_mask'].astype(jnp.float32)), 1.0)}


def _weight(sums, name, count):
  return sums[name] / jnp.maximum(sums[count], 1e-5)


def wav2vec2_loss(sums, totals):
  return (sums['contrastive_loss'] / totals['predictions']
          + _weight(sums, 'diversity_weight', 'masked') * sums['diversity'] / totals['masked']
          + _weight(sums, 'feature_penalty_weight', 'frames') * sums['feature_sq'] / totals['frames'])


def wav2vec2_summarize(sums):
  """loss and its parts; contrastive_accuracy (the target ranked first among its candidates) next to `chance`
  (1 / candidates, averaged); prob_perplexity of the codebooks (G V at most)."""
  predictions, masked, frames = (sums[k] + 1e-5 for k in ('predictions', 'masked', 'frames'))
  contrastive, diversity, penalty = (sums['contrastive_loss'] / predictions, sums['diversity'] / masked,
                                     sums['feature_sq'] / frames)
  return {'loss': contrastive + _weight(sums, 'diversity_weight', 'masked') * diversity
          + _weight(sums, 'feature_penalty_weight', 'frames') * penalty,
          'contrastive_loss': contrastive, 'contrastive_accuracy': sums['contrastive_correct'] / predictions,
          'chance_accuracy': sums['chance_correct'] / predictions, 'diversity_loss': diversity,
          'feature_penalty': penalty, 'masked_share': masked / frames}


OBJECTIVE = family_lib.Objective(
    batch_ndims=audio_batches.BATCH_NDIMS, sums=wav2vec2_sums, totals=wav2vec2_totals, loss=wav2vec2_loss,
    summarize=wav2vec2_summarize, perplexities=lambda result, sums, words: {})


@dataclasses.dataclass(frozen=True)
class AudioFamily(family_lib.Family):
  """A Family whose corpus is audio: `load_sources(config)` -> {'train', 'validation'} sources of 16 kHz int16
  utterances, which replaces the text corpus and its tokenizer (the batch builders get None for it). The same
  field as the image families' (families/vision.py), so one loop hook serves both."""
  load_sources: Callable = None


def load_sources(config) -> dict:
  """The audio corpus of `config.data` (a folder of .wav/.flac files or a TFDS name), prepared once."""
  d = config.data
  return audio.load_audio_corpus(d.corpus, d.data_dir, validation_fraction=d.validation_fraction)


def train_batches(source, tokenizer, config, *, start_step, seed, process_index=0, process_count=1):
  """Endless iterator over this process's rows of the batches from `start_step` on (no tokenizer)."""
  del tokenizer
  return audio_batches.train_batches(source, config, start_step=start_step, seed=seed, process_index=process_index,
                                     process_count=process_count)


def eval_batches(source, tokenizer, config, *, seed, process_index=0, process_count=1):
  """The fixed held-out batches."""
  del tokenizer
  return audio_batches.eval_batches(source, config, seed=seed, process_index=process_index,
                                    process_count=process_count)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int) -> float:
  """Training FLOPs per latent frame (a 'token' of throughput: batch_size * seq_len frames per step)."""
  del vocab_size
  return wav2vec2.flops_per_frame(model_cfg, seq_len, max_predictions, int(model_cfg.get('num_negatives', 100)))


SHAPE_KEYS = ('name', 'num_layers', 'hidden_size', 'num_heads', 'intermediate_size', 'conv_layers',
              'pos_conv_kernel', 'pos_conv_groups', 'codebooks', 'codebook_size', 'codevector_dim', 'final_dim')
_DEFAULTS = {f: getattr(wav2vec2.Wav2vec2Config, f, None) for f in SHAPE_KEYS}


def shape_value(model: dict, key: str):
  """`model[key]` as it shapes params: conv layers as tuples (JSON gives lists), defaults filled in."""
  value = model.get(key, _DEFAULTS.get(key))
  if key == 'conv_layers' and value is not None:
    return tuple(tuple(int(v) for v in layer) for layer in value)
  return value


FAMILY = AudioFamily(
    name='wav2vec2', model_class=wav2vec2.Wav2vec2Model, build=wav2vec2.Wav2vec2Model,
    flops_per_token=flops_per_token, validate=wav2vec2.Wav2vec2Config.from_config, objective=OBJECTIVE,
    train_batches=train_batches, eval_batches=eval_batches, batch_shapes=audio_batches.batch_shapes,
    synthetic_batch=lambda config, vocab_size, seed=0: audio_batches.synthetic_batch(config, seed),
    shape_keys=SHAPE_KEYS, shape_value=shape_value,
    check_config=lambda config: audio_batches.MaskingConfig.from_config(config) and None, load_sources=load_sources)



def frame_features(graphdef, params, audio_rows, frame_mask):
  """Frozen context vectors [B, T, H] of audio rows [B, S] (nothing masked, no dropout): what a probe reads."""
  return nnx.merge(graphdef, params).encode(audio_rows, frame_mask)[0]


def linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes: int, ridge: float = 1e-2) -> float:
  """Accuracy on (test_x, test_y) of a linear classifier fit on (train_x, train_y) (frames or utterances
  [N, H], labels [N]): ridge regression onto one-hot labels over standardised features, closed form."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  x, xt = (train_x - mean) / std, (test_x - mean) / std
  x, xt = (jnp.concatenate([a, jnp.ones((len(a), 1), a.dtype)], 1) for a in (x, xt))
  targets = jax.nn.one_hot(train_y, num_classes)
  w = jnp.linalg.solve(x.T @ x + ridge * len(x) * jnp.eye(x.shape[1]), x.T @ targets)
  return float(jnp.mean(jnp.argmax(xt @ w, -1) == test_y))

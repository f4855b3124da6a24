"""The pretraining loop: corpus → tokenizer → pipeline → jitted sharded step → metrics and checkpoints.

One loop for every family: `families.family_for(model)` says what is trained and on which batches (BERT: masked
LM + NSP from `data/pipeline.py`; GPT: next-token LM on packed documents from `data/lm_pipeline.py`).

Read top to bottom. Resuming needs nothing but the step: the data position, the dropout keys and the learning
rate are all functions of it, so rerunning the same command continues exactly where the last checkpoint was.
SIGTERM (preemption) saves at a step every process agrees on and returns; a NaN/Inf loss stops the run (or
skips the update) and is never saved; a damaged newest checkpoint gives way to the newest good one.
"""
import json
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl import models
from jaxssl.data import corpora, tokenizers
from jaxssl.errors import JobFailed, UserError
from jaxssl.models import vocab
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import families
from jaxssl.train import metrics as metrics_lib
from jaxssl.train import preemption
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib


def check_config(config) -> None:
  """Catches impossible settings before anything is read or written."""
  t, d = config.train, config.data
  checks = [
      (t.steps > 0, f'train.steps={t.steps} must be positive'),
      (t.batch_size > 0, f'train.batch_size={t.batch_size} must be positive'),
      (t.microbatches >= 1 and t.batch_size % t.microbatches == 0,
       f'train.batch_size={t.batch_size} must be a multiple of train.microbatches={t.microbatches}'),
      (t.batch_size % jax.process_count() == 0,
       f'train.batch_size={t.batch_size} must be a multiple of the number of processes ({jax.process_count()})'),
      (8 <= d.seq_len <= config.model.max_position,
       f'data.seq_len={d.seq_len} must be between 8 and model.max_position={config.model.max_position}'),
      (config.checkpoint.every_steps > 0 and config.checkpoint.keep > 0,
       'checkpoint.every_steps and checkpoint.keep must be positive'),
  ]
  if config.model.name == 'bert':
    checks += [
        (0 < d.max_predictions <= d.seq_len, f'data.max_predictions={d.max_predictions} must be in [1, seq_len]'),
        (0.0 < d.mask_rate < 1.0, f'data.mask_rate={d.mask_rate} must be between 0 and 1'),
    ]
  for ok, message in checks:
    if not ok:
      raise UserError(f'{message}: fix it with --config.<key>=<value>')
  models.validate_config(config.model, config.tokenizer.vocab_size)
  if config.model.name == 'encdec':  # corruption settings fail here, not after the tokenizer is trained
    from jaxssl.data.examples import denoising  # noqa: PLC0415
    denoising.DenoisingConfig.from_config(config.data)
  elif config.model.name == 'bert':
    from jaxssl.data.examples import bert_pipeline as pipeline  # noqa: PLC0415
    pipeline.masking_args(config.data)
    m = config.model
    if m.get('attention_type', 'full') == 'block_sparse' and d.seq_len >= m.sparse_min_length:
      from jaxssl.models import attention  # noqa: PLC0415
      attention.check_layout(d.seq_len, m.block_size, m.num_random_blocks)
  mesh_lib.resolve_mesh_shape(config.mesh.shape, jax.device_count())


def evaluate(eval_step, params, batches, mesh, objective=step_lib.BERT, words: float = 0.0) -> dict:
  """Held-out metrics over the fixed batches: BERT's MLM/NSP accuracy and MLM perplexity; GPT's per-token loss,
  accuracy and perplexity (and per-word perplexity when `words`, the words those batches predict, is given)."""
  totals = None
  for local in batches:
    sums = jax.device_get(eval_step(params, mesh_lib.global_batch(local, mesh)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
  result = {k: float(v) for k, v in objective.summarize(totals).items()}
  if 'mlm_loss' in result:
    result['mlm_perplexity'] = float(np.exp(result['mlm_loss']))
  else:
    result['perplexity'] = float(np.exp(result['loss']))
    if words:
      # The same total log-likelihood spread over words instead of pieces: comparable across tokenizers.
      result['word_perplexity'] = float(np.exp(float(totals['lm_loss']) / words))
  return result


# Model settings a run may choose freely when it starts from an export (how it computes, not what it computes).
RUNTIME_MODEL_KEYS = ('dtype', 'remat', 'attention', 'dropout_rate', 'attention_dropout_rate',
                      # Big Bird's block-sparse attention uses the same params as full attention.
                      'attention_type', 'block_size', 'num_random_blocks', 'sparse_min_length')


def adopt_export_model(config, init_from: str, say=print) -> None:
  """Makes `config` describe the model exported at `init_from` (continued pretraining, e.g. of GPT-2 or a
  converted Llama on your own corpus): its model section (but the run's RUNTIME_MODEL_KEYS) and vocabulary size.
  """
  saved = ckpt_lib.read_export_config(init_from)
  if 'task' in saved:
    raise UserError(f'init_from={init_from} is a fine-tuned export ({saved["task"].get("name")}): continue '
                    'pretraining from a pretraining export')
  name = saved.get('model', {}).get('name')
  if name != config.model.name:
    raise UserError(f'init_from={init_from} holds a {name} model but this config trains {config.model.name}: use '
                    f'the configs/{name}.py config')
  # The params keep all their rows; a padded vocabulary (more rows than the tokenizer's ids) trains as it is.
  vocab.check_rows(tokenizers.load_tokenizer(init_from).vocab_size, saved['vocab_size'], init_from)
  taken = {k: v for k, v in saved['model'].items() if k not in RUNTIME_MODEL_KEYS}
  changed = sorted(k for k, v in taken.items() if config.model.get(k) != v)
  with config.unlocked():
    config.model.update(taken)
    config.tokenizer.vocab_size = int(saved['vocab_size'])
  if changed:
    say(f'init_from {init_from}: model settings from the export: ' +
        ', '.join(f'{k}={taken[k]}' for k in changed))
  if config.data.seq_len > config.model.max_position:
    raise UserError(f'data.seq_len={config.data.seq_len} exceeds the exported model\'s max_position='
                    f'{config.model.max_position}: pass --config.data.seq_len={config.model.max_position} or less')


def adopt_export_tokenizer(init_from: str, workdir: str, is_main: bool):
  """The export's tokenizer, copied into the workdir by process 0 (so export and resume find it there)."""
  tokenizer = tokenizers.load_tokenizer(init_from)
  existing = [n for n in ('tokenizer.model', 'tokenizer.json') if os.path.isfile(os.path.join(workdir, n))]
  if existing:
    here = tokenizers.load_tokenizer(workdir)
    if here.vocab_size != tokenizer.vocab_size or type(here) is not type(tokenizer):
      raise UserError(f'workdir {workdir} holds another tokenizer ({existing[0]}) than init_from={init_from}: '
                      'use a new --workdir')
  elif is_main:
    tokenizer.save(workdir)
  return tokenizer


def run_pretraining(config, workdir: str) -> dict:
  """Trains (or resumes) to `config.train.steps`; returns the last logged metrics."""
  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  init_from = config.get('init_from', '')
  if init_from:
    adopt_export_model(config, init_from, say)
  check_config(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                      directory=config.checkpoint.get('directory', ''))
  _, saved = checkpointer.newest_readable_meta()
  if saved is not None:
    ckpt_lib.check_compatible(saved['config'], config.model, config.tokenizer.vocab_size, workdir)

  # Data and tokenizer (process 0 trains the tokenizer; the others wait for it, then load the same file).
  sources = corpora.load_corpus(config.data.corpus, config.data.data_dir,
                                ptb_sentences_per_doc=config.data.ptb_sentences_per_doc,
                                validation_fraction=config.data.validation_fraction,
                                language_temperature=config.data.get('language_temperature', 0.3),
                                seed=config.train.seed)
  if init_from:
    tokenizer = adopt_export_tokenizer(init_from, workdir, is_main)
  else:
    tokenizer = tokenizers.get_or_train_tokenizer(
        workdir, lambda: corpora.iter_sentences(sources['train'], limit=config.tokenizer.max_training_sentences),
        config.tokenizer, process_index=jax.process_index())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer ready')
    tokenizer = tokenizers.load_tokenizer(workdir)
  vocab_size = config.tokenizer.vocab_size if init_from else tokenizer.vocab_size

  # Mesh, model and optimizer, born sharded.
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  t = config.train
  if t.batch_size % mesh_lib.batch_divisor(mesh) or (t.batch_size // t.microbatches) % mesh_lib.batch_divisor(mesh):
    raise UserError(f'train.batch_size={t.batch_size} (per microbatch {t.batch_size // t.microbatches}) must be a '
                    f'multiple of the data*fsdp mesh size {mesh_lib.batch_divisor(mesh)}: change '
                    '--config.train.batch_size or --config.mesh.shape')
  setup = state_lib.setup_model(config.model, vocab_size, mesh, t.seed)
  tx, schedule = state_lib.make_optimizer(t), state_lib.make_schedule(t)
  shardings = state_lib.state_shardings(setup, tx)
  latest, state = checkpointer.restore_newest_good(state_lib.abstract_state(setup, tx), say)
  if latest is not None:
    start = int(jax.device_get(state['step']))
  else:
    # A new run starts from the export's params when init_from names one (a resumed run ignores it: its own
    # checkpoint is newer); the optimizer state is always fresh.
    params = ckpt_lib.load_export_params(init_from, setup.abstract_params) if init_from else None
    state = state_lib.init_state(setup, tx, params)
    start = 0
  n_params = state_lib.param_count(state['params'])
  flops_per_token = models.flops_per_token(config.model, vocab_size, config.data.seq_len,
                                           config.data.max_predictions)
  say(f'jaxssl pretrain: {config.model.name} {config.get("variant", "")} | {n_params / 1e6:.2f}M params | '
      f'vocab {vocab_size} | mesh {dict(mesh.shape)} over {jax.device_count()} devices, '
      f'{jax.process_count()} process(es) | batch {t.batch_size} x {config.data.seq_len} | '
      f'{"resuming from step " + str(start) if latest is not None else "starting at step 0"}'
      f'{" from " + init_from if init_from and latest is None else ""} → {t.steps} | '
      f'workdir {workdir}', flush=True)
  if is_main:
    _write_atomic(os.path.join(workdir, 'config.json'), config_lib.to_json(config))

  family = families.family_for(config.model)
  objective = family.objective
  train_step = step_lib.jit_train_step(
      step_lib.make_train_step(setup.graphdef, tx, schedule, t.microbatches, objective), shardings, mesh, objective)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup.graphdef, objective), setup.param_shardings,
                                     mesh, objective)
  where = dict(seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
  batches = family.train_batches(sources['train'], tokenizer, config, start_step=start, **where)
  eval_batches = family.eval_batches(sources['validation'], tokenizer, config, **where)
  words, extra_eval = family.eval_context(eval_batches, tokenizer)
  # A multilingual corpus is also evaluated per language: metrics eval_<tag>_* beside the overall eval_*.
  by_language = {}
  for lang, source in sources.get('validation_by_language', {}).items():
    lang_batches = family.eval_batches(source, tokenizer, config, **where)
    by_language[lang] = (lang_batches, *family.eval_context(lang_batches, tokenizer))

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start, total_steps=t.steps)
  peak = metrics_lib.peak_flops_per_device(config.log.peak_flops_per_device) * jax.device_count()
  throughput = metrics_lib.Throughput(t.batch_size * config.data.seq_len, flops_per_token, peak)
  meta = {'config': json.loads(config_lib.to_json(config)), 'vocab_size': vocab_size}
  last, previous = {}, None
  watch = preemption.PreemptionWatch()
  finite = FiniteLossCheck(t.get('nonfinite', 'stop'), t.get('max_skipped_steps', 10), checkpointer, writer)
  try:
    with jax.set_mesh(mesh):
      for step in range(start, t.steps):
        state, metrics = train_step(state, mesh_lib.global_batch(next(batches), mesh))
        done = step + 1
        if previous is not None:  # the step before is finished by now: reading its loss stalls nothing
          finite.check(*previous)
        previous = (done, metrics)
        if step == start:  # don't count compilation in tokens/s
          jax.block_until_ready(metrics)
          throughput.reset(done)
        if done % config.log.every_steps == 0 or done == t.steps:
          last = {k: float(v) for k, v in jax.device_get(metrics).items()}
          last.update(throughput.measure(done))
          writer.write(done, last)
          writer.progress(done, last)
        if done % config.eval.every_steps == 0 or done == t.steps:
          result = {**evaluate(eval_step, state['params'], eval_batches, mesh, objective, words), **extra_eval}
          writer.log(f'eval at step {done}: ' + ' '.join(f'{k}={v:.4g}' for k, v in result.items()))
          for lang, (lang_batches, lang_words, lang_extra) in by_language.items():
            lang_result = {**evaluate(eval_step, state['params'], lang_batches, mesh, objective, lang_words),
                           **lang_extra}
            writer.log(f'eval {lang} at step {done}: ' + ' '.join(f'{k}={v:.4g}' for k, v in lang_result.items()))
            result.update({f'{lang}_{k}': v for k, v in lang_result.items()})
          writer.write(done, result, prefix='eval_')
          last.update({'eval_' + k: v for k, v in result.items()})
          throughput.reset(done)
        preempted = watch.stop_at(done)
        if done % config.checkpoint.every_steps == 0 or done == t.steps or preempted:
          finite.check(done, metrics)  # a NaN state is never saved
          checkpointer.save(state, {**meta, 'step': done, 'data_position': done}, force=True)
          throughput.reset(done)
        if preempted:
          checkpointer.wait()
          say(f'preempted (SIGTERM): saved step {done} in {checkpointer.directory}; rerun the same command to '
              'resume', flush=True)
          return last
  finally:
    watch.close()
    checkpointer.close()
    writer.close()
  say(f'done: step {t.steps}; checkpoints in {checkpointer.directory}', flush=True)
  return last


class FiniteLossCheck:
  """Stops the run (JobFailed naming the step) when the loss is NaN/Inf; with nonfinite='skip' the optimizer
  has dropped that update instead, and only `max_skipped` such steps in a row stop the run."""

  def __init__(self, mode: str, max_skipped: int, checkpointer, writer):
    if mode not in ('stop', 'skip'):
      raise UserError(f"train.nonfinite={mode!r}: use 'stop' or 'skip'")
    self.mode, self.max_skipped, self.checkpointer, self.writer = mode, max_skipped, checkpointer, writer
    self.skipped_in_a_row, self.checked = 0, 0

  def check(self, step: int, metrics) -> None:
    if step <= self.checked:
      return
    self.checked = step
    loss = float(jax.device_get(metrics['loss']))
    if math.isfinite(loss):
      self.skipped_in_a_row = 0
      return
    kept = self.checkpointer.latest_step()
    kept = f'the newest checkpoint is step {kept}' if kept is not None else 'no checkpoint was saved'
    if self.mode == 'skip':
      self.skipped_in_a_row += 1
      self.writer.log(f'step {step}: loss is {loss}; update skipped ({self.skipped_in_a_row} in a row)')
      if self.skipped_in_a_row <= self.max_skipped:
        return
      raise JobFailed(f'the loss was non-finite for {self.skipped_in_a_row} steps in a row up to step {step}; '
                      f'{kept} (never a NaN one): lower train.learning_rate or check the data')
    raise JobFailed(f'the loss is {loss} at step {step}; stopped without saving it ({kept}): lower '
                    'train.learning_rate, or pass --config.train.nonfinite=skip to drop such updates')


def _write_atomic(path: str, text: str) -> None:
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)

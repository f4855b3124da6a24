"""The pretraining loop: corpus → tokenizer → family batches → jitted sharded step → metrics and checkpoints.

One loop for every family: `families.family_for(config.model)` says what is trained and on which batches.
Resuming needs nothing but the step: the data position, the dropout keys and the learning rate are all functions
of it. SIGTERM (preemption) saves at a step every process agrees on and returns; a NaN/Inf loss stops the run (or
skips the update) and is never saved; a damaged newest checkpoint gives way to the newest good one.
"""
import json

import jax
from jax.experimental import multihost_utils

from jaxssl import config as config_lib
from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl import storage
from jaxssl.data import corpora, tokenizers
from jaxssl.errors import UserError
from jaxssl.models import fused_attention, layers, precision, vocab
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import layer_loop
from jaxssl.train import metrics as metrics_lib
from jaxssl.train import nonfinite
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
      (config.log.every_steps > 0 and config.eval.every_steps > 0,
       f'log.every_steps={config.log.every_steps} and eval.every_steps={config.eval.every_steps} must be positive '
       '(a value above train.steps logs or evaluates only at the end)'),
  ]
  family = families.family_for(config.model)
  checks += family.config_checks(config)
  for ok, message in checks:
    if not ok:
      raise UserError(f'{message}: fix it with --config.<key>=<value>')
  family.validate(config.model, config.tokenizer.vocab_size)
  family.check_config(config)  # e.g. corruption settings fail here, not after the tokenizer is trained
  mesh_lib.resolve_mesh_shape(config.mesh.shape, jax.device_count())


def evaluate(eval_step, params, batches, mesh, objective, words: float = 0.0) -> dict:
  """Held-out metrics over the fixed batches: the objective's summarized sums and perplexities (per word too
  when `words`, the words those batches predict, is given)."""
  totals = None
  for local in batches:
    sums = jax.device_get(eval_step(params, mesh_lib.global_batch(local, mesh)))
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
  return objective.eval_metrics(totals, words)


# Model settings a run may choose freely when it starts from an export (how it computes, not what it computes).
RUNTIME_MODEL_KEYS = ('dtype', 'remat', 'layer_loop', 'attention', 'dropout_rate', 'attention_dropout_rate',
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
  existing = [n for n in ('tokenizer.model', 'tokenizer.json') if storage.isfile(storage.join(workdir, n))]
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
  remat_setting = config.model.get('remat', '')
  dtype_note = precision.resolve(config.model)  # 'auto' -> this backend's dtype (and remat), in config.json
  # What the banner says of the remat: the setting as given, so that 'auto' says what it picked and why.
  remat_note = precision.remat_policy(remat_setting, config.model.get('dtype', 'float32'))[1] if remat_setting else ''
  compute_note = ', '.join(n for n in (dtype_note, remat_note) if n)
  checkpointer = _checked_checkpointer(config, workdir, say)
  corpus_identity = _corpora(config).corpus_identity(config.data)  # before loading: the files it prepares and reads
  sources, tokenizer, vocab_size = _corpus_and_tokenizer(config, workdir, is_main)
  _corpora(config).check_same_corpus(corpus_identity, config.data, workdir, while_starting=True)
  mesh = _mesh(config)
  t = config.train
  setup = state_lib.setup_model(config.model, vocab_size, mesh, t.seed)
  tx, schedule = state_lib.make_optimizer(t), state_lib.make_schedule(t)
  start, state, resumed = _restore_or_init(config, setup, tx, checkpointer, say)
  family = families.family_for(config.model)
  flops_per_token = family.flops_per_token(config.model, vocab_size, config.data.seq_len,
                                           config.data.max_predictions)
  _announce(config, workdir, state, vocab_size, mesh, start, resumed, say, compute_note)
  if is_main:
    storage.write_text(storage.join(workdir, 'config.json'), config_lib.to_json(config))

  # The eval step and the checkpoint check are forward passes: XLA's layer loop where 'auto' says so (layer_loop.py).
  forward = state_lib.setup_model(layer_loop.forward_config(config.model), vocab_size, mesh, t.seed)
  train_step, checkpoint_check, eval_step = _jitted_steps(setup, tx, schedule, t.microbatches, family.objective, mesh,
                                                          forward.graphdef)
  where = dict(seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
  batches = family.train_batches(sources['train'], tokenizer, config, start_step=start, **where)
  held_out = HeldOut(family, sources, tokenizer, config, where)

  writer = metrics_lib.MetricsWriter(workdir, resume_step=start, total_steps=t.steps)
  peak = metrics_lib.peak_flops_per_device(config.log.peak_flops_per_device) * jax.device_count()
  throughput = metrics_lib.Throughput(t.batch_size * config.data.seq_len, flops_per_token, peak)
  meta = {'config': json.loads(config_lib.to_json(config)), 'vocab_size': vocab_size, 'corpus': corpus_identity}
  last, previous, next_batch, save_pending = {}, None, None, False
  watch = preemption.PreemptionWatch()
  finite = nonfinite.FiniteLossCheck(t.get('nonfinite', 'stop'), t.get('max_skipped_steps', 10), checkpointer, writer)
  try:
    with jax.set_mesh(mesh):
      for step in range(start, t.steps):
        batch = next_batch if next_batch is not None else mesh_lib.global_batch(next(batches), mesh)
        next_batch = None
        state, metrics = train_step(state, batch)
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
          last.update(held_out.evaluate(eval_step, state['params'], mesh, done, writer))
          throughput.reset(done)
        preempted = watch.stop_at(done)
        if done % config.checkpoint.every_steps == 0 or done == t.steps or preempted or save_pending:
          finite.check(done, metrics)  # a NaN state is never saved
          # Nor one whose update was never checked: the next step's loss from it (on the next step's batch, which
          # that step then takes) and its params and moments must be finite.
          next_batch = mesh_lib.global_batch(next(batches), mesh)
          save_pending = not finite.checkpoint_ok(done, *checkpoint_check(state, next_batch))
          if not save_pending:
            writer.flush()  # metrics.jsonl holds every record up to the newest checkpoint (a bucket's lags)
            checkpointer.save(state, {**meta, 'step': done, 'data_position': done}, force=True)
          throughput.reset(done)
        if preempted:
          checkpointer.wait()
          saved = f'step {checkpointer.latest_step()}' if save_pending else f'step {done}'
          say(f'preempted (SIGTERM): saved {saved} in {checkpointer.directory}; rerun the same command to '
              'resume', flush=True)
          return last
  finally:
    watch.close()
    checkpointer.close()
    writer.close()
  say(f'done: step {t.steps}; checkpoints in {checkpointer.directory}', flush=True)
  return last


def _jitted_steps(setup, tx, schedule, microbatches: int, objective, mesh, forward_graphdef):
  """(train step, checkpoint check, eval step) of a run, jitted with their shardings; the last two run
  `forward_graphdef` (the same params)."""
  state_shardings = state_lib.state_shardings(setup, tx)
  train_step = step_lib.jit_train_step(step_lib.make_train_step(setup.graphdef, tx, schedule, microbatches,
                                                                objective), state_shardings, mesh, objective)
  checkpoint_check = step_lib.jit_checkpoint_check(
      step_lib.make_checkpoint_check(forward_graphdef, microbatches, objective), state_shardings, mesh, objective)
  eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(forward_graphdef, objective), setup.param_shardings,
                                     mesh, objective)
  return train_step, checkpoint_check, eval_step


def _checked_checkpointer(config, workdir: str, say) -> ckpt_lib.Checkpointer:
  """Adopts an `init_from` export's model, checks the config, and opens the run's checkpoints (refusing ones of
  another model shape)."""
  init_from = config.get('init_from', '')
  if init_from:
    adopt_export_model(config, init_from, say)
  check_config(config)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                      directory=config.checkpoint.get('directory', ''))
  _, saved = checkpointer.newest_readable_meta()
  if saved is not None:
    ckpt_lib.check_compatible(saved['config'], config.model, config.tokenizer.vocab_size, workdir)
  if saved is not None and 'corpus' in saved:  # checkpoints written before corpus identities resume unchecked
    _corpora(config).check_same_corpus(saved['corpus'], config.data, workdir)
  return checkpointer


def _corpora(config):
  """What identifies and checks the run's corpus: data/corpora.py, or an image family's own (mae, simclr)."""
  family = families.family_for(config.model)
  return family if getattr(family, 'corpus_identity', None) else corpora


def _corpus_and_tokenizer(config, workdir: str, is_main: bool):
  """(corpus splits, tokenizer, vocabulary size): process 0 trains the tokenizer (or copies the export's); the
  others wait for it, then load the same file."""
  init_from = config.get('init_from', '')
  # An image family (mae, simclr) loads its own corpus and reads no tokenizer.
  load_sources = getattr(families.family_for(config.model), 'load_sources', None)
  load = load_sources or (lambda c: corpora.load_configured(c.data, seed=c.train.seed))
  # A bucket has no file locks: there process 0 prepares an unprepared corpus and the others open it after.
  remote = storage.is_remote(config.data.data_dir or corpora.default_data_dir())
  if is_main or not remote or jax.process_count() == 1:
    sources = load(config)
  if remote and jax.process_count() > 1:
    multihost_utils.sync_global_devices('corpus prepared')
    if not is_main:
      sources = load(config)
  if load_sources is not None:
    return sources, None, 0
  if init_from:
    tokenizer = adopt_export_tokenizer(init_from, workdir, is_main)
  else:
    tokenizer = tokenizers.get_or_train_tokenizer(
        workdir, lambda: corpora.sample_sentences(sources['train'], limit=config.tokenizer.sample_sentences,
                                                  seed=config.train.seed),
        config.tokenizer, process_index=jax.process_index())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('tokenizer ready')
    tokenizer = tokenizers.load_tokenizer(workdir)
  return sources, tokenizer, config.tokenizer.vocab_size if init_from else tokenizer.vocab_size


def _mesh(config):
  """The device mesh; UserError when a (micro)batch does not split over its data*fsdp axes."""
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  t = config.train
  if t.batch_size % mesh_lib.batch_divisor(mesh) or (t.batch_size // t.microbatches) % mesh_lib.batch_divisor(mesh):
    raise UserError(f'train.batch_size={t.batch_size} (per microbatch {t.batch_size // t.microbatches}) must be a '
                    f'multiple of the data*fsdp mesh size {mesh_lib.batch_divisor(mesh)}: change '
                    '--config.train.batch_size or --config.mesh.shape')
  return mesh


def _restore_or_init(config, setup, tx, checkpointer, say):
  """(start step, train state, resumed): the newest good checkpoint, or a new state born sharded."""
  latest, state = checkpointer.restore_newest_good(state_lib.abstract_state(setup, tx), say)
  if latest is not None:
    return int(jax.device_get(state['step'])), state, True
  # A new run starts from the export's params when init_from names one (a resumed run ignores it: its own
  # checkpoint is newer); the optimizer state is always fresh.
  init_from = config.get('init_from', '')
  params = ckpt_lib.load_export_params(init_from, setup.abstract_params) if init_from else None
  return 0, state_lib.init_state(setup, tx, params), False


def _compute_note(model_cfg, compute_note: str, seq_len: int) -> str:
  """The compute settings that change speed and memory, for the banner ('' for a family without them);
  `compute_note` is what precision says of the dtype and remat."""
  shown = [compute_note] if compute_note else []
  notes = (layers.describe_layer_loop(model_cfg), fused_attention.describe(model_cfg, seq_len))
  shown += [note for note in notes if note]
  return ', '.join(shown) + ' | ' if shown else ''


def _announce(config, workdir, state, vocab_size, mesh, start, resumed, say, compute_note: str) -> None:
  """The run's one-line banner."""
  t, init_from = config.train, config.get('init_from', '')
  n_params = state_lib.param_count(state['params'])
  say(f'jaxssl pretrain: {config.model.name} {config.get("variant", "")} | {n_params / 1e6:.2f}M params | '
      f'vocab {vocab_size} | mesh {dict(mesh.shape)} over {jax.device_count()} devices, '
      f'{jax.process_count()} process(es) | batch {t.batch_size} x {config.data.seq_len} | '
      f'{_compute_note(config.model, compute_note, config.data.seq_len)}'
      f'{"resuming from step " + str(start) if resumed else "starting at step 0"}'
      f'{" from " + init_from if init_from and not resumed else ""} → {t.steps}, a checkpoint every '
      f'{config.checkpoint.every_steps} steps | '
      f'workdir {workdir}', flush=True)


class HeldOut:
  """The fixed held-out batches (and per language, for a multilingual corpus: metrics eval_<tag>_*) with what
  the family adds to their metrics (words predicted, baselines)."""

  def __init__(self, family, sources, tokenizer, config, where: dict):
    self.objective = family.objective
    self.sets = {}  # '' (overall) or a language tag -> (batches, words, extra metrics)
    for lang, source in [('', sources['validation']), *sources.get('validation_by_language', {}).items()]:
      batches = family.eval_batches(source, tokenizer, config, **where)
      self.sets[lang] = (batches, *family.eval_context(batches, tokenizer))

  def evaluate(self, eval_step, params, mesh, step: int, writer) -> dict:
    """Evaluates every set, logs and writes the metrics; returns them as eval_* keys."""
    result = {}
    for lang, (batches, words, extra) in self.sets.items():
      metrics = {**evaluate(eval_step, params, batches, mesh, self.objective, words), **extra}
      writer.log(f'eval{" " + lang if lang else ""} at step {step}: ' +
                 ' '.join(f'{k}={v:.4g}' for k, v in metrics.items()))
      result.update({f'{lang}_{k}' if lang else k: v for k, v in metrics.items()})
    writer.write(step, result, prefix='eval_')
    return {'eval_' + k: v for k, v in result.items()}

"""The fine-tuning loop: exported body + a task kind's new head → train on labelled data → dev metrics → export.

Same machinery as pretraining (mesh, sharded state, orbax checkpoints, metrics.jsonl); the batch at step s is a
pure function of (seed, s), so a rerun resumes exactly. The best dev checkpoint by `task.best_metric` is
exported to `DIR/export` (params + config.json with the task and its labels + tokenizer). DIR, `init_from` and
the task files may be local or in a bucket (gs://...). Everything that depends on the task kind comes from
`jaxssl.tasks`.
"""
import copy
import dataclasses
import functools
import json

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl import storage
from jaxssl import tasks
from jaxssl.data import tokenizers
from jaxssl.errors import UserError
from jaxssl.families import build_model, family_for, reads_text
from jaxssl.models import fused_attention, precision, vocab
from jaxssl.tasks.model import TaskModel, task_loss
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import layer_loop
from jaxssl.train import length_buckets
from jaxssl.train import metrics as writer_lib
from jaxssl.train import nonfinite
from jaxssl.train import packing
from jaxssl.train import predict as predict_lib
from jaxssl.train import preemption
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Rows of global batch `step`: a fresh permutation of the training set each epoch, a function of (seed, step)."""
  g = step * batch_size + np.arange(batch_size)
  epochs, positions = g // num_examples, g % num_examples
  return np.array([_epoch_order(seed, int(e), num_examples)[p] for e, p in zip(epochs, positions)])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached: every step of an epoch (and the layer-loop plan's look ahead) reads the same permutation.
  return np.random.default_rng([seed, 2, epoch]).permutation(num_examples)


def task_model_setup(model_cfg, vocab_size: int, kind: str, num_labels: int, mesh, seed: int = 0,
                     classifier_dropout: float | None = None) -> state_lib.ModelSetup:
  """`state_lib.setup_module` of the body named by `model_cfg` with the head of task kind `kind`."""
  def build(rngs):
    body = build_model(model_cfg, vocab_size, rngs=rngs)
    if not hasattr(body, 'encode'):
      raise UserError(f'model.name={model_cfg.get("name")!r} has no encoder output for fine-tuning heads; '
                      'use an encoder model such as bert')
    return TaskModel(body, kind=kind, num_labels=num_labels, rngs=rngs, classifier_dropout=classifier_dropout)
  return state_lib.setup_module(build, mesh, seed)


def check_config(config) -> None:
  """UserError for a fine-tune config that cannot run (before anything is read)."""
  t = config.task
  if not config.init_from:
    raise UserError('no pre-trained params: pass --config.init_from=PARAMS (from python -m jaxssl.export)')
  tasks.get(t.kind)
  if not t.train or not t.dev:
    raise UserError('set the task files: --config.task.train=PATH --config.task.dev=PATH' if not t.get('tfds') else
                    f'set the splits of {t.tfds}: --config.task.train=SPLIT --config.task.dev=SPLIT')
  if config.train.steps <= 0 or config.train.batch_size <= 0:
    raise UserError('train.steps and train.batch_size must be positive: fix them with --config.train.*')
  length_buckets.bucket_lengths(config.data.get('length_buckets', 'none'), config.data.seq_len)  # checked early
  packing.check_setting(config.data.get('packing', 'none'))
  precision.check_setting(config.model.get('dtype', 'auto'))
  if config.train.batch_size % jax.process_count():
    raise UserError(f'train.batch_size={config.train.batch_size} must be a multiple of the process count')
  for key in ('log', 'eval', 'checkpoint'):
    if config[key].every_steps <= 0:
      raise UserError(f'{key}.every_steps={config[key].every_steps} must be positive (a value above train.steps '
                      f'acts only at the end): fix it with --config.{key}.every_steps=N')


@dataclasses.dataclass
class Body:
  """The pre-trained export fine-tuning starts from."""
  saved: dict          # its config.json
  tokenizer: object
  vocab_size: int      # embedding rows (may exceed the tokenizer's ids: a padded vocabulary)
  model_cfg: ml_collections.ConfigDict


def load_body(config) -> Body:
  """Reads `init_from` (a pretraining export or an imported checkpoint); UserError for a fine-tuned export, a
  tokenizer with more ids than embedding rows, or a seq_len past the model's positions."""
  saved = ckpt_lib.read_export_config(config.init_from)
  if 'task' in saved:
    raise UserError(f'{config.init_from} is a fine-tuned export ({saved["task"]["name"]}): start from a pretraining '
                    'export (python -m jaxssl.export) or an imported checkpoint (python -m jaxssl.convert from-hf)')
  model_cfg = ml_collections.ConfigDict(saved['model'])
  if not reads_text(model_cfg):  # an image or audio body: no tokenizer, no token positions
    return Body(saved, None, saved['vocab_size'], model_cfg)
  tokenizer = tokenizers.load_tokenizer(config.init_from)
  vocab.check_rows(tokenizer.vocab_size, saved['vocab_size'], config.init_from)
  if config.data.seq_len > model_cfg.max_position:
    raise UserError(f'data.seq_len={config.data.seq_len} exceeds the model\'s max_position={model_cfg.max_position}: '
                    'lower --config.data.seq_len')
  return Body(saved, tokenizer, saved['vocab_size'], model_cfg)


@dataclasses.dataclass
class TaskData:
  """A task's examples as the loop uses them."""
  kind: tasks.TaskKind
  labels: list
  num_labels: int
  num_train_examples: int
  train_features: dict
  dev_examples: list
  dev_features: dict
  dev_info: object     # the kind's decode info for the dev features (QA windows), or None


def prepare_task(task_cfg, tokenizer, seq_len: int) -> TaskData:
  """Reads and featurizes both splits; writes the settings decided from the data (e.g. the tag scheme) and the
  resolved `best_metric` into `task_cfg`."""
  kind = tasks.get(task_cfg.kind)
  train_examples, names = tasks.read_split(task_cfg, task_cfg.train)
  dev_examples, _ = tasks.read_split(task_cfg, task_cfg.dev)
  labels = names if names is not None else kind.label_set(train_examples)
  kind.settle_config(task_cfg, train_examples, dev_examples)
  task_cfg.best_metric = tasks.resolve_best_metric(task_cfg, labels)
  num_labels = kind.num_labels(labels, task_cfg.train)
  train_features, _ = kind.featurize(task_cfg, train_examples, tokenizer, seq_len, labels)
  dev_features, dev_info = kind.featurize(task_cfg, dev_examples, tokenizer, seq_len, labels)
  return TaskData(kind, labels, num_labels, len(train_examples), train_features, dev_examples, dev_features, dev_info)


def frozen_body_params(model_cfg):
  """The params fine-tuning leaves as pretrained (a path predicate for the optimizer), or None."""
  return family_for(model_cfg).frozen_in_finetuning(model_cfg)


def check_resumable(checkpointer, workdir: str, data: TaskData, body: Body) -> None:
  """UserError when `workdir` holds a fine-tuning run of another task or another body."""
  _, meta = checkpointer.newest_readable_meta()
  if meta is None:
    return
  if meta.get('num_labels') != data.num_labels or meta['config']['task']['kind'] != data.kind.name:
    raise UserError(f'{workdir} holds a fine-tuning run of another task: use a new --workdir')
  if 'model' in meta:  # a body of another size or vocabulary cannot resume here
    ckpt_lib.check_compatible({'model': meta['model'], 'tokenizer': {'vocab_size': meta['vocab_size']}},
                              body.model_cfg, body.vocab_size, workdir)


def restore_or_init(checkpointer, setup, tx, init_from: str, say, workdir: str):
  """(state, best, dev_pending): the newest good checkpoint, else the export's body + a fresh head. A checkpoint
  saved before its dev evaluation is pending unless DevEvaluation's record says that evaluation finished."""
  latest, state = checkpointer.restore_newest_good(state_lib.abstract_state(setup, tx), say)
  if latest is not None:
    meta = checkpointer.read_meta(latest)
    try:
      finished = json.loads(storage.read_text(storage.join(workdir, DEV_DONE)))
    except (OSError, ValueError):  # none yet (or cut short): the evaluation runs again
      finished = {}
    if meta.get('dev_pending') == latest and finished.get('step') == latest:
      return state, finished['best'], False
    return state, meta['best'], meta.get('dev_pending') == latest
  if jax.process_index() == 0:  # a record left by checkpoints since deleted is not this run's
    storage.remove(storage.join(workdir, DEV_DONE), missing_ok=True)
  # The body comes from the export; the head is freshly initialised.
  params = {**state_lib.init_params(setup, only='head'),
            'body': ckpt_lib.load_export_params(init_from, setup.abstract_params['body'])}
  return state_lib.init_state(setup, tx, params), {'value': -np.inf, 'step': 0, 'metrics': {}}, False


def make_train_step(setup, tx, schedule, kind, mesh, features: dict, packed: bool = False, check_graphdef=None):
  """(jitted `train_step(state, batch) -> (state, metrics)`, jitted `checkpoint_check(state, batch) -> (loss,
  finite)`, the feature keys a batch holds). `packed`: batches come from packing.pack. `check_graphdef`: the
  model the check runs (the same params; layer_loop.forward_config's loop), by default the step's.

  The check is what a checkpoint of `state` must pass before it is saved: the loss the next step computes from it
  on `batch` (the next step's batch and dropout key; forward only) and whether its params and moments are finite.
  """
  model_keys = [*kind.model_inputs, *(packing.PACKED_INPUTS if packed else ())]

  def loss_fn(params, batch, key, graphdef=setup.graphdef):
    model = nnx.merge(graphdef, params)
    outputs = model(*(batch[k] for k in kind.input_keys), dropout_rng=key, **{k: batch[k] for k in model_keys})
    return task_loss(kind.name, outputs, batch)[0]

  def step_key(state):
    return jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])

  def checkpoint_check(state, batch):
    loss = loss_fn(state['params'], batch, step_key(state), check_graphdef or setup.graphdef)
    return loss, step_lib.all_finite((state['params'], state['opt_state']))

  def train_step(state, batch):
    key = step_key(state)
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {**state, 'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
                 'step': state['step'] + 1}
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state['step'])}

  batch_keys = [*kind.input_keys, *model_keys, *kind.label_keys]
  shardings = state_lib.state_shardings(setup, tx)
  batch_shardings = {k: mesh_lib.batch_sharding(mesh, features[k].ndim if k in features else packing.NDIMS[k])
                     for k in batch_keys}
  replicated = NamedSharding(mesh, P())
  step = jax.jit(train_step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated),
                 donate_argnums=0)
  check = jax.jit(checkpoint_check, in_shardings=(shardings, batch_shardings), out_shardings=(replicated, replicated))
  return step, check, batch_keys


# In the workdir: {'step', 'best'} of the last dev evaluation that finished (its checkpoint was saved before it).
DEV_DONE = 'dev_done.json'


class DevEvaluation:
  """Dev metrics at a step into metrics.jsonl, and the export of params that beat the best so far."""

  def __init__(self, task_cfg, data: TaskData, predict, writer, workdir: str, export_config: dict, tokenizer):
    self.task_cfg, self.data, self.predict, self.writer = task_cfg, data, predict, writer
    self.workdir, self.export_config, self.tokenizer = workdir, export_config, tokenizer

  def __call__(self, step: int, params, best: dict) -> dict:
    """Evaluates `params` (trained to `step`); returns the new best."""
    d, metric = self.data, self.task_cfg.best_metric
    outputs = self.predict(params, d.dev_features)
    result = d.kind.dev_metrics(self.task_cfg, d.labels, outputs, d.dev_features, d.dev_examples, d.dev_info)
    if result[metric] > best['value']:
      best = {'value': float(result[metric]), 'step': step, 'metrics': result}
      config_json = json.dumps({**self.export_config, 'best': best}, indent=2, sort_keys=True)
      ckpt_lib.write_export(storage.join(self.workdir, 'export'), params, config_json, self.tokenizer, overwrite=True)
    self.writer.drop(step, prefix='dev_')  # a rerun of a pending evaluation replaces the row it may have written
    self.writer.write(step, result, prefix='dev_')
    self.writer.flush()  # in a bucket rows wait up to 5 s: the row must be there before DEV_DONE says it is
    self.writer.log(f'dev at step {step}: ' + ' '.join(f'{k}={v:.4f}' for k, v in result.items()))
    if jax.process_index() == 0:  # a rerun resuming from this step's checkpoint need not evaluate it again
      storage.write_text(storage.join(self.workdir, DEV_DONE), json.dumps({'step': step, 'best': best}))
    return best


def banner(config, body: Body, data: TaskData, mesh, start: int, workdir: str, buckets: tuple,
           packed: bool = False, loop_note: str = '', dev_lengths: tuple = (), dtype_note: str = '') -> str:
  """The run's first line; `buckets` () for inputs without lengths to cut (images, audio); `dev_lengths` those of
  dev batches when they differ; `loop_note` what layer_loop.finetune_configs says of the layer loop, `dtype_note`
  what precision.compute_dtype says of the compute dtype."""
  task, t = config.task, config.train
  lengths = length_buckets.describe(buckets) if buckets else ''
  dev = length_buckets.describe(dev_lengths) if buckets and dev_lengths else lengths
  padding = (f'training examples packed into rows of {config.data.seq_len}, dev batches padded to {dev} | '
             if packed else f'batches padded to {lengths}{f" (dev: {dev})" if dev != lengths else ""} | '
             if len(buckets) > 1 or dev != lengths else '')
  notes = [n for n in (dtype_note, loop_note, fused_attention.describe(body.model_cfg)) if n]
  padding += ''.join(f'{n} | ' for n in notes)
  return (f'jaxssl finetune: {task.name} ({task.kind}, {data.num_labels} label(s)) | body from {config.init_from} | '
          f'{data.num_train_examples} train / {len(data.dev_examples)} dev examples | {data.kind.describe(task)}'
          f'best by dev {task.best_metric} | {padding}mesh {dict(mesh.shape)} | '
          f'{"resuming from step " + str(start) if start else "starting"} → {t.steps} | workdir {workdir}')


def run_finetuning(config, workdir: str) -> dict:
  """Fine-tunes to `train.steps` (resuming from DIR's checkpoints); returns the best dev metrics.

  At each eval step the checkpoint is saved before the dev metrics run, marked `dev_pending`; a rerun resuming
  from it runs that evaluation first, so a failing metric or a kill during evaluation loses no training.
  """
  check_config(config)
  config = copy.deepcopy(config)  # the resolved task.tag_scheme / best_metric are written into this copy
  t, task = config.train, config.task
  body = load_body(config)
  tasks.get(task.kind).settle_body(task, body.model_cfg)
  body.model_cfg.dtype, dtype_note = precision.compute_dtype(config.model.get('dtype', 'auto'), body.model_cfg.name)
  data = prepare_task(task, body.tokenizer, config.data.seq_len)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  if t.batch_size % mesh_lib.batch_divisor(mesh):
    raise UserError(f'train.batch_size={t.batch_size} must be a multiple of the data*fsdp mesh size '
                    f'{mesh_lib.batch_divisor(mesh)}')
  seq_len = config.data.seq_len
  buckets = length_buckets.bucket_lengths(config.data.get('length_buckets', 'none'), seq_len)
  lengths = length_buckets.real_lengths(data.train_features)
  packed = lengths is not None and packing.packs(config.data.get('packing', 'none'), data.kind, body.model_cfg)
  row_multiple = packing.row_multiple(t.batch_size, mesh_lib.batch_divisor(mesh), jax.process_count())

  @functools.lru_cache(maxsize=layer_loop.SAMPLE_STEPS)
  def rows_needed(step):  # first-fit rows of step's packed batch, before rounding
    return packing.rows_needed(lengths[batch_indices(step, t.batch_size, data.num_train_examples, t.seed)], seq_len)

  # The first steps whose shapes choose the row multiple and the layer loop (first-fit is ~4 us an example).
  sampled = min(t.steps, layer_loop.SAMPLE_STEPS, max(1, packing.SAMPLE_EXAMPLES // t.batch_size))
  row_counts = ()
  if packed:  # few train-step shapes: on CPU those whose padding saved pays for their compile
    step_worth = length_buckets.compile_worth(body.model_cfg, body.vocab_size, seq_len, 1, training=True)
    row_counts = packing.row_counts(map(rows_needed, range(sampled)), row_multiple, t.steps, seq_len, step_worth)

  def shape_at(step):  # the shape of step's batch: its packed row count or its length bucket
    if packed:
      return packing.row_count(rows_needed(step), row_counts, row_multiple)
    return length_buckets.batch_length(lengths, batch_indices(step, t.batch_size, data.num_train_examples, t.seed),
                                       buckets)

  train_cfg, forward_cfg, loop_note = layer_loop.finetune_configs(body.model_cfg, t.steps, shape_at, sampled)
  setup, forward_setup = (task_model_setup(c, body.vocab_size, task.kind, data.num_labels, mesh, t.seed,
                                           config.model.classifier_dropout) for c in (train_cfg, forward_cfg))
  tx, schedule = state_lib.make_optimizer(t, frozen_body_params(body.model_cfg)), state_lib.make_schedule(t)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                      directory=config.checkpoint.get('directory', ''))
  check_resumable(checkpointer, workdir, data, body)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  state, best, dev_pending = restore_or_init(checkpointer, setup, tx, config.init_from, say, workdir)
  start = int(jax.device_get(state['step']))
  dev_lengths = length_buckets.eval_lengths(config.data.get('length_buckets', 'none'), seq_len)
  say(banner(config, body, data, mesh, start, workdir, buckets if lengths is not None else (), packed, loop_note,
             dev_lengths, dtype_note), flush=True)
  train_step, checkpoint_check, batch_keys = make_train_step(setup, tx, schedule, data.kind, mesh,
                                                             data.train_features, packed, forward_setup.graphdef)

  def batch_at(step):  # the global batch of `step`: a function of (seed, step), packed or cut to its length bucket
    rows = batch_indices(step, t.batch_size, data.num_train_examples, t.seed)
    if packed:  # every process packs the whole batch the same way and feeds its share
      whole = packing.pack(data.train_features, rows, lengths, seq_len, shape_at(step), batch_keys)
      return mesh_lib.global_batch(packing.share(whole, jax.process_index(), jax.process_count()), mesh)
    length = length_buckets.batch_length(lengths, rows, buckets)
    local = {k: data.train_features[k][predict_lib.local_rows(rows)] for k in batch_keys}
    return mesh_lib.global_batch(length_buckets.cut(local, length, seq_len), mesh)

  writer = writer_lib.MetricsWriter(workdir, resume_step=start, total_steps=t.steps)
  run_config = json.loads(config_lib.to_json(config))
  # The export computes as the run did (the evaluate job then reproduces the dev metrics); its params are float32.
  export_config = {**body.saved, 'model': {**body.saved['model'], 'dtype': body.model_cfg.dtype},
                   'finetune': run_config, 'task': {
      'name': task.name, 'kind': task.kind, 'labels': data.labels, 'num_labels': data.num_labels}}
  evaluations = len({*range(config.eval.every_steps, t.steps + 1, config.eval.every_steps), t.steps})
  dev_worth = (length_buckets.compile_worth(forward_cfg, body.vocab_size, seq_len, evaluations)
               if lengths is not None else 0.0)
  predict = predict_lib.make_predictor(forward_setup, mesh, data.dev_features, config.eval.batch_size, data.kind,
                                       dev_lengths, dev_worth)
  evaluate = DevEvaluation(task, data, predict, writer, workdir, export_config, body.tokenizer)
  watch = preemption.PreemptionWatch()
  finite = nonfinite.FiniteLossCheck(t.get('nonfinite', 'stop'), t.get('max_skipped_steps', 10), checkpointer,
                                     writer)

  def save(state, done, metrics, best, evaluating) -> bool:
    """Saves the state after step `done` unless it, or the loss the next step computes from it, is non-finite."""
    finite.check(done, metrics)
    if not finite.checkpoint_ok(done, *checkpoint_check(state, batch_at(done))):
      return False
    checkpointer.save(state, {'config': run_config, 'step': done, 'num_labels': data.num_labels, 'best': best,
                              'model': body.saved['model'], 'vocab_size': body.vocab_size,
                              'dev_pending': done if evaluating else None}, force=True)
    return True

  try:
    with jax.set_mesh(mesh):
      if dev_pending:  # the checkpoint was saved just before its dev evaluation, which did not finish
        best = evaluate(start, state['params'], best)
      previous, save_pending = None, False
      for step in range(start, t.steps):
        state, step_metrics = train_step(state, batch_at(step))
        done = step + 1
        if previous is not None:  # the step before is finished by now: reading its loss stalls nothing
          finite.check(*previous)
        previous = (done, step_metrics)
        if done % config.log.every_steps == 0 or done == t.steps:
          logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          writer.write(done, logged)
          writer.progress(done, logged)
        evaluating = done % config.eval.every_steps == 0 or done == t.steps
        preempted = watch.stop_at(done)
        # Saved before the dev metrics run: whatever they do, the trained state is on disk.
        if evaluating or done % config.checkpoint.every_steps == 0 or preempted or save_pending:
          save_pending = not save(state, done, step_metrics, best, evaluating)
        if preempted:  # the dev evaluation of this step, if any, runs when the rerun resumes here
          checkpointer.wait()
          say(f'preempted (SIGTERM): saved step {checkpointer.latest_step()}; rerun the same command to resume',
              flush=True)
          return best
        if evaluating:
          best = evaluate(done, state['params'], best)
  finally:
    watch.close()
    checkpointer.close()
    writer.close()
  say(f'best dev {task.best_metric}={best["value"]:.4f} at step {best["step"]}; exported to '
      f'{storage.join(workdir, "export")}', flush=True)
  return best

"""The fine-tuning loop: exported body + new head → train on a labelled task → dev metrics → best export.

Same machinery as pretraining (mesh, sharded state, orbax checkpoints, metrics.jsonl); the batch at step s is a
pure function of (seed, s), so a rerun resumes exactly. The best dev checkpoint by `task.best_metric` is
exported to `DIR/export` (params + config.json with the task and its labels + tokenizer).
"""
import copy
import json
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl.data import tasks, tokenizers
from jaxssl.errors import UserError
from jaxssl.eval import metrics as metrics_lib
from jaxssl.models import heads, vocab
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import metrics as writer_lib
from jaxssl.train import preemption
from jaxssl.train import state as state_lib

FEATURE_KEYS = ('input_ids', 'token_type_ids', 'attention_mask')


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> np.ndarray:
  """Rows of global batch `step`: a fresh permutation of the training set each epoch, a function of (seed, step)."""
  g = step * batch_size + np.arange(batch_size)
  epochs, positions = g // num_examples, g % num_examples
  perms = {e: np.random.default_rng([seed, 2, e]).permutation(num_examples) for e in np.unique(epochs)}
  return np.array([perms[e][p] for e, p in zip(epochs, positions)])


def local_rows(global_rows: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch's rows."""
  per_process = len(global_rows) // jax.process_count()
  return global_rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]


def dev_metric_names(task_cfg, labels) -> tuple[str, ...]:
  """The names `dev_metrics` reports for this task (its `tag_scheme` resolved, see `resolve_tag_scheme`)."""
  kind = task_cfg.kind
  if kind == 'qa':
    return ('exact_match', 'f1')
  if kind == 'regression':
    return ('pearson', 'spearman')
  if kind == 'tagging':
    spans = ('precision', 'recall', 'f1') if _span_scheme(task_cfg, labels) else ()
    return ('token_accuracy', *spans)
  if task_cfg.name in metrics_lib.GLUE_TASKS:
    return metrics_lib.GLUE_TASKS[task_cfg.name]
  return ('accuracy', 'f1') if len(labels) == 2 else ('accuracy',)


def _span_scheme(task_cfg, labels) -> str | None:
  """The task's span scheme, or None. Fine-tune runs store the one decided from the training tags in
  `task.tag_scheme` ('none' when there is none); an export written before that was stored is read from its tags."""
  scheme = task_cfg.get('tag_scheme', '')
  if scheme:
    return None if scheme == 'none' else scheme
  return metrics_lib.span_scheme([list(labels)])


def dev_metrics(task_cfg, labels, outputs, features, examples, qa_infos=None) -> dict:
  """The task's metrics on the dev set from the model's outputs (host numpy); the names of `dev_metric_names`."""
  kind = task_cfg.kind
  if kind == 'qa':
    start_logits, end_logits = outputs
    predictions = tasks.qa_predictions(examples, qa_infos, start_logits, end_logits, task_cfg.max_answer_length)
    answers = {e.qid: [text for text, _ in e.answers] for e in examples}
    # Official SQuAD figures are percentages; reported here in [0, 1] like every other dev metric.
    return {k: v / 100.0 for k, v in metrics_lib.squad_metrics(predictions, answers).items()}
  if kind == 'regression':
    preds, gold = np.asarray(outputs), features['labels']
    return {'pearson': metrics_lib.pearson(preds, gold), 'spearman': metrics_lib.spearman(preds, gold)}
  if kind == 'tagging':
    predicted = tasks.word_predictions(labels, np.argmax(outputs, -1), features, examples)
    return metrics_lib.tagging_metrics(predicted, [e.tags for e in examples], _span_scheme(task_cfg, labels))
  preds, gold = np.argmax(outputs, -1), features['labels']
  glue_name = task_cfg.name if task_cfg.name in metrics_lib.GLUE_TASKS else None
  if glue_name:
    # GLUE metrics compare label ids; dev labels unseen in training (-1) never match.
    return metrics_lib.glue_task_metrics(glue_name, preds, gold)
  result = {'accuracy': metrics_lib.accuracy(preds, gold)}
  if len(labels) == 2:
    result['f1'] = metrics_lib.f1_binary(preds, gold)
  return result


_SCHEME_NAMES = {'bio': 'BIO', 'iob2': 'BIO', 'iob1': 'IOB1', 'iobes': 'IOBES', 'none': 'none'}


def resolve_tag_scheme(task_cfg, train_examples, dev_examples) -> str:
  """'BIO', 'IOB1', 'IOBES' or 'none': `task.tag_scheme` when set, else decided from the training tags
  (`metrics.span_scheme`). Raises UserError for an unknown name, or tags (training or dev) that the span
  scheme cannot decode."""
  wanted = task_cfg.get('tag_scheme', '')
  if wanted is None:  # --config.task.tag_scheme=none parses as None
    wanted = 'none'
  if wanted and wanted.lower() not in _SCHEME_NAMES:
    raise UserError(f'task.tag_scheme={wanted!r}: use BIO, IOB1, IOBES, none, or leave it empty to decide from the '
                    'training tags')
  train_tags = [e.tags for e in train_examples]
  scheme = _SCHEME_NAMES[wanted.lower()] if wanted else metrics_lib.span_scheme(train_tags) or 'none'
  if scheme == 'none':
    return scheme
  for split, examples in ((task_cfg.train, train_examples), (task_cfg.dev, dev_examples)):
    bad = next((t for e in examples for t in e.tags if not metrics_lib.is_span_tag(t)), None)
    if bad is not None:
      raise UserError(f'{split}: tag {bad!r} is not a {scheme} span tag (O, or B-/I-/E-/S- and a type): fix the '
                      f'tags, or pass --config.task.tag_scheme=none to report token_accuracy only')
  return scheme


def resolve_best_metric(task_cfg, labels) -> str:
  """`task.best_metric` checked against the metrics the task reports; when empty, its default: f1 for QA and
  span tagging, token_accuracy for other tag sets, else the task's first metric."""
  names = dev_metric_names(task_cfg, labels)
  if not task_cfg.best_metric:
    return 'f1' if task_cfg.kind in ('qa', 'tagging') and 'f1' in names else names[0]
  if task_cfg.best_metric not in names:
    why = (' (the training tags are not a BIO, IOB1 or IOBES span scheme, so no span precision/recall/f1)'
           if task_cfg.kind == 'tagging' and 'f1' not in names else '')
    raise UserError(f'task.best_metric={task_cfg.best_metric!r} is not a dev metric of this task{why}: use one of '
                    f'{", ".join(names)}')
  return task_cfg.best_metric


def featurize_task(task_cfg, examples, tokenizer, seq_len: int, labels):
  """(features, QA window infos or None) for any task kind."""
  if task_cfg.kind == 'qa':
    return tasks.featurize_qa(examples, tokenizer, seq_len, max_query_length=task_cfg.max_query_length,
                              doc_stride=task_cfg.doc_stride)
  return tasks.featurize(task_cfg.kind, examples, tokenizer, seq_len, labels), None


def model_inputs(features: dict) -> list[str]:
  """The feature keys the task model reads (the rest are labels)."""
  return [k for k in features if k in FEATURE_KEYS or k == 'context_mask']


def make_predictor(setup, mesh, features: dict, batch_size: int):
  """`predict(params, features) -> outputs` over all rows (host numpy), in sharded batches on the mesh."""
  input_keys = model_inputs(features)

  def forward(params, batch):
    model = nnx.merge(setup.graphdef, params)
    return model(*(batch[k] for k in FEATURE_KEYS), context_mask=batch.get('context_mask'))

  shardings = {k: mesh_lib.batch_sharding(mesh, features[k].ndim) for k in input_keys}
  forward = jax.jit(forward, in_shardings=(setup.param_shardings, shardings))
  divisor = mesh_lib.batch_divisor(mesh)
  batch_size = max(batch_size - batch_size % divisor, divisor)

  def predict(params, rows_of: dict):
    n = len(rows_of['input_ids'])
    outputs = []
    for start_row in range(0, n, batch_size):
      rows = np.arange(start_row, start_row + batch_size) % n  # the last batch wraps; extra rows are dropped
      local = {k: rows_of[k][local_rows(rows)] for k in input_keys}
      with jax.set_mesh(mesh):
        out = forward(params, mesh_lib.global_batch(local, mesh))
      outputs.append(jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True)))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n], *outputs)

  return predict


def check_config(config) -> None:
  t = config.task
  if not config.init_from:
    raise UserError('no pre-trained params: pass --config.init_from=PARAMS (from python -m jaxssl.export)')
  if t.kind not in tasks.KINDS:
    raise UserError(f'task.kind={t.kind!r}: use one of {", ".join(tasks.KINDS)}')
  if not t.train or not t.dev:
    raise UserError('set the task files: --config.task.train=PATH --config.task.dev=PATH' if not t.get('tfds') else
                    f'set the splits of {t.tfds}: --config.task.train=SPLIT --config.task.dev=SPLIT')
  if config.train.steps <= 0 or config.train.batch_size <= 0:
    raise UserError('train.steps and train.batch_size must be positive: fix them with --config.train.*')
  if config.train.batch_size % jax.process_count():
    raise UserError(f'train.batch_size={config.train.batch_size} must be a multiple of the process count')


def run_finetuning(config, workdir: str) -> dict:
  """Fine-tunes to `train.steps` (resuming from DIR's checkpoints); returns the best dev metrics.

  At each eval step the checkpoint is saved before the dev metrics run, marked `dev_pending`; a rerun resuming
  from it runs that evaluation first, so a failing metric or a kill during evaluation loses no training.
  """
  check_config(config)
  config = copy.deepcopy(config)  # the resolved task.tag_scheme / best_metric are written into this copy
  t, task = config.train, config.task
  saved = ckpt_lib.read_export_config(config.init_from)
  if 'task' in saved:
    raise UserError(f'{config.init_from} is a fine-tuned export ({saved["task"]["name"]}): start from a pretraining '
                    'export (python -m jaxssl.export) or an imported checkpoint (python -m jaxssl.convert from-hf)')
  tokenizer = tokenizers.load_tokenizer(config.init_from)
  vocab_size = saved['vocab_size']
  vocab.check_rows(tokenizer.vocab_size, vocab_size, config.init_from)  # more rows than ids: a padded vocabulary
  model_cfg = ml_collections.ConfigDict(saved['model'])
  if config.data.seq_len > model_cfg.max_position:
    raise UserError(f'data.seq_len={config.data.seq_len} exceeds the model\'s max_position={model_cfg.max_position}: '
                    'lower --config.data.seq_len')
  train_examples, names = tasks.read_task_split(task, task.train)
  dev_examples, _ = tasks.read_task_split(task, task.dev)
  labels = names if names is not None else tasks.label_set(task.kind, train_examples)
  if task.kind == 'tagging':
    task.tag_scheme = resolve_tag_scheme(task, train_examples, dev_examples)
  task.best_metric = resolve_best_metric(task, labels)
  num_labels = {'regression': 1, 'qa': 2}.get(task.kind, len(labels))
  if task.kind in ('classification', 'pair') and num_labels < 2:
    raise UserError(f'{task.train} has a single label {labels}: a classifier needs at least two')
  train_features, _ = featurize_task(task, train_examples, tokenizer, config.data.seq_len, labels)
  dev_features, dev_infos = featurize_task(task, dev_examples, tokenizer, config.data.seq_len, labels)
  num_train = len(train_features['input_ids'])

  mesh = mesh_lib.make_mesh(config.mesh.shape)
  if t.batch_size % mesh_lib.batch_divisor(mesh):
    raise UserError(f'train.batch_size={t.batch_size} must be a multiple of the data*fsdp mesh size '
                    f'{mesh_lib.batch_divisor(mesh)}')
  setup = state_lib.setup_module(
      lambda rngs: heads.TaskModel(model_cfg, vocab_size, kind=task.kind, num_labels=num_labels, rngs=rngs,
                                   classifier_dropout=config.model.classifier_dropout), mesh, t.seed)
  frozen = None
  if model_cfg.name == 'elmo' and not model_cfg.get('finetune_bilm', False):
    # ELMo's paper setting: the biLM stays as pretrained; only its layer mix (ScalarMix) and the head learn.
    frozen = lambda path: path[0] == 'body' and 'scalar_mix' not in path  # noqa: E731
  tx, schedule = state_lib.make_optimizer(t, frozen), state_lib.make_schedule(t)
  shardings = state_lib.state_shardings(setup, tx)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save,
                                      directory=config.checkpoint.get('directory', ''))
  best = {'value': -np.inf, 'step': 0, 'metrics': {}}
  _, meta = checkpointer.newest_readable_meta()
  if meta is not None:
    if meta.get('num_labels') != num_labels or meta['config']['task']['kind'] != task.kind:
      raise UserError(f'{workdir} holds a fine-tuning run of another task: use a new --workdir')
    if 'model' in meta:  # a body of another size or vocabulary cannot resume here
      ckpt_lib.check_compatible({'model': meta['model'], 'tokenizer': {'vocab_size': meta['vocab_size']}},
                                model_cfg, vocab_size, workdir)
  say = print if jax.process_index() == 0 else (lambda *a, **k: None)
  latest, state = checkpointer.restore_newest_good(state_lib.abstract_state(setup, tx), say)
  dev_pending = False
  if latest is not None:
    latest_meta = checkpointer.read_meta(latest)
    best, dev_pending = latest_meta['best'], latest_meta.get('dev_pending') == latest
  else:
    params = state_lib.init_params(setup)
    # The body comes from the export; the head stays freshly initialised.
    params['body'] = ckpt_lib.load_export_params(config.init_from, setup.abstract_params['body'])
    state = state_lib.init_state(setup, tx, params)
  start = int(jax.device_get(state['step']))
  is_main = jax.process_index() == 0
  tag_note = ''
  if task.kind == 'tagging':
    tag_note = (f'tags {task.tag_scheme} (span precision/recall/f1 + token_accuracy) | ' if task.tag_scheme != 'none'
                else 'tags: no span scheme (BIO/IOB1/IOBES), token_accuracy only | ')
  if is_main:
    print(f'jaxssl finetune: {task.name} ({task.kind}, {num_labels} label(s)) | body from {config.init_from} | '
          f'{len(train_examples)} train / {len(dev_examples)} dev examples | {tag_note}'
          f'best by dev {task.best_metric} | mesh {dict(mesh.shape)} | '
          f'{"resuming from step " + str(start) if latest is not None else "starting"} → {t.steps} | '
          f'workdir {workdir}', flush=True)

  def loss_fn(params, batch, key):
    model = nnx.merge(setup.graphdef, params)
    outputs = model(*(batch[k] for k in FEATURE_KEYS), dropout_rng=key, context_mask=batch.get('context_mask'))
    loss, _ = heads.task_loss(task.kind, outputs, batch)
    return loss

  def train_step(state, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    loss, grads = jax.value_and_grad(loss_fn)(state['params'], batch, key)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {**state, 'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state,
                 'step': state['step'] + 1}
    return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'learning_rate': schedule(state['step'])}

  replicated = NamedSharding(mesh, P())
  batch_keys = model_inputs(train_features) + [k for k in train_features if k in ('labels', 'start_positions', 'end_positions')]
  batch_shardings = {k: mesh_lib.batch_sharding(mesh, train_features[k].ndim) for k in batch_keys}
  train_step = jax.jit(train_step, in_shardings=(shardings, batch_shardings), out_shardings=(shardings, replicated),
                       donate_argnums=0)
  predict = make_predictor(setup, mesh, dev_features, config.eval.batch_size)

  def evaluate(params) -> dict:
    return dev_metrics(task, labels, predict(params, dev_features), dev_features, dev_examples, dev_infos)

  writer = writer_lib.MetricsWriter(workdir, resume_step=start, total_steps=t.steps)
  export_config = {**saved, 'task': {'name': task.name, 'kind': task.kind, 'labels': labels,
                                     'num_labels': num_labels},
                   'finetune': json.loads(config_lib.to_json(config))}
  watch = preemption.PreemptionWatch()

  def save(state, done, best, evaluating):
    checkpointer.save(state, {'config': json.loads(config_lib.to_json(config)), 'step': done,
                              'num_labels': num_labels, 'best': best, 'model': saved['model'],
                              'vocab_size': vocab_size, 'dev_pending': done if evaluating else None}, force=True)

  def dev_evaluation(step, params, best) -> dict:
    """Dev metrics at `step` into metrics.jsonl; exports `params` when they beat `best`; returns the best."""
    result = evaluate(params)
    if result[task.best_metric] > best['value']:
      best = {'value': float(result[task.best_metric]), 'step': step, 'metrics': result}
      ckpt_lib.write_export(os.path.join(workdir, 'export'), params,
                            json.dumps({**export_config, 'best': best}, indent=2, sort_keys=True),
                            tokenizer, overwrite=True)
    writer.drop(step, prefix='dev_')  # a rerun of a pending evaluation replaces the row it may have written
    writer.write(step, result, prefix='dev_')
    writer.log(f'dev at step {step}: ' + ' '.join(f'{k}={v:.4f}' for k, v in result.items()))
    return best

  try:
    with jax.set_mesh(mesh):
      if dev_pending:  # the checkpoint was saved just before its dev evaluation, which did not finish
        best = dev_evaluation(start, state['params'], best)
      for step in range(start, t.steps):
        rows = local_rows(batch_indices(step, t.batch_size, num_train, t.seed))
        batch = mesh_lib.global_batch({k: train_features[k][rows] for k in batch_keys}, mesh)
        state, step_metrics = train_step(state, batch)
        done = step + 1
        if done % config.log.every_steps == 0 or done == t.steps:
          logged = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          writer.write(done, logged)
          writer.progress(done, logged)
        evaluating = done % config.eval.every_steps == 0 or done == t.steps
        preempted = watch.stop_at(done)
        # Saved before the dev metrics run: whatever they do, the trained state is on disk.
        if evaluating or done % config.checkpoint.every_steps == 0 or preempted:
          save(state, done, best, evaluating)
        if preempted:  # the dev evaluation of this step, if any, runs when the rerun resumes here
          say(f'preempted (SIGTERM): saved step {done}; rerun the same command to resume', flush=True)
          return best
        if evaluating:
          best = dev_evaluation(done, state['params'], best)
  finally:
    watch.close()
    checkpointer.close()
    writer.close()
  if is_main:
    print(f'best dev {task.best_metric}={best["value"]:.4f} at step {best["step"]}; exported to '
          f'{os.path.join(workdir, "export")}', flush=True)
  return best

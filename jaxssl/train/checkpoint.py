"""orbax checkpoints of the train state (restorable onto any mesh) and params-only exports.

A checkpoint step holds three items: `params`, `train` (optimizer state, step, RNG key) and `meta` (JSON: step,
data position, the full config, vocab size). Restores always pass a target carrying the *current* shardings, so a
checkpoint written on one mesh or process count resumes on another. An export is `params/` + `config.json` +
the tokenizer (`tokenizer.model` for sentencepiece, `tokenizer.json` for WordPiece): everything a fine-tune or
evaluate job needs, nothing of the optimizer.
"""
import contextlib
import gc
import json
import logging
import os
import sys
import threading
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxssl import paths
from jaxssl import storage
from jaxssl.data import tokenizers
from jaxssl.errors import JobFailed, UserError
from jaxssl.train.export_config import (  # noqa: F401  (their home before; callers still use ckpt_lib.NAME)
    FORMAT_VERSION, OLDEST_READABLE_FORMAT, check_format, describe_export, format_stamp, read_export_config)


class _WriterErrorsInOneLine(logging.Filter):
  """orbax logs every failed writer thread with its traceback, and asyncio each failed future nobody read: a full
  disk gives dozens of tracebacks. Each keeps its one-line message; the job's last line says what happened. Also
  drops orbax's three warnings that a manager opened read-only (export, evaluate) is read-only."""

  def filter(self, record: logging.LogRecord) -> bool:
    if str(record.msg).startswith(('CheckpointManagerOptions.read_only=True', 'Given directory is read only')):
      return False
    if record.exc_info and record.levelno >= logging.ERROR and (
        'orbax' in record.pathname or 'exception was never retrieved' in str(record.msg)):
      record.exc_info, record.exc_text = None, None
    return True


for _logger in ('absl', 'asyncio'):
  logging.getLogger(_logger).addFilter(_WriterErrorsInOneLine())


class Checkpointer:
  """Saves every `every_steps` (and when forced), keeps the newest `keep`, restores the newest."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True, read_only: bool = False,
               directory: str = ''):
    # `directory` may be a bucket (gs://...): orbax writes there through etils paths; default WORKDIR/checkpoints.
    # orbax refuses relative paths: made absolute here as well as in the jobs, for library callers.
    self.directory = storage.path(paths.absolute(directory or storage.join(workdir, 'checkpoints')))
    # cleanup_tmp_directories: a killed run leaves an unfinished step (a local tmp folder; in a bucket, where orbax
    # marks a finished step with commit_success.txt instead of a rename, a step folder without it). Its objects
    # would be overwritten in place when that step is saved again: removed when the manager opens instead.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=('params', 'train', 'meta'))
    self.writing = None  # the step being saved (for the message when its write fails)
    # orbax runs that cleanup in a thread and awaits it only in save(): a job that stops before its first save (a
    # bad corpus, say) would exit while it runs and print "cannot schedule new futures after interpreter shutdown".
    await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      await_cleanup()

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, state, meta: dict, *, force: bool = False) -> bool:
    """Starts saving `state` at `meta['step']` (in the background with async saves); JobFailed when this or the
    previous save cannot be written (a full disk, say): orbax wrote into a temporary folder, so every older
    checkpoint is intact."""
    step = int(meta['step'])
    if step in self.manager.all_steps():
      return False
    with self._writing():
      self.writing = step
      return self.manager.save(step, force=force, args=ocp.args.Composite(
          params=ocp.args.StandardSave(state['params']),
          train=ocp.args.StandardSave({k: state[k] for k in ('opt_state', 'step', 'rng')}),
          meta=ocp.args.JsonSave({**meta, **format_stamp()})))

  @contextlib.contextmanager
  def _writing(self):
    """Turns a failed checkpoint write (raised by orbax here or, for an async save, at the next save or wait)
    into one JobFailed line naming the step, the reason and the newest complete checkpoint."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (ENOSPC, quota, permissions, a bucket's 403: all alike)
      step, self.writing = self.writing, None
      self.manager.reload()
      complete = [s for s in self.manager.all_steps() if s != step]
      try:  # the background threads must end before the process does, or they die noisily at shutdown
        self.manager.close()
      except Exception:  # pylint: disable=broad-except  (the same failure again)
        pass
      # After a failure close() returns before all of orbax's writer threads have; their error logs would follow
      # (and bury) the job's last line.
      for thread in threading.enumerate():
        if thread is not threading.current_thread() and type(thread).__module__.startswith('orbax'):
          try:
            thread.join(timeout=30)
          except Exception:  # pylint: disable=broad-except  (orbax's join re-raises the thread's failure)
            pass
      gc.collect()  # asyncio reports the failed futures orbax never read when they are collected: now, not last
      reason = _first_line(e)
      fix = ('free space there (or lower --config.checkpoint.keep)' if reason == 'No space left on device' else
             'fix the cause')
      kept = f'the newest complete checkpoint is step {max(complete)}' if complete else 'no checkpoint is complete'
      raise JobFailed(f'could not write checkpoint {step} to {self.directory} ({reason}); {kept}, intact: {fix} '
                      'and rerun the same command to resume from it') from None

  def read_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(self, step: int, abstract_state) -> dict:
    """Restores the full train state onto the shardings that `abstract_state` carries."""
    train_target = {k: abstract_state[k] for k in ('opt_state', 'step', 'rng')}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state['params']),
        train=ocp.args.StandardRestore(train_target)))
    return {'params': restored['params'], **restored['train']}

  def newest_readable_meta(self):
    """(step, meta) of the newest checkpoint whose metadata reads, or (None, None); UserError when it was written
    in a format this jaxssl cannot read (named with both versions; nothing is moved)."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      ok, meta = _agree(lambda: self.read_meta(step))
      if ok:
        check_format(meta, f'checkpoint {step} in {self.directory}')
        return step, meta
    return None, None

  def restore_newest_good(self, abstract_state, say=print):
    """(step, state) of the newest checkpoint that restores completely, or (None, None) when there is none.

    A half-written or corrupted checkpoint (missing or damaged files) newer than a good one is reported and
    moved aside to `checkpoints/unreadable-STEP` for inspection; no checkpoint is ever deleted here. When no
    checkpoint restores at all, the config most likely differs from the one that wrote them: UserError, and
    nothing is moved. Every process takes the same decision (a failure on any process counts for all).
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      ok, meta = _agree(lambda: self.read_meta(step))
      if ok:  # a checkpoint of a newer jaxssl is not damaged: stop before it is set aside
        check_format(meta, f'checkpoint {step} in {self.directory}')
      ok, state = _agree(lambda: self.restore(step, abstract_state))
      if ok:
        for bad in failed:
          self._set_aside(bad, say)
        return step, state
      failed.append(step)
    if failed:
      raise UserError(f'no checkpoint in {self.directory} (steps {sorted(failed)}) restores with this config: '
                      'rerun with the config that wrote them, or use a new --workdir')
    return None, None

  def _set_aside(self, step: int, say) -> None:
    say(f'checkpoint {step} in {self.directory} is unreadable (half-written or corrupted) while an older one '
        f'restores: moved it to unreadable-{step}', flush=True)
    if jax.process_index() == 0:
      directory = os.fspath(self.directory)
      target, n = storage.join(directory, f'unreadable-{step}'), 1
      while storage.exists(target):
        target, n = storage.join(directory, f'unreadable-{step}.{n}'), n + 1
      storage.rename(storage.join(directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'set aside checkpoint {step}')
    self.manager.reload()

  def restore_params(self, step: int, abstract_params):
    return self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']

  def wait(self):
    with self._writing():
      self.manager.wait_until_finished()

  def close(self):
    with self._writing():
      self.manager.wait_until_finished()
    self.manager.close()


def _quiet_late_callbacks(excepthook):
  """`excepthook` without the tracebacks of callbacks scheduled onto a closed event loop: when a checkpoint write
  fails, tensorstore's writes still in flight call back into orbax's loops, closed by then, and each would print
  "Event loop is closed" with its traceback (dozens for one full disk). Everything else prints as before."""
  def hook(exc_type, exc, tb):
    frames = [f.name for f in traceback.extract_tb(tb)]
    if not (exc_type is RuntimeError and frames[-2:] == ['call_soon_threadsafe', '_check_closed']):
      excepthook(exc_type, exc, tb)
  return hook


sys.excepthook = _quiet_late_callbacks(sys.excepthook)


def _first_line(error: Exception) -> str:
  """The gist of a storage error: tensorstore's 'No space left on device' sits deep in a long message."""
  text = str(error)
  for gist in ('No space left on device', 'Disk quota exceeded', 'Permission denied', 'Read-only file system'):
    if gist in text:
      return gist
  return (text.splitlines() or [type(error).__name__])[0][:200]


def _agree(attempt):
  """(ok, result) of `attempt()`, where ok is True only if it succeeded on every process."""
  try:
    result, ok = attempt(), True
  except Exception:  # pylint: disable=broad-except  (any damage: missing file, bad JSON, short read, bad shape)
    result, ok = None, False
  if jax.process_count() > 1:
    ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
  return ok, result


def check_compatible(saved_config: dict, model_cfg, vocab_size: int, where: str) -> None:
  """Raises UserError when params saved under `saved_config` cannot be loaded into the configured model: another
  model name, another value of one of its family's shape keys (older configs' defaults filled in), or vocabulary."""
  saved_model = dict(saved_config.get('model', {}))
  here = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  from jaxssl import families  # reason: flax's import (0.4 s) is left to what builds models (generate's start)
  family = families.family_for(here)
  if saved_model.get('name') != here.get('name'):
    diffs = [f'model.name: {saved_model.get("name")!r} there, {here.get("name")!r} here']
  else:
    saved_shape, shape = family.shape(saved_model), family.shape(here)
    diffs = [f'model.{k}: {saved_shape[k]!r} there, {shape[k]!r} here' for k in family.shape_keys
             if saved_shape[k] != shape[k]]
  saved_vocab = saved_config.get('tokenizer', {}).get('vocab_size')
  if saved_vocab is not None and saved_vocab != vocab_size:
    diffs.append(f'tokenizer.vocab_size: {saved_vocab} there, {vocab_size} here')
  if diffs:
    raise UserError(f'{where} holds a model of another shape ({"; ".join(diffs)}): '
                    'use a new --workdir, or the config that wrote it')


# ----- exports: params only -----

def save_export_params(directory, params) -> None:
  """Writes an export's params/ (orbax, as checkpoints) without zstd: restoring SmolLM2-135M's took 0.42-0.65 s
  compressed and 0.13-0.29 s not (the generate job's start), for 514 MB on disk instead of 333."""
  checkpointer = ocp.AsyncCheckpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
  checkpointer.save(directory, args=ocp.args.PyTreeSave(params))
  checkpointer.wait_until_finished()


def write_export(out: str, params, config_json: str, tokenizer, *, overwrite: bool = False) -> None:
  """Writes `out/{params/, config.json, <tokenizer file>}` (a local folder or a bucket prefix) via a temporary
  folder renamed into place.

  `tokenizer` is a tokenizer object (`tokenizer.save(dir)` writes its file), or for older callers the path of a
  tokenizer file or directory (opened with `load_tokenizer`). In a bucket, where a rename copies object by
  object, config.json is written last, after the rename: an export with a config.json is complete.
  """
  if isinstance(tokenizer, (str, os.PathLike)):
    tokenizer = tokenizers.load_tokenizer(os.fspath(tokenizer))
  config_json = json.dumps({**json.loads(config_json), **format_stamp()}, indent=2, sort_keys=True)
  out = paths.absolute(os.fspath(out))
  if jax.process_index() == 0:
    _recover_export_swap(out)
  if storage.isdir(out) and storage.listdir(out) and not overwrite:
    raise UserError(f'export directory {out} already exists and is not empty: choose a new --out or pass --overwrite')
  tmp, old = f'{out}.tmp-export', f'{out}.old-export'
  if jax.process_index() == 0:
    storage.remove(tmp, missing_ok=True)
  save_export_params(storage.path(storage.join(tmp, 'params')), params)
  if jax.process_index() == 0:
    remote = storage.is_remote(out)
    if not remote:
      storage.write_text(storage.join(tmp, 'config.json'), config_json)
    if tokenizer is not None:  # image models (mae, simclr) have none
      tokenizer.save(tmp)
    # An overwrite swaps the folders in one step where the OS can (OUT is the old export or the new one at every
    # instant; the old one is then at OUT.tmp-export, removed next); else by two renames, and an export cut
    # between them is put back by the next export (_recover_export_swap), readers being told meanwhile.
    storage.remove(old, missing_ok=True)
    if storage.exists(out) and storage.exchange(tmp, out):
      storage.remove(tmp, missing_ok=True)
      return
    if storage.exists(out):
      storage.rename(out, old)
    storage.rename(tmp, out)
    if remote:
      storage.write_text(storage.join(out, 'config.json'), config_json)
    storage.remove(old, missing_ok=True)


def _recover_export_swap(out: str) -> None:
  """Finishes an export overwrite cut short between its two renames: OUT.old-export (the whole older export) goes
  back to OUT when OUT is missing or incomplete, and is removed when OUT is complete."""
  old = f'{out}.old-export'
  if not storage.exists(storage.join(old, 'config.json')):
    return
  if storage.exists(storage.join(out, 'config.json')):
    storage.remove(old, missing_ok=True)
    return
  storage.remove(out, missing_ok=True)
  storage.rename(old, out)


def load_export_params(path: str, abstract_params):
  """Restores exported params onto the shardings of `abstract_params` (any mesh); UserError when they do not fit."""
  params_dir = _export_params_dir(path)
  try:
    return ocp.StandardCheckpointer().restore(storage.path(params_dir), abstract_params)
  except (ValueError, KeyError, TypeError) as e:
    raise _params_do_not_fit(path, str(e)) from None


def export_leaves(path: str, abstract_params):
  """Yields (keys, array) for each leaf of an export's params (as load_export_params restores them, in
  tree_flatten order), restored one at a time: a caller that writes each away holds one leaf at a time, where
  orbax's restore of the whole tree peaks at about twice its size (the generate job's 7 GB 1.5B decoder: 16 GB).
  UserError as load_export_params."""
  params_dir = storage.path(_export_params_dir(path))
  checkpointer = ocp.PyTreeCheckpointer()
  for key_path, abstract in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    keys = [k.key for k in key_path]
    item = abstract
    for key in reversed(keys):
      item = {key: item}
    try:
      leaf = checkpointer.restore(params_dir, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
      for key in keys:
        leaf = leaf[key]
    except (ValueError, KeyError, TypeError) as e:
      raise _params_do_not_fit(path, str(e)) from None
    if leaf.shape != abstract.shape or leaf.dtype != abstract.dtype:
      raise _params_do_not_fit(path, f'{"/".join(map(str, keys))} is {leaf.dtype}{list(leaf.shape)}, the model '
                                     f'takes {abstract.dtype}{list(abstract.shape)}')
    yield keys, leaf


def _export_params_dir(path: str) -> str:
  params_dir = storage.join(paths.absolute(os.fspath(path)), 'params')
  if not storage.exists(params_dir):
    raise UserError(f'{path} has a config.json but no params/: the export is incomplete; re-run '
                    'python -m jaxssl.export')
  return params_dir


def _params_do_not_fit(path: str, error: str) -> UserError:
  reason = (error.splitlines() or [''])[0][:200]
  return UserError(f'{path}: its params do not fit the model its config.json describes ({reason}): '
                   're-export them with python -m jaxssl.export')


def load_export(path: str, mesh=None, dtype: str | None = None):
  """Loads an export onto `mesh` (default: all devices, data-parallel): returns (config, model, tokenizer).
  `dtype`: as describe_export's.

  The tokenizer is sentencepiece (`tokenizer.model`) or WordPiece (`tokenizer.json`), whichever the export holds.
  An embedding with more rows than the tokenizer has ids (a padded public vocabulary) loads as it is; the model
  gives those rows -inf logits (jaxssl/models/vocab.py). Fewer rows than ids is a UserError.
  """
  config, setup, tokenizer = open_export(path, mesh, dtype)
  from flax import nnx  # reason: as families above
  model = nnx.merge(setup.graphdef, load_export_params(path, setup.abstract_params))
  return config, model, tokenizer


def open_export(path: str, mesh=None, dtype: str | None = None):
  """An export's (config, model setup, tokenizer) without its weights: `setup.graphdef` and `setup.abstract_params`
  (jax.ShapeDtypeStruct on `mesh`'s shardings) describe the model; load_export_params restores the weights."""
  saved, config, model_cfg, tokenizer = describe_export(path, dtype)
  return config, setup_export_model(saved, model_cfg, mesh), tokenizer


def setup_export_model(saved: dict, model_cfg, mesh=None):
  """The setup (state.setup_model) of describe_export's model on `mesh` (default: all devices, data-parallel)."""
  from jaxssl import mesh as mesh_lib  # reason: as families above
  from jaxssl.train import state as state_lib  # reason: as families above
  mesh = mesh if mesh is not None else mesh_lib.make_mesh((-1, 1, 1))
  return state_lib.setup_model(model_cfg, saved['vocab_size'], mesh)

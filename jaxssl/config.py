"""Configs: Python files with named variants (`configs/bert.py:tiny`) plus `--config.key=value` overrides.

A config file defines `get_config(variant: str) -> ml_collections.ConfigDict`. Overrides are type-checked
against the existing value; unknown keys and wrong types are `UserError`s (exit status 2 in every job).
The pretraining config files build their shared groups with `pretraining_config`, `quickstart` and `full_scale`.
"""
import ast
import importlib.util
import json
import os

import ml_collections

from jaxssl import paths
from jaxssl.errors import UserError


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/file.py[:variant]`; the variant defaults to the file's own default."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path!r} not found: pass --config configs/<family>.py:<variant>')
  module_spec = importlib.util.spec_from_file_location(f'_jaxssl_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path!r} has no get_config(variant) function')
  variants = getattr(module, 'VARIANTS', None)
  if variant and variants is not None and variant not in variants:
    raise UserError(f'unknown variant {variant!r} in {path}: choose one of {", ".join(variants)}')
  config = module.get_config(variant) if variant else module.get_config()
  config.lock()
  return config


def _parse_value(text: str):
  lowered = text.strip().lower()
  if lowered in ('true', 'false'):
    return lowered == 'true'
  if lowered in ('none', 'null'):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _parse_mapping(key: str, text: str) -> dict:
  """`a=x,b=y` (or a dict literal; '' = empty) as {name: text} for a group whose values are all text."""
  text = text.strip()
  if text.startswith('{'):
    value = _parse_value(text)
    if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
      return value
  else:
    pairs = [part.split('=', 1) for part in text.split(',') if part.strip()]
    if all(len(p) == 2 and p[0].strip() and p[1].strip() for p in pairs):
      return {name.strip(): value.strip() for name, value in pairs}
  raise UserError(f'--config.{key}={text!r} is a map of names to text: write it as name=value,name=value '
                  f'(e.g. --config.{key}=en=en_dev.jsonl,zh=zh_dev.jsonl)')


def _coerce(key: str, old, new):
  """Returns `new` converted to the type of `old`, or raises UserError."""
  if old is None or new is None:
    return new
  if isinstance(old, bool):
    if isinstance(new, bool):
      return new
  elif isinstance(old, float) and isinstance(new, (int, float)) and not isinstance(new, bool):
    return float(new)
  elif isinstance(old, int):
    if isinstance(new, int) and not isinstance(new, bool):
      return new
  elif isinstance(old, (tuple, list)):
    if isinstance(new, str) and ',' in new:  # --config.tasks=cola,sst2 as well as ('cola', 'sst2')
      new = tuple(_parse_value(part.strip()) for part in new.split(',') if part.strip())
    if isinstance(new, (int, float, str)):
      new = (new,)
    if isinstance(new, (tuple, list)):
      return type(old)(new)
  elif isinstance(old, str):
    return str(new)
  elif isinstance(new, type(old)):
    return new
  raise UserError(f'--config.{key}={new!r} has the wrong type: expected {type(old).__name__} like {old!r}')


def apply_override(config: ml_collections.ConfigDict, key: str, text: str) -> None:
  """Sets `config.<key>` (dotted) from its command-line text, checking the key exists and the type fits."""
  *parents, leaf = key.split('.')
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise UserError(f'unknown config key --config.{".".join(parents[:i + 1])}: see the config file for valid keys')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    if isinstance(node, ml_collections.ConfigDict) and parents and not node.keys():  # an empty name -> text map
      raise UserError(f'--config.{".".join(parents)} is a map of names to text: set it whole, e.g. '
                      f'--config.{".".join(parents)}={leaf}=TEXT,other=TEXT')
    known = ', '.join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ''
    raise UserError(f'unknown config key --config.{key}: valid keys here are {known}')
  old = node[leaf]
  if isinstance(old, ml_collections.ConfigDict):
    if all(isinstance(v, str) for v in old.values()):  # a name -> text map (verbalisers, eval sets): replace it
      with node.unlocked():
        node[leaf] = ml_collections.ConfigDict(_parse_mapping(key, text))
      return
    raise UserError(f'--config.{key} is a group of keys, not a value: set one of its fields instead')
  with node.unlocked():
    node[leaf] = _coerce(key, old, _parse_value(text))


def parse_overrides(config: ml_collections.ConfigDict, args: list[str]) -> list[str]:
  """Applies every `--config.key=value` (or `--config.key value`) in `args`; returns the other args."""
  rest, i = [], 0
  while i < len(args):
    arg = args[i]
    if arg.startswith('--config.'):
      body = arg[len('--config.'):]
      if '=' in body:
        key, text = body.split('=', 1)
      elif i + 1 < len(args):
        key, text = body, args[i + 1]
        i += 1
      else:
        raise UserError(f'{arg} has no value: write --config.KEY=VALUE')
      apply_override(config, key, text)
    else:
      rest.append(arg)
    i += 1
  return rest


def parse_job_args(parser, argv):
  """`parser`'s own flags plus `--config FILE.py:VARIANT` and `--config.KEY=VALUE` overrides → (args, config).

  `parser` must define `--config`; any other unknown argument is an argparse error (exit status 2). Every job
  also gets the multi-process flags (`--coordinator`, `--num-processes`, `--process-id`, `--heartbeat-timeout`).
  The config's path keys come back absolute (`jaxssl.paths`), so relative paths and `~` work everywhere.
  """
  from jaxssl import runtime  # noqa: PLC0415 (runtime imports jax lazily; config stays light)
  runtime.add_distributed_args(parser)
  args, rest = parser.parse_known_args(argv)
  config = load_config(args.config)
  unknown = parse_overrides(config, rest)
  if unknown:
    parser.error(f'unrecognized arguments: {" ".join(unknown)}')
  paths.resolve_config_paths(config)
  return args, config


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True, indent=2)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))


# ----- the groups every pretraining config file (configs/bert.py, gpt.py, encdec.py, elmo.py) shares -----

def compute_keys(**overrides) -> dict:
  """The model section's compute settings of a Transformer family (keys, defaults and what they mean)."""
  return dict(
      dtype='auto',        # compute dtype; params stay float32. 'auto': bfloat16 on TPU/GPU, and on a CPU with
                           # bfloat16 instructions for the families measured faster in it; float32 elsewhere
                           # (models/precision.py) | 'float32' | 'bfloat16'
      remat='auto',        # 'auto' ('none' in bfloat16 on CPU, faster there; else 'dots') | 'dots' (keep weight
                           # matmul outputs, recompute the rest) | 'none' | 'full' (models/precision.py)
      scan_layers=True,    # layers stacked (a leading 'layers' axis) and run by nnx.scan
      layer_loop='auto',   # how the stack runs: 'auto' (unrolled on CPU and GPU, faster there; a loop on TPU,
                           # compile time flat in depth; fine-tuning unrolls only train steps that run often
                           # enough, train/layer_loop.py) | 'scan' | 'unrolled'
      attention='auto',    # 'auto' (cuDNN flash on GPU in bf16, splash on TPU, else XLA) | 'xla' | 'cudnn' | 'splash'
  ) | overrides


def pretraining_config(variant: str, *, model: dict, data: dict, train: dict, vocab_size: int = 8000,
                       every_steps: int = 500, log_every: int = 50) -> ml_collections.ConfigDict:
  """A pretraining config: the family's `model` section and `data` keys (seq_len, max_predictions, its example
  building) plus the groups all families share: corpus keys, tokenizer, train (`train` holds the family's
  optimiser values), mesh, checkpoint and eval (every `every_steps`), log (every `log_every`)."""
  c = ml_collections.ConfigDict()
  c.variant = variant
  # An export (python -m jaxssl.export, or jaxssl.convert from-hf) to continue pretraining from: its model section,
  # vocabulary and tokenizer replace this config's (dtype, remat, attention, dropout stay the run's).
  c.init_from = ''
  c.model = ml_collections.ConfigDict(model)
  c.data = ml_collections.ConfigDict(dict(
      # 'ptb', a TFDS name ('wikipedia/20230601.en', 'c4/en'), files (local or gs://; a file, directory or glob of
      # .txt, .jsonl[.gz|.zst], .parquet, a save_to_disk folder), or a mixture 'web=c4.jsonl.zst:0.7,books=/b/:0.3'
      corpus='ptb',
      text_field='text',       # the JSON Lines field / Parquet column that holds a document's text
      max_bad_records=0,       # bad records (invalid UTF-8, broken JSON line, missing field) skipped, each reported
      data_dir='',             # TFDS cache; '' = ~/.cache/jaxssl/tfds (or $JAXSSL_DATA_DIR)
      ptb_sentences_per_doc=16,  # PTB has no documents: group consecutive sentences into pseudo-documents
      validation_fraction=0.01,  # local text without its own held-out files: this share of documents
      num_threads=2,           # input threads per process (tokenizers release the GIL for part of the work)
      num_workers=0,           # input worker processes per host (grain mp_prefetch): same batches, more cores
  ) | data)
  # sentencepiece trains on a seeded sample of this many sentences drawn across the whole corpus;
  # max_training_sentences is its older name: one shared value, setting either sets both.
  sample_sentences = ml_collections.FieldReference(2_000_000)
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, model_type='unigram', character_coverage=0.9995, sample_sentences=sample_sentences,
      max_training_sentences=sample_sentences))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, microbatches=1, seed=0, warmup_steps=100, b1=0.9, grad_clip_norm=1.0,
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,    # with 'skip': stop after this many non-finite steps in a row
  ) | train)
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = the rest
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=every_steps, keep=3, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=every_steps, batches=20))
  c.log = ml_collections.ConfigDict(dict(every_steps=log_every, peak_flops_per_device=0.0))  # 0 = from the table
  return c


def quickstart(c: ml_collections.ConfigDict, **train) -> None:
  """A tiny variant's schedule, which learns visibly on a 2-core CPU in minutes: a 4000-piece vocabulary, 2000 steps
  of 32 rows at peak 1e-3 after 100 warmup steps (`train` changes any of them), frequent checkpoints, evals, logs,
  no remat."""
  c.tokenizer.vocab_size = 4000
  c.train.update(dict(steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100) | train)
  if 'remat' in c.model:  # a tiny model's activations are small: recomputing them only lengthens its compile
    c.model.remat = 'none'
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 250
  c.log.every_steps = 25


def full_scale(c: ml_collections.ConfigDict, *, vocab_size: int, every_steps: int = 5000, **train) -> None:
  """A published model's run: its vocabulary size (so converted checkpoints fit), its `train` schedule, and a
  checkpoint and eval every `every_steps`."""
  c.tokenizer.vocab_size = vocab_size
  c.train.update(train)
  c.checkpoint.every_steps = every_steps
  c.eval.every_steps = every_steps

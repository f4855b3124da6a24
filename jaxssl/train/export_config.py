"""What a checkpoint or an export says about itself, read without orbax: format versions, an export's config.json,
its model config and tokenizer.

Why a module of its own: the generate job's warm start needs only these (its weights come from weights_cache's
file), and importing orbax cost it 0.2-0.3 s of a ~3 s start (BENCHMARKS.md §29). jaxssl.train.checkpoint, which
writes and restores with orbax, re-exports every name here.
"""
import json
import os

from jaxssl import config as config_lib
from jaxssl import storage
from jaxssl.data import tokenizers
from jaxssl.errors import UserError
from jaxssl.models import precision, vocab
from jaxssl.version import __version__

# The layout of what this jaxssl writes. Bump FORMAT_VERSION when a change means an older jaxssl can no longer read
# a checkpoint or an export this one writes; raise OLDEST_READABLE_FORMAT only when this jaxssl stops reading an
# older layout. 0 is everything written before versions were recorded (tests/fixtures/compat, which still restores).
FORMAT_VERSION = 1
OLDEST_READABLE_FORMAT = 0


def format_stamp() -> dict:
  """The keys every checkpoint's meta and every export's config.json carry: format version and jaxssl version."""
  return {'format_version': FORMAT_VERSION, 'jaxssl_version': __version__}


def check_format(saved: dict, what: str) -> None:
  """UserError naming both versions when `saved` (a checkpoint's meta or an export's config.json, described by
  `what`) was written in a layout this jaxssl cannot read."""
  version = saved.get('format_version', 0)
  if OLDEST_READABLE_FORMAT <= version <= FORMAT_VERSION:
    return
  by = saved.get('jaxssl_version', 'an unknown version')
  newer = version > FORMAT_VERSION
  fix = (f'read it with jaxssl {by} or newer (pip install -U jaxssl), or use a new --workdir' if newer
         else f'read it with jaxssl {by}, or start again from an export this jaxssl reads')
  raise UserError(f'{what} was written by jaxssl {by} (format {version}); this jaxssl {__version__} reads formats '
                  f'{OLDEST_READABLE_FORMAT} to {FORMAT_VERSION}: {fix}')



def read_export_config(path: str) -> dict:
  config_file = storage.join(path, 'config.json')
  if not storage.exists(config_file):
    if storage.exists(storage.join(f'{os.fspath(path)}.old-export', 'config.json')):
      raise UserError(f'{path} is missing: an export --overwrite was cut short and the previous export is whole in '
                      f'{path}.old-export: rerun the export (which puts it back first), or move it back yourself')
    if not storage.exists(path):
      raise UserError(f'{path} does not exist (not a jaxssl export): check the path, or create an export with '
                      'python -m jaxssl.export')
    raise UserError(f'{path} is not a jaxssl export (no config.json): create one with python -m jaxssl.export')
  saved = json.loads(storage.read_text(config_file))
  check_format(saved, f'the export {path}')
  return saved


def describe_export(path: str, dtype: str | None = None):
  """(config.json's dict, config, the model's config, tokenizer) of an export: open_export less the model's setup
  (0.4 s of tracing for a 30-layer model), which setup_export_model does. `dtype`: a model.dtype setting
  (models/precision.py) the model computes in instead of the export's (its weights stay as stored)."""
  saved = read_export_config(path)
  config = config_lib.from_json(json.dumps(saved))
  tokenizer = tokenizers.load_tokenizer(path)
  vocab.check_rows(tokenizer.vocab_size, saved['vocab_size'], path)
  # A padded vocabulary (more rows than the tokenizer's ids): the model never predicts the padding rows.
  model_cfg = vocab.model_config_with_token_ids(config.model, tokenizer.vocab_size, saved['vocab_size'])
  if dtype is not None:
    model_cfg.dtype = dtype
  precision.resolve(model_cfg)  # an export whose model.dtype is 'auto' computes in this backend's dtype
  return saved, config, model_cfg, tokenizer

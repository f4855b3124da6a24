"""The file handling the evaluation suites share: JSONL inputs read line by line, results.json beside its plots.

Inputs and outputs may be local or in a bucket (gs://...): everything goes through jaxssl.storage.
"""
import io
import json

from jaxssl import storage
from jaxssl.errors import UserError

RESULTS = 'results.json'


def jsonl_lines(path: str, *, what: str, example: str) -> list[tuple[str, object, str]]:
  """(FILE:LINE, parsed value, the line) of every non-blank line of `path`.

  A missing file or a line that is not JSON is a UserError naming it; `what` names the file's role ('ICL data
  file') and `example` shows one line ('{"input": ..., "label": ...}'). Checking each value is the caller's job.
  """
  if not storage.isfile(path):
    raise UserError(f'{what} {path!r} not found: pass a JSONL file of {example} lines')
  out = []
  with storage.open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f'{path}:{number}'
      try:
        out.append((where, json.loads(line), line))
      except json.JSONDecodeError as e:
        raise UserError(f'{where} is not valid JSON ({e.msg}): write one {example} object per line') from None
  return out


def output_paths(out: str) -> tuple[str, str]:
  """(results.json path, directory for the plots): `out` is a .json file or a directory."""
  if out.endswith('.json'):
    return out, storage.parent(out) or '.'
  return storage.join(out, RESULTS), out


def write_json(path: str, value, **dump_options) -> None:
  """Writes `value` as JSON to `path` (local or in a bucket) whole: a reader never sees half a report."""
  storage.write_text(path, json.dumps(value, **dump_options))


def write_lines(path: str, lines) -> None:
  """Writes one line per string of `lines` to `path` (local or in a bucket), whole."""
  storage.write_text(path, ''.join(line + '\n' for line in lines))


def write_figure(fig, path: str, **savefig_options) -> None:
  """Saves a matplotlib figure as a PNG at `path` (local or in a bucket), whole."""
  png = io.BytesIO()
  fig.savefig(png, format='png', **savefig_options)
  storage.write_bytes(path, png.getvalue())

"""The file handling the evaluation suites share: JSONL inputs read line by line, results.json beside its plots."""
import json
import os

from jaxssl.errors import UserError

RESULTS = 'results.json'


def jsonl_lines(path: str, *, what: str, example: str) -> list[tuple[str, object, str]]:
  """(FILE:LINE, parsed value, the line) of every non-blank line of `path`.

  A missing file or a line that is not JSON is a UserError naming it; `what` names the file's role ('ICL data
  file') and `example` shows one line ('{"input": ..., "label": ...}'). Checking each value is the caller's job.
  """
  if not os.path.isfile(path):
    raise UserError(f'{what} {path!r} not found: pass a JSONL file of {example} lines')
  out = []
  with open(path, encoding='utf-8') as f:
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
    return out, os.path.dirname(out) or '.'
  return os.path.join(out, RESULTS), out

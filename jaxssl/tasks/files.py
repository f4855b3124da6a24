"""Task files: TSV/JSONL rows, CoNLL or JSONL tagging, SQuAD v1.1 JSON, read into `Example`s.

A file may be local or in a bucket (`gs://B/task/train.tsv`: read through jaxssl.storage). A wrong or missing
column is a UserError naming the file, the line and the columns expected.
"""
import csv
import json

from jaxssl import storage
from jaxssl.errors import UserError
from jaxssl.tasks.base import Example


def require_file(path: str) -> None:
  """UserError unless `path` is an existing file."""
  if not path or not storage.isfile(path):
    raise UserError(f'task file {path!r} not found: set --config.task.train / --config.task.dev to existing files')


def rows(path: str):
  """(line number, dict) rows of a TSV (with a header) or JSONL file."""
  require_file(path)
  with storage.open(path) as f:
    if path.endswith('.jsonl') or path.endswith('.json'):
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            yield n, json.loads(line)
          except json.JSONDecodeError as e:
            raise UserError(f'{path} line {n} is not valid JSON ({e.msg}): one JSON object per line') from None
    else:
      for n, row in enumerate(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE), 2):
        yield n, row


def column_rows(path: str, columns: tuple[str, ...], kind: str):
  """(line number, row) of a TSV/JSONL file, each checked to have every one of `columns` non-empty."""
  for n, row in rows(path):
    missing = [c for c in columns if row.get(c) in (None, '')]
    if missing:
      raise UserError(f'{path} line {n} has no {", ".join(missing)}: a {kind} file needs columns '
                      f'{", ".join(columns)}')
    yield n, row


def read_tagged_jsonl(path: str) -> list[Example]:
  """One sentence per line: {"tokens": [...], "tags": [...]} of equal length."""
  out = []
  for n, row in rows(path):
    tokens, tags = row.get('tokens'), row.get('tags')
    if not isinstance(tokens, list) or not isinstance(tags, list) or len(tokens) != len(tags):
      raise UserError(f'{path} line {n}: a tagging JSONL line needs lists "tokens" and "tags" of equal length')
    out.append(Example(tokens=[str(t) for t in tokens], tags=[str(t) for t in tags]))
  return out


def read_conll(path: str) -> list[Example]:
  """`token<TAB>tag` (or whitespace-separated, tag last) per line, blank lines between sentences, -DOCSTART- skipped."""
  require_file(path)
  out, tokens, tags = [], [], []
  with storage.open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.rstrip('\n')
      if not line.strip() or line.startswith('-DOCSTART-'):
        if tokens:
          out.append(Example(tokens=tokens, tags=tags))
        tokens, tags = [], []
        continue
      parts = line.split('\t') if '\t' in line else line.split()
      if len(parts) < 2:
        raise UserError(f'{path} line {n}: expected "token<TAB>tag" (CoNLL), got {line[:60]!r}')
      tokens.append(parts[0])
      tags.append(parts[-1])
  if tokens:
    out.append(Example(tokens=tokens, tags=tags))
  return out


def read_squad(path: str) -> list[Example]:
  """SQuAD v1.1 JSON: one example per question, its answers checked to sit at their answer_start."""
  require_file(path)
  try:
    with storage.open(path) as f:
      data = json.load(f)['data']
  except (json.JSONDecodeError, KeyError, TypeError):
    raise UserError(f'{path} is not SQuAD v1.1 JSON (a top-level "data" list of articles)') from None
  out = []
  for article in data:
    for paragraph in article.get('paragraphs', []):
      context = paragraph['context']
      for qa in paragraph.get('qas', []):
        answers = [(a['text'], int(a['answer_start'])) for a in qa.get('answers', [])]
        for text, start in answers:
          if context[start:start + len(text)] != text:
            raise UserError(f'{path}: question {qa.get("id")}: answer {text!r} is not at answer_start {start}')
        out.append(Example(text=context, question=qa['question'], qid=str(qa['id']), answers=answers))
  return out

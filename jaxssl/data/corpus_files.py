"""A local corpus's files and the documents in them: listing (file, directory or glob) and reading UTF-8 text.

Text files hold documents separated by blank lines (a file without blank lines is one document); each non-empty
line is a sentence.
"""
import glob
import os
from typing import Iterator

from jaxssl.errors import UserError

GLOB_CHARS = '*?['


def list_files(corpus: str) -> list[str]:
  """The corpus's files, absolute and sorted; UserError when there are none."""
  if os.path.isfile(corpus):
    return [os.path.abspath(corpus)]
  if os.path.isdir(corpus):
    files = []
    for root, dirs, names in os.walk(corpus):
      dirs[:] = [d for d in dirs if not d.startswith('.')]  # skip .git, .cache and the like
      files += [os.path.join(root, n) for n in names if not n.startswith('.')]
    if not files:
      raise UserError(f'corpus directory {corpus!r} holds no files: put text files in it or pass another '
                      '--config.data.corpus')
    return sorted(os.path.abspath(f) for f in files)
  if any(c in corpus for c in GLOB_CHARS):
    files = [f for f in glob.glob(corpus, recursive=True) if os.path.isfile(f)]
    if not files:
      raise UserError(f'corpus glob {corpus!r} matches no files: pass --config.data.corpus=<file, directory or '
                      "glob of text files>, 'ptb', or a TFDS name")
    return sorted(os.path.abspath(f) for f in files)
  raise UserError(f'corpus path {corpus!r} does not exist: pass --config.data.corpus=<file, directory or glob '
                  "of text files>, 'ptb', or a TFDS name like 'wikipedia/20230601.en'")


def documents(files: list[str]) -> Iterator[list[str]]:
  """Each document as its list of stripped, non-empty lines; UserError on text that is not UTF-8."""
  for path in files:
    doc = []
    with open(path, 'rb') as f:
      for lineno, raw in enumerate(f, 1):
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise UserError(f'corpus file {path} line {lineno} is not valid UTF-8: {e.reason} at byte {e.start}: '
                          'fix or remove it') from None
        line = line.lstrip('\ufeff').strip() if lineno == 1 else line.strip()
        if line:
          doc.append(line)
        elif doc:
          yield doc
          doc = []
    if doc:  # a file boundary also ends a document
      yield doc

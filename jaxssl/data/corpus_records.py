"""One corpus file's documents, by format: text, JSON Lines, Parquet, Arrow IPC (HuggingFace `save_to_disk`).

The format comes from the file name: an optional compression suffix (.gz, .bz2, .xz, .zst/.zstd) over
  * .jsonl / .json / .ndjson: one JSON object per line, its `text_field` one document;
  * .parquet: its `text_field` column, one document per row, read a row group at a time;
  * .arrow: an Arrow IPC stream or file (what `datasets.Dataset.save_to_disk` writes), one document per row;
  * anything else (.txt, no extension): text, documents separated by blank lines, each non-empty line a sentence.
A record's text becomes one document: split into sentences on line breaks, stripped, empty ones dropped (as
corpora.TextRecords does with a TFDS corpus's text). Every reader streams: memory stays one line, one row group
or one record batch. A bad record (invalid UTF-8, broken JSON line, missing or non-text field) goes to the
`report(where, kind, message)` callback ('line 4' / 'row 17', a short kind, the message) and is skipped.
"""
import bz2
import gzip
import io
import json
import lzma
import re
import zlib
from typing import Callable, Iterator

from etils import epath

from jaxssl.errors import UserError

Report = Callable[[str, str, str], None]

COMPRESSIONS = ('.gz', '.bz2', '.xz', '.zst', '.zstd')
_ARCHIVES = ('.zip', '.tar', '.tgz', '.tar.gz', '.7z', '.rar')
_JSON_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_LINE_BREAK = re.compile(r'\r\n|\r|\n')
_ROWS_PER_BATCH = 1024

# Kinds of bad record (the keys of BadRecords.counts).
NOT_UTF8, BROKEN_JSON, NOT_AN_OBJECT, MISSING_FIELD, NOT_TEXT = (
    'invalid UTF-8', 'broken JSON', 'not a JSON object', 'missing field', 'non-text field')


def file_format(path: str) -> tuple[str, str]:
  """(record format: 'text' | 'jsonl' | 'parquet' | 'arrow', compression suffix or '') from the file's name."""
  name = str(path).rsplit('/', 1)[-1].lower()
  if name.endswith(_ARCHIVES):
    raise UserError(f'corpus file {path} is an archive: unpack it and point --config.data.corpus at the files '
                    '(.txt, .jsonl[.gz|.zst], .parquet, .arrow)')
  compression = next((c for c in COMPRESSIONS if name.endswith(c)), '')
  name = name[:len(name) - len(compression)]
  if name.endswith(_JSON_SUFFIXES):
    return 'jsonl', compression
  for columnar in ('.parquet', '.arrow'):
    if name.endswith(columnar):
      if compression:
        raise UserError(f'corpus file {path} is a compressed {columnar} file: decompress it ({columnar[1:]} '
                        'files compress their columns themselves)')
      return columnar[1:], ''
  return 'text', compression


def split_sentences(text: str) -> list[str]:
  """A document's sentences: its lines, stripped, without the empty ones."""
  return [s for s in (line.strip() for line in _LINE_BREAK.split(text)) if s]


def _decompressed(raw, compression: str):
  """A binary stream of the file's uncompressed bytes, read lazily."""
  if not compression:
    return raw
  if compression == '.gz':
    return gzip.GzipFile(fileobj=raw, mode='rb')
  if compression == '.bz2':
    return bz2.BZ2File(raw, mode='rb')
  if compression == '.xz':
    return lzma.LZMAFile(raw, mode='rb')
  import zstandard  # noqa: PLC0415 (only .zst corpora need it)
  # read_across_frames: zstd -T / pzstd write several frames; all of them are the file.
  reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
  return io.BufferedReader(reader, buffer_size=1 << 20)


def _lines(stream, report: Report) -> Iterator[tuple[int, str | None]]:
  """(line number, decoded line or None when it is not UTF-8, reported) for each line of a binary stream."""
  for lineno, raw in enumerate(stream, 1):
    try:
      line = raw.decode('utf-8')
    except UnicodeDecodeError as e:
      report(f'line {lineno}', NOT_UTF8, f'is not valid UTF-8: {e.reason} at byte {e.start}')
      yield lineno, None
      continue
    yield lineno, line.lstrip('\ufeff') if lineno == 1 else line


def _text_documents(stream, report: Report) -> Iterator[list[str]]:
  doc = []
  for _, line in _lines(stream, report):
    if line is None:  # a bad line is left out; its document goes on
      continue
    line = line.strip()
    if line:
      doc.append(line)
    elif doc:
      yield doc
      doc = []
  if doc:  # a file boundary also ends a document
    yield doc


def _record_text(value, field: str, where: str, report: Report) -> str | None:
  """A record's field value as text, or None (reported) when it is missing, null or not text."""
  if value is None:
    report(where, MISSING_FIELD, f'has no {field!r} value')
    return None
  if isinstance(value, bytes):
    try:
      return value.decode('utf-8')
    except UnicodeDecodeError as e:
      report(where, NOT_UTF8, f'is not valid UTF-8 in {field!r}: {e.reason} at byte {e.start}')
      return None
  if not isinstance(value, str):
    report(where, NOT_TEXT, f'has {field!r} of type {type(value).__name__}, not text')
    return None
  return value


def _json_documents(stream, field: str, report: Report) -> Iterator[list[str]]:
  for lineno, line in _lines(stream, report):
    if line is None or not line.strip():  # blank lines between records are harmless
      continue
    where = f'line {lineno}'
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      report(where, BROKEN_JSON, f'is not valid JSON: {e.msg} at column {e.colno}')
      continue
    if not isinstance(record, dict):
      report(where, NOT_AN_OBJECT, f'is a JSON {type(record).__name__}, not an object with a {field!r} field')
      continue
    if field not in record:
      keys = ', '.join(list(record)[:8]) or 'none'
      report(where, MISSING_FIELD, f'has no {field!r} field (its fields: {keys}; choose with '
                                   '--config.data.text_field)')
      continue
    text = _record_text(record[field], field, where, report)
    sentences = split_sentences(text) if text is not None else []
    if sentences:
      yield sentences


def _text_column(schema, field: str, path: str) -> None:
  """UserError unless `schema` has a text (or binary) column `field`: a mistake in the config, not a bad record."""
  import pyarrow as pa  # noqa: PLC0415 (columnar corpora only)
  names = list(schema.names)
  if field not in names:
    raise UserError(f'corpus file {path} has no column {field!r} (its columns: {", ".join(names[:12])}): '
                    'name the text column with --config.data.text_field')
  kind = schema.field(field).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
          or pa.types.is_large_binary(kind) or str(kind) in ('string_view', 'binary_view')):
    raise UserError(f'corpus file {path} column {field!r} holds {kind}, not text: name the text column with '
                    '--config.data.text_field')


def _batch_documents(batches, field: str, report: Report) -> Iterator[list[str]]:
  """Documents of Arrow record batches' `field` column; rows are numbered from 0 across the batches."""
  row = 0
  for batch in batches:
    for value in batch.column(field).to_pylist():
      text = _record_text(value, field, f'row {row}', report)
      row += 1
      sentences = split_sentences(text) if text is not None else []
      if sentences:
        yield sentences


def _parquet_documents(raw, path: str, field: str, report: Report) -> Iterator[list[str]]:
  import pyarrow.parquet as pq  # noqa: PLC0415 (Parquet corpora only)
  parquet = pq.ParquetFile(raw)
  _text_column(parquet.schema_arrow, field, path)
  # iter_batches reads one row group's column chunk at a time: memory is bounded by the row group, not the file.
  yield from _batch_documents(parquet.iter_batches(batch_size=_ROWS_PER_BATCH, columns=[field]), field, report)


def _arrow_documents(raw, path: str, field: str, report: Report) -> Iterator[list[str]]:
  import pyarrow as pa  # noqa: PLC0415 (Arrow corpora only)
  try:
    reader = pa.ipc.open_stream(raw)  # `datasets` writes streams
    batches = iter(reader)
  except pa.ArrowInvalid:
    raw.seek(0)
    try:
      reader = pa.ipc.open_file(raw)
    except pa.ArrowInvalid as e:
      raise UserError(f'corpus file {path} is not an Arrow IPC stream or file ({e}): pass .arrow files written '
                      'by pyarrow or datasets.save_to_disk') from None
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
  _text_column(reader.schema, field, path)
  yield from _batch_documents(batches, field, report)


def read_documents(path: str, text_field: str, report: Report) -> Iterator[list[str]]:
  """The documents (lists of sentences) of the file at `path` (local or a URL), streamed."""
  fmt, compression = file_format(path)
  with epath.Path(path).open('rb') as raw:
    if fmt == 'parquet':
      yield from _parquet_documents(raw, path, text_field, report)
    elif fmt == 'arrow':
      yield from _arrow_documents(raw, path, text_field, report)
    else:
      stream = _decompressed(raw, compression)
      try:
        if fmt == 'jsonl':
          yield from _json_documents(stream, text_field, report)
        else:
          yield from _text_documents(stream, report)
      except _decompression_errors(compression) as e:
        raise UserError(f'corpus file {path} is not a valid {compression[1:]} file ({type(e).__name__}: {e}): '
                        're-compress it or remove it') from None


def _decompression_errors(compression: str) -> tuple:
  """The exceptions that mean a corrupt compressed file (none for an uncompressed one)."""
  if not compression:
    return ()
  if compression.startswith('.zst'):
    import zstandard  # noqa: PLC0415 (only .zst corpora need it)
    return (zstandard.ZstdError,)
  # bz2 reports corrupt data only as a bare OSError.
  return {'.gz': (EOFError, zlib.error, gzip.BadGzipFile), '.bz2': (EOFError, OSError),
          '.xz': (EOFError, lzma.LZMAError)}[compression]

"""Preparing a local corpus file by file, so that any number of workers can share the work and still write the
same dataset: in a process pool on one machine, or in an Apache Beam pipeline on any runner (Dataflow, Flink,
Spark, or Beam's DirectRunner).

A document's key is `offset(file) + its index within the file`, where offset(file) is the number of documents in
the files before it. That is the same number the one-process generator gives it by counting documents in file
order, so the key, the train/validation rule (which holds out the keys with the smallest hash) and therefore
every written record (TFDS orders records by a hash of the key) are the same whichever way the corpus was read.
Knowing the offsets takes a counting pass over the files first; that pass also collects the bad records.
"""
import dataclasses
import hashlib
import heapq
import json
import multiprocessing
import pickle
import queue
import tempfile
import traceback
from typing import Iterator

from etils import epath

from jaxssl.data import corpus_files
from jaxssl.errors import UserError

_BATCH_BYTES = 1 << 20  # a worker hands documents to the writer in batches of about this size


def validation_indices(num_docs: int, fraction: float) -> frozenset[int]:
  """A stable share of document indices: the ones with the smallest hash. At least 2 (and at least 2 left to
  train on) when num_docs >= 4, because next-sentence prediction draws its random B from another document."""
  if num_docs < 2:
    return frozenset()
  count = max(1, round(num_docs * fraction))
  count = min(num_docs - 2, max(2, count)) if num_docs >= 4 else 1
  score = lambda i: hashlib.blake2b(str(i).encode(), digest_size=8).digest()
  # = sorted(range(num_docs), key=score)[:count], in memory for `count` indices rather than all of them.
  return frozenset(heapq.nsmallest(count, range(num_docs), key=score))


def read_file(path: str, text_field: str = 'text',
              bad_records: corpus_files.BadRecords | None = None) -> Iterator[list[str]]:
  """The documents of one corpus file (each a list of sentences). Bad records are skipped: collected in
  `bad_records` when counting, dropped when reading (the count has already judged them)."""
  bad_records = corpus_files.BadRecords() if bad_records is None else bad_records
  return corpus_files.file_documents(path, text_field=text_field, bad_records=bad_records)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where each file's documents start in the global numbering, and which of them are held out."""
  offsets: tuple[int, ...]   # offsets[i]: documents in files 0..i-1
  counts: tuple[int, ...]
  held_out: frozenset[int]

  @property
  def total(self) -> int:
    return self.offsets[-1] + self.counts[-1] if self.counts else 0

  def splits(self, key: int) -> tuple[str, ...]:
    """The splits document `key` belongs to (a one-document corpus is its own validation set: TFDS cannot
    write an empty split)."""
    if self.total == 1:
      return ('train', 'validation')
    return ('validation',) if key in self.held_out else ('train',)


def make_plan(counts: list[int], validation_fraction: float) -> Plan:
  offsets, total = [], 0
  for count in counts:
    offsets.append(total)
    total += count
  return Plan(tuple(offsets), tuple(counts), validation_indices(total, validation_fraction))


def count_file(index: int, path: str, text_field: str = 'text',
               max_bad_records: int = 0) -> tuple[int, int, corpus_files.BadRecords]:
  """(index, documents in the file, its bad records)."""
  bad = corpus_files.BadRecords(max_bad_records)
  return index, sum(1 for _ in read_file(path, text_field, bad)), bad


def file_examples(index: int, path: str, plan: Plan, text_field: str = 'text') -> Iterator[tuple[str, int, str]]:
  """(split, key, text) for every document of file `index` (one line per sentence)."""
  offset, count = plan.offsets[index], 0
  for count, doc in enumerate(read_file(path, text_field), 1):
    key = offset + count - 1
    if count > plan.counts[index]:
      break
    for split in plan.splits(key):
      yield split, key, '\n'.join(doc)
  if count != plan.counts[index]:
    raise UserError(f'corpus file {path} changed while it was being prepared ({plan.counts[index]} documents '
                    f'when counted, {count} when read): prepare it again once nothing writes to it')


def empty_corpus_error(corpus: str, num_files: int) -> UserError:
  return UserError(f'corpus {corpus!r} is empty (no non-whitespace text in {num_files} file(s)): '
                   'pass --config.data.corpus=<text, .jsonl or .parquet files>')


# ---------------------------------------------------------------------------------------------- process pool

def _pool_context():
  # spawn, not fork: the parent may hold JAX's or TFDS's threads, which a forked child would inherit mid-state.
  return multiprocessing.get_context('spawn')


def _count_one(args):
  return count_file(*args)


def count_files(files: list[str], text_field: str = 'text', workers: int = 1,
                max_bad_records: int = 0) -> tuple[list[int], corpus_files.BadRecords]:
  """(documents per file, the bad records of all files in file order), counted by `workers` processes."""
  tasks = [(i, path, text_field, max_bad_records) for i, path in enumerate(files)]
  if workers <= 1 or len(files) <= 1:
    results = list(map(_count_one, tasks))
  else:
    with _pool_context().Pool(min(workers, len(files))) as pool:
      results = list(pool.imap_unordered(_count_one, tasks))
  return combine_counts(results, max_bad_records)


def combine_counts(results, max_bad_records: int) -> tuple[list[int], corpus_files.BadRecords]:
  """Per-file (index, count, BadRecords) in any order -> (counts in file order, merged BadRecords)."""
  results = sorted(results, key=lambda r: r[0])
  bad = corpus_files.BadRecords(max_bad_records)
  for _, _, file_bad in results:
    bad.merge(file_bad)
  return [r[1] for r in results], bad


def _example_worker(tasks, out, files, plan, text_field):
  """Reads the files whose indices come from `tasks`; puts batches of (split, key, text) on `out` (a bounded
  queue: a worker waits while the writer is behind, so memory stays bounded), then None."""
  try:
    while (index := tasks.get()) is not None:
      batch, size = [], 0
      for item in file_examples(index, files[index], plan, text_field):
        batch.append(item)
        size += len(item[2])
        if size >= _BATCH_BYTES:
          out.put(batch)
          batch, size = [], 0
      if batch:
        out.put(batch)
    out.put(None)
  except BaseException as e:  # pylint: disable=broad-except
    out.put(e if isinstance(e, UserError) else RuntimeError(traceback.format_exc()))


def parallel_examples(files: list[str], plan: Plan, workers: int,
                      text_field: str = 'text') -> Iterator[tuple[str, int, str]]:
  """(split, key, text) of every document, read by `workers` processes in no particular order (TFDS orders the
  records by key hash). At most ~3 batches per worker are in memory at once."""
  ctx = _pool_context()
  tasks, out = ctx.Queue(), ctx.Queue(maxsize=2 * workers)
  for index in range(len(files)):
    tasks.put(index)
  procs = [ctx.Process(target=_example_worker, args=(tasks, out, files, plan, text_field), daemon=True)
           for _ in range(workers)]
  for _ in procs:
    tasks.put(None)
  for p in procs:
    p.start()
  try:
    running = workers
    while running:
      try:
        item = out.get(timeout=5)
      except queue.Empty:
        if not any(p.is_alive() for p in procs) and out.empty():
          raise RuntimeError('a corpus reading process died without a word') from None
        continue
      if item is None:
        running -= 1
      elif isinstance(item, BaseException):
        raise item
      else:
        yield from item
  finally:
    for p in procs:
      if p.is_alive():
        p.terminate()
      p.join()


class ValidationStash:
  """The validation documents met while the train split is written, in a temporary file (memory stays flat),
  so that the validation split needs no second reading of the corpus. `complete` once train is written."""

  def __init__(self):
    self._file, self.complete = None, False

  def add(self, key: int, text: str) -> None:
    if self._file is None:
      self._file = tempfile.TemporaryFile()
    pickle.dump((key, text), self._file)

  def __iter__(self) -> Iterator[tuple[int, str]]:
    if self._file is None:
      return
    self._file.seek(0)
    while True:
      try:
        yield pickle.load(self._file)
      except EOFError:
        break
    self._file.close()
    self._file = None


# ---------------------------------------------------------------------------------------------- Beam

def _count_in_worker(indexed_path, text_field: str, max_bad_records: int):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel  # reason: only Beam workers get here
  result = count_file(indexed_path[0], indexed_path[1], text_field, max_bad_records)
  beam.metrics.Metrics.counter('jaxssl', 'documents').inc(result[1])
  beam.metrics.Metrics.counter('jaxssl', 'bad_records').inc(result[2].total)
  return result


def _plan_and_report(results, validation_fraction: float, max_bad_records: int, report_path: str,
                     corpus: str) -> Plan:
  """The combine step: every file's count and bad records -> the plan. Writes the report first (documents,
  bad records), so the launching job can say what was wrong even when this step fails the pipeline."""
  counts, bad = combine_counts(results, max_bad_records)
  if report_path:
    epath.Path(report_path).write_text(json.dumps(
        {'documents': sum(counts), 'files': len(counts), 'bad_counts': bad.counts, 'bad_reports': bad.reports}))
  if bad.total > bad.limit:
    bad.check(repr(corpus))  # raises, naming the records
  if sum(counts) == 0:
    raise empty_corpus_error(corpus, len(counts))
  return make_plan(counts, validation_fraction)


def read_report(report_path: str, max_bad_records: int) -> tuple[int, int, corpus_files.BadRecords] | None:
  """(documents, files, bad records) from the report a Beam preparation wrote; None when there is none."""
  path = epath.Path(report_path)
  if not path.exists():
    return None
  report = json.loads(path.read_text())
  bad = corpus_files.BadRecords(max_bad_records)
  bad.counts, bad.reports = dict(report['bad_counts']), list(report['bad_reports'])
  return report['documents'], report['files'], bad


def _examples_of_file(indexed_path, plan, text_field):
  import apache_beam as beam  # pylint: disable=import-outside-toplevel  # reason: only Beam workers get here
  index, path = indexed_path
  for split, key, text in file_examples(index, path, plan, text_field):
    if split == 'train':
      yield key, {'text': text}
    else:
      yield beam.pvalue.TaggedOutput(split, (key, {'text': text}))


def beam_splits(pipeline, files: list[str], validation_fraction: float, text_field: str = 'text',
                max_bad_records: int = 0, report_path: str = '', corpus: str = '') -> dict:
  """{'train', 'validation'} PCollections of (key, {'text': ...}) for TFDS's Beam writer: one element per file,
  each file counted (a combine step makes the plan from all counts), then read, inside the workers."""
  import apache_beam as beam  # pylint: disable=import-outside-toplevel  # reason: heavy, and only this path needs it
  indexed = (pipeline | 'Files' >> beam.Create(list(enumerate(files)))
             | 'SpreadFiles' >> beam.Reshuffle())
  plan = (indexed
          | 'Count' >> beam.Map(_count_in_worker, text_field, max_bad_records)
          | 'AllCounts' >> beam.combiners.ToList()
          | 'Plan' >> beam.Map(_plan_and_report, validation_fraction, max_bad_records, report_path, corpus))
  examples = indexed | 'Read' >> beam.FlatMap(_examples_of_file, beam.pvalue.AsSingleton(plan),
                                              text_field).with_outputs('validation', main='train')
  return {'train': examples.train, 'validation': examples.validation}

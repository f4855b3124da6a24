"""Preparing a corpus ahead of training: on all cores of this machine, or on a cluster through Apache Beam.

  python -m jaxssl.prepare --corpus /data/web/ [--data_dir DIR] [--workers N]
  python -m jaxssl.prepare --corpus 'gs://BUCKET/c4/*.jsonl.zst' --data_dir gs://BUCKET/tfds \
      --runner DataflowRunner --project P --region R --temp_location gs://BUCKET/tmp --setup_file ./setup.py

Writes the same dataset (same folder, same records) that `python -m jaxssl.pretrain` would prepare for
--config.data.corpus / data_dir / validation_fraction / text_field with the same values, so the run finds it
prepared and starts at once. Without --runner, --workers processes read the files (default: all cores) and this
process writes the records; with --runner, a Beam pipeline on that runner does everything (one element per file;
arguments this job does not know are the pipeline's options). 'ptb', TFDS names and LANG=CORPUS lists are
prepared as pretrain would (each part of a list in turn).
"""
import argparse
import logging
import os
import sys
import time

from etils import epath
import tensorflow_datasets as tfds

from jaxssl.data import beam_prepare, corpora, corpus_builders, corpus_files, multilingual
from jaxssl.errors import UserError, exit_on_user_error

RUNNERS = ('DirectRunner', 'DataflowRunner', 'FlinkRunner', 'SparkRunner', 'PortableRunner', 'PrismRunner')


def parse_args(argv):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.prepare', description=__doc__.split('\n')[0])
  parser.add_argument('--corpus', required=True, help='as --config.data.corpus: files, directory, glob, gs://...')
  parser.add_argument('--data_dir', default='', help="as --config.data.data_dir ('' = $JAXSSL_DATA_DIR or "
                      '~/.cache/jaxssl/tfds)')
  parser.add_argument('--workers', type=int, default=0, help='reading processes beside the one writing (default: '
                      'all cores but one); with --runner DirectRunner, its direct_num_workers (default: all cores)')
  parser.add_argument('--runner', default='', help=f'a Beam runner ({", ".join(RUNNERS)}): prepare in a Beam '
                      'pipeline; options it does not know are passed to Beam')
  parser.add_argument('--validation_fraction', type=float, default=0.01, help='as --config.data.validation_fraction')
  parser.add_argument('--text_field', default='text', help='as --config.data.text_field (JSON Lines, Parquet)')
  parser.add_argument('--max_bad_records', type=int, default=0, help='as --config.data.max_bad_records')
  args, beam_args = parser.parse_known_args(argv)
  if beam_args and not args.runner:
    parser.error(f'unrecognized arguments: {" ".join(beam_args)} (Beam pipeline options need --runner)')
  if args.runner and args.runner not in RUNNERS:
    raise UserError(f'--runner {args.runner!r} is not a Beam runner jaxssl knows: use one of {", ".join(RUNNERS)}')
  if args.workers < 0:
    raise UserError(f'--workers {args.workers} must be >= 1 (or 0: the default)')
  cores = len(os.sched_getaffinity(0))
  args.workers = args.workers or (cores if args.runner else max(1, cores - 1))
  return args, beam_args


def _data_dir(data_dir: str) -> str:
  data_dir = data_dir or corpora.default_data_dir()
  return data_dir if '://' in data_dir else os.path.abspath(os.path.expanduser(data_dir))


def beam_download_config(runner: str, beam_args: list[str], workers: int):
  """A DownloadConfig whose Beam pipeline runs on `runner` with `beam_args` (plus, for the DirectRunner, its
  multi-process mode with `workers` processes unless beam_args say otherwise)."""
  from apache_beam.options import pipeline_options  # pylint: disable=import-outside-toplevel  # reason: heavy; Beam only
  args = [f'--runner={runner}'] + list(beam_args)
  if runner == 'DirectRunner':
    if not any(a.startswith('--direct_running_mode') for a in beam_args):
      args.append('--direct_running_mode=multi_processing')
    if not any(a.startswith('--direct_num_workers') for a in beam_args):
      args.append(f'--direct_num_workers={workers}')
  return tfds.download.DownloadConfig(beam_options=pipeline_options.PipelineOptions(args))


def prepare_local(corpus: str, data_dir: str, *, workers: int = 1, runner: str = '', beam_args=(),
                  validation_fraction: float = 0.01, text_field: str = 'text', max_bad_records: int = 0):
  """Prepares a local or bucket corpus of files (once: an already prepared one is reused); returns the builder.

  Without a runner, `workers` processes read the files and this one writes; with one, a Beam pipeline on it.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise UserError(f'--validation_fraction {validation_fraction} must be in [0, 1)')
  files = corpus_files.list_files(corpus)
  config = tfds.core.BuilderConfig(name=corpus_builders.local_config_name(files, validation_fraction, text_field,
                                                                           max_bad_records))
  common = dict(files=files, validation_fraction=validation_fraction, text_field=text_field, config=config,
                data_dir=data_dir, file_format='array_record')
  if runner:
    report = f'{data_dir}/{corpus_builders.JaxsslLocalText.name}/{config.name}.prepare_report.json'
    make = lambda: corpus_builders.JaxsslLocalTextBeam(max_bad_records=max_bad_records, report_path=report,
                                                       corpus=corpus, **common)
    try:
      builder = corpus_builders.prepared_builder(
          make, data_dir, download_config=beam_download_config(runner, beam_args, workers), local_copy=False)
    except Exception as e:  # pylint: disable=broad-except
      _explain_beam_failure(e, report, corpus, max_bad_records)
      raise
    _report_bad_records(report, corpus, max_bad_records)
    return builder
  counts = []

  def count():  # the writing process is idle meanwhile: one more reader
    counts[:], bad = beam_prepare.count_files(files, text_field, workers + 1, max_bad_records)
    bad.check(repr(corpus))  # as pretrain's own preparation (data/corpora.py) words it
    if sum(counts) == 0:
      raise beam_prepare.empty_corpus_error(corpus, len(files))

  make = lambda: corpus_builders.JaxsslLocalText(doc_counts=tuple(counts), workers=workers, **common)
  return corpus_builders.prepared_builder(make, data_dir, before_prepare=count, local_copy=False)


def _explain_beam_failure(error: Exception, report: str, corpus: str, max_bad_records: int) -> None:
  """A failed pipeline whose combine step found bad records or no documents: the UserError it raised there."""
  found = _take_report(report, max_bad_records)
  if found is None:
    if isinstance(error, UserError):
      raise error
    return
  documents, files, bad = found
  bad.check(repr(corpus))  # raises when there were too many
  if documents == 0:
    raise beam_prepare.empty_corpus_error(corpus, files) from None


def _report_bad_records(report: str, corpus: str, max_bad_records: int) -> None:
  found = _take_report(report, max_bad_records)
  if found is not None:
    found[2].check(repr(corpus))  # warns about the skipped ones


def _take_report(report: str, max_bad_records: int):
  """(documents, files, BadRecords) from the report the pipeline's combine step wrote, which is then removed."""
  found = beam_prepare.read_report(report, max_bad_records)
  if found is not None:
    epath.Path(report).unlink()
  return found


def corpus_parts(corpus: str) -> list[str]:
  """The corpora a data.corpus value names: itself, or each part of a LANG=CORPUS list."""
  if multilingual.is_multilingual(corpus):
    return [part[1] for part in multilingual.parse_spec(corpus)]
  return [corpus]


def main(argv=None):
  args, beam_args = parse_args(argv)
  logging.getLogger('apache_beam').setLevel(logging.WARNING)
  data_dir = _data_dir(args.data_dir)
  for corpus in corpus_parts(args.corpus):
    start = time.perf_counter()
    files = (corpus_files.is_url(corpus) or os.path.exists(corpus)
             or any(c in corpus for c in corpus_files.GLOB_CHARS))
    if not files:  # 'ptb', a TFDS name, or a mistake that load_corpus explains
      splits = corpora.load_corpus(corpus, data_dir, validation_fraction=args.validation_fraction)
      print(f'{corpus}: ' + ', '.join(f'{name} {len(src)}' for name, src in splits.items()) + f' under {data_dir}')
      continue
    builder = prepare_local(corpus, data_dir, workers=args.workers, runner=args.runner, beam_args=beam_args,
                            validation_fraction=args.validation_fraction, text_field=args.text_field,
                            max_bad_records=args.max_bad_records)
    splits = builder.info.splits
    print(f'{corpus}: train {splits["train"].num_examples} documents, validation '
          f'{splits["validation"].num_examples}, in {time.perf_counter() - start:.1f} s -> {builder.data_dir}')


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

"""Preparing a large JSON Lines corpus: wall time, MB/s, documents/s and the peak RSS of the whole process tree.

  python benchmarks/prepare_corpus.py [--size_gb 2] [--files 8] [--workers N[,N2...]] [--modes plain,workers,beam]
      [--dir DIR] [--keep] [--out results.json]

Generates --size_gb of web-like JSON Lines ({"text": ..., "url": ..., "id": ...}; documents of a few paragraphs
made of sentences over a Zipf-distributed vocabulary) in --files files, then prepares it in each mode, each into
a fresh data_dir:
  plain    corpora.load_corpus, what pretrain does by itself: one process counts, then reads and writes;
  workers  python -m jaxssl.prepare --workers N (for each N of --workers): N processes read, this one writes;
  beam     python -m jaxssl.prepare --runner DirectRunner --workers N (the largest N): Beam's DirectRunner in
           multi-process mode.
A thread samples the RSS of the job and all its children every 0.1 s; the peak of their sum is reported, next to
the corpus size. Each prepared dataset is checked to hold every document once.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(directory: str, size_bytes: int, num_files: int, seed: int = 0) -> tuple[int, int]:
  """Writes the corpus; returns (bytes, documents)."""
  rng = random.Random(seed)
  syllables = [c + v + e for c in ['', 'b', 'c', 'd', 'f', 'g', 'h', 'l', 'm', 'n', 'p', 'r', 's', 't', 'th', 'st']
               for v in 'aeiouy' for e in ['', '', 'n', 'r', 's', 't']]
  vocab = [''.join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))) for _ in range(30000)]
  zipf, cumulative = 0.0, []
  for rank in range(len(vocab)):
    zipf += 1.0 / (rank + 1)
    cumulative.append(zipf)
  sentences = []
  for _ in range(50000):
    words = rng.choices(vocab, cum_weights=cumulative, k=rng.randint(5, 30))
    sentences.append(' '.join(words).capitalize() + rng.choice('..!?'))
  os.makedirs(directory, exist_ok=True)
  per_file, total, docs = size_bytes // num_files, 0, 0
  for f in range(num_files):
    written = 0
    with open(os.path.join(directory, f'part-{f:05d}.jsonl'), 'w', encoding='utf-8') as out:
      while written < per_file:
        paragraphs = ['\n'.join(rng.choices(sentences, k=rng.randint(1, 8))) for _ in range(rng.randint(1, 6))]
        line = json.dumps({'text': '\n\n'.join(paragraphs), 'url': f'https://example.com/{docs}', 'id': docs}) + '\n'
        out.write(line)
        written += len(line.encode('utf-8'))
        docs += 1
    total += written
  return total, docs


class PeakRss:
  """Samples the summed RSS of a process and all its descendants from a thread."""

  def __init__(self, pid: int, interval: float = 0.1):
    self.peak, self._stop = 0, threading.Event()
    self._proc, self._interval = psutil.Process(pid), interval
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.is_set():
      try:
        procs = [self._proc] + self._proc.children(recursive=True)
      except psutil.NoSuchProcess:
        return
      rss = 0
      for p in procs:
        try:
          rss += p.memory_info().rss
        except psutil.NoSuchProcess:
          pass
      self.peak = max(self.peak, rss)
      self._stop.wait(self._interval)

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return self.peak


_PLAIN = 'import sys; from jaxssl.data import corpora; corpora.load_corpus(sys.argv[1], sys.argv[2])'


def prepare(corpus: str, data_dir: str, mode: str, workers: int) -> dict:
  """Runs one preparation in a subprocess; its wall time and the peak RSS of its process tree."""
  job = [sys.executable, '-m', 'jaxssl.prepare', '--corpus', corpus, '--data_dir', data_dir]
  cmd = {'plain': [sys.executable, '-c', _PLAIN, corpus, data_dir],
         'workers': job + ['--workers', str(workers)],
         'beam': job + ['--runner', 'DirectRunner', '--workers', str(workers)]}[mode]
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), TQDM_DISABLE='1')
  start = time.perf_counter()
  with open(os.path.join(data_dir + '.log'), 'w') as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = PeakRss(proc.pid)
    rc = proc.wait()
    peak = sampler.stop()
  wall = time.perf_counter() - start
  if rc != 0:
    raise SystemExit(f'{mode} failed (exit {rc}): see {data_dir}.log')
  return {'mode': mode, 'workers': 0 if mode == 'plain' else workers, 'wall_s': round(wall, 1),
          'peak_rss_mb': round(peak / 2**20)}


def count_records(data_dir: str) -> int:
  """Documents in the prepared dataset (train + validation, counted from its dataset_info.json)."""
  for here, _, names in os.walk(data_dir):
    if 'dataset_info.json' in names:
      info = json.load(open(os.path.join(here, 'dataset_info.json')))
      return sum(int(n) for split in info['splits'] for n in split.get('shardLengths', []))
  return 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size_gb', type=float, default=2.0)
  parser.add_argument('--files', type=int, default=8)
  cores = len(os.sched_getaffinity(0))
  parser.add_argument('--workers', default=','.join(map(str, sorted({max(1, cores - 1), cores}))),
                      help='reading processes for the workers mode, a comma list (default: cores-1,cores)')
  parser.add_argument('--modes', default='plain,workers')
  parser.add_argument('--dir', default='', help='where to generate (default: a temporary directory)')
  parser.add_argument('--keep', action='store_true', help='keep the corpus and the prepared datasets')
  parser.add_argument('--out', default='', help='also write the results here as JSON')
  args = parser.parse_args()
  work = args.dir or tempfile.mkdtemp(prefix='jaxssl_prepare_bench_')
  corpus = os.path.join(work, 'corpus')
  start = time.perf_counter()
  size, docs = generate(corpus, int(args.size_gb * 1e9), args.files)
  print(f'generated {size / 1e6:.0f} MB, {docs} documents in {args.files} files in '
        f'{time.perf_counter() - start:.0f} s ({corpus})', flush=True)
  results = {'corpus_mb': round(size / 1e6), 'documents': docs, 'files': args.files,
             'cpus': psutil.cpu_count(), 'ram_gb': round(psutil.virtual_memory().total / 2**30), 'runs': []}
  counts = [int(n) for n in args.workers.split(',')]
  runs = [(mode, n) for mode in args.modes.split(',')
          for n in {'plain': [0], 'workers': counts, 'beam': [max(counts)]}[mode]]
  for mode, workers in runs:
    data_dir = os.path.join(work, f'data_{mode}{workers or ""}')
    run = prepare(corpus, data_dir, mode, workers)
    written = count_records(data_dir)
    # The validation split of a one-document corpus repeats it; here every document is in exactly one split.
    assert written == docs, f'{mode}: {written} records for {docs} documents'
    run.update(mb_per_s=round(size / 1e6 / run['wall_s'], 1), docs_per_s=round(docs / run['wall_s']),
               peak_rss_vs_corpus=round(run['peak_rss_mb'] * 2**20 / size, 3))
    results['runs'].append(run)
    print(json.dumps(run), flush=True)
    if not args.keep:
      shutil.rmtree(data_dir)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1)
  if not args.keep and not args.dir:
    shutil.rmtree(work)


if __name__ == '__main__':
  main()

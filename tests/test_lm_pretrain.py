"""GPT pretraining: documents packed into full rows (a pure function of (seed, step)), and the pretraining job with
the GPT config: loss falls, held-out perplexity per token and per word, exact resume from a checkpoint."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from jaxssl.data.examples import packed_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Docs:
  """A data source of {'text': bytes} documents (sentences separated by newlines)."""

  def __init__(self, docs):
    self.docs = [{'text': '\n'.join(d).encode()} for d in docs]

  def __len__(self):
    return len(self.docs)

  def __getitems__(self, indices):
    return [self.docs[i] for i in indices]


class WordTokenizer:
  """Each word is one id (10 + its length); sep_id 3 ends a document."""
  sep_id = 3

  def encode(self, texts):
    return [[10 + len(w) for w in t.split()] for t in texts]


def test_packed_rows_cover_each_epoch_once_and_restart_per_document():
  rng = np.random.default_rng(0)
  docs = [[' '.join('x' * int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 9))))
           for _ in range(int(rng.integers(1, 4)))] for _ in range(23)]
  packed = packed_lm.PackedDocuments(Docs(docs), WordTokenizer(), seq_len=16, seed=5)
  per_epoch = packed.tokens_per_epoch
  rows_per_epoch = -(-per_epoch // 16)
  rows = packed.rows(range(rows_per_epoch + 3))
  # The same rows again, one at a time and in another order: a pure function of (seed, row).
  again = {g: packed.rows([g]) for g in reversed(range(rows_per_epoch + 3))}
  for k in rows:
    np.testing.assert_array_equal(rows[k], np.concatenate([again[g][k] for g in range(rows_per_epoch + 3)]))
  # Epoch 0's stream is every document once, in the epoch's order, each followed by the end token.
  order, _ = packed._epoch(0)  # pylint: disable=protected-access
  stream = [t for d in order for t in [i for s in WordTokenizer().encode(docs[d]) for i in s] + [3]]
  np.testing.assert_array_equal(rows['input_ids'].reshape(-1)[:per_epoch], stream)
  # Within a row, segments count up by document piece, positions restart at 0 with each.
  for ids, seg, pos in zip(rows['input_ids'], rows['segment_ids'], rows['positions']):
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg > 0)
    starts = np.concatenate([[True], seg[1:] != seg[:-1]])
    assert np.all(pos[starts] == 0) and np.all(pos[~starts] == pos[np.where(~starts)[0] - 1] + 1)
  # Shares of two processes concatenate to the global batch.
  whole = packed_lm.local_rows(packed, 2, global_batch_size=4)
  parts = [packed_lm.local_rows(packed, 2, global_batch_size=4, process_index=p, process_count=2) for p in (0, 1)]
  np.testing.assert_array_equal(whole['input_ids'], np.concatenate([p['input_ids'] for p in parts]))


def run_job(workdir, corpus, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/gpt.py:tiny', f'--config.data.corpus={corpus}',
         '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.max_position=32', '--config.data.seq_len=32',
         '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8', '--config.train.steps=60',
         '--config.train.warmup_steps=5', '--config.log.every_steps=1', '--config.eval.every_steps=30',
         '--config.eval.batches=2', '--config.checkpoint.every_steps=30', '--config.data.num_threads=1',
         '--workdir', str(workdir), *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_gpt_pretrain_job_learns_and_resumes_exactly(tmp_path):
  import treebank
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:1200]
  corpus = tmp_path / 'ptb.txt'
  corpus.write_text('\n\n'.join('\n'.join(lines[i:i + 8]) for i in range(0, len(lines), 8)) + '\n')
  result = run_job(tmp_path / 'a', corpus)
  assert result.returncode == 0, result.stderr[-3000:]
  recs = records(tmp_path / 'a')
  losses = {r['step']: r['loss'] for r in recs if 'loss' in r}
  assert np.mean([losses[s] for s in range(51, 61)]) < np.mean([losses[s] for s in range(1, 11)]) - 0.5
  evals = [r for r in recs if 'eval_perplexity' in r]
  assert [r['step'] for r in evals] == [30, 60]
  assert evals[-1]['eval_perplexity'] < evals[0]['eval_perplexity'] < 300
  # Pieces are shorter than words, so a word costs more nats than a piece on average.
  assert evals[-1]['eval_word_perplexity'] > evals[-1]['eval_perplexity']

  # Resume from step 30 (as after a crash there): steps 31..60 reproduce the uninterrupted run exactly.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '60')
  result = run_job(tmp_path / 'b', corpus)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 30' in result.stdout
  resumed = {r['step']: r['loss'] for r in records(tmp_path / 'b') if 'loss' in r}
  np.testing.assert_array_equal([resumed[s] for s in range(31, 61)], [losses[s] for s in range(31, 61)])

  # Export, then continue two prompts of different lengths with the generate job (greedy, KV cache).
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2')
  job = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=ROOT, env=env, capture_output=True,
                                     text=True, timeout=600)
  exported = job('jaxssl.export', '--workdir', str(tmp_path / 'a'), '--out', str(tmp_path / 'params'))
  assert exported.returncode == 0, exported.stderr[-3000:]
  generated = job('jaxssl.generate', '--params', str(tmp_path / 'params'), '--prompt', 'the company said',
                  '--prompt', 'in new york stock exchange composite trading', '--max-new-tokens', '8', '--greedy',
                  '--json')
  assert generated.returncode == 0, generated.stderr[-3000:]
  lines = [json.loads(line) for line in generated.stdout.strip().splitlines()]
  assert [l['prompt'] for l in lines] == ['the company said', 'in new york stock exchange composite trading']
  assert all(1 <= len(l['generated_ids']) <= 8 and l['prompt_ids'] for l in lines)
  # On one device the job keeps its traced program beside the compile cache: the second run loads it (the same
  # text), a damaged one is compiled again and replaced.
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'))
  one = ('jaxssl.generate', '--params', str(tmp_path / 'params'), '--prompt', 'the company said', '--greedy',
         '--max-new-tokens', '8')
  first = job(*one)
  assert first.returncode == 0, first.stderr[-3000:]
  [saved] = os.listdir(tmp_path / 'cache' / 'jaxssl_programs')
  saved = tmp_path / 'cache' / 'jaxssl_programs' / saved
  [kept] = os.listdir(tmp_path / 'cache' / 'jaxssl_weights')  # the weights as one file the next start maps
  kept = tmp_path / 'cache' / 'jaxssl_weights' / kept
  # The loading start imports neither flax nor scipy (LAPACK's setup, which this program does not need) nor orbax
  # (the weights come from the kept file).
  env.update(PYTHONPROFILEIMPORTTIME='1')
  loading = job(*one)
  env.pop('PYTHONPROFILEIMPORTTIME')
  assert loading.stdout == first.stdout
  imported = {line.rsplit('|', 1)[-1].strip() for line in loading.stderr.splitlines() if line.startswith('import time')}
  assert 'jax' in imported and not {'flax', 'scipy', 'orbax'} & imported
  assert os.listdir(kept.parent) == [kept.name]  # found, not written again
  saved.write_bytes(saved.read_bytes()[:200])
  assert job(*one).stdout == first.stdout and len(saved.read_bytes()) > 200
  size = kept.stat().st_size
  kept.write_bytes(kept.read_bytes()[:size // 2])  # damaged: restored through orbax and written again
  assert job(*one).stdout == first.stdout and kept.stat().st_size == size
  assert job(*one).stdout == first.stdout
  # Every layer kernel output-major (what a big decoder's kernels are): a program and a weights file of their own,
  # kept so; the same text cold and warm.
  env.update(JAXSSL_OUT_MAJOR_MIN_BYTES='0')
  assert job(*one).stdout == first.stdout and len(os.listdir(kept.parent)) == 2
  assert job(*one).stdout == first.stdout and len(os.listdir(kept.parent)) == 2
  env.pop('JAXSSL_OUT_MAJOR_MIN_BYTES')
  bert = job('jaxssl.generate', '--params', str(tmp_path / 'nope'), '--prompt', 'x')
  assert bert.returncode == 2 and bert.stderr.strip().splitlines()[-1] == (
      f'error: {tmp_path / "nope"} does not exist (not a jaxssl export): check the path, or create an export with '
      'python -m jaxssl.export')
  # Bad settings name the job's flags (generate_program.FLAGS), one line, exit 2, before anything compiles.
  params = str(tmp_path / 'params')
  for flags, message in [(('--max-new-tokens', '0'), '--max-new-tokens=0 must be at least 1'),
                         (('--temperature', '0', '--max-new-tokens', '8'), '--temperature=0.0 must be positive (or pass --greedy)'),
                         (('--top-p', '0', '--max-new-tokens', '8'), '--top-k=0 must be >= 0 and --top-p=0.0 in (0, 1]'),
                         (('--max-new-tokens', '100000', '--greedy'), '+ --max-new-tokens 100000 exceeds model.')]:
    bad = job('jaxssl.generate', '--params', params, '--prompt', 'the company said', *flags)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith('error: ') and message in last, bad.stderr[-2000:]

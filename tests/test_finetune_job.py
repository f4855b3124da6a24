"""Fine-tune job end to end: a tiny pre-trained export + a new head learns each task shape from small local data."""
import json
import os
import random
import re
import shutil
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE, NEGATIVE = ['good', 'great', 'fine', 'lovely'], ['bad', 'awful', 'poor', 'dull']
FILLER = 'the a film movie plot actor was is very quite and but story scene'.split()
NAMES, CITIES = ['John', 'Mary'], ['Paris', 'Rome']


def sentence(rng, word):
  words = rng.choices(FILLER, k=rng.randint(3, 8))
  words.insert(rng.randint(0, len(words)), word)
  return ' '.join(words)


def job(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A tiny BERT pretrained by `python -m jaxssl.pretrain` on text of the tasks' words (its own sentencepiece
  tokenizer included) and exported by `python -m jaxssl.export`: the start of every fine-tune run here."""
  base = tmp_path_factory.mktemp('pretrained')
  rng = random.Random(0)
  docs = [[sentence(rng, w) for w in rng.sample(POSITIVE + NEGATIVE, 4)] + [f'{rng.choice(NAMES)} lives in '
                                                                               f'{rng.choice(CITIES)} where']
          + [' '.join(w for w, _ in pos_sentence(rng))] for _ in range(100)]  # punctuation gets its own pieces
  (base / 'corpus.txt').write_text('\n\n'.join('\n'.join(d) for d in docs) + '\n')
  result = job('jaxssl.pretrain', '--config', 'configs/bert.py:tiny', f'--config.data.corpus={base / "corpus.txt"}',
               '--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
               '--config.model.intermediate_size=64', '--config.model.max_position=32', '--config.data.seq_len=32',
               '--config.data.max_predictions=5', '--config.tokenizer.vocab_size=64', '--config.train.steps=40',
               '--config.train.batch_size=8', '--config.train.warmup_steps=5', '--config.eval.batches=1',
               '--config.eval.every_steps=40', '--config.checkpoint.every_steps=40', '--config.data.num_threads=1',
               '--workdir', str(base / 'run'))
  assert result.returncode == 0, result.stderr[-3000:]
  result = job('jaxssl.export', '--workdir', str(base / 'run'), '--out', str(base / 'params'))
  assert result.returncode == 0, result.stderr[-3000:]
  return str(base / 'params')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """runs/{task}: one fine-tune workdir per task, named as the evaluate suite's {task} pattern expects."""
  return tmp_path_factory.mktemp('runs')


def run_finetune(variant, export_dir, workdir, train, dev, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  cmd = [sys.executable, '-m', 'jaxssl.finetune', '--config', f'configs/finetune.py:{variant}',
         f'--config.init_from={export_dir}', f'--config.task.train={train}', f'--config.task.dev={dev}',
         '--config.data.seq_len=24', '--config.train.steps=150', '--config.train.batch_size=16',
         '--config.train.learning_rate=1e-3', '--config.train.warmup_steps=10', '--config.eval.every_steps=50',
         '--config.checkpoint.every_steps=50', '--config.log.every_steps=25', '--workdir', str(workdir), *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def best_dev(workdir):
  with open(os.path.join(workdir, 'export', 'config.json')) as f:
    return json.load(f)['best']


def write_sentiment(path, n, seed, pair=False):
  rng = random.Random(seed)
  with open(path, 'w') as f:
    f.write('text_a\ttext_b\tlabel\n' if pair else 'text\tlabel\n')
    for _ in range(n):
      label = rng.random() < 0.5
      word = rng.choice(POSITIVE if label else NEGATIVE)
      if pair:
        f.write(f'{sentence(rng, word)}\t{sentence(rng, "")}\t{"yes" if label else "no"}\n')
      else:
        f.write(f'{sentence(rng, word)}\t{"pos" if label else "neg"}\n')


def finetuned(variant, export_dir, workdir, train, dev, *extra):
  result = run_finetune(variant, export_dir, workdir, train, dev, *extra)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope='module')
def classification_run(export_dir, runs, tmp_path_factory):
  data = tmp_path_factory.mktemp('sentiment')
  write_sentiment(data / 'train.tsv', 400, 1)
  write_sentiment(data / 'dev.tsv', 100, 2)
  return finetuned('classification', export_dir, runs / 'classification', data / 'train.tsv', data / 'dev.tsv')


@pytest.fixture(scope='module')
def pair_run(export_dir, runs, tmp_path_factory):
  data = tmp_path_factory.mktemp('pairs')
  write_sentiment(data / 'train.tsv', 400, 3, pair=True)
  write_sentiment(data / 'dev.tsv', 100, 4, pair=True)
  return finetuned('pair', export_dir, runs / 'pair', data / 'train.tsv', data / 'dev.tsv')


def write_tagging(path, n, seed):
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for _ in range(n):
      words = rng.choices(FILLER, k=5)
      pos = rng.randint(0, 4)
      words[pos] = rng.choice(NAMES + CITIES)
      for i, w in enumerate(words):
        tag = ('B-PER' if w in NAMES else 'B-LOC') if i == pos else 'O'
        f.write(f'{w}\t{tag}\n')
      f.write('\n')


# Penn Treebank POS tags, as a POS file (the README's pos/train.conll) carries them: one tag per word, the
# punctuation tags `` '' -LRB- -RRB- $ # : , . included.
NOUNS = ['film', 'movie', 'plot', 'actor', 'story', 'scene']
PTB_TAGS = {'the': 'DT', 'a': 'DT', 'was': 'VBD', 'is': 'VBZ', 'very': 'RB', 'quite': 'RB', **{w: 'NN' for w in NOUNS},
            **{w: 'JJ' for w in POSITIVE + NEGATIVE}, **{w: 'NNP' for w in NAMES + CITIES}}


def pos_sentence(rng):
  """[(word, PTB tag)]: e.g. `` Rome is : the film was very good '' ( $ 5 ) , # 2 ."""
  words = [rng.choice(NAMES + CITIES), rng.choice(['is', 'was'])] if rng.random() < 0.3 else []
  words += [rng.choice(['the', 'a']), rng.choice(NOUNS), rng.choice(['is', 'was'])]
  if rng.random() < 0.5:
    words.append(rng.choice(['very', 'quite']))
  words.append(rng.choice(POSITIVE + NEGATIVE))
  tagged = [(w, PTB_TAGS[w]) for w in words]
  if rng.random() < 0.5:
    tagged = [('``', '``'), *tagged, ("''", "''")]
  if rng.random() < 0.4:
    tagged.insert(len(tagged) // 2, (':', ':'))
  if rng.random() < 0.4:
    tagged += [('(', '-LRB-'), ('$', '$'), (rng.choice(['5', '12', '30']), 'CD'), (')', '-RRB-')]
  if rng.random() < 0.3:
    tagged += [(',', ','), ('#', '#'), (rng.choice(['2', '7']), 'CD')]
  return tagged + [('.', '.')]


def write_pos(path, n, seed):
  rng = random.Random(seed)
  with open(path, 'w') as f:
    for _ in range(n):
      f.write(''.join(f'{w}\t{t}\n' for w, t in pos_sentence(rng)) + '\n')


@pytest.fixture(scope='module')
def pos_files(tmp_path_factory):
  data = tmp_path_factory.mktemp('pos')
  write_pos(data / 'train.conll', 300, 8)
  write_pos(data / 'dev.conll', 60, 9)
  return data / 'train.conll', data / 'dev.conll'


@pytest.fixture(scope='module')
def tagging_run(export_dir, runs, pos_files):
  """The README's tagging run: POS tags (no span scheme), so token accuracy is the dev figure."""
  # Punctuation words start with a bare '▁' piece here, where their tag sits: learning to read the next piece
  # takes longer than NER's whole-word names.
  result = run_finetune('tagging', export_dir, runs / 'tagging', *pos_files, '--config.train.steps=500',
                        '--config.train.learning_rate=2e-3', '--config.data.seq_len=32')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tags: no span scheme (BIO/IOB1/IOBES), token_accuracy only | best by dev token_accuracy' in result.stdout
  return runs / 'tagging'


@pytest.fixture(scope='module')
def qa_run(export_dir, runs, tmp_path_factory):
  data = tmp_path_factory.mktemp('squad')
  write_squad(data / 'train.json', 300, 6)
  write_squad(data / 'dev.json', 60, 7)
  return finetuned('qa', export_dir, runs / 'qa', data / 'train.json', data / 'dev.json', '--config.train.steps=250',
                   '--config.task.doc_stride=8', '--config.task.max_query_length=4')


def test_classification_learns_and_exports_best(classification_run):
  best = best_dev(classification_run)
  assert best['metrics']['accuracy'] > 0.9, best
  exported = json.load(open(classification_run / 'export' / 'config.json'))
  assert exported['task']['labels'] == ['neg', 'pos']
  with open(classification_run / 'metrics.jsonl') as f:
    assert any('dev_accuracy' in json.loads(line) for line in f)


def test_bfloat16_compute_where_the_cpu_has_it(export_dir, tmp_path, monkeypatch):
  """model.dtype=auto on a CPU with bfloat16 instructions (JAXSSL_CPU_BF16=1 stands in for one; conftest pins 0):
  the banner says so, the run learns, and the export computes as the run did, so the evaluate job gives its dev
  figures. model.dtype=float32 keeps float32."""
  write_sentiment(tmp_path / 'train.tsv', 400, 1)
  write_sentiment(tmp_path / 'dev.tsv', 100, 2)
  monkeypatch.setenv('JAXSSL_CPU_BF16', '1')
  result = run_finetune('classification', export_dir, tmp_path / 'w', tmp_path / 'train.tsv', tmp_path / 'dev.tsv',
                        '--config.train.steps=100')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'compute bfloat16 (auto: this CPU has bfloat16 instructions)' in result.stdout
  best = best_dev(tmp_path / 'w')
  assert best['metrics']['accuracy'] > 0.9, best
  exported = json.load(open(tmp_path / 'w' / 'export' / 'config.json'))
  assert exported['model']['dtype'] == 'bfloat16' and exported['finetune']['model']['dtype'] == 'auto'
  report = job('jaxssl.evaluate', '--config', 'configs/eval.py:task', f'--config.params={tmp_path / "w" / "export"}',
               '--out', str(tmp_path / 'results.json'))
  assert report.returncode == 0, report.stderr[-3000:]
  (figures,) = json.load(open(tmp_path / 'results.json'))['tasks'].values()
  assert figures['accuracy'] == pytest.approx(best['metrics']['accuracy'], abs=1e-6)
  pinned = run_finetune('classification', export_dir, tmp_path / 'w32', tmp_path / 'train.tsv', tmp_path / 'dev.tsv',
                        '--config.train.steps=1', '--config.model.dtype=float32')
  assert pinned.returncode == 0 and 'compute float32 |' in pinned.stdout, pinned.stderr[-3000:]
  assert json.load(open(tmp_path / 'w32' / 'export' / 'config.json'))['model']['dtype'] == 'float32'


def test_pair_learns(pair_run):
  assert best_dev(pair_run)['metrics']['accuracy'] > 0.9


def test_packed_batches_train_alike_on_one_process_and_two(export_dir, tmp_path):
  """Pairs are packed (data.packing=auto, the banner says so), and the same run as 2 processes
  (tpu/local_pod.py) logs the same losses: every process packs the global batch alike and feeds its share."""
  write_sentiment(tmp_path / 'train.tsv', 64, 5, pair=True)
  write_sentiment(tmp_path / 'dev.tsv', 16, 6, pair=True)
  args = ['--config.train.steps=12', '--config.log.every_steps=4', '--config.eval.every_steps=12',
          '--config.checkpoint.every_steps=12']
  one = run_finetune('pair', export_dir, tmp_path / 'one', tmp_path / 'train.tsv', tmp_path / 'dev.tsv', *args)
  assert one.returncode == 0, one.stderr[-3000:]
  assert 'training examples packed into rows of 24' in one.stdout
  assert re.search(r'\| attention (xla \(auto, cpu\)|explicit \(attention dropout [0-9.]+\)) \|', one.stdout)
  # 12 steps: too few to pay back unrolled compiles (train/layer_loop.py)
  assert re.search(r"\| layers in a loop \(auto, cpu: 12 steps over \d train shapes?, under 100 a shape\) \|",
                   one.stdout)
  cmd = [sys.executable, os.path.join(ROOT, 'tpu', 'local_pod.py'), '--processes', '2', '--devices-per-process', '1',
         '--', sys.executable, '-m', 'jaxssl.finetune', '--config', 'configs/finetune.py:pair',
         f'--config.init_from={export_dir}', f'--config.task.train={tmp_path / "train.tsv"}',
         f'--config.task.dev={tmp_path / "dev.tsv"}', '--config.data.seq_len=24', '--config.train.batch_size=16',
         '--config.train.learning_rate=1e-3', '--config.train.warmup_steps=10', *args, '--workdir',
         str(tmp_path / 'two')]
  two = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stderr[-3000:]

  def losses(workdir):
    with open(workdir / 'metrics.jsonl') as f:
      return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}
  expected, got = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert sorted(got) == sorted(expected) == [4, 8, 12]
  for step in expected:
    assert abs(got[step] - expected[step]) <= 1e-5 * abs(expected[step]), (step, got, expected)


def test_pos_tagging_learns_and_reports_token_accuracy_only(tagging_run):
  best = best_dev(tagging_run)
  assert set(best['metrics']) == {'token_accuracy'} and best['metrics']['token_accuracy'] > 0.9, best
  exported = json.load(open(tagging_run / 'export' / 'config.json'))
  assert {'``', "''", '-LRB-', '-RRB-', '$', '#', ':', ',', '.', 'NNP', 'VBZ'} <= set(exported['task']['labels'])
  assert exported['finetune']['task']['tag_scheme'] == 'none'
  assert exported['finetune']['task']['best_metric'] == 'token_accuracy'


def test_ner_tagging_learns_span_f1(export_dir, tmp_path):
  write_tagging(tmp_path / 'train.conll', 300, 8)
  write_tagging(tmp_path / 'dev.conll', 60, 9)
  result = run_finetune('tagging', export_dir, tmp_path / 'ner', tmp_path / 'train.conll', tmp_path / 'dev.conll',
                        '--config.train.steps=300')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'tags BIO (span precision/recall/f1 + token_accuracy) | best by dev f1' in result.stdout
  # Tagged sentences are packed too (train/packing.py); dev batches are cut finer on CPU (length_buckets.py).
  assert '| training examples packed into rows of 24, dev batches padded to 8/16/24 |' in result.stdout
  # 300 steps of a few packed row counts: the train step unrolled, dev batches in the loop (train/layer_loop.py)
  assert re.search(r'\| layers unrolled in training, in a loop for dev \(auto, cpu: 300 steps over \d train shapes?, '
                   r'at least 100 a shape\) \|', result.stdout)
  best = best_dev(tmp_path / 'ner')
  assert best['metrics']['f1'] > 0.8 and best['metrics']['token_accuracy'] > 0.9, best


def test_best_metric_the_task_lacks_is_refused_before_training(export_dir, pos_files, tmp_path):
  result = run_finetune('tagging', export_dir, tmp_path / 'w', *pos_files, '--config.task.best_metric=f1')
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == (
      "error: task.best_metric='f1' is not a dev metric of this task (the training tags are not a BIO, IOB1 or "
      "IOBES span scheme, so no span precision/recall/f1): use one of token_accuracy")
  assert not os.path.exists(tmp_path / 'w' / 'checkpoints')


def test_failing_dev_metric_loses_no_training(export_dir, pos_files, tmp_path, monkeypatch, capsys):
  """The checkpoint of an eval step is written before its dev metrics run: a metric that raises leaves it on
  disk, and the rerun resumes from it, finishing that evaluation first."""
  from jaxssl import config as config_lib
  from jaxssl.tasks import metrics as metrics_lib
  from jaxssl.train import finetune
  config = config_lib.load_config('configs/finetune.py:tagging')
  config_lib.parse_overrides(config, [
      f'--config.init_from={export_dir}', f'--config.task.train={pos_files[0]}', f'--config.task.dev={pos_files[1]}',
      '--config.data.seq_len=24', '--config.train.steps=6', '--config.train.batch_size=8',
      '--config.eval.every_steps=3', '--config.eval.batch_size=8', '--config.checkpoint.every_steps=100',
      '--config.log.every_steps=3'])
  workdir = tmp_path / 'pos'

  def broken_metric(*args, **kwargs):
    raise RuntimeError('a bug in a dev metric')

  monkeypatch.setattr(metrics_lib, 'token_accuracy', broken_metric)
  with pytest.raises(RuntimeError, match='a bug in a dev metric'):
    finetune.run_finetuning(config, str(workdir))
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3']
  monkeypatch.undo()
  capsys.readouterr()
  best = finetune.run_finetuning(config, str(workdir))
  out = capsys.readouterr().out
  assert 'resuming from step 3 → 6' in out and 'dev at step 3: token_accuracy=' in out, out
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['3', '6']
  assert best['step'] in (3, 6) and set(best['metrics']) == {'token_accuracy'}

  def dev_steps():
    with open(workdir / 'metrics.jsonl') as f:
      return [r['step'] for r in map(json.loads, f) if 'dev_token_accuracy' in r]

  assert dev_steps() == [3, 6]
  # Rerunning the finished run evaluates nothing again (its last evaluation finished) and returns the same best.
  capsys.readouterr()
  assert finetune.run_finetuning(config, str(workdir)) == best
  assert 'dev at step' not in capsys.readouterr().out
  assert dev_steps() == [3, 6]
  # Without the record (say, a run killed after the metrics row but before it), the evaluation runs again.
  os.remove(workdir / finetune.DEV_DONE)
  assert finetune.run_finetuning(config, str(workdir)) == best
  assert 'dev at step 6: token_accuracy=' in capsys.readouterr().out
  assert dev_steps() == [3, 6]
  # Checkpoints deleted, the workdir kept: a new run does not take the old record for its own.
  shutil.rmtree(workdir / 'checkpoints')
  with pytest.raises(RuntimeError, match='a bug in a dev metric'):
    monkeypatch.setattr(metrics_lib, 'token_accuracy', broken_metric)
    finetune.run_finetuning(config, str(workdir))
  assert not os.path.exists(workdir / finetune.DEV_DONE)


def test_extractive_qa_learns_across_windows(qa_run):
  best = best_dev(qa_run)
  assert best['metrics']['exact_match'] > 0.8 and best['metrics']['f1'] > 0.8, best


def test_regression_learns(export_dir, tmp_path):
  rng = random.Random(5)
  for name, n in (('reg_train.tsv', 400), ('reg_dev.tsv', 100)):
    with open(tmp_path / name, 'w') as f:
      f.write('text\tlabel\n')
      for _ in range(n):
        label = rng.random() < 0.5
        f.write(f'{sentence(rng, rng.choice(POSITIVE if label else NEGATIVE))}\t{1.0 if label else 0.0}\n')
  result = run_finetune('regression', export_dir, tmp_path / 'r', tmp_path / 'reg_train.tsv', tmp_path / 'reg_dev.tsv',
                        '--config.train.steps=250')
  assert result.returncode == 0, result.stderr[-3000:]
  assert best_dev(tmp_path / 'r')['metrics']['pearson'] > 0.8


def test_end_to_end_evaluate_suite_of_the_four_shapes(runs, classification_run, pair_run, tagging_run, qa_run,
                                                      tmp_path):
  """pretrain → export → fine-tune the four shapes → one evaluate suite → the figures read back from results.json
  are each run's best dev figures (the README's walk-through)."""
  out = tmp_path / 'results.json'
  result = job('jaxssl.evaluate', '--config', 'configs/eval.py:task',
               '--config.tasks=classification,pair,tagging,qa', f'--config.params={runs}/{{task}}/export',
               '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(out))
  workdirs = {'classification': classification_run, 'pair': pair_run, 'tagging': tagging_run, 'qa': qa_run}
  assert set(report['tasks']) == set(workdirs)
  for name, workdir in workdirs.items():
    best = best_dev(workdir)
    for metric, value in best['metrics'].items():
      assert report['tasks'][name][metric] == pytest.approx(value, abs=1e-6), (name, metric)
    assert report['headline'][name] == pytest.approx(best['value'], abs=1e-6)
  assert report['average'] == pytest.approx(sum(report['headline'].values()) / 4)
  assert report['average_kind'] == 'mean of task scores'
  assert set(report['throughput']) == set(workdirs)  # each set's examples/s, compile included
  assert all(t['examples'] > 0 and t['examples_per_second'] > 0 for t in report['throughput'].values())
  assert 'average' in result.stdout and 'qa' in result.stdout


def test_finetune_bad_inputs(export_dir, classification_run, tmp_path):
  write_sentiment(tmp_path / 'train.tsv', 20, 1)
  missing = run_finetune('classification', export_dir, tmp_path / 'w', tmp_path / 'nope.tsv', tmp_path / 'train.tsv')
  assert missing.returncode == 2 and 'not found' in missing.stderr.strip().splitlines()[-1]
  no_params = run_finetune('classification', str(tmp_path / 'no_export'), tmp_path / 'w2', tmp_path / 'train.tsv',
                           tmp_path / 'train.tsv')
  assert no_params.returncode == 2 and 'jaxssl export' in no_params.stderr.strip().splitlines()[-1]
  fine_tuned = run_finetune('classification', str(classification_run / 'export'), tmp_path / 'w3',
                            tmp_path / 'train.tsv', tmp_path / 'train.tsv')
  assert fine_tuned.returncode == 2 and 'is a fine-tuned export' in fine_tuned.stderr.strip().splitlines()[-1]
  too_long = run_finetune('classification', export_dir, tmp_path / 'w4', tmp_path / 'train.tsv',
                          tmp_path / 'train.tsv', '--config.data.seq_len=64')
  assert too_long.returncode == 2 and "exceeds the model's max_position=32" in too_long.stderr.strip().splitlines()[-1]
  never_logged = run_finetune('classification', export_dir, tmp_path / 'w5', tmp_path / 'train.tsv',
                              tmp_path / 'train.tsv', '--config.log.every_steps=0')
  assert never_logged.returncode == 2 and 'log.every_steps=0 must be positive' in never_logged.stderr.splitlines()[-1]
  bad_dtype = run_finetune('classification', export_dir, tmp_path / 'w6', tmp_path / 'train.tsv',
                           tmp_path / 'train.tsv', '--config.model.dtype=float16')
  assert bad_dtype.returncode == 2 and bad_dtype.stderr.strip().splitlines()[-1].endswith(
      "model.dtype='float16': use one of auto, float32, bfloat16 (--config.model.dtype=...)")
  assert not os.path.exists(tmp_path / 'w3') or not os.listdir(tmp_path / 'w3')
  # Refused before the workdir lock: a wrong --config.init_from or config value leaves no folder behind.
  assert not any(os.path.exists(tmp_path / w) for w in ('w2', 'w5', 'w6'))


def write_squad(path, n, seed):
  """Contexts of filler words with one city in them; the question asks for the city."""
  rng = random.Random(seed)
  articles = []
  for i in range(n):
    words = rng.choices(FILLER, k=rng.randint(6, 30))  # the longer ones span several windows
    city = rng.choice(['Paris', 'Rome'])
    words.insert(rng.randint(0, len(words)), city)
    context = ' '.join(words)
    start = context.index(city)
    articles.append({'paragraphs': [{'context': context, 'qas': [
        {'id': f'q{i}', 'question': 'where', 'answers': [{'text': city, 'answer_start': start}]}]}]})
  with open(path, 'w') as f:
    json.dump({'data': articles}, f)


def test_crosslingual_table(export_dir, classification_run, tmp_path):
  """Fine-tune on one language with other languages' dev sets as eval sets (--config.task.eval_sets=a=F,b=G),
  then evaluate configs/eval.py:crosslingual: each language's transfer score, and an in-language baseline row."""
  write_sentiment(tmp_path / 'train.tsv', 200, 11)
  write_sentiment(tmp_path / 'dev_en.tsv', 60, 12)
  write_sentiment(tmp_path / 'dev_xx.tsv', 60, 13)  # stands in for a second language's dev set
  run = finetuned('classification', export_dir, tmp_path / 'en', tmp_path / 'train.tsv', tmp_path / 'dev_en.tsv',
                  f'--config.task.eval_sets=en={tmp_path / "dev_en.tsv"},xx={tmp_path / "dev_xx.tsv"}',
                  '--config.train.steps=20', '--config.eval.every_steps=20', '--config.checkpoint.every_steps=20')
  out = tmp_path / 'results.json'
  result = job('jaxssl.evaluate', '--config', 'configs/eval.py:crosslingual', f'--config.params={run}/export',
               f'--config.baselines=xx={classification_run}/export', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(out))
  assert set(report['tasks']) == {'en', 'xx'}
  table = report['crosslingual']
  assert table['en'] == {'transfer': pytest.approx(report['headline']['en']), 'baseline': None}
  assert table['xx']['transfer'] == pytest.approx(report['headline']['xx'])
  # The baseline export names no 'xx' set, so it is scored on its own dev set: its best dev figure.
  assert table['xx']['baseline'] == pytest.approx(best_dev(classification_run)['value'], abs=1e-6)
  assert 'in-language baseline' in result.stdout
  bad = job('jaxssl.evaluate', '--config', 'configs/eval.py:crosslingual', f'--config.params={run}/export',
            '--config.baselines=xx', '--out', str(tmp_path / 'bad.json'))
  assert bad.returncode == 2 and 'name=value' in bad.stderr, bad.stderr[-500:]


def test_tag_scheme_and_best_metric_resolution():
  """The span scheme comes from the training tags (or task.tag_scheme); best_metric defaults to what the task
  reports, and a name it does not report, an unknown scheme or tags the scheme cannot decode are UserErrors."""
  from jaxssl import config as config_lib
  from jaxssl import tasks
  from jaxssl.errors import UserError
  from jaxssl.tasks import Example, tagging

  def task(variant='tagging', **overrides):
    config = config_lib.load_config(f'configs/finetune.py:{variant}')
    config_lib.parse_overrides(config, ['--config.task.train=train.conll', '--config.task.dev=dev.conll',
                                        *(f'--config.task.{k}={v}' for k, v in overrides.items())])
    return config.task

  rng = random.Random(0)
  pos = [Example(tokens=[w for w, _ in s], tags=[t for _, t in s]) for s in (pos_sentence(rng) for _ in range(5))]
  ner = [Example(tokens=['John', 'lives'], tags=['B-PER', 'O']), Example(tokens=['in', 'Rome'], tags=['O', 'B-LOC'])]
  t = task()
  t.tag_scheme = tagging.resolve_tag_scheme(t, pos, pos)
  assert t.tag_scheme == 'none' and tasks.get(t.kind).metric_names(t, []) == ('token_accuracy',)
  assert tasks.resolve_best_metric(t, []) == 'token_accuracy'
  t = task()
  t.tag_scheme = tagging.resolve_tag_scheme(t, ner, ner)
  assert t.tag_scheme == 'BIO'
  assert tasks.get(t.kind).metric_names(t, []) == ('token_accuracy', 'precision', 'recall', 'f1')
  assert tasks.resolve_best_metric(t, []) == 'f1'
  t.best_metric = 'accuracy'
  with pytest.raises(UserError, match="best_metric='accuracy' is not a dev metric of this task: use one of "
                                      "token_accuracy, precision, recall, f1"):
    tasks.resolve_best_metric(t, [])
  assert tagging.resolve_tag_scheme(task(tag_scheme='iobes'), ner, ner) == 'IOBES'
  assert tagging.resolve_tag_scheme(task(tag_scheme='none'), ner, ner) == 'none'
  with pytest.raises(UserError, match="train.conll: tag '.+' is not a BIO span tag"):
    tagging.resolve_tag_scheme(task(tag_scheme='BIO'), pos, pos)
  with pytest.raises(UserError, match="dev.conll: tag '.+' is not a BIO span tag"):
    tagging.resolve_tag_scheme(task(), ner, pos)
  with pytest.raises(UserError, match="tag_scheme='BILOU': use BIO, IOB1, IOBES, none"):
    tagging.resolve_tag_scheme(task(tag_scheme='BILOU'), ner, ner)
  assert tasks.resolve_best_metric(task('classification', best_metric=''), ['neg', 'pos']) == 'accuracy'
  cola = task('cola')
  assert tasks.get(cola.kind).metric_names(cola, ['0', '1']) == ('matthews_corrcoef',)
  assert tasks.resolve_best_metric(task('qa', best_metric=''), []) == 'f1'


@pytest.mark.parametrize('mode', ['stop', 'skip'])
def test_nan_in_finetuning_is_never_saved_and_is_recorded(export_dir, tmp_path, mode):
  """As in pretraining: checkpoint d is saved only when its params and moments are finite and the loss step d+1
  computes from it is; the bad step is recorded in metrics.jsonl and named by the last line (exit 1)."""
  write_sentiment(tmp_path / 'train.tsv', 64, 1)
  workdir = tmp_path / mode
  result = run_finetune('classification', export_dir, workdir, tmp_path / 'train.tsv', tmp_path / 'train.tsv',
                        '--config.train.learning_rate=1e12' if mode == 'skip' else '--config.train.learning_rate=1e6',
                        '--config.train.warmup_steps=0', '--config.train.steps=40', '--config.log.every_steps=1',
                        '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=100',
                        '--config.eval.every_steps=1000', f'--config.train.nonfinite={mode}',
                        '--config.train.max_skipped_steps=2')
  assert result.returncode == 1, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  with open(workdir / 'metrics.jsonl') as f:
    records = [json.loads(l) for l in f]
  logged = {r['step']: r['loss'] for r in records if 'loss' in r}
  bad = [r for r in records if 'nonfinite' in r]
  saved = sorted(int(d) for d in os.listdir(workdir / 'checkpoints') if d.isdigit()) if os.path.isdir(
      workdir / 'checkpoints') else []
  for d in saved:  # every saved state's next loss, as the run logged it, is finite
    assert d + 1 not in logged or logged[d + 1] == logged[d + 1] and abs(logged[d + 1]) != float('inf'), (d, logged)
  if mode == 'stop':
    import re
    broken = int(re.search(r'the update of step (\d+) gives', line)[1])
    assert saved == list(range(1, broken)), (saved, line)
    assert bad[-1] == {'step': broken, 'nonfinite': bad[-1]['nonfinite'], 'value': bad[-1]['value'],
                       'action': 'stopped'} and bad[-1]['nonfinite'] in ('next_loss', 'state')
  else:
    assert 'non-finite for 3 steps in a row' in line, line
    assert [r['action'] for r in bad if r['nonfinite'] == 'loss'][-1] == 'stopped'
    first_bad = min(s for s, v in logged.items() if v != v or abs(v) == float('inf'))
    assert all(d < first_bad - 1 for d in saved), (saved, first_bad)


def test_workdir_of_another_task_is_refused_untouched(export_dir, classification_run, tmp_path):
  """A fine-tune rerun with another task on a finished run's workdir stops with one line (exit 2), writing nothing."""
  import shutil
  workdir = tmp_path / 'run'
  shutil.copytree(classification_run, workdir)
  before = sorted((str(p.relative_to(workdir)), p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob('*'))
  write_sentiment(tmp_path / 'pairs.tsv', 20, 1, pair=True)
  result = run_finetune('pair', export_dir, workdir, tmp_path / 'pairs.tsv', tmp_path / 'pairs.tsv')
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == f'error: {workdir} holds a fine-tuning run of another task: use a new --workdir'
  assert sorted((str(p.relative_to(workdir)), p.stat().st_size, p.stat().st_mtime_ns) for p in workdir.rglob('*')) == before


def test_first_steps_sampled_for_the_shapes_hold_a_bounded_number_of_examples(export_dir, pos_files, tmp_path,
                                                                               monkeypatch):
  """The row multiple and the layer loop are chosen from the batches of at most packing.SAMPLE_EXAMPLES examples
  (first-fit costs ~4 us an example: 500 steps of a pod's global batch of 4,096 would add 8.6 s to its start)."""
  from jaxssl import config as config_lib
  from jaxssl.train import finetune, layer_loop, packing
  config = config_lib.load_config('configs/finetune.py:tagging')
  config_lib.parse_overrides(config, [
      f'--config.init_from={export_dir}', f'--config.task.train={pos_files[0]}', f'--config.task.dev={pos_files[1]}',
      '--config.data.seq_len=24', '--config.train.steps=100', '--config.train.batch_size=8'])
  laid_out, chosen = [], []
  monkeypatch.setattr(packing, 'SAMPLE_EXAMPLES', 24)  # 3 steps of 8 examples
  real_rows_needed, real_configs = packing.rows_needed, layer_loop.finetune_configs
  monkeypatch.setattr(packing, 'rows_needed', lambda *a: laid_out.append(a) or real_rows_needed(*a))

  def configs_then_stop(model_cfg, steps, shape_at, sample_steps):
    chosen.append((steps, sample_steps, real_configs(model_cfg, steps, shape_at, sample_steps)[2]))
    raise StopIteration('chosen')

  monkeypatch.setattr(layer_loop, 'finetune_configs', configs_then_stop)
  with pytest.raises(StopIteration, match='chosen'):
    finetune.run_finetuning(config, str(tmp_path / 'pos'))
  assert len(laid_out) == 3 and [s[:2] for s in chosen] == [(100, 3)], (len(laid_out), chosen)
  assert '(auto, cpu: 100 steps over ' in chosen[0][2], chosen  # the layer loop chosen from those 3 steps

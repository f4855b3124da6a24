"""Fine-tune job end to end: a tiny pre-trained export + a new head learns each task shape from small local data."""
import json
import os
import random
import subprocess
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE, NEGATIVE = ['good', 'great', 'fine', 'lovely'], ['bad', 'awful', 'poor', 'dull']
FILLER = 'the a film movie plot actor was is very quite and but story scene'.split()


def sentence(rng, word):
  words = rng.choices(FILLER, k=rng.randint(3, 8))
  words.insert(rng.randint(0, len(words)), word)
  return ' '.join(words)


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A tiny BERT with a sentencepiece tokenizer, exported as `python -m jaxssl.export` would write it."""
  from jaxssl import config as config_lib
  from jaxssl import mesh as mesh_lib
  from jaxssl.data import tokenizers
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
  base = tmp_path_factory.mktemp('export')
  rng = random.Random(0)
  text = [sentence(rng, w) for w in (POSITIVE + NEGATIVE) * 50] + ['John lives in Paris', 'Mary visits Rome']
  tokenizer = tokenizers.train_tokenizer(text, 50, str(base / 'tok'))
  config = config_lib.load_config('configs/bert.py:tiny')
  config_lib.parse_overrides(config, ['--config.model.num_layers=1', '--config.model.hidden_size=32',
                                      '--config.model.num_heads=2', '--config.model.intermediate_size=64',
                                      '--config.model.max_position=32', '--config.tokenizer.vocab_size=50'])
  setup = state_lib.setup_model(config.model, 50, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  out = base / 'params'
  saved = {**json.loads(config_lib.to_json(config)), 'vocab_size': 50}
  ckpt_lib.write_export(str(out), state_lib.init_params(setup), json.dumps(saved), tokenizer)
  return str(out)


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


def test_classification_learns_and_exports_best(export_dir, tmp_path):
  write_sentiment(tmp_path / 'train.tsv', 400, 1)
  write_sentiment(tmp_path / 'dev.tsv', 100, 2)
  result = run_finetune('classification', export_dir, tmp_path / 'w', tmp_path / 'train.tsv', tmp_path / 'dev.tsv')
  assert result.returncode == 0, result.stderr[-3000:]
  best = best_dev(tmp_path / 'w')
  assert best['metrics']['accuracy'] > 0.9, best
  exported = json.load(open(tmp_path / 'w' / 'export' / 'config.json'))
  assert exported['task']['labels'] == ['neg', 'pos']
  with open(tmp_path / 'w' / 'metrics.jsonl') as f:
    assert any('dev_accuracy' in json.loads(line) for line in f)

  # The evaluate job reads the export back and reproduces the best dev figures.
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  out = tmp_path / 'results.json'
  result = subprocess.run([sys.executable, '-m', 'jaxssl.evaluate', '--config', 'configs/eval.py:task',
                           f'--config.params={tmp_path / "w" / "export"}', '--out', str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.load(open(out))
  assert report['tasks']['classification']['accuracy'] == pytest.approx(best['metrics']['accuracy'])
  assert report['average'] == pytest.approx(best['metrics']['accuracy'])
  assert 'average' in result.stdout


def test_pair_regression_and_tagging_learn(export_dir, tmp_path):
  write_sentiment(tmp_path / 'pairs_train.tsv', 400, 3, pair=True)
  write_sentiment(tmp_path / 'pairs_dev.tsv', 100, 4, pair=True)
  result = run_finetune('pair', export_dir, tmp_path / 'p', tmp_path / 'pairs_train.tsv', tmp_path / 'pairs_dev.tsv')
  assert result.returncode == 0, result.stderr[-3000:]
  assert best_dev(tmp_path / 'p')['metrics']['accuracy'] > 0.9

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

  names = ['John', 'Mary', 'Paris', 'Rome']
  for name, n in (('tag_train.conll', 300), ('tag_dev.conll', 60)):
    with open(tmp_path / name, 'w') as f:
      for _ in range(n):
        words = rng.choices(FILLER, k=5)
        pos = rng.randint(0, 4)
        words[pos] = rng.choice(names)
        for i, w in enumerate(words):
          tag = ('B-PER' if w in ('John', 'Mary') else 'B-LOC') if i == pos else 'O'
          f.write(f'{w}\t{tag}\n')
        f.write('\n')
  result = run_finetune('tagging', export_dir, tmp_path / 't', tmp_path / 'tag_train.conll', tmp_path / 'tag_dev.conll',
                        '--config.train.steps=300')
  assert result.returncode == 0, result.stderr[-3000:]
  assert best_dev(tmp_path / 't')['metrics']['f1'] > 0.8


def test_finetune_bad_inputs(export_dir, tmp_path):
  write_sentiment(tmp_path / 'train.tsv', 20, 1)
  missing = run_finetune('classification', export_dir, tmp_path / 'w', tmp_path / 'nope.tsv', tmp_path / 'train.tsv')
  assert missing.returncode == 2 and 'not found' in missing.stderr.strip().splitlines()[-1]
  no_params = run_finetune('classification', str(tmp_path / 'no_export'), tmp_path / 'w2', tmp_path / 'train.tsv',
                           tmp_path / 'train.tsv')
  assert no_params.returncode == 2 and 'jaxssl export' in no_params.stderr.strip().splitlines()[-1]


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


def test_extractive_qa_learns_across_windows(export_dir, tmp_path):
  write_squad(tmp_path / 'train.json', 300, 6)
  write_squad(tmp_path / 'dev.json', 60, 7)
  result = run_finetune('qa', export_dir, tmp_path / 'q', tmp_path / 'train.json', tmp_path / 'dev.json',
                        '--config.train.steps=250', '--config.task.doc_stride=8', '--config.task.max_query_length=4')
  assert result.returncode == 0, result.stderr[-3000:]
  best = best_dev(tmp_path / 'q')
  assert best['metrics']['exact_match'] > 0.8 and best['metrics']['f1'] > 0.8, best

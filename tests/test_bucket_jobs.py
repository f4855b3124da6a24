"""The downstream jobs with every path in a bucket, served by a real GCS JSON API server on localhost
(tests/gcs_server.py): fine-tune (killed with SIGKILL after its first checkpoint, then resumed), evaluate,
generate, ICL, embeddings and convert read and write gs:// paths, and give what the same jobs give on local paths.
"""
import json
import os
import random
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from gcs_server import gcs_bucket  # noqa: F401 (a pytest fixture)

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl import storage
from jaxssl.data import tokenizers
from jaxssl.data.wordpiece import WordPieceTokenizer
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import finetune
from jaxssl.train import state as state_lib
from jaxssl.train.metrics import MetricsWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE, NEGATIVE = ['good', 'great', 'fine', 'lovely'], ['bad', 'awful', 'poor', 'dull']
FILLER = 'the a film movie plot actor was is very quite and but story scene'.split()
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
FINETUNE_FLAGS = ('--config.data.seq_len=24', '--config.train.steps=120', '--config.train.batch_size=16',
                  '--config.train.learning_rate=1e-3', '--config.train.warmup_steps=5', '--config.eval.every_steps=20',
                  '--config.checkpoint.every_steps=20', '--config.log.every_steps=10')


def job_env():
  return dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')


def job(module, *args):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=job_env(), capture_output=True,
                        text=True, timeout=600)


def upload(local: str, remote: str) -> str:
  """Copies the local file or folder `local` to `remote` with jaxssl.storage; returns `remote`."""
  if os.path.isfile(local):
    storage.copy(local, remote)
    return remote
  for folder, _, names in os.walk(local):
    for name in names:
      rel = os.path.relpath(os.path.join(folder, name), local)
      storage.copy(os.path.join(folder, name), storage.join(remote, *rel.split(os.sep)))
  return remote


def sentence(rng, word):
  words = rng.choices(FILLER, k=rng.randint(3, 8))
  words.insert(rng.randint(0, len(words)), word)
  return ' '.join(words)


def write_sentiment(path, n, seed):
  rng = random.Random(seed)
  with open(path, 'w') as f:
    f.write('text\tlabel\n')
    for _ in range(n):
      label = rng.random() < 0.5
      f.write(f'{sentence(rng, rng.choice(POSITIVE if label else NEGATIVE))}\t{"pos" if label else "neg"}\n')


def make_export(path, family, tokenizer, overrides, seed=0):
  """A random tiny export of `family` (as python -m jaxssl.export writes one) at the local `path`."""
  config = config_lib.load_config(os.path.join(ROOT, 'configs', f'{family}.py:tiny'))
  config_lib.parse_overrides(config, [*overrides, f'--config.tokenizer.vocab_size={tokenizer.vocab_size}'])
  setup = state_lib.setup_model(config.model, tokenizer.vocab_size, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]),
                                seed=seed)
  saved = {**json.loads(config_lib.to_json(config)), 'vocab_size': tokenizer.vocab_size}
  ckpt_lib.write_export(str(path), state_lib.init_params(setup), json.dumps(saved), tokenizer)
  return str(path)


SMALL = ['--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
         '--config.model.intermediate_size=64', '--config.model.max_position=64',
         '--config.model.initializer_range=0.3']


@pytest.fixture(scope='module')
def sentiment(tmp_path_factory):
  """(local folder, bucket folder): a tiny BERT export with its own sentencepiece tokenizer and a sentiment task
  (train.tsv, dev.tsv) in both places."""
  base = tmp_path_factory.mktemp('sentiment')
  write_sentiment(base / 'train.tsv', 200, 1)
  write_sentiment(base / 'dev.tsv', 48, 2)
  rng = random.Random(0)
  texts = [sentence(rng, w) for w in POSITIVE + NEGATIVE for _ in range(20)]
  sp = tokenizers.train_tokenizer(texts, 48, str(base / 'tok'))
  make_export(base / 'export', 'bert', sp, [*SMALL[:4], '--config.model.max_position=32'])
  return str(base)


@pytest.fixture(scope='module')
def bucket_sentiment(sentiment, gcs_bucket):
  remote = f'{gcs_bucket}/jobs-{os.getpid()}'
  for name in ('export', 'train.tsv', 'dev.tsv'):
    upload(os.path.join(sentiment, name), storage.join(remote, name))
  return remote


def finetune_args(folder, workdir):
  return ['--config', 'configs/finetune.py:classification', f'--config.init_from={storage.join(folder, "export")}',
          f'--config.task.train={storage.join(folder, "train.tsv")}',
          f'--config.task.dev={storage.join(folder, "dev.tsv")}', *FINETUNE_FLAGS, '--workdir', workdir]


def metric_rows(path):
  return [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]


def first_checkpoint_done(workdir) -> bool:
  """Whether the step-20 checkpoint is finalized (orbax renames its temporary folder last) and evaluated."""
  checkpoints = storage.join(workdir, 'checkpoints')
  metrics = storage.join(workdir, 'metrics.jsonl')
  if not storage.isdir(checkpoints) or not storage.exists(metrics):
    return False
  names = storage.listdir(checkpoints)
  return ('20' in names and not any('tmp' in n for n in names)
          and any(r['step'] == 20 and 'dev_accuracy' in r for r in metric_rows(metrics)))


def test_finetune_killed_resumed_and_evaluated_in_a_bucket_as_locally(sentiment, bucket_sentiment, tmp_path):
  local_ft = str(tmp_path / 'ft')
  result = job('jaxssl.finetune', *finetune_args(sentiment, local_ft))
  assert result.returncode == 0, result.stderr[-3000:]
  result = job('jaxssl.evaluate', '--config', 'configs/eval.py:task', f'--config.params={local_ft}/export',
               '--out', str(tmp_path / 'out' / 'results.json'))
  assert result.returncode == 0, result.stderr[-3000:]

  bucket_ft = f'{bucket_sentiment}/ft'
  run = subprocess.Popen([sys.executable, '-m', 'jaxssl.finetune', *finetune_args(bucket_sentiment, bucket_ft)],
                         cwd=ROOT, env=job_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 500
    while run.poll() is None and not first_checkpoint_done(bucket_ft) and time.time() < deadline:
      time.sleep(0.2)
    assert run.poll() is None, f'the run ended before it was killed: {run.stderr.read()[-3000:]}'
    run.kill()  # SIGKILL: no handler, no final save
    run.wait(timeout=60)
  finally:
    if run.poll() is None:
      run.kill()
    run.stderr.close()
  assert run.returncode == -9
  killed_at = max(r['step'] for r in metric_rows(f'{bucket_ft}/metrics.jsonl'))
  assert killed_at < 120  # killed inside the run (the kill follows the step-20 checkpoint; 100 steps remain)

  result = job('jaxssl.finetune', *finetune_args(bucket_sentiment, bucket_ft))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step ' in result.stdout, result.stdout
  result = job('jaxssl.evaluate', '--config', 'configs/eval.py:task', f'--config.params={bucket_ft}/export',
               '--out', f'{bucket_sentiment}/results.json')
  assert result.returncode == 0, result.stderr[-3000:]

  # The bucket run, killed and resumed, gives what the uninterrupted local one gave: metrics, best export, results.
  assert metric_rows(f'{bucket_ft}/metrics.jsonl') == metric_rows(f'{local_ft}/metrics.jsonl')
  exported = json.loads(storage.read_text(f'{bucket_ft}/export/config.json'))
  local_export = json.loads(storage.read_text(f'{local_ft}/export/config.json'))
  assert exported['best'] == local_export['best'] and exported['task']['labels'] == ['neg', 'pos']
  assert exported['finetune']['task']['dev'] == f'{bucket_sentiment}/dev.tsv'
  results = json.loads(storage.read_text(f'{bucket_sentiment}/results.json'))
  local_results = json.loads((tmp_path / 'out' / 'results.json').read_text())
  assert results.pop('throughput').keys() == local_results.pop('throughput').keys()  # timings differ
  assert results == local_results
  assert results['tasks']['classification']['accuracy'] == local_export['best']['metrics']['accuracy']
  assert sorted(storage.listdir(f'{bucket_ft}/export')) == sorted(os.listdir(f'{local_ft}/export'))


def test_task_files_and_masking_lexicon_read_from_a_bucket(gcs_bucket, tmp_path):
  from jaxssl import tasks
  from jaxssl.data.examples import masking_units
  (tmp_path / 'ner.conll').write_text('-DOCSTART- O\n\nJohn\tB-PER\nlives\tO\n\nRome\tB-LOC\n')
  (tmp_path / 'squad.json').write_text(json.dumps({'data': [{'paragraphs': [{'context': 'Mary lives in Rome.', 'qas': [
      {'id': 'q1', 'question': 'Where?', 'answers': [{'text': 'Rome', 'answer_start': 14}]}]}]}]}))
  (tmp_path / 'pairs.jsonl').write_text('{"text_a": "a", "text_b": "b", "label": "yes"}\n\n'
                                        '{"text_a": "c", "text_b": "d", "label": "no"}\n')
  (tmp_path / 'lexicon.txt').write_text('# phrases\nNew York\n\nthe film\n')
  remote = f'{gcs_bucket}/files-{os.getpid()}'
  for kind, name in (('tagging', 'ner.conll'), ('qa', 'squad.json'), ('pair', 'pairs.jsonl')):
    local = str(tmp_path / name)
    assert tasks.read_examples(kind, upload(local, f'{remote}/{name}')) == tasks.read_examples(kind, local)
  with pytest.raises(Exception, match='not found'):
    tasks.read_examples('classification', f'{remote}/missing.tsv')
  tok = tokenizers.train_tokenizer(['New York is a city', 'the film was good'] * 20, 26, str(tmp_path / 'tok'))
  lexicon = masking_units.load_lexicon(upload(str(tmp_path / 'lexicon.txt'), f'{remote}/lexicon.txt'), tok)
  assert lexicon.phrases == masking_units.load_lexicon(str(tmp_path / 'lexicon.txt'), tok).phrases
  masking_units.check_masking_config('entity', f'{remote}/lexicon.txt')


@pytest.fixture(scope='module')
def gpt(tmp_path_factory, gcs_bucket):
  """(local export, the same export in the bucket): a random tiny GPT with a sentencepiece tokenizer."""
  base = tmp_path_factory.mktemp('gpt')
  words = 'the a quick brown fox jumps over lazy dog positive negative review great film dull'.split()
  rng = np.random.default_rng(0)
  sp = tokenizers.train_tokenizer([' '.join(rng.choice(words, size=8)) + '.' for _ in range(300)], 48,
                                  str(base / 'tok'))
  local = make_export(base / 'export', 'gpt', sp, [*SMALL[:4], '--config.model.max_position=256',
                                                   '--config.model.initializer_range=0.3'])
  return local, upload(local, f'{gcs_bucket}/gpt-{os.getpid()}/export')


def test_generate_and_convert_gpt_exports_in_a_bucket(gpt, tmp_path):
  from jaxssl.convert.__main__ import main as convert_main
  from jaxssl.generate import generate
  local, remote = gpt
  prompts = ['the quick brown fox', 'a lazy dog']
  expected = generate(local, prompts, max_new_tokens=6, greedy=True)
  assert generate(remote, prompts, max_new_tokens=6, greedy=True) == expected
  result = job('jaxssl.generate', '--params', remote, '--prompt', prompts[0], '--max-new-tokens=6', '--greedy',
               '--json')
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout.splitlines()[-1])['prompt_ids'] == expected[0]['prompt_ids']

  # to-hf into the bucket gives the files a local to-hf gives, byte for byte; from-hf back from the bucket
  # into the bucket gives an export that generates the same ids.
  convert_main(['to-hf', '--src', local, '--out', str(tmp_path / 'hf')])
  hf = storage.join(storage.parent(remote), 'hf')
  convert_main(['to-hf', '--src', remote, '--out', hf])
  names = sorted(os.listdir(tmp_path / 'hf'))
  assert storage.listdir(hf) == names == ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
  for name in names:
    assert storage.read_bytes(storage.join(hf, name)) == (tmp_path / 'hf' / name).read_bytes(), name
  with pytest.raises(Exception, match='already exists'):
    convert_main(['to-hf', '--src', remote, '--out', hf])
  back = storage.join(storage.parent(remote), 'back')
  convert_main(['from-hf', '--src', hf, '--out', back])
  assert json.loads(storage.read_text(f'{back}/config.json'))['converted_from'] == {'src': hf}
  again = generate(back, prompts, max_new_tokens=6, greedy=True)
  assert [r['generated_ids'] for r in again] == [r['generated_ids'] for r in expected]


def test_icl_and_embeddings_write_results_and_plots_into_a_bucket(gpt, tmp_path):
  from jaxssl.eval import embeddings, icl
  from jaxssl.eval import icl_prompts
  local, remote = gpt
  out = storage.join(storage.parent(remote), 'icl')
  data = {split: upload(os.path.join(icl_prompts.TASKS_DIR, f'sentiment_{split}.jsonl'),
                        storage.join(storage.parent(remote), f'sentiment_{split}.jsonl')) for split in ('pool', 'test')}
  reports = []
  for models, where, files in ((local, str(tmp_path / 'icl'), []),
                               (remote, out, [f'--config.icl.{k}={v}' for k, v in data.items()])):
    config = config_lib.load_config(os.path.join(ROOT, 'configs', 'icl.py:sentiment'))
    config_lib.parse_overrides(config, [f'--config.icl.models={models}', '--config.icl.shots=0,1', *files])
    reports.append(icl.run(config, where))
  assert sorted(storage.listdir(out)) == sorted(os.listdir(tmp_path / 'icl'))
  saved = json.loads(storage.read_text(f'{out}/results.json'))
  assert saved['models']['export']['accuracy'] == reports[0]['models']['export']['accuracy']
  assert storage.read_text(f'{out}/{icl.PREDICTIONS}') == (tmp_path / 'icl' / icl.PREDICTIONS).read_text()
  assert storage.read_bytes(f'{out}/{icl.PLOT_SHOTS}').startswith(PNG_MAGIC)

  emb_out = storage.join(storage.parent(remote), 'emb', 'results.json')
  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'embeddings.py:apple'))
  config_lib.parse_overrides(config, [f'--config.embeddings.model={remote}'])
  report = embeddings.run(config, emb_out)
  assert json.loads(storage.read_text(emb_out))['contextual'] == json.loads(json.dumps(report['contextual']))
  assert storage.read_bytes(storage.join(storage.parent(emb_out), embeddings.HEATMAP)).startswith(PNG_MAGIC)


def test_bert_convert_from_and_to_bucket_folders(gcs_bucket, tmp_path):
  """A BERT export with a WordPiece tokenizer: to-hf and from-hf between bucket folders give the local files."""
  from jaxssl.convert.__main__ import main as convert_main
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [chr(c) for c in range(ord('a'), ord('z') + 1)]
  (tmp_path / 'vocab').mkdir()
  (tmp_path / 'vocab' / 'vocab.txt').write_text('\n'.join(words + ['the', 'film', '##s']) + '\n')
  wordpiece = WordPieceTokenizer.from_vocab(str(tmp_path / 'vocab' / 'vocab.txt'))
  local = make_export(tmp_path / 'export', 'bert', wordpiece, SMALL[:4])
  remote = upload(local, f'{gcs_bucket}/bert-{os.getpid()}/export')
  results = {}
  for src, root in ((local, str(tmp_path)), (remote, storage.parent(remote))):
    convert_main(['to-hf', '--src', src, '--out', storage.join(root, 'hf')])
    convert_main(['from-hf', '--src', storage.join(root, 'hf'), '--out', storage.join(root, 'back')])
    results[root] = {name: storage.read_bytes(storage.join(root, 'hf', name))
                     for name in storage.listdir(storage.join(root, 'hf'))}
  assert results[str(tmp_path)] == results[storage.parent(remote)]
  assert 'tokenizer.json' in results[str(tmp_path)]
  back = storage.join(storage.parent(remote), 'back')
  assert json.loads(storage.read_text(f'{back}/config.json'))['converted_from'] == {'hf': storage.join(
      storage.parent(remote), 'hf')}
  _, model, tok = ckpt_lib.load_export(back)
  _, reference, _ = ckpt_lib.load_export(str(tmp_path / 'back'))
  assert tok.encode_one('the films') == wordpiece.encode_one('the films') == [31, 32, 33]
  params, expected = (jax.tree.leaves(nnx.to_pure_dict(nnx.state(m, nnx.Param))) for m in (model, reference))
  assert len(params) == len(expected) > 0
  for a, b in zip(params, expected):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_convert_reads_a_gguf_file_from_a_bucket_through_a_local_copy(gcs_bucket, tmp_path):
  """A .gguf in a bucket is copied to a local file for the memory-mapping reader; its errors name the bucket path."""
  gguf = pytest.importorskip('gguf')
  from jaxssl.convert import decoder, staging
  from jaxssl.convert.gguf_reader import open_file
  from jaxssl.errors import UserError
  writer = gguf.GGUFWriter(str(tmp_path / 'empty.gguf'), 'gpt2')
  writer.add_block_count(1)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  remote = upload(str(tmp_path / 'empty.gguf'), f'{gcs_bucket}/gguf-{os.getpid()}/empty.gguf')
  with staging.local_source(remote) as local:
    assert not storage.is_remote(local) and open(local, 'rb').read() == (tmp_path / 'empty.gguf').read_bytes()
    assert open_file(local).fields['gpt2.block_count'].contents() == 1
  assert not os.path.exists(local)  # the copy is gone with the block
  with pytest.raises(UserError) as error:
    decoder.from_hf(remote, f'{gcs_bucket}/gguf-{os.getpid()}/export')
  assert remote in str(error.value) and local not in str(error.value)
  with pytest.raises(UserError, match='does not exist'):
    decoder.from_hf(remote + '.missing.gguf', str(tmp_path / 'export'))


def test_dev_row_is_in_the_bucket_before_dev_done(gcs_bucket):  # noqa: F811 (the fixture)
  """A dev evaluation's row is in metrics.jsonl before dev_done.json says the evaluation ran: in a bucket the
  writer gathers rows for up to UPLOAD_EVERY_S, and a kill in that window lost the row for good (the rerun skips
  an evaluation marked done; this file's kill-and-resume test caught it once in CI)."""
  workdir = f'{gcs_bucket}/dev-{random.randrange(10**6)}'
  kind = SimpleNamespace(dev_metrics=lambda *args: {'accuracy': 0.5})
  data = finetune.TaskData(kind, ['a', 'b'], 2, 4, {}, [], {}, None)
  writer = MetricsWriter(workdir)
  dev = finetune.DevEvaluation(SimpleNamespace(best_metric='accuracy'), data, lambda params, features: None,
                               writer, workdir, {}, None)
  best = dev(40, None, {'value': 1.0, 'step': 0, 'metrics': {}})  # no better than the best so far: no export
  assert best['step'] == 0
  assert json.loads(storage.read_text(storage.join(workdir, finetune.DEV_DONE)))['step'] == 40
  assert {'step': 40, 'dev_accuracy': 0.5} in metric_rows(storage.join(workdir, 'metrics.jsonl'))

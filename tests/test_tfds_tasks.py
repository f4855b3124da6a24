"""Downstream tasks from TFDS by name (glue/*, squad/v1.1, conll2003), through `tfds.testing.mock_data`: examples,
label names in the dataset's order, a fine-tune + evaluate run on MNLI (matched and mismatched), and the errors."""
import json
import random

import jax
import pytest
import tensorflow_datasets as tfds

from jaxssl import config as config_lib
from jaxssl import evaluate as evaluate_job
from jaxssl import tasks
from jaxssl.tasks import tfds as task_tfds
from jaxssl.errors import UserError


def task_config(variant, *overrides):
  config = config_lib.load_config(f'configs/finetune.py:{variant}')
  config_lib.parse_overrides(config, list(overrides))
  return config


@pytest.mark.parametrize('name', sorted(task_tfds.GLUE_FIELDS.keys() - {'ax'}))
def test_glue_variants_read_tfds_with_dataset_label_order(name, tmp_path):
  config = task_config(name, f'--config.task.data_dir={tmp_path}')
  assert config.task.tfds == f'glue/{name}'
  with tfds.testing.mock_data(num_examples=6):
    examples, labels = tasks.read_split(config.task, config.task.dev)
    builder = tfds.builder(f'glue/{name}', data_dir=str(tmp_path))
  assert len(examples) == 6
  first, second = task_tfds.GLUE_FIELDS[name]
  assert all(isinstance(e.text, str) for e in examples)
  assert all((e.text_b is not None) == (second is not None) for e in examples)
  if name == 'stsb':
    assert labels == [] and all(isinstance(e.label, float) for e in examples)
  else:
    # The dataset's ClassLabel order, not sorted: MRPC's positive class 'equivalent' must stay id 1 for F1.
    assert labels == list(builder.info.features['label'].names)
    assert {e.label for e in examples} <= set(labels)
  if name == 'mrpc':
    assert labels == ['not_equivalent', 'equivalent']


def records_source(records_by_split):
  """An `as_data_source` replacement serving fixed records (mock_data's random ones are not self-consistent)."""
  def as_data_source(self, split, **kwargs):
    del self, kwargs
    return records_by_split[split]
  return as_data_source


def test_conll2003_tags_by_name_and_squad_answers(tmp_path):
  config = task_config('conll2003', f'--config.task.data_dir={tmp_path}')
  sentences = {'train': [{'tokens': ['John', 'lives', 'in', 'Paris'], 'ner': [1, 0, 0, 5], 'pos': [22, 42, 15, 22],
                          'chunks': [11, 21, 13, 11]}]}
  with tfds.testing.mock_data(as_data_source_fn=records_source(sentences)):
    examples, labels = tasks.read_split(config.task, 'train')
    config.task.tag_feature = 'pos'
    pos_examples, pos_labels = tasks.read_split(config.task, 'train')
    config.task.tag_feature = 'lemma'
    with pytest.raises(UserError, match="tag_feature='lemma' is not a feature of conll2003"):
      tasks.read_split(config.task, 'train')
  assert labels[:3] == ['O', 'B-PER', 'I-PER']
  assert examples[0].tokens == ['John', 'lives', 'in', 'Paris'] and examples[0].tags == ['B-PER', 'O', 'O', 'B-LOC']
  assert pos_examples[0].tags == ['NNP', 'VBZ', 'IN', 'NNP'] and 'VBZ' in pos_labels

  context = 'The capital of France is Paris.'
  squad = {'validation': [{'id': b'q1', 'title': b't', 'context': context.encode(), 'question': b'Capital?',
                           'answers': {'text': [b'Paris', b'Paris.'], 'answer_start': [25, 25]}}]}
  config = task_config('squad', f'--config.task.data_dir={tmp_path}')
  with tfds.testing.mock_data(as_data_source_fn=records_source(squad)):
    examples, labels = tasks.read_split(config.task, config.task.dev)
  assert labels == [] and examples[0].qid == 'q1' and examples[0].text == context
  assert examples[0].answers == [('Paris', 25), ('Paris.', 25)]


def test_tfds_task_errors(tmp_path):
  with pytest.raises(UserError, match="glue/cola' is a classification task but task.kind='pair'"):
    tasks.read_split(task_config('cola', '--config.task.kind=pair').task, 'train')
  with pytest.raises(UserError, match=r"looks like a file: for local files pass --config.task.tfds= \(empty\)"):
    tasks.read_split(task_config('sst2').task, 'data/sst2/train.tsv')
  with pytest.raises(UserError, match="task.tfds='imdb_reviews' is not a task jaxssl reads from TFDS"):
    tasks.read_split(task_config('classification', '--config.task.tfds=imdb_reviews').task, 'train')
  # GLUE hides its test labels (-1): scoring a test split is refused, not silently wrong.
  hidden = {'test': [{'sentence': b'a film', 'label': -1, 'idx': 0}]}
  with tfds.testing.mock_data(as_data_source_fn=records_source(hidden)):
    with pytest.raises(UserError, match="has no labels"):
      tasks.read_split(task_config('sst2', f'--config.task.data_dir={tmp_path}').task, 'test')


def tiny_export(path):
  """A tiny random BERT with a sentencepiece tokenizer, written as `python -m jaxssl.export` writes one."""
  from jaxssl import mesh as mesh_lib
  from jaxssl.data import tokenizers
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
  rng = random.Random(0)
  text = [' '.join(rng.choices('abcdefghij', k=12)) for _ in range(300)] + ['abc def ghij'] * 50
  tokenizer = tokenizers.train_tokenizer(text, 24, str(path / 'tok'))
  config = config_lib.load_config('configs/bert.py:tiny')
  config_lib.parse_overrides(config, ['--config.model.num_layers=1', '--config.model.hidden_size=16',
                                      '--config.model.num_heads=2', '--config.model.intermediate_size=32',
                                      '--config.model.max_position=32', '--config.tokenizer.vocab_size=24'])
  setup = state_lib.setup_model(config.model, 24, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  saved = {**json.loads(config_lib.to_json(config)), 'vocab_size': 24}
  ckpt_lib.write_export(str(path / 'params'), state_lib.init_params(setup), json.dumps(saved), tokenizer)
  return str(path / 'params')


def test_mnli_from_tfds_finetunes_and_evaluates_matched_and_mismatched(tmp_path):
  from jaxssl.train import finetune
  params = tiny_export(tmp_path)
  config = task_config('mnli', f'--config.init_from={params}', f'--config.task.data_dir={tmp_path / "tfds"}',
                       '--config.data.seq_len=16', '--config.train.steps=4', '--config.train.batch_size=8',
                       '--config.eval.every_steps=2', '--config.checkpoint.every_steps=2', '--config.log.every_steps=2',
                       '--config.checkpoint.async_save=False', '--config.eval.batch_size=8')
  workdir = tmp_path / 'runs' / 'mnli'
  with tfds.testing.mock_data(num_examples=24):
    best = finetune.run_finetuning(config, str(workdir))
    exported = json.load(open(workdir / 'export' / 'config.json'))
    assert exported['task']['labels'] == ['entailment', 'neutral', 'contradiction']
    assert exported['finetune']['task']['tfds'] == 'glue/mnli'
    eval_config = config_lib.load_config('configs/eval.py:glue')
    config_lib.parse_overrides(eval_config, [f'--config.params={tmp_path / "runs" / "{task}" / "export"}',
                                             '--config.batch_size=8'])
    eval_config.tasks = ('mnli',)
    report = evaluate_job.run(eval_config, str(tmp_path / 'results.json'))
  assert set(report['tasks']) == {'mnli_matched', 'mnli_mismatched'}
  assert report['average_kind'] == 'GLUE score'
  # The best checkpoint was picked on the matched set, which the evaluate job reproduces from the export.
  assert report['tasks']['mnli_matched']['accuracy'] == pytest.approx(best['metrics']['accuracy'])
  assert report['average'] == pytest.approx(
      (report['tasks']['mnli_matched']['accuracy'] + report['tasks']['mnli_mismatched']['accuracy']) / 2)
  assert json.load(open(tmp_path / 'results.json')) == report


# CoNLL-2003 ids of the TFDS ClassLabels (tensorflow_datasets conll_dataset_builder_utils: POS_TAGS, CHUNK_TAGS).
CONLL_POS = {'(': 4, ')': 5, ',': 6, '.': 7, 'CD': 11, 'DT': 12, 'IN': 15, 'NN': 21, 'NNP': 22, 'VBZ': 42}
CONLL_CHUNKS = {'O': 0, 'B-NP': 11, 'I-NP': 12, 'I-PP': 14, 'I-VP': 22}


def conll_sentence(rng):
  """A TFDS conll2003 record; its chunks are IOB1 (a chunk starts with I-, B- only right after one of its type),
  as in the shared task's original files."""
  words = [('Mary', 'NNP', 'I-NP'), ('sees', 'VBZ', 'I-VP'), ('the', 'DT', 'I-NP'), ('river', 'NN', 'I-NP')]
  if rng.random() < 0.5:
    words += [('in', 'IN', 'I-PP'), ('Paris', 'NNP', 'I-NP'), ('(', '(', 'O'), ('3', 'CD', 'B-NP'), (')', ')', 'O')]
  words += [('Rome', 'NNP', 'B-NP'), ('.', '.', 'O')] if rng.random() < 0.5 else [('.', '.', 'O')]
  return {'tokens': [w.encode() for w, _, _ in words], 'pos': [CONLL_POS[p] for _, p, _ in words],
          'chunks': [CONLL_CHUNKS[c] for _, _, c in words], 'ner': [0] * len(words)}


@pytest.mark.parametrize('tag_feature', ['pos', 'chunks'])
def test_conll2003_pos_and_chunks_finetune_and_evaluate(tag_feature, tmp_path):
  """--config.task.tag_feature=pos|chunks: POS tags are no span scheme (token accuracy only, the best metric by
  default), the IOB1 chunks are (span precision/recall/F1, best by f1); the evaluate job reproduces the best
  dev figures from the export."""
  from jaxssl.train import finetune
  rng = random.Random(0)
  splits = {'train': [conll_sentence(rng) for _ in range(16)], 'dev': [conll_sentence(rng) for _ in range(8)]}
  params = tiny_export(tmp_path)
  config = task_config('conll2003', f'--config.init_from={params}', f'--config.task.tag_feature={tag_feature}',
                       f'--config.task.data_dir={tmp_path / "tfds"}', '--config.data.seq_len=24',
                       '--config.train.steps=2', '--config.train.batch_size=8', '--config.eval.every_steps=2',
                       '--config.log.every_steps=2', '--config.checkpoint.async_save=False',
                       '--config.eval.batch_size=8')
  workdir = tmp_path / 'runs' / 'conll2003'
  with tfds.testing.mock_data(as_data_source_fn=records_source(splits)):
    best = finetune.run_finetuning(config, str(workdir))
    exported = json.load(open(workdir / 'export' / 'config.json'))
    eval_config = config_lib.load_config('configs/eval.py:task')
    config_lib.parse_overrides(eval_config, [f'--config.params={workdir / "export"}', '--config.batch_size=8'])
    report = evaluate_job.run(eval_config, str(tmp_path / 'results.json'))
  span = tag_feature == 'chunks'
  task = exported['finetune']['task']
  assert (task['tag_scheme'], task['best_metric']) == (('IOB1', 'f1') if span else ('none', 'token_accuracy'))
  assert set(best['metrics']) == ({'token_accuracy', 'precision', 'recall', 'f1'} if span else {'token_accuracy'})
  assert report['tasks']['conll2003'] == pytest.approx(best['metrics'])
  assert report['headline']['conll2003'] == pytest.approx(best['value'])

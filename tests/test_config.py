"""Config files with named variants and typed `--config.key=value` overrides, and each mistake's message."""
import importlib.util
import json
import os

import pytest

from jaxssl import config as config_lib
from jaxssl.errors import UserError


def test_typed_overrides():
  config = config_lib.load_config('configs/finetune.py:mnli')
  rest = config_lib.parse_overrides(config, [
      '--config.train.steps=7', '--config.train.learning_rate=1', '--config.train.seed', '3', '--workdir', 'w',
      '--config.mesh.shape=2,2,2', '--config.task.eval_sets.mnli_mismatched=dev_mm.tsv',
      '--config.checkpoint.async_save=false', '--config.task.tfds='])
  assert rest == ['--workdir', 'w']
  assert config.train.steps == 7 and config.train.seed == 3
  assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
  assert config.mesh.shape == (2, 2, 2)
  assert config.task.eval_sets.mnli_mismatched == 'dev_mm.tsv' and config.task.tfds == ''
  assert config.checkpoint.async_save is False

  suite = config_lib.load_config('configs/eval.py:task')
  config_lib.parse_overrides(suite, ['--config.tasks=cola, sst2'])
  assert suite.tasks == ('cola', 'sst2')
  config_lib.parse_overrides(suite, ["--config.tasks=('rte',)"])
  assert suite.tasks == ('rte',)
  config_lib.parse_overrides(suite, ['--config.tasks=qnli'])
  assert suite.tasks == ('qnli',)


@pytest.mark.parametrize('spec, args, message', [
    ('configs/nope.py', [], "config file 'configs/nope.py' not found"),
    ('configs/bert.py:huge', [], "unknown variant 'huge' in configs/bert.py: choose one of"),
    ('configs/bert.py:tiny', ['--config.train.stepz=3'], 'unknown config key --config.train.stepz: valid keys here'),
    ('configs/bert.py:tiny', ['--config.trian.steps=3'], 'unknown config key --config.trian'),
    ('configs/bert.py:tiny', ['--config.train.steps=1.5'], "--config.train.steps=1.5 has the wrong type: expected int"),
    ('configs/bert.py:tiny', ['--config.train=3'], '--config.train is a group of keys'),
    ('configs/bert.py:tiny', ['--config.train.steps'], '--config.train.steps has no value'),
])
def test_config_mistakes(spec, args, message):
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace('.', r'\.')):
    config_lib.parse_overrides(config_lib.load_config(spec), args)


def test_a_map_of_names_to_text_is_replaced_whole():
  """Groups whose values are all text (ICL verbalisers, eval sets) take name=value,name=value on the command line;
  other groups still refuse a value."""
  from jaxssl import config as config_lib
  from jaxssl.errors import UserError
  icl = config_lib.load_config('configs/icl.py:sentiment')
  config_lib.parse_overrides(icl, ['--config.icl.verbalizers=positive=great,negative=awful'])
  assert icl.icl.verbalizers.to_dict() == {'positive': 'great', 'negative': 'awful'}
  config_lib.parse_overrides(icl, ["--config.icl.verbalizers={'pos': 'yes'}"])
  assert icl.icl.verbalizers.to_dict() == {'pos': 'yes'}
  ft = config_lib.load_config('configs/finetune.py:classification')
  config_lib.parse_overrides(ft, ['--config.task.eval_sets=en=a.tsv,zh=b.tsv'])
  assert ft.task.eval_sets.to_dict() == {'en': 'a.tsv', 'zh': 'b.tsv'}
  with pytest.raises(UserError, match='name=value'):
    config_lib.parse_overrides(ft, ['--config.task.eval_sets=en'])
  with pytest.raises(UserError, match='group of keys'):
    config_lib.parse_overrides(ft, ['--config.model=x=y'])


def _typed(value):
  """A config value as JSON that keeps tuples and lists apart (the form tests/fixtures/pretraining_configs.json has)."""
  if isinstance(value, dict):
    return {k: _typed(v) for k, v in sorted(value.items())}
  if isinstance(value, (tuple, list)):
    return {f'__{type(value).__name__}__': [_typed(v) for v in value]}
  return value


def dump_pretraining_configs() -> dict:
  """{'FILE:VARIANT' (and 'FILE' for its default): the typed ConfigDict} of the four pretraining config files."""
  got = {}
  for name in ('bert.py', 'gpt.py', 'encdec.py', 'elmo.py'):
    for variant in _config_variants(f'configs/{name}'):
      got[f'{name}:{variant}'] = _typed(config_lib.load_config(f'configs/{name}:{variant}').to_dict())
    got[name] = _typed(config_lib.load_config(f'configs/{name}').to_dict())
  return got


def test_pretraining_configs_are_what_they_were():
  """Every variant of the four pretraining config files (and each file's default) gives the ConfigDict the fixture
  holds: the same keys, values and types (int vs float, tuple vs list). It was first dumped before the files shared
  their common groups through jaxssl/config.py (that refactor changed nothing); since, a deliberate change to a
  config file rewrites the fixture in the same commit (`json.dump(dump_pretraining_configs(), f, indent=1,
  sort_keys=True)`; last: model.remat dots -> auto), and an accidental
  one fails here."""
  fixture = os.path.join(os.path.dirname(__file__), 'fixtures', 'pretraining_configs.json')
  with open(fixture, encoding='utf-8') as f:
    expected = json.load(f)
  got = dump_pretraining_configs()
  assert sorted(got) == sorted(expected)
  for spec in expected:
    assert json.loads(json.dumps(got[spec])) == expected[spec], spec
    # float stays float and int stays int (JSON keeps 1.0 and 1 apart, but == does not)
    assert json.dumps(got[spec], sort_keys=True) == json.dumps(expected[spec], sort_keys=True), spec


def _config_variants(path: str) -> tuple:
  spec = importlib.util.spec_from_file_location('_variants', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.VARIANTS


def test_an_empty_text_map_says_to_set_it_whole():
  config = config_lib.load_config('configs/icl.py:custom')
  with pytest.raises(UserError, match=r'--config.icl.verbalizers is a map of names to text: set it whole, e.g. '
                                      r'--config.icl.verbalizers=positive=TEXT,other=TEXT'):
    config_lib.apply_override(config, 'icl.verbalizers.positive', 'good')
  config_lib.apply_override(config, 'icl.verbalizers', 'positive=good,negative=bad')
  assert dict(config.icl.verbalizers) == {'positive': 'good', 'negative': 'bad'}


def test_tokenizer_sample_sentences_and_its_old_name_are_one_value():
  config = config_lib.load_config('configs/bert.py:tiny')
  assert config.tokenizer.sample_sentences == config.tokenizer.max_training_sentences == 2_000_000
  config_lib.parse_overrides(config, ['--config.tokenizer.max_training_sentences=3000'])  # the older name
  assert config.tokenizer.sample_sentences == 3000
  config_lib.parse_overrides(config, ['--config.tokenizer.sample_sentences=500'])
  assert config.tokenizer.max_training_sentences == 500
  saved = json.loads(config_lib.to_json(config))['tokenizer']
  assert saved['sample_sentences'] == saved['max_training_sentences'] == 500


def test_corpus_format_keys():
  config = config_lib.load_config('configs/gpt.py')
  assert (config.data.text_field, config.data.max_bad_records) == ('text', 0)
  config_lib.parse_overrides(config, ['--config.data.text_field=content', '--config.data.max_bad_records=10',
                                      '--config.data.corpus=web=c4.jsonl.zst:0.7,books=/data/books/:0.3'])
  assert (config.data.text_field, config.data.max_bad_records) == ('content', 10)
  with pytest.raises(UserError, match='wrong type'):
    config_lib.parse_overrides(config, ['--config.data.max_bad_records=many'])

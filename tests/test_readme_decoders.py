"""The README's commands run as written (tests/readme_commands.py), part 2: GPT pretraining and generation,
public decoder checkpoints (a HuggingFace directory, Llama, GGUF; to-hf and back), in-context learning,
encoder-decoder, ELMo, contextual embeddings, multilingual pretraining and cross-lingual transfer."""
import os

import numpy as np
import pytest

from tests import readme_commands as readme
from tests import readme_material as material
from tests.test_readme import readme_parts


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  base = tmp_path_factory.mktemp('readme')
  repo, home, env = readme.fresh_checkout(base)
  models = home / 'models'  # the reader's downloads, as `~/models/...` in the README
  material.write_gpt2(models / 'gpt2', 0)
  material.write_gpt2(models / 'gpt2-medium', 1, n_layer=3)
  material.write_llama(models / 'Llama-3.2-1B', 2)
  material.write_llama_gguf(models / 'llama-3.2-1b-q8_0.gguf', 3, str(base))
  (models / 'xlm-roberta-base').mkdir()
  material.write_xlmr(str(models / 'xlm-roberta-base'), 4)
  for split, n, seed in (('train', 120, 1), ('dev', 40, 2)):
    material.write_classification(repo / 'sst' / f'{split}.tsv', n, seed)
    material.write_classification(repo / f'en_{split}.tsv', n, seed + 40)
    material.write_classification(repo / f'zh_{split}.tsv', n, seed + 50)
  material.write_chinese_text(repo / 'zh.txt', 60, 5)
  material.write_embedding_items(repo / 'items.jsonl')
  return repo, env


def test_readme_part_2_runs_as_written(checkout):
  repo, env = checkout
  _, commands = readme_parts()
  results = readme.run_all(commands, repo, env)
  assert len(results) >= 20
  for workdir in ('workdir/gpt_tiny', 'workdir/bart_tiny', 'workdir/mass_tiny', 'workdir/encdec_tiny',
                  'workdir/elmo_tiny', 'workdir/ml_tiny'):
    assert sorted(os.listdir(repo / workdir / 'checkpoints')) == ['2', '4'], workdir
  for out in ('icl/results.json', 'emb/results.json', 'emb_zh/results.json', 'crosslingual.json',
              'params/llama-gguf/config.json', 'params/gpt2-medium/config.json'):
    assert os.path.isfile(repo / out), out
  assert not os.path.exists(repo / '~'), 'a literal ~ directory: a path was not expanded'
  # to-hf wrote back what from-hf read: transformers loads hf/gpt2 with the original's logits.
  import transformers
  original = transformers.GPT2LMHeadModel.from_pretrained(env['HOME'] + '/models/gpt2').eval()
  round_trip = transformers.GPT2LMHeadModel.from_pretrained(repo / 'hf' / 'gpt2').eval()
  ids = np.arange(1, 21)[None]
  np.testing.assert_allclose(material.gpt2_logits(round_trip, ids), material.gpt2_logits(original, ids), atol=1e-4)

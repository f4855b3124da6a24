"""The README's commands run as written (tests/readme_commands.py), part 1: the BERT sections, from the
quickstart through pretrain → export → fine-tune (the four task shapes) → evaluate, and bench. Part 2 (GPT and
the sections after it) is tests/test_readme_decoders.py, so the two run on separate test workers."""
import json
import os

import pytest

from tests import readme_commands as readme
from tests import readme_material as material

FIRST_SECTION_OF_PART_2 = 'GPT: next-token pretraining and generation'


def readme_parts():
  """(part 1, part 2): the README's commands before and from the GPT section."""
  commands = readme.readme_commands(open(os.path.join(readme.ROOT, 'README.md')).read())
  split = next(i for i, c in enumerate(commands) if c.section == FIRST_SECTION_OF_PART_2)
  return commands[:split], commands[split:]


def test_every_rule_matches_a_readme_command():
  commands = sum(readme_parts(), [])
  assert len(commands) > 30
  used = {id(readme.rule_for(c)) for c in commands}
  assert [r.pattern for r in readme.RULES if id(r) not in used] == []


def test_readme_parsing():
  text = ('## S\n\nx\n\n    python -m a --b \\\n        --c d  # note\n    # a comment\n    for t in x y; do\n'
          '      echo $t\n    done\n\n  not code\n\n    import os\n    print(os.sep)\n')
  commands = readme.readme_commands(text)
  assert [(c.section, c.text, c.python) for c in commands] == [
      ('S', 'python -m a --b --c d # note', False), ('S', 'for t in x y; do echo $t; done', False),
      ('S', 'import os\nprint(os.sep)\n', True)]
  assert readme.shortened('python -m jaxssl.pretrain --config configs/gpt.py:tiny --workdir w  # c').startswith(
      'python -m jaxssl.pretrain --config configs/gpt.py:tiny --workdir w --config.train.steps=4')
  assert readme.runnable('python3 -m venv .venv && .venv/bin/pip install -r r.txt && .venv/bin/python -m x') == (
      'python -m x')


@pytest.fixture(scope='module')
def checkout(tmp_path_factory):
  repo, _, env = readme.fresh_checkout(tmp_path_factory.mktemp('readme'))
  for split, n, seed in (('train', 120, 1), ('dev', 40, 2)):
    material.write_classification(repo / 'sst' / f'{split}.tsv', n, seed)
    material.write_pairs_jsonl(repo / 'nli' / f'{split}.jsonl', n, seed + 10)
    material.write_pos_conll(repo / 'pos' / f'{split}.conll', n, seed + 20)
    material.write_squad(repo / 'squad' / f'{split}-v1.1.json', n // 2, seed + 30)
  return repo, env


def test_readme_part_1_runs_as_written(checkout):
  repo, env = checkout
  commands, _ = readme_parts()
  quickstart = commands[0]
  assert 'workdir/bert_tiny' in quickstart.text and not readme.rule_for(quickstart).skip
  results = readme.run_all(commands, repo, env)
  assert len(results) >= 10
  again = readme.run(quickstart, repo, env)  # rerun after it finished: resumes at the end, does nothing more
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resuming from step 4 → 4' in again.stdout, again.stdout[-2000:]
  for workdir in ('workdir/bert_tiny', 'runs/bert'):
    assert sorted(os.listdir(repo / workdir / 'checkpoints')) == ['2', '4'], workdir
  report = json.load(open(repo / 'results.json'))
  assert set(report['tasks']) == {'classification', 'pair', 'tagging', 'qa'}
  assert 'token_accuracy' in json.dumps(report['tasks']['tagging'])  # a POS tag set: token accuracy
  assert not os.path.exists(repo / '~'), 'a literal ~ directory: a path was not expanded'

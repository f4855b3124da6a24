"""The README's commands: parsed from its code blocks, shortened, and run as written from a fresh checkout.

Every command in README.md's indented code blocks is either run (tests/test_readme*.py), in README order, from a
copy of the repository's files, with its paths exactly as written (relative workdirs, `runs/...`, `params/...`,
`~/models/...` under a HOME reached through a symlink), shortened only by `--config.*` overrides appended to it
(sizes, steps); or it is skipped by a rule in RULES that says why. A README command that no rule covers fails the
tests, and so does a rule that no longer matches any command.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Sizes and steps only: every pretraining or fine-tuning run passes its first checkpoint and writes a second.
_STEPS = ['--config.train.steps=4', '--config.checkpoint.every_steps=2', '--config.eval.every_steps=2',
          '--config.log.every_steps=1', '--config.train.batch_size=4', '--config.train.warmup_steps=1']
_PRETRAIN = _STEPS + ['--config.eval.batches=1', '--config.tokenizer.vocab_size=300',
                      '--config.tokenizer.max_training_sentences=3000', '--config.data.num_threads=1']
_TRANSFORMER = ['--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
                '--config.model.intermediate_size=64']
_CAUSAL = ['--config.data.seq_len=32', '--config.model.max_position=64', '--config.data.max_predictions=32']
_IMAGES = _STEPS + ['--config.eval.batches=1', '--config.model.num_layers=1', '--config.model.hidden_size=32',
                    '--config.model.num_heads=2', '--config.model.intermediate_size=64']
SHORTER = {
    'configs/bert.py': _PRETRAIN + _TRANSFORMER + ['--config.data.seq_len=32', '--config.data.max_predictions=5'],
    'configs/gpt.py': _PRETRAIN + _TRANSFORMER + _CAUSAL,
    'configs/encdec.py': _PRETRAIN + _TRANSFORMER + _CAUSAL + ['--config.model.num_decoder_layers=1'],
    'configs/elmo.py': _PRETRAIN + ['--config.model.num_layers=1', '--config.model.lstm_size=32',
                                    '--config.model.embed_size=16', '--config.data.seq_len=16',
                                    '--config.data.max_predictions=16'],
    'configs/mae.py': _IMAGES,
    'configs/simclr.py': _IMAGES,
    'configs/wav2vec2.py': _STEPS + ['--config.eval.batches=1'],
    'configs/finetune.py': _STEPS + ['--config.data.seq_len=32'],
    'configs/finetune.py:qa': _STEPS + ['--config.data.seq_len=32', '--config.task.doc_stride=8',
                                        '--config.task.max_query_length=8'],
}


@dataclasses.dataclass
class Rule:
  """A README command pattern (regex, searched) and what the tests do with the commands it matches."""
  pattern: str
  skip: str = ''  # the reason it is not run; '' = run it


RULES = [
    Rule(r'-m pytest', skip='the test suite itself: .ci/run runs it in a fresh virtual environment'),
    Rule(r'(VARIANT|TASK|PARAMS|HF_DIR|DIR2?)\b|\[--', skip='the Jobs synopsis (placeholders); each job is run '
                                                            'through the concrete commands of the sections below'),
    Rule(r'^for t in cola|configs/eval\.py:glue', skip='needs GLUE prepared in TFDS storage, which no machine here '
                                                       'reaches; tests/test_tfds_tasks.py runs the TFDS path'),
    Rule(r'configs/icl\.py:sst2', skip='needs GLUE SST-2 prepared in TFDS storage, which no machine here reaches'),
    Rule(r'tpu/local_pod\.py', skip='several processes: tests/test_pretrain_job.py runs local pods and their resume'),
    Rule(r'.'),  # everything else runs
]


@dataclasses.dataclass
class Command:
  line: int  # README line where its block starts
  section: str  # the `## ` heading it is under
  text: str  # the command, continuation lines joined; or a whole Python block
  python: bool = False  # a block of Python code (it starts with an import), run with python -c


def readme_commands(text: str) -> list[Command]:
  """Commands of the README's indented code blocks; `\\` continuations and `for ... done` loops joined."""
  lines, commands, i, section = text.split('\n'), [], 0, ''
  while i < len(lines):
    if lines[i].startswith('## '):
      section = lines[i][3:].strip()
    match = re.match(r'^( {4,})\S', lines[i])
    if not match or (i and lines[i - 1].strip()):
      i += 1
      continue
    indent, start, block = len(match.group(1)), i + 1, []
    while i < len(lines) and (lines[i].startswith(' ' * indent) or not lines[i].strip()):
      block.append(lines[i][indent:].rstrip())
      i += 1
    if block[0].startswith(('import ', 'from ')):
      commands.append(Command(start, section, '\n'.join(block).strip() + '\n', python=True))
      continue
    current = ''
    for line in block:
      if not line.strip() or (not current and line.lstrip().startswith('#')):
        continue
      current += line.strip()
      if current.endswith('\\'):
        current = current[:-1].rstrip() + ' '
      elif current.startswith('for ') and not current.endswith('done'):
        current += ' ' if current.endswith('do') else '; '
      else:
        commands.append(Command(start, section, re.sub(r'\s+', ' ', current)))
        current = ''
  return commands


def rule_for(command: Command) -> Rule:
  return next(rule for rule in RULES if re.search(rule.pattern, command.text))


def shortened(text: str) -> str:
  """The command (less a trailing comment) with the overrides of its config file (or variant) appended."""
  text = re.sub(r'\s+#\s.*$', '', text)
  config = re.search(r'--config (configs/\w+\.py)(:\w+)?', text)
  if not config or ' -m jaxssl.evaluate ' in f' {text} ':
    return text
  extra = SHORTER.get(config.group(1) + (config.group(2) or ''), SHORTER.get(config.group(1), []))
  return f'{text} {" ".join(extra)}'


def runnable(text: str) -> str:
  """The quickstart's venv creation and install are .ci/run's job: keep the command that follows them."""
  parts = [p.strip() for p in text.split('&&')]
  parts = [p for p in parts if not re.match(r'^python3 -m venv|^\.venv/bin/pip ', p)]
  return ' && '.join(parts).replace('.venv/bin/python ', 'python ')


def fresh_checkout(base):
  """A copy of the files git tracks or would track, as they are in the work tree, at base/jaxssl; a HOME reached
  through a symlink (base/home_link -> base/home); a `python` on PATH that is this test's interpreter.
  Returns (repo, home, env)."""
  repo = base / 'jaxssl'
  listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
                          capture_output=True, check=True).stdout.split(b'\0')
  for name in filter(None, (f.decode() for f in listed)):
    if os.path.exists(os.path.join(ROOT, name)):
      os.makedirs(repo / os.path.dirname(name), exist_ok=True)
      shutil.copy2(os.path.join(ROOT, name), repo / name)
  home = base / 'home'
  (home / 'models').mkdir(parents=True)
  os.symlink(home, base / 'home_link')
  bin_dir = base / 'bin'
  bin_dir.mkdir()
  for name in ('python', 'python3'):
    (bin_dir / name).write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (bin_dir / name).chmod(0o755)
  env = dict(os.environ, HOME=str(base / 'home_link'), PATH=f'{bin_dir}:{os.environ["PATH"]}', JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAXSSL_DATA_DIR=os.environ.get('JAXSSL_DATA_DIR') or os.path.expanduser('~/.cache/jaxssl/tfds'))
  return repo, home, env


def run(command: Command, repo, env) -> subprocess.CompletedProcess:
  """Runs one README command in `repo` (shell syntax as written; a Python block with python -c)."""
  argv = ['python', '-c', command.text] if command.python else ['bash', '-c', shortened(runnable(command.text))]
  return subprocess.run(argv, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def run_all(commands: list[Command], repo, env) -> dict:
  """Runs every command not skipped by RULES, in order; asserts each exits 0. Returns {command text: result}."""
  results = {}
  for command in commands:
    if rule_for(command).skip:
      continue
    result = run(command, repo, env)
    assert result.returncode == 0, (f'README line {command.line}: {command.text}\n{result.stdout[-2000:]}\n'
                                    f'{result.stderr[-4000:]}')
    results[command.text] = result
  return results

"""The code's layout rules (docs/ARCHITECTURE.md), read from the source with `ast`, so they stay true:
imports only go down the layers, no import cycle, no library module imports a job, no module uses another's
`_private` names, no module over 400 lines."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'jaxssl')

# Lower number = lower layer. A module may import its own layer or lower ones; jobs (the top) import anything.
LAYERS = {
    'jaxssl.errors': 0, 'jaxssl.version': 0, 'jaxssl.paths': 0, 'jaxssl.storage': 0, 'jaxssl.config': 0, 'jaxssl.runtime': 0,
    'jaxssl.program_cache': 0, 'jaxssl.weights_cache': 0,
    'jaxssl.mesh': 1,
    'jaxssl.data': 2, 'jaxssl.models': 3, 'jaxssl.families': 4, 'jaxssl.tasks': 4, 'jaxssl.train': 5,
    'jaxssl.eval': 6, 'jaxssl.convert': 6,
}
JOBS = {'jaxssl', 'jaxssl.pretrain', 'jaxssl.export', 'jaxssl.finetune', 'jaxssl.evaluate', 'jaxssl.generate',
        'jaxssl.bench', 'jaxssl.convert.__main__', 'jaxssl.prepare'}
MAX_LINES = 400


def modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  found = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        found[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
  return found


def layer(module: str):
  """The layer of a module: its longest prefix in LAYERS (None for jobs and unlisted names)."""
  if module in JOBS:
    return None
  parts = module.split('.')
  for n in range(len(parts), 0, -1):
    if '.'.join(parts[:n]) in LAYERS:
      return LAYERS['.'.join(parts[:n])]
  return None


def imports(path: str, module: str, known: set) -> list[tuple[str, int, bool, list[str]]]:
  """(imported jaxssl module, line, at module level?, names imported from it) for every jaxssl import."""
  tree = ast.parse(open(path).read())
  top_level = {id(n) for n in tree.body} | {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
                                             for n in ast.walk(stmt)}
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [(a.name, []) for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        base = '.'.join(module.split('.')[:-node.level] + ([base] if base else []))
      # `from jaxssl.data import tokenizers` names a module; `from jaxssl.data.tokenizers import load` a name.
      targets = [(f'{base}.{a.name}', []) if f'{base}.{a.name}' in known else (base, [a.name]) for a in node.names]
    else:
      continue
    found += [(t, node.lineno, id(node) in top_level, names) for t, names in targets if t.split('.')[0] == 'jaxssl']
  return found


ALL = modules()


def test_every_package_is_in_a_layer():
  unplaced = [m for m in ALL if m not in JOBS and layer(m) is None]
  assert unplaced == [], 'add these modules to a layer in LAYERS (and docs/ARCHITECTURE.md)'


@pytest.mark.parametrize('module', sorted(ALL))
def test_imports_go_down_and_no_private_names(module):
  here = layer(module)
  for target, line, _, names in imports(ALL[module], module, set(ALL)):
    assert target not in JOBS or module in JOBS or target == 'jaxssl', f'{module}:{line} imports the job {target}'
    if here is not None and layer(target) is not None:
      assert layer(target) <= here, f'{module}:{line} imports {target}, a higher layer'
    private = [n for n in names if n.startswith('_') and not n.endswith('__')]  # __version__ is public
    assert not private, f'{module}:{line} uses private names {private} of {target}'


def test_families_and_tasks_do_not_import_each_other():
  for module, path in ALL.items():
    for own, other in (('jaxssl.families', 'jaxssl.tasks'), ('jaxssl.tasks', 'jaxssl.families')):
      if module.startswith(own):
        bad = [t for t, *_ in imports(path, module, set(ALL)) if t.startswith(other)]
        assert not bad, f'{module} imports {bad}: a family and a task kind stay independent'


def test_no_import_cycles():
  graph = {m: {t for t, *_ in imports(p, m, set(ALL)) if t in ALL and t != m} for m, p in ALL.items()}
  for m in graph:  # a package's __init__ importing its own submodules is not a cycle through them
    graph[m] = {t for t in graph[m] if not t.startswith(m + '.')}
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)


@pytest.mark.parametrize('module', sorted(m for m in ALL if m not in JOBS))
def test_function_level_imports_say_why(module):
  """A library module imports jaxssl modules at the top; one inside a function (to keep a heavy dependency off
  the import path, say) carries a comment on its line saying why, never just to dodge a cycle."""
  lines = open(ALL[module]).read().split('\n')
  for target, line, top_level, _ in imports(ALL[module], module, set(ALL)):
    assert top_level or '#' in lines[line - 1], f'{module}:{line} imports {target} inside a function without a reason'


@pytest.mark.parametrize('module', sorted(ALL))
def test_module_size(module):
  with open(ALL[module]) as f:
    assert sum(1 for _ in f) <= MAX_LINES, f'{ALL[module]} is over {MAX_LINES} lines: split it'


# Modules that may touch the local file system directly (open, os.path.exists/isfile/isdir, os.makedirs,
# os.listdir, glob, shutil), and why: every other module reaches a user's file through jaxssl/storage.py, so a
# workdir, export, task file or corpus may be local or in a bucket.
LOCAL_FILE_MODULES = {
    'jaxssl.storage': 'the one layer over local files and buckets',
    'jaxssl.paths': 'makes local user paths absolute (URLs pass unchanged)',
    'jaxssl.config': 'config files are Python modules in the checkout',
    'jaxssl.runtime': 'looks for accelerator device files',
    'jaxssl.models.precision': "reads the host CPU's flags in /proc/cpuinfo",
    'jaxssl.program_cache': "files in the local compile cache folder, beside XLA's own; reads jaxssl's source",
    'jaxssl.weights_cache': "files in the local compile cache folder; stats the local export it keeps",
    'jaxssl.data.corpora': 'tells a local corpus path from a TFDS name',
    'jaxssl.prepare': 'tells a local corpus path from a TFDS name',
    'jaxssl.data.corpus_files': 'the local branch of listing corpus files (buckets go through fsspec)',
    'jaxssl.data.corpus_builders': "local temporary shards and the local copy of a bucket dataset (array_record's "
                                   'reader and writer take local files only)',
    'jaxssl.eval.embeddings': 'the word sets shipped inside the package',
    'jaxssl.eval.icl_prompts': 'the ICL tasks shipped inside the package',
    'jaxssl.eval.embeddings_plots': 'the CJK font file of an installed package',
    'jaxssl.train.metrics': "tensorboardX's local temporary event folder, uploaded through storage",
    'jaxssl.train.workdir_lock': "flock needs the workdir's real local lock file (a bucket workdir's lease goes "
                                 'through fsspec); reads the boot id',
    'jaxssl.convert.decoder': 'works on the local copy convert/staging.py makes of a bucket source or output',
    'jaxssl.convert.hf_bert': 'works on the local copy convert/staging.py makes of a bucket source or output',
    'jaxssl.convert.hf_deberta': 'builds the tokenizer.json of the local copy convert/staging.py makes',
    'jaxssl.convert.gguf_file': 'works on the local copy convert/staging.py makes of a bucket source or output',
    'jaxssl.convert.gguf_reader': 'memory-maps the local copy convert/staging.py makes of a bucket .gguf',
    'jaxssl.convert.staging': 'makes those local copies and uploads them',
}
_LOCAL_FILE_CALL = re.compile(r'(?<![\w.])open\(|os\.path\.(exists|isfile|isdir|getsize)\(|os\.makedirs\(|'
                              r'os\.listdir\(|glob\.glob\(|shutil\.')


@pytest.mark.parametrize('module', sorted(modules()))
def test_user_files_go_through_storage(module):
  source = open(modules()[module], encoding='utf-8').read()
  code = '\n'.join(line.split('#', 1)[0] for line in source.splitlines())
  if module not in LOCAL_FILE_MODULES:
    assert not _LOCAL_FILE_CALL.search(code), f'{module}: use jaxssl.storage (or list it in LOCAL_FILE_MODULES)'


_GENERATE_JOB_IMPORTS = r'''
import sys
from jaxssl import families, generate
families.family_for({'name': 'gpt'})
from jaxssl.train import checkpoint
print(' '.join(sorted(m for m in sys.modules if m.startswith(('jaxssl.families.', 'tensorflow_datasets', 'PIL')))))
'''


def test_a_job_imports_only_its_family():
  """A family's module (and its data pipeline's libraries) loads when the family is first asked for: the generate
  job's start does not pay for TFDS, the image and audio families (BENCHMARKS.md §17)."""
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-c', _GENERATE_JOB_IMPORTS], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['jaxssl.families.family', 'jaxssl.families.gpt'], result.stdout


_EVENT_WRITER_IMPORTS = r'''
import sys, tempfile
from jaxssl.train import metrics
events = metrics.EventFiles(tempfile.mkdtemp())
events.add_scalar('loss', 1.5, 1)
events.close()
print(any(m in sys.modules for m in ('torch', 'google.cloud.storage', 'boto3')))
import torch, google.cloud.storage  # still importable afterwards
print(int(torch.tensor([7]).item()))
'''


def test_tensorboard_writer_imports_neither_torch_nor_gcs():
  """tensorboardX imports torch and google-cloud-storage when they are installed (1.6 s of every training job's
  start); the job's writer does without them, and they stay importable."""
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-c', _EVENT_WRITER_IMPORTS], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ['False', '7'], result.stdout

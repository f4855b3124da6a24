"""Paths a user gives (flags and config values), made absolute once, when a job starts.

Every job resolves its path flags and its config's path keys here, before anything reads them: orbax refuses
relative paths, `~` is not expanded by `open`, and a config.json written by one job is read by the next from
another directory (an export records `init_from`, a fine-tune run its task files). Symlinks are kept as named (not
resolved), so a workdir reached through a link stays under the user's name. URLs (`gs://...`) pass unchanged.
"""
import glob
import os
import re

_GLOB_CHARS = '*?['


def is_url(path: str) -> bool:
  return '://' in path


def absolute(path: str) -> str:
  """`path` with `~` expanded, made absolute against the current directory; '' and URLs unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def absolute_if_local(value: str) -> str:
  """A value that is either a local path or a name (a TFDS split or dataset, 'ptb'): absolute when it is a path.

  It is a path when it starts with `~`, `/` or `.`, or names an existing file, directory or glob match; otherwise
  it is left as the name it is (so `train`, `validation_matched` and `glue/sst2` stay names).
  """
  if not value or is_url(value):
    return value
  expanded = os.path.expanduser(value)
  looks_local = value.startswith(('~', '/', '.')) or os.path.exists(expanded)
  if not looks_local and any(c in value for c in _GLOB_CHARS):
    looks_local = bool(glob.glob(expanded, recursive=True))
  return os.path.abspath(expanded) if looks_local else value


# A mixture part's optional sampling weight: 'c4.jsonl.zst:0.7' (but not the version of 'c4/en:3.1.0').
_WEIGHTED = re.compile(r'^(?P<source>.*):(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$')


def split_weight(source: str) -> tuple[str, float | None]:
  """(corpus, weight or None) of one mixture part's 'CORPUS[:WEIGHT]'."""
  match = _WEIGHTED.match(source.strip())
  if match is None:
    return source.strip(), None
  return match['source'].strip(), float(match['weight'])


def is_mixture(corpus: str) -> bool:
  """Whether `data.corpus` is a TAG=CORPUS[:WEIGHT] list rather than one corpus. An existing path with '=' is one
  corpus, and so is a path or URL whose first '=' comes after a '/' (Hive-partitioned data:
  gs://b/c4/lang=en/*.parquet): tags never hold a '/'."""
  return ('=' in corpus and '/' not in corpus.split('=', 1)[0]
          and not os.path.exists(os.path.expanduser(corpus)))


def absolute_corpus(corpus: str) -> str:
  """`data.corpus` with its local parts absolute: one corpus, or a `TAG=CORPUS[:WEIGHT],...` mixture."""
  if not is_mixture(corpus):
    return absolute_if_local(corpus)
  parts = []
  for part in corpus.split(','):
    name, sep, source = part.partition('=')
    if not sep:
      parts.append(part)
      continue
    path, weight = split_weight(source)
    suffix = source.strip()[len(path):] if weight is not None else ''  # the ':0.7' exactly as written
    parts.append(f'{name}{sep}{absolute_if_local(path)}{suffix}')
  return ','.join(parts)


# Config keys holding a local path (or URL), and those holding a path or a dataset/split name.
PATH_KEYS = ('init_from', 'params', 'checkpoint.directory', 'data.data_dir', 'task.data_dir', 'icl.data_dir',
             'data.masking_lexicon', 'embeddings.model', 'embeddings.data')
PATH_OR_NAME_KEYS = ('task.train', 'task.dev', 'task.test', 'icl.pool', 'icl.test', 'data')
PATH_LIST_KEYS = ('icl.models',)
PATH_MAP_KEYS = ('baselines',)
PATH_OR_NAME_MAP_KEYS = ('task.eval_sets',)


def _lookup(config, key: str):
  """(parent group, leaf name) of a dotted key, or (None, None) when the config has no such key."""
  *parents, leaf = key.split('.')
  node = config
  for name in parents:
    if name not in node or not hasattr(node[name], 'keys'):
      return None, None
    node = node[name]
  return (node, leaf) if leaf in node else (None, None)


def _names_a_tfds_split(config, key: str) -> bool:
  """Whether `key` (task.train, icl.pool, ...) names a split of the TFDS dataset its group sets."""
  node, _ = _lookup(config, key)
  return node is not None and key.count('.') == 1 and bool(node.get('tfds', ''))


def resolve_config_paths(config) -> None:
  """Makes every path-valued key of `config` (an ml_collections.ConfigDict) absolute, in place."""
  def update(key, convert, kind):
    node, leaf = _lookup(config, key)
    if node is None or not isinstance(node[leaf], kind):
      return
    with node.unlocked():
      node[leaf] = convert(node[leaf])

  for key in PATH_KEYS:
    update(key, absolute, str)
  for key in PATH_OR_NAME_KEYS:
    if not _names_a_tfds_split(config, key):
      update(key, absolute_if_local, str)
  update('data.corpus', absolute_corpus, str)
  for key in PATH_LIST_KEYS:
    update(key, lambda paths: type(paths)(absolute(p) for p in paths), (tuple, list))
  for key in PATH_MAP_KEYS + PATH_OR_NAME_MAP_KEYS:
    convert_one = absolute if key in PATH_MAP_KEYS else absolute_if_local
    node, leaf = _lookup(config, key)
    if node is not None and hasattr(node[leaf], 'keys') and not _names_a_tfds_split(config, key):
      group = node[leaf]
      with group.unlocked():
        for name in list(group.keys()):
          if isinstance(group[name], str):
            group[name] = convert_one(group[name])

"""What differs between two identities of a corpus (data/corpora.py `corpus_identity`: what a checkpoint was
trained on, and the corpus now), in words a user can act on: 'PATH changed size A -> B bytes', 'PATH was added',
'data.validation_fraction 0.01 -> 0.02'. Pure functions of the two JSON-able dicts: nothing is read here.
"""
import time
from typing import NamedTuple


class Differences(NamedTuple):
  settings: list[str]  # parts, weights, kinds or settings that make the records: 'data.text_field ...'
  files: list[str]  # one phrase per file: 'PATH changed size A -> B bytes', 'PATH was added', ...
  restore: list[list]  # the saved [path, size, stamp] of each changed or removed file

  @property
  def all(self) -> list[str]:
    return self.settings + self.files


def corpus_changes(saved: dict, now: dict) -> Differences:
  """What differs between two `corpus_identity` results (nothing: the same corpus). Files are compared by absolute
  path, size and stamp, not through the prepared dataset's name: a bucket object uploaded again with the same
  bytes (a new generation, the same checksum) is the same file."""
  tags = lambda identity: [p['tag'] for p in identity['parts']]
  if tags(saved) != tags(now):
    return Differences([f'data.corpus has parts {tags(now)} now, {tags(saved)} then'], [], [])
  found = Differences([], [], [])
  if saved.get('language_temperature') != now.get('language_temperature'):
    found.settings.append(f'data.language_temperature {saved.get("language_temperature")} -> '
                          f'{now.get("language_temperature")}')
  for old, new in zip(saved['parts'], now['parts']):
    prefix = f'part {old["tag"]}: ' if old['tag'] else ''
    if old['weight'] != new['weight']:
      found.settings.append(f'{prefix}weight {old["weight"]} -> {new["weight"]}')
    if old['kind'] != new['kind'] or (old['kind'] == 'tfds' and old['dataset'] != new['dataset']):
      found.settings.append(f'{prefix}{_what(old)} then, {_what(new)} now')
      continue
    for key, value in old.get('settings', {}).items():
      if new['settings'].get(key) != value:
        what = 'the corpus format of jaxssl' if key == 'format' else f'data.{key}'
        found.settings.append(f'{prefix}{what} {value!r} -> {new["settings"].get(key)!r}')
    if old['kind'] == 'files':
      changed, stamps = file_changes(old['files'], new['files'])
      found.files.extend(prefix + c for c in changed)
      found.restore.extend(stamps)
  return found


def _what(part: dict) -> str:
  if part['kind'] == 'files':
    return f'{part["files"]["count"]} file(s)'
  return 'ptb' if part['kind'] == 'ptb' else f'TFDS {part["dataset"]}'


def _describe_stamp_change(path: str, old: list, new: list) -> str:
  if old[1] != new[1]:
    return f'{path} changed size {old[1]} -> {new[1]} bytes'
  if isinstance(old[2], int) and isinstance(new[2], int):
    return f'{path} was modified (same size, mtime {_when(old[2])} -> {_when(new[2])})'
  return f'{path} was rewritten ({old[2]} -> {new[2]})'


def _when(mtime_ns: int) -> str:
  return time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(mtime_ns // 10**9)) + f'.{mtime_ns % 10**9:09d}Z'


def file_changes(saved: dict, now: dict) -> tuple[list[str], list[list]]:
  """(what changed, one line per file: 'PATH changed size A -> B bytes', 'PATH was removed', ...; the saved stamps
  of the changed and removed files) between two `files_identity` results, `now` recording every file;
  ([], []) when they agree."""
  if saved['digest'] == now['digest'] and saved['count'] == now['count']:
    return [], []
  old = {s[0]: s for s in saved['recorded']}
  new = {s[0]: s for s in now['recorded']}
  if saved['count'] > len(saved['recorded']):  # only the first files are recorded: compare up to the last one
    last = saved['recorded'][-1][0] if saved['recorded'] else ''
    new = {p: s for p, s in new.items() if p <= last}
  changes, restore = [], []
  for path in sorted(set(old) | set(new)):
    if path not in new:
      changes.append(f'{path} was removed')
      restore.append(old[path])
    elif path not in old:
      changes.append(f'{path} was added')
    elif old[path][1:] != new[path][1:]:
      changes.append(_describe_stamp_change(path, old[path], new[path]))
      restore.append(old[path])
  if not changes:
    changes.append(f'{saved["count"]} files then, {now["count"]} now, differing after the first '
                   f'{len(saved["recorded"])} (only those are recorded one by one)')
  return changes, restore

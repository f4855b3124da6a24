"""Downstream tasks from TFDS by name: GLUE, SQuAD v1.1 and CoNLL-2003 as the same `Example`s as local files.

Read by random access through `builder.as_data_source` (array_record, no TensorFlow), prepared once under the
data dir like the pretraining corpora. Label names come from the dataset's ClassLabel, in its order, so label
ids match the benchmark's (e.g. MRPC's positive class 'equivalent' is id 1, which F1 scores).
"""
from jaxssl.data import corpora
from jaxssl.data.tasks import Example
from jaxssl.errors import UserError

# GLUE config → (first text feature, second text feature or None); the label feature is 'label' in all.
GLUE_FIELDS = {
    'cola': ('sentence', None), 'sst2': ('sentence', None), 'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'), 'stsb': ('sentence1', 'sentence2'), 'mnli': ('premise', 'hypothesis'),
    'qnli': ('question', 'sentence'), 'rte': ('sentence1', 'sentence2'), 'wnli': ('sentence1', 'sentence2'),
    'ax': ('premise', 'hypothesis'),
}
DATASETS = tuple(f'glue/{n}' for n in GLUE_FIELDS) + ('squad/v1.1', 'conll2003')


def expected_kind(name: str) -> str:
  """The task kind a supported TFDS dataset is (UserError for one jaxssl does not read)."""
  base = name.split(':')[0]  # a version may follow: 'glue/cola:2.0.0'
  if base.startswith('glue/') and base[5:] in GLUE_FIELDS:
    config = base[5:]
    return 'regression' if config == 'stsb' else 'classification' if GLUE_FIELDS[config][1] is None else 'pair'
  if base in ('squad', 'squad/v1.1'):
    return 'qa'
  if base in ('conll2003', 'conll2003/conll2003'):
    return 'tagging'
  raise UserError(f'task.tfds={name!r} is not a task jaxssl reads from TFDS ({", ".join(DATASETS)}): '
                  'write it as local files and pass --config.task.tfds= with task.train/task.dev paths')


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _records(source, batch_size: int = 1024):
  """Every record of a data source, read in batches (one by one where batched reads fail: the sources of
  tfds.testing.mock_data 4.9.10 have a broken `__getitems__`)."""
  n, batched = len(source), hasattr(source, '__getitems__')
  for start in range(0, n, batch_size):
    indices = list(range(start, min(start + batch_size, n)))
    if batched:
      try:
        yield from source.__getitems__(indices)
        continue
      except TypeError:
        batched = False
    yield from (source[i] for i in indices)


def _check_split(name: str, split: str) -> None:
  # A local path in a split key means the user meant local files.
  if '/' in split or split.endswith(('.tsv', '.jsonl', '.json', '.conll', '.txt')):
    raise UserError(f'task.tfds={name!r} reads TFDS splits, but {split!r} looks like a file: for local files '
                    'pass --config.task.tfds= (empty) as well')


def read_split(name: str, split: str, kind: str, *, data_dir: str = '',
               tag_feature: str = 'ner') -> tuple[list[Example], list[str]]:
  """(examples, label names) of `split` of TFDS task `name`; label names are [] for regression and QA.

  Raises UserError for an unsupported name, a kind that does not match it, a split it lacks, or a split
  without labels (GLUE's test splits hide theirs).
  """
  want = expected_kind(name)
  if kind != want:
    raise UserError(f'task.tfds={name!r} is a {want} task but task.kind={kind!r}: use the {want} variant '
                    f'or pass --config.task.kind={want}')
  _check_split(name, split)
  builder = corpora.open_tfds_builder(name, data_dir, what='task', flag='task.tfds')
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except
    splits = ', '.join(builder.info.splits.keys()) if hasattr(builder.info.splits, 'keys') else '?'
    raise UserError(f'{name} has no split {split!r} ({type(e).__name__}): use one of {splits}') from None
  features = builder.info.features
  if kind == 'qa':
    return [Example(text=_text(r['context']), question=_text(r['question']), qid=_text(r['id']),
                    answers=[(_text(t), int(s)) for t, s in zip(r['answers']['text'], r['answers']['answer_start'])])
            for r in _records(source)], []
  if kind == 'tagging':
    if tag_feature not in features:
      raise UserError(f'task.tag_feature={tag_feature!r} is not a feature of {name} '
                      f'({", ".join(features.keys())}): pass --config.task.tag_feature=ner')
    names = list(features[tag_feature].feature.names)
    out = []
    for r in _records(source):
      tokens, tags = [_text(t) for t in r['tokens']], [names[int(t)] for t in r[tag_feature]]
      if len(tokens) != len(tags):
        raise UserError(f'{name} {split}: a sentence has {len(tokens)} tokens but {len(tags)} {tag_feature} tags')
      out.append(Example(tokens=tokens, tags=tags))
    return out, names
  first, second = GLUE_FIELDS[name.split(':')[0][5:]]
  names = [] if kind == 'regression' else list(features['label'].names)
  out = []
  for r in _records(source):
    label = r['label']
    if kind == 'regression':
      label = float(label)
    else:
      if int(label) < 0:
        raise UserError(f'{name} split {split!r} has no labels (GLUE hides its test labels): evaluate on '
                        'a validation split')
      label = names[int(label)]
    out.append(Example(text=_text(r[first]), text_b=_text(r[second]) if second else None, label=label))
  if not out:
    raise UserError(f'{name} split {split!r} has no examples')
  return out, names


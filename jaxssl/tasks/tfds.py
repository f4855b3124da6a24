"""Task datasets from TFDS by name: opening a split, and the GLUE reader the sentence-level kinds share.

Read by random access through `builder.as_data_source` (array_record, no TensorFlow), prepared once under the
data dir like the pretraining corpora. Label names come from the dataset's ClassLabel, in its order, so label
ids match the benchmark's (e.g. MRPC's positive class 'equivalent' is id 1, which F1 scores).
"""
import dataclasses

from jaxssl.errors import UserError
from jaxssl.tasks.base import Example

# GLUE config → (first text feature, second text feature or None); the label feature is 'label' in all.
GLUE_FIELDS = {
    'cola': ('sentence', None), 'sst2': ('sentence', None), 'mrpc': ('sentence1', 'sentence2'),
    'qqp': ('question1', 'question2'), 'stsb': ('sentence1', 'sentence2'), 'mnli': ('premise', 'hypothesis'),
    'qnli': ('question', 'sentence'), 'rte': ('sentence1', 'sentence2'), 'wnli': ('sentence1', 'sentence2'),
    'ax': ('premise', 'hypothesis'),
}
_ALIASES = {'squad': 'squad/v1.1', 'conll2003/conll2003': 'conll2003'}


def canonical_name(name: str) -> str:
  """The dataset name without a version ('glue/cola:2.0.0' → 'glue/cola'), aliases resolved."""
  base = name.split(':')[0]
  return _ALIASES.get(base, base)


@dataclasses.dataclass
class Split:
  """One opened split of a TFDS task dataset, what a kind's `read_tfds` converts into examples."""
  name: str            # as the user wrote it (task.tfds)
  split: str
  source: object       # the random-access data source
  features: object     # builder.info.features
  tag_feature: str     # tagging: which sequence feature holds the tags


def text(value) -> str:
  """A TFDS text feature (bytes) as str."""
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def records(split: Split, batch_size: int = 1024):
  """Every record of a split, read in batches (one by one where batched reads fail: the sources of
  tfds.testing.mock_data 4.9.10 have a broken `__getitems__`)."""
  source = split.source
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


def open_split(name: str, split: str, *, data_dir: str = '', tag_feature: str = 'ner') -> Split:
  """Split `split` of TFDS dataset `name`, prepared under `data_dir` if needed; UserError for a split that looks
  like a local file or that the dataset lacks."""
  # A local path in a split key means the user meant local files.
  if '/' in split or split.endswith(('.tsv', '.jsonl', '.json', '.conll', '.txt')):
    raise UserError(f'task.tfds={name!r} reads TFDS splits, but {split!r} looks like a file: for local files '
                    'pass --config.task.tfds= (empty) as well')
  # reason: data.corpora brings TFDS and the corpus builders (~0.5 s of a job's start): only TFDS tasks read it
  from jaxssl.data import corpora  # noqa: PLC0415
  builder = corpora.open_tfds_builder(name, data_dir, what='task', flag='task.tfds')
  try:
    source = builder.as_data_source(split)
  except Exception as e:  # pylint: disable=broad-except
    splits = ', '.join(builder.info.splits.keys()) if hasattr(builder.info.splits, 'keys') else '?'
    raise UserError(f'{name} has no split {split!r} ({type(e).__name__}): use one of {splits}') from None
  return Split(name, split, source, builder.info.features, tag_feature)


def read_glue(split: Split, *, float_labels: bool) -> tuple[list[Example], list[str]]:
  """(examples, label names) of a GLUE split: one or two texts and a label (a float for STS-B, names [])."""
  first, second = GLUE_FIELDS[canonical_name(split.name)[len('glue/'):]]
  names = [] if float_labels else list(split.features['label'].names)
  out = []
  for r in records(split):
    label = r['label']
    if float_labels:
      label = float(label)
    else:
      if int(label) < 0:
        raise UserError(f'{split.name} split {split.split!r} has no labels (GLUE hides its test labels): evaluate '
                        'on a validation split')
      label = names[int(label)]
    out.append(Example(text=text(r[first]), text_b=text(r[second]) if second else None, label=label))
  if not out:
    raise UserError(f'{split.name} split {split.split!r} has no examples')
  return out, names

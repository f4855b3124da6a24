"""The task kinds, registered once: classification, pair, regression, tagging, qa, image_classification and
audio_classification, one module each.

A kind (`base.TaskKind`) says how its examples are read (local files and TFDS), featurized, predicted by its
head, lost, decoded and scored. Jobs look a kind up here by `task.kind` and never switch on it; `model.TaskModel`
puts a kind's head on a pre-trained body. A new kind is one module with a `KIND`, added to `REGISTRY`.
"""
from jaxssl.errors import UserError
from jaxssl.tasks import (audio_classification, classification, image_classification, pair, qa, regression,
                          tagging, tfds)
from jaxssl.tasks.base import Example, TaskKind

__all__ = ['Example', 'KINDS', 'REGISTRY', 'TFDS_DATASETS', 'TaskKind', 'get', 'read_examples', 'read_split',
           'read_tfds', 'resolve_best_metric', 'tfds_kind']

REGISTRY = {k.name: k for k in (classification.KIND, pair.KIND, regression.KIND, tagging.KIND, qa.KIND,
                                 image_classification.KIND, audio_classification.KIND)}
KINDS = tuple(REGISTRY)
TFDS_DATASETS = tuple(name for kind in REGISTRY.values() for name in kind.tfds_datasets)


def get(kind: str) -> TaskKind:
  """The registered kind named `kind`; UserError for an unknown name."""
  if kind not in REGISTRY:
    raise UserError(f'task.kind={kind!r} is not a known task kind: use one of {", ".join(KINDS)}')
  return REGISTRY[kind]


def tfds_kind(name: str) -> str:
  """The kind a supported TFDS dataset is read as (UserError for one jaxssl does not read)."""
  canonical = tfds.canonical_name(name)
  for kind in REGISTRY.values():
    if canonical in kind.tfds_datasets:
      return kind.name
  raise UserError(f'task.tfds={name!r} is not a task jaxssl reads from TFDS ({", ".join(TFDS_DATASETS)}): '
                  'write it as local files and pass --config.task.tfds= with task.train/task.dev paths')


def read_tfds(name: str, split: str, kind: str, *, data_dir: str = '',
              tag_feature: str = 'ner') -> tuple[list[Example], list[str]]:
  """(examples, label names) of `split` of TFDS task `name`; label names are [] for regression and QA.

  Raises UserError for an unsupported name, a kind that does not match it, a split it lacks, or a split
  without labels (GLUE's test splits hide theirs).
  """
  want = tfds_kind(name)
  if kind != want:
    raise UserError(f'task.tfds={name!r} is a {want} task but task.kind={kind!r}: use the {want} variant '
                    f'or pass --config.task.kind={want}')
  return REGISTRY[want].read_tfds(tfds.open_split(name, split, data_dir=data_dir, tag_feature=tag_feature))


def read_examples(kind: str, path: str) -> list[Example]:
  """Examples of a task file (local or in a bucket); UserError for an unknown kind, a missing file or a bad row."""
  examples = get(kind).read_file(path)
  if not examples:
    raise UserError(f'task file {path} has no examples')
  return examples


def read_split(task_cfg, source: str) -> tuple[list[Example], list[str] | None]:
  """(examples, label names or None) of one split of a task config: `source` is a file (local or in a bucket),
  or a TFDS split name when `task.tfds` is set. TFDS datasets name their labels; for files the names are None
  (they come from the training examples, the kind's `label_set`)."""
  if task_cfg.get('tfds'):
    return read_tfds(task_cfg.tfds, source, task_cfg.kind, data_dir=task_cfg.get('data_dir', ''),
                     tag_feature=task_cfg.get('tag_feature', 'ner'))
  return read_examples(task_cfg.kind, source), None


def resolve_best_metric(task_cfg, labels) -> str:
  """`task.best_metric` checked against the metrics the task reports; when empty, its default: the kind's
  preferred metric (f1 for QA and span tagging) when reported, else the task's first metric."""
  kind = get(task_cfg.kind)
  names = kind.metric_names(task_cfg, labels)
  if not task_cfg.best_metric:
    return kind.preferred_metric if kind.preferred_metric in names else names[0]
  if task_cfg.best_metric not in names:
    raise UserError(f'task.best_metric={task_cfg.best_metric!r} is not a dev metric of this task'
                    f'{kind.metric_note(names)}: use one of {", ".join(names)}')
  return task_cfg.best_metric

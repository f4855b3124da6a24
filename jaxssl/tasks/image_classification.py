"""Image classification: one image → one of the training set's classes, from the pooled ViT features (full
fine-tuning of an mae/simclr export's encoder with a new linear head).

`task.train` / `task.dev`: a folder with one subfolder of images per class (local or gs://), or an image corpus
split 'CORPUS:SPLIT' (data/images.py: 'digits:train', 'digits:validation', 'cifar10:train' where TFDS is
reachable). Images are resized to the body's model.image_size (`settle_body` copies it and the channel count into
the task config). Loss: softmax cross-entropy; dev metric: accuracy.
"""
import numpy as np

from jaxssl import storage
from jaxssl.data import images_examples
from jaxssl.errors import UserError
from jaxssl.tasks import classification
from jaxssl.tasks.base import Example


def read_file(path: str) -> list[Example]:
  """Labelled images of a class-folder tree, or of 'CORPUS:SPLIT' of an image corpus; labels are class names."""
  # reason: data.images brings TFDS and the corpus builders (~0.5 s of a text job's start): only image tasks read it
  from jaxssl.data import images  # noqa: PLC0415
  corpus, _, split = path.rpartition(':')
  if corpus and not storage.isdir(path) and split in ('train', 'validation'):
    source = images.load_image_corpus(corpus)[split]
    records = source.__getitems__(list(range(len(source))))
    return [Example(label=source.classes[r['label']], image=r['image']) for r in records]
  classes, files = images.list_class_folders(path)
  return [Example(label=classes[label], image=images.decode_image(storage.read_bytes(f), f)) for f, label in files]


def settle_body(task_cfg, model_cfg) -> None:
  """The body's input size: images are resized to it."""
  if 'image_size' not in model_cfg:
    raise UserError(f'task.kind=image_classification needs an image body (mae or simclr export), not '
                    f'model.name={model_cfg.get("name")!r}')
  with task_cfg.unlocked():
    task_cfg.image_size, task_cfg.channels = int(model_cfg['image_size']), int(model_cfg['channels'])


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels: list[str]):
  """({'images': float32 [N, S, S, C] in [0, 1], 'labels': class ids}, None)."""
  del tokenizer, seq_len
  index = {name: i for i, name in enumerate(labels)}
  size, channels = task_cfg.image_size, task_cfg.channels
  return {'images': np.stack([images_examples.to_model_image(e.image, size, channels) for e in examples]),
          'labels': np.array([index.get(e.label, -1) for e in examples], np.int32)}, None


KIND = classification.input_classification_kind(
    'image_classification', read_file=read_file,
    what="class folders of images or an image corpus's splits (task.train=NAME:train, task.dev=NAME:validation)",
    featurize=featurize, input_keys=('images',), settle_body=settle_body)

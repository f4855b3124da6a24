"""Image corpora as TFDS datasets (array_record), read by random access: what the image families (MAE, SimCLR)
and the linear probe read.

`load_image_corpus(corpus)` accepts:
  * 'digits': scikit-learn's 1,797 real 8x8 scans of handwritten digits (UCI optdigits' test set, shipped inside
    scikit-learn, so it works offline), 10 classes;
  * a local or bucket folder with one subfolder per class holding image files (.png, .jpg, .jpeg, .bmp, .gif,
    .webp; the sorted subfolder names are the classes), prepared once into a dataset whose name is a hash of the
    files (path, size, mtime) and the validation share;
  * a TFDS image dataset name ('cifar10', 'mnist', 'imagenet2012', ...) with 'image' and 'label' features, which
    TFDS downloads and prepares where its storage is reachable (this machine has no network: there it fails with
    one UserError line).
Every split is an `ImageRecords`: `len(src)`, `src[i]` -> {'image': uint8 [H, W, C], 'label': int}. Local
datasets store the encoded file bytes (no TensorFlow needed to write or read them); images are decoded with PIL.
"""
import hashlib
import io

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxssl import storage
from jaxssl.data import beam_prepare, corpora, corpus_builders, corpus_files
from jaxssl.errors import UserError

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
FORMAT = 1  # bump when the records change: prepared datasets of older formats are rebuilt


class _ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """{'image': encoded file bytes, 'label': class index} records generated here (nothing to download); the class
  names are the label feature's names."""
  VERSION = tfds.core.Version('1.0.0')
  code_path = None  # no checksums file beside generated data (see corpus_builders._TextBuilder)
  url_infos = None

  def __init__(self, *, classes: tuple[str, ...], validation_fraction: float, **kwargs):
    self._classes, self._validation_fraction = tuple(classes), validation_fraction
    super().__init__(**kwargs)
    self._original_state.update(classes=self._classes, validation_fraction=validation_fraction)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=(), dtype=np.object_),
        'label': tfds.features.ClassLabel(names=list(self._classes))}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(False), 'validation': self._generate_examples(True)}

  def _labelled(self):
    """(encoded image bytes, label) of every image, in a fixed order."""
    raise NotImplementedError

  def _generate_examples(self, validation: bool):
    items = list(self._labelled())
    held_out = beam_prepare.validation_indices(len(items), self._validation_fraction)
    for i, (data, label) in enumerate(items):
      if (i in held_out) == validation:
        yield i, {'image': data, 'label': label}


class JaxsslDigits(_ImageBuilder, skip_registration=True):
  """scikit-learn's digits as 8x8 grayscale PNGs (values 0..16 scaled to 0..255)."""
  name = 'jaxssl_digits'

  def _labelled(self):
    from sklearn import datasets  # scikit-learn only for this corpus
    digits = datasets.load_digits()
    for pixels, label in zip(digits.images, digits.target):
      yield encode_png(np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]), int(label)


class JaxsslImageFolder(_ImageBuilder, skip_registration=True):
  """A folder of class subfolders; `files` are (path, label) pairs."""
  name = 'jaxssl_image_folder'

  def __init__(self, *, files: tuple[tuple[str, int], ...], **kwargs):
    self._files = tuple(files)
    super().__init__(**kwargs)
    self._original_state.update(files=self._files)

  def _labelled(self):
    for path, label in self._files:
      data = storage.read_bytes(path)
      decode_image(data, path)  # a broken file fails here, naming it, not while training
      yield data, label


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 1 or 3] -> PNG bytes."""
  out = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(out, format='PNG')
  return out.getvalue()


def decode_image(data: bytes, name: str = 'image') -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 1] (grayscale) or [H, W, 3] (anything else becomes RGB)."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.mode in ('L', '1', 'I;16', 'I', 'F'):
        return np.asarray(img.convert('L'))[..., None]
      return np.asarray(img.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{name} is not a readable image ({type(e).__name__}: {e}): remove or replace it') from None


class ImageRecords:
  """A split as {'image': uint8 [H, W, C], 'label': int} records; `classes` names the labels."""

  def __init__(self, source, classes: tuple[str, ...]):
    self._source, self.classes = source, tuple(classes)

  def __len__(self):
    return len(self._source)

  @staticmethod
  def _record(record) -> dict:
    image = record['image']
    if isinstance(image, (bytes, np.bytes_)):
      image = decode_image(bytes(image))
    image = np.asarray(image, np.uint8)
    return {'image': image if image.ndim == 3 else image[..., None], 'label': int(record['label'])}

  def __getitem__(self, index):
    return self._record(self._source[int(index)])

  def __getitems__(self, indices):
    return [self._record(r) for r in self._source.__getitems__([int(i) for i in indices])]


def list_class_folders(folder: str) -> tuple[tuple[str, ...], tuple[tuple[str, int], ...]]:
  """(class names, ((path, label), ...)) of a folder of class subfolders of images, sorted; UserError when it has
  none."""
  return corpus_files.list_class_folders(
      folder, IMAGE_SUFFIXES, 'image', "pass a folder with one subfolder of images per class, 'digits', or a TFDS "
      'name such as cifar10')


def _folder_config_name(files, validation_fraction: float) -> str:
  """A hash of the files (path, size, mtime), the validation share and FORMAT: a changed folder is prepared anew."""
  h = hashlib.sha256(f'format={FORMAT} validation_fraction={validation_fraction!r}\n'.encode())
  for path, label in files:
    st = storage.path(path).stat()
    h.update(f'{path}\0{label}\0{st.length}\0{st.mtime}\n'.encode())
  return 'images_' + h.hexdigest()[:20]


def _is_path(corpus: str) -> bool:
  return '://' in corpus or corpus.startswith(('/', '.', '~')) or storage.isdir(corpus)


def corpus_identity(corpus: str, data_dir: str = '', validation_fraction: float = 0.2) -> dict:
  """What an image corpus is, JSON-able (a checkpoint records it): its kind and the prepared dataset's name,
  which for a folder hashes every file's path, size and mtime. Nothing is prepared or read but file metadata."""
  if corpus == 'digits':
    return {'corpus': corpus, 'kind': 'digits', 'dataset': f'{JaxsslDigits.name}/v{FORMAT}_val{validation_fraction!r}'}
  if _is_path(corpus):
    _, files = list_class_folders(corpus)
    return {'corpus': corpus, 'kind': 'image_folder', 'images': len(files),
            'dataset': f'{JaxsslImageFolder.name}/{_folder_config_name(files, validation_fraction)}'}
  return {'corpus': corpus, 'kind': 'tfds', 'dataset': corpus}


def check_same_corpus(saved: dict, corpus: str, data_dir: str = '', validation_fraction: float = 0.2, *,
                      workdir: str = '', while_starting: bool = False) -> None:
  """UserError (one line) when the image corpus now differs from `saved` (a corpus_identity)."""
  now = corpus_identity(corpus, data_dir, validation_fraction)
  if now == saved:
    return
  change = (f'{saved.get("dataset")} ({saved.get("images", "?")} images) there, {now.get("dataset")} '
            f'({now.get("images", "?")} images) now')
  if while_starting:
    raise UserError(f'the image corpus changed while this run was opening it ({change}): nothing was trained; '
                    'rerun the same command once the images stay unchanged')
  raise UserError(f'the image corpus differs from the one the checkpoints in {workdir or "the workdir"} trained on '
                  f'({change}): restore the images as they were (contents and modification times) to resume, or '
                  'start a new --workdir to train on the new ones')


def load_image_corpus(corpus: str, data_dir: str = '', validation_fraction: float = 0.2) -> dict:
  """Prepares (once, under data_dir) and opens an image corpus: {'train', 'validation'} ImageRecords."""
  if not 0.0 < validation_fraction < 1.0:
    raise UserError(f'data.validation_fraction={validation_fraction} must be in (0, 1) for an image corpus: '
                    'pass --config.data.validation_fraction=0.2')
  data_dir = data_dir or corpora.default_data_dir()
  if corpus == 'digits':
    classes = tuple(str(d) for d in range(10))
    config = tfds.core.BuilderConfig(name=f'v{FORMAT}_val{validation_fraction!r}')
    make = lambda: JaxsslDigits(classes=classes, validation_fraction=validation_fraction, config=config,
                                data_dir=data_dir, file_format='array_record')
  elif storage.isdir(corpus):
    classes, files = list_class_folders(corpus)
    config = tfds.core.BuilderConfig(name=_folder_config_name(files, validation_fraction))
    make = lambda: JaxsslImageFolder(files=files, classes=classes, validation_fraction=validation_fraction,
                                     config=config, data_dir=data_dir, file_format='array_record')
  elif _is_path(corpus):
    list_class_folders(corpus)  # a path that is no folder: raises the missing-folder error
  else:
    return _load_tfds_images(corpus, data_dir)
  builder = corpus_builders.prepared_builder(make, data_dir)
  return {s: ImageRecords(builder.as_data_source(s), classes) for s in ('train', 'validation')}


def _load_tfds_images(name: str, data_dir: str) -> dict:
  """A public TFDS image dataset: its train split and its validation (or test) split."""
  builder = corpora.open_tfds_builder(name, data_dir, what='image corpus')
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise UserError(f"TFDS dataset {name!r} has no 'image' and 'label' features (it has "
                    f"{', '.join(features.keys())}): pass an image classification dataset such as cifar10")
  held_out = next((s for s in ('validation', 'test') if s in builder.info.splits), None)
  names = {'train': 'train', 'validation': held_out} if held_out else {'train': 'train[:-10%]',
                                                                        'validation': 'train[-10%:]'}
  classes = tuple(features['label'].names)
  return {k: ImageRecords(builder.as_data_source(v), classes) for k, v in names.items()}

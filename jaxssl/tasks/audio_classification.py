"""Audio classification: one utterance → one of the training set's classes, from the wav2vec 2.0 context vectors
averaged over the utterance's frames (full fine-tuning of a wav2vec2 export with a new linear head; keyword
spotting, speaker or language identification, sound events).

`task.train` / `task.dev`: a folder with one subfolder of .wav/.flac files per class (local or gs://), read at
16 kHz mono as the pretraining corpora are (data/audio.py). `data.seq_len` counts latent frames (20 ms each with
the paper's conv encoder): each utterance is cut to the centre crop that makes that many frames (or zero-padded;
the padding frames are left out of the average), then normalised to zero mean, unit variance like the
pretraining crops. Loss: softmax cross-entropy; dev metric: accuracy.
"""
import numpy as np

from jaxssl.data import audio_batches, corpus_files
from jaxssl.errors import UserError
from jaxssl.tasks import classification
from jaxssl.tasks.base import Example


def read_file(path: str) -> list[Example]:
  """Labelled utterances of a class-folder tree; labels are the class names."""
  # reason: data.audio brings TFDS and the corpus builders (~0.5 s of a text job's start): only audio tasks read it
  from jaxssl.data import audio  # noqa: PLC0415
  classes, files = corpus_files.list_class_folders(
      path, audio.SUFFIXES, 'audio', 'pass a folder with one subfolder of .wav/.flac files per class')
  return [Example(label=classes[label], audio=audio.read_utterance(f)) for f, label in files]


def settle_body(task_cfg, model_cfg) -> None:
  """The body's conv encoder: it says how many samples make a frame."""
  if 'conv_layers' not in model_cfg:
    raise UserError(f'task.kind=audio_classification needs an audio body (a wav2vec2 export), not '
                    f'model.name={model_cfg.get("name")!r}')
  with task_cfg.unlocked():
    task_cfg.conv_layers = [[int(v) for v in layer] for layer in model_cfg['conv_layers']]
    task_cfg.normalize = bool(task_cfg.get('normalize', True))


def featurize(task_cfg, examples, tokenizer, seq_len: int, labels: list[str]):
  """({'audio': float32 [N, samples], 'frame_mask': int32 [N, seq_len], 'labels': class ids}, None)."""
  del tokenizer
  index = {name: i for i, name in enumerate(labels)}
  conv = [tuple(layer) for layer in task_cfg.conv_layers]
  want = audio_batches.samples_for_frames(conv, seq_len)
  rows, frame_mask = [], np.zeros((len(examples), seq_len), np.int32)
  for i, e in enumerate(examples):
    samples, frames = audio_batches.window(e.audio, max(0, (len(e.audio) - want) // 2), conv, seq_len,
                                           normalize=task_cfg.normalize)
    rows.append(samples)
    frame_mask[i, :frames] = 1
  return {'audio': np.stack(rows), 'frame_mask': frame_mask,
          'labels': np.array([index.get(e.label, -1) for e in examples], np.int32)}, None


KIND = classification.input_classification_kind(
    'audio_classification', read_file=read_file, what='class folders of .wav/.flac files (task.train, task.dev)',
    featurize=featurize, input_keys=('audio', 'frame_mask'), settle_body=settle_body)

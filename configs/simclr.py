"""Contrastive pretraining of a ViT on images (SimCLR, Chen et al. 2020): two augmented views per image, a
projection head, NT-Xent over the global batch (every other image of every device is a negative).

  python -m jaxssl.pretrain --config configs/simclr.py:digits --workdir /tmp/simclr_digits
  python -m jaxssl.pretrain --config configs/simclr.py:tiny --config.data.corpus=/data/my_images/ --workdir ...

data.corpus as configs/mae.py. Views: random resized crop (data.crop_scale, data.crop_ratio), horizontal flip
(data.flip), colour jitter (data.jitter_prob; brightness, contrast, saturation) and greyscale (data.grayscale).
The digits variants crop less (0.5 to 1 of the area) and never flip (a mirrored digit is another symbol).
"""
from jaxssl import config as config_lib

SIZES = {
    'tiny': (16, 4, 1, 2, 64, 4, 'digits'),
    'digits': (16, 4, 1, 2, 64, 4, 'digits'),
    'base': (224, 16, 3, 12, 768, 12, 'imagenet2012'),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = 'tiny'):
  if variant not in SIZES:
    raise ValueError(f'unknown variant {variant!r}: use one of {VARIANTS}')
  size = SIZES[variant]
  image, patch, corpus = size[0], size[1], size[-1]
  hidden = size[4]
  layers, heads = size[3], size[5]
  model = dict(name='simclr', image_size=image, patch_size=patch, channels=size[2], num_layers=layers,
               hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden, max_position=(image // patch) ** 2,
               position='sincos', pooling='mean', dropout_rate=0.0, attention_dropout_rate=0.0,
               initializer_range=0.02, layer_norm_eps=1e-6, projection_hidden_size=hidden,
               projection_size=min(128, hidden), temperature=0.2 if variant != 'base' else 0.1,
               **config_lib.compute_keys())
  patches = (image // patch) ** 2
  data = dict(corpus=corpus, seq_len=patches, max_predictions=0, validation_fraction=0.2,
              crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=0.5, jitter_prob=0.8, brightness=0.4,
              contrast=0.4, saturation=0.4, grayscale=0.2)
  if corpus == 'digits':
    data.update(crop_scale=(0.5, 1.0), flip=0.0)
  train = dict(learning_rate=1e-3, end_learning_rate=1e-5, weight_decay=0.05, b2=0.999, eps=1e-8)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train)
  c.tokenizer.vocab_size = 0  # images: no tokenizer
  if variant == 'tiny':
    c.train.update(dict(steps=200, batch_size=32, warmup_steps=20))
    c.checkpoint.every_steps, c.eval.every_steps, c.eval.batches, c.log.every_steps = 100, 100, 4, 10
  elif variant == 'digits':
    c.train.update(dict(steps=2000, batch_size=128, warmup_steps=100))
    c.checkpoint.every_steps, c.eval.every_steps, c.eval.batches, c.log.every_steps = 500, 500, 2, 50
  else:
    # 100 ImageNet epochs of 4096 (313 steps each), 10 of warmup.
    c.train.update(dict(steps=31_300, batch_size=4096, warmup_steps=3130, learning_rate=1e-3 * 4096 / 256))
    c.checkpoint.every_steps = c.eval.every_steps = 5000
  return c

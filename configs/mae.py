"""Masked-autoencoder pretraining of a ViT on images (MAE, He et al. 2021): hide 75% of the patches, encode the
visible ones, reconstruct the hidden ones' normalised pixels.

  python -m jaxssl.pretrain --config configs/mae.py:digits --workdir /tmp/mae_digits
  python -m jaxssl.pretrain --config configs/mae.py:tiny --config.data.corpus=/data/my_images/ --workdir ...
  python -m jaxssl.probe --workdir /tmp/mae_digits          # linear probe of the frozen encoder

data.corpus: 'digits' (scikit-learn's 1,797 real 8x8 digit scans, offline), a folder with one subfolder of
images per class, or a TFDS image dataset ('cifar10', 'imagenet2012') where TFDS storage is reachable. Images
are resized to model.image_size; data.seq_len is the number of patches (the loop counts patches as tokens).

Sizes: tiny = 2 layers, hidden 64 (+ 1 decoder layer of 32) on 16x16 images in 4x4 patches; digits = the same
shape trained 3000 steps on the digits (the README's measured run); base = ViT-B/16 on 224x224 (MAE's
ImageNet setting: decoder 8 x 512, batch 4096, base lr 1.5e-4 x batch / 256, AdamW (0.9, 0.95), wd 0.05).
"""
from jaxssl import config as config_lib

# name: (image_size, patch, channels, layers, hidden, heads, decoder layers, decoder hidden, decoder heads, corpus)
SIZES = {
    'tiny': (16, 4, 1, 2, 64, 4, 1, 32, 2, 'digits'),
    'digits': (16, 4, 1, 2, 64, 4, 1, 32, 2, 'digits'),
    'base': (224, 16, 3, 12, 768, 12, 8, 512, 16, 'imagenet2012'),
}
VARIANTS = tuple(SIZES)


def image_model(name: str, size: tuple, **extra) -> dict:
  """The model section for a SIZES row."""
  image, patch, channels, layers, hidden, heads = size[:6]
  return dict(name=name, image_size=image, patch_size=patch, channels=channels, num_layers=layers,
              hidden_size=hidden, num_heads=heads, intermediate_size=4 * hidden,
              max_position=(image // patch) ** 2, position='sincos', pooling='mean', dropout_rate=0.0,
              attention_dropout_rate=0.0, initializer_range=0.02, layer_norm_eps=1e-6,
              **config_lib.compute_keys(), **extra)


def get_config(variant: str = 'tiny'):
  if variant not in SIZES:
    raise ValueError(f'unknown variant {variant!r}: use one of {VARIANTS}')
  size = SIZES[variant]
  image, patch, _, _, _, _, dec_layers, dec_hidden, dec_heads, corpus = size
  patches = (image // patch) ** 2
  model = image_model('mae', size, decoder_layers=dec_layers, decoder_hidden_size=dec_hidden,
                      decoder_heads=dec_heads, decoder_intermediate_size=4 * dec_hidden, mask_ratio=0.75,
                      # MAE's per-patch normalised targets; on the digits' 16-pixel patches (mostly blank or
                      # saturated) raw pixels probe better: 91.4% against 88.9% (README, Images)
                      norm_pix_loss=variant == 'base')
  data = dict(corpus=corpus, seq_len=patches, max_predictions=patches - int(patches * 0.25),
              validation_fraction=0.2)
  # MAE's AdamW: betas (0.9, 0.95), weight decay 0.05.
  train = dict(learning_rate=1e-3, end_learning_rate=1e-5, weight_decay=0.05, b2=0.95, eps=1e-8)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train)
  c.tokenizer.vocab_size = 0  # images: no tokenizer
  if variant == 'tiny':
    c.train.update(dict(steps=200, batch_size=32, warmup_steps=20))
    c.checkpoint.every_steps, c.eval.every_steps, c.eval.batches, c.log.every_steps = 100, 100, 4, 10
  elif variant == 'digits':
    c.train.update(dict(steps=3000, batch_size=64, warmup_steps=100))
    c.checkpoint.every_steps, c.eval.every_steps, c.eval.batches, c.log.every_steps = 500, 500, 5, 50
  else:
    # 800 ImageNet epochs of 4096 (313 steps each), 40 of warmup.
    c.train.update(dict(steps=250_400, batch_size=4096, warmup_steps=12_520, learning_rate=1.5e-4 * 4096 / 256))
    c.checkpoint.every_steps = c.eval.every_steps = 5000
  return c

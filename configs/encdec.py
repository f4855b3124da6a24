"""Encoder-decoder denoising pretraining (BART / MASS): corrupt a document piece, reconstruct it.

  python -m jaxssl.pretrain --config configs/encdec.py:tiny --workdir /tmp/encdec_tiny
  python -m jaxssl.pretrain --config configs/encdec.py:mass_tiny --workdir /tmp/mass_tiny
  python -m jaxssl.pretrain --config configs/encdec.py:tiny --config.data.corruptions=token_masking,token_deletion ...

Sizes: tiny = 2 + 2 layers, hidden 128 (~1.5 s/step on a busy 2-core CPU); base = 6 + 6 layers, hidden 768,
12 heads (BART-base's shape, ~140M parameters with a 50k vocabulary). Corruptions (jaxssl/data/denoising.py): the
plain variants and bart_* use BART's best pair, text infilling (30% of tokens, Poisson(3) spans) + sentence
permutation; mass_* mask one contiguous span of half the piece and reconstruct only that span.
"""
from jaxssl import config as config_lib

# name: (encoder layers, decoder layers, hidden, seq_len)
SIZES = {'tiny': (2, 2, 128, 128), 'base': (6, 6, 768, 512)}
PRESETS = {
    'bart': ('text_infilling', 'sentence_permutation'),
    'mass': ('mass',),
}
VARIANTS = tuple(SIZES) + tuple(f'{p}_{s}' for p in PRESETS for s in SIZES)


def get_config(variant: str = 'tiny'):
  preset, _, size = variant.rpartition('_')
  preset = preset or 'bart'
  if size not in SIZES or preset not in PRESETS:
    raise ValueError(f'unknown variant {variant!r}: use one of {VARIANTS}')
  enc_layers, dec_layers, hidden, seq_len = SIZES[size]
  model = dict(
      name='encdec', num_layers=enc_layers, num_decoder_layers=dec_layers, hidden_size=hidden,
      num_heads=hidden // 64, intermediate_size=4 * hidden, max_position=seq_len,
      dropout_rate=0.1, attention_dropout_rate=0.1,  # BART: dropout 0.1 (attention dropout 0.0 in base)
      initializer_range=0.02, layer_norm_eps=1e-5,
      **config_lib.compute_keys())  # 'splash' takes the XLA path for cross-attention
  data = dict(
      seq_len=seq_len,         # source and target length: pieces of up to seq_len - 2 tokens
      max_predictions=seq_len,  # every target position is predicted (read by the shared FLOPs/MFU code)
      corruptions=PRESETS[preset],  # any of denoising.CORRUPTIONS ('mass' alone)
      mask_rate=0.3,           # token masking / deletion / text infilling: this share of the piece's tokens
      poisson_lambda=3.0,      # text infilling span lengths ~ Poisson(lambda)
      shuffle_window=3,        # word_shuffle: no word moves further than this
      mass_fraction=0.5,       # mass: the span's share of the piece
  )
  # BART's AdamW settings.
  train = dict(learning_rate=4e-4, end_learning_rate=4e-5, weight_decay=0.01, b2=0.98, eps=1e-6)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train)

  if size == 'tiny':
    # The quickstart: ~1.5 s/step at 32 x 128 on a busy 2-core CPU; reconstruction accuracy passes 0.15 within the
    # first 40 steps (a minute) and keeps climbing.
    config_lib.quickstart(c, end_learning_rate=1e-4)
  else:
    # BART-base: its 50k vocabulary size; 256 x 512 source tokens per step (BART-large used 8000 x 512).
    config_lib.full_scale(c, vocab_size=50265, steps=500_000, batch_size=256, warmup_steps=10_000)
  return c

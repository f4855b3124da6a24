"""wav2vec 2.0 pretraining on raw 16 kHz speech: span-masked latent frames, contrastive loss against quantised targets.

  python -m jaxssl.pretrain --config configs/wav2vec2.py:local --config.data.corpus=/data/wavs --workdir /tmp/w2v
  python -m jaxssl.pretrain --config configs/wav2vec2.py:base --config.data.corpus=librispeech --workdir gs://b/w2v

data.corpus is a folder (recursive), file or glob of .wav/.flac files, local or in a bucket, or a TFDS name
(librispeech, speech_commands) where TFDS storage is reachable; it is prepared once into a TFDS dataset (data/audio.py).
data.seq_len counts latent frames (20 ms each with the paper's conv encoder); a row is the crop of audio that
makes that many frames.

Variants: base = the paper's BASE (7 conv layers of 512 channels, kernels (10,3,3,3,3,2,2), strides (5,2,2,2,2,2,2);
12 post-LN layers of 768, 12 heads, FFN 3072; positional conv 128 wide in 16 groups; G=2 codebooks x V=320 entries
of 128 dims; K=100 distractors; 250k-sample crops (781 frames); Adam 5e-4, 32k warmup steps of 400k; ~95M params);
tiny = the same conv shape with 32 channels, 2 layers of 64, V=32 (~0.1M params); local = tiny with a CPU schedule
(600 steps of 16 one-second crops, peak 2e-3) that learns visibly on a 2-core machine in minutes.
"""
from jaxssl import config as config_lib
from jaxssl.data.audio_batches import BASE_CONV

TINY_CONV = tuple((32, kernel, stride) for _, kernel, stride in BASE_CONV)
VARIANTS = ('base', 'tiny', 'local')


def get_config(variant: str = 'tiny'):
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r}: use one of {VARIANTS}')
  if variant == 'base':
    model = dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072, conv_layers=BASE_CONV,
                 pos_conv_kernel=128, pos_conv_groups=16, codebooks=2, codebook_size=320, codevector_dim=256,
                 final_dim=256, max_position=1024)
    seq_len, max_predictions = 781, 512  # 250,000-sample crops (15.6 s); about half the frames are masked
  else:
    model = dict(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=256, conv_layers=TINY_CONV,
                 pos_conv_kernel=16, pos_conv_groups=4, codebooks=2, codebook_size=32, codevector_dim=64,
                 final_dim=64, max_position=512)
    seq_len, max_predictions = 50, 40    # 1 s crops (16,080 samples)
  model = dict(name='wav2vec2', **model, num_negatives=100, logit_temperature=0.1, diversity_weight=0.1,
               feature_penalty_weight=10.0, temperature_start=2.0, temperature_end=0.5, temperature_decay=0.999995,
               dropout_rate=0.1, attention_dropout_rate=0.1, feature_dropout_rate=0.1, initializer_range=0.02,
               layer_norm_eps=1e-5, **config_lib.compute_keys())
  data = dict(
      corpus='',               # a folder of .wav/.flac files (or a TFDS name); required
      seq_len=seq_len,         # latent frames per row
      max_predictions=max_predictions,  # masked frames scored per row (a random subset when more are masked)
      mask_prob=0.065,         # p: each frame starts a masked span with this probability
      mask_length=10,          # M: frames per span
      min_masks=2,             # spans per row at least
      normalize=True,          # each crop to zero mean, unit variance
      validation_fraction=0.1,  # whole files held out
  )
  train = dict(learning_rate=5e-4, end_learning_rate=0.0, weight_decay=0.01, b2=0.98, eps=1e-6)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train, vocab_size=0)
  if variant == 'base':
    # 64 GPUs x 1.4M samples in the paper: about 350 crops of 250k samples per step.
    config_lib.full_scale(c, vocab_size=0, steps=400_000, batch_size=352, warmup_steps=32_000, every_steps=10_000)
  else:
    config_lib.quickstart(c, batch_size=16, learning_rate=2e-3, warmup_steps=50, end_learning_rate=1e-4)
    c.tokenizer.vocab_size = 0
    c.eval.batches = 4
    if variant == 'local':
      c.train.steps = 600
      c.checkpoint.every_steps = 100
      c.eval.every_steps = 100
      c.log.every_steps = 10
  return c

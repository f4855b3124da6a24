"""Encoder-decoder denoising pretraining (BART / MASS): corrupt a document piece, reconstruct it.

  python -m jaxssl.pretrain --config configs/encdec.py:tiny --workdir /tmp/encdec_tiny
  python -m jaxssl.pretrain --config configs/encdec.py:mass_tiny --workdir /tmp/mass_tiny
  python -m jaxssl.pretrain --config configs/encdec.py:tiny --config.data.corruptions=token_masking,token_deletion ...

Sizes: tiny = 2 + 2 layers, hidden 128 (~1.5 s/step on a busy 2-core CPU); base = 6 + 6 layers, hidden 768,
12 heads (BART-base's shape, ~140M parameters with a 50k vocabulary). Corruptions (jaxssl/data/denoising.py): the
plain variants and bart_* use BART's best pair, text infilling (30% of tokens, Poisson(3) spans) + sentence
permutation; mass_* mask one contiguous span of half the piece and reconstruct only that span.
"""
import ml_collections

# name: (encoder layers, decoder layers, hidden, seq_len)
SIZES = {'tiny': (2, 2, 128, 128), 'base': (6, 6, 768, 512)}
PRESETS = {
    'bart': ('text_infilling', 'sentence_permutation'),
    'mass': ('mass',),
}
VARIANTS = tuple(SIZES) + tuple(f'{p}_{s}' for p in PRESETS for s in SIZES)


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  preset, _, size = variant.rpartition('_')
  preset = preset or 'bart'
  if size not in SIZES or preset not in PRESETS:
    raise ValueError(f'unknown variant {variant!r}: use one of {VARIANTS}')
  enc_layers, dec_layers, hidden, seq_len = SIZES[size]
  c = ml_collections.ConfigDict()
  c.variant = variant

  # An export to continue pretraining from (python -m jaxssl.export): its model section, vocabulary and tokenizer
  # replace this config's (dtype, remat, attention, dropout stay).
  c.init_from = ''

  c.model = ml_collections.ConfigDict(dict(
      name='encdec', num_layers=enc_layers, num_decoder_layers=dec_layers, hidden_size=hidden,
      num_heads=hidden // 64, intermediate_size=4 * hidden, max_position=seq_len,
      dropout_rate=0.1, attention_dropout_rate=0.1,  # BART: dropout 0.1 (attention dropout 0.0 in base)
      initializer_range=0.02, layer_norm_eps=1e-5,
      dtype='float32',     # compute dtype; params stay float32. 'bfloat16' on TPU/GPU.
      remat='none',        # 'none' | 'full' | 'dots'
      scan_layers=True,    # each stack is one compiled block body under nnx.scan
      attention='auto',    # 'auto' (cuDNN flash on GPU in bf16, else XLA) | 'xla' | 'cudnn' | 'splash'
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='ptb',            # 'ptb', a TFDS name, or a local path/glob
      data_dir='',             # TFDS cache; '' = ~/.cache/jaxssl/tfds (or $JAXSSL_DATA_DIR)
      seq_len=seq_len,         # source and target length: pieces of up to seq_len - 2 tokens
      max_predictions=seq_len,  # every target position is predicted (read by the shared FLOPs/MFU code)
      corruptions=PRESETS[preset],  # any of denoising.CORRUPTIONS ('mass' alone)
      mask_rate=0.3,           # token masking / deletion / text infilling: this share of the piece's tokens
      poisson_lambda=3.0,      # text infilling span lengths ~ Poisson(lambda)
      shuffle_window=3,        # word_shuffle: no word moves further than this
      mass_fraction=0.5,       # mass: the span's share of the piece
      ptb_sentences_per_doc=16,  # PTB has no documents: group consecutive sentences into pseudo-documents
      validation_fraction=0.01,  # local text without its own held-out files: this share of documents
      num_threads=2,
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=8000, model_type='unigram', character_coverage=0.9995,
      max_training_sentences=2_000_000,
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, microbatches=1, seed=0,
      learning_rate=4e-4, warmup_steps=100, end_learning_rate=4e-5,
      weight_decay=0.01, b1=0.9, b2=0.98, eps=1e-6, grad_clip_norm=1.0,  # BART's AdamW settings
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = the rest
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=500, batches=20))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_flops_per_device=0.0))  # 0 = from the table

  if size == 'tiny':
    # The quickstart: ~1.5 s/step at 32 x 128 on a busy 2-core CPU; reconstruction accuracy passes 0.15 within the
    # first 40 steps (a minute) and keeps climbing.
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
  else:
    # BART-base: its 50k vocabulary size; 256 x 512 source tokens per step (BART-large used 8000 x 512).
    c.tokenizer.vocab_size = 50265
    c.train.update(steps=500_000, batch_size=256, warmup_steps=10_000)
    c.checkpoint.every_steps = 5000
    c.eval.every_steps = 5000
  return c

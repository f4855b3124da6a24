"""GPT-2 style causal LM pretraining. Variants: layers/hidden, heads = hidden / 64.

  python -m jaxssl.pretrain --config configs/gpt.py:tiny --workdir /tmp/gpt_tiny

small = GPT-2 small (124M with its 50257 vocab), medium = GPT-2 medium (350M).
"""
import ml_collections

# name: (layers, hidden, seq_len)
SIZES = {
    'tiny': (2, 128, 128),
    'mini': (4, 256, 256),
    'small': (12, 768, 1024),
    'medium': (24, 1024, 1024),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  layers, hidden, seq_len = SIZES[variant]
  c = ml_collections.ConfigDict()
  c.variant = variant

  c.model = ml_collections.ConfigDict(dict(
      name='gpt', num_layers=layers, hidden_size=hidden, num_heads=hidden // 64,
      intermediate_size=4 * hidden, max_position=seq_len,
      dropout_rate=0.1, attention_dropout_rate=0.1,  # GPT-2's resid/embd and attn dropout
      initializer_range=0.02, layer_norm_eps=1e-5,
      dtype='float32',     # compute dtype; params stay float32. 'bfloat16' on TPU/GPU.
      remat='none',        # 'none' | 'full' | 'dots' (save matmul outputs, recompute the rest)
      scan_layers=True,    # one compiled block body under nnx.scan: compile time flat in depth
      attention='xla',     # implementation for jax.nn.dot_product_attention: 'xla' | 'cudnn'
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='ptb',            # 'ptb', a TFDS name ('wikipedia/20230601.en', 'c4/en'), or a local path/glob
      data_dir='',             # TFDS cache; '' = ~/.cache/jaxssl/tfds (or $JAXSSL_DATA_DIR)
      seq_len=seq_len,         # documents are packed into rows of this length (segment_ids + positions)
      max_predictions=seq_len,  # every position predicts the next token (read by the shared FLOPs/MFU code)
      ptb_sentences_per_doc=16,  # PTB has no documents: group consecutive sentences into pseudo-documents
      validation_fraction=0.01,  # local text without its own held-out files: this share of documents
      num_threads=2,
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=8000, model_type='unigram', character_coverage=0.9995,
      max_training_sentences=2_000_000,
  ))
  # GPT-2/3 optimiser settings (as nanoGPT): AdamW b2 0.95, weight decay 0.1, decay to a tenth of the peak.
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, microbatches=1, seed=0,
      learning_rate=6e-4, warmup_steps=100, end_learning_rate=6e-5,
      weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0,
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,    # with 'skip': stop after this many non-finite steps in a row
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = the rest
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=500, batches=20))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_flops_per_device=0.0))  # 0 = from the table

  if variant == 'tiny':
    # The quickstart: learns visibly on a 2-core CPU in ~10 minutes.
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
  elif variant == 'mini':
    c.train.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=500, steps=50_000, batch_size=64)
  else:
    # ~0.5M tokens per step (GPT-2 / nanoGPT); GPT-2's vocabulary size, so converted checkpoints fit.
    c.tokenizer.vocab_size = 50257
    c.train.update(warmup_steps=2000, steps=600_000, batch_size=512)
    if variant == 'medium':
      c.train.update(learning_rate=3e-4, end_learning_rate=3e-5)
    c.checkpoint.every_steps = 5000
    c.eval.every_steps = 5000
  return c

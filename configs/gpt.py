"""Causal LM pretraining, GPT-2 or Llama style. GPT-2 variants: layers/hidden, heads = hidden / 64.

  python -m jaxssl.pretrain --config configs/gpt.py:tiny --workdir /tmp/gpt_tiny
  python -m jaxssl.pretrain --config configs/gpt.py:llama_tiny --workdir /tmp/llama_tiny

small = GPT-2 small (124M with its 50257 vocab), medium = GPT-2 medium (350M). llama_tiny = the tiny quickstart with
the Llama architecture (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head, no dropout);
llama_1b = Llama 3.2 1B's shape (1.24B parameters with its 128256 vocab; converted checkpoints fit).
"""
import ml_collections

# name: (layers, hidden, seq_len)
SIZES = {
    'tiny': (2, 128, 128),
    'mini': (4, 256, 256),
    'small': (12, 768, 1024),
    'medium': (24, 1024, 1024),
}
# name: (layers, hidden, heads, kv heads, intermediate, seq_len, max_position)
LLAMA_SIZES = {
    'llama_tiny': (2, 128, 4, 2, 352, 128, 128),
    'llama_1b': (16, 2048, 32, 8, 8192, 2048, 131072),
}
VARIANTS = tuple(SIZES) + tuple(LLAMA_SIZES)


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  llama = variant in LLAMA_SIZES
  if llama:
    layers, hidden, heads, kv_heads, inner, seq_len, max_position = LLAMA_SIZES[variant]
  else:
    layers, hidden, seq_len = SIZES[variant]
    heads, kv_heads, inner, max_position = hidden // 64, 0, 4 * hidden, seq_len
  c = ml_collections.ConfigDict()
  c.variant = variant

  # An export to continue pretraining from (python -m jaxssl.export, or jaxssl.convert from-hf of GPT-2 / Llama):
  # its model section, vocabulary and tokenizer replace this config's (dtype, remat, attention, dropout stay).
  c.init_from = ''

  c.model = ml_collections.ConfigDict(dict(
      name='gpt', num_layers=layers, hidden_size=hidden, num_heads=heads,
      intermediate_size=inner, max_position=max_position,
      dropout_rate=0.1, attention_dropout_rate=0.1,  # GPT-2's resid/embd and attn dropout
      initializer_range=0.02, layer_norm_eps=1e-5,
      dtype='float32',     # compute dtype; params stay float32. 'bfloat16' on TPU/GPU.
      remat='none',        # 'none' | 'full' | 'dots' (save matmul outputs, recompute the rest)
      scan_layers=True,    # one compiled block body under nnx.scan: compile time flat in depth
      attention='auto',    # 'auto' (cuDNN flash on GPU in bf16, splash on TPU, else XLA) | 'xla' | 'cudnn' | 'splash'
      loss_chunk=64,       # train loss: positions per block of the fused projection + cross-entropy (models/lm_loss.py)
                           # instead of whole [B, T, V] logits (17% faster GPT-2 small step on CPU); 0 = off.
                           # 64 over 32: half the adds of the accumulated output-projection gradient (+5% there)
      # Architecture (GPT-2 here; the llama_* variants switch them):
      norm='layernorm',    # 'layernorm' | 'rmsnorm' (eps = layer_norm_eps)
      position='learned',  # 'learned' position table | 'rope' (rotary, HF Llama layout)
      rope_theta=10000.0,
      rope_scaling=None,   # None | HF's dict: {'rope_type': 'llama3', 'factor', 'low_freq_factor', ...} or 'linear'
      mlp='gelu',          # 'gelu' | 'swiglu'
      num_kv_heads=kv_heads,  # 0 = num_heads; fewer = grouped-query attention (must divide num_heads)
      head_dim=0,          # 0 = hidden_size // num_heads
      tie_embeddings=True,  # False: a separate lm_head (embed, vocab) kernel
      use_bias=True,       # biases in q/k/v/out and the MLP
      attention_bias=False,  # q/k/v biases even with use_bias=False (Qwen2)
  ))
  if llama:
    c.model.update(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
                   dropout_rate=0.0, attention_dropout_rate=0.0, layer_norm_eps=1e-5)
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

  if variant in ('tiny', 'llama_tiny'):
    # The quickstart: learns visibly on a 2-core CPU in ~10 minutes.
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
    if variant == 'llama_tiny':
      c.model.tie_embeddings = False  # as Llama 2/3 8B: exercises the separate output head
  elif variant == 'mini':
    c.train.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=500, steps=50_000, batch_size=64)
  elif variant == 'llama_1b':
    # Llama 3.2 1B: rope_theta 500000 with Llama 3.1's long-context scaling, tied embeddings, 128256 vocab.
    c.model.update(rope_theta=500000.0, tie_embeddings=True)
    c.model.rope_scaling = dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    c.tokenizer.vocab_size = 128256
    # ~1M tokens per step (512 x 2048), decay to a tenth. On accelerators: --config.model.dtype=bfloat16.
    c.train.update(learning_rate=3e-4, end_learning_rate=3e-5, warmup_steps=2000, steps=250_000, batch_size=512)
    c.checkpoint.every_steps = 2000
    c.eval.every_steps = 2000
  else:
    # ~0.5M tokens per step (GPT-2 / nanoGPT); GPT-2's vocabulary size, so converted checkpoints fit.
    c.tokenizer.vocab_size = 50257
    c.train.update(warmup_steps=2000, steps=600_000, batch_size=512)
    if variant == 'medium':
      c.train.update(learning_rate=3e-4, end_learning_rate=3e-5)
    c.checkpoint.every_steps = 5000
    c.eval.every_steps = 5000
  return c

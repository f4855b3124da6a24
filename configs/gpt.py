"""Causal LM pretraining, GPT-2 or Llama style. GPT-2 variants: layers/hidden, heads = hidden / 64.

  python -m jaxssl.pretrain --config configs/gpt.py:tiny --workdir /tmp/gpt_tiny
  python -m jaxssl.pretrain --config configs/gpt.py:llama_tiny --workdir /tmp/llama_tiny

small = GPT-2 small (124M with its 50257 vocab), medium = GPT-2 medium (350M). llama_tiny = the tiny quickstart with
the Llama architecture (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases, untied head, no dropout);
llama_1b = Llama 3.2 1B's shape (1.24B parameters with its 128256 vocab; converted checkpoints fit).
gemma3_tiny = the tiny quickstart with Gemma 3's architecture (models/gemma.py: (1 + w) RMSNorm, GeGLU, q/k norms,
four norms per layer, local sliding-window layers with every 2nd layer global, scaled embeddings, tied head);
gemma3_270m / gemma3_1b = google/gemma-3-270m and gemma-3-1b-pt (268M / 1.0B parameters with the 262144 vocab;
window 512, every 6th layer global, RoPE bases 10k local / 1M global).

  python -m jaxssl.pretrain --config configs/gpt.py:gemma3_tiny --workdir /tmp/gemma3_tiny
"""
from jaxssl import config as config_lib

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
# name: (layers, hidden, heads, kv heads, head dim, intermediate, seq_len, max_position, window, global every)
GEMMA3_SIZES = {
    'gemma3_tiny': (4, 128, 4, 2, 32, 352, 128, 128, 32, 2),
    'gemma3_270m': (18, 640, 4, 1, 256, 2048, 2048, 32768, 512, 6),
    'gemma3_1b': (26, 1152, 4, 1, 256, 6912, 2048, 32768, 512, 6),
}
VARIANTS = tuple(SIZES) + tuple(LLAMA_SIZES) + tuple(GEMMA3_SIZES)


def get_config(variant: str = 'tiny'):
  llama, gemma3 = variant in LLAMA_SIZES, variant in GEMMA3_SIZES
  if gemma3:
    layers, hidden, heads, kv_heads, head_dim, inner, seq_len, max_position, window, every = GEMMA3_SIZES[variant]
  elif llama:
    layers, hidden, heads, kv_heads, inner, seq_len, max_position = LLAMA_SIZES[variant]
  else:
    layers, hidden, seq_len = SIZES[variant]
    heads, kv_heads, inner, max_position = hidden // 64, 0, 4 * hidden, seq_len
  model = dict(
      name='gpt', num_layers=layers, hidden_size=hidden, num_heads=heads,
      intermediate_size=inner, max_position=max_position,
      dropout_rate=0.1, attention_dropout_rate=0.1,  # GPT-2's resid/embd and attn dropout
      initializer_range=0.02, layer_norm_eps=1e-5,
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
      **config_lib.compute_keys())
  if llama or gemma3:
    model.update(norm='rmsnorm', position='rope', mlp='swiglu', use_bias=False,
                 dropout_rate=0.0, attention_dropout_rate=0.0, layer_norm_eps=1e-5)
  if gemma3:  # Gemma's options (models/gemma.py; other variants leave them off, GPTConfig's defaults)
    model.update(norm='rmsnorm_plus_one',  # RMSNorm scaled by (1 + w)
                 mlp='geglu', layer_norm_eps=1e-6, head_dim=head_dim, tie_embeddings=True,
                 qk_norm=True,         # RMSNorm of each query/key head before RoPE
                 sandwich_norm=True,   # also a norm after attention and after the MLP (4 per layer)
                 query_pre_attn_scalar=float(head_dim),  # attention scores * this^-1/2 (0 = head_dim)
                 sliding_window=window,  # local layers attend to the last W tokens (0 = every layer global)
                 sliding_window_pattern=every,  # every Nth layer is global (0 = all local)
                 rope_theta=1_000_000.0, rope_local_theta=10_000.0,  # global / local RoPE bases
                 scale_embeddings=True)  # token embeddings * sqrt(hidden_size)
  data = dict(
      seq_len=seq_len,         # documents are packed into rows of this length (segment_ids + positions)
      max_predictions=seq_len,  # every position predicts the next token (read by the shared FLOPs/MFU code)
  )
  # GPT-2/3 optimiser settings (as nanoGPT): AdamW b2 0.95, weight decay 0.1, decay to a tenth of the peak.
  train = dict(learning_rate=6e-4, end_learning_rate=6e-5, weight_decay=0.1, b2=0.95, eps=1e-8)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train)

  if variant in ('tiny', 'llama_tiny', 'gemma3_tiny'):
    config_lib.quickstart(c, end_learning_rate=1e-4)  # ~10 minutes on a 2-core CPU
    if variant == 'llama_tiny':
      c.model.tie_embeddings = False  # as Llama 2/3 8B: exercises the separate output head
  elif variant == 'mini':
    c.train.update(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=500, steps=50_000, batch_size=64)
  elif variant == 'llama_1b':
    # Llama 3.2 1B: rope_theta 500000 with Llama 3.1's long-context scaling, tied embeddings, 128256 vocab.
    c.model.update(rope_theta=500000.0, tie_embeddings=True)
    c.model.rope_scaling = dict(rope_type='llama3', factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)
    # ~1M tokens per step (512 x 2048), decay to a tenth (bfloat16 on accelerators: model.dtype=auto).
    config_lib.full_scale(c, vocab_size=128256, every_steps=2000, learning_rate=3e-4, end_learning_rate=3e-5,
                          warmup_steps=2000, steps=250_000, batch_size=512)
  elif gemma3:
    # Gemma 3's 262144-token vocabulary, so converted checkpoints fit; ~1M tokens per step (512 x 2048).
    config_lib.full_scale(c, vocab_size=262144, every_steps=2000, learning_rate=3e-4, end_learning_rate=3e-5,
                          warmup_steps=2000, steps=250_000, batch_size=512)
  else:
    # ~0.5M tokens per step (GPT-2 / nanoGPT); GPT-2's vocabulary size, so converted checkpoints fit.
    config_lib.full_scale(c, vocab_size=50257, warmup_steps=2000, steps=600_000, batch_size=512)
    if variant == 'medium':
      c.train.update(learning_rate=3e-4, end_learning_rate=3e-5)
  return c

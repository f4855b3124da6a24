"""ELMo bidirectional LSTM language model (Peters et al. 2018) on packed documents (the same rows as GPT).

  python -m jaxssl.pretrain --config configs/elmo.py:tiny --workdir /tmp/elmo_tiny

Variants: (layers, LSTM cell units, projection = token embedding size). small / medium / original are the sizes
of AllenNLP's published ELMo models. `original` is the paper: the character CNN input (50 characters per token,
16-dim character embeddings, widths 1..7 with 32-1024 filters = 2048, ReLU, 2 highway layers, projection to 512),
2 layers of 4096 cells projected to 512, cell and projection clipping at 3, a separate softmax. `tiny_chars` is
`tiny` with a small character CNN. The other variants read token embeddings (`model.token_input=tokens`; any
variant switches with `--config.model.token_input=chars --config.model.tie_embeddings=false`).

Differences from the paper: a sentencepiece vocabulary with a full softmax (the paper: 793k words, sampled
softmax), so the char CNN reads each piece's characters rather than whole words; AdamW instead of Adagrad; rows of
packed documents with the state reset at each document (the paper carried the state across 20-token windows).
"""
from jaxssl import config as config_lib

# name: (layers, lstm_size, embed_size, seq_len)
SIZES = {
    'tiny': (2, 256, 128, 64),
    'tiny_chars': (2, 256, 128, 64),
    'small': (2, 1024, 128, 128),
    'medium': (2, 2048, 256, 128),
    'original': (2, 4096, 512, 128),
}
VARIANTS = tuple(SIZES)
PAPER_CHAR_CNN = dict(max_chars=50, char_embed_size=16, highway_layers=2, char_activation='relu',
                      char_filters=((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024)))
# sentencepiece pieces have at most 16 characters (its default): 20 holds an ASCII piece, its space and both marks.
TINY_CHAR_CNN = dict(max_chars=20, char_embed_size=16, highway_layers=2, char_activation='relu',
                     char_filters=((1, 32), (2, 32), (3, 64), (4, 64), (5, 64)))


def get_config(variant: str = 'tiny'):
  layers, lstm_size, embed_size, seq_len = SIZES[variant]
  model = dict(
      name='elmo', num_layers=layers, lstm_size=lstm_size, embed_size=embed_size,
      max_position=8192,       # an LSTM has no position table: this only bounds data.seq_len
      dropout_rate=0.1,        # each LSTM layer's input and the softmax input (the paper: 0.1)
      initializer_range=0.02,  # token embedding / softmax init; LSTM kernels use 1 / sqrt(fan_in)
      cell_clip=3.0, proj_clip=3.0,  # the paper's clipping of cell and projected values (0 = none)
      tie_embeddings=True,     # softmax tied to the token embedding; False = a separate one (the paper)
      # Downstream heads (configs/finetune.py; a frozen body wants a larger learning rate, e.g. 1e-2):
      finetune_bilm=False,     # False = frozen biLM (the paper): only ScalarMix and the head train
      mix_layer_norm=True,     # normalise each layer per token before ScalarMix (unit-scale features)
      dtype='float32',         # compute dtype; params stay float32. 'bfloat16' on TPU/GPU.
      token_input='tokens',    # 'tokens': a token embedding table; 'chars': the paper's character CNN
      **PAPER_CHAR_CNN,        # the character CNN (read only with token_input='chars')
  )
  data = dict(
      seq_len=seq_len,         # documents are packed into rows of this length (segment_ids + positions)
      max_predictions=seq_len,  # every position is a target (read by the shared FLOPs/MFU code)
  )
  train = dict(steps=100_000, batch_size=128, learning_rate=1e-3, warmup_steps=1000, end_learning_rate=1e-4,
               weight_decay=0.01, b2=0.999, eps=1e-8)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train, vocab_size=32000,
                                    every_steps=2000, log_every=100)

  if variant.startswith('tiny'):
    config_lib.quickstart(c, steps=1000, warmup_steps=50)  # learns visibly on a 2-core CPU in minutes
  if variant in ('original', 'tiny_chars'):
    c.model.token_input = 'chars'
    c.model.tie_embeddings = False  # the paper's separate softmax (no input token table to tie to)
  if variant == 'tiny_chars':
    c.model.update(TINY_CHAR_CNN)
  return c

"""BERT masked-LM + next-sentence pretraining. Variants: layers/hidden, heads = hidden / 64.

  python -m jaxssl.pretrain --config configs/bert.py:tiny --workdir /tmp/bert_tiny

bigbird_tiny / bigbird_base: the same model with Big Bird block-sparse attention (ITC: 3-block window, first and
last block global, 3 random blocks of 64 tokens) on 4096-token sequences, as in Zaheer et al. 2020. Sequences
need documents of several thousand tokens: the pipeline fills a sequence only from consecutive sentences of one
document (and B's random document), so short documents leave most of the 4096 positions padding.

multilingual_tiny: the tiny model on several languages mixed by XLM-R's language sampling (jaxssl/data/
multilingual.py), one sentencepiece vocabulary over all of them, and eval_<lang>_* metrics per language. Name
the corpora (no Chinese text ships with jaxssl; PTB plus any local Chinese text file, documents separated by
blank lines):

  python -m jaxssl.pretrain --config configs/bert.py:multilingual_tiny \
      --config.data.corpus=en=ptb,zh=/path/to/zh.txt --workdir /tmp/bert_multi
"""
from jaxssl import config as config_lib

# name: (layers, hidden)
SIZES = {
    'tiny': (2, 128),
    'mini': (4, 256),
    'small': (4, 512),
    'medium': (8, 512),
    'base': (12, 768),
    'large': (24, 1024),
    'bigbird_tiny': (2, 128),
    'bigbird_base': (12, 768),
    'multilingual_tiny': (2, 128),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = 'tiny'):
  layers, hidden = SIZES[variant]
  model = dict(
      name='bert', num_layers=layers, hidden_size=hidden, num_heads=hidden // 64,
      intermediate_size=4 * hidden, max_position=512, type_vocab_size=2,
      embedding_size=0,       # ELECTRA / ALBERT-style factorised embeddings of this width (0 = hidden_size)
      relative_attention_buckets=0,  # MPNet: a learned per-head bias of each key's relative distance bucket (0 = none)
      # DeBERTa's disentangled attention: content-to-position and position-to-content scores over this many log
      # buckets of distance (256; 0 = none), up to max_relative_positions; DeBERTa-v3 also drops the absolute
      # position embeddings (absolute_positions=False) and the token types (type_vocab_size=0).
      position_buckets=0, max_relative_positions=512, absolute_positions=True,
      dropout_rate=0.1, attention_dropout_rate=0.1, initializer_range=0.02,
      final_layer_subset=True,  # pretraining: the last layer computes only [CLS] and the masked positions
      attention_type='full',  # 'full' | 'block_sparse' (Big Bird ITC; jaxssl/models/attention.py)
      block_size=64,          # block_sparse: tokens per block (seq_len must be a multiple)
      num_random_blocks=3,    # block_sparse: random key blocks per query block
      sparse_min_length=1024,  # block_sparse: shorter sequences (e.g. fine-tuning at 512) use full attention
      **config_lib.compute_keys())
  data = dict(
      seq_len=128,
      max_predictions=20,      # MLM positions per sequence (round(0.15 * seq_len) like BERT)
      mask_rate=0.15,
      short_seq_prob=0.1,      # BERT: sometimes use a shorter target length
      # MLM units, masked all or nothing within the mask_rate budget (jaxssl/data/examples/masking_units.py):
      # 'token' (BERT) | 'whole_word' (80/10/10 per token, as Google's) | 'span' (SpanBERT: geometric(0.2)
      # words, at most 10; 80/10/10 per span) | 'entity' (ERNIE: phrases of masking_lexicon; per phrase).
      masking='token',
      masking_lexicon='',      # 'entity': UTF-8 file, one phrase/entity per line, matched longest first
      chinese_segmenter='',    # '' | 'jieba': word boundaries of Chinese text (no spaces) for the units above
      # Multilingual corpus ('en=ptb,zh=/data/zh.txt' above): language i is sampled with q_i ∝ p_i^α, p_i its
      # share of training documents, α this exponent (XLM 0.5, XLM-R 0.3; 1 = proportional, 0 = uniform).
      language_temperature=0.3,
  )
  train = dict(learning_rate=1e-4, end_learning_rate=0.0, weight_decay=0.01, b2=0.999, eps=1e-6)
  c = config_lib.pretraining_config(variant, model=model, data=data, train=train)

  if variant.startswith('bigbird_'):
    c.model.update(attention_type='block_sparse', max_position=4096)
    c.data.update(seq_len=4096, max_predictions=614)  # round(0.15 * 4096)
  if variant == 'tiny':
    config_lib.quickstart(c)  # ~10 minutes on a 2-core CPU
  elif variant == 'multilingual_tiny':
    # A tiny run over several languages: the corpus must be named (see the docstring); the vocabulary is
    # larger than tiny's because CJK needs thousands of characters, covered to 99.95% of the text.
    config_lib.quickstart(c)
    c.data.corpus = ''
    c.tokenizer.vocab_size = 8000
  elif variant == 'bigbird_tiny':
    # Pretrains on a 2-core CPU (~3 s/step; ~10 s with full attention); needs long documents (see the docstring).
    config_lib.quickstart(c, steps=300, batch_size=2, warmup_steps=30)
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=100, batches=4)
    c.log.every_steps = 10
  elif variant == 'bigbird_base':
    # The paper's MLM pretraining shape (12 x 768, 4096 tokens, batch 256, learning rate 1e-4; the paper warm-starts
    # from RoBERTa, which init_from of a converted checkpoint would need 4096 position embeddings for).
    config_lib.full_scale(c, vocab_size=30522, learning_rate=1e-4, warmup_steps=10_000, steps=500_000,
                          batch_size=256)
  elif variant in ('mini', 'small', 'medium'):
    c.train.update(learning_rate=5e-4, warmup_steps=500, steps=100_000, batch_size=128)
  else:
    config_lib.full_scale(c, vocab_size=30522, learning_rate=1e-4, warmup_steps=10_000, steps=1_000_000,
                          batch_size=256)
  return c

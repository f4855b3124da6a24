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
import ml_collections

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


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  layers, hidden = SIZES[variant]
  c = ml_collections.ConfigDict()
  c.variant = variant
  # An export (python -m jaxssl.export / jaxssl.convert from-hf) to continue pretraining from: its model
  # section, vocabulary and tokenizer replace this config's (dtype, remat, attention, dropout stay the run's).
  c.init_from = ''

  c.model = ml_collections.ConfigDict(dict(
      name='bert', num_layers=layers, hidden_size=hidden, num_heads=hidden // 64,
      intermediate_size=4 * hidden, max_position=512, type_vocab_size=2,
      dropout_rate=0.1, attention_dropout_rate=0.1, initializer_range=0.02,
      dtype='float32',     # compute dtype; params stay float32. 'bfloat16' on TPU/GPU.
      remat='none',        # 'none' | 'full' | 'dots' (save matmul outputs, recompute the rest)
      scan_layers=True,    # one compiled layer body under nnx.scan: compile time flat in depth
      final_layer_subset=True,  # pretraining: the last layer computes only [CLS] and the masked positions
      attention='auto',    # 'auto' (cuDNN flash on GPU in bf16, splash on TPU, else XLA) | 'xla' | 'cudnn' | 'splash'
      attention_type='full',  # 'full' | 'block_sparse' (Big Bird ITC; jaxssl/models/attention.py)
      block_size=64,          # block_sparse: tokens per block (seq_len must be a multiple)
      num_random_blocks=3,    # block_sparse: random key blocks per query block
      sparse_min_length=1024,  # block_sparse: shorter sequences (e.g. fine-tuning at 512) use full attention
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='ptb',            # 'ptb', a TFDS name ('wikipedia/20230601.en', 'c4/en'), or a local path/glob
      data_dir='',             # TFDS cache; '' = ~/.cache/jaxssl/tfds (or $JAXSSL_DATA_DIR)
      seq_len=128,
      max_predictions=20,      # MLM positions per sequence (round(0.15 * seq_len) like BERT)
      mask_rate=0.15,
      short_seq_prob=0.1,      # BERT: sometimes use a shorter target length
      ptb_sentences_per_doc=16,  # PTB has no documents: group consecutive sentences into pseudo-documents
      validation_fraction=0.01,  # local text without its own held-out files: this share of documents
      num_threads=2,
      # MLM units, masked all or nothing within the mask_rate budget (jaxssl/data/masking_units.py):
      # 'token' (BERT) | 'whole_word' (80/10/10 per token, as Google's) | 'span' (SpanBERT: geometric(0.2)
      # words, at most 10; 80/10/10 per span) | 'entity' (ERNIE: phrases of masking_lexicon; per phrase).
      masking='token',
      masking_lexicon='',      # 'entity': UTF-8 file, one phrase/entity per line, matched longest first
      chinese_segmenter='',    # '' | 'jieba': word boundaries of Chinese text (no spaces) for the units above
      # Multilingual corpus ('en=ptb,zh=/data/zh.txt' above): language i is sampled with q_i ∝ p_i^α, p_i its
      # share of training documents, α this exponent (XLM 0.5, XLM-R 0.3; 1 = proportional, 0 = uniform).
      language_temperature=0.3,
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=8000, model_type='unigram', character_coverage=0.9995,
      max_training_sentences=2_000_000,
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, microbatches=1, seed=0,
      learning_rate=1e-4, warmup_steps=100, end_learning_rate=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0,
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,    # with 'skip': stop after this many non-finite steps in a row
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = the rest
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=500, batches=20))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_flops_per_device=0.0))  # 0 = from the table

  if variant.startswith('bigbird_'):
    c.model.update(attention_type='block_sparse', max_position=4096)
    c.data.update(seq_len=4096, max_predictions=614)  # round(0.15 * 4096)
  if variant == 'tiny':
    # The quickstart: learns visibly on a 2-core CPU in ~10 minutes.
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
  elif variant == 'multilingual_tiny':
    # A tiny run over several languages: the corpus must be named (see the docstring); the vocabulary is
    # larger than tiny's because CJK needs thousands of characters, covered to 99.95% of the text.
    c.data.corpus = ''
    c.data.language_temperature = 0.3
    c.tokenizer.update(vocab_size=8000, character_coverage=0.9995)
    c.train.update(steps=2000, batch_size=32, learning_rate=1e-3, warmup_steps=100)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
  elif variant == 'bigbird_tiny':
    # Pretrains on a 2-core CPU (~3 s/step; ~10 s with full attention); needs long documents (see the docstring).
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=300, batch_size=2, learning_rate=1e-3, warmup_steps=30)
    c.checkpoint.every_steps = 100
    c.eval.update(every_steps=100, batches=4)
    c.log.every_steps = 10
  elif variant == 'bigbird_base':
    # The paper's MLM pretraining shape (12 x 768, 4096 tokens, batch 256, learning rate 1e-4; the paper warm-starts
    # from RoBERTa, which init_from of a converted checkpoint would need 4096 position embeddings for).
    c.tokenizer.vocab_size = 30522
    c.train.update(learning_rate=1e-4, warmup_steps=10_000, steps=500_000, batch_size=256)
    c.checkpoint.every_steps = 5000
    c.eval.every_steps = 5000
  elif variant in ('mini', 'small', 'medium'):
    c.train.update(learning_rate=5e-4, warmup_steps=500, steps=100_000, batch_size=128)
  else:
    c.tokenizer.vocab_size = 30522
    c.train.update(learning_rate=1e-4, warmup_steps=10_000, steps=1_000_000, batch_size=256)
    c.checkpoint.every_steps = 5000
    c.eval.every_steps = 5000
  return c

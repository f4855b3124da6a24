"""ELMo bidirectional LSTM language model (Peters et al. 2018) on packed documents (the same rows as GPT).

  python -m jaxssl.pretrain --config configs/elmo.py:tiny --workdir /tmp/elmo_tiny

Variants: (layers, LSTM cell units, projection = token embedding size). small / medium / original are the sizes
of AllenNLP's published ELMo models (original = the paper: 2 layers of 4096 cells projected to 512, cell and
projection clipping at 3, a separate softmax). Differences from the paper: token embeddings instead of the
character CNN, a sentencepiece vocabulary with a full softmax (the paper: 793k words, sampled softmax), AdamW
instead of Adagrad, and rows of packed documents with the state reset at each document (the paper carried the
state across 20-token windows).
"""
import ml_collections

# name: (layers, lstm_size, embed_size, seq_len)
SIZES = {
    'tiny': (2, 256, 128, 64),
    'small': (2, 1024, 128, 128),
    'medium': (2, 2048, 256, 128),
    'original': (2, 4096, 512, 128),
}
VARIANTS = tuple(SIZES)


def get_config(variant: str = 'tiny') -> ml_collections.ConfigDict:
  layers, lstm_size, embed_size, seq_len = SIZES[variant]
  c = ml_collections.ConfigDict()
  c.variant = variant

  # An ELMo export to continue pretraining from (python -m jaxssl.export): its model section, vocabulary and
  # tokenizer replace this config's (dtype and dropout stay).
  c.init_from = ''

  c.model = ml_collections.ConfigDict(dict(
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
  ))
  c.data = ml_collections.ConfigDict(dict(
      corpus='ptb',            # 'ptb', a TFDS name ('wikipedia/20230601.en', 'c4/en'), or a local path/glob
      data_dir='',             # TFDS cache; '' = ~/.cache/jaxssl/tfds (or $JAXSSL_DATA_DIR)
      seq_len=seq_len,         # documents are packed into rows of this length (segment_ids + positions)
      max_predictions=seq_len,  # every position is a target (read by the shared FLOPs/MFU code)
      ptb_sentences_per_doc=16,  # PTB has no documents: group consecutive sentences into pseudo-documents
      validation_fraction=0.01,  # local text without its own held-out files: this share of documents
      num_threads=2,
  ))
  c.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=32000, model_type='unigram', character_coverage=0.9995,
      max_training_sentences=2_000_000,
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=100_000, batch_size=128, microbatches=1, seed=0,
      learning_rate=1e-3, warmup_steps=1000, end_learning_rate=1e-4,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=1.0,
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,    # with 'skip': stop after this many non-finite steps in a row
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1 = the rest
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=2000, keep=3, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=2000, batches=20))
  c.log = ml_collections.ConfigDict(dict(every_steps=100, peak_flops_per_device=0.0))  # 0 = from the table

  if variant == 'tiny':
    # The quickstart: learns visibly on a 2-core CPU in minutes.
    c.tokenizer.vocab_size = 4000
    c.train.update(steps=1000, batch_size=32, warmup_steps=50)
    c.checkpoint.every_steps = 200
    c.eval.every_steps = 250
    c.log.every_steps = 25
  elif variant == 'original':
    c.model.tie_embeddings = False  # the paper's separate softmax
  return c

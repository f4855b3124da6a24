"""Fine-tuning: a pre-trained body (exported params) plus a new head, trained on labelled data.

  python -m jaxssl.finetune --config configs/finetune.py:VARIANT --config.init_from=PARAMS --workdir DIR

Local tasks need no code: pick the variant of the task's shape and point `task.train` / `task.dev` at the files:
  classification | pair | regression | tagging | qa
The GLUE variants (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), `squad` and `conll2003` read the TFDS
dataset of that name (`task.tfds`; `task.train` / `task.dev` are then split names), prepared under
`task.data_dir` ('' = $JAXSSL_DATA_DIR or ~/.cache/jaxssl/tfds). To run one of them on local files instead,
pass `--config.task.tfds=` and file paths.
"""
import ml_collections

from jaxssl import tasks

SHAPES = tasks.KINDS  # the local-file variants: one per registered task kind
# GLUE task -> (shape, metric that picks the best checkpoint)
GLUE = {
    'cola': ('classification', 'matthews_corrcoef'), 'sst2': ('classification', 'accuracy'),
    'mrpc': ('pair', 'f1'), 'qqp': ('pair', 'f1'), 'stsb': ('regression', 'pearson'),
    'mnli': ('pair', 'accuracy'), 'qnli': ('pair', 'accuracy'), 'rte': ('pair', 'accuracy'),
    'wnli': ('pair', 'accuracy'),
}
VARIANTS = SHAPES + tuple(GLUE) + ('squad', 'conll2003')


def get_config(variant: str = 'classification') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.init_from = ''  # an export dir (python -m jaxssl.export / jaxssl.convert from-hf)
  if variant in GLUE:
    kind, best = GLUE[variant]
  elif variant == 'squad':
    kind, best = 'qa', 'f1'
  elif variant == 'conll2003':
    kind, best = 'tagging', ''  # ner and chunks: f1; pos: token_accuracy
  else:
    kind, best = variant, ''  # the kind's default: f1 for QA and span tagging, else its first dev metric
  tfds_name = f'glue/{variant}' if variant in GLUE else {'squad': 'squad/v1.1', 'conll2003': 'conll2003'}.get(variant, '')
  # TFDS split names: GLUE and SQuAD 'validation' (MNLI: matched), CoNLL-2003 'dev'.
  dev = {'mnli': 'validation_matched', 'conll2003': 'dev'}.get(variant, 'validation' if tfds_name else '')
  # The evaluate job scores each of these sets (name → split or file); empty: the dev set under the task's name.
  eval_sets = {'mnli_matched': 'validation_matched', 'mnli_mismatched': 'validation_mismatched'} \
      if variant == 'mnli' else {}
  c.task = ml_collections.ConfigDict(dict(
      name=variant, kind=kind, tfds=tfds_name, data_dir='', tag_feature='ner',
      train='train' if tfds_name else '', dev=dev, test='', eval_sets=eval_sets,
      best_metric=best,            # dev metric that picks the checkpoint exported to DIR/export ('': the default)
      tag_scheme='',               # tagging: BIO | IOB1 | IOBES | none; '': decided from the training tags
      max_answer_length=30,        # qa: longest answer span in tokens
      doc_stride=128,              # qa: step between the starts of overlapping context windows
      max_query_length=64,         # qa: question tokens kept
  ))
  c.data = ml_collections.ConfigDict(dict(
      seq_len=384 if kind == 'qa' else 128,
      length_buckets='auto',       # batches padded to seq_len/8, /4, /2 or seq_len (train/length_buckets.py); none
      packing='auto',              # text tasks but QA: short examples share rows (train/packing.py); none
  ))
  c.model = ml_collections.ConfigDict(dict(
      classifier_dropout=0.1,
      dtype='auto',                # compute dtype: auto (bfloat16 for a text encoder on TPU/GPU or a CPU with bfloat16
                                   # instructions, else the body's) | float32 | bfloat16; params stay float32
  ))
  c.train = ml_collections.ConfigDict(dict(
      steps=1000, batch_size=32, seed=0, learning_rate=2e-5, warmup_steps=100, end_learning_rate=0.0,
      weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0, microbatches=1,
      nonfinite='stop',        # NaN/Inf loss: 'stop' (naming the step; never saved) or 'skip' the update
      max_skipped_steps=10,    # with 'skip': stop after this many non-finite steps in a row
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=2, async_save=True,
      directory=''))  # '' = WORKDIR/checkpoints; may be gs://BUCKET/...
  c.eval = ml_collections.ConfigDict(dict(every_steps=200, batch_size=64))
  c.log = ml_collections.ConfigDict(dict(every_steps=50, peak_flops_per_device=0.0))
  return c

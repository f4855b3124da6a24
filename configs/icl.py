"""In-context learning (few-shot prompting) evaluation of exported GPT models.

  python -m jaxssl.evaluate --config configs/icl.py:sentiment --config.icl.models=runs/a/params,runs/b/params \
      --config.icl.shots=0,1,2,4,8 --out icl/results.json

Variants: `sentiment` (built-in tiny review task, scored by the log-likelihood of each label's verbaliser),
`capitals` (built-in free-form task: greedy generation, exact match), `sst2` (GLUE SST-2 from TFDS: train
split as the demonstration pool, the 872 validation sentences as queries), `custom` (your JSONL files:
--config.icl.pool=POOL.jsonl --config.icl.test=TEST.jsonl, one {"input": ..., "label": ...} object per line).

Writes results.json (accuracy per model and k) and, beside it, icl_accuracy_vs_shots.png,
icl_accuracy_vs_size.png and icl_predictions.jsonl. See jaxssl/eval/icl_prompts.py for how prompts
are built and jaxssl/eval/icl.py for how they are scored.
"""
import ml_collections

VARIANTS = ('sentiment', 'capitals', 'sst2', 'custom')


def get_config(variant: str = 'sentiment') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.icl = ml_collections.ConfigDict(dict(
      task=variant,          # the name in results.json; with pool/test '' it picks the built-in files
      pool='',               # JSONL of demonstrations; '' = jaxssl/eval/icl_tasks/<task>_pool.jsonl
      test='',               # JSONL of test queries; '' = jaxssl/eval/icl_tasks/<task>_test.jsonl
      tfds='',               # a TFDS classification dataset (glue/sst2, ...): pool and test are then split names
      data_dir='',           # TFDS cache for tfds ('' = ~/.cache/jaxssl/tfds or $JAXSSL_DATA_DIR)
      instruction='',        # text before the demonstrations ('' = none)
      template='Input: {input}\nOutput: {label}',  # one example; the text before {label} is the query prompt
      separator='\n\n',      # between the instruction and the examples
      # label -> the text scored (loglik) or expected (exact match); empty: a label's own text.
      verbalizers=ml_collections.ConfigDict(),
      scoring='auto',        # 'loglik' | 'exact_match' | 'auto' (loglik when verbalizers are given)
      shots=(0, 1, 2, 4, 8),  # k: demonstrations per prompt
      seed=0,                # demonstrations of query i are drawn by a generator seeded with (seed, i)
      normalize='none',      # loglik: 'none' (sum) | 'tokens' (per continuation token) | 'chars' (per character)
      models=(),             # export directories (python -m jaxssl.export / jaxssl.convert); a,b on the command line
      max_new_tokens=16,     # exact match: generated tokens per answer
      exact_match_lowercase=False,  # exact match: compare case-insensitively
      batch_size=16,         # rows per forward pass (rounded to the mesh's batch shards)
      max_queries=0,         # score the first N test queries (0 = all)
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  if variant == 'sentiment':
    c.icl.update(instruction='Classify the sentiment of each movie review as positive or negative.',
                 template='Review: {input}\nSentiment: {label}')
    c.icl.verbalizers = ml_collections.ConfigDict(dict(positive='positive', negative='negative'))
  elif variant == 'sst2':
    c.icl.update(tfds='glue/sst2', pool='train', test='validation', shots=(0, 1, 4, 8, 16),
                 instruction='Classify the sentiment of each movie review as positive or negative.',
                 template='Review: {input}\nSentiment: {label}')
    c.icl.verbalizers = ml_collections.ConfigDict(dict(positive='positive', negative='negative'))
  elif variant == 'capitals':
    c.icl.update(instruction='Name the capital city of each country.',
                 template='Country: {input}\nCapital: {label}')
  return c

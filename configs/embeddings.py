"""Contextual-embedding analysis of an exported encoder: one word's vectors across sentences.

  python -m jaxssl.evaluate --config configs/embeddings.py:apple --config.embeddings.model=EXPORT \
      --out emb/results.json

Variants: `apple` (built-in English set: apple the fruit vs Apple the company; two fruit sentences start
with "Apple", so that with a cased vocabulary the static baseline cannot split the senses by case alone),
`guo` (built-in Chinese set: 果 in 苹果汁 vs 苹果电脑 ...), `custom` (your JSONL:
--config.embeddings.data=FILE.jsonl, one {"sentence": ..., "target": ..., "label": ...} object per line,
label optional).

Writes results.json (cosine similarity matrices, contextual and static, and the within/across-label gap) and
embeddings_heatmap.png beside it. See jaxssl/eval/embeddings.py for how vectors are taken.
"""
import ml_collections

VARIANTS = ('apple', 'guo', 'custom')


def get_config(variant: str = 'apple') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.embeddings = ml_collections.ConfigDict(dict(
      model='',              # an export directory (BERT, ELMo or GPT: python -m jaxssl.export / jaxssl.convert)
      set=variant,           # built-in set jaxssl/eval/embedding_sets/<set>.jsonl, read when data is ''
      data='',               # your JSONL file of {"sentence", "target", "label"} lines
      # Which representation: a layer number (0 = embedding output, -1 = last) or 'mix' (mean of all layers).
      # A string, so that both --config.embeddings.layer=2 and =mix pass the override type check.
      layer='-1',
      pooling='mean',        # over the target's pieces: 'mean' | 'first'
      occurrence=1,          # which occurrence of the target in its sentence (1 = the first)
      ignore_case=False,     # match the target case-insensitively
  ))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  return c

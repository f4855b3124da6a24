"""Contextual-embedding analysis: does an encoder give one word different vectors in different senses?

  python -m jaxssl.evaluate --config configs/embeddings.py:apple --config.embeddings.model=EXPORT \
      --out emb/results.json

Data: JSONL, one {"sentence": ..., "target": ..., "label": ...} object per line (label optional, e.g. the sense);
`target` is a word (or Chinese character/word) found in the sentence: its `embeddings.occurrence`-th occurrence
(1 = the first), matched case-insensitively only with `embeddings.ignore_case`.

For each item the sentence is tokenized with character offsets; the target's pieces are those whose span overlaps
the target's character span (a piece may reach past it: "苹果" for the target "果"). The encoder runs over
  BERT  [CLS] sentence [SEP]           hidden_states: 0 = embedding output, l = layer l's output
  ELMo  the sentence                   embed(): 0 = token embedding (both directions), l = concat(fwd_l, bwd_l)
  GPT   the sentence (+ bos if any)    only the final hidden state (after the final norm): layer -1
and the vector is taken at the target's pieces from `embeddings.layer` (an int, -1 = last, or 'mix' = the plain
mean of all layers: no learned ScalarMix weights), pooled over the pieces by `embeddings.pooling` ('mean' | 'first').

Static baseline: the mean of the input token-embedding rows of the target's pieces (ELMo's layer 0 up to the
duplicated halves, which leave cosines unchanged). Occurrences with the same pieces get the same vector: static
similarity 1.0 is what context-free embeddings can do, contextual similarity below 1 is what context adds.

Writes results.json (items, cosine matrices, within/across-label means and their gap when labels are given) and
embeddings_heatmap.png (contextual and static panels side by side), locally or into a bucket (the data file and
the export may be in one too). Only process 0 writes.
"""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl import storage
from jaxssl.errors import UserError
from jaxssl.eval import files
from jaxssl.train import checkpoint as ckpt_lib

SETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'embedding_sets')
POOLINGS = ('mean', 'first')
HEATMAP = 'embeddings_heatmap.png'


@dataclasses.dataclass(frozen=True)
class Item:
  """One JSONL line; `where` is 'FILE:LINE' for error messages, `span` the target's (start, end) characters."""
  sentence: str
  target: str
  label: str | None
  where: str
  span: tuple[int, int]


def data_path(emb) -> str:
  """`embeddings.data`, else the built-in set `embeddings.set`."""
  if emb.data:
    return emb.data
  path = os.path.join(SETS_DIR, f'{emb.set}.jsonl')
  if not os.path.isfile(path):
    names = sorted(n[:-len('.jsonl')] for n in os.listdir(SETS_DIR) if n.endswith('.jsonl'))
    raise UserError(f'no built-in embedding set {emb.set!r}: pass --config.embeddings.data=FILE.jsonl '
                    f'(built-in sets: {", ".join(names)})')
  return path


def find_target(sentence: str, target: str, occurrence: int, ignore_case: bool, where: str) -> tuple[int, int]:
  """(start, end) characters of the `occurrence`-th (1-based) match of `target` in `sentence`."""
  # re keeps spans in the original string (str.lower() can change lengths outside ASCII).
  matches = list(re.finditer(re.escape(target), sentence, re.IGNORECASE if ignore_case else 0))
  if not matches:
    hint = '' if ignore_case else ' (or pass --config.embeddings.ignore_case=True)'
    raise UserError(f'{where}: target {target!r} is not in its sentence {sentence[:60]!r}: fix the line{hint}')
  if occurrence > len(matches):
    raise UserError(f'{where}: target {target!r} occurs {len(matches)} time(s) but embeddings.occurrence='
                    f'{occurrence}: lower it or fix the line')
  return matches[occurrence - 1].span()


def read_items(path: str, occurrence: int = 1, ignore_case: bool = False) -> list[Item]:
  """The items of a JSONL file, each target located; a bad line is a UserError naming FILE:LINE."""
  items = []
  for where, row, line in files.jsonl_lines(path, what='embedding data file',
                                            example='{"sentence": ..., "target": ..., "label": ...}'):
    if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                            for k in ('sentence', 'target')):
      raise UserError(f'{where} must be an object with non-empty string "sentence" and "target", got '
                      f'{line.strip()[:80]}')
    label = row.get('label')
    if label is not None and not isinstance(label, str):
      label = str(label)
    span = find_target(row['sentence'], row['target'], occurrence, ignore_case, where)
    items.append(Item(row['sentence'], row['target'], label, where, span))
  if len(items) < 2:
    raise UserError(f'{path} holds {len(items)} item(s): similarities need at least two lines')
  labelled = [i.label is not None for i in items]
  if any(labelled) and not all(labelled):
    first = items[labelled.index(False)]
    raise UserError(f'{first.where} has no "label" but other lines do: label every line or none')
  return items


def parse_layer(value) -> int | str:
  """`embeddings.layer` ('-1', '2', 'mix'; ints too) -> an int or 'mix'."""
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  text = str(value).strip().lower()
  if text == 'mix':
    return 'mix'
  try:
    return int(text)
  except ValueError:
    raise UserError(f"embeddings.layer={value!r}: use a layer number (0 = embeddings, -1 = last) or 'mix'") from None


def check_config(emb) -> None:
  """Checks the `embeddings` config section on its own (before any file or model is read)."""
  if not emb.model:
    raise UserError('no model: pass --config.embeddings.model=EXPORT_DIR (python -m jaxssl.export or convert)')
  if emb.pooling not in POOLINGS:
    raise UserError(f'embeddings.pooling={emb.pooling!r}: use one of {", ".join(POOLINGS)}')
  parse_layer(emb.layer)
  if not isinstance(emb.occurrence, int) or emb.occurrence < 1:
    raise UserError(f'embeddings.occurrence={emb.occurrence!r} must be an integer >= 1 (1 = the first)')


# ----- tokenization -----

def piece_positions(tokenizer, items) -> tuple[list[list[int]], list[list[int]]]:
  """(ids of each sentence without special tokens, positions in those ids of the pieces covering its target)."""
  encoded = tokenizer.encode_with_offsets([item.sentence for item in items])
  all_ids, all_positions = [], []
  for item, (ids, spans) in zip(items, encoded):
    start, end = item.span
    positions = [i for i, (s, e) in enumerate(spans) if s < end and e > start]
    if not positions:  # e.g. the target is only whitespace-like to the tokenizer
      raise UserError(f'{item.where}: no token covers target {item.target!r}: check the line\'s text')
    all_ids.append(list(ids))
    all_positions.append(positions)
  return all_ids, all_positions


# ----- models -----

def embedding_hooks(model):
  """How the analysis runs `model`: its family's EmbeddingHooks; UserError for a family without them."""
  family = families.family_of_model(model)
  if family is None or family.embeddings is None:
    raise UserError(f'a {type(model).__name__} export is not supported here: use a BERT, ELMo or GPT export')
  return family.embeddings


def model_kind(model) -> str:
  """The family name of `model` ('bert', 'elmo', 'gpt'), as the report records it."""
  embedding_hooks(model)
  return families.family_of_model(model).name


def num_layers(model) -> int:
  """Layers the `embeddings.layer` index counts (embedding output + one per block); GPT: only the last."""
  return embedding_hooks(model).num_layers(model)


def frame(model, tokenizer, ids: list[int]) -> tuple[list[int], int]:
  """(model input ids, offset of the sentence's first id in them)."""
  return embedding_hooks(model).frame(tokenizer, ids)


def layer_stack(model, input_ids, mask, tokenizer=None) -> jax.Array:
  """[layers, B, T, H] float32 representations of right-padded `input_ids` [B, T] (`mask` 1 = real token);
  `tokenizer` gives a model that reads more than ids (a chars ELMo) its inputs."""
  hooks = embedding_hooks(model)
  extra = hooks.model_inputs(model, tokenizer, input_ids) if tokenizer is not None else {}
  return hooks.layer_stack(model, input_ids, mask, **extra)


def select_layer(stack: np.ndarray, layer) -> np.ndarray:
  """[layers, ...] -> the chosen layer ('mix' = the mean of all)."""
  if layer == 'mix':
    return stack.mean(0)
  n = stack.shape[0]
  if not -n <= layer < n:
    raise UserError(f'embeddings.layer={layer} is out of range for this model ({n} layer(s): 0..{n - 1} or '
                    f"-{n}..-1, or 'mix')")
  return stack[layer]


def check_layer(model, layer) -> None:
  if embedding_hooks(model).last_layer_only and layer not in (-1, 'mix'):
    raise UserError(f'embeddings.layer={layer}: GPT exports give only the final hidden state here: use -1')
  select_layer(np.zeros((num_layers(model), 1)), layer)


def pool(vectors: np.ndarray, pooling: str) -> np.ndarray:
  return vectors[0] if pooling == 'first' else vectors.mean(0)


def contextual_vectors(model, tokenizer, ids, positions, *, layer, pooling) -> np.ndarray:
  """[N, H] pooled vectors of the target pieces from `layer`, one padded batch for all sentences."""
  framed = [frame(model, tokenizer, row) for row in ids]
  width = max(len(f) for f, _ in framed)
  max_position = getattr(model.config, 'max_position', None)
  if max_position is not None and width > max_position:
    raise UserError(f'a sentence is {width} tokens long, more than the model\'s max_position={max_position}: '
                    'shorten it')
  input_ids = np.full((len(framed), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(framed), width), np.int32)
  for row, (f, _) in enumerate(framed):
    input_ids[row, :len(f)] = f
    mask[row, :len(f)] = 1
  chosen = select_layer(np.asarray(layer_stack(model, jnp.asarray(input_ids), jnp.asarray(mask), tokenizer)), layer)
  return np.stack([pool(chosen[row, [offset + p for p in pos]], pooling)
                   for row, ((_, offset), pos) in enumerate(zip(framed, positions))])


def static_vectors(model, ids, positions, pooling: str, tokenizer=None) -> np.ndarray:
  """[N, E] context-free vectors: the input token-embedding rows of the target pieces (a chars ELMo: their char
  CNN vectors), pooled."""
  hooks = embedding_hooks(model)
  if hooks.static_rows is not None:
    return np.stack([pool(hooks.static_rows(model, tokenizer, [row[p] for p in pos]), pooling)
                     for row, pos in zip(ids, positions)])
  table = hooks.static_table(model)
  table = np.asarray(table.embedding[...], np.float32)
  return np.stack([pool(table[[row[p] for p in pos]], pooling) for row, pos in zip(ids, positions)])


# ----- similarities -----

def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
  v = np.asarray(vectors, np.float64)
  v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
  return np.clip(v @ v.T, -1.0, 1.0)


def label_summary(matrix: np.ndarray, labels) -> dict | None:
  """Mean cosine over pairs (i < j) with the same label, with different labels, and their gap (None: no labels)."""
  if labels is None or labels[0] is None:
    return None
  n = len(labels)
  within = [matrix[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] == labels[j]]
  across = [matrix[i, j] for i in range(n) for j in range(i + 1, n) if labels[i] != labels[j]]
  w = float(np.mean(within)) if within else None
  a = float(np.mean(across)) if across else None
  return {'within_label': w, 'across_label': a, 'gap': None if w is None or a is None else w - a,
          'within_pairs': len(within), 'across_pairs': len(across)}


def snippet(item: Item, width: int = 14) -> str:
  """A short row label: the target in brackets with a few characters of context either side (+ the label)."""
  s, e = item.span
  left, right = item.sentence[max(0, s - width):s], item.sentence[e:e + width]
  text = ('…' if s > width else '') + left + '[' + item.sentence[s:e] + ']' + right + \
      ('…' if e + width < len(item.sentence) else '')
  return f'{text} ({item.label})' if item.label is not None else text


# ----- the job -----


def analyse(model, tokenizer, items, *, layer, pooling) -> dict:
  """The report body for `items` (no file written)."""
  check_layer(model, layer)
  ids, positions = piece_positions(tokenizer, items)
  contextual = cosine_matrix(contextual_vectors(model, tokenizer, ids, positions, layer=layer, pooling=pooling))
  static = cosine_matrix(static_vectors(model, ids, positions, pooling, tokenizer))
  labels = [item.label for item in items]
  unk = getattr(tokenizer, 'unk_id', None)
  records = [{'sentence': item.sentence, 'target': item.target, 'label': item.label, 'where': item.where,
              'span': list(item.span), 'token_positions': pos,
              'pieces': [tokenizer.id_to_piece(row[p]) for p in pos], 'snippet': snippet(item),
              'unknown_pieces': sum(int(row[p] == unk) for p in pos)}
             for item, row, pos in zip(items, ids, positions)]
  return {'model_kind': model_kind(model), 'num_layers': num_layers(model), 'items': records,
          'contextual': {'similarity': contextual.tolist(), 'summary': label_summary(contextual, labels)},
          'static': {'similarity': static.tolist(), 'summary': label_summary(static, labels)}}


def run(config, out: str) -> dict:
  """Reads the items, runs the export, writes results.json and the heatmap; returns the report."""
  emb = config.embeddings
  check_config(emb)
  path = data_path(emb)
  items = read_items(path, emb.occurrence, emb.ignore_case)
  name = ckpt_lib.read_export_config(emb.model).get('model', {}).get('name')
  if name not in families.FAMILIES or families.FAMILIES[name].embeddings is None:
    raise UserError(f'{emb.model} holds a {name} model: use a BERT, ELMo or GPT export')
  _, model, tokenizer = ckpt_lib.load_export(emb.model, mesh_lib.make_mesh(config.mesh.shape))
  layer = parse_layer(emb.layer)
  body = analyse(model, tokenizer, items, layer=layer, pooling=emb.pooling)
  results_path, plot_dir = files.output_paths(out)
  report = {'set': emb.set if not emb.data else os.path.splitext(storage.basename(path))[0], 'data': path,
            'model': emb.model, 'layer': layer, 'pooling': emb.pooling, 'occurrence': emb.occurrence,
            **body, 'plot': HEATMAP, 'config': emb.to_dict()}
  if jax.process_index() == 0:
    from jaxssl.eval import embeddings_plots  # noqa: PLC0415 (matplotlib only when plotting)
    storage.makedirs(plot_dir)
    files.write_json(results_path, report, indent=2, ensure_ascii=False)
    embeddings_plots.heatmaps(report, storage.join(plot_dir, HEATMAP))
    print(format_summary(report))
    print(f'wrote {results_path} and {HEATMAP} in {plot_dir}')
  return report


def format_summary(report: dict) -> str:
  lines = [f'embeddings {report["set"]}: {report["model_kind"]} layer={report["layer"]} '
           f'pooling={report["pooling"]}, {len(report["items"])} items']
  for kind in ('contextual', 'static'):
    s = report[kind]['summary']
    if s is None:
      m = np.asarray(report[kind]['similarity'])
      lines.append(f'  {kind:<11} mean pairwise cosine {m[np.triu_indices(len(m), 1)].mean():.3f}')
    else:
      fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'  # pylint: disable=unnecessary-lambda-assignment
      lines.append(f'  {kind:<11} within-label {fmt(s["within_label"])}  across-label {fmt(s["across_label"])}  '
                   f'gap {fmt(s["gap"])}')
  # A target spelled with the unknown piece (a lowercased vocabulary meeting "Apple", another script) gets the
  # unknown piece's vector: its similarities then say how it was spelled, not what it means.
  unknown = [item for item in report['items'] if item.get('unknown_pieces')]
  if unknown:
    first = unknown[0]
    lines.append(f'  note: {len(unknown)} of {len(report["items"])} targets contain the unknown piece (first: '
                 f'{first["where"]}: {first["target"]!r} -> {" ".join(first["pieces"])}); their vectors stand for '
                 "[UNK], not the word: use a model whose tokenizer covers these words")
  return '\n'.join(lines)

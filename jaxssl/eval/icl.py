"""In-context learning evaluation (the suite; prompts are built in icl_prompts.py): each model scores every
k-shot prompt by label log-likelihood or by exact match of generation, and the job writes results.json,
the predictions and the plots (locally or into a bucket: `--out gs://B/icl/`; the exports may be in one too).

Scoring (`icl.scoring`):
  loglik       the prediction is the label whose verbaliser has the highest log p(verbaliser | prompt), summed
               over its tokens from one forward pass over prompt + verbaliser; `icl.normalize` divides the sum by
               its number of tokens ('tokens') or by the verbaliser's length in characters ('chars'). Ties go to
               the first label in `icl.verbalizers` order. The template text after {label} is not scored.
  exact_match  greedy generation (`generation.generate`, up to `icl.max_new_tokens`, stopping at the end-of-document
               token); the answer is the generated text up to the first newline, the first occurrence of the
               separator, or of the template's text before {input} (where a model starts a new example), stripped
               of whitespace; it must equal the label's verbaliser (or the label itself when there is none),
               case-sensitively unless `icl.exact_match_lowercase`.
Both see only the tokenizer's ids: a model whose embedding is padded past them (Qwen2) gives the padding rows -inf
logits (models/vocab.py), so p is normalised over real tokens and generation never emits a padding id.
`auto` is loglik when `icl.verbalizers` is given, else exact match; loglik without verbalizers scores the labels'
own texts, the labels seen in the pool and test files being the options.

Rows are sorted by length and padded to a few bucketed widths (64 * 2^i, capped at max_position), so jit compiles
a handful of shapes per model; batches run on the mesh from `load_export`.
"""
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxssl import families
from jaxssl import mesh as mesh_lib
from jaxssl import storage
from jaxssl.errors import UserError
from jaxssl.eval import files
from jaxssl.eval.icl_prompts import Task, build_requests, load_task
from jaxssl.models import generation, layers
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train.predict import local_rows
from jaxssl.train import state as state_lib

MIN_BUCKET = 64
PLOT_SHOTS = 'icl_accuracy_vs_shots.png'
PLOT_SIZE = 'icl_accuracy_vs_size.png'
PREDICTIONS = 'icl_predictions.jsonl'


# ----- running the model -----

def bucket(length: int, max_len: int) -> int:
  """The padded width for `length` tokens: 64 * 2^i, capped at `max_len`."""
  width = MIN_BUCKET
  while width < length:
    width *= 2
  return min(width, max_len)


def _batches(lengths, batch_size: int):
  """Row indices grouped into batches of similar length (sorted); the last batch repeats rows to fill it."""
  order = np.argsort(np.asarray(lengths), kind='stable')
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    yield rows, np.resize(rows, batch_size)  # np.resize repeats: padding rows are real rows, dropped later


def _batch_size(requested: int, mesh) -> int:
  """`requested` rounded to a multiple of the mesh's batch shards (and so of the process count)."""
  divisor = math.lcm(mesh_lib.batch_divisor(mesh), jax.process_count())
  return max(requested - requested % divisor, divisor)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _continuation_logprobs(graphdef, state, ids, starts, ends, span: int):
  """Sum over t in [start, end) of log p(ids[t] | ids[:t]) per row; end - start is at most `span`.

  Only the continuation's positions go through the output layer: the logits of the whole row ([B, T, V] float32,
  1.2 GB for 8 rows of 256 against a 152k vocabulary) were most of the memory and, for a wide vocabulary, most of
  the FLOPs (Gemma 3 270M: 168M of its 268M parameters are the embedding table).
  """
  model = nnx.merge(graphdef, state)
  hidden = model.features(ids)  # [B, T, H]
  first = jnp.maximum(starts, 1)  # token 0 has no prediction
  offsets = jnp.arange(span)[None]
  # The hidden state at t - 1 predicts token t.
  at = jnp.minimum(first[:, None] - 1 + offsets, ids.shape[1] - 2)  # [B, span]
  logits = model.logits(jnp.take_along_axis(hidden, at[..., None], axis=1)).astype(jnp.float32)  # [B, span, V]
  target = jnp.take_along_axis(logits, jnp.take_along_axis(ids, at + 1, axis=1)[..., None], axis=-1)[..., 0]
  logp = target - jax.nn.logsumexp(logits, axis=-1)
  inside = offsets < (ends - first)[:, None]
  return jnp.sum(jnp.where(inside, logp, 0.0), axis=-1)


def continuation_span(longest: int, width: int) -> int:
  """Scored positions per row for continuations of at most `longest` tokens: a power of two from 8 (a few
  compiled shapes), at most the row's `width` - 1."""
  span = 8
  while span < longest:
    span *= 2
  return min(span, width - 1)


def loglikelihoods(model, rows, *, batch_size: int, mesh, max_len: int) -> np.ndarray:
  """log p(continuation | context) of each (context ids, continuation ids) row, batched and bucketed on `mesh`."""
  graphdef, state = layers.forward_graphdef(model), nnx.state(model)  # scoring: XLA's layer loop on CPU
  batch_size = _batch_size(batch_size, mesh)
  lengths = [len(c) + len(x) for c, x in rows]
  out = np.zeros(len(rows), np.float64)
  for rows_now, padded in _batches(lengths, batch_size):
    width = bucket(max(lengths[i] for i in rows_now), max_len)
    # Right padding: causal attention keeps the pad (id 0, any id would do) out of every scored position.
    ids = np.zeros((batch_size, width), np.int32)
    starts = np.zeros(batch_size, np.int32)
    ends = np.zeros(batch_size, np.int32)
    for j, i in enumerate(padded):
      context, continuation = rows[i]
      ids[j, :lengths[i]] = context + continuation
      starts[j], ends[j] = len(context), lengths[i]
    span = continuation_span(int((ends - np.maximum(starts, 1)).max()), width)
    local = {'ids': ids, 'starts': starts, 'ends': ends}
    local = {k: v[local_rows(np.arange(batch_size))] for k, v in local.items()}
    with jax.set_mesh(mesh):
      batch = mesh_lib.global_batch(local, mesh)
      scores = _continuation_logprobs(graphdef, state, batch['ids'], batch['starts'], batch['ends'], span)
    scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True))
    out[rows_now] = scores[:len(rows_now)]
  return out


def generate_texts(model, tokenizer, contexts, *, max_new_tokens: int, batch_size: int, mesh,
                   max_len: int) -> list[str]:
  """Greedy continuations (decoded, without the end-of-document token) of each context's ids."""
  batch_size = _batch_size(batch_size, mesh)
  lengths = [len(c) for c in contexts]
  stop = (int(tokenizer.sep_id),)
  texts = [''] * len(contexts)
  model = generation.layers_apart(model)  # once, not at every batch's call
  for rows_now, padded in _batches(lengths, batch_size):
    width = bucket(max(lengths[i] for i in rows_now), max_len - max_new_tokens)
    ids = np.zeros((batch_size, width), np.int32)
    for j, i in enumerate(padded):
      ids[j, :lengths[i]] = contexts[i]
    out, num = generation.generate(model, ids, np.asarray([lengths[i] for i in padded], np.int32), max_new_tokens,
                            jax.random.key(0), greedy=True, stop_ids=stop, pad_id=0)
    out, num = np.asarray(out), np.asarray(num)
    for j, i in enumerate(rows_now):
      texts[i] = tokenizer.decode([int(t) for t in out[j, :num[j]] if int(t) not in stop])
  return texts


# ----- scoring -----

def normalized(sums, token_counts, char_counts, normalize: str) -> np.ndarray:
  """Scores the decision compares: the summed log-probs, per token, or per character."""
  sums = np.asarray(sums, np.float64)
  if normalize == 'tokens':
    return sums / np.asarray(token_counts, np.float64)
  if normalize == 'chars':
    return sums / np.asarray(char_counts, np.float64)
  return sums


def extract_answer(text: str, task: Task) -> str:
  """The answer in a generated text: up to the first newline, separator or start of a new example, stripped."""
  head = task.parts[0].strip()
  cut = len(text)
  for stop in ('\n', task.separator.strip(), head):
    if stop and stop in text:
      cut = min(cut, text.index(stop))
  return text[:cut].strip()


def is_match(answer: str, gold: str, lowercase: bool) -> bool:
  gold = gold.strip()
  return answer.lower() == gold.lower() if lowercase else answer == gold


def evaluate_model(task: Task, model, tokenizer, *, shots, seed: int, normalize: str, batch_size: int,
                   max_new_tokens: int, mesh) -> dict:
  """One model's results: accuracy, truncated_queries and dropped_demonstrations per k (keys str(k)), num_queries,
  scoring, scoring_seconds and requests_per_second (one request = one k-shot prompt, all its options; compile
  included), plus `records` (one prediction dict per (k, query)) and `requests` (the tokenized prompts)."""
  max_len = int(model.config.max_position)
  if task.scoring == 'exact_match' and max_new_tokens >= max_len:
    raise UserError(f'icl.max_new_tokens={max_new_tokens} leaves no room for a prompt in max_position={max_len}: '
                    'lower --config.icl.max_new_tokens')
  requests = build_requests(task, tokenizer, shots, seed, max_len, max_new_tokens)
  records = []
  start = time.perf_counter()
  if task.scoring == 'loglik':
    rows = [(r.context, c) for r in requests for c in r.continuations]
    sums = loglikelihoods(model, rows, batch_size=batch_size, mesh=mesh, max_len=max_len)
    n = len(task.options)
    chars = [len(task.answer(o)) for o in task.options]
    for j, r in enumerate(requests):
      row_sums = sums[j * n:(j + 1) * n]
      scores = normalized(row_sums, [len(c) for c in r.continuations], chars, normalize)
      prediction = task.options[int(np.argmax(scores))]
      records.append(dict(k=r.k, query=r.query, label=task.test[r.query].label, prediction=prediction,
                          correct=prediction == task.test[r.query].label, dropped=r.dropped,
                          loglik={o: float(s) for o, s in zip(task.options, row_sums)},
                          score={o: float(s) for o, s in zip(task.options, scores)}))
  else:
    texts = generate_texts(model, tokenizer, [r.context for r in requests], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, mesh=mesh, max_len=max_len)
    for r, text in zip(requests, texts):
      gold = task.test[r.query].label
      answer = extract_answer(text, task)
      records.append(dict(k=r.k, query=r.query, label=gold, prediction=answer,
                          correct=is_match(answer, task.answer(gold), task.lowercase), dropped=r.dropped,
                          generation=text))
  seconds = time.perf_counter() - start  # scoring (or generating) every request, compile included
  accuracy, truncated, dropped = {}, {}, {}
  for k in shots:
    mine = [rec for rec in records if rec['k'] == k]
    accuracy[str(k)] = sum(rec['correct'] for rec in mine) / len(mine)
    truncated[str(k)] = sum(rec['dropped'] > 0 for rec in mine)
    dropped[str(k)] = sum(rec['dropped'] for rec in mine)
  return dict(accuracy=accuracy, truncated_queries=truncated, dropped_demonstrations=dropped,
              num_queries=len(task.test), scoring=task.scoring, records=records, requests=requests,
              scoring_seconds=round(seconds, 2), requests_per_second=round(len(requests) / max(seconds, 1e-9), 2))


# ----- the job -----

def model_labels(paths) -> list[str]:
  """Short unique names for export paths: the fewest trailing path components that tell them apart."""
  parts = [p.rstrip('/').split('/') if storage.is_remote(p) else os.path.normpath(os.path.abspath(p)).split(os.sep)
           for p in paths]
  for n in range(1, max(len(p) for p in parts) + 1):
    labels = ['/'.join(p[-n:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  raise UserError(f'icl.models lists an export twice: {", ".join(paths)}')


def check_exports(paths) -> None:
  """Every path is a GPT export (read before any model is loaded, so a typo fails fast)."""
  for path in paths:
    saved = ckpt_lib.read_export_config(path)
    name = saved.get('model', {}).get('name')
    if not families.family_for(saved.get('model', {})).generates:
      raise UserError(f'{path} holds a {name} model: in-context learning needs a causal LM export such as GPT '
                      '(python -m jaxssl.export of a configs/gpt.py run, or python -m jaxssl.convert from-hf)')


def run(config, out: str) -> dict:
  """Evaluates every model of `config.icl.models` on the task for each k; writes results.json and the plots."""
  icl = config.icl
  task = load_task(icl)
  paths = [str(p) for p in icl.models]
  check_exports(paths)
  shots = sorted(set(int(k) for k in icl.shots))
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  results_path, plot_dir = files.output_paths(out)
  report = {'task': task.name, 'scoring': task.scoring, 'shots': shots, 'normalize': icl.normalize,
            'seed': icl.seed, 'num_queries': len(task.test), 'labels': list(task.options),
            'majority_baseline': majority_baseline(task), 'config': icl.to_dict(), 'models': {}}
  records = []
  for label, path in zip(model_labels(paths), paths):
    _, model, tokenizer = ckpt_lib.load_export(path, mesh)
    params = state_lib.param_count(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    result = evaluate_model(task, model, tokenizer, shots=shots, seed=icl.seed, normalize=icl.normalize,
                            batch_size=icl.batch_size, max_new_tokens=icl.max_new_tokens, mesh=mesh)
    del model
    records += [dict(model=label, **rec) for rec in result.pop('records')]
    result.pop('requests')
    report['models'][label] = {'path': path, 'params': params, **result}
  report['plots'] = {'accuracy_vs_shots': PLOT_SHOTS, 'accuracy_vs_size': PLOT_SIZE}
  report['predictions'] = PREDICTIONS
  if jax.process_index() == 0:
    from jaxssl.eval import icl_plots  # noqa: PLC0415 (matplotlib only when plotting)
    storage.makedirs(plot_dir)
    files.write_json(results_path, report, indent=2)
    files.write_lines(storage.join(plot_dir, PREDICTIONS), (json.dumps(rec) for rec in records))
    icl_plots.accuracy_vs_shots(report, storage.join(plot_dir, PLOT_SHOTS))
    icl_plots.accuracy_vs_size(report, storage.join(plot_dir, PLOT_SIZE))
    print(format_table(report))
    print(f'wrote {results_path}, {PLOT_SHOTS}, {PLOT_SIZE} and {PREDICTIONS} in {plot_dir}')
  return report


def majority_baseline(task: Task) -> float:
  """Accuracy of always answering the test set's most common label."""
  counts = {}
  for e in task.test:
    counts[e.label] = counts.get(e.label, 0) + 1
  return max(counts.values()) / len(task.test)


def format_table(report: dict) -> str:
  """Accuracy per model (rows) and k (columns), with parameter counts and truncation notes."""
  shots = report['shots']
  names = list(report['models'])
  width = max([len(n) for n in names] + [len('majority')]) + 2
  lines = [f'ICL {report["task"]}: {report["scoring"]}'
           + (f' (normalize={report["normalize"]})' if report['scoring'] == 'loglik' else '')
           + f', seed {report["seed"]}, {report["num_queries"]} queries',
           f'{"model":<{width}}{"params":>10}' + ''.join(f'{"k=" + str(k):>8}' for k in shots)]
  for name in names:
    m = report['models'][name]
    accuracy = ''.join(f'{m["accuracy"][str(k)]:>8.3f}' for k in shots)
    lines.append(f'{name:<{width}}{m["params"] / 1e6:>9.2f}M{accuracy}')
    cut = {k: m['truncated_queries'][str(k)] for k in shots if m['truncated_queries'][str(k)]}
    if cut:
      lines.append(f'{"":<{width}}  prompts too long, demonstrations dropped for ' +
                   ', '.join(f'{n} queries at k={k}' for k, n in cut.items()))
  lines.append(f'{"majority":<{width}}{"":>10}{report["majority_baseline"]:>8.3f}')
  return '\n'.join(lines)

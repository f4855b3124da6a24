"""In-context learning evaluation: k-shot prompts, scored by label log-likelihood or by exact match of generation.

A task is a pool of labelled demonstrations and a set of test queries (JSONL, one {"input": ..., "label": ...}
object per line), an instruction, a template such as "Review: {input}\nSentiment: {label}", and a verbaliser
(the text that stands for a label) per label. For each k in `icl.shots`, the prompt of a query is

  instruction + separator                      (when there is an instruction)
  + demo_1 + separator + ... + demo_k + separator
  + the template up to {label}, with {input} filled by the query

where demo_j is the whole template filled with a demonstration's input and its label's verbaliser. The
demonstrations of query i are the first k of a permutation of the pool (without the examples whose input equals
the query's) drawn by a generator seeded with (icl.seed, i): they depend on neither the batch nor the model, and
the k=2 demonstrations extend the k=1 ones.

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

Tokenization boundary (loglik): trailing whitespace of the prompt moves to the front of the continuation
("Sentiment: " + "positive" is scored as "Sentiment:" + " positive", the way BPE and sentencepiece both attach a
space to the following word). Then prompt + continuation is tokenized as a whole and the prompt alone; when the
prompt's ids are a prefix of the whole's, the rest are the continuation ids; otherwise (a token merged across the
boundary) the continuation is tokenized separately and appended to the prompt's ids. A tokenizer with a `bos_id`
(Llama) gets it before every prompt. Generation prompts are the same whitespace-stripped prompt ids.

Prompts longer than the model allows (model.max_position, minus icl.max_new_tokens when generating) lose whole
demonstrations from the left (the ones farthest from the query) until they fit; results.json counts the affected
queries and dropped demonstrations per model and k. A query that does not fit even with no demonstrations is an
error.

Rows are sorted by length and padded to a few bucketed widths (64 * 2^i, capped at max_position), so jit compiles
a handful of shapes per model; batches run on the mesh from `load_export`.
"""
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.eval import files

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'icl_tasks')
SCORINGS = ('auto', 'loglik', 'exact_match')
NORMALIZE = ('none', 'tokens', 'chars')
MIN_BUCKET = 64
PLOT_SHOTS = 'icl_accuracy_vs_shots.png'
PLOT_SIZE = 'icl_accuracy_vs_size.png'
PREDICTIONS = 'icl_predictions.jsonl'


@dataclasses.dataclass(frozen=True)
class Example:
  """One JSONL line: `where` is 'FILE:LINE' for error messages."""
  input: str
  label: str
  where: str = ''


@dataclasses.dataclass(frozen=True)
class Task:
  """A validated ICL task (config + data); `options` are the labels scored by loglik, in tie-breaking order."""
  name: str
  instruction: str
  template: str
  separator: str
  verbalizers: dict
  scoring: str           # 'loglik' | 'exact_match'
  pool: tuple
  test: tuple
  options: tuple = ()
  lowercase: bool = False

  @property
  def parts(self) -> tuple[str, str, str]:
    """(head, middle, tail) of the template: head{input}middle{label}tail."""
    head, rest = self.template.split('{input}')
    middle, tail = rest.split('{label}')
    return head, middle, tail

  def answer(self, label: str) -> str:
    """The text that stands for `label`: its verbaliser, else the label itself."""
    return self.verbalizers.get(label, label)

  def demonstration(self, example: Example) -> str:
    head, middle, tail = self.parts
    return head + example.input + middle + self.answer(example.label) + tail

  def prompt(self, demonstrations, query_input: str) -> str:
    """The k-shot prompt of a query, ending where the label's text would start (see the module docstring)."""
    head, middle, _ = self.parts
    text = self.instruction + self.separator if self.instruction else ''
    text += ''.join(self.demonstration(d) + self.separator for d in demonstrations)
    return text + head + query_input + middle


# ----- reading and validating a task -----

def read_jsonl(path: str) -> list[Example]:
  """The examples of a JSONL file; a line that is not an object with string `input` and `label` is a UserError
  naming FILE:LINE. Blank lines are skipped; numbers as labels are read as their text."""
  examples = []
  for where, row, line in files.jsonl_lines(path, what='ICL data file', example='{"input": ..., "label": ...}'):
    if not isinstance(row, dict) or 'input' not in row or 'label' not in row:
      raise UserError(f'{where} must be an object with "input" and "label" keys, got {line.strip()[:80]}')
    text, label = row['input'], row['label']
    if isinstance(label, (int, float)) and not isinstance(label, bool):
      label = str(label)  # arithmetic answers written as numbers
    if not isinstance(text, str) or not text.strip() or not isinstance(label, str) or not label.strip():
      raise UserError(f'{where}: "input" and "label" must be non-empty strings, got {line.strip()[:80]}')
    examples.append(Example(text, label, where))
  if not examples:
    raise UserError(f'ICL data file {path} holds no examples: write one {{"input": ..., "label": ...}} per line')
  return examples


def _data_path(icl, key: str) -> str:
  path = icl[key]
  if path:
    return path
  builtin = os.path.join(TASKS_DIR, f'{icl.task}_{key}.jsonl')
  if not os.path.isfile(builtin):
    names = sorted({n.rsplit('_', 1)[0] for n in os.listdir(TASKS_DIR) if n.endswith('.jsonl')})
    raise UserError(f'no built-in ICL task {icl.task!r}: pass --config.icl.pool=POOL.jsonl and '
                    f'--config.icl.test=TEST.jsonl (built-in tasks: {", ".join(names)})')
  return builtin


def check_config(icl) -> None:
  """Checks the `icl` config section on its own (before any file or model is read)."""
  if not icl.models:
    raise UserError('no models to evaluate: pass --config.icl.models=EXPORT_DIR[,EXPORT_DIR...]')
  t = icl.template
  if t.count('{input}') != 1 or t.count('{label}') != 1 or t.index('{input}') > t.index('{label}'):
    raise UserError(f'icl.template={t!r} must contain {{input}} once and then {{label}} once, '
                    'e.g. "Review: {input}\\nSentiment: {label}"')
  if icl.scoring not in SCORINGS:
    raise UserError(f'icl.scoring={icl.scoring!r}: use one of {", ".join(SCORINGS)}')
  if icl.normalize not in NORMALIZE:
    raise UserError(f'icl.normalize={icl.normalize!r}: use one of {", ".join(NORMALIZE)}')
  shots = list(icl.shots)
  if not shots or any(not isinstance(k, int) or isinstance(k, bool) or k < 0 for k in shots):
    raise UserError(f'icl.shots={tuple(shots)} must be a non-empty list of integers >= 0, e.g. 0,1,2,4,8')
  for key in ('batch_size', 'max_new_tokens'):
    if icl[key] < 1:
      raise UserError(f'icl.{key}={icl[key]} must be at least 1')
  if icl.max_queries < 0:
    raise UserError(f'icl.max_queries={icl.max_queries} must be >= 0 (0 = all test queries)')
  for label, text in icl.verbalizers.items():
    if not isinstance(text, str) or not text.strip():
      raise UserError(f'icl.verbalizers.{label}={text!r} must be a non-empty string')


def read_tfds(name: str, split: str, data_dir: str = '') -> list[Example]:
  """The examples of a labelled TFDS classification split (e.g. glue/sst2 'validation'), labels by their
  dataset names ('negative', 'positive'); a pair's two texts are joined by a newline into one input."""
  from jaxssl.data import tfds_tasks  # pylint: disable=import-outside-toplevel  (TFDS only when asked for)
  if name not in tfds_tasks.DATASETS:
    raise UserError(f'icl.tfds={name!r} is not a supported dataset: use one of '
                    f'{", ".join(d for d in tfds_tasks.DATASETS if d.startswith("glue/"))}')
  kind = tfds_tasks.expected_kind(name)
  if kind not in ('classification', 'pair'):
    raise UserError(f'icl.tfds={name!r} is a {kind} task: ICL scores labelled classification tasks (e.g. glue/sst2)')
  examples, _ = tfds_tasks.read_split(name, split, kind, data_dir=data_dir)
  return [Example(e.text if e.text_b is None else f'{e.text}\n{e.text_b}', e.label, f'{name}:{split}[{i}]')
          for i, e in enumerate(examples)]


def load_task(icl) -> Task:
  """Reads and validates the task of the `icl` config section (no model needed)."""
  check_config(icl)
  if icl.get('tfds'):
    if not icl.pool or not icl.test:
      raise UserError(f'icl.tfds={icl.tfds!r} needs split names: pass --config.icl.pool=train '
                      '--config.icl.test=validation')
    pool = read_tfds(icl.tfds, icl.pool, icl.get('data_dir', ''))
    test = read_tfds(icl.tfds, icl.test, icl.get('data_dir', ''))
  else:
    pool = read_jsonl(_data_path(icl, 'pool'))
    test = read_jsonl(_data_path(icl, 'test'))
  verbalizers = {str(k): v for k, v in icl.verbalizers.items()}
  scoring = icl.scoring if icl.scoring != 'auto' else ('loglik' if verbalizers else 'exact_match')
  if verbalizers:
    for example in pool + test:
      if example.label not in verbalizers:
        raise UserError(f'{example.where} has label {example.label!r}, which has no verbaliser (icl.verbalizers has '
                        f'{", ".join(verbalizers)}): fix the data or add the label to icl.verbalizers in a config file')
  if scoring == 'loglik':
    if verbalizers:
      options = tuple(verbalizers)
      texts = [verbalizers[o] for o in options]
      if len(set(texts)) < len(texts):
        raise UserError(f'icl.verbalizers {verbalizers} give two labels the same text: loglik could not tell '
                        'them apart; make them distinct')
    else:
      options = tuple(sorted({e.label for e in pool + test}))
    if len(options) < 2:
      raise UserError(f'loglik scoring needs at least two labels to choose from, got {list(options)}: add '
                      'verbalizers or use --config.icl.scoring=exact_match')
  else:
    options = ()
  if max(icl.shots) > len(pool):
    raise UserError(f'icl.shots has k={max(icl.shots)} but the pool has {len(pool)} examples: use smaller k '
                    'or a larger --config.icl.pool')
  if icl.max_queries:
    test = test[:icl.max_queries]
  return Task(name=icl.task, instruction=icl.instruction, template=icl.template, separator=icl.separator,
              verbalizers=verbalizers, scoring=scoring, pool=tuple(pool), test=tuple(test), options=options,
              lowercase=bool(icl.exact_match_lowercase))


def draw_demonstrations(pool, query: Example, query_index: int, k: int, seed: int) -> list[Example]:
  """The k demonstrations of test query `query_index`: the first k of a permutation, seeded by (seed, index), of
  the pool examples whose input differs from the query's. Prefixes agree across k."""
  candidates = [e for e in pool if e.input != query.input]
  if k > len(candidates):
    raise UserError(f'{query.where}: k={k} demonstrations are asked but only {len(candidates)} pool examples '
                    'differ from this query: use smaller icl.shots or a larger pool')
  order = np.random.default_rng([seed, query_index]).permutation(len(candidates))
  return [candidates[i] for i in order[:k]]


# ----- tokenization -----

def split_boundary(prompt: str, continuation: str) -> tuple[str, str]:
  """Moves the prompt's trailing whitespace to the front of the continuation."""
  context = prompt.rstrip()
  return context, prompt[len(context):] + continuation


def bos_ids(tokenizer) -> list[int]:
  bos = getattr(tokenizer, 'bos_id', None)
  return [] if bos is None else [int(bos)]


def encode_pairs(tokenizer, pairs) -> list[tuple[list[int], list[int]]]:
  """(context ids with BOS, continuation ids) of each (prompt, continuation) text pair (module docstring rule)."""
  pairs = [split_boundary(p, c) for p, c in pairs]
  contexts = tokenizer.encode([c for c, _ in pairs])
  wholes = tokenizer.encode([c + x for c, x in pairs])
  out, separate = [], []
  for i, (ctx, whole) in enumerate(zip(contexts, wholes)):
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
      out.append((ctx, whole[len(ctx):]))
    else:
      out.append((ctx, None))
      separate.append(i)
  if separate:
    for i, ids in zip(separate, tokenizer.encode([pairs[i][1] for i in separate])):
      out[i] = (out[i][0], ids)
  bos = bos_ids(tokenizer)
  for (_, continuation), (ctx, ids) in zip(pairs, out):
    if not ids:
      raise UserError(f'the answer text {continuation!r} encodes to no tokens: choose a verbaliser with visible text')
  return [(bos + ctx, ids) for ctx, ids in out]


@dataclasses.dataclass
class Request:
  """One (k, query) prompt as tokenized for one model."""
  k: int
  query: int
  demonstrations: list
  dropped: int
  prompt: str
  context: list             # ids, BOS included
  continuations: list = dataclasses.field(default_factory=list)  # loglik: ids of each option


def build_requests(task: Task, tokenizer, shots, seed: int, max_len: int, max_new_tokens: int) -> list[Request]:
  """The tokenized prompts of every (k, query), demonstrations dropped from the left until each fits `max_len`."""
  draws = [draw_demonstrations(task.pool, q, i, max(shots), seed) for i, q in enumerate(task.test)]
  answers = [task.answer(o) for o in task.options]

  def make(k, i, demos):
    prompt = task.prompt(demos, task.test[i].input)
    return Request(k, i, demos, 0, prompt, None)

  def encode(requests):
    if task.scoring == 'loglik':
      encoded = encode_pairs(tokenizer, [(r.prompt, a) for r in requests for a in answers])
      for j, r in enumerate(requests):
        rows = encoded[j * len(answers):(j + 1) * len(answers)]
        r.context, r.continuations = rows[0][0], [c for _, c in rows]
    else:
      contexts = tokenizer.encode([split_boundary(r.prompt, '')[0] for r in requests])
      for r, ids in zip(requests, contexts):
        r.context = bos_ids(tokenizer) + ids

  def length(r):
    if task.scoring == 'loglik':
      return len(r.context) + max(len(c) for c in r.continuations)
    return len(r.context) + max_new_tokens

  requests = [make(k, i, draws[i][:k]) for k in shots for i in range(len(task.test))]
  encode(requests)
  for r in requests:
    while length(r) > max_len:
      if not r.demonstrations:
        raise UserError(f'{task.test[r.query].where}: the prompt needs {length(r)} tokens without demonstrations '
                        f'but the model allows {max_len}: shorten the input or icl.instruction'
                        + (' or lower icl.max_new_tokens' if task.scoring == 'exact_match' else ''))
      kept = make(r.k, r.query, r.demonstrations[1:])
      encode([kept])
      r.demonstrations, r.dropped, r.prompt = kept.demonstrations, r.dropped + 1, kept.prompt
      r.context, r.continuations = kept.context, kept.continuations
  for r in requests:
    if not r.context:
      raise UserError(f'{task.test[r.query].where}: the prompt encodes to no tokens, so nothing predicts the answer: '
                      'add an instruction or template text before {label}')
  return requests


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
  from jaxssl import mesh as mesh_lib
  divisor = math.lcm(mesh_lib.batch_divisor(mesh), jax.process_count())
  return max(requested - requested % divisor, divisor)


def _local_rows(rows: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch's rows."""
  per_process = len(rows) // jax.process_count()
  return rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprobs(graphdef, state, ids, starts, ends):
  """Sum over t in [start, end) of log p(ids[t] | ids[:t]) per row."""
  logits = nnx.merge(graphdef, state)(ids)[:, :-1].astype(jnp.float32)
  target = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
  logp = target - jax.nn.logsumexp(logits, axis=-1)  # column t scores token t + 1
  position = jnp.arange(1, ids.shape[1])[None]
  inside = (position >= starts[:, None]) & (position < ends[:, None])
  return jnp.sum(jnp.where(inside, logp, 0.0), axis=-1)


def loglikelihoods(model, rows, *, batch_size: int, mesh, max_len: int) -> np.ndarray:
  """log p(continuation | context) of each (context ids, continuation ids) row, batched and bucketed on `mesh`."""
  from jax.experimental import multihost_utils
  from jaxssl import mesh as mesh_lib
  graphdef, state = nnx.split(model)
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
    local = {'ids': ids, 'starts': starts, 'ends': ends}
    local = {k: v[_local_rows(np.arange(batch_size))] for k, v in local.items()}
    with jax.set_mesh(mesh):
      batch = mesh_lib.global_batch(local, mesh)
      scores = _continuation_logprobs(graphdef, state, batch['ids'], batch['starts'], batch['ends'])
    scores = np.asarray(multihost_utils.process_allgather(scores, tiled=True))
    out[rows_now] = scores[:len(rows_now)]
  return out


def generate_texts(model, tokenizer, contexts, *, max_new_tokens: int, batch_size: int, mesh,
                   max_len: int) -> list[str]:
  """Greedy continuations (decoded, without the end-of-document token) of each context's ids."""
  from jaxssl.models import generation
  batch_size = _batch_size(batch_size, mesh)
  lengths = [len(c) for c in contexts]
  stop = (int(tokenizer.sep_id),)
  texts = [''] * len(contexts)
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
  scoring, plus `records` (one prediction dict per (k, query)) and `requests` (the tokenized prompts)."""
  max_len = int(model.config.max_position)
  if task.scoring == 'exact_match' and max_new_tokens >= max_len:
    raise UserError(f'icl.max_new_tokens={max_new_tokens} leaves no room for a prompt in max_position={max_len}: '
                    'lower --config.icl.max_new_tokens')
  requests = build_requests(task, tokenizer, shots, seed, max_len, max_new_tokens)
  records = []
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
  accuracy, truncated, dropped = {}, {}, {}
  for k in shots:
    mine = [rec for rec in records if rec['k'] == k]
    accuracy[str(k)] = sum(rec['correct'] for rec in mine) / len(mine)
    truncated[str(k)] = sum(rec['dropped'] > 0 for rec in mine)
    dropped[str(k)] = sum(rec['dropped'] for rec in mine)
  return dict(accuracy=accuracy, truncated_queries=truncated, dropped_demonstrations=dropped,
              num_queries=len(task.test), scoring=task.scoring, records=records, requests=requests)


# ----- the job -----

def model_labels(paths) -> list[str]:
  """Short unique names for export paths: the fewest trailing path components that tell them apart."""
  parts = [os.path.normpath(os.path.abspath(p)).split(os.sep) for p in paths]
  for n in range(1, max(len(p) for p in parts) + 1):
    labels = ['/'.join(p[-n:]) for p in parts]
    if len(set(labels)) == len(labels):
      return labels
  raise UserError(f'icl.models lists an export twice: {", ".join(paths)}')



def check_exports(paths) -> None:
  """Every path is a GPT export (read before any model is loaded, so a typo fails fast)."""
  from jaxssl.train import checkpoint as ckpt_lib
  for path in paths:
    saved = ckpt_lib.read_export_config(path)
    name = saved.get('model', {}).get('name')
    if name != 'gpt':
      raise UserError(f'{path} holds a {name} model: in-context learning needs a GPT export '
                      '(python -m jaxssl.export of a configs/gpt.py run, or python -m jaxssl.convert from-hf)')


def run(config, out: str) -> dict:
  """Evaluates every model of `config.icl.models` on the task for each k; writes results.json and the plots."""
  from jaxssl import mesh as mesh_lib
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
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
    from jaxssl.eval import icl_plots
    os.makedirs(plot_dir, exist_ok=True)
    with open(results_path, 'w') as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(plot_dir, PREDICTIONS), 'w') as f:
      for rec in records:
        f.write(json.dumps(rec) + '\n')
    icl_plots.accuracy_vs_shots(report, os.path.join(plot_dir, PLOT_SHOTS))
    icl_plots.accuracy_vs_size(report, os.path.join(plot_dir, PLOT_SIZE))
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

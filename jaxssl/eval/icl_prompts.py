"""In-context learning tasks and prompts: reading a task, drawing demonstrations, building tokenized k-shot prompts.

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
"""
import dataclasses
import os

import numpy as np

from jaxssl import tasks
from jaxssl.errors import UserError
from jaxssl.eval import files

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'icl_tasks')
SCORINGS = ('auto', 'loglik', 'exact_match')
NORMALIZE = ('none', 'tokens', 'chars')


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
  if tasks.tfds.canonical_name(name) not in tasks.TFDS_DATASETS:
    raise UserError(f'icl.tfds={name!r} is not a supported dataset: use one of '
                    f'{", ".join(d for d in tasks.TFDS_DATASETS if d.startswith("glue/"))}')
  kind = tasks.tfds_kind(name)
  if not tasks.get(kind).class_labels:
    raise UserError(f'icl.tfds={name!r} is a {kind} task: ICL scores labelled classification tasks (e.g. glue/sst2)')
  examples, _ = tasks.read_tfds(name, split, kind, data_dir=data_dir)
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

"""The task kinds' metrics, pure numpy/python, each as its benchmark defines it.

Scales: every metric is a fraction in [0, 1] (correlations in [-1, 1]), except `squad_metrics`, which reports
percentages (0-100) exactly like the official SQuAD v1.1 `evaluate-v1.1.py`.

GLUE: `GLUE_TASKS` names MNLI's two evaluation sets as two tasks, `mnli_matched` and `mnli_mismatched`
(`glue_task_metrics` scores one evaluation set at a time). `glue_score` counts them, as the GLUE leaderboard
does, as ONE task (MNLI) scored by the mean of the two accuracies: the score is the mean over the 9 tasks
CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI (the AX diagnostic is not part of it). With BERT-large's
published test numbers this gives its published GLUE score, 80.5.

Tagging: `token_accuracy` for any tag set; entity precision/recall/F1 only for a span scheme (`span_scheme`),
decoded as the field's reference, seqeval 1.2.2 (tested equal on random sequences): BIO and IOB1 as CoNLL's
conlleval (seqeval's default mode: tolerant, an I- after O starts an entity), IOBES as seqeval's strict mode
(`mode='strict', scheme=IOBES`: only S-X and B-X I-X* E-X are entities).
"""
import collections
import re
import string
import warnings

import numpy as np


def _pair(a, b, what):
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f'{what}: inputs differ in shape: {a.shape} vs {b.shape}')
  if a.size == 0:
    raise ValueError(f'{what}: empty inputs')
  return a.ravel(), b.ravel()


def accuracy(preds, labels) -> float:
  """Fraction of positions where `preds == labels`."""
  preds, labels = _pair(preds, labels, 'accuracy')
  return float(np.mean(preds == labels))


def f1_binary(preds, labels, positive=1) -> float:
  """F1 of the `positive` class (MRPC, QQP), as `sklearn.metrics.f1_score`; 0.0 when it is undefined."""
  preds, labels = _pair(preds, labels, 'f1_binary')
  p, t = preds == positive, labels == positive
  tp, fp, fn = np.sum(p & t), np.sum(p & ~t), np.sum(~p & t)
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(preds, labels) -> float:
  """Matthews correlation (CoLA), multi-class, as `sklearn.metrics.matthews_corrcoef`; 0.0 when undefined."""
  preds, labels = _pair(preds, labels, 'matthews_corrcoef')
  _, index = np.unique(np.concatenate([labels, preds]), return_inverse=True)
  index = index.ravel()
  k, n = int(index.max()) + 1, labels.size
  confusion = np.zeros((k, k), np.float64)
  np.add.at(confusion, (index[:n], index[n:]), 1)
  t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
  n_correct, n_samples = np.trace(confusion), float(n)
  cov_ytyp = n_correct * n_samples - np.dot(t_sum, p_sum)
  cov_ypyp = n_samples**2 - np.dot(p_sum, p_sum)
  cov_ytyt = n_samples**2 - np.dot(t_sum, t_sum)
  if cov_ypyp * cov_ytyt == 0:
    return 0.0
  return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def pearson(x, y) -> float:
  """Pearson correlation, as `scipy.stats.pearsonr`: NaN when either input is constant."""
  x, y = _pair(x, y, 'pearson')
  if x.size < 2:
    raise ValueError('pearson: needs at least 2 values')
  x, y = x.astype(np.float64), y.astype(np.float64)
  if np.all(x == x[0]) or np.all(y == y[0]):
    return float('nan')
  xm, ym = x - x.mean(), y - y.mean()
  xm, ym = xm / np.linalg.norm(xm), ym / np.linalg.norm(ym)
  return float(np.clip(np.dot(xm, ym), -1.0, 1.0))


def _average_ranks(x):
  """Ranks 1..n, ties sharing their average rank (`scipy.stats.rankdata(method='average')`)."""
  order = np.argsort(x, kind='mergesort')
  inverse = np.empty(x.size, np.intp)
  inverse[order] = np.arange(x.size)
  x = x[order]
  first = np.r_[True, x[1:] != x[:-1]]
  dense = np.cumsum(first)[inverse]
  bounds = np.r_[np.nonzero(first)[0], x.size]
  return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x, y) -> float:
  """Spearman rank correlation with average ranks for ties, as `scipy.stats.spearmanr`; NaN if constant."""
  x, y = _pair(x, y, 'spearman')
  return pearson(_average_ranks(x), _average_ranks(y))


# ---------------------------------------------------------------------------------------------------- GLUE

GLUE_TASKS = {
    'cola': ('matthews_corrcoef',),
    'sst2': ('accuracy',),
    'mrpc': ('f1', 'accuracy'),
    'stsb': ('pearson', 'spearman'),
    'qqp': ('f1', 'accuracy'),
    'mnli_matched': ('accuracy',),
    'mnli_mismatched': ('accuracy',),
    'qnli': ('accuracy',),
    'rte': ('accuracy',),
    'wnli': ('accuracy',),
}
_GLUE_ALIASES = {'sst-2': 'sst2', 'sts-b': 'stsb', 'mnli-m': 'mnli_matched', 'mnli-mm': 'mnli_mismatched',
                 'mnli_m': 'mnli_matched', 'mnli_mm': 'mnli_mismatched'}
_METRIC_FNS = {'accuracy': accuracy, 'f1': f1_binary, 'matthews_corrcoef': matthews_corrcoef,
               'pearson': pearson, 'spearman': spearman}


def _glue_task(task: str) -> str:
  name = _GLUE_ALIASES.get(task.lower(), task.lower())
  if name not in GLUE_TASKS:
    raise ValueError(f'unknown GLUE task {task!r}: expected one of {sorted(GLUE_TASKS)}')
  return name


def glue_task_metrics(task: str, preds, labels) -> dict:
  """The metrics of GLUE `task` (a key of `GLUE_TASKS`), in [0, 1].

  `preds` are predicted class ids (STS-B: predicted similarity scores), `labels` the gold ones.
  """
  return {name: _METRIC_FNS[name](preds, labels) for name in GLUE_TASKS[_glue_task(task)]}


def glue_score(results: dict) -> float:
  """Mean over the tasks in `results` ({task: {metric: value}}) of each task's score.

  A task's score is the mean of its `GLUE_TASKS` metrics (other entries, such as a loss, are ignored).
  `mnli_matched` and `mnli_mismatched` together are one task (MNLI), scored by the mean of their accuracies,
  as on the GLUE leaderboard. Tasks missing from `results` are not counted: pass all of them for the score.
  """
  if not results:
    raise ValueError('glue_score: no task results')
  scores, mnli, seen = {}, [], set()
  for task, metrics in results.items():
    name = _glue_task(task)
    missing = [m for m in GLUE_TASKS[name] if m not in metrics]
    if missing:
      raise ValueError(f'glue_score: task {task!r} lacks metric(s) {missing}; it needs {GLUE_TASKS[name]}')
    if name in seen:
      raise ValueError(f'glue_score: task {task!r} given twice')
    seen.add(name)
    score = float(np.mean([float(metrics[m]) for m in GLUE_TASKS[name]]))
    if name.startswith('mnli'):
      mnli.append(score)
    else:
      scores[name] = score
  if mnli:
    scores['mnli'] = float(np.mean(mnli))
  return float(np.mean(list(scores.values())))


# --------------------------------------------------------------------------------------------- SQuAD v1.1

def normalize_answer(s: str) -> str:
  """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official SQuAD v1.1)."""
  s = s.lower()
  exclude = set(string.punctuation)
  s = ''.join(ch for ch in s if ch not in exclude)
  s = re.sub(r'\b(a|an|the)\b', ' ', s)
  return ' '.join(s.split())


def _golds(ground_truths):
  golds = [ground_truths] if isinstance(ground_truths, str) else list(ground_truths)
  if not golds:
    raise ValueError('SQuAD metric: no ground-truth answers')
  return golds


def exact_match(prediction: str, ground_truths) -> float:
  """1.0 if the normalized prediction equals some normalized gold answer (a string or a list), else 0.0."""
  p = normalize_answer(prediction)
  return float(max(p == normalize_answer(g) for g in _golds(ground_truths)))


def _token_f1(prediction: str, ground_truth: str) -> float:
  pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
  num_same = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision, recall = num_same / len(pred_tokens), num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def f1(prediction: str, ground_truths) -> float:
  """Token-level F1 of the normalized answers, the max over the gold answers (a string or a list)."""
  return max(_token_f1(prediction, g) for g in _golds(ground_truths))


def _squad_answers(dataset) -> dict:
  """{id: [answer texts]} from a SQuAD json (`{'data': [...]}` or its article list) or an {id: answers} dict."""
  if isinstance(dataset, dict) and 'data' in dataset and isinstance(dataset['data'], list):
    dataset = dataset['data']
  if isinstance(dataset, dict):
    return {qid: [a['text'] if isinstance(a, dict) else a for a in _golds(answers)]
            for qid, answers in dataset.items()}
  return {qa['id']: [a['text'] for a in qa['answers']]
          for article in dataset for paragraph in article['paragraphs'] for qa in paragraph['qas']}


def squad_metrics(predictions: dict, dataset) -> dict:
  """{'exact_match', 'f1'} as percentages (0-100), averaged over the questions of `dataset`.

  `dataset` is the SQuAD v1.1 json (or its `data` list) or a dict {id: [gold answer texts]}. As in the
  official script, unanswered questions score 0 (with a warning) and predictions for unknown ids are ignored.
  """
  answers = _squad_answers(dataset)
  if not answers:
    raise ValueError('squad_metrics: the dataset has no questions')
  unanswered = [qid for qid in answers if qid not in predictions]
  if unanswered:
    warnings.warn(f'squad_metrics: {len(unanswered)} unanswered question(s) score 0, e.g. {unanswered[0]!r}')
  em = sum(exact_match(predictions[q], g) for q, g in answers.items() if q in predictions)
  f = sum(f1(predictions[q], g) for q, g in answers.items() if q in predictions)
  return {'exact_match': 100.0 * em / len(answers), 'f1': 100.0 * f / len(answers)}


# ------------------------------------------------------------------------------------------------ tagging

def _sentences(tags, what):
  if isinstance(tags, str):
    raise ValueError(f'{what}: expected a list of tag sequences, got a string')
  tags = list(tags)
  if tags and isinstance(tags[0], str):
    return [tags]
  return [list(s) for s in tags]


def _sentence_pairs(pred_tags, gold_tags, what):
  preds, golds = _sentences(pred_tags, what), _sentences(gold_tags, what)
  if len(preds) != len(golds):
    raise ValueError(f'{what}: {len(preds)} predicted sentences vs {len(golds)} gold sentences')
  for i, (p, g) in enumerate(zip(preds, golds)):
    if len(p) != len(g):
      raise ValueError(f'{what}: sentence {i} has {len(p)} predicted tags vs {len(g)} gold tags')
  if not sum(len(g) for g in golds):
    raise ValueError(f'{what}: empty inputs')
  return preds, golds


def token_accuracy(pred_tags, gold_tags) -> float:
  """Fraction of tokens tagged correctly, over sentences (lists of tag strings); a single sentence also works."""
  preds, golds = _sentence_pairs(pred_tags, gold_tags, 'token_accuracy')
  correct = sum(p == g for ps, gs in zip(preds, golds) for p, g in zip(ps, gs))
  return correct / sum(len(g) for g in golds)


def _split_tag(tag):
  if not is_span_tag(tag):
    raise ValueError(f'invalid tag {tag!r}: expected O, or B-/I-/E-/S- followed by a type')
  return tag[0], tag[1:].split('-', maxsplit=1)[-1] or '_'


def is_span_tag(tag) -> bool:
  """Whether `tag` is O, or B-/I-/E-/S- followed by a type (bare B, I, E, S: an untyped span tag)."""
  return isinstance(tag, str) and (tag in ('O', 'B', 'I', 'E', 'S') or tag[:2] in ('B-', 'I-', 'E-', 'S-'))


SPAN_SCHEMES = ('BIO', 'IOB1', 'IOBES')


def span_scheme(tag_sequences) -> str | None:
  """The span scheme that tag sequences (e.g. a training set's) are written in: 'BIO', 'IOB1', 'IOBES', or None.

  None when some tag is not O / B- / I- / E- / S- + type (POS tags such as NN, ``, -LRB-; BILOU's U-/L-), when
  every tag is O, or for IOE (E- without B- or S-). 'IOBES' when S- or B- with E- occur; otherwise 'IOB1' when
  an entity starts with I- (at a sentence start, after O or after another type: IOB1 uses B- only between two
  adjacent entities of one type), else 'BIO' (IOB2).
  """
  sequences = _sentences(tag_sequences, 'span_scheme')
  prefixes, starts_with_inside = set(), False
  for tags in sequences:
    prev_prefix, prev_type = 'O', ''
    for tag in tags:
      if not is_span_tag(tag):
        return None
      prefix, type_ = _split_tag(tag)
      prefixes.add(prefix)
      if prefix == 'I' and (prev_prefix == 'O' or prev_type != type_):
        starts_with_inside = True
      prev_prefix, prev_type = prefix, type_
  prefixes.discard('O')
  if not prefixes:
    return None
  if 'S' in prefixes or {'B', 'E'} <= prefixes:
    return 'IOBES'
  if 'E' in prefixes:
    return None  # IOE1/IOE2: not decoded here
  return 'IOB1' if starts_with_inside else 'BIO'


def bio_spans(tags) -> list:
  """Entity spans [(type, start, end_inclusive)] of one sentence, exactly as seqeval's default `get_entities`.

  Tolerant (non-strict) decoding of IOB2, IOB1 and IOBES, as CoNLL's conlleval: an entity starts at B-/S-, at an
  I-/E- after O or after an entity of another type, and ends before O, B-, S-, a type change, or after E-/S-.
  End is inclusive, as in seqeval.
  """
  spans, prev_tag, prev_type, begin = [], 'O', '', 0
  for i, chunk in enumerate(list(tags) + ['O']):
    tag, type_ = _split_tag(chunk)
    end = prev_tag in 'ES' or (prev_tag in 'BI' and tag in 'BSO') or (prev_tag != 'O' and prev_type != type_)
    if end:
      spans.append((prev_type, begin, i - 1))
    start = tag in 'BS' or (prev_tag in 'ESO' and tag in 'EI') or (tag != 'O' and prev_type != type_)
    if start:
      begin = i
    prev_tag, prev_type = tag, type_
  return spans


def iobes_spans_strict(tags) -> list:
  """Entity spans [(type, start, end_inclusive)] of one IOBES sentence, as seqeval's strict mode (`mode='strict',
  scheme=IOBES`): only well-formed entities count, S-X alone or B-X I-X* E-X of one type; any other run of
  entity tags (a B- never closed by E-, an I- or E- without its B-) is no entity.
  """
  parsed = [_split_tag(t) for t in tags]
  spans, i = [], 0
  while i < len(parsed):
    prefix, type_ = parsed[i]
    if prefix == 'S':
      spans.append((type_, i, i))
    elif prefix == 'B':
      j = i + 1
      while j < len(parsed) and parsed[j] == ('I', type_):
        j += 1
      if j < len(parsed) and parsed[j] == ('E', type_):
        spans.append((type_, i, j))
        i = j
      else:
        i = j - 1  # the next tag may start an entity itself
    i += 1
  return spans


def entity_f1(pred_tags, gold_tags, scheme: str = 'BIO') -> dict:
  """Micro {'precision', 'recall', 'f1'} over entities matched exactly on (sentence, type, start, end).

  `scheme` ('BIO', 'IOB1' or 'IOBES', see `span_scheme`) picks the decoding: BIO and IOB1 as conlleval
  (seqeval's default mode, `bio_spans`), IOBES as seqeval's strict mode (`iobes_spans_strict`). Equal to
  seqeval's micro `precision_score` / `recall_score` / `f1_score` in those modes; each is 0.0 where its
  denominator is 0.
  """
  if scheme not in SPAN_SCHEMES:
    raise ValueError(f'entity_f1: scheme {scheme!r} is not one of {SPAN_SCHEMES}')
  preds, golds = _sentence_pairs(pred_tags, gold_tags, 'entity_f1')
  spans = iobes_spans_strict if scheme == 'IOBES' else bio_spans
  pred_set = {(i, *s) for i, p in enumerate(preds) for s in spans(p)}
  gold_set = {(i, *s) for i, g in enumerate(golds) for s in spans(g)}
  tp = len(pred_set & gold_set)
  precision = tp / len(pred_set) if pred_set else 0.0
  recall = tp / len(gold_set) if gold_set else 0.0
  f = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {'precision': precision, 'recall': recall, 'f1': f}


def tagging_metrics(pred_tags, gold_tags, scheme: str | None) -> dict:
  """{'token_accuracy'}, plus entity {'precision', 'recall', 'f1'} when `scheme` is a span scheme (not None)."""
  result = {'token_accuracy': token_accuracy(pred_tags, gold_tags)}
  if scheme is not None:
    result.update(entity_f1(pred_tags, gold_tags, scheme))
  return result


"""jaxssl.tasks.metrics against scikit-learn, scipy, seqeval (random inputs) and hand-checked SQuAD, BIO, GLUE cases."""
import math
import warnings

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from jaxssl.tasks import metrics as M
from jaxssl.train.metrics import perplexity

SEEDS = range(40)


def _random_labels(rng, k):
  n = int(rng.integers(1, 60))
  return rng.integers(0, k, n), rng.integers(0, k, n)


@pytest.mark.parametrize('seed', SEEDS)
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  for k in (2, 3, 5):
    preds, labels = _random_labels(rng, k)
    assert M.accuracy(preds, labels) == pytest.approx(sklearn.metrics.accuracy_score(labels, preds))
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(
        sklearn.metrics.matthews_corrcoef(labels, preds), abs=1e-12)
  preds, labels = _random_labels(rng, 2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    expected = sklearn.metrics.f1_score(labels, preds, pos_label=1, labels=[0, 1])
    expected0 = sklearn.metrics.f1_score(labels, preds, pos_label=0, labels=[0, 1])
  assert M.f1_binary(preds, labels) == pytest.approx(expected)
  assert M.f1_binary(list(preds), list(labels), positive=0) == pytest.approx(expected0)


def test_mcc_degenerate_cases_match_sklearn():
  cases = [([1, 1, 1, 1], [1, 1, 1, 1]), ([0, 0, 0], [0, 1, 0]), ([1, 0, 1], [0, 0, 0]), ([2], [2]),
           ([0, 1, 0, 1], [0, 1, 0, 1]), ([0, 1, 0, 1], [1, 0, 1, 0]), (['a', 'b', 'c'], ['c', 'b', 'a'])]
  for preds, labels in cases:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      expected = sklearn.metrics.matthews_corrcoef(labels, preds)
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(expected, abs=1e-12), (preds, labels)
  assert M.matthews_corrcoef([0, 0, 0], [0, 1, 0]) == 0.0
  assert M.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_f1_binary_undefined_is_zero():
  assert M.f1_binary([0, 0], [0, 0]) == 0.0
  assert M.f1_binary([1, 1, 0], [1, 0, 0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize('seed', SEEDS)
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 80))
  x = rng.normal(size=n)
  y = 0.5 * x + rng.normal(size=n)
  assert M.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y)[0], abs=1e-12)
  assert M.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y)[0], abs=1e-12)
  # Heavy ties (STS-B gold scores are multiples of 0.2; class-like predictions).
  xt, yt = rng.integers(0, 4, n) * 0.2, rng.integers(0, 3, n)
  if np.ptp(xt) and np.ptp(yt):
    assert M.spearman(xt, yt) == pytest.approx(scipy.stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert M.spearman(list(xt), list(yt)) == pytest.approx(scipy.stats.spearmanr(xt, yt)[0], abs=1e-12)
    assert M.pearson(xt, yt) == pytest.approx(scipy.stats.pearsonr(xt, yt)[0], abs=1e-12)
  np.testing.assert_allclose(M._average_ranks(xt), scipy.stats.rankdata(xt))


def test_correlations_constant_input_is_nan_like_scipy():
  assert math.isnan(M.pearson([1, 1, 1], [1, 2, 3]))
  assert math.isnan(M.spearman([1, 2, 3], [5, 5, 5]))
  assert M.spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match='at least 2'):
    M.pearson([1], [2])


@pytest.mark.parametrize('fn', [M.accuracy, M.f1_binary, M.matthews_corrcoef, M.pearson, M.spearman])
def test_length_mismatch_and_empty_raise(fn):
  with pytest.raises(ValueError, match='shape'):
    fn([1, 0, 1], [1, 0])
  with pytest.raises(ValueError, match='empty'):
    fn([], [])


def test_glue_task_metrics():
  preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]
  assert M.glue_task_metrics('mrpc', preds, labels) == {'f1': pytest.approx(0.8), 'accuracy': 0.75}
  assert set(M.glue_task_metrics('qqp', preds, labels)) == {'f1', 'accuracy'}
  assert set(M.glue_task_metrics('CoLA', preds, labels)) == {'matthews_corrcoef'}
  assert set(M.glue_task_metrics('sts-b', [0.1, 0.5, 0.2], [1., 3., 2.])) == {'pearson', 'spearman'}
  assert M.glue_task_metrics('mnli_mismatched', [0, 1, 2], [0, 1, 1]) == {'accuracy': pytest.approx(2 / 3)}
  with pytest.raises(ValueError, match='unknown GLUE task'):
    M.glue_task_metrics('squad', preds, labels)


def test_glue_score_reproduces_bert_large_published_score():
  # BERT-large GLUE test results (Devlin et al. 2019, Table 1); its leaderboard score is 80.5.
  r = {
      'cola': {'matthews_corrcoef': .605}, 'sst2': {'accuracy': .949},
      'mrpc': {'f1': .893, 'accuracy': .854}, 'stsb': {'pearson': .876, 'spearman': .865},
      'qqp': {'f1': .721, 'accuracy': .893}, 'mnli_matched': {'accuracy': .867},
      'mnli_mismatched': {'accuracy': .859}, 'qnli': {'accuracy': .927}, 'rte': {'accuracy': .701},
      'wnli': {'accuracy': .651},
  }
  assert round(M.glue_score(r), 3) == 0.805


def test_glue_score_hand_computed():
  r = {'cola': {'matthews_corrcoef': 0.5, 'loss': 9.0}, 'mrpc': {'f1': 0.9, 'accuracy': 0.7},
       'mnli-m': {'accuracy': 0.8}, 'mnli-mm': {'accuracy': 0.6}}
  # tasks: cola 0.5, mrpc 0.8, mnli (0.8 + 0.6) / 2 = 0.7 -> mean 2.0 / 3
  assert M.glue_score(r) == pytest.approx(2.0 / 3)
  with pytest.raises(ValueError, match='lacks'):
    M.glue_score({'mrpc': {'f1': 0.9}})
  with pytest.raises(ValueError, match='twice'):
    M.glue_score({'sst2': {'accuracy': 1.0}, 'sst-2': {'accuracy': 1.0}})
  with pytest.raises(ValueError):
    M.glue_score({})


def test_squad_normalize_and_exact_match():
  assert M.normalize_answer('The Cat!') == 'cat'
  assert M.normalize_answer('  An  apple,  a day\tkeeps... ') == 'apple day keeps'
  assert M.normalize_answer('theatre anthem') == 'theatre anthem'  # articles only as whole words
  assert M.normalize_answer("Rock 'n' Roll") == 'rock n roll'
  assert M.exact_match('The Cat!', ['cat']) == 1.0
  assert M.exact_match('the cat', 'a dog') == 0.0
  assert M.exact_match('Denver Broncos', ['Carolina Panthers', 'denver broncos.']) == 1.0


def test_squad_f1_by_hand():
  # pred tokens [quick, brown, fox], gold [brown, fox, jumps, high]: 2 common; P = 2/3, R = 2/4, F1 = 4/7
  assert M.f1('The quick brown fox', ['brown fox jumps high']) == pytest.approx(4 / 7)
  assert M.f1('a b c', ['x y']) == 0.0
  # repeated tokens count with multiplicity: pred [x, x, y], gold [x, y, y] -> common {x:1, y:1}; F1 = 2/3
  assert M.f1('x x y', 'x y y') == pytest.approx(2 / 3)
  # max over golds: 'brown fox' vs ['fox', 'the brown fox'] -> 2/3 and 1.0
  assert M.f1('brown fox', ['fox', 'the brown fox']) == 1.0
  assert M.f1('brown fox', ['fox', 'red fox']) == pytest.approx(2 / 3)
  assert M.f1('the', ['a']) == 0.0  # both normalize to nothing
  with pytest.raises(ValueError, match='no ground-truth'):
    M.f1('x', [])


def test_squad_metrics_dataset_and_dict():
  dataset = {'data': [{'paragraphs': [{'qas': [
      {'id': 'q1', 'answers': [{'text': 'Denver Broncos'}, {'text': 'the Broncos'}]},
      {'id': 'q2', 'answers': [{'text': 'Santa Clara, California'}]},
      {'id': 'q3', 'answers': [{'text': '1966'}]},
  ]}]}]}
  preds = {'q1': 'Broncos', 'q2': 'Santa Clara', 'q3': '1966', 'unknown': 'x'}
  # q1: EM 1 (vs 'the Broncos'), F1 1; q2: EM 0, F1: P=1, R=2/3 -> 0.8; q3: EM 1, F1 1
  expected = {'exact_match': pytest.approx(200 / 3), 'f1': pytest.approx(280 / 3)}
  assert M.squad_metrics(preds, dataset) == expected
  assert M.squad_metrics(preds, dataset['data']) == expected
  answers = {'q1': ['Denver Broncos', 'the Broncos'], 'q2': ['Santa Clara, California'], 'q3': ['1966']}
  assert M.squad_metrics(preds, answers) == expected
  with pytest.warns(UserWarning, match='unanswered'):
    result = M.squad_metrics({'q3': '1966'}, answers)
  assert result == {'exact_match': pytest.approx(100 / 3), 'f1': pytest.approx(100 / 3)}
  with pytest.raises(ValueError, match='no questions'):
    M.squad_metrics({}, {})


def test_bio_spans_hand_checked():
  assert M.bio_spans(['B-PER', 'I-PER', 'O', 'B-LOC']) == [('PER', 0, 1), ('LOC', 3, 3)]  # entity at the end
  assert M.bio_spans(['O', 'I-PER', 'I-PER', 'O']) == [('PER', 1, 2)]  # I- after O starts an entity
  assert M.bio_spans(['I-PER', 'I-LOC', 'B-LOC', 'I-LOC']) == [('PER', 0, 0), ('LOC', 1, 1), ('LOC', 2, 3)]
  assert M.bio_spans(['B-PER', 'I-LOC', 'I-LOC']) == [('PER', 0, 0), ('LOC', 1, 2)]  # type switch
  assert M.bio_spans(['B-PER', 'B-PER', 'O', 'O']) == [('PER', 0, 0), ('PER', 1, 1)]
  assert M.bio_spans(['B-ORG', 'I-ORG', 'I-ORG']) == [('ORG', 0, 2)]
  assert M.bio_spans(['O', 'O']) == []
  assert M.bio_spans([]) == []
  # IOBES and multi-dash types
  assert M.bio_spans(['S-PER', 'B-LOC', 'E-LOC', 'E-LOC', 'B-MISC-X']) == [
      ('PER', 0, 0), ('LOC', 1, 2), ('LOC', 3, 3), ('MISC-X', 4, 4)]
  assert M.bio_spans(np.array(['B-PER', 'I-PER'])) == [('PER', 0, 1)]
  with pytest.raises(ValueError, match='invalid tag'):
    M.bio_spans(['PER'])


def test_entity_f1_and_token_accuracy_hand_checked():
  gold = [['B-PER', 'I-PER', 'O', 'B-LOC'], ['O', 'B-ORG', 'I-ORG']]
  pred = [['B-PER', 'I-PER', 'O', 'O'], ['O', 'I-ORG', 'I-ORG']]
  # gold: PER(0,0-1), LOC(0,3), ORG(1,1-2); pred: PER(0,0-1), ORG(1,1-2) (I- after O) -> tp 2
  assert M.entity_f1(pred, gold) == {'precision': 1.0, 'recall': pytest.approx(2 / 3), 'f1': pytest.approx(0.8)}
  assert M.token_accuracy(pred, gold) == pytest.approx(5 / 7)
  # boundary error is a miss on both sides; same spans in different sentences do not match
  pred = [['B-PER', 'O', 'O', 'B-LOC'], ['O', 'B-ORG', 'I-ORG']]
  assert M.entity_f1(pred, gold)['f1'] == pytest.approx(2 / 3)
  assert M.entity_f1([['B-X'], ['O']], [['O'], ['B-X']])['f1'] == 0.0
  assert M.entity_f1([['O']], [['O']]) == {'precision': 0.0, 'recall': 0.0, 'f1': 0.0}
  assert M.entity_f1(['B-X', 'O'], ['B-X', 'O'])['f1'] == 1.0  # one flat sentence
  with pytest.raises(ValueError, match='sentence 1'):
    M.entity_f1([['O'], ['O']], [['O'], ['O', 'O']])
  with pytest.raises(ValueError, match='sentences'):
    M.token_accuracy([['O']], [['O'], ['O']])
  with pytest.raises(ValueError, match='empty'):
    M.token_accuracy([[]], [[]])


def test_perplexity():
  assert perplexity(0.0, 10) == 1.0
  assert perplexity(10 * math.log(50.0), 10) == pytest.approx(50.0)
  assert perplexity(1e6, 1) == float('inf')
  with pytest.raises(ValueError, match='positive'):
    perplexity(1.0, 0)


# --------------------------------------------------------------------- span schemes, against seqeval 1.2.2

SPAN_TYPES = ('PER', 'LOC', 'MISC-X')  # a type with a dash: seqeval splits at the first one only


def _well_formed(rng, scheme, n):
  """One gold sentence of at least `n` tags written in `scheme`, entities of 1-3 words (adjacent ones included)."""
  tags = []
  while len(tags) < n:
    if rng.random() < 0.4:
      tags.append('O')
      continue
    type_, length = SPAN_TYPES[int(rng.integers(3))], int(rng.integers(1, 4))
    if scheme == 'IOBES':
      tags += [f'S-{type_}'] if length == 1 else [f'B-{type_}'] + [f'I-{type_}'] * (length - 2) + [f'E-{type_}']
    elif scheme == 'IOB1':  # B- only where an entity follows one of the same type
      first = 'B' if tags and tags[-1][2:] == type_ else 'I'
      tags += [f'{first}-{type_}'] + [f'I-{type_}'] * (length - 1)
    else:
      tags += [f'B-{type_}'] + [f'I-{type_}'] * (length - 1)
  return tags


@pytest.mark.parametrize('scheme', M.SPAN_SCHEMES)
@pytest.mark.parametrize('seed', range(10))
def test_entity_f1_matches_seqeval(scheme, seed):
  """Random gold sentences in the scheme and predictions that keep 60% of the gold tags and draw the rest from
  the scheme's whole tag alphabet (ill-formed sequences included): the same precision/recall/F1 as seqeval.
  BIO and IOB1 are decoded as conlleval (seqeval's default mode), IOBES as seqeval's strict mode."""
  import seqeval.metrics
  import seqeval.scheme
  rng = np.random.default_rng(seed)
  prefixes = 'BIES' if scheme == 'IOBES' else 'BI'
  alphabet = ['O', *prefixes] + [f'{p}-{t}' for p in prefixes for t in SPAN_TYPES]  # bare B, I...: type '_'
  for _ in range(20):
    gold = [_well_formed(rng, scheme, int(rng.integers(0, 12))) for _ in range(int(rng.integers(1, 8)))]
    if not sum(map(len, gold)):
      continue
    pred = [[t if rng.random() < 0.6 else alphabet[int(rng.integers(len(alphabet)))] for t in g] for g in gold]
    assert M.span_scheme(gold) in (scheme, None)  # None: an all-O draw
    mode = {'mode': 'strict', 'scheme': seqeval.scheme.IOBES} if scheme == 'IOBES' else {}
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # seqeval warns where a denominator is 0 (both then give 0.0)
      expected = {'precision': seqeval.metrics.precision_score(gold, pred, **mode),
                  'recall': seqeval.metrics.recall_score(gold, pred, **mode),
                  'f1': seqeval.metrics.f1_score(gold, pred, **mode)}
    assert M.entity_f1(pred, gold, scheme) == pytest.approx(expected, abs=1e-12), (gold, pred)


def test_iobes_strict_spans_hand_checked():
  assert M.iobes_spans_strict(['S-PER', 'B-LOC', 'I-LOC', 'E-LOC', 'O']) == [('PER', 0, 0), ('LOC', 1, 3)]
  assert M.iobes_spans_strict(['B-LOC', 'I-LOC', 'O']) == []  # never closed
  assert M.iobes_spans_strict(['I-LOC', 'E-LOC', 'B-PER', 'E-PER']) == [('PER', 2, 3)]  # no B- for the first
  assert M.iobes_spans_strict(['B-PER', 'B-PER', 'E-PER']) == [('PER', 1, 2)]  # the second B- starts anew
  assert M.iobes_spans_strict(['B-PER', 'E-LOC']) == []  # type switch inside
  # the tolerant (conlleval) decoding would count both of the first two:
  assert M.bio_spans(['B-LOC', 'I-LOC', 'O']) == [('LOC', 0, 1)]


PTB_SENTENCE = ['``', 'NNP', 'VBZ', '$', 'CD', '-LRB-', 'NN', '-RRB-', ',', "''", '#', 'CD', ':', 'DT', 'NN', '.']


def test_span_scheme_of_training_tags():
  assert M.span_scheme([PTB_SENTENCE]) is None  # POS: token accuracy only
  assert M.span_scheme([['B-NP', 'I-NP', 'B-VP', 'O'], ['B-PP', 'B-NP']]) == 'BIO'
  # CoNLL-2003's original chunk/NER files are IOB1: an entity starts with I-, B- only after one of its type
  assert M.span_scheme([['I-NP', 'I-NP', 'B-NP', 'I-VP', 'O']]) == 'IOB1'
  assert M.span_scheme([['O', 'I-PER'], ['B-LOC', 'I-LOC']]) == 'IOB1'
  assert M.span_scheme([['S-PER', 'O'], ['B-LOC', 'E-LOC']]) == 'IOBES'
  assert M.span_scheme([['B-PER', 'I-PER', 'E-PER']]) == 'IOBES'
  assert M.span_scheme([['O', 'O']]) is None  # no entity at all
  assert M.span_scheme([['I-X', 'E-X', 'O']]) is None  # IOE is not decoded
  assert M.span_scheme([['B-X', 'L-X', 'U-Y']]) is None  # BILOU neither
  assert M.span_scheme([['B-PER', 'NN']]) is None  # a tag outside the scheme makes it no span scheme
  assert M.span_scheme(['B-PER', 'O']) == 'BIO'  # one flat sentence


def test_tagging_metrics_per_scheme():
  gold = [PTB_SENTENCE, ['DT', 'NNS', 'VBD']]
  pred = [PTB_SENTENCE[:-1] + [','], ['DT', 'NN', 'VBD']]
  assert M.tagging_metrics(pred, gold, None) == {'token_accuracy': pytest.approx(17 / 19)}
  gold, pred = [['B-PER', 'I-PER', 'O']], [['B-PER', 'I-PER', 'B-LOC']]
  assert M.tagging_metrics(pred, gold, 'BIO') == {'token_accuracy': pytest.approx(2 / 3), 'precision': 0.5,
                                                    'recall': 1.0, 'f1': pytest.approx(2 / 3)}
  with pytest.raises(ValueError, match='scheme'):
    M.entity_f1(pred, gold, 'BILOU')

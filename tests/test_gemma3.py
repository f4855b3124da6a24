"""GPT decoder, Gemma 3 variant (models/gemma.py): parity with transformers' Gemma3ForCausalLM on small random
models (logits, greedy generations with the sliding-window ring cache), import from HF directories (gemma3_text
and the nested gemma3 layout) and from GGUF files written as llama.cpp writes them, FLOPs, configs."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxssl.config import load_config
from jaxssl.convert import decoder, gguf_file, hf_gemma3
from jaxssl.errors import UserError
from jaxssl.families import flops_per_token
from jaxssl.models import generation, gpt

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')

CONFIG = os.path.join(os.path.dirname(__file__), '..', 'configs', 'gpt.py')
SPECIALS = ['<pad>', '<eos>', '<bos>', '<unk>']
PIECES = ['▁', 'a', 'b', 'c', 'd', 'e', 'h', 'l', 'o', 'ab', 'cd', '▁a', '▁ab', 'he', 'll', 'hell', 'hello',
          '▁hello', 'lo', '▁b', '▁c', 'abcd', '▁abcd']
TOKENS = SPECIALS + [f'<0x{b:02X}>' for b in range(256)] + PIECES
V = len(TOKENS)
WINDOW = 4
# 3 layers, every 3rd global: [local, local, global]; q scale 24^-1/2 != head_dim^-1/2; 'scaled': linear RoPE on
# the global layer.
# 'gguf': query_pre_attn_scalar = head_dim, as llama.cpp assumes (a GGUF file cannot say otherwise).
VARIANTS = {'pattern': {}, 'scaled': dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0}),
            'gguf': dict(query_pre_attn_scalar=16)}


@functools.cache
def hf_reference(variant='pattern'):
  """A random transformers Gemma3ForCausalLM, eval mode, float32, eager attention, random norm weights."""
  torch.manual_seed(0)
  cfg = transformers.Gemma3TextConfig(
      vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
      num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=3,
      layer_types=['sliding_attention', 'sliding_attention', 'full_attention'], max_position_embeddings=64,
      rope_theta=1000.0, rope_local_base_freq=100.0, initializer_range=0.2, bos_token_id=2, eos_token_id=1,
      pad_token_id=0, attn_implementation='eager', **{'query_pre_attn_scalar': 24, **VARIANTS[variant]})
  model = transformers.Gemma3ForCausalLM(cfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def hf_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def hf_config_dict(model):
  return json.loads(model.config.to_json_string())


def jaxssl_model(model_cfg, params, **overrides):
  c = gpt.GPTConfig.from_config(dict(model_cfg, **overrides), V)
  m = gpt.GPT(c, V, rngs=nnx.Rngs(0))
  if not c.scan_layers:
    layers = params['decoder']['layers']
    params = dict(params, decoder={'layers': {i: jax.tree.map(lambda a, i=i: a[i], layers)
                                              for i in range(c.num_layers)}})
  nnx.update(m, params)
  return m


def hf_logits(model, ids):
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


IDS = np.random.default_rng(0).integers(4, V, (2, 13)).astype(np.int32)


@pytest.mark.parametrize('variant', ['pattern', 'scaled'])
def test_logits_match_transformers(variant):
  ref = hf_reference(variant)
  cfg, params = hf_gemma3.params_from_hf(hf_state(ref), hf_config_dict(ref))
  assert (cfg['sliding_window'], cfg['sliding_window_pattern'], cfg['rope_local_theta']) == (WINDOW, 3, 100.0)
  want = hf_logits(ref, IDS)
  for scan in (True, False) if variant == 'pattern' else (True,):
    got = np.asarray(jaxssl_model(cfg, params, scan_layers=scan)(jnp.asarray(IDS)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_layer_paths_same_loss_and_grads_with_dropout():
  """GemmaDecoder runs parts.run_stack with its is-local flags as a per-layer input: the layers as a list, in XLA's
  loop and unrolled give the same loss and gradients, dropout included (layer i draws from fold_in(key, i))."""
  ref = hf_reference('pattern')
  cfg, params = hf_gemma3.params_from_hf(hf_state(ref), hf_config_dict(ref))
  ids, key = jnp.asarray(IDS), jax.random.key(3)

  def loss(graphdef, state):
    logits = nnx.merge(graphdef, state)(ids, dropout_rng=key)
    total, count = gpt.next_token_loss(logits, ids, None)
    return total / count

  results = []
  for settings in (dict(scan_layers=False), dict(layer_loop='scan'), dict(layer_loop='unrolled')):
    graphdef, state = nnx.split(jaxssl_model(cfg, params, dropout_rate=0.1, **settings))
    loss_value, grads = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)(graphdef, state)
    grads = nnx.to_pure_dict(grads)
    if settings.get('scan_layers') is False:  # the list's per-layer grads, stacked as the loop's
      layers = grads['decoder']['layers']
      grads['decoder']['layers'] = jax.tree.map(lambda *a: jnp.stack(a), *(layers[i] for i in sorted(layers)))
    results.append((loss_value, grads))
  assert results[0][0] != 0
  for loss_value, grads in results[1:]:
    np.testing.assert_allclose(loss_value, results[0][0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, results[0][1])


@pytest.mark.parametrize('out_major_min_bytes', ['0', None])
def test_greedy_generation_matches_transformers_with_a_window_sized_cache(out_major_min_bytes, monkeypatch):
  """Left- and right-padded prompts longer than the window: the ring cache keeps WINDOW slots per local layer
  and the continuations equal transformers' token for token; '0': every layer kernel output-major when the layers
  run apart (one prompt at a time)."""
  if out_major_min_bytes is not None:
    monkeypatch.setenv('JAXSSL_OUT_MAJOR_MIN_BYTES', out_major_min_bytes)
  ref = hf_reference()
  cfg, params = hf_gemma3.params_from_hf(hf_state(ref), hf_config_dict(ref))
  model = jaxssl_model(cfg, params)
  cache = model.init_cache(2, 30)
  assert cache['local_key'].shape[:3] == (2, 2, WINDOW) and cache['key'].shape[:3] == (1, 2, 30)
  prompts = [list(IDS[0, :9]), list(IDS[1, :5])]
  want = []
  for p in prompts:
    ids = torch.tensor([p])
    with torch.no_grad():
      out = ref.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids),
                         pad_token_id=0, eos_token_id=None)
    want.append(out[0, len(p):].tolist())
  for side in ('left', 'right'):
    batch = np.zeros((2, 9), np.int32)
    for i, p in enumerate(prompts):
      batch[i, (9 - len(p) if side == 'left' else 0):][:len(p)] = p
    out, _ = generation.generate(model, batch, np.array([9, 5]), 12, greedy=True, padding_side=side)
    assert np.asarray(out).tolist() == want, side
  # One prompt at a time: the layers run apart, each with its own cache arrays (generation.layer_caches_apart).
  assert generation.runs_layers_apart(model)
  attention = generation.layers_apart(model).decoder.layers[0].attention
  assert attention.out_major == (() if out_major_min_bytes is None else ('out', 'qkv'))  # q/k/v fused
  for p, expected in zip(prompts, want):
    out, _ = generation.generate(model, np.array([p]), np.array([len(p)]), 12, greedy=True)
    assert np.asarray(out).tolist() == [expected]


def test_nested_gemma3_directory_converts(tmp_path):
  """config.json in Gemma3ForConditionalGeneration's layout (text_config; weights under
  model.language_model.*, a vision tower left out) -> `from_hf` export -> jaxssl.load: logits as transformers."""
  import jaxssl  # noqa: PLC0415 (the public loader, as a user calls it)
  from safetensors.numpy import save_file  # noqa: PLC0415 (test-only writer)
  ref = hf_reference()
  src = tmp_path / 'hf'
  src.mkdir()
  text = hf_config_dict(ref)
  (src / 'config.json').write_text(json.dumps({'model_type': 'gemma3', 'architectures': [
      'Gemma3ForConditionalGeneration'], 'text_config': text, 'vision_config': {'hidden_size': 8}}))
  state = {('model.language_model.' + k[len('model.'):]): v for k, v in hf_state(ref).items() if k != 'lm_head.weight'}
  state['model.vision_tower.patch_embed.weight'] = np.zeros((2, 2), np.float32)
  save_file(state, str(src / 'model.safetensors'))
  tok, tok_config = gguf_file.read_gguf_tokenizer(write_gguf(ref, tmp_path / 'm.gguf'))
  tok.save(str(src / 'tokenizer.json'))
  (src / 'tokenizer_config.json').write_text(json.dumps(tok_config))
  decoder.from_hf(str(src), str(tmp_path / 'export'))
  model, tokenizer = jaxssl.load(str(tmp_path / 'export'))
  assert tokenizer.bos_id == 2  # Gemma's tokenizer always starts with <bos>
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), hf_logits(ref, IDS), atol=1e-4, rtol=0)
  with pytest.raises(UserError, match='Gemma-style'):
    decoder.to_hf(str(tmp_path / 'export'), str(tmp_path / 'back'))


# --------------------------------------------------------------------------------------------------- GGUF

GGUF_LAYER = {'input_layernorm': 'ATTN_NORM', 'post_attention_layernorm': 'ATTN_POST_NORM',
              'pre_feedforward_layernorm': 'FFN_NORM', 'post_feedforward_layernorm': 'FFN_POST_NORM',
              'self_attn.q_norm': 'ATTN_Q_NORM', 'self_attn.k_norm': 'ATTN_K_NORM', 'self_attn.q_proj': 'ATTN_Q',
              'self_attn.k_proj': 'ATTN_K', 'self_attn.v_proj': 'ATTN_V', 'self_attn.o_proj': 'ATTN_OUT',
              'mlp.gate_proj': 'FFN_GATE', 'mlp.up_proj': 'FFN_UP', 'mlp.down_proj': 'FFN_DOWN'}


def write_gguf(ref, path):
  """`ref` as llama.cpp's Gemma3Model converter writes it: norms stored as 1 + w, q/k rows as HF's, F32 tensors,
  a sentencepiece ('llama') vocabulary that adds <bos>; no layer pattern key unless it differs from 6."""
  c = ref.config
  w = gguf.GGUFWriter(str(path), 'gemma3')
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_block_count(c.num_hidden_layers)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_key_length(c.head_dim)
  w.add_value_length(c.head_dim)
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_freq_base(c.rope_parameters['full_attention']['rope_theta'])
  w.add_rope_freq_base_swa(c.rope_parameters['sliding_attention']['rope_theta'])
  w.add_sliding_window(c.sliding_window)
  w.add_sliding_window_pattern([t == 'sliding_attention' for t in c.layer_types])
  types = ([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.UNKNOWN] + [gguf.TokenType.BYTE] * 256
           + [gguf.TokenType.NORMAL] * len(PIECES))
  w.add_tokenizer_model('llama')
  w.add_tokenizer_pre('default')
  w.add_token_list(TOKENS)
  w.add_token_scores([0.0] * 260 + [-float(i) for i in range(len(PIECES))])
  w.add_token_types(types)
  for method, value in (('add_bos_token_id', 2), ('add_eos_token_id', 1), ('add_unk_token_id', 3),
                        ('add_pad_token_id', 0), ('add_add_bos_token', True), ('add_add_eos_token', False),
                        ('add_add_space_prefix', False)):
    getattr(w, method)(value)
  for name, a in hf_state(ref).items():
    if name == 'lm_head.weight':
      continue
    a = a + 1.0 if name.endswith('norm.weight') else a
    if name == 'model.embed_tokens.weight':
      gname = 'token_embd.weight'
    elif name == 'model.norm.weight':
      gname = 'output_norm.weight'
    else:
      _, _, i, rest = name.split('.', 3)
      base = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, GGUF_LAYER[rest[:-len('.weight')]])]
      gname = base.format(bid=int(i)) + '.weight'
    w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def test_gguf_reads_back_as_transformers_state(tmp_path):
  ref = hf_reference('gguf')
  ckpt = gguf_file.read_gguf(write_gguf(ref, tmp_path / 'm.gguf'))
  assert ckpt.hf_config['layer_types'] == list(ref.config.layer_types)
  want = hf_state(ref)
  assert set(ckpt.state_dict) == set(want) - {'lm_head.weight'}
  for k, v in ckpt.state_dict.items():
    np.testing.assert_allclose(v, want[k], atol=1e-6, rtol=0, err_msg=k)
  # The file's tokenizer: sentencepiece BPE, <bos> first, bytes for what the pieces lack.
  ids = ckpt.tokenizer.encode('hello abcd é').ids
  assert ids[0] == 2 and TOKENS[ids[1]] == 'hello' and TOKENS[ids[-1]] == '<0xA9>'
  cfg, params = hf_gemma3.params_from_hf(ckpt.state_dict, ckpt.hf_config)
  model = jaxssl_model(cfg, params)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), hf_logits(ref, IDS), atol=1e-4, rtol=0)


class NoKeys:
  """GGUF metadata without any optional key (what layer_types reads)."""
  path = 'f'

  def get(self, key, default=None):
    return default


def test_llama_cpp_layer_pattern_and_unsupported_variants():
  """A file without the pattern key gets llama.cpp's every-6th-layer-global; unsupported variants are refused."""
  want = ['sliding_attention'] * 5 + ['full_attention', 'sliding_attention']
  assert gguf_file.gguf_file_gemma3.layer_types(NoKeys(), 7) == want
  # google/gemma-3-1b-pt's config.json as transformers 4.50 wrote it: no layer_types nor rope_parameters.
  old = dict(model_type='gemma3_text', num_hidden_layers=26, hidden_size=1152, intermediate_size=6912,
             num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512, sliding_window_pattern=6,
             rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, rope_scaling=None, max_position_embeddings=32768,
             query_pre_attn_scalar=256, vocab_size=262144)
  cfg = hf_gemma3.model_config_from_hf(old)
  want = dict(load_config(f'{CONFIG}:gemma3_1b').model)
  assert {k: cfg[k] for k in cfg if k in want and k not in ('name', 'scan_layers', 'dropout_rate')} == {
      k: want[k] for k in cfg if k in want and k not in ('name', 'scan_layers', 'dropout_rate')}
  hf = hf_config_dict(hf_reference())
  for bad, match in ((dict(final_logit_softcapping=30.0), 'softcapping'), (dict(hidden_activation='silu'), 'tanh'),
                     (dict(layer_types=['full_attention', 'sliding_attention', 'sliding_attention']), 'every Nth')):
    with pytest.raises(UserError, match=match):
      hf_gemma3.model_config_from_hf(dict(hf, **bad))


# --------------------------------------------------------------------------------------------------- configs, FLOPs

def test_real_sizes():
  """configs/gpt.py:gemma3_270m / gemma3_1b hold google/gemma-3-270m's and gemma-3-1b-pt's parameter counts."""
  for variant, count in (('gemma3_270m', 268_098_176), ('gemma3_1b', 999_885_952)):
    c = load_config(f'{CONFIG}:{variant}')
    abstract = nnx.eval_shape(lambda c=c: gpt.GPT(c.model, c.tokenizer.vocab_size, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == count, variant
    assert gpt.GPTConfig.from_config(c.model, 262144).sliding_window == 512
  with pytest.raises(UserError, match='sliding_window'):
    gpt.GPTConfig.from_config(dict(load_config(f'{CONFIG}:gemma3_tiny').model, sliding_window=-1), 100)


def test_flops_formula_counts_the_window():
  c = load_config(f'{CONFIG}:gemma3_tiny').model
  n, d, h = c.num_heads, c.head_dim, c.hidden_size
  per_layer = 6 * (h * d * (2 * n + 2 * c.num_kv_heads) + 3 * h * c.intermediate_size)
  # 4 layers, every 2nd global, window 32: at 128 tokens the two local layers see 32 keys, the global ones 128.
  want = 4 * per_layer + 12 * n * d * (32 + 128 + 32 + 128) + 6 * h * 1000
  assert flops_per_token(c, 1000, 128, 128) == pytest.approx(want)


def test_flops_formula_matches_xla():
  """Within 10% of XLA's count of the whole train step (at seq_len = window, where the masked square XLA computes
  is what the formula counts)."""
  from tests.test_bench import FLOPS_COMMON, load, xla_flops_per_token  # noqa: PLC0415 (shared helper)
  config = load(f'{CONFIG}:gemma3_tiny', ['--config.model.scan_layers=false', '--config.model.loss_chunk=0',
                                          *FLOPS_COMMON[:2], '--config.data.seq_len=32'])
  d = config.data
  ratio = flops_per_token(config.model, 1000, d.seq_len, d.max_predictions) / xla_flops_per_token(config)
  assert 0.9 <= ratio <= 1.1, ratio


def test_sharded_gradients_equal_one_device():
  """gemma3_tiny (local + global layers, q/k and sandwich norms) on a 2x2x2 mesh: the gradients of the LM loss
  equal one device's (what tests/test_train.py checks for BERT; nothing else runs GemmaDecoder under a mesh)."""
  from jaxssl import bench  # noqa: PLC0415 (test-only helpers)
  from jaxssl import config as config_lib  # noqa: PLC0415
  from jaxssl import mesh as mesh_lib  # noqa: PLC0415
  from jaxssl.families import gpt as gpt_family  # noqa: PLC0415
  from jaxssl.train import state as state_lib  # noqa: PLC0415
  config = load_config(f'{CONFIG}:gemma3_tiny')
  config_lib.parse_overrides(config, [
      '--config.model.num_layers=2', '--config.model.hidden_size=32', '--config.model.num_heads=4',
      '--config.model.num_kv_heads=2', '--config.model.head_dim=8', '--config.model.intermediate_size=48',
      '--config.model.sliding_window=8', '--config.data.seq_len=24', '--config.train.batch_size=8'])
  batch = bench.synthetic_batch(config, 128)

  def grads(mesh):
    setup = state_lib.setup_model(config.model, 128, mesh, 0)
    params = state_lib.init_params(setup)
    # Non-zero (1 + w) norm weights, so a misplaced norm shows in the gradients.
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a + 0.1 if 'norm' in jax.tree_util.keystr(p) else a, params)
    def loss(p, b):
      sums = gpt_family.lm_sums(setup.graphdef, p, b, None)
      return sums['lm_loss'] / sums['lm_count']
    with jax.set_mesh(mesh):
      return jax.device_get(jax.jit(jax.grad(loss))(params, mesh_lib.global_batch(batch, mesh)))

  one = grads(mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  sharded = grads(mesh_lib.make_mesh((2, 2, 2)))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), one, sharded)

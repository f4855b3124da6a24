"""Llama checkpoints <-> jaxssl exports through `python -m jaxssl.convert`, against transformers itself.

A random LlamaForCausalLM (GQA, untied head, llama3 RoPE scaling) with a sentencepiece BPE tokenizer trained
here is saved the way the hub's checkpoints are, and written as llama.cpp's converter writes a `.gguf` file; both
imports must give transformers' logits, its greedy generations and its token ids (BOS included), and to-hf must
give back a directory transformers opens.
"""
import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')
spm = pytest.importorskip('sentencepiece')

from jaxssl.convert import gguf_file  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.data import tokenizers as tokenizers_lib  # noqa: E402
from jaxssl.data.hf_tokenizer import HFTokenizer  # noqa: E402
from jaxssl.evaluate import main as evaluate_main  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from jaxssl.generate import generate  # noqa: E402
from test_convert_defaults import transformers4_llama_family  # noqa: E402  (tests/ is on sys.path)

REPO = os.path.join(os.path.dirname(__file__), '..')
ICL_TASKS = os.path.join(REPO, 'jaxssl', 'eval', 'icl_tasks')
T = gguf.MODEL_TENSOR
BOS, EOS = 1, 2
WORDS = ('the a of and to in is was for on with as by at it not but or film movie story plot acting cast '
         'quick brown fox jumps over lazy dog river city music great good bad boring dull wonderful loved '
         'hated review sentiment positive negative early late always never').split()
TEXTS = ['the quick brown fox jumps over the lazy dog', ' leading space', 'naïve café — 東京 🙂',
         'numbers 12345, symbols #$%!', 'tabs\tand\nnewlines']
# Llama 3.1-style scaling whose band edges fall between this model's frequencies (theta 1e4, head_dim 16): high,
# in-between and low frequencies all occur, so a wrong scaling shows in the logits.
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
               'original_max_position_embeddings': 64}


def corpus():
  """Random word strings plus the built-in sentiment task's texts (ICL prompts then stay short)."""
  rng = random.Random(0)
  lines = [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
  for name in ('sentiment_pool.jsonl', 'sentiment_test.jsonl'):
    with open(os.path.join(ICL_TASKS, name), encoding='utf-8') as f:
      lines += [json.loads(line)['input'] for line in f if line.strip()]
  return lines + TEXTS


# ----- a GGUF file as llama.cpp's convert_hf_to_gguf.py writes it (cf. tests/test_gguf.py) -----

def llama_cpp_permute(w, n_head):
  """llama.cpp's LlamaModel.permute of q/k rows (its RoPE rotates adjacent pairs)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(cfg):
  """The rope_freqs.weight llama.cpp's LlamaModel.generate_extra_tensors writes for llama3 rope scaling."""
  rs, dim = cfg.rope_parameters, cfg.head_dim
  freqs = 1.0 / (rs['rope_theta'] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
  old = rs['original_max_position_embeddings']
  low_wl, high_wl = old / rs['low_freq_factor'], old / rs['high_freq_factor']
  out = []
  for freq in freqs.tolist():
    wavelen = 2 * np.pi / freq
    smooth = (old / wavelen - rs['low_freq_factor']) / (rs['high_freq_factor'] - rs['low_freq_factor'])
    out.append(1 if wavelen < high_wl else rs['factor'] if wavelen > low_wl
               else 1 / ((1 - smooth) / rs['factor'] + smooth))
  return np.array(out, np.float32)


LLAMA_TOP = {'model.embed_tokens.weight': T.TOKEN_EMBD, 'model.norm.weight': T.OUTPUT_NORM,
             'lm_head.weight': T.OUTPUT}
LLAMA_LAYER = {'input_layernorm': T.ATTN_NORM, 'self_attn.q_proj': T.ATTN_Q, 'self_attn.k_proj': T.ATTN_K,
               'self_attn.v_proj': T.ATTN_V, 'self_attn.o_proj': T.ATTN_OUT, 'post_attention_layernorm': T.FFN_NORM,
               'mlp.gate_proj': T.FFN_GATE, 'mlp.up_proj': T.FFN_UP, 'mlp.down_proj': T.FFN_DOWN}


def write_llama_gguf(path, model, sp):
  """`model` (untied) as an F32 llama GGUF file with `sp`'s vocabulary (llama.cpp's _set_vocab_sentencepiece)."""
  cfg = model.config
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_vocab_size(cfg.vocab_size)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_block_count(cfg.num_hidden_layers)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(cfg.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_file_type(gguf.LlamaFileType.ALL_F32)
  tokens, scores, types = [], [], []
  for i in range(sp.vocab_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                 else gguf.TokenType.BYTE if sp.is_byte(i) else gguf.TokenType.NORMAL)
  w.add_tokenizer_model('llama')
  w.add_tokenizer_pre('default')
  w.add_token_list(tokens)
  w.add_token_scores(scores)
  w.add_token_types(types)
  w.add_bos_token_id(sp.bos_id())
  w.add_eos_token_id(sp.eos_id())
  w.add_unk_token_id(sp.unk_id())
  w.add_add_bos_token(True)
  w.add_add_eos_token(False)
  for name, t in model.state_dict().items():
    a = t.detach().numpy().astype(np.float32)
    if name in LLAMA_TOP:
      gname = gguf.TENSOR_NAMES[LLAMA_TOP[name]] + '.weight'
    else:
      _, _, bid, *module, suffix = name.split('.')
      gname = gguf.TENSOR_NAMES[LLAMA_LAYER['.'.join(module)]].format(bid=int(bid)) + '.' + suffix
    if name.endswith('q_proj.weight'):
      a = llama_cpp_permute(a, cfg.num_attention_heads)
    elif name.endswith('k_proj.weight'):
      a = llama_cpp_permute(a, cfg.num_key_value_heads)
    w.add_tensor(gname, np.ascontiguousarray(a))
  w.add_tensor(gguf.TENSOR_NAMES[T.ROPE_FREQS] + '.weight', llama_cpp_rope_freqs(cfg))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


# ----- fixtures -----

@pytest.fixture(scope='module')
def sp(tmp_path_factory):
  """A tiny sentencepiece BPE with byte fallback, configured as Llama's (unk 0, bos 1, eos 2)."""
  d = tmp_path_factory.mktemp('spm')
  (d / 'corpus.txt').write_text('\n'.join(corpus()) + '\n', encoding='utf-8')
  spm.SentencePieceTrainer.train(
      input=str(d / 'corpus.txt'), model_prefix=str(d / 'sp'), model_type='bpe', vocab_size=400,
      byte_fallback=True, character_coverage=1.0, normalization_rule_name='identity',
      remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=BOS, eos_id=EOS, pad_id=-1,
      minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(d / 'sp.model'))


OMIT = object()  # a tiny_llama keyword left to transformers' default


def tiny_llama(vocab_size, seed, model_type='llama', **kw):
  """A random LlamaForCausalLM (Qwen2ForCausalLM, MistralForCausalLM by `model_type`), float32, eager attention;
  initializer_range 0.1 so greedy decoding has no near-ties, norms away from 1 and random biases so a swapped or
  missed norm or bias would show. Keywords set to OMIT take the config class's default."""
  torch.manual_seed(seed)
  kw = {**dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=0.1, bos_token_id=BOS,
               eos_token_id=EOS, pad_token_id=None), **kw}
  cfg = transformers.AutoConfig.for_model(model_type, vocab_size=vocab_size, attn_implementation='eager',
                                          **{k: v for k, v in kw.items() if v is not OMIT})
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.uniform_(0.5, 1.5)
      elif name.endswith('bias'):
        p.normal_(0.0, 0.1)
  return model


@pytest.fixture(scope='module')
def hf_model(sp):
  # transformers adds rope_theta to the rope_scaling dict it is given: pass a copy.
  return tiny_llama(sp.vocab_size(), 0, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                    rope_scaling=dict(LLAMA3_ROPE))


@pytest.fixture(scope='module')
def gguf_path(hf_model, sp, tmp_path_factory):
  return write_llama_gguf(tmp_path_factory.mktemp('gguf') / 'model.gguf', hf_model, sp)


@pytest.fixture(scope='module')
def hf_dir(hf_model, gguf_path, tmp_path_factory):
  """A hub Llama directory: config.json, model.safetensors, tokenizer.json + tokenizer_config.json.

  The tokenizer files come from the GGUF route (tests/test_gguf.py checks them against sentencepiece):
  transformers 5's LlamaTokenizer(vocab_file=...) does not convert a sentencepiece model correctly.
  """
  d = tmp_path_factory.mktemp('llama')
  hf_model.save_pretrained(d)
  gguf_file.read_gguf(gguf_path).write_tokenizer(str(d))
  return str(d)


@pytest.fixture(scope='module')
def export(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'params')
  convert_main(['from-hf', '--src', hf_dir, '--out', out])
  return out


@pytest.fixture(scope='module')
def gguf_export(gguf_path, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv_gguf') / 'params')
  convert_main(['from-hf', '--src', gguf_path, '--out', out])
  return out


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def jax_logits(export_dir, ids):
  _, model, _ = load_export(export_dir)
  return np.asarray(model(ids))


def random_ids(vocab, seed):
  return np.random.default_rng(seed).integers(0, vocab, (2, 24))


# ----- tests -----

def test_import_matches_transformers_logits(hf_model, export):
  config, model, tokenizer = load_export(export)
  m = config.model
  assert (m.name, m.num_layers, m.num_heads, m.num_kv_heads, m.tie_embeddings) == ('gpt', 2, 4, 2, False)
  assert dict(m.rope_scaling) == LLAMA3_ROPE
  ids = random_ids(tokenizer.vocab_size, 1)
  np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf_model, ids), atol=1e-4, rtol=0)
  assert isinstance(tokenizer, HFTokenizer)
  assert tokenizer.bos_id == BOS and tokenizer.sep_id == EOS


def test_greedy_generation_matches_transformers(hf_model, export):
  prompts = ['the quick brown', 'a wonderful film with a moving story and']
  results = generate(export, prompts, max_new_tokens=8, greedy=True)
  tokenizer = tokenizers_lib.load_tokenizer(export)
  for prompt, r in zip(prompts, results):
    ids = torch.tensor([[BOS] + tokenizer.encode_one(prompt)])
    with torch.no_grad():  # one prompt at a time: no padding on the HF side
      ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                              eos_token_id=EOS, pad_token_id=EOS)[0, ids.shape[1]:].tolist()
    assert r['prompt_ids'] == ids[0].tolist() and r['prompt_ids'][0] == BOS
    assert r['generated_ids'] == ref[:len(r['generated_ids'])]  # HF stops at </s> too
    assert len(r['generated_ids']) == 8 or r['generated_ids'][-1] == EOS


def test_gguf_import_matches_hf_directory_import(hf_model, export, gguf_export):
  config, _, tokenizer = load_export(gguf_export)
  assert dict(config.model.rope_scaling) == LLAMA3_ROPE  # recovered from rope_freqs.weight
  ids = random_ids(tokenizer.vocab_size, 2)
  got = jax_logits(gguf_export, ids)
  np.testing.assert_allclose(got, hf_logits(hf_model, ids), atol=1e-4, rtol=0)
  np.testing.assert_allclose(got, jax_logits(export, ids), atol=1e-5, rtol=0)
  reference = tokenizers_lib.load_tokenizer(export)
  assert isinstance(tokenizer, HFTokenizer)
  assert (tokenizer.bos_id, tokenizer.sep_id, tokenizer.vocab_size) == (BOS, EOS, reference.vocab_size)
  for text in TEXTS:
    assert tokenizer.encode_one(text) == reference.encode_one(text), text


def test_tied_bfloat16_checkpoint(sp, hf_dir, tmp_path):
  """Tied embeddings (no separate head) and bfloat16 weights, read as float32."""
  model = tiny_llama(sp.vocab_size(), 1, num_key_value_heads=4, tie_word_embeddings=True)
  # The float32 model of the bf16-rounded weights (what the checkpoint holds). Not `model.float()` after the
  # cast: that would keep the RoPE inv_freq buffer rounded to bfloat16 too, which no checkpoint stores.
  rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
  src = tmp_path / 'bf16'
  model.to(torch.bfloat16).save_pretrained(src)
  model = tiny_llama(sp.vocab_size(), 1, num_key_value_heads=4, tie_word_embeddings=True)
  model.load_state_dict(rounded)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (src / name).write_bytes(open(os.path.join(hf_dir, name), 'rb').read())
  out = str(tmp_path / 'params')
  convert_main(['from-hf', '--src', str(src), '--out', out])
  config, jmodel, _ = load_export(out)
  assert config.model.tie_embeddings is True and config.model.rope_scaling is None
  ids = random_ids(sp.vocab_size(), 3)
  np.testing.assert_allclose(np.asarray(jmodel(ids)), hf_logits(model, ids), atol=1e-4, rtol=0)


def export_config_without_source(export_dir):
  with open(os.path.join(export_dir, 'config.json')) as f:
    config = json.load(f)
  del config['converted_from']
  return config


def hub_dir(model, path, tokenizer_dir, config=None):
  """`model` saved as a hub directory at `path` with the tokenizer files of `tokenizer_dir`; `config` (a dict)
  replaces the config.json transformers writes."""
  model.save_pretrained(path)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (path / name).write_bytes(open(os.path.join(tokenizer_dir, name), 'rb').read())
  if config is not None:
    (path / 'config.json').write_text(json.dumps(config, indent=2, sort_keys=True))
  return path


# (model_type, model keywords, how transformers 4 spelled the RoPE type; cf. transformers4_llama_family)
LAYOUT_CASES = {
    'llama3_scaling': ('llama', dict(num_key_value_heads=2, rope_theta=5e5, rope_scaling=dict(LLAMA3_ROPE)),
                       'rope_type'),
    'linear_scaling_before_4.45': ('llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 4.0},
                                                 tie_word_embeddings=True), 'type'),
    'linear_scaling': ('llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 4.0}), 'type+rope_type'),
    'no_scaling': ('llama', dict(rope_theta=5e5), 'rope_type'),
    'qwen2': ('qwen2', dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True), 'rope_type'),
    'qwen3': ('qwen3', dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=True, head_dim=32),
              'rope_type'),
    'mistral': ('mistral', dict(num_key_value_heads=2, rope_theta=1e6, sliding_window=None), 'rope_type'),
}


@pytest.mark.parametrize('case', list(LAYOUT_CASES))
def test_transformers4_and_5_config_layouts_import_the_same(case, sp, hf_dir, tmp_path):
  """The same weights with config.json as transformers 5 writes it (rope_parameters, dtype) and as 4 wrote it
  (rope_theta, rope_scaling, torch_dtype): the same jaxssl config and the same logits, transformers' own."""
  model_type, kw, rope_key = LAYOUT_CASES[case]
  model = tiny_llama(sp.vocab_size(), 7, model_type=model_type, **copy.deepcopy(kw))  # transformers edits RoPE dicts
  v5 = hub_dir(model, tmp_path / 'v5', hf_dir)
  written = json.loads((v5 / 'config.json').read_text())
  assert 'rope_parameters' in written and 'dtype' in written and 'rope_theta' not in written
  v4_config = transformers4_llama_family(written, rope_key)
  if model_type in ('qwen2', 'qwen3'):  # 4.x Qwen configs kept the window they did not use (Qwen2.5: 32768)
    v4_config.update(sliding_window=128, use_sliding_window=False)
  v4 = hub_dir(model, tmp_path / 'v4', hf_dir, v4_config)
  ids = random_ids(sp.vocab_size(), 5)
  want = hf_logits(model, ids)
  hf_v4 = transformers.AutoModelForCausalLM.from_pretrained(v4, attn_implementation='eager').eval()
  np.testing.assert_array_equal(hf_logits(hf_v4, ids), want)  # transformers reads the 4.x file as this model
  exports = {}
  for name, src in (('v4', v4), ('v5', v5)):
    exports[name] = str(tmp_path / f'params_{name}')
    convert_main(['from-hf', '--src', str(src), '--out', exports[name]])
  config = export_config_without_source(exports['v4'])
  assert config == export_config_without_source(exports['v5'])
  m = config['model']
  rope = written['rope_parameters']
  assert m['rope_theta'] == rope['rope_theta'] and m['tie_embeddings'] == model.config.tie_word_embeddings
  assert m['rope_scaling'] == (None if rope['rope_type'] == 'default' else
                               {k: v for k, v in rope.items() if k not in ('rope_theta', 'type')})
  got = jax_logits(exports['v4'], ids)
  np.testing.assert_array_equal(got, jax_logits(exports['v5'], ids))
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize('model_type', ['llama', 'mistral', 'qwen2', 'qwen3'])
def test_omitted_config_keys_take_the_model_types_defaults(model_type, sp, hf_dir, tmp_path):
  """config.json without head_dim, num_key_value_heads, tie_word_embeddings, max_position_embeddings and RoPE
  keys (older or hand-made files): read as transformers reads it, with that model type's defaults (Mistral: 8 kv
  heads, 131072 positions; Qwen2: 32 kv heads, 32768 positions, no sliding window; Qwen3: Qwen2's, and head_dim
  128 whatever the width)."""
  heads = {'llama': 4, 'mistral': 8, 'qwen2': 32, 'qwen3': 32}[model_type]  # divisible by each type's default kv heads
  extra = dict(sliding_window=None) if model_type == 'mistral' else {}
  model = tiny_llama(sp.vocab_size(), 8, model_type=model_type, num_attention_heads=heads,
                     max_position_embeddings=OMIT, **extra)
  written = json.loads((hub_dir(model, tmp_path / 'full', hf_dir) / 'config.json').read_text())
  omitted = {'head_dim', 'num_key_value_heads', 'tie_word_embeddings', 'max_position_embeddings', 'rope_parameters',
             'use_sliding_window', 'layer_types', 'max_window_layers'}
  if model_type in ('qwen2', 'qwen3'):  # Mistral's must stay null: its default (4096) would limit attention
    omitted.add('sliding_window')
  src = hub_dir(model, tmp_path / 'src', hf_dir, {k: v for k, v in written.items() if k not in omitted})
  reference = transformers.AutoConfig.from_pretrained(src)
  out = str(tmp_path / 'params')
  convert_main(['from-hf', '--src', str(src), '--out', out])
  m = export_config_without_source(out)['model']
  assert (m['max_position'], m['num_kv_heads'], m['tie_embeddings'], m['rope_theta']) == (
      reference.max_position_embeddings, reference.num_key_value_heads, reference.tie_word_embeddings,
      reference.rope_parameters['rope_theta'])
  assert m['max_position'] == {'llama': 2048, 'mistral': 131072, 'qwen2': 32768, 'qwen3': 32768}[model_type]
  assert (m['head_dim'] or m['hidden_size'] // m['num_heads']) == getattr(
      reference, 'head_dim', reference.hidden_size // reference.num_attention_heads)  # Qwen2Config has none
  ids = random_ids(sp.vocab_size(), 6)
  hf = transformers.AutoModelForCausalLM.from_pretrained(src, attn_implementation='eager').eval()
  np.testing.assert_allclose(jax_logits(out, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_pytorch_bin_without_torch_is_a_one_line_error(hf_model, hf_dir, tmp_path):
  """A pytorch_model.bin-only directory: read with torch; without it, exit 2 and one line saying how to convert."""
  src = tmp_path / 'bin_only'
  src.mkdir()
  for name in ('config.json', 'tokenizer.json', 'tokenizer_config.json'):
    (src / name).write_bytes(open(os.path.join(hf_dir, name), 'rb').read())
  torch.save(hf_model.state_dict(), src / 'pytorch_model.bin')
  from jaxssl.convert import decoder
  from_bin, whole = decoder.read_hf_weights(str(src)), decoder.read_hf_weights(hf_dir)
  assert from_bin.keys() == whole.keys() and all(np.array_equal(from_bin[k], whole[k]) for k in whole)
  no_torch = tmp_path / 'no_torch'
  no_torch.mkdir()
  (no_torch / 'sitecustomize.py').write_text("import sys\nsys.modules['torch'] = None  # import torch fails\n")
  out = tmp_path / 'out'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': os.pathsep.join([str(no_torch), os.path.abspath(REPO)])}
  proc = subprocess.run([sys.executable, '-m', 'jaxssl.convert', 'from-hf', '--src', str(src), '--out', str(out)],
                        cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error:'), proc.stderr
  assert 'pip install torch' in lines[0] and 'torch is not installed' in lines[0]
  assert (f'from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained({str(src)!r})'
          f'.save_pretrained({str(src)!r})') in lines[0]
  assert not out.exists()


def test_to_hf_round_trip(hf_model, export, tmp_path):
  out = str(tmp_path / 'hf')
  convert_main(['to-hf', '--src', export, '--out', out])
  with open(os.path.join(out, 'config.json')) as f:
    written = json.load(f)
  assert (written['bos_token_id'], written['eos_token_id']) == (BOS, EOS)
  back = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  ids = random_ids(hf_model.config.vocab_size, 4)
  np.testing.assert_allclose(hf_logits(back, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizers_lib.load_tokenizer(export)
  assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
  for text in TEXTS:
    assert tok(text)['input_ids'] == [BOS] + ours.encode_one(text), text


def test_icl_runs_on_imported_model(export, tmp_path):
  out = tmp_path / 'icl' / 'results.json'
  evaluate_main(['--config', os.path.join(REPO, 'configs', 'icl.py') + ':sentiment',
                 f'--config.icl.models={export}', '--config.icl.shots=0,1', '--config.icl.max_queries=4',
                 '--out', str(out)])
  report = json.loads(out.read_text())
  assert report['shots'] == [0, 1] and report['num_queries'] == 4 and len(report['models']) == 1
  (result,) = report['models'].values()
  assert result['path'] == export
  assert set(result['accuracy']) == {'0', '1'} and all(0 <= a <= 1 for a in result['accuracy'].values())


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
  src = tmp_path / 'x.gguf'
  src.write_text('this is a text file, not a model\n')
  out = tmp_path / 'out'
  proc = subprocess.run([sys.executable, '-m', 'jaxssl.convert', 'from-hf', '--src', str(src), '--out', str(out)],
                        cwd=REPO, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                        timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'not a GGUF file' in lines[0] and str(src) in lines[0], proc.stderr
  assert not out.exists()

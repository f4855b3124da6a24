"""Qwen3 checkpoints <-> jaxssl exports through `python -m jaxssl.convert`, against transformers itself.

Qwen3 is Llama's layout without biases plus an RMSNorm of each query and key head before RoPE, and a head_dim of
its own (Qwen3-0.6B: 16 heads of 128 in a 1024-wide model). A random Qwen3ForCausalLM with those traits (heads
of 128 in a 64-wide model, GQA, norms away from 1) and a byte-level BPE trained here is saved as the hub saves it and
written as llama.cpp's converter writes a 'qwen3' .gguf; both imports must give transformers' logits and greedy
tokens, and to-hf must give back a directory transformers opens as the same model.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')

from jaxssl.convert import gguf_file  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.generate import generate  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_llama import hf_logits, jax_logits  # noqa: E402
from test_gguf import (LLAMA_LAYER, LLAMA_TOP, SENTENCES, bpe, bpe_vocab_kv, numpy_state_dict,  # noqa: E402,F401
                       transformers_gguf_model, write_gguf)  # bpe: test_gguf's byte-level BPE fixture

REPO = os.path.join(os.path.dirname(__file__), '..')
T = gguf.MODEL_TENSOR
Q8_0 = gguf.GGMLQuantizationType.Q8_0
GGUF_LAYER = {**LLAMA_LAYER, 'self_attn.q_norm': T.ATTN_Q_NORM, 'self_attn.k_norm': T.ATTN_K_NORM}
# Not hidden_size / heads (16): Qwen3's own default, which the released models keep whatever their width.
# (transformers' GGUF loader ignores attention.key_length for qwen3 and takes this default.)
HEAD_DIM = 128


def tiny_qwen3(vocab_size, seed, **kw):
  """A random Qwen3ForCausalLM, float32, eager attention; every norm (q/k norms too) drawn away from 1, so a
  dropped or swapped norm shows; initializer_range 0.1 so greedy decoding has no near-ties."""
  torch.manual_seed(seed)
  cfg = transformers.Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM, rms_norm_eps=1e-6,
                                 rope_theta=1e6, max_position_embeddings=256, initializer_range=0.1,
                                 attn_implementation='eager', **kw)
  model = transformers.Qwen3ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.uniform_(0.5, 1.5)
  return model


def write_qwen3_gguf(path, model, bpe, qtype=None):
  """`model` as llama.cpp's Qwen3Model converter writes it: HF's q/k rows as they are (no RoPE permutation),
  head_dim as key/value length, Qwen's vocabulary metadata (pre 'qwen2', <|endoftext|> for BOS/EOS/padding)."""
  cfg = model.config
  tokens, vocab_kv = bpe_vocab_kv(bpe, 'qwen2')
  eot = tokens.index('<|endoftext|>')
  kv = [('add_context_length', cfg.max_position_embeddings), ('add_embedding_length', cfg.hidden_size),
        ('add_block_count', cfg.num_hidden_layers), ('add_feed_forward_length', cfg.intermediate_size),
        ('add_head_count', cfg.num_attention_heads), ('add_head_count_kv', cfg.num_key_value_heads),
        ('add_key_length', cfg.head_dim), ('add_value_length', cfg.head_dim),
        ('add_rope_freq_base', cfg.rope_parameters['rope_theta']), ('add_layer_norm_rms_eps', cfg.rms_norm_eps),
        ('add_file_type', gguf.LlamaFileType.ALL_F32)]
  kv += vocab_kv + [('add_bos_token_id', eot), ('add_eos_token_id', eot), ('add_pad_token_id', eot),
                    ('add_add_bos_token', False)]
  tensors = {}
  for name, a in numpy_state_dict(model).items():
    if name == 'lm_head.weight' and cfg.tie_word_embeddings:
      continue
    if name in LLAMA_TOP:
      gname = gguf.TENSOR_NAMES[LLAMA_TOP[name]] + '.weight'
    else:
      _, _, bid, *module, suffix = name.split('.')
      gname = gguf.TENSOR_NAMES[GGUF_LAYER['.'.join(module)]].format(bid=int(bid)) + '.' + suffix
    tensors[gname] = (gguf.quants.quantize(a, qtype), qtype) if qtype is not None and a.ndim == 2 else a
  return write_gguf(path, 'qwen3', kv, tensors)


@pytest.fixture(scope='module')
def qwen3(bpe, tmp_path_factory):
  """(HF model, hub-style directory, .gguf path): tied embeddings (Qwen3-0.6B's), F32."""
  model = tiny_qwen3(bpe.get_vocab_size(), 0, tie_word_embeddings=True)
  d = tmp_path_factory.mktemp('qwen3')
  path = write_qwen3_gguf(d / 'qwen3.gguf', model, bpe)
  hub = d / 'hub'
  model.save_pretrained(hub)
  gguf_file.read_gguf(path).write_tokenizer(str(hub))  # tokenizer.json + tokenizer_config.json
  return model, str(hub), path


@pytest.fixture(scope='module')
def export(qwen3, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'params')
  convert_main(['from-hf', '--src', qwen3[1], '--out', out])
  return out


def ids_of(bpe, n=2):
  return np.array([bpe.encode(s).ids[:12] for s in SENTENCES[:n]])


def test_hub_directory_import_matches_transformers(qwen3, export, bpe):
  model, _, _ = qwen3
  m = load_export(export)[0].model
  assert (m.qk_norm, m.head_dim, m.num_heads, m.num_kv_heads, m.use_bias, m.attention_bias, m.tie_embeddings) == (
      True, HEAD_DIM, 4, 2, False, False, True)
  ids = ids_of(bpe)
  np.testing.assert_allclose(jax_logits(export, ids), hf_logits(model, ids), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(qwen3, export, bpe):
  model, _, _ = qwen3
  prompts = [SENTENCES[0], SENTENCES[3]]
  results = generate(export, prompts, max_new_tokens=8, greedy=True)
  for prompt, r in zip(prompts, results):
    ids = torch.tensor([bpe.encode(prompt).ids])  # Qwen adds no BOS
    with torch.no_grad():
      ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                           eos_token_id=-1, pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert r['prompt_ids'] == ids[0].tolist()
    assert r['generated_ids'] == ref[:len(r['generated_ids'])] and len(r['generated_ids']) >= 1


def test_gguf_imports_match_transformers_gguf_loader(qwen3, bpe, tmp_path):
  """The F32 tied file and an untied Q8_0 one: read_gguf's tensors equal transformers' own GGUF loader's, and the
  jaxssl import of each gives that model's logits."""
  untied = tiny_qwen3(bpe.get_vocab_size(), 1, tie_word_embeddings=False)
  q8 = write_qwen3_gguf(tmp_path / 'q8.gguf', untied, bpe, qtype=Q8_0)
  ids = ids_of(bpe)
  for i, path in enumerate((qwen3[2], q8)):
    ck = gguf_file.read_gguf(path)
    assert ck.hf_config['model_type'] == 'qwen3' and ck.hf_config['head_dim'] == HEAD_DIM
    ref = transformers_gguf_model(path)
    assert isinstance(ref, transformers.Qwen3ForCausalLM)
    ref_sd = numpy_state_dict(ref)
    for k, a in ck.state_dict.items():
      np.testing.assert_array_equal(a, ref_sd[k], err_msg=k)
    out = str(tmp_path / f'params_{i}')
    convert_main(['from-hf', '--src', path, '--out', out])
    np.testing.assert_allclose(jax_logits(out, ids), hf_logits(ref, ids), atol=1e-4, rtol=0)


def test_to_hf_round_trip(qwen3, export, bpe, tmp_path):
  """to-hf writes Qwen3ForCausalLM; transformers opens it as the original model (same tensors, same logits)."""
  model, _, _ = qwen3
  out = tmp_path / 'hf'
  convert_main(['to-hf', '--src', export, '--out', str(out)])
  written = json.loads((out / 'config.json').read_text())
  assert written['model_type'] == 'qwen3' and written['architectures'] == ['Qwen3ForCausalLM']
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  want = numpy_state_dict(model)
  got = numpy_state_dict(back)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  ids = ids_of(bpe)
  np.testing.assert_array_equal(hf_logits(back, ids), hf_logits(model, ids))


def test_attention_biases_are_a_one_line_error(qwen3, tmp_path):
  """Qwen3's attention_bias puts biases on o_proj too, which jaxssl's layouts do not hold: exit 2, one line."""
  _, hub, _ = qwen3
  src = tmp_path / 'biased'
  model = tiny_qwen3(400, 2, attention_bias=True)
  model.save_pretrained(src)
  for name in ('tokenizer.json', 'tokenizer_config.json'):
    (src / name).write_bytes(open(f'{hub}/{name}', 'rb').read())
  proc = subprocess.run([sys.executable, '-m', 'jaxssl.convert', 'from-hf', '--src', str(src), '--out',
                         str(tmp_path / 'out')], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': os.path.abspath(REPO)})
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'attention_bias=true' in lines[0], proc.stderr
  assert not (tmp_path / 'out').exists()

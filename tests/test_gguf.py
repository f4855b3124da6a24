"""GGUF (llama.cpp) files -> HF form (jaxssl/convert/gguf_file.py), against transformers, sentencepiece and
tokenizers themselves: tiny random models and tokenizers are written as llama.cpp's convert_hf_to_gguf.py writes
them, read back, and compared with the originals (and with transformers' own GGUF loader where it can)."""
import json
import os
import random

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')
spm = pytest.importorskip('sentencepiece')
tokenizers = pytest.importorskip('tokenizers')

from jaxssl.convert import gguf_file  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

T = gguf.MODEL_TENSOR
Q8_0 = gguf.GGMLQuantizationType.Q8_0
WORDS = ('the a of and to in is was for on with as by at from this that it he she they we you not but or an '
         'quick brown fox jumps over lazy dog river mountain city music paper window garden market teacher '
         'running walked talking seventeen hundred model token layer weights number letter summer winter '
         'yellow green purple orange silver gold north south east west early late always never').split()
# Test text: spaces leading / repeated / trailing, words never seen in training, punctuation, digits, and
# characters outside the vocabulary (byte fallback for sentencepiece, raw bytes for byte-level BPE).
SENTENCES = [
    'the quick brown fox jumps over the lazy dog',
    'The Quick Brown Fox.',
    ' leading space',
    '   three leading spaces',
    'double  space and   triple',
    'trailing space ',
    'seventeen hundred and 42 models, 3.14 tokens!',
    'unseen words: zyxwv qqq jjj',
    'naïve café résumé',
    'emoji 🙂 and 🚀 rocket',
    '漢字とかな',
    'Ünïcödé ñ ß ø å',
    'tabs\tand\nnewlines',
    'a',
    'x',
    'summer<sep>winter',
    "it's don't we'll",
    'model.layer[0].weights = 0xFF',
    '  ',
    'mixed   spaces\t\ttabs  end  ',
]


def corpus(n=400, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def llama_cpp_permute(w, n_head):
  """llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py), which gguf_file must undo."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_rope_freqs(cfg):
  """The rope_freqs.weight llama.cpp's LlamaModel.generate_extra_tensors writes for llama3 rope scaling."""
  rs, base, dim = cfg.rope_parameters, cfg.rope_parameters['rope_theta'], cfg.head_dim
  freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
  low_wl = rs['original_max_position_embeddings'] / rs['low_freq_factor']
  high_wl = rs['original_max_position_embeddings'] / rs['high_freq_factor']
  out = []
  for freq in freqs.tolist():
    wavelen = 2 * np.pi / freq
    if wavelen < high_wl:
      out.append(1)
    elif wavelen > low_wl:
      out.append(rs['factor'])
    else:
      smooth = ((rs['original_max_position_embeddings'] / wavelen - rs['low_freq_factor'])
                / (rs['high_freq_factor'] - rs['low_freq_factor']))
      out.append(1 / ((1 - smooth) / rs['factor'] + smooth))
  return np.array(out, np.float32)


def write_gguf(path, arch, kv, tensors):
  """A GGUF file: `kv` is [(GGUFWriter method name, value)], `tensors` {name: array or (bytes, qtype)}; float
  arrays are written as F32, others as their own type."""
  w = gguf.GGUFWriter(str(path), arch)
  for method, value in kv:
    getattr(w, method)(value)
  for name, t in tensors.items():
    if isinstance(t, tuple):
      w.add_tensor(name, t[0], raw_dtype=t[1])
    else:
      w.add_tensor(name, np.ascontiguousarray(t, np.float32 if t.dtype.kind == 'f' else t.dtype))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def numpy_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------- Llama side


@pytest.fixture(scope='module')
def sp(tmp_path_factory):
  """A tiny sentencepiece BPE with byte fallback, configured as Llama's (no normalisation, spaces kept)."""
  d = tmp_path_factory.mktemp('spm')
  with open(d / 'corpus.txt', 'w') as f:
    f.write('\n'.join(corpus()) + '\n')
  spm.SentencePieceTrainer.train(
      input=str(d / 'corpus.txt'), model_prefix=str(d / 'sp'), model_type='bpe', vocab_size=360,
      byte_fallback=True, character_coverage=1.0, normalization_rule_name='identity',
      remove_extra_whitespaces=False, add_dummy_prefix=True, user_defined_symbols=['<sep>'],
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(d / 'sp.model'))


def sp_vocab_kv(sp):
  """Tokenizer metadata as llama.cpp's _set_vocab_sentencepiece writes it."""
  tokens, scores, types = [], [], []
  for i in range(sp.vocab_size()):
    tokens.append(sp.id_to_piece(i))
    scores.append(sp.get_score(i))
    types.append(gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
                 else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
                 else gguf.TokenType.USER_DEFINED if tokens[-1] == '<sep>' else gguf.TokenType.NORMAL)
  return [('add_tokenizer_model', 'llama'), ('add_tokenizer_pre', 'default'), ('add_token_list', tokens),
          ('add_token_scores', scores), ('add_token_types', types), ('add_bos_token_id', sp.bos_id()),
          ('add_eos_token_id', sp.eos_id()), ('add_unk_token_id', sp.unk_id()), ('add_add_bos_token', True),
          ('add_add_eos_token', False)]


LLAMA_TOP = {'model.embed_tokens.weight': T.TOKEN_EMBD, 'model.norm.weight': T.OUTPUT_NORM,
             'lm_head.weight': T.OUTPUT}
LLAMA_LAYER = {'input_layernorm': T.ATTN_NORM, 'self_attn.q_proj': T.ATTN_Q, 'self_attn.k_proj': T.ATTN_K,
               'self_attn.v_proj': T.ATTN_V, 'self_attn.o_proj': T.ATTN_OUT, 'post_attention_layernorm': T.FFN_NORM,
               'mlp.gate_proj': T.FFN_GATE, 'mlp.up_proj': T.FFN_UP, 'mlp.down_proj': T.FFN_DOWN}


def llama_gguf_tensors(model, qtype=None, permute=True):
  """HF Llama (or Qwen2) tensors under llama.cpp's names, q/k permuted as its LlamaModel converter does (not for
  Qwen2: its Qwen2Model converter keeps HF's rows); 2-D ones as `qtype`."""
  cfg, out = model.config, {}
  for name, a in numpy_state_dict(model).items():
    if name == 'lm_head.weight' and cfg.tie_word_embeddings:
      continue  # a tied checkpoint has no lm_head in its safetensors
    if name in LLAMA_TOP:
      gname = gguf.TENSOR_NAMES[LLAMA_TOP[name]] + '.weight'
    else:
      _, _, bid, *module, suffix = name.split('.')
      gname = gguf.TENSOR_NAMES[LLAMA_LAYER['.'.join(module)]].format(bid=int(bid)) + '.' + suffix
    if permute and name.endswith('q_proj.weight'):
      a = llama_cpp_permute(a, cfg.num_attention_heads)
    elif permute and name.endswith('k_proj.weight'):
      a = llama_cpp_permute(a, cfg.num_key_value_heads)
    out[gname] = (gguf.quants.quantize(a, qtype), qtype) if qtype is not None and a.ndim == 2 else a
  if cfg.rope_parameters.get('rope_type') == 'llama3':
    out[gguf.TENSOR_NAMES[T.ROPE_FREQS] + '.weight'] = llama_cpp_rope_freqs(cfg)
  return out


def llama_kv(cfg):
  """Hyperparameters as llama.cpp's LlamaModel.set_gguf_parameters writes them."""
  return [('add_vocab_size', cfg.vocab_size), ('add_context_length', cfg.max_position_embeddings),
          ('add_embedding_length', cfg.hidden_size), ('add_block_count', cfg.num_hidden_layers),
          ('add_feed_forward_length', cfg.intermediate_size), ('add_head_count', cfg.num_attention_heads),
          ('add_head_count_kv', cfg.num_key_value_heads), ('add_rope_freq_base', cfg.rope_parameters['rope_theta']),
          ('add_layer_norm_rms_eps', cfg.rms_norm_eps), ('add_rope_dimension_count', cfg.head_dim),
          ('add_file_type', gguf.LlamaFileType.ALL_F32)]


def tiny_llama(vocab_size, seed, **kw):
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, **kw)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # norms away from 1 so a swapped norm would show
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.uniform_(0.5, 1.5)
  return model


# Llama 3.1-style RoPE scaling with non-published constants and 2 in-between frequencies, so the constants must
# be recovered from the rope_freqs tensor (not guessed).
LLAMA3_ROPE = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 32.0,
               'original_max_position_embeddings': 8192}


@pytest.fixture(scope='module')
def llama(sp, tmp_path_factory):
  """(HF model, GGUF path): untied, Llama 3 RoPE scaling (rope_freqs tensor), F32."""
  model = tiny_llama(sp.vocab_size(), 0, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                     rope_scaling=dict(LLAMA3_ROPE))
  path = tmp_path_factory.mktemp('llama') / 'model.gguf'
  return model, write_gguf(path, 'llama', llama_kv(model.config) + sp_vocab_kv(sp), llama_gguf_tensors(model))


@pytest.fixture(scope='module')
def llama_q8(sp, tmp_path_factory):
  """(HF model, GGUF path): tied embeddings, plain RoPE, 2-D weights quantised to Q8_0 (norms stay F32)."""
  model = tiny_llama(sp.vocab_size(), 1, max_position_embeddings=256, tie_word_embeddings=True)
  path = tmp_path_factory.mktemp('llama_q8') / 'model.gguf'
  return model, write_gguf(path, 'llama', llama_kv(model.config) + sp_vocab_kv(sp),
                           llama_gguf_tensors(model, qtype=Q8_0))


def hf_from_checkpoint(ck):
  """A transformers model built from read_gguf's config and state dict alone."""
  config = dict(ck.hf_config)
  model = transformers.AutoModelForCausalLM.from_config(
      transformers.AutoConfig.for_model(config.pop('model_type'), **config)).eval()
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in ck.state_dict.items()},
                                              strict=False)
  assert not unexpected
  assert set(missing) <= {'lm_head.weight'} and (not missing or ck.hf_config['tie_word_embeddings'])
  model.tie_weights()
  return model


def logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor([ids])).logits[0].numpy()


def test_llama_state_dict_equals_hf(llama):
  model, path = llama
  ck = gguf_file.read_gguf(path)
  want = numpy_state_dict(model)
  assert set(ck.state_dict) == set(want)
  for name, a in want.items():
    assert ck.state_dict[name].dtype == np.float32 and ck.state_dict[name].shape == a.shape, name
    np.testing.assert_array_equal(ck.state_dict[name], a, err_msg=name)


def test_llama_config_and_logits(llama, sp):
  model, path = llama
  ck = gguf_file.read_gguf(path)
  cfg = ck.hf_config
  assert cfg['model_type'] == 'llama' and cfg['architectures'] == ['LlamaForCausalLM']
  assert (cfg['vocab_size'], cfg['hidden_size'], cfg['intermediate_size'], cfg['num_hidden_layers'],
          cfg['num_attention_heads'], cfg['num_key_value_heads']) == (sp.vocab_size(), 64, 96, 2, 4, 2)
  assert cfg['rms_norm_eps'] == 1e-5 and cfg['rope_theta'] == 500000.0 and cfg['max_position_embeddings'] == 131072
  assert cfg['tie_word_embeddings'] is False and cfg['hidden_act'] == 'silu'
  assert cfg['rope_scaling'] == LLAMA3_ROPE  # recovered from rope_freqs.weight
  assert cfg['bos_token_id'] == sp.bos_id() and cfg['eos_token_id'] == sp.eos_id()
  rebuilt = hf_from_checkpoint(ck)
  np.testing.assert_array_equal(rebuilt.model.rotary_emb.inv_freq.numpy(), model.model.rotary_emb.inv_freq.numpy())
  ids = sp.encode(SENTENCES[0] + ' ' + SENTENCES[6])
  np.testing.assert_allclose(logits(rebuilt, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_llama_q8_0_within_quantisation_error(llama_q8):
  model, path = llama_q8
  ck = gguf_file.read_gguf(path)
  assert ck.hf_config['tie_word_embeddings'] is True and ck.hf_config['rope_scaling'] is None
  want = numpy_state_dict(model)
  want.pop('lm_head.weight')  # tied: not in the file, not in the state dict
  assert set(ck.state_dict) == set(want)
  for name, a in want.items():
    got = ck.state_dict[name]
    assert got.dtype == np.float32 and got.shape == a.shape, name
    if a.ndim == 1:
      np.testing.assert_array_equal(got, a, err_msg=name)
    else:  # Q8_0: blocks of 32 with one f16 scale d = max|x|/127: error <= d/2 + 127 * d * 2**-11 (f16 d)
      step = np.abs(a).reshape(-1, 32).max(axis=1, keepdims=True) / 127
      err = np.abs(got - a).reshape(-1, 32)
      assert np.all(err <= 0.57 * step), name
      assert not np.array_equal(got, a), name  # it really was quantised
  rebuilt = hf_from_checkpoint(ck)
  ids = list(range(5, 40))
  np.testing.assert_allclose(logits(rebuilt, ids), logits(model, ids), rtol=0, atol=5e-2)


def sp_encode(sp, text):
  """sentencepiece's ids, except that text after a user-defined/control token starts a new piece with its own
  '▁' prefix, as llama.cpp (and HF's Llama 2 tokenizer.json) tokenize it."""
  first, sep, rest = text.partition('<sep>')
  return sp.encode(first) + ([sp.piece_to_id('<sep>')] + sp_encode(sp, rest) if sep else [])


def test_llama_tokenizer_matches_sentencepiece(llama, sp, tmp_path):
  _, path = llama
  ck = gguf_file.read_gguf(path)
  tok = ck.tokenizer
  assert tok.get_vocab_size(with_added_tokens=True) == sp.vocab_size()
  for s in SENTENCES:
    want = sp_encode(sp, s)
    assert tok.encode(s, add_special_tokens=False).ids == want, s
    assert tok.encode(s).ids == [sp.bos_id()] + want, s  # add_bos_token: the post-processor adds <s>
    assert tok.decode(want) == sp.decode(want), s
  assert any(sp.is_byte(i) for s in SENTENCES for i in sp.encode(s))  # byte fallback was exercised
  ck.write_tokenizer(str(tmp_path))
  config = json.load(open(tmp_path / 'tokenizer_config.json'))
  assert (config['bos_token'], config['eos_token'], config['unk_token']) == ('<s>', '</s>', '<unk>')
  assert config['add_bos_token'] is True and 'pad_token' not in config
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for s in SENTENCES:
    assert hf_tok(s)['input_ids'] == [sp.bos_id()] + sp_encode(sp, s), s


def transformers_gguf_model(path):
  """The model transformers' own GGUF loader makes of `path`: its config and tensor mapping/un-permutation.
  (Its from_pretrained(gguf_file=...) wants `accelerate` only to place weights; this is the same loader.)"""
  from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
  d, name = os.path.split(path)
  model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(d, gguf_file=name))
  tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)['tensors']
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  assert not unexpected and set(missing) <= {'lm_head.weight'}
  model.tie_weights()
  return model.float().eval()


def test_llama_against_transformers_gguf_loader(llama_q8, sp):
  """transformers' GGUF loader as an independent reference (its own config mapping, q/k un-permutation and
  tokenizer rebuild; the dequantisation is the gguf package's in both)."""
  _, path = llama_q8
  ck = gguf_file.read_gguf(path)
  d, name = os.path.split(path)
  ref = transformers_gguf_model(path)
  ref_sd = numpy_state_dict(ref)
  for k, a in ck.state_dict.items():
    np.testing.assert_array_equal(a, ref_sd[k], err_msg=k)
  ids = sp.encode(SENTENCES[0])
  np.testing.assert_allclose(logits(hf_from_checkpoint(ck), ids), logits(ref, ids), rtol=0, atol=1e-5)
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  # transformers builds HF's Metaspace(prepend_scheme='first'), which differs from sentencepiece for text that
  # starts with a space (no '▁' prefix) and from llama.cpp after an added token (no '▁' there); ours follows
  # sentencepiece for the first (test above) and llama.cpp for the second.
  compared = [s for s in SENTENCES if not s.startswith(' ') and '<sep>' not in s]
  assert len(compared) >= 15
  for s in compared:
    assert ref_tok(s)['input_ids'] == ck.tokenizer.encode(s).ids, s


# --------------------------------------------------------------------------------------------------- GPT-2 side


@pytest.fixture(scope='module')
def bpe():
  """A tiny byte-level BPE trained with `tokenizers` (GPT-2 style, <|endoftext|> special)."""
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(corpus(seed=1), vocab_size=400, min_frequency=1, special_tokens=['<|endoftext|>'],
                          show_progress=False)
  return tok


GPT2_NAMES = {'wte': T.TOKEN_EMBD, 'wpe': T.POS_EMBD, 'ln_f': T.OUTPUT_NORM, 'ln_1': T.ATTN_NORM,
              'attn.c_attn': T.ATTN_QKV, 'attn.c_proj': T.ATTN_OUT, 'ln_2': T.FFN_NORM, 'mlp.c_fc': T.FFN_UP,
              'mlp.c_proj': T.FFN_DOWN}


@pytest.fixture(scope='module')
def gpt2(bpe, tmp_path_factory):
  """(HF model, GGUF path) written as llama.cpp's GPT2Model does (Conv1D weights transposed to (out, in))."""
  torch.manual_seed(2)
  cfg = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                n_inner=96, layer_norm_epsilon=1e-5)
  model = transformers.GPT2LMHeadModel(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'ln' in name:
        p.uniform_(0.5, 1.5)
  tensors = {}
  for name, a in numpy_state_dict(model).items():
    if name == 'lm_head.weight' or name.endswith(('.attn.bias', '.attn.masked_bias')):
      continue  # tied (absent from the safetensors) / buffers llama.cpp drops
    parts = name.split('.')[1:]
    if parts[0] == 'h':
      bid, module, suffix = int(parts[1]), '.'.join(parts[2:-1]), parts[-1]
      gname = gguf.TENSOR_NAMES[GPT2_NAMES[module]].format(bid=bid) + '.' + suffix
    else:
      gname = gguf.TENSOR_NAMES[GPT2_NAMES[parts[0]]] + '.' + parts[-1]
    if name.endswith(('.c_attn.weight', '.c_proj.weight', '.c_fc.weight')):
      a = a.T
    tensors[gname] = a
  tokens, vocab_kv = bpe_vocab_kv(bpe, 'gpt-2')
  eot = tokens.index('<|endoftext|>')
  kv = [('add_block_count', 2), ('add_context_length', 64), ('add_embedding_length', 64),
        ('add_feed_forward_length', 4 * 64), ('add_head_count', 4), ('add_layer_norm_eps', 1e-5)] + vocab_kv
  kv += [('add_bos_token_id', eot), ('add_eos_token_id', eot), ('add_unk_token_id', eot)]
  path = tmp_path_factory.mktemp('gpt2') / 'gpt2.gguf'
  return model, write_gguf(path, 'gpt2', kv, tensors)


def test_gpt2_state_dict_config_and_logits(gpt2):
  model, path = gpt2
  ck = gguf_file.read_gguf(path)
  want = {k: v for k, v in numpy_state_dict(model).items()
          if k != 'lm_head.weight' and not k.endswith(('.attn.bias', '.attn.masked_bias'))}
  assert set(ck.state_dict) == set(want)
  for name, a in want.items():
    assert ck.state_dict[name].dtype == np.float32
    np.testing.assert_array_equal(ck.state_dict[name], a, err_msg=name)  # Conv1D (in, out) again
  cfg = ck.hf_config
  assert cfg['model_type'] == 'gpt2' and cfg['activation_function'] == 'gelu_new'
  assert (cfg['n_embd'], cfg['n_layer'], cfg['n_head'], cfg['n_positions'], cfg['n_inner']) == (64, 2, 4, 64, 96)
  assert cfg['layer_norm_epsilon'] == 1e-5 and cfg['tie_word_embeddings'] is True
  ids = list(range(3, 30))
  np.testing.assert_allclose(logits(hf_from_checkpoint(ck), ids), logits(model, ids), rtol=0, atol=1e-5)


def test_gpt2_tokenizer_matches_tokenizers(gpt2, bpe, tmp_path):
  _, path = gpt2
  ck = gguf_file.read_gguf(path)
  for s in SENTENCES + ['end<|endoftext|>start']:
    want = bpe.encode(s).ids
    assert ck.tokenizer.encode(s).ids == want, s
    assert ck.tokenizer.decode(want) == bpe.decode(want), s
  ck.write_tokenizer(str(tmp_path))
  config = json.load(open(tmp_path / 'tokenizer_config.json'))
  assert config['add_bos_token'] is False and config['eos_token'] == '<|endoftext|>'
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert hf_tok(SENTENCES[0])['input_ids'] == bpe.encode(SENTENCES[0]).ids  # no BOS added
  # transformers' GGUF tokenizer as a second reference. (Its GGUF *model* config for gpt2 is no reference:
  # it ignores context_length (n_positions stays 1024) and the real n_inner.)
  d, name = os.path.split(path)
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  for s in SENTENCES:
    assert ref_tok(s)['input_ids'] == ck.tokenizer.encode(s).ids, s


def bpe_vocab_kv(bpe, pre, extra_control=()):
  """Byte-level BPE tokenizer metadata as llama.cpp's _set_vocab_gpt2 writes it (added special -> CONTROL)."""
  vocab = bpe.get_vocab()
  tokens = sorted(vocab, key=vocab.get) + list(extra_control)
  merges = json.loads(bpe._tokenizer.to_str())['model']['merges']
  merges = [m if isinstance(m, str) else ' '.join(m) for m in merges]
  control = {'<|endoftext|>', *extra_control}
  types = [gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in tokens]
  return tokens, [('add_tokenizer_model', 'gpt2'), ('add_tokenizer_pre', pre), ('add_token_list', tokens),
                  ('add_token_types', types), ('add_token_merges', merges)]


# Llama 3's split (its tokenizer.json): digits in threes, case-insensitive contractions, punctuation runs.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def test_llama3_byte_level_tokenizer(bpe, tmp_path):
  """A Llama 3 style file (tokenizer model 'gpt2', pre 'llama-bpe', BOS added): Llama 3's split regex, not
  GPT-2's, and the BOS token in front."""
  bos, eos = '<|begin_of_text|>', '<|end_of_text|>'
  tokens, kv = bpe_vocab_kv(bpe, 'llama-bpe', extra_control=(bos, eos))
  kv += [('add_bos_token_id', tokens.index(bos)), ('add_eos_token_id', tokens.index(eos)),
         ('add_add_bos_token', True)]
  model = tiny_llama(len(tokens), 3, max_position_embeddings=64, tie_word_embeddings=True)
  path = write_gguf(tmp_path / 'llama3.gguf', 'llama', llama_kv(model.config) + kv, llama_gguf_tensors(model))
  ck = gguf_file.read_gguf(path)
  assert ck.tokenizer_config['add_bos_token'] is True and ck.tokenizer_config['bos_token'] == bos
  want = tokenizers.Tokenizer.from_str(bpe._tokenizer.to_str())  # the trained BPE, with Llama 3's splitting
  want.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior='isolated'),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  want.add_special_tokens([bos, eos])  # ids 400, 401: after the trained vocabulary, as in the file
  d, name = os.path.split(path)
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  texts = SENTENCES + ['1234567 digits', "WE'LL SEE, DON'T we?", 'end<|end_of_text|>']
  assert ck.tokenizer.encode(texts[-2]).ids != bpe.encode(texts[-2]).ids  # GPT-2's split would differ
  for s in texts:
    ids = want.encode(s).ids
    assert ck.tokenizer.encode(s, add_special_tokens=False).ids == ids, s
    assert ck.tokenizer.encode(s).ids == [tokens.index(bos)] + ids, s
    assert ref_tok(s)['input_ids'] == [tokens.index(bos)] + ids, s
    assert ck.tokenizer.decode(ids, skip_special_tokens=False) == s, s


def test_smollm_style_file(bpe, tmp_path):
  """A SmolLM-style file (architecture llama, byte-level BPE, pre 'smollm', no BOS) reads whole; its tokenizer
  equals SmolLM's own tokenizer.json pipeline (HF's Digits(individual_digits) then GPT-2's ByteLevel split), and
  the tokenizer.json it writes gives transformers the same ids. (Every pre-tokenizer name: test_gguf_pretokenizers.)"""
  tokens, kv = bpe_vocab_kv(bpe, 'smollm')
  eot = tokens.index('<|endoftext|>')
  kv += [('add_bos_token_id', eot), ('add_eos_token_id', eot)]
  model = tiny_llama(len(tokens), 4, max_position_embeddings=64, tie_word_embeddings=True)
  path = write_gguf(tmp_path / 'smollm.gguf', 'llama', llama_kv(model.config) + kv, llama_gguf_tensors(model))
  ck = gguf_file.read_gguf(path)
  assert ck.tokenizer_config['add_bos_token'] is False
  want = tokenizers.Tokenizer.from_str(bpe._tokenizer.to_str())
  want.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Digits(individual_digits=True),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  ck.write_tokenizer(str(tmp_path / 'tok'))
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'tok'))
  texts = SENTENCES + ['1234567 3.14159', 'x=42;  y = 2024']
  gpt2_split = bpe._tokenizer.pre_tokenizer
  assert want.pre_tokenizer.pre_tokenize_str(texts[-1]) != gpt2_split.pre_tokenize_str(texts[-1])
  for s in texts:
    assert ck.tokenizer.pre_tokenizer.pre_tokenize_str(s) == want.pre_tokenizer.pre_tokenize_str(s), s
    ids = want.encode(s).ids
    assert ck.tokenizer.encode(s).ids == ids, s
    assert hf_tok(s)['input_ids'] == ids, s


# --------------------------------------------------------------------------------------------------- Qwen2 side


def tiny_qwen2(vocab_size, seed, **kw):
  """A random Qwen2ForCausalLM (GQA): q/k/v biases drawn away from HF's zero init and norms away from 1, so a
  dropped bias or swapped norm shows; initializer_range 0.1 so greedy decoding has no near-ties."""
  torch.manual_seed(seed)
  cfg = transformers.Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
                                 max_position_embeddings=256, initializer_range=0.1, attn_implementation='eager', **kw)
  model = transformers.Qwen2ForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.uniform_(0.5, 1.5)
      elif name.endswith('bias'):
        p.normal_(0.0, 0.5)
  return model


def qwen2_kv(cfg):
  """Hyperparameters as llama.cpp's Qwen2Model writes them (TextModel.set_gguf_parameters: no rope dimension
  count, unlike LlamaModel)."""
  return [('add_context_length', cfg.max_position_embeddings), ('add_embedding_length', cfg.hidden_size),
          ('add_block_count', cfg.num_hidden_layers), ('add_feed_forward_length', cfg.intermediate_size),
          ('add_head_count', cfg.num_attention_heads), ('add_head_count_kv', cfg.num_key_value_heads),
          ('add_rope_freq_base', cfg.rope_parameters['rope_theta']), ('add_layer_norm_rms_eps', cfg.rms_norm_eps),
          ('add_file_type', gguf.LlamaFileType.ALL_F32)]


def qwen2_vocab_kv(bpe):
  """A Qwen2 byte-level BPE vocabulary as _set_vocab_gpt2 writes it: pre 'qwen2', <|endoftext|> as BOS, EOS and
  padding, and no BOS added (Qwen2's tokenizer_config)."""
  tokens, kv = bpe_vocab_kv(bpe, 'qwen2')
  eot = tokens.index('<|endoftext|>')
  return eot, kv + [('add_bos_token_id', eot), ('add_eos_token_id', eot), ('add_pad_token_id', eot),
                    ('add_add_bos_token', False)]


def write_qwen2_gguf(path, model, bpe, qtype=None):
  _, vocab_kv = qwen2_vocab_kv(bpe)
  return write_gguf(path, 'qwen2', qwen2_kv(model.config) + vocab_kv,
                    llama_gguf_tensors(model, qtype=qtype, permute=False))


@pytest.fixture(scope='module')
def qwen2(bpe, tmp_path_factory):
  """(HF model, GGUF path): tied embeddings (no output.weight, as Qwen2.5 0.5B-3B files), F32."""
  model = tiny_qwen2(bpe.get_vocab_size(), 5, tie_word_embeddings=True)
  return model, write_qwen2_gguf(tmp_path_factory.mktemp('qwen2') / 'qwen2.gguf', model, bpe)


@pytest.fixture(scope='module')
def qwen2_q8(bpe, tmp_path_factory):
  """(HF model, GGUF path): untied (output.weight present), 2-D weights as Q8_0 (norms and biases stay F32)."""
  model = tiny_qwen2(bpe.get_vocab_size(), 6, tie_word_embeddings=False)
  return model, write_qwen2_gguf(tmp_path_factory.mktemp('qwen2_q8') / 'qwen2.gguf', model, bpe, qtype=Q8_0)


def test_qwen2_state_dict_config_and_logits(qwen2, bpe):
  """HF's own tensors back (q/k rows as stored: un-permuting them, as for llama, would fail here), biases on
  q/k/v only, the Qwen2 config (tied, no sliding window), transformers' logits."""
  model, path = qwen2
  ck = gguf_file.read_gguf(path)
  want = numpy_state_dict(model)
  want.pop('lm_head.weight')
  assert set(ck.state_dict) == set(want)
  assert {k for k in want if k.endswith('bias')} == {f'model.layers.{i}.self_attn.{p}_proj.bias'
                                                    for i in range(2) for p in 'qkv'}
  for name, a in want.items():
    assert ck.state_dict[name].dtype == np.float32
    np.testing.assert_array_equal(ck.state_dict[name], a, err_msg=name)
  cfg = ck.hf_config
  assert cfg['model_type'] == 'qwen2' and cfg['architectures'] == ['Qwen2ForCausalLM']
  assert (cfg['vocab_size'], cfg['hidden_size'], cfg['intermediate_size'], cfg['num_hidden_layers'],
          cfg['num_attention_heads'], cfg['num_key_value_heads'], cfg['head_dim']) == (
              bpe.get_vocab_size(), 64, 96, 2, 4, 2, 16)
  assert cfg['rms_norm_eps'] == 1e-6 and cfg['rope_theta'] == 1e6 and cfg['rope_scaling'] is None
  assert cfg['max_position_embeddings'] == 256 and cfg['tie_word_embeddings'] is True
  assert cfg['use_sliding_window'] is False and 'attention_bias' not in cfg
  eot = bpe.token_to_id('<|endoftext|>')
  assert (cfg['bos_token_id'], cfg['eos_token_id'], cfg['pad_token_id']) == (eot, eot, eot)
  ids = bpe.encode(SENTENCES[0] + ' ' + SENTENCES[6]).ids
  np.testing.assert_allclose(logits(hf_from_checkpoint(ck), ids), logits(model, ids), rtol=0, atol=1e-5)


def test_qwen2_against_transformers_gguf_loader(qwen2, qwen2_q8, bpe):
  """transformers' GGUF loader reads both files (F32 tied, Q8_0 untied) to the same tensors, and so the same
  logits, as read_gguf: the layout written here is the one it expects of llama.cpp's qwen2 files. Its tokenizer
  gives the same ids as ours and as the trained BPE (Qwen2's split equals GPT-2's on this text)."""
  for model, path in (qwen2, qwen2_q8):
    ck = gguf_file.read_gguf(path)
    ref = transformers_gguf_model(path)
    assert isinstance(ref, transformers.Qwen2ForCausalLM)
    assert ref.config.tie_word_embeddings == model.config.tie_word_embeddings
    ref_sd = numpy_state_dict(ref)
    for k, a in ck.state_dict.items():
      np.testing.assert_array_equal(a, ref_sd[k], err_msg=k)
    ids = bpe.encode(SENTENCES[0]).ids
    np.testing.assert_allclose(logits(hf_from_checkpoint(ck), ids), logits(ref, ids), rtol=0, atol=1e-5)
  d, name = os.path.split(qwen2[1])
  ref_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
  ck = gguf_file.read_gguf(qwen2[1])
  assert ck.tokenizer_config['add_bos_token'] is False
  for s in SENTENCES:
    assert ref_tok(s)['input_ids'] == ck.tokenizer.encode(s).ids == bpe.encode(s).ids, s


def test_qwen2_q8_0_within_quantisation_error(qwen2_q8):
  model, path = qwen2_q8
  ck = gguf_file.read_gguf(path)
  assert ck.hf_config['tie_word_embeddings'] is False
  want = numpy_state_dict(model)
  assert set(ck.state_dict) == set(want)
  for name, a in want.items():
    got = ck.state_dict[name]
    if a.ndim == 1:  # norms and q/k/v biases: F32 in the file, as llama.cpp keeps 1-D tensors
      np.testing.assert_array_equal(got, a, err_msg=name)
    else:  # Q8_0 bound, as for llama above
      step = np.abs(a).reshape(-1, 32).max(axis=1, keepdims=True) / 127
      assert np.all(np.abs(got - a).reshape(-1, 32) <= 0.57 * step), name
      assert not np.array_equal(got, a), name


def test_qwen2_jaxssl_import_matches_transformers(qwen2, qwen2_q8, bpe, tmp_path):
  """`python -m jaxssl.convert from-hf --src qwen2.gguf`: the export's logits are transformers' (F32 file: the
  original model; Q8_0 file: transformers' GGUF loader's model of the same dequantised weights), its greedy
  generations transformers' token for token, its tokenizer the file's (no BOS)."""
  from jaxssl.convert.__main__ import main as convert_main
  from jaxssl.data import tokenizers as tokenizers_lib
  from jaxssl.train.checkpoint import load_export
  from jaxssl.generate import generate
  eot = bpe.token_to_id('<|endoftext|>')
  ids = np.random.default_rng(0).integers(0, bpe.get_vocab_size(), (2, 24))
  for (model, path), name in ((qwen2, 'f32'), (qwen2_q8, 'q8_0')):
    out = str(tmp_path / name)
    convert_main(['from-hf', '--src', path, '--out', out])
    config, jmodel, tokenizer = load_export(out)
    m = config.model
    assert (m.attention_bias, m.use_bias, m.num_kv_heads, m.tie_embeddings, m.rope_theta) == (
        True, False, 2, model.config.tie_word_embeddings, 1e6)
    ref = model if name == 'f32' else transformers_gguf_model(path)
    with torch.no_grad():
      want = ref(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jmodel(ids)), want, atol=1e-4, rtol=0)
    assert tokenizer.bos_id is None and tokenizer.sep_id == eot
  prompts = ['the quick brown', 'summer river and the']
  results = generate(str(tmp_path / 'f32'), prompts, max_new_tokens=8, greedy=True)
  tokenizer = tokenizers_lib.load_tokenizer(str(tmp_path / 'f32'))
  for prompt, r in zip(prompts, results):
    prompt_ids = torch.tensor([bpe.encode(prompt).ids])
    assert r['prompt_ids'] == tokenizer.encode_one(prompt) == prompt_ids[0].tolist()
    with torch.no_grad():
      ref = qwen2[0].generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=8,
                              do_sample=False, eos_token_id=eot, pad_token_id=eot)[0, prompt_ids.shape[1]:].tolist()
    assert r['generated_ids'] == ref[:len(r['generated_ids'])]
    assert len(r['generated_ids']) == 8 or r['generated_ids'][-1] == eot


def test_qwen2_missing_or_extra_bias_is_refused(qwen2, bpe, tmp_path):
  """llama.cpp requires qwen2's q/k/v biases and has no o_proj bias: a file without one or with the other is
  refused, naming the tensor."""
  model, _ = qwen2
  kv = qwen2_kv(model.config) + qwen2_vocab_kv(bpe)[1]
  tensors = llama_gguf_tensors(model, permute=False)
  del tensors['blk.1.attn_k.bias']
  with pytest.raises(UserError, match=r"blk\.1\.attn_k\.bias.*layer 1"):
    gguf_file.read_gguf(write_gguf(tmp_path / 'no_bias.gguf', 'qwen2', kv, tensors))
  tensors = llama_gguf_tensors(model, permute=False)
  tensors['blk.0.attn_output.bias'] = np.zeros(64, np.float32)
  with pytest.raises(UserError, match=r"no place in the HF model.*blk\.0\.attn_output\.bias"):
    gguf_file.read_gguf(write_gguf(tmp_path / 'o_bias.gguf', 'qwen2', kv, tensors))


# ------------------------------------------------------------------------------------------------------ errors


def test_rope_freqs_reconstruction_published_llama3():
  """Llama 3.1's published constants with head_dim 16 leave one in-between frequency: no fit, the published
  values are tried; factors no llama3 scaling gives are refused."""
  dim, theta = 16, 500000.0
  factors = gguf_file.llama3_factors(theta, dim, 8.0, 1.0, 4.0, 8192.0).astype(np.float32)
  assert gguf_file.llama3_rope_scaling(factors, theta, dim, 'f') == {
      'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
      'original_max_position_embeddings': 8192}
  assert gguf_file.llama3_rope_scaling(np.ones(dim // 2, np.float32), theta, dim, 'f') is None
  with pytest.raises(UserError, match='rope_freqs'):
    gguf_file.llama3_rope_scaling(np.linspace(1, 3, dim // 2)[::-1].astype(np.float32), theta, dim, 'f')


def test_rope_scaling_keys(llama, sp, tmp_path):
  """linear / yarn RoPE scaling written as metadata keys (convert_hf_to_gguf.py) become HF rope_scaling."""
  model, _ = llama
  tensors = llama_gguf_tensors(model)
  del tensors['rope_freqs.weight']
  base = llama_kv(model.config) + sp_vocab_kv(sp)
  linear = [('add_rope_scaling_type', gguf.RopeScalingType.LINEAR), ('add_rope_scaling_factor', 2.0)]
  ck = gguf_file.read_gguf(write_gguf(tmp_path / 'linear.gguf', 'llama', base + linear, tensors))
  assert ck.hf_config['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}
  yarn = [('add_rope_scaling_type', gguf.RopeScalingType.YARN), ('add_rope_scaling_factor', 4.0),
          ('add_rope_scaling_orig_ctx_len', 4096)]
  ck = gguf_file.read_gguf(write_gguf(tmp_path / 'yarn.gguf', 'llama', base + yarn, tensors))
  assert ck.hf_config['rope_scaling'] == {'rope_type': 'yarn', 'factor': 4.0,
                                          'original_max_position_embeddings': 4096}
  ck = gguf_file.read_gguf(write_gguf(tmp_path / 'plain.gguf', 'llama', base, tensors))
  assert ck.hf_config['rope_scaling'] is None


def test_missing_and_bad_files(tmp_path):
  with pytest.raises(UserError, match='does not exist'):
    gguf_file.read_gguf(str(tmp_path / 'nope.gguf'))
  bad = tmp_path / 'bad.gguf'
  bad.write_bytes(b'PK\x03\x04 not a gguf file at all')
  with pytest.raises(UserError, match='not a GGUF file'):
    gguf_file.read_gguf(str(bad))


def test_unsupported_architecture(tmp_path):
  path = write_gguf(tmp_path / 'falcon.gguf', 'falcon', [('add_block_count', 1)],
                    {'token_embd.weight': np.ones((4, 8))})
  with pytest.raises(UserError, match=r"'falcon'.*\['llama', 'qwen2', 'qwen3', 'gpt2'\]"):
    gguf_file.read_gguf(path)


def test_missing_layer_tensor_and_unsupported_tokenizers(llama, sp, tmp_path):
  model, _ = llama
  tensors = llama_gguf_tensors(model)
  del tensors['blk.1.ffn_up.weight']
  path = write_gguf(tmp_path / 'missing.gguf', 'llama', llama_kv(model.config) + sp_vocab_kv(sp), tensors)
  with pytest.raises(UserError, match=r"blk\.1\.ffn_up\.weight.*layer 1"):
    gguf_file.read_gguf(path)

  def with_tokenizer(name, model_name, pre):
    kv = [(m, model_name if m == 'add_tokenizer_model' else pre if m == 'add_tokenizer_pre' else v)
          for m, v in sp_vocab_kv(sp)]
    return write_gguf(tmp_path / name, 'llama', llama_kv(model.config) + kv, llama_gguf_tensors(model))
  tensors = llama_gguf_tensors(model)
  tensors['blk.0.attn_norm.weight'] = np.ones(64, np.int32)  # GGUFWriter stores it as I32
  path = write_gguf(tmp_path / 'i32.gguf', 'llama', llama_kv(model.config) + sp_vocab_kv(sp), tensors)
  with pytest.raises(UserError, match=r"'blk\.0\.attn_norm\.weight'.*I32.*cannot dequantise"):
    gguf_file.read_gguf(path)
  with pytest.raises(UserError, match="tokenizer model 'bert'"):
    gguf_file.read_gguf(with_tokenizer('bert.gguf', 'bert', 'default'))
  with pytest.raises(UserError, match="pre-tokenizer 'kimi-k2', which jaxssl does not know.*gguf_pretokenizers.py"):
    gguf_file.read_gguf(with_tokenizer('kimi.gguf', 'gpt2', 'kimi-k2'))

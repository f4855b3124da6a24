"""GPT-2 checkpoints <-> jaxssl exports through `python -m jaxssl.convert`, against transformers itself.

A random GPT2LMHeadModel with a byte-level BPE tokenizer trained here is saved the way the hub's checkpoints
are; the import must give transformers' logits, its greedy generations and its token ids, and to-hf must give
back a directory transformers opens.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from jaxssl.convert import decoder  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.data import tokenizers as tokenizers_lib  # noqa: E402
from jaxssl.data.hf_tokenizer import HFTokenizer  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from jaxssl.generate import generate  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), '..')
EOS = '<|endoftext|>'
TEXTS = ['The quick brown fox jumps over the lazy dog.', '  two leading spaces', 'café naïve — ünïcödé 東京',
         'numbers 12345 and symbols #$%', f'text that spells {EOS} is text', 'tabs\tand\nnewlines']


def corpus():
  words = 'the a quick brown fox jumps over lazy dog cat sat on mat and then ran far away home'.split()
  rng = np.random.default_rng(0)
  return [' '.join(rng.choice(words, size=8)) + '.' for _ in range(300)] + TEXTS


@pytest.fixture(scope='module')
def bpe():
  """A GPT-2 style byte-level BPE (no prefix space, <|endoftext|> last), trained on a small corpus."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[])
  tok.train_from_iterator(corpus(), trainer)
  tok.add_special_tokens([EOS])
  return tok


@pytest.fixture(scope='module')
def hf_model(bpe):
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, n_inner=48, bos_token_id=bpe.token_to_id(EOS),
                                   eos_token_id=bpe.token_to_id(EOS))
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():  # random LayerNorm/bias values: a swapped scale/bias or a missed bias would show
    for name, p in model.named_parameters():
      if '.ln_' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_dir(hf_model, bpe, tmp_path_factory):
  """The layout of a hub GPT-2 directory: config.json, model.safetensors, tokenizer.json + tokenizer_config.json."""
  d = tmp_path_factory.mktemp('gpt2')
  hf_model.save_pretrained(d)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, unk_token=EOS)
  fast.save_pretrained(d)
  return str(d)


@pytest.fixture(scope='module')
def export(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'params')
  convert_main(['from-hf', '--src', hf_dir, '--out', out])
  return out


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def test_import_matches_transformers_logits(hf_model, export):
  config, model, tokenizer = load_export(export)
  assert config.model.name == 'gpt' and config.model.num_layers == 2
  ids = np.random.default_rng(1).integers(0, tokenizer.vocab_size, (2, 20))
  np.testing.assert_allclose(np.asarray(model(ids)), hf_logits(hf_model, ids), atol=1e-4, rtol=0)


def test_tokenizer_ids_equal_transformers(hf_dir, export):
  reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
  for path in (hf_dir, export):
    tok = tokenizers_lib.load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert tok.bos_id is None and tok.sep_id == reference.eos_token_id  # GPT-2 puts nothing before a text
    for text in TEXTS[:-2]:
      assert tok.encode_one(text) == reference(text)['input_ids'], text
      assert tok.decode(tok.encode_one(text)) == text
  # A special token spelled in text stays text: a prompt cannot forge a document boundary.
  assert reference.eos_token_id not in tok.encode_one(TEXTS[-2])


def test_vocab_json_and_merges_txt(bpe, hf_dir, tmp_path):
  """GPT-2's older files (vocab.json + merges.txt, no tokenizer.json) build the same tokenizer."""
  bpe.model.save(str(tmp_path))  # merges.txt, and a vocab.json without the added <|endoftext|>
  with open(tmp_path / 'vocab.json', 'w', encoding='utf-8') as f:
    json.dump(bpe.get_vocab(with_added_tokens=True), f)  # GPT-2's vocab.json holds it (id 50256)
  tok = tokenizers_lib.load_tokenizer(str(tmp_path))
  reference = tokenizers_lib.load_tokenizer(hf_dir)
  assert tok.sep_id == reference.sep_id and tok.vocab_size == reference.vocab_size
  for text in TEXTS:
    assert tok.encode_one(text) == reference.encode_one(text), text


def test_greedy_generation_matches_transformers(hf_model, export):
  prompts = ['the quick brown', 'a cat sat on the mat and then']
  results = generate(export, prompts, max_new_tokens=10, greedy=True)
  tokenizer = tokenizers_lib.load_tokenizer(export)
  for prompt, r in zip(prompts, results):
    ids = torch.tensor([tokenizer.encode_one(prompt)])
    with torch.no_grad():
      ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                              pad_token_id=tokenizer.pad_id)[0, ids.shape[1]:].tolist()
    assert r['prompt_ids'] == ids[0].tolist()
    assert r['generated_ids'] == ref[:len(r['generated_ids'])]
    assert len(r['generated_ids']) == 10 or r['generated_ids'][-1] == tokenizer.sep_id


def test_generate_computes_in_the_dtype_asked_for(export, monkeypatch):
  """--dtype bfloat16 builds the generate program's model in bfloat16 over the export's float32 weights (the
  fast setting for batches on a CPU with bfloat16 instructions); a dtype that is not a setting exits with 2."""
  from jaxssl import program_cache
  from jaxssl.generate import main as generate_main
  from jaxssl.train import checkpoint
  monkeypatch.setattr(program_cache, 'path_for', lambda *a, **k: None)  # no saved program: each run builds one
  built = []
  setup = checkpoint.setup_export_model
  monkeypatch.setattr(checkpoint, 'setup_export_model', lambda saved, cfg, *a, **k: (
      built.append(cfg.dtype), setup(saved, cfg, *a, **k))[1])
  prompts = ['the lazy dog sat', 'then ran far']
  bf16 = generate(export, prompts, max_new_tokens=6, greedy=True, dtype='bfloat16')
  f32 = generate(export, prompts, max_new_tokens=6, greedy=True)
  assert built == ['bfloat16', 'float32']  # the export records float32 (a converted checkpoint)
  for a, b in zip(bf16, f32):
    assert a['prompt_ids'] == b['prompt_ids'] and len(a['generated_ids']) == len(b['generated_ids'])
  with pytest.raises(SystemExit) as exit_info:
    generate_main(['--params', export, '--prompt', 'a', '--dtype', 'float16'])
  assert exit_info.value.code == 2


def test_to_hf_round_trip(hf_model, export, tmp_path):
  out = str(tmp_path / 'hf')
  convert_main(['to-hf', '--src', export, '--out', out])
  back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = np.random.default_rng(2).integers(0, hf_model.config.vocab_size, (2, 16))
  np.testing.assert_allclose(hf_logits(back, ids), hf_logits(hf_model, ids), atol=1e-5, rtol=0)
  tok = transformers.AutoTokenizer.from_pretrained(out)
  ours = tokenizers_lib.load_tokenizer(export)
  assert tok.eos_token_id == ours.sep_id
  assert all(tok(t)['input_ids'] == ours.encode_one(t) for t in TEXTS[:-2])
  with pytest.raises(UserError, match='already exists'):
    decoder.to_hf(export, out)


def test_sharded_and_bfloat16_safetensors(hf_model, hf_dir, tmp_path):
  """Sharded checkpoints (model.safetensors.index.json) and bfloat16 weights read as float32."""
  sharded = tmp_path / 'sharded'
  hf_model.save_pretrained(sharded, max_shard_size='50KB')
  assert os.path.isfile(sharded / 'model.safetensors.index.json')
  whole = decoder.read_hf_weights(hf_dir)
  parts = decoder.read_hf_weights(str(sharded))
  assert parts.keys() == whole.keys() and all(np.array_equal(parts[k], whole[k]) for k in whole)
  from safetensors.torch import save_file
  w = torch.randn(5, 3)
  save_file({'w': w.to(torch.bfloat16)}, str(tmp_path / 'bf16.safetensors'))
  read = decoder.read_safetensors(str(tmp_path / 'bf16.safetensors'))['w']
  assert read.dtype == np.float32
  np.testing.assert_array_equal(read, w.to(torch.bfloat16).float().numpy())


def test_pytorch_bin_checkpoint(hf_model, hf_dir, tmp_path):
  torch.save(hf_model.state_dict(), tmp_path / 'pytorch_model.bin')
  whole = decoder.read_hf_weights(hf_dir)
  from_bin = decoder.read_hf_weights(str(tmp_path))
  for k in whole:
    np.testing.assert_array_equal(from_bin[k], whole[k])


def run_convert(*args):
  return subprocess.run([sys.executable, '-m', 'jaxssl.convert', *args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=300)


@pytest.mark.parametrize('case', ['model_type', 'no_tokenizer', 'vocab_too_big', 'not_a_dir', 'untied'])
def test_bad_checkpoints_are_one_line_errors(case, hf_model, hf_dir, bpe, tmp_path):
  src = tmp_path / 'src'
  src.mkdir()
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'):
    (src / name).write_bytes(open(os.path.join(hf_dir, name), 'rb').read())
  config = json.loads((src / 'config.json').read_text())
  expected = {'model_type': "model_type='bloom'", 'no_tokenizer': 'no tokenizer.json',
              'vocab_too_big': 'belong to another checkpoint', 'not_a_dir': 'has no config.json',
              'untied': 'ties the output projection'}[case]
  if case == 'model_type':
    (src / 'config.json').write_text(json.dumps({**config, 'model_type': 'bloom'}))
  elif case == 'no_tokenizer':
    os.remove(src / 'tokenizer.json')
  elif case == 'vocab_too_big':
    big = Tokenizer.from_str(bpe.to_str())
    big.add_tokens([f'extra{i}' for i in range(5)])
    big.save(str(src / 'tokenizer.json'))
  elif case == 'not_a_dir':
    src = tmp_path / 'missing.bin'
  elif case == 'untied':
    from safetensors.torch import save_file
    state = {k: v.clone().contiguous() for k, v in hf_model.state_dict().items()}
    state['lm_head.weight'] = state['lm_head.weight'] + 1.0
    save_file(state, str(src / 'model.safetensors'), metadata={'format': 'pt'})
  if case in ('model_type', 'no_tokenizer', 'not_a_dir'):  # refused before JAX starts: run the real CLI
    out = tmp_path / 'out'
    proc = run_convert('from-hf', '--src', str(src), '--out', str(out))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert not out.exists()
  else:
    with pytest.raises(UserError, match=expected):
      decoder.from_hf(str(src), str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_continued_pretraining_from_imported_gpt2(hf_model, export, tmp_path):
  """pretrain --config.init_from=EXPORT trains the imported GPT-2 with its own BPE tokenizer on a local corpus.

  With learning rate 0 the exported step-1 params are the imported ones exactly; the workdir holds the GPT-2
  tokenizer, not a newly trained one.
  """
  corpus_file = tmp_path / 'corpus.txt'
  sentences = corpus()
  corpus_file.write_text('\n\n'.join(' '.join(sentences[i:i + 4]) for i in range(0, 200, 4)) + '\n')
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  cmd = [sys.executable, '-m', 'jaxssl.pretrain', '--config', 'configs/gpt.py:tiny', f'--config.init_from={export}',
         f'--config.data.corpus={corpus_file}', '--config.data.seq_len=32', '--config.train.batch_size=4',
         '--config.train.steps=1', '--config.train.learning_rate=0', '--config.train.end_learning_rate=0',
         '--config.train.warmup_steps=0', '--config.eval.batches=1', '--config.data.num_threads=1',
         '--config.model.dropout_rate=0', '--config.model.attention_dropout_rate=0', '--workdir', str(workdir)]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f'from {export}' in proc.stdout and os.path.isfile(workdir / 'tokenizer.json')
  assert not os.path.exists(workdir / 'tokenizer.model')
  out = str(tmp_path / 'export')
  run = subprocess.run([sys.executable, '-m', 'jaxssl.export', '--workdir', str(workdir), '--out', out],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-2000:]
  _, before, _ = load_export(export)
  config, after, tokenizer = load_export(out)
  assert isinstance(tokenizer, HFTokenizer) and config.model.max_position == 64
  ids = np.random.default_rng(3).integers(0, tokenizer.vocab_size, (1, 12))
  np.testing.assert_array_equal(np.asarray(after(ids)), np.asarray(before(ids)))
  # A fine-tuned or mismatched export is refused with one line.
  bad = subprocess.run([*cmd[:5], '--config.init_from=' + str(tmp_path / 'nothing'), *cmd[6:-1],
                        str(tmp_path / 'run2')], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'not a jaxssl export' in bad.stderr, bad.stderr[-1000:]


def test_to_hf_of_a_jaxssl_pretrained_gpt_writes_a_tokenizer_transformers_opens(tmp_path):
  """A GPT pretrained by jaxssl (sentencepiece tokenizer.model) converts to a directory whose tokenizer.json gives
  the sentencepiece ids through transformers' AutoTokenizer, and whose weights load into GPT2LMHeadModel."""
  import json as json_lib
  import jax
  from jaxssl import config as config_lib
  from jaxssl import mesh as mesh_lib
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import state as state_lib
  words = 'the a quick brown fox jumps over lazy dog café Zürich spaces tabs newline'.split()
  rng = np.random.default_rng(0)
  sp = tokenizers_lib.train_tokenizer([' '.join(rng.choice(words, size=8)) + '.' for _ in range(300)], 50,
                                      str(tmp_path / 'tok'))
  config = config_lib.load_config(os.path.join(REPO, 'configs', 'gpt.py:tiny'))
  config_lib.parse_overrides(config, ['--config.model.num_layers=1', '--config.model.hidden_size=16',
                                      '--config.model.num_heads=2', '--config.model.intermediate_size=32',
                                      '--config.model.max_position=32', f'--config.tokenizer.vocab_size={sp.vocab_size}'])
  setup = state_lib.setup_model(config.model, sp.vocab_size, mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1]))
  saved = {**json_lib.loads(config_lib.to_json(config)), 'vocab_size': sp.vocab_size}
  export_dir = str(tmp_path / 'export')
  ckpt_lib.write_export(export_dir, state_lib.init_params(setup), json_lib.dumps(saved), sp)
  out = str(tmp_path / 'hf')
  convert_main(['to-hf', '--src', export_dir, '--out', out])
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  for text in ('the quick fox', '  two   spaces  ', 'café Zürich ☃ unknown', 'tabs\tand\nnewline'):
    assert hf_tok(text)['input_ids'] == sp.encode_one(text), text
  assert hf_tok.eos_token_id == sp.sep_id and hf_tok.pad_token_id == sp.pad_id
  _, model, _ = load_export(export_dir)
  ids = np.array([sp.encode_one('the quick brown fox jumps')])
  np.testing.assert_allclose(hf_logits(transformers.GPT2LMHeadModel.from_pretrained(out).eval(), ids),
                             np.asarray(model(ids)), atol=1e-5, rtol=0)

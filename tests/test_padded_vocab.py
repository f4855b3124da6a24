"""Padded vocabularies: checkpoints with more embedding rows than tokenizer ids, built small with transformers.

The hub has many (multilingual-e5 and other XLM-R-vocabulary encoders: 250037 rows for 250002 ids; Qwen2: 151936
for ~151665; Pythia: 50304 for 50277). Here a Qwen2ForCausalLM and an XLMRobertaForMaskedLM get 40 / 35 rows past
their tokenizer's ids, and those rows are set so that they win every unmasked argmax (transformers' own greedy
search picks them): the jobs must accept the checkpoints, never predict a padding row, keep transformers' logits
on the real ids, and write every row back on to-hf. Fewer rows than ids stays a one-line error.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from safetensors.numpy import load_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from test_convert_gpt2 import EOS, bpe  # noqa: E402,F401  (bpe: the byte-level BPE fixture; tests/ is on sys.path)
from test_convert_xlmr import SENTENCES, write_tokenizer  # noqa: E402
from test_finetune_job import write_sentiment  # noqa: E402

from jaxssl.convert import hf_bert  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.eval import icl  # noqa: E402
from jaxssl.evaluate import main as evaluate_main  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from jaxssl.generate import generate  # noqa: E402
from jaxssl.mesh import make_mesh  # noqa: E402
from jaxssl.models import vocab  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), '..')
DECODER_PADDING, ENCODER_PADDING = 40, 35
DOMINANT = 100.0
PROMPTS = ['the quick brown', 'a cat sat on the mat and then']


def make_padding_dominant(weight, num_ids):
  """Rows num_ids.. of an output projection [V, H] become +-DOMINANT along one hidden axis each: whatever the
  final hidden state h, some padding row scores DOMINANT * max_k |h_k|, far above any real row's logit, so an
  argmax over every row always lands on padding."""
  with torch.no_grad():
    weight[num_ids:] = 0
    for j in range(weight.shape[0] - num_ids):
      weight[num_ids + j, (j // 2) % weight.shape[1]] = DOMINANT if j % 2 == 0 else -DOMINANT


def one_device():
  return make_mesh((1, 1, 1), jax.devices()[:1])


def with_more_tokens(path, extra):
  """Rewrites the tokenizer.json at `path` with `extra` more (ordinary) tokens."""
  tok = Tokenizer.from_file(path)
  tok.add_tokens([f'extratoken{i}' for i in range(extra)])
  tok.save(path)


def run_job(module, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)


# ----- a padded decoder (Qwen2 layout, untied head) -----

@pytest.fixture(scope='module')
def qwen2(bpe, tmp_path_factory):  # noqa: F811
  """(transformers model, HF directory, jaxssl export, tokenizer ids, rows)."""
  num_ids = bpe.get_vocab_size()
  rows = num_ids + DECODER_PADDING
  eos = bpe.token_to_id(EOS)
  torch.manual_seed(0)
  config = transformers.Qwen2Config(
      vocab_size=rows, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=eos, pad_token_id=None, attn_implementation='eager')
  model = transformers.Qwen2ForCausalLM(config).eval().float()
  make_padding_dominant(model.lm_head.weight, num_ids)
  hf_dir = tmp_path_factory.mktemp('qwen2')
  model.save_pretrained(hf_dir)
  transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS,
                                       unk_token=EOS).save_pretrained(hf_dir)
  export = str(tmp_path_factory.mktemp('conv') / 'params')
  convert_main(['from-hf', '--src', str(hf_dir), '--out', export])
  return model, str(hf_dir), export, num_ids, rows


def hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def hf_greedy(model, ids, max_new_tokens, eos, suppress=None):
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos,
                         suppress_tokens=suppress)
  return out[0, len(ids):].tolist()


def test_decoder_logits_equal_transformers_on_the_real_ids(qwen2):
  model, _, export, num_ids, rows = qwen2
  config, ours, tokenizer = load_export(export, one_device())
  assert (tokenizer.vocab_size, config.vocab_size, ours.config.num_token_ids) == (num_ids, rows, num_ids)
  ids = np.random.default_rng(1).integers(0, num_ids, (2, 16))
  got, ref = np.asarray(ours(ids)), hf_logits(model, ids)
  assert got.shape == ref.shape == (2, 16, rows)
  np.testing.assert_allclose(got[..., :num_ids], ref[..., :num_ids], atol=1e-4, rtol=0)
  assert np.all(got[..., num_ids:] == -np.inf)
  assert np.all(ref.argmax(-1) >= num_ids)  # unmasked, a padding row would be every prediction


def test_generation_never_emits_a_padding_id(qwen2):
  model, _, export, num_ids, rows = qwen2
  eos = model.config.eos_token_id
  results = generate(export, PROMPTS, max_new_tokens=8, greedy=True)
  for r in results:
    # transformers' greedy search picks a padding row at once; told those ids do not exist, it gives ours.
    assert hf_greedy(model, r['prompt_ids'], 1, eos)[0] >= num_ids
    ref = hf_greedy(model, r['prompt_ids'], 8, eos, suppress=list(range(num_ids, rows)))
    assert r['generated_ids'] == ref[:len(r['generated_ids'])]
    assert len(r['generated_ids']) == 8 or r['generated_ids'][-1] == eos
  for seed, (top_k, top_p) in enumerate([(0, 1.0), (5, 1.0), (0, 0.9)]):
    sampled = generate(export, PROMPTS * 4, max_new_tokens=12, temperature=3.0, top_k=top_k, top_p=top_p, seed=seed)
    ids = [t for r in sampled for t in r['generated_ids']]
    assert ids and max(ids) < num_ids, (top_k, top_p)


def test_icl_scores_and_generates_over_the_tokenizer_ids(qwen2):
  model, _, export, num_ids, rows = qwen2
  mesh = one_device()
  _, ours, tokenizer = load_export(export, mesh)
  pairs = [(tokenizer.encode_one('the quick brown'), tokenizer.encode_one(' fox jumps')),
           (tokenizer.encode_one('a cat sat on'), tokenizer.encode_one(' the mat'))]
  got = icl.loglikelihoods(ours, pairs, batch_size=2, mesh=mesh, max_len=128)
  for (context, continuation), score in zip(pairs, got):
    full = context + continuation
    logp = torch.log_softmax(torch.tensor(hf_logits(model, [full])[0, :-1, :num_ids]), -1).numpy()
    ref = sum(logp[t - 1, full[t]] for t in range(len(context), len(full)))  # log p over the tokenizer's ids
    np.testing.assert_allclose(score, ref, atol=1e-3, rtol=1e-4)
  texts = icl.generate_texts(ours, tokenizer, [c for c, _ in pairs], max_new_tokens=5, batch_size=2, mesh=mesh,
                             max_len=128)
  eos = model.config.eos_token_id
  for (context, _), text in zip(pairs, texts):
    ref = hf_greedy(model, context, 5, eos, suppress=list(range(num_ids, rows)))
    assert text == tokenizer.decode([t for t in ref if t != eos])


def test_to_hf_writes_every_row_back(qwen2, tmp_path):
  model, hf_dir, export, num_ids, rows = qwen2
  out = str(tmp_path / 'hf')
  convert_main(['to-hf', '--src', export, '--out', out])
  with open(os.path.join(out, 'config.json')) as f:
    assert json.load(f)['vocab_size'] == rows
  written, original = load_file(os.path.join(out, 'model.safetensors')), load_file(os.path.join(hf_dir,
                                                                                              'model.safetensors'))
  for name in ('model.embed_tokens.weight', 'lm_head.weight'):
    assert written[name].shape[0] == rows
    np.testing.assert_array_equal(written[name], original[name])
  back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation='eager').eval()
  ids = np.random.default_rng(4).integers(0, num_ids, (2, 12))
  np.testing.assert_allclose(hf_logits(back, ids), hf_logits(model, ids), atol=1e-5, rtol=0)


def test_continued_pretraining_keeps_the_rows(qwen2, tmp_path):
  """pretrain --config.init_from of a padded export trains with every row; its export loads and masks them."""
  _, _, export, num_ids, rows = qwen2
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('\n\n'.join(f'{p} over the lazy dog {i}.\nthe cat sat on the mat.' for i, p in
                                enumerate(PROMPTS * 20)) + '\n')
  workdir, out = tmp_path / 'run', str(tmp_path / 'export')
  proc = run_job('jaxssl.pretrain', '--config', 'configs/gpt.py:tiny', f'--config.init_from={export}',
                 f'--config.data.corpus={corpus}', '--config.data.seq_len=32', '--config.train.batch_size=4',
                 '--config.train.steps=1', '--config.train.learning_rate=0', '--config.train.end_learning_rate=0',
                 '--config.train.warmup_steps=0', '--config.eval.batches=1', '--config.data.num_threads=1',
                 '--config.model.dropout_rate=0', '--config.model.attention_dropout_rate=0', '--workdir',
                 str(workdir))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f'vocab {rows}' in proc.stdout
  proc = run_job('jaxssl.export', '--workdir', str(workdir), '--out', out)
  assert proc.returncode == 0, proc.stderr[-2000:]
  _, before, _ = load_export(export, one_device())
  config, after, tokenizer = load_export(out, one_device())
  assert (config.vocab_size, tokenizer.vocab_size, after.config.num_token_ids) == (rows, num_ids, num_ids)
  ids = np.random.default_rng(3).integers(0, num_ids, (1, 12))
  np.testing.assert_array_equal(np.asarray(after(ids)), np.asarray(before(ids)))


def test_fewer_rows_than_ids_is_a_one_line_error(qwen2, tmp_path):
  _, hf_dir, export, num_ids, rows = qwen2
  broken = tmp_path / 'broken'
  shutil.copytree(export, broken)
  with_more_tokens(str(broken / 'tokenizer.json'), rows - num_ids + 1)
  with pytest.raises(UserError, match=f'has {rows + 1} ids but the embedding only {rows} rows'):
    load_export(str(broken), one_device())
  proc = run_job('jaxssl.generate', '--params', str(broken), '--prompt', 'the quick', '--greedy')
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr[-2000:]
  assert f'{rows + 1} ids but the embedding only {rows} rows' in lines[0]
  with pytest.raises(UserError, match='belong to another checkpoint'):
    convert_main(['to-hf', '--src', str(broken), '--out', str(tmp_path / 'hf')])
  assert not (tmp_path / 'hf').exists()


def test_mask_padding_logits():
  logits = np.arange(12, dtype=np.float32).reshape(2, 6)
  np.testing.assert_array_equal(vocab.mask_padding_logits(logits, 0), logits)  # 0: no padding
  np.testing.assert_array_equal(vocab.mask_padding_logits(logits, 6), logits)
  masked = np.asarray(vocab.mask_padding_logits(logits, 4))
  np.testing.assert_array_equal(masked[:, :4], logits[:, :4])
  assert np.all(masked[:, 4:] == -np.inf) and np.all(masked.argmax(-1) == 3)


# ----- a padded encoder (XLM-R layout, as multilingual-e5) -----

@pytest.fixture(scope='module')
def xlmr(tmp_path_factory):
  """(transformers model, HF directory, jaxssl export, tokenizer ids, rows)."""
  hf_dir = str(tmp_path_factory.mktemp('xlmr_padded'))
  num_ids = write_tokenizer(hf_dir)
  rows = num_ids + ENCODER_PADDING
  torch.manual_seed(0)
  config = transformers.XLMRobertaConfig(
      vocab_size=rows, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      layer_norm_eps=1e-5)
  model = transformers.XLMRobertaForMaskedLM(config).eval()
  make_padding_dominant(model.roberta.embeddings.word_embeddings.weight, num_ids)  # the MLM decoder is tied to it
  model.save_pretrained(hf_dir, safe_serialization=True)
  export = str(tmp_path_factory.mktemp('conv_xlmr') / 'params')
  convert_main(['from-hf', '--src', hf_dir, '--out', export])
  return model, hf_dir, export, num_ids, rows


def test_encoder_mlm_logits_equal_transformers_on_the_real_ids(xlmr):
  model, _, export, num_ids, rows = xlmr
  config, ours, tokenizer = load_export(export, one_device())
  assert (tokenizer.vocab_size, config.vocab_size) == (num_ids, rows)
  ids = np.array([[tokenizer.cls_id] + tokenizer.encode_one(SENTENCES[0])[:8] + [tokenizer.sep_id]])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids))).logits.numpy()
  assert np.all(ref.argmax(-1) >= num_ids)  # unmasked, a padding row would fill every mask
  positions = np.arange(ids.shape[1])[None]
  got, _ = ours(ids, np.zeros_like(ids), np.ones_like(ids), positions)
  got = np.asarray(got)
  assert got.shape == ref.shape
  np.testing.assert_allclose(got[..., :num_ids], ref[..., :num_ids], atol=1e-4, rtol=0)
  assert np.all(got[..., num_ids:] == -np.inf)


def test_finetune_evaluate_and_embeddings_on_a_padded_encoder(xlmr, tmp_path):
  _, _, export, _, _ = xlmr
  write_sentiment(tmp_path / 'train.tsv', 32, 1)
  write_sentiment(tmp_path / 'dev.tsv', 16, 2)
  workdir = tmp_path / 'ft'
  proc = run_job('jaxssl.finetune', '--config', 'configs/finetune.py:classification', f'--config.init_from={export}',
                 f'--config.task.train={tmp_path / "train.tsv"}', f'--config.task.dev={tmp_path / "dev.tsv"}',
                 '--config.data.seq_len=24', '--config.train.steps=4', '--config.train.batch_size=8',
                 '--config.train.warmup_steps=1', '--config.eval.every_steps=4', '--config.checkpoint.every_steps=4',
                 '--config.log.every_steps=2', '--workdir', str(workdir))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  results = tmp_path / 'results.json'
  evaluate_main(['--config', os.path.join(REPO, 'configs', 'eval.py') + ':task',
                 f'--config.params={workdir / "export"}', '--out', str(results)])
  report = json.loads(results.read_text())
  assert 0.0 <= report['average'] <= 1.0
  emb_out = tmp_path / 'emb'
  evaluate_main(['--config', os.path.join(REPO, 'configs', 'embeddings.py') + ':apple',
                 f'--config.embeddings.model={export}', '--out', str(emb_out)])
  assert (emb_out / 'results.json').is_file()


def test_encoder_with_fewer_rows_than_ids_is_refused(xlmr, tmp_path):
  _, hf_dir, export, num_ids, rows = xlmr
  src = tmp_path / 'src'
  shutil.copytree(hf_dir, src)
  with_more_tokens(str(src / 'tokenizer.json'), rows - num_ids + 3)
  with pytest.raises(UserError, match=f'has {rows + 3} ids but the embedding only {rows} rows'):
    hf_bert.from_hf(str(src), str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()
  broken = tmp_path / 'broken'
  shutil.copytree(export, broken)
  shutil.copyfile(src / 'tokenizer.json', broken / 'tokenizer.json')
  proc = run_job('jaxssl.finetune', '--config', 'configs/finetune.py:classification', f'--config.init_from={broken}',
                 f'--config.task.train={tmp_path / "x.tsv"}', f'--config.task.dev={tmp_path / "x.tsv"}',
                 '--workdir', str(tmp_path / 'ft'))
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1 and 'ids but the embedding only' in lines[0], proc.stderr[-2000:]

"""HuggingFace BERT <-> jaxssl conversion against transformers itself (the only place torch is imported)."""
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

import jaxssl  # noqa: E402
from jaxssl.convert import hf_bert  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from jaxssl.mesh import make_mesh  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), '..')
V, B, L = 99, 3, 12
HF_SIZES = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64)


def write_vocab(directory):
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [chr(c) for c in range(ord('a'), ord('z') + 1)]
  words += [f'w{i}' for i in range(V - len(words))]
  with open(os.path.join(directory, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(words) + '\n')


def save_hf(model, directory):
  model.save_pretrained(directory, safe_serialization=True)
  write_vocab(directory)
  return str(directory)


@pytest.fixture(scope='module')
def hf_model():
  torch.manual_seed(0)
  model = transformers.BertForPreTraining(transformers.BertConfig(**HF_SIZES)).eval()
  with torch.no_grad():  # random LayerNorm/bias values: a swapped scale/bias or a missed bias would show
    for name, p in model.named_parameters():
      if 'LayerNorm' in name or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_dir(hf_model, tmp_path_factory):
  return save_hf(hf_model, tmp_path_factory.mktemp('hf'))


@pytest.fixture(scope='module')
def converted(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'params')
  hf_bert.from_hf(hf_dir, out)
  return out


def one_device():
  return make_mesh((1, 1, 1), jax.devices()[:1])


def batch(seed=0):
  rng = np.random.default_rng(seed)
  lengths = np.array([L, 9, 5])
  mask = (np.arange(L)[None] < lengths[:, None]).astype(np.int64)
  ids = rng.integers(5, V, (B, L)) * mask
  types = (np.arange(L)[None] >= (lengths // 2)[:, None]).astype(np.int64) * mask
  positions = np.array([[0, 3, 11], [1, 4, 8], [0, 2, 4]])
  return ids, types, mask, positions


def hf_outputs(model, ids, types, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask), output_hidden_states=True)
    pooled = model.bert(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                        attention_mask=torch.tensor(mask)).pooler_output
  return ([h.numpy() for h in out.hidden_states], pooled.numpy(), out.prediction_logits.numpy(),
          out.seq_relationship_logits.numpy())


def close(ours, theirs, what):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, what
  tol = 1e-5 * max(1.0, float(np.abs(theirs).max()))  # float32: absolute 1e-5 relative to the magnitudes
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol, err_msg=what)


def test_from_hf_matches_transformers(hf_model, converted):
  config, model, tokenizer = load_export(converted, one_device())
  assert config.model.num_layers == 2 and config.model.hidden_size == 32 and config.vocab_size == V
  assert tokenizer.vocab_size == V
  ids, types, mask, positions = batch()
  hidden, pooled, mlm, nsp = hf_outputs(hf_model, ids, types, mask)
  args = [jnp.asarray(a, jnp.int32) for a in (ids, types, mask)]
  seq, our_pooled, our_hidden = model.encode(*args, return_hidden_states=True)
  assert len(our_hidden) == len(hidden) == 3
  for i, (a, b) in enumerate(zip(our_hidden, hidden)):
    close(a, b, f'hidden state {i}')
  close(seq, hidden[-1], 'sequence output')
  close(our_pooled, pooled, 'pooled output')
  our_mlm, our_nsp = model(*args, jnp.asarray(positions, jnp.int32))
  close(our_mlm, np.take_along_axis(mlm, positions[:, :, None], axis=1), 'MLM logits')
  close(our_nsp, nsp, 'NSP logits')
  # The default outputs are unchanged by the hidden-states option.
  seq2, pooled2 = model.encode(*args)
  np.testing.assert_array_equal(seq2, seq)
  np.testing.assert_array_equal(pooled2, our_pooled)


def test_jaxssl_load(converted):
  model, tokenizer = jaxssl.load(converted, one_device())
  assert model.config.num_layers == 2 and tokenizer.vocab_size == V


def test_round_trip_to_hf(hf_model, converted, tmp_path):
  out = str(tmp_path / 'hf_again')
  hf_bert.to_hf(converted, out)
  assert {'config.json', 'model.safetensors', 'vocab.txt'} <= set(os.listdir(out))
  again = transformers.BertForPreTraining.from_pretrained(out).eval()
  ids, types, mask, _ = batch(1)
  for a, b, what in zip(hf_outputs(again, ids, types, mask)[1:], hf_outputs(hf_model, ids, types, mask)[1:],
                        ('pooled', 'MLM logits', 'NSP logits')):
    close(a, b, what)


def test_plain_bert_model_gets_new_heads(capsys, tmp_path):
  torch.manual_seed(1)
  src = save_hf(transformers.BertModel(transformers.BertConfig(**HF_SIZES)).eval(), tmp_path / 'hf')
  hf_bert.from_hf(src, str(tmp_path / 'params'), seed=3)
  lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith('new heads')]
  assert len(lines) == 1 and 'MLM head' in lines[0] and 'NSP classifier' in lines[0] and 'pooler' not in lines[0]
  _, model, _ = load_export(str(tmp_path / 'params'), one_device())
  from safetensors.numpy import load_file
  np.testing.assert_array_equal(model.word_embeddings.embedding[...],
                                load_file(os.path.join(src, 'model.safetensors'))['embeddings.word_embeddings.weight'])


def test_untied_decoder_and_missing_layer_are_user_errors(hf_model, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(os.path.join(save_hf(hf_model, tmp_path / 'a'), 'model.safetensors'))
  bad = dict(tensors, **{'cls.predictions.decoder.weight': tensors['bert.embeddings.word_embeddings.weight'] + 1})
  save_file(bad, str(tmp_path / 'a' / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(UserError, match='decoder'):
    hf_bert.from_hf(str(tmp_path / 'a'), str(tmp_path / 'out'))
  del tensors['bert.encoder.layer.1.output.dense.weight']
  save_file(tensors, str(tmp_path / 'a' / 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(UserError, match='lacks 1 BERT tensors'):
    hf_bert.from_hf(str(tmp_path / 'a'), str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def run_cli(*args, without_torch=None):
  """`python -m jaxssl.convert ARGS`; with `without_torch` (a scratch directory) as if torch were not installed."""
  path = [os.path.abspath(REPO)]
  if without_torch is not None:  # Python imports sitecustomize from the path at startup
    os.makedirs(without_torch, exist_ok=True)
    with open(os.path.join(without_torch, 'sitecustomize.py'), 'w') as f:
      f.write("import sys\nsys.modules['torch'] = None  # import torch fails\n")
    path.insert(0, str(without_torch))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(path))
  return subprocess.run([sys.executable, '-m', 'jaxssl.convert', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_transformers4_config_and_pytorch_bin(hf_model, hf_dir, converted, tmp_path):
  """config.json as transformers 4.46 wrote it (torch_dtype, position_embedding_type; values equal to
  PretrainedConfig's left out) with pytorch_model.bin weights: the same export as 5's layout with safetensors."""
  v5 = json.load(open(os.path.join(hf_dir, 'config.json')))
  assert 'dtype' in v5 and 'position_embedding_type' not in v5  # what transformers 5 writes
  v4 = {k: v for k, v in v5.items() if k not in ('dtype', 'tie_word_embeddings', 'is_decoder', 'add_cross_attention')
        and v is not None}
  v4.update(position_embedding_type='absolute', torch_dtype='float32', transformers_version='4.46.3')
  src = tmp_path / 'v4'
  src.mkdir()
  (src / 'config.json').write_text(json.dumps(v4, indent=2, sort_keys=True))
  torch.save(hf_model.state_dict(), src / 'pytorch_model.bin')
  write_vocab(src)
  out = str(tmp_path / 'params')
  hf_bert.from_hf(str(src), out)
  configs = [json.load(open(os.path.join(d, 'config.json'))) for d in (out, converted)]
  for c in configs:
    del c['converted_from']
  assert configs[0] == configs[1]
  ids, types, mask, positions = batch(2)
  args = [jnp.asarray(a, jnp.int32) for a in (ids, types, mask)]
  (_, ours, _), (_, reference, _) = (load_export(d, one_device()) for d in (out, converted))
  for a, b in zip(ours(*args, jnp.asarray(positions, jnp.int32)), reference(*args, jnp.asarray(positions, jnp.int32))):
    np.testing.assert_array_equal(a, b)
  # Without torch: one line saying how to re-save the checkpoint as safetensors.
  r = run_cli('from-hf', '--src', str(src), '--out', str(tmp_path / 'never'), without_torch=tmp_path / 'no_torch')
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error:'), r.stderr
  assert 'pip install torch' in lines[0]
  assert f'from transformers import BertForPreTraining; BertForPreTraining.from_pretrained({str(src)!r})' in lines[0]
  assert not os.path.exists(tmp_path / 'never')


def test_cli(hf_dir, tmp_path):
  out = str(tmp_path / 'params')
  r = run_cli('from-hf', '--src', hf_dir, '--out', out)
  assert r.returncode == 0, r.stderr
  assert json.load(open(os.path.join(out, 'config.json')))['model']['hidden_size'] == 32
  # Errors a user can cause: exit 2 with one `error:` line, nothing written.
  bin_only = tmp_path / 'bin_only'
  bin_only.mkdir()
  (bin_only / 'config.json').write_text(json.dumps({'model_type': 'bert', **HF_SIZES}))
  (bin_only / 'pytorch_model.bin').write_bytes(b'not a pickle')
  write_vocab(bin_only)
  swish = tmp_path / 'swish'
  swish.mkdir()
  (swish / 'config.json').write_text(json.dumps({'model_type': 'bert', 'hidden_act': 'swish', **HF_SIZES}))
  (swish / 'model.safetensors').write_bytes(b'not read')
  write_vocab(swish)
  damaged = tmp_path / 'damaged'  # 8 bytes that read as a header length of ~7e18 (was a MemoryError)
  damaged.mkdir()
  (damaged / 'config.json').write_text(json.dumps({'model_type': 'bert', **HF_SIZES}))
  (damaged / 'model.safetensors').write_bytes(b'not read')
  write_vocab(damaged)
  truncated = tmp_path / 'truncated'  # an interrupted download (was a ValueError traceback)
  truncated.mkdir()
  for name in ('config.json', 'vocab.txt'):
    shutil.copy(os.path.join(hf_dir, name), truncated / name)
  whole = open(os.path.join(hf_dir, 'model.safetensors'), 'rb').read()
  (truncated / 'model.safetensors').write_bytes(whole[:len(whole) // 2])
  resized = tmp_path / 'resized'  # config.json's sizes are not the weights'
  shutil.copytree(hf_dir, resized)
  (resized / 'config.json').write_text(json.dumps({'model_type': 'bert', **HF_SIZES, 'intermediate_size': 40}))
  for src, needle in ((bin_only, 'cannot read'), (swish, "hidden_act='swish'")):
    r = run_cli('from-hf', '--src', str(src), '--out', str(tmp_path / 'never'))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith('error:') and needle in lines[0], r.stderr
  # The same UserError path in this process (a job each costs the suite an interpreter and jax's import).
  for src, needle in ((damaged, 'is it a safetensors file?'), (truncated, 'is truncated: tensor'),
                      (resized, 'intermediate.dense.weight of shape (32, 37) cannot fill')):
    with pytest.raises(UserError, match=re.escape(needle)):
      hf_bert.from_hf(str(src), str(tmp_path / 'never'))
  assert not os.path.exists(tmp_path / 'never')
  r = run_cli('from-hf', '--src', hf_dir, '--out', out)  # an existing export is not overwritten
  assert r.returncode == 2 and '--overwrite' in r.stderr

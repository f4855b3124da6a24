"""HuggingFace DeBERTa-v3 -> jaxssl export (hf_deberta.py through `python -m jaxssl.convert from-hf`), against
transformers' DebertaV2ForMaskedLM / DebertaV2ForSequenceClassification on the same random weights: disentangled
attention (c2p + p2c from the shared relative embeddings, log-bucketed distances), no absolute positions and no
token types (v3), or both (position_biased_input); the MLM head under either name; the refusals."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_bert, hf_deberta  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.data import tokenizers  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.models import fused_attention, layers, relative_positions  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_albert import args_of  # noqa: E402
from test_convert_distilbert import one_device, randomised  # noqa: E402
from test_convert_electra import converted  # noqa: E402
from test_convert_hf import L, V, batch, close  # noqa: E402  (tests/ is on sys.path)

# Small buckets so that the 12-token batch reaches the log-spaced ones (offsets of 4 and more).
V3 = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
          max_position_embeddings=64, relative_attention=True, position_buckets=4, max_relative_positions=16,
          pos_att_type='p2c|c2p', share_att_key=True, norm_rel_ebd='layer_norm', position_biased_input=False,
          type_vocab_size=0, layer_norm_eps=1e-7)


@pytest.mark.parametrize('seq_len,buckets,max_position', [(700, 256, 512), (40, 4, 16), (40, 8, 64)])
def test_log_buckets_match_transformers(seq_len, buckets, max_position):
  """relative_index against transformers' build_relative_position + the clip both of its terms apply."""
  from transformers.models.deberta_v2 import modeling_deberta_v2 as hf
  x = torch.zeros(1, seq_len, 1)
  rel = hf.build_relative_position(x, x, bucket_size=buckets, max_position=max_position)[0].numpy()
  want = np.clip(rel + buckets, 0, 2 * buckets - 1)
  np.testing.assert_array_equal(relative_positions.relative_index(seq_len, buckets, max_position), want)


def hf_hidden(model, ids, types, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask),
                 output_hidden_states=True)


def assert_real_tokens_match(ours, out, args, mask, positions=None):
  """Every layer's hidden states at the real tokens (transformers zeroes padding's embeddings and masks its query
  rows, jaxssl leaves them: nothing reads them), and the MLM logits at `positions`."""
  valid = mask.astype(bool)
  _, _, our_hidden = ours.encode(*args, return_hidden_states=True)
  assert len(our_hidden) == len(out.hidden_states) == 3
  for i, (a, b) in enumerate(zip(our_hidden, out.hidden_states)):
    close(np.asarray(a)[valid], b.numpy()[valid], f'hidden state {i}')
  if positions is not None:
    our_mlm, _ = ours(*args, jnp.asarray(positions, jnp.int32))
    close(our_mlm, np.take_along_axis(out.logits.numpy(), positions[:, :, None], axis=1), 'MLM logits')


@pytest.mark.parametrize('legacy', [False, True])
def test_deberta_v3_matches_transformers(tmp_path, capsys, legacy):
  """DebertaV2ForMaskedLM laid out as v3 (no positions, no token types): hidden states and MLM logits, with the
  head as the DeBERTa checkpoints hold it (lm_predictions) and as transformers' legacy one (cls.predictions); to-hf
  writes a DebertaV2ForMaskedLM that transformers opens with the same logits."""
  torch.manual_seed(0)
  model = randomised(transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**V3, legacy=legacy)))
  export = converted(model, tmp_path, 'deberta')
  config, ours, _ = load_export(export, one_device())
  assert 'not used' not in capsys.readouterr().out
  m = config.model
  assert (m.position_buckets, m.max_relative_positions, m.absolute_positions, m.type_vocab_size) == (4, 16, False, 0)
  assert fused_attention.describe(m).endswith(', disentangled over 4 relative buckets')  # the jobs' banner
  assert not hasattr(ours, 'position_embeddings') and not hasattr(ours, 'token_type_embeddings')
  ids, types, mask, positions = batch()
  out = hf_hidden(model, ids, types, mask)
  assert_real_tokens_match(ours, out, args_of(ids, types, mask), mask, positions)
  hf_bert.to_hf(export, str(tmp_path / 'back'))
  back = transformers.DebertaV2ForMaskedLM.from_pretrained(tmp_path / 'back').eval()
  assert (back.config.legacy, back.config.position_buckets, back.config.position_biased_input) == (False, 4, False)
  close(hf_hidden(back, ids, types, mask).logits.numpy(), out.logits.numpy(), 'MLM logits written back')


def test_absolute_positions_token_types_and_classifier_checkpoint(tmp_path, capsys):
  """A DebertaV2ForSequenceClassification with absolute positions and two token types beside the relative
  attention: the body matches (pair segments included); its GELU pooler and classifier are named as unused; the
  body written back by to-hf is transformers' again."""
  torch.manual_seed(1)
  cfg = transformers.DebertaV2Config(**dict(V3, position_biased_input=True, type_vocab_size=2, position_buckets=8,
                                            max_relative_positions=64))
  model = randomised(transformers.DebertaV2ForSequenceClassification(cfg))
  export = converted(model, tmp_path, 'deberta_cls')
  printed = capsys.readouterr().out
  assert 'pooler.dense.weight' in printed and 'classifier.weight' in printed
  _, ours, _ = load_export(export, one_device())
  ids, types, mask, _ = batch(1)
  want = hf_hidden(model.deberta, ids, types, mask)
  assert_real_tokens_match(ours, want, args_of(ids, types, mask), mask)
  hf_bert.to_hf(export, str(tmp_path / 'back'))
  back = transformers.DebertaV2Model.from_pretrained(tmp_path / 'back').eval()
  valid = mask.astype(bool)
  close(hf_hidden(back, ids, types, mask).last_hidden_state.numpy()[valid], want.last_hidden_state.numpy()[valid],
        'body written back')


@pytest.mark.parametrize('change,match', [
    (dict(conv_kernel_size=3), 'conv_kernel_size=3'),
    (dict(share_att_key=False), 'share_att_key=false'),
    (dict(pos_att_type='c2p'), "pos_att_type='c2p'"),
    (dict(position_buckets=-1), 'position_buckets=-1'),
    (dict(norm_rel_ebd='none'), "norm_rel_ebd='none'"),
    (dict(relative_attention=False), "pos_att_type='p2c|c2p' without relative_attention"),
    (dict(embedding_size=16), 'embedding_size=16'),
])
def test_refusals(change, match):
  """The DeBERTa variants jaxssl does not compute end in one line naming the key."""
  with pytest.raises(UserError, match=match):
    hf_deberta.bert_config(dict(V3, model_type='deberta-v2', **change))


def test_config_defaults_and_no_relative_attention():
  """DebertaV2Config's defaults (no relative attention, absolute positions) give a BERT with no token types;
  max_relative_positions -1 means max_position_embeddings."""
  m = hf_bert.jaxssl_config({'model_type': 'deberta-v2'}).model
  assert (m.position_buckets, m.absolute_positions, m.type_vocab_size, m.layer_norm_eps) == (0, True, 0, 1e-7)
  m = hf_bert.jaxssl_config(dict(V3, model_type='deberta-v2', max_relative_positions=-1)).model
  assert (m.position_buckets, m.max_relative_positions, L <= m.max_position) == (4, 64, True)


TEXTS = ['hello world, a movie!', '  Two  spaces\tand a tab\nnew line ', 'Café naïve — ｆｕｌｌ width 12345',
         'The QUICK brown fox: (jumps) over... the lazy dog?', 'Cafe\u0301 decomposed', '']


@pytest.fixture(scope='module')
def spm_model(tmp_path_factory):
  """A sentencepiece unigram model laid out as DeBERTa-v3's: [PAD] 0, [CLS] 1, [SEP] 2, [UNK] 3, no [MASK] piece."""
  spm = pytest.importorskip('sentencepiece')
  d = tmp_path_factory.mktemp('spm')
  with open(os.path.join(os.path.dirname(__file__), '..', 'README.md')) as f:
    (d / 'corpus.txt').write_text(f.read())
  spm.SentencePieceTrainer.train(input=str(d / 'corpus.txt'), model_prefix=str(d / 'spm'), vocab_size=300,
                                 model_type='unigram', hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2,
                                 unk_id=3, pad_piece='[PAD]', bos_piece='[CLS]', eos_piece='[SEP]',
                                 unk_piece='[UNK]', minloglevel=2)
  processor = spm.SentencePieceProcessor(model_file=str(d / 'spm.model'))
  return str(d / 'spm.model'), [(processor.id_to_piece(i), processor.get_score(i))
                                for i in range(processor.get_piece_size())]


def test_hub_folder_with_spm_model_only(tmp_path, capsys, spm_model):
  """deberta-v3 as the hub has it: spm.model and tokenizer_config.json, no tokenizer.json. The import builds the
  tokenizer.json that transformers 5's DebertaV2Tokenizer builds from the pieces: the same ids (runs of spaces,
  tabs, accents, full-width letters), [CLS] 1 / [SEP] 2 / [PAD] 0, [MASK] after the last piece; the export keeps
  the padded embedding; the unused position table such files carry is left out without a warning."""
  path, vocab = spm_model
  torch.manual_seed(3)
  model = transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(**dict(V3, vocab_size=len(vocab) + 7)))
  hub = tmp_path / 'hub'
  model.save_pretrained(hub)
  # The v3 files on the hub also hold a position table that position_biased_input=false leaves unused.
  tensors = safetensors.numpy.load_file(hub / 'model.safetensors')
  tensors['deberta.embeddings.position_embeddings.weight'] = np.ones((64, 32), np.float32)
  safetensors.numpy.save_file(tensors, hub / 'model.safetensors', metadata={'format': 'pt'})
  shutil.copy(path, hub / 'spm.model')
  (hub / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'DebertaV2Tokenizer',
                                                         'do_lower_case': False, 'vocab_type': 'spm'}))
  convert_main(['from-hf', '--src', str(hub), '--out', str(tmp_path / 'params')])
  assert 'not used' not in capsys.readouterr().out
  assert not (hub / 'tokenizer.json').exists()  # the source folder is not written to
  ours, theirs = tokenizers.load_tokenizer(str(tmp_path / 'params')), transformers.DebertaV2Tokenizer(vocab=vocab)
  assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id) == (1, 2, 0, len(vocab)) == (
      theirs.cls_token_id, theirs.sep_token_id, theirs.pad_token_id, theirs.mask_token_id)
  assert ours.encode(TEXTS) == [theirs(t, add_special_tokens=False)['input_ids'] for t in TEXTS]
  config, _, _ = load_export(str(tmp_path / 'params'), one_device())
  assert config.vocab_size == len(vocab) + 7


def test_spm_tokenizer_lower_case_and_punctuation(spm_model):
  """tokenizer_config.json's do_lower_case and split_by_punct, as transformers' DebertaV2Tokenizer applies them."""
  path, vocab = spm_model
  settings = dict(hf_deberta._token_settings('/nonexistent'), do_lower_case=True, split_by_punct=True)
  ours = hf_deberta.spm_tokenizer(path, settings)
  theirs = transformers.DebertaV2Tokenizer(vocab=vocab, do_lower_case=True, split_by_punct=True)
  for text in TEXTS:
    assert ours.encode(text).ids == theirs(text)['input_ids'], text


@pytest.mark.parametrize('seq_len,rate', [(1, 0.0), (2, 0.0), (7, 0.0), (40, 0.0), (40, 0.5)])
def test_disentangled_scores_equal_their_definition(seq_len, rate):
  """DisentangledBias's offset rows + skew against the definition: c2p(i, j) = q_i . Kr[index[i, j]] and
  p2c(i, j) = k_j . Qr[index[i, j]] (transformers' gathers), with log buckets and clipping reached (S = 8); in
  training the table is dropped out first (transformers' pos_dropout), with a mask of its own."""
  rng = np.random.default_rng(seq_len)
  n, d, h = 2, 3, 6
  table = rng.normal(size=(16, h)).astype(np.float32)
  index = relative_positions.relative_index(seq_len, 8, 24)
  q, k = (rng.normal(size=(2, seq_len, n, d)).astype(np.float32) for _ in range(2))
  kernels = {name: rng.normal(size=(h, n, d)).astype(np.float32) for name in ('query', 'key')}
  project = lambda x, name: jnp.einsum('blh,hnd->blnd', x, kernels[name])  # noqa: E731
  key = jax.random.key(3) if rate else None
  q_scaled, scores = relative_positions.DisentangledBias(jnp.asarray(table), index, rate)(q, k, project, key)
  if rate:
    dropped = np.asarray(layers.dropout(jnp.asarray(table), rate, jax.random.fold_in(key, 1)))
    assert 0 < (dropped == 0).mean() < 1
    table = dropped
  kr, qr = table @ kernels['key'].reshape(h, -1), table @ kernels['query'].reshape(h, -1)
  kr, qr = kr.reshape(16, n, d), qr.reshape(16, n, d)
  want = (np.einsum('bind,ijnd->bnij', q, kr[index]) + np.einsum('bjnd,ijnd->bnij', k, qr[index])) / np.sqrt(3 * d)
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(q_scaled), q / np.sqrt(3), rtol=1e-6)

"""HuggingFace XLM-R (RoBERTa layout, sentencepiece Unigram tokenizer) -> jaxssl export, against transformers."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')

from jaxssl.convert import __main__ as convert_main  # noqa: E402
from jaxssl.convert import hf_bert  # noqa: E402
from jaxssl.data import tokenizers as tok_lib  # noqa: E402
from jaxssl.data import wordpiece  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from jaxssl.mesh import make_mesh  # noqa: E402

LINES = [
    'The quick brown fox jumps over the lazy dog.',
    'Language models learn the structure of text from raw data.',
    'Pretraining on many languages helps transfer between them.',
    'A small model is enough for a parity test.',
    '今天天气很好，我们去公园散步。',
    '机器学习模型从大量文本中学习语言的结构。',
    '北京是中国的首都，也是一座历史悠久的城市。',
    '我喜欢读书和听音乐。',
]
SENTENCES = ['The lazy dog learns text.', '我们学习语言。',
             'Models transfer between many languages, 今天很好.']
# XLM-R's special tokens and ids: <s> <pad> </s> <unk> first, <mask> last.
SPECIALS = ['<s>', '<pad>', '</s>', '<unk>']


def write_tokenizer(directory):
  """A tiny XLM-R-style tokenizer.json (Unigram + Metaspace, as XLM-R's) and tokenizer_config.json."""
  tok = tokenizers.SentencePieceUnigramTokenizer()
  tok.train_from_iterator(LINES * 4, vocab_size=160, special_tokens=SPECIALS, unk_token='<unk>', show_progress=False)
  tok.add_special_tokens(['<mask>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  config = {'tokenizer_class': 'XLMRobertaTokenizer', 'bos_token': '<s>', 'eos_token': '</s>', 'cls_token': '<s>',
            'sep_token': '</s>', 'pad_token': '<pad>', 'unk_token': '<unk>', 'mask_token': '<mask>',
            'model_max_length': 64}
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f)
  return tok.get_vocab_size()


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('xlmr'))
  vocab = write_tokenizer(directory)
  torch.manual_seed(0)
  config = transformers.XLMRobertaConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      layer_norm_eps=1e-5)
  model = transformers.XLMRobertaForMaskedLM(config).eval()
  with torch.no_grad():  # random LayerNorm/bias values: a swapped scale/bias or a missed bias would show
    for name, p in model.named_parameters():
      if 'norm' in name.lower() or name.endswith('bias'):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(directory, safe_serialization=True)
  return directory, model


@pytest.fixture(scope='module')
def converted(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('conv') / 'params')
  convert_main.main(['from-hf', '--src', hf_dir[0], '--out', out])
  return out


def close(ours, theirs, what):
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, what
  tol = 1e-5 * max(1.0, float(np.abs(theirs).max()))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=tol, err_msg=what)


def test_tokenizer_roles_and_ids_match_transformers(hf_dir):
  directory, _ = hf_dir
  ours = tok_lib.load_tokenizer(directory)
  assert isinstance(ours, wordpiece.WordPieceTokenizer)
  assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id) == (0, 1, 2, 3)
  assert ours.mask_id == ours.vocab_size - 1
  assert ours.random_token_range == (4, ours.vocab_size - 1)
  theirs = transformers.AutoTokenizer.from_pretrained(directory)
  expected = theirs(SENTENCES)['input_ids']
  assert [[ours.cls_id] + ids + [ours.sep_id] for ids in ours.encode(SENTENCES)] == expected
  assert '我' in [ours.id_to_piece(i) for i in ours.encode_one(SENTENCES[1])]  # Chinese pieces really occur
  # Offsets: a lone '▁' (whitespace only) gets an empty span, '▁la' covers 'la' without the space.
  for text in ('The lazy dog', '我们学习语言。'):
    ids, spans = ours.encode_with_offsets([text])[0]
    assert ids == ours.encode_one(text)
    assert ''.join(text[a:b] for a, b in spans) == text.replace(' ', '')
    assert all(a == b for i, (a, b) in zip(ids, spans) if ours.id_to_piece(i) == '\u2581')


def test_from_hf_matches_transformers(hf_dir, converted):
  directory, hf_model = hf_dir
  config, model, tokenizer = load_export(converted, make_mesh((1, 1, 1), jax.devices()[:1]))
  assert config.model.max_position == 64 and config.model.layer_norm_eps == 1e-5
  assert tokenizer.cls_id == 0 and tokenizer.sep_id == 2
  rows = [[tokenizer.cls_id] + ids + [tokenizer.sep_id] for ids in tokenizer.encode(SENTENCES)]
  length = max(map(len, rows)) + 2  # right padding on every row
  ids = np.full((len(rows), length), tokenizer.pad_id, np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  mask = (ids != tokenizer.pad_id).astype(np.int64)
  with torch.no_grad():
    out = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
  hidden, logits = [h.numpy() for h in out.hidden_states], out.logits.numpy()
  # Segment B (type 1) must change nothing, as in RoBERTa: the single token-type row was repeated.
  types = np.zeros_like(ids)
  types[:, 3:] = 1
  args = [jnp.asarray(a, jnp.int32) for a in (ids, types * mask, mask)]
  _, _, our_hidden = model.encode(*args, return_hidden_states=True)
  assert len(our_hidden) == len(hidden) == 3
  real = mask.astype(bool)  # padding positions differ (HF puts them all at row 1) and are masked out
  for i, (a, b) in enumerate(zip(our_hidden, hidden)):
    close(np.asarray(a)[real], b[real], f'hidden state {i}')
  positions = np.stack([np.arange(6)] * len(rows))
  our_mlm, _ = model(*args, jnp.asarray(positions, jnp.int32))
  close(our_mlm, np.take_along_axis(logits, positions[:, :, None], axis=1), 'MLM logits')


def test_roberta_tensors_and_config():
  hf = {'model_type': 'xlm-roberta', 'num_hidden_layers': 1, 'hidden_size': 8, 'num_attention_heads': 2,
        'intermediate_size': 16, 'max_position_embeddings': 514, 'type_vocab_size': 1, 'pad_token_id': 1,
        'vocab_size': 10, 'layer_norm_eps': 1e-5}
  config = hf_bert.jaxssl_config(hf)
  assert (config.model.max_position, config.model.type_vocab_size) == (512, 2)
  assert hf_bert.position_offset(hf) == 2 and hf_bert.position_offset({'model_type': 'bert'}) == 0
  pos = np.arange(514 * 2, dtype=np.float32).reshape(514, 2)
  out = hf_bert.roberta_to_bert_tensors(
      {'roberta.embeddings.position_embeddings.weight': pos, 'roberta.embeddings.token_type_embeddings.weight':
       np.ones((1, 2), np.float32), 'lm_head.layer_norm.weight': np.ones(2), 'lm_head.bias': np.ones(10)}, 2, 2)
  np.testing.assert_array_equal(out['bert.embeddings.position_embeddings.weight'], pos[2:])
  assert out['bert.embeddings.token_type_embeddings.weight'].shape == (2, 2)
  assert 'cls.predictions.transform.LayerNorm.weight' in out and 'cls.predictions.bias' in out
  # BERT configs are unchanged (no layer_norm_eps key added).
  assert 'layer_norm_eps' not in hf_bert.jaxssl_config({**hf, 'model_type': 'bert', 'layer_norm_eps': 1e-12}).model


def test_finetuning_steps_match_transformers(hf_dir, converted):
  """The fine-tune job's train step (packed tagging batches, clipping, AdamW with its decay mask and BERT's
  schedule) against transformers' XLMRobertaForTokenClassification + torch AdamW + get_linear_schedule_with_warmup
  on padded batches: the same loss at every step and the same params after them (dropout off on both sides)."""
  import ml_collections
  from jaxssl.tasks import tagging
  from jaxssl.tasks.base import Example
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import finetune, length_buckets, packing
  from jaxssl.train import state as state_lib
  directory, _ = hf_dir
  rng = np.random.default_rng(0)
  words = [s.split()[:5] for s in LINES[:4]] + [list(s[:6]) for s in LINES[4:]]  # Chinese: a word per character
  tags = ['n', 'v', 'w', 'u', 'd']
  examples = [Example(tokens=w, tags=[tags[i] for i in rng.integers(0, 5, len(w))]) for w in words]
  tokenizer = tok_lib.load_tokenizer(converted)
  features, _ = tagging.featurize(None, examples, tokenizer, 32, tags)
  lengths = length_buckets.real_lengths(features)  # as the job measures them

  saved = ckpt_lib.read_export_config(converted)
  model_cfg = ml_collections.ConfigDict(saved['model'])
  model_cfg.update(dropout_rate=0.0, attention_dropout_rate=0.0)
  mesh = make_mesh((1, 1, 1), jax.devices()[:1])
  setup = finetune.task_model_setup(model_cfg, saved['vocab_size'], 'tagging', len(tags), mesh, 0, 0.0)
  theirs = transformers.XLMRobertaForTokenClassification.from_pretrained(
      directory, num_labels=len(tags), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
      classifier_dropout=0.0)
  head = {'kernel': jnp.asarray(theirs.classifier.weight.detach().numpy().T),
          'bias': jnp.asarray(theirs.classifier.bias.detach().numpy())}
  params = {'head': head, 'body': ckpt_lib.load_export_params(converted, setup.abstract_params['body'])}
  tc = ml_collections.ConfigDict(dict(grad_clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.1,
                                      learning_rate=3e-3, end_learning_rate=0.0, warmup_steps=2, steps=6))
  tx, schedule = state_lib.make_optimizer(tc), state_lib.make_schedule(tc)
  state = state_lib.init_state(setup, tx, params)
  step, _, batch_keys = finetune.make_train_step(setup, tx, schedule, tagging.KIND, mesh, features, packed=True)

  decayed = [p for n, p in theirs.named_parameters() if not ('bias' in n or 'LayerNorm' in n)]
  kept = [p for n, p in theirs.named_parameters() if 'bias' in n or 'LayerNorm' in n]
  opt = torch.optim.AdamW([{'params': decayed, 'weight_decay': 0.1}, {'params': kept, 'weight_decay': 0.0}],
                          lr=3e-3, eps=1e-6)
  sched = transformers.get_linear_schedule_with_warmup(opt, 2, 6)
  theirs.train()
  for s in range(6):
    rows = rng.choice(len(examples), 6, replace=False)
    packed = packing.pack(features, rows, lengths, 32, 1, batch_keys)
    assert packed['input_ids'].shape[0] < 6  # several sentences share a row
    state, metrics = step(state, {k: jnp.asarray(v) for k, v in packed.items()})
    labels = torch.tensor(features['labels'][rows], dtype=torch.long)
    out = theirs(input_ids=torch.tensor(features['input_ids'][rows], dtype=torch.long),
                 attention_mask=torch.tensor(features['attention_mask'][rows]),
                 labels=labels.masked_fill(labels < 0, -100))
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
    opt.step()
    sched.step()
    np.testing.assert_allclose(float(metrics['loss']), out.loss.item(), rtol=2e-5, err_msg=f'loss at step {s}')
  close(state['params']['head']['kernel'], theirs.classifier.weight.detach().numpy().T, 'head kernel after 6 steps')
  close(state['params']['body']['word_embeddings']['embedding'],
        theirs.roberta.embeddings.word_embeddings.weight.detach().numpy(), 'word embeddings after 6 steps')


def byte_level_bpe(directory, specials):
  """A RoBERTa-style byte-level BPE tokenizer.json with `specials` first, and no tokenizer_config.json (roberta-base
  as the hub has it)."""
  tok = tokenizers.ByteLevelBPETokenizer()
  tok.train_from_iterator(LINES[:4] * 8, vocab_size=300, special_tokens=specials, show_progress=False)
  tok.save(os.path.join(directory, 'tokenizer.json'))


def test_encoder_roles_without_tokenizer_config(tmp_path):
  """roberta-base, xlm-roberta-base and camembert-base ship no tokenizer_config.json: their <s> </s> <pad> <unk>
  <mask> must still serve as [CLS] [SEP] [PAD] [UNK] [MASK] (they read as a decoder's BPE whose every role was
  </s>: fine-tuning ran on </s> text </s> padded with </s>). Decoders' tokenizers keep their own roles."""
  roberta = str(tmp_path / 'roberta')
  os.makedirs(roberta)
  byte_level_bpe(roberta, ['<s>', '<pad>', '</s>', '<unk>', '<mask>'])
  with open(os.path.join(roberta, 'config.json'), 'w') as f:  # what AutoTokenizer picks RobertaTokenizerFast by
    json.dump({'model_type': 'roberta'}, f)
  ours = tok_lib.load_tokenizer(roberta)
  assert isinstance(ours, wordpiece.WordPieceTokenizer)
  assert (ours.cls_id, ours.pad_id, ours.sep_id, ours.unk_id, ours.mask_id) == (0, 1, 2, 3, 4)
  theirs = transformers.AutoTokenizer.from_pretrained(roberta)
  assert type(theirs).__name__.startswith('RobertaTokenizer')
  assert [[ours.cls_id] + ids + [ours.sep_id] for ids in ours.encode(SENTENCES[:1])] == theirs(SENTENCES[:1])[
      'input_ids']
  # ALBERT's (albert-base-v2: a Unigram with <pad> <unk> [CLS] [SEP] [MASK], no tokenizer_config.json either).
  albert = str(tmp_path / 'albert')
  os.makedirs(albert)
  tok = tokenizers.SentencePieceUnigramTokenizer()
  tok.train_from_iterator(LINES * 4, vocab_size=120, unk_token='<unk>', show_progress=False,
                          special_tokens=['<pad>', '<unk>', '[CLS]', '[SEP]', '[MASK]'])
  tok.save(os.path.join(albert, 'tokenizer.json'))
  ours = tok_lib.load_tokenizer(albert)
  assert isinstance(ours, wordpiece.WordPieceTokenizer)
  assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == (0, 1, 2, 3, 4)
  # Gemma's specials include <mask> but with <bos> / <eos>; Llama 2's <s> </s> come without <mask>; a config that
  # names a decoder's roles wins: none of them is an encoder's.
  for name, specials, config in (('gemma', ['<pad>', '<eos>', '<bos>', '<unk>', '<mask>'], None),
                                 ('llama2', ['<unk>', '<s>', '</s>'], None),
                                 ('named', ['<s>', '</s>', '<unk>', '<mask>'], {'bos_token': '<s>', 'eos_token': '</s>'})):
    directory = str(tmp_path / name)
    os.makedirs(directory)
    byte_level_bpe(directory, specials)
    if config:
      with open(os.path.join(directory, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f)
    assert not isinstance(tok_lib.load_tokenizer(directory), wordpiece.WordPieceTokenizer), name


def test_camembert_matches_transformers(tmp_path):
  """CamemBERT (model_type 'camembert': RoBERTa's layout) with camembert-base's odd special tokens (<s>NOTUSED,
  </s>NOTUSED ahead of the real <s> </s>) and, as on the hub, no tokenizer_config.json: the roles, the ids and the
  hidden states and MLM logits of transformers' CamembertForMaskedLM."""
  directory = str(tmp_path / 'camembert')
  os.makedirs(directory)
  tok = tokenizers.SentencePieceUnigramTokenizer()
  tok.train_from_iterator(LINES * 4, vocab_size=160, unk_token='<unk>', show_progress=False,
                          special_tokens=['<s>NOTUSED', '<pad>', '</s>NOTUSED', '<unk>', '<s>', '</s>'])
  tok.add_special_tokens(['<mask>'])
  tok.save(os.path.join(directory, 'tokenizer.json'))
  torch.manual_seed(1)
  config = transformers.CamembertConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1, bos_token_id=4,
      eos_token_id=5, layer_norm_eps=1e-5)
  hf_model = transformers.CamembertForMaskedLM(config).eval()
  hf_model.save_pretrained(directory, safe_serialization=True)
  out = str(tmp_path / 'params')
  convert_main.main(['from-hf', '--src', directory, '--out', out])
  _, model, tokenizer = load_export(out, make_mesh((1, 1, 1), jax.devices()[:1]))
  assert (tokenizer.cls_id, tokenizer.pad_id, tokenizer.sep_id, tokenizer.unk_id) == (4, 1, 5, 3)
  assert tokenizer.mask_id == tokenizer.vocab_size - 1
  rows = [[tokenizer.cls_id] + ids + [tokenizer.sep_id] for ids in tokenizer.encode(SENTENCES)]
  assert rows == transformers.AutoTokenizer.from_pretrained(directory)(SENTENCES)['input_ids']
  ids = np.full((len(rows), max(map(len, rows)) + 2), tokenizer.pad_id, np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  mask = (ids != tokenizer.pad_id).astype(np.int64)
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), output_hidden_states=True)
  args = [jnp.asarray(a, jnp.int32) for a in (ids, np.zeros_like(ids), mask)]
  _, _, our_hidden = model.encode(*args, return_hidden_states=True)
  real = mask.astype(bool)
  close(np.asarray(our_hidden[-1])[real], theirs.hidden_states[-1].numpy()[real], 'last hidden state')
  positions = np.stack([np.arange(6)] * len(rows))
  our_mlm, _ = model(*args, jnp.asarray(positions, jnp.int32))
  close(our_mlm, np.take_along_axis(theirs.logits.numpy(), positions[:, :, None], axis=1), 'MLM logits')

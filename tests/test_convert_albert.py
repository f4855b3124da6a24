"""HuggingFace ALBERT and ERNIE -> jaxssl export (hf_albert.py, hf_ernie.py through `python -m jaxssl.convert
from-hf`), against transformers' AlbertForMaskedLM / AlbertForPreTraining / ErnieForMaskedLM on the same random
weights: ALBERT's shared layers repeated (one group and two), its factorised embeddings and tanh GELU; ERNIE 1.0's
ReLU and its task-type table folded into the token types."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_albert, hf_bert  # noqa: E402
from jaxssl.convert.__main__ import main as convert_main  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402
from jaxssl.models.bert import BertConfig  # noqa: E402
from jaxssl.train.checkpoint import load_export  # noqa: E402
from test_convert_distilbert import assert_states_and_mlm_logits_match, one_device, randomised  # noqa: E402
from test_convert_electra import converted  # noqa: E402
from test_convert_hf import V, batch, close  # noqa: E402  (tests/ is on sys.path)

ALBERT = dict(vocab_size=V, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=37, max_position_embeddings=64)


def args_of(ids, types, mask):
  return [jnp.asarray(a, jnp.int32) for a in (ids, types, mask)]


def test_albert_matches_transformers(tmp_path):
  """AlbertForMaskedLM (one shared layer, two layers deep): every layer's hidden states and the MLM logits (its
  head is hidden_act's too)."""
  torch.manual_seed(0)
  model = randomised(transformers.AlbertForMaskedLM(transformers.AlbertConfig(**ALBERT)))
  config, ours, _ = load_export(converted(model, tmp_path, 'albert'), one_device())
  assert (config.model.embedding_size, config.model.hidden_act, config.model.dropout_rate) == (16, 'gelu_new', 0.0)
  ids, types, mask, positions = batch()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  assert_states_and_mlm_logits_match(ours, out, args_of(ids, types, mask), positions)


def test_albert_groups_pretraining_head_and_refusals(tmp_path, capsys):
  """AlbertForPreTraining with 4 layers in 2 groups (layers 0-1 share group 0's weights, 2-3 group 1's): the body
  and pooler match; the sentence-order head is named as unused and the NSP head is new. Inner groups and a
  to-hf of factorised embeddings are refused in one line each."""
  torch.manual_seed(1)
  cfg = transformers.AlbertConfig(**dict(ALBERT, num_hidden_layers=4, num_hidden_groups=2))
  model = randomised(transformers.AlbertForPreTraining(cfg))
  export = converted(model, tmp_path, 'albert_pt')
  printed = capsys.readouterr().out
  assert 'sop_classifier.classifier.weight' in printed and 'NSP classifier' in printed
  _, ours, _ = load_export(export, one_device())
  ids, types, mask, _ = batch(1)
  with torch.no_grad():
    want = model.albert(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                        attention_mask=torch.tensor(mask))
  seq, pooled = ours.encode(*args_of(ids, types, mask))
  close(seq, want.last_hidden_state.numpy(), 'last hidden state')
  close(pooled, want.pooler_output.numpy(), 'pooled')
  with pytest.raises(UserError, match='inner_group_num=2'):
    hf_albert.bert_config(dict(ALBERT, model_type='albert', inner_group_num=2))
  with pytest.raises(UserError, match='num_hidden_groups=3'):
    hf_albert.bert_config(dict(ALBERT, model_type='albert', num_hidden_groups=3))
  with pytest.raises(UserError, match='factorised embeddings'):
    hf_bert.to_hf(export, str(tmp_path / 'back'))


def test_ernie_matches_transformers_and_writes_back(tmp_path):
  """ErnieForMaskedLM as ERNIE 1.0 (ReLU) with a task-type table: hidden states and MLM logits at transformers'
  default task type 0; to-hf writes a BertForPreTraining with hidden_act relu that computes the same."""
  torch.manual_seed(2)
  cfg = transformers.ErnieConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=37, max_position_embeddings=64, hidden_act='relu',
                                 use_task_id=True)
  model = randomised(transformers.ErnieForMaskedLM(cfg))
  with torch.no_grad():
    model.ernie.embeddings.task_type_embeddings.weight.normal_()  # row 0 matters: far from zero
  export = converted(model, tmp_path, 'ernie')
  config, ours, _ = load_export(export, one_device())
  assert config.model.hidden_act == 'relu'
  ids, types, mask, positions = batch()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask),
                output_hidden_states=True)
  assert_states_and_mlm_logits_match(ours, out, args_of(ids, types, mask), positions)
  hf_bert.to_hf(export, str(tmp_path / 'back'))
  back = transformers.BertModel.from_pretrained(tmp_path / 'back').eval()
  assert back.config.hidden_act == 'relu'
  with torch.no_grad():
    again = back(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types), attention_mask=torch.tensor(mask))
  valid = mask.astype(bool)
  close(again.last_hidden_state.numpy()[valid], out.hidden_states[-1].numpy()[valid], 'BERT written back')
  with pytest.raises(UserError, match="hidden_act='swish'"):
    hf_bert.jaxssl_config({'model_type': 'bert', 'hidden_act': 'swish'})
  with pytest.raises(UserError, match=r"model.hidden_act='swish': use one of \['gelu', 'gelu_new', 'relu'\]"):
    BertConfig.from_config(dict(config.model.to_dict(), hidden_act='swish'), V)  # an export's config edited by hand
  assert np.isfinite(np.asarray(ours.encode(*args_of(ids, types, mask))[0])).all()

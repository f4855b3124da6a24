"""config.json as transformers 4 and 5 write it, and keys it omits: jaxssl.convert.hf_defaults against transformers.

The defaults table must equal the installed transformers' config classes (so a transformers release that changes
one shows here), and a config in transformers 4's layout must give the same jaxssl config as the same model in 5's.
End-to-end checks with weights and logits: tests/test_convert_llama.py, tests/test_convert_hf.py.
"""
import copy
import dataclasses

import pytest

transformers = pytest.importorskip('transformers')

from jaxssl.convert import hf_bert, hf_defaults, hf_gpt2, hf_llama  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def config_class(model_type):
  return type(transformers.AutoConfig.for_model(model_type))


@pytest.mark.parametrize('model_type', sorted(hf_defaults.DEFAULTS))
def test_defaults_equal_the_installed_transformers(model_type):
  cls = config_class(model_type)
  fields = {f.name: f.default for f in dataclasses.fields(cls)}
  for key, value in hf_defaults.DEFAULTS[model_type].items():
    want = cls.default_theta if key == 'rope_theta' else fields.get(key, 'not a field')
    assert value == want and type(value) is type(want), (model_type, key, value, want)
  # The derived defaults: what transformers' config holds once built from nothing.
  ours, theirs = hf_defaults.with_defaults({}, model_type), cls()
  for key in ('head_dim', 'num_key_value_heads'):
    if key in ours:
      assert ours[key] == getattr(theirs, key, theirs.hidden_size // theirs.num_attention_heads), (model_type, key)
  # The keys the importers read all have a default (a KeyError here would mean an omitted key crashes).
  if model_type in hf_defaults.LLAMA_FAMILY:
    got = hf_llama.model_config_from_hf({'model_type': model_type, 'sliding_window': None})
    assert (got['max_position'], got['tie_embeddings']) == (theirs.max_position_embeddings,
                                                            theirs.tie_word_embeddings)
    assert got['num_kv_heads'] == theirs.num_key_value_heads and got['rope_theta'] == cls.default_theta
  elif model_type == 'gpt2':
    got = hf_gpt2.model_config_from_hf({'model_type': 'gpt2'})
    assert (got['max_position'], got['intermediate_size']) == (theirs.n_positions, 4 * theirs.n_embd)
  else:
    got = hf_bert.jaxssl_config({'model_type': model_type}).model
    offset = theirs.pad_token_id + 1 if model_type in (*hf_bert.ROBERTA_TYPES, 'mpnet') else 0
    assert got.max_position == theirs.max_position_embeddings - offset


def test_encoder_types_are_the_bert_importers():
  """The convert job routes these to hf_bert (hf_defaults.ENCODER_TYPES): exactly the types hf_bert imports."""
  assert sorted(hf_defaults.ENCODER_TYPES) == sorted({'bert', *hf_bert.ROBERTA_TYPES, *hf_bert.BERT_UNDER_OTHER_NAMES})


def test_model_types_own_defaults():
  """The ones that differ between model types, spelled out (transformers' own documentation of them)."""
  resolved = {t: hf_defaults.with_defaults(dict(SMALL), t) for t in hf_defaults.DEFAULTS}
  assert {t: c.get('max_position_embeddings', c.get('n_positions')) for t, c in resolved.items()} == {
      'llama': 2048, 'mistral': 131072, 'qwen2': 32768, 'qwen3': 32768, 'gpt2': 1024, 'bert': 512, 'roberta': 512,
      'xlm-roberta': 512, 'camembert': 512, 'distilbert': 512, 'electra': 512, 'mpnet': 512, 'albert': 512,
      'ernie': 512, 'deberta-v2': 512}
  assert {t: c['tie_word_embeddings'] for t, c in resolved.items()} == {
      'llama': False, 'mistral': False, 'qwen2': False, 'qwen3': False, 'gpt2': True, 'bert': True, 'roberta': True,
      'xlm-roberta': True, 'camembert': True, 'distilbert': True, 'electra': True, 'mpnet': True, 'albert': True,
      'ernie': True, 'deberta-v2': True}
  assert {t: resolved[t]['num_key_value_heads'] for t in hf_defaults.LLAMA_FAMILY} == {
      'llama': 4, 'mistral': 8, 'qwen2': 32, 'qwen3': 32}
  # head_dim = hidden / heads, except Qwen3's own default of 128.
  assert {t: resolved[t]['head_dim'] for t in hf_defaults.LLAMA_FAMILY} == {
      'llama': 16, 'mistral': 16, 'qwen2': 16, 'qwen3': 128}
  # An explicit null is not an omission: transformers derives it (Mistral: num_key_value_heads = heads, not 8).
  assert hf_defaults.with_defaults(dict(SMALL, num_key_value_heads=None, head_dim=None), 'mistral')[
      'num_key_value_heads'] == 4
  # GPT-2's other spellings (GPT2Config.attribute_map).
  got = hf_gpt2.model_config_from_hf({'model_type': 'gpt2', 'hidden_size': 64, 'num_attention_heads': 4,
                                      'num_hidden_layers': 3, 'max_position_embeddings': 128})
  assert (got['hidden_size'], got['num_heads'], got['num_layers'], got['max_position']) == (64, 4, 3, 128)


def transformers4_llama_family(v5: dict, rope_key: str = 'rope_type') -> dict:
  """A Llama/Qwen2/Mistral config.json in transformers 4.46's layout, from the 5.x one of the same model: rope_theta
  at the top level, the rest of the RoPE dict as rope_scaling (null for the default RoPE; Mistral 4.x had no
  rope_scaling), torch_dtype, no layer_types, null pad_token_id left out (4.x wrote only values that differ from
  PretrainedConfig's). rope_key 'type' writes the RoPE type as transformers before 4.45 did; 'type+rope_type' as
  4.45+ did for a config that came with 'type' (LlamaConfig copied it to rope_type)."""
  out = {k: v for k, v in v5.items() if k not in ('rope_parameters', 'dtype', 'layer_types')}
  rope = dict(v5['rope_parameters'])
  out['rope_theta'] = rope.pop('rope_theta')
  kind = rope.pop('rope_type')
  rope.pop('type', None)
  if v5['model_type'] == 'mistral':
    assert kind == 'default', 'transformers 4 had no RoPE scaling for Mistral'
  else:
    names = rope_key.split('+')
    out['rope_scaling'] = None if kind == 'default' else {**rope, **{n: kind for n in names}}
  if out.get('pad_token_id', 0) is None:
    del out['pad_token_id']
  out['torch_dtype'] = v5.get('dtype', 'float32')
  out['transformers_version'] = '4.46.3'
  return out


LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
          'original_max_position_embeddings': 64}


@pytest.mark.parametrize('model_type,kw,rope_key', [
    ('llama', dict(rope_theta=5e5, rope_scaling=dict(LLAMA3)), 'rope_type'),
    ('llama', dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                 'high_freq_factor': 4.0}), 'rope_type'),  # original_max_position_embeddings omitted
    ('llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 4.0}), 'type'),
    ('llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 4.0}), 'type+rope_type'),
    ('llama', dict(rope_theta=5e5), 'rope_type'),
    ('qwen2', dict(rope_theta=1e6, rope_scaling={'rope_type': 'linear', 'factor': 2.0}), 'rope_type'),
    ('mistral', dict(rope_theta=1e6, sliding_window=None), 'rope_type'),
])
def test_transformers4_and_5_layouts_give_the_same_config(model_type, kw, rope_key):
  # deep copies: transformers adds rope_theta to the RoPE dicts it is given
  v5 = copy.deepcopy(config_class(model_type)(**SMALL, num_key_value_heads=2, **copy.deepcopy(kw)).to_dict())
  assert 'rope_parameters' in v5 and 'rope_theta' not in v5 and 'rope_scaling' not in v5  # what 5.x writes
  v4 = transformers4_llama_family(v5, rope_key)
  without_type = lambda rope: {k: v for k, v in rope.items() if k != 'type'}  # noqa: E731 (4.x's spelling kept)
  # transformers 5 reads the 4.x file as the same RoPE
  assert without_type(config_class(model_type).from_dict(copy.deepcopy(v4)).rope_parameters) == without_type(
      v5['rope_parameters'])
  got = hf_llama.model_config_from_hf(v4)
  assert got == hf_llama.model_config_from_hf(v5)
  rope = v5['rope_parameters']
  assert got['rope_theta'] == rope['rope_theta']
  if rope['rope_type'] == 'default':
    assert got['rope_scaling'] is None
  else:
    assert got['rope_scaling'] == {k: v for k, v in rope.items() if k not in ('rope_theta', 'type')}


def test_bert_and_gpt2_transformers4_layouts():
  v5 = transformers.BertConfig(**SMALL).to_dict()
  # BertConfig 4.46 wrote position_embedding_type (absolute, relative_key, ...) and torch_dtype; left out values
  # equal to PretrainedConfig's (tie_word_embeddings, is_decoder, add_cross_attention, null token ids).
  v4 = {k: v for k, v in v5.items() if k not in ('dtype', 'tie_word_embeddings', 'is_decoder', 'add_cross_attention')
        and v is not None}
  v4.update(position_embedding_type='absolute', torch_dtype='float32', transformers_version='4.46.3')
  assert hf_bert.jaxssl_config(v4).to_dict() == hf_bert.jaxssl_config(v5).to_dict()
  with pytest.raises(UserError, match='relative_key'):
    hf_bert.jaxssl_config(dict(v4, position_embedding_type='relative_key'))
  v5 = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=100).to_dict()
  v4 = dict({k: v for k, v in v5.items() if k != 'dtype'}, n_ctx=128, torch_dtype='float32',
            transformers_version='4.46.3')  # GPT-2's hub config.json still carries n_ctx, which nothing reads
  assert hf_gpt2.model_config_from_hf(v4) == hf_gpt2.model_config_from_hf(v5)


def test_rope_and_window_details():
  base = dict(SMALL, model_type='llama')
  # The RoPE dict's own rope_theta wins over the top-level one, as in transformers 5.
  got = hf_llama.model_config_from_hf(dict(base, rope_theta=1e4, rope_parameters={'rope_type': 'default',
                                                                                   'rope_theta': 5e5}))
  assert got['rope_theta'] == transformers.LlamaConfig(**base, rope_theta=1e4, rope_parameters={
      'rope_type': 'default', 'rope_theta': 5e5}).rope_parameters['rope_theta'] == 5e5
  # 5.x nests the RoPE dict by layer type for models with several attention kinds: one kind converts.
  nested = {'full_attention': {'rope_type': 'linear', 'factor': 2.0, 'rope_theta': 5e5}}
  got = hf_llama.model_config_from_hf(dict(base, layer_types=['full_attention'] * 2, rope_parameters=nested))
  assert got['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0} and got['rope_theta'] == 5e5
  two = dict(nested, sliding_attention={'rope_type': 'default', 'rope_theta': 1e4})
  with pytest.raises(UserError, match='per layer type'):
    hf_llama.model_config_from_hf(dict(base, layer_types=['full_attention', 'sliding_attention'],
                                       rope_parameters=two))
  with pytest.raises(UserError, match='partial_rotary_factor'):
    hf_llama.model_config_from_hf(dict(base, partial_rotary_factor=0.5))
  # Qwen2 slides only with use_sliding_window, and only in layers from max_window_layers on.
  qwen = dict(SMALL, model_type='qwen2', max_position_embeddings=512, sliding_window=128)
  hf_llama.model_config_from_hf(qwen)  # use_sliding_window defaults to False
  hf_llama.model_config_from_hf(dict(qwen, use_sliding_window=True, max_window_layers=2))
  with pytest.raises(UserError, match='sliding_window=128'):
    hf_llama.model_config_from_hf(dict(qwen, use_sliding_window=True, max_window_layers=1))
  with pytest.raises(UserError, match='sliding_window=128'):
    hf_llama.model_config_from_hf(dict(qwen, use_sliding_window=True,
                                       layer_types=['full_attention', 'sliding_attention']))
  # Mistral's window applies to every layer; omitted, it is MistralConfig's 4096 (< 131072 positions).
  with pytest.raises(UserError, match='sliding_window=4096'):
    hf_llama.model_config_from_hf(dict(SMALL, model_type='mistral'))
  with pytest.raises(UserError, match='not divisible'):
    hf_llama.model_config_from_hf(dict(base, hidden_size=66))

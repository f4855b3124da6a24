"""transformers' config defaults per model_type, for config.json files that leave a key out.

transformers 4 and 5 write most fields into config.json, but older and hand-made files omit some, and transformers
then uses the config class's own default, which differs between model types: max_position_embeddings is 2048 for
LlamaConfig, 32768 for Qwen2Config, 131072 for MistralConfig; tie_word_embeddings is False for those and True for
GPT-2 and BERT. `with_defaults` fills the omitted keys the same way, so a file imports as transformers reads it.

The values are transformers 5.24's (configuration_<model>.py); tests/test_convert_defaults.py compares them with
the installed transformers so drift shows. None marks a derived default: head_dim = hidden_size //
num_attention_heads and num_key_value_heads = num_attention_heads (filled here), GPT-2's n_inner = 4 * n_embd
(hf_gpt2). No torch or transformers import here.
"""
from jaxssl.errors import UserError

# RotaryEmbeddingConfigMixin.default_theta: the rope_theta of a config that names none (4.x: each class's default).
DEFAULT_ROPE_THETA = 10000.0
LLAMA_FAMILY = ('llama', 'mistral', 'qwen2', 'qwen3')
# The model types hf_bert imports as BERT exports (its ROBERTA_TYPES and BERT_UNDER_OTHER_NAMES); any other is a
# decoder's. Here so the convert job can route a directory without importing the importers.
ENCODER_TYPES = ('bert', 'roberta', 'xlm-roberta', 'camembert', 'distilbert', 'electra', 'mpnet', 'albert', 'ernie',
                 'deberta-v2')
_LLAMA_COMMON = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, hidden_act='silu',
                     initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_dropout=0.0,
                     rope_theta=DEFAULT_ROPE_THETA)
_BERT_COMMON = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, hidden_act='gelu', hidden_dropout_prob=0.1,
                    attention_probs_dropout_prob=0.1, max_position_embeddings=512, type_vocab_size=2,
                    initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, tie_word_embeddings=True)
DEFAULTS = {
    'llama': dict(_LLAMA_COMMON, vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, head_dim=None,
                  max_position_embeddings=2048, attention_bias=False, mlp_bias=False),
    'mistral': dict(_LLAMA_COMMON, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32, sliding_window=4096),
    'qwen2': dict(_LLAMA_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    'qwen3': dict(_LLAMA_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32, head_dim=128,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  attention_bias=False),
    'gpt2': dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
                 activation_function='gelu_new', resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                 layer_norm_epsilon=1e-5, initializer_range=0.02, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, add_cross_attention=False, tie_word_embeddings=True),
    'bert': dict(_BERT_COMMON),
    'roberta': dict(_BERT_COMMON, vocab_size=50265, pad_token_id=1),
    'xlm-roberta': dict(_BERT_COMMON, pad_token_id=1),
    'camembert': dict(_BERT_COMMON, pad_token_id=1),
    'electra': dict(_BERT_COMMON, embedding_size=128, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    'mpnet': dict({k: v for k, v in _BERT_COMMON.items() if k != 'type_vocab_size'}, vocab_size=30527,
                  pad_token_id=1, relative_attention_num_buckets=32),
    'albert': dict(_BERT_COMMON, vocab_size=30000, embedding_size=128, hidden_size=4096, num_hidden_groups=1,
                   num_attention_heads=64, intermediate_size=16384, inner_group_num=1, hidden_act='gelu_new',
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    'ernie': dict(_BERT_COMMON, task_type_vocab_size=3, use_task_id=False),
    # DeBERTa-v2/v3: position_buckets, share_att_key, norm_rel_ebd, conv_kernel_size are no fields there (getattr).
    'deberta-v2': dict(_BERT_COMMON, vocab_size=128100, hidden_size=1536, num_hidden_layers=24, num_attention_heads=24,
                       intermediate_size=6144, type_vocab_size=0, layer_norm_eps=1e-07, relative_attention=False,
                       max_relative_positions=-1, position_biased_input=True, pos_att_type=None),
    'distilbert': dict(vocab_size=30522, max_position_embeddings=512, sinusoidal_pos_embds=False, n_layers=6,
                       n_heads=12, dim=768, hidden_dim=3072, dropout=0.1, attention_dropout=0.1, activation='gelu',
                       initializer_range=0.02, pad_token_id=0, tie_word_embeddings=True),
}
# Other spellings transformers accepts for a model's own field names (GPT2Config.attribute_map).
ALIASES = {'gpt2': {'hidden_size': 'n_embd', 'max_position_embeddings': 'n_positions',
                    'num_attention_heads': 'n_head', 'num_hidden_layers': 'n_layer'},
           'distilbert': {'hidden_size': 'dim', 'num_attention_heads': 'n_heads', 'num_hidden_layers': 'n_layers'}}


def with_defaults(hf: dict, default_type: str) -> dict:
  """`hf` (a config.json dict) with transformers' defaults for its model_type (`default_type` when it names
  none) in place of the keys it omits, aliases under their own names, and the derived head_dim and
  num_key_value_heads of the Llama family filled (also where config.json has them as null, as transformers does).
  """
  model_type = hf.get('model_type') or default_type
  if model_type not in DEFAULTS:
    raise UserError(f'config.json has model_type={model_type!r}: jaxssl converts {", ".join(DEFAULTS)}')
  out = dict(hf, model_type=model_type)
  for alias, name in ALIASES.get(model_type, {}).items():
    if alias in out and name not in out:
      out[name] = out.pop(alias)
  for key, value in DEFAULTS[model_type].items():
    out.setdefault(key, value)
  if model_type in LLAMA_FAMILY:
    if out.get('num_key_value_heads') is None:
      out['num_key_value_heads'] = out['num_attention_heads']
    if out.get('head_dim') is None:
      if out['hidden_size'] % out['num_attention_heads']:
        raise UserError(f'config.json has hidden_size={out["hidden_size"]} not divisible by num_attention_heads='
                        f'{out["num_attention_heads"]} and no head_dim')
      out['head_dim'] = out['hidden_size'] // out['num_attention_heads']
  return out

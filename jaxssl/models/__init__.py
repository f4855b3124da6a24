"""Model registry: `model.name` -> builder and training-FLOPs formula.

  model = build_model(cfg.model, vocab_size, rngs=nnx.Rngs(params=seed))
  mfu_flops = flops_per_token(cfg.model, vocab_size, cfg.data.seq_len, cfg.data.max_predictions)
"""
from typing import Callable, NamedTuple

from flax import nnx

from jaxssl.errors import UserError
from jaxssl.models import bert, elmo, encdec, gpt


class ModelSpec(NamedTuple):
  build: Callable[..., nnx.Module]       # (model_cfg, vocab_size, *, rngs) -> module
  flops_per_token: Callable[..., float]  # (model_cfg, vocab_size, seq_len, max_predictions) -> training FLOPs
  validate: Callable[..., object]        # (model_cfg, vocab_size) -> checked config; raises UserError


REGISTRY: dict[str, ModelSpec] = {
    'bert': ModelSpec(bert.BertForPretraining, bert.flops_per_token, bert.BertConfig.from_config),
    'gpt': ModelSpec(gpt.GPT, gpt.flops_per_token, gpt.GPTConfig.from_config),
    'encdec': ModelSpec(encdec.EncoderDecoder, encdec.flops_per_token, encdec.EncDecConfig.from_config),
    'elmo': ModelSpec(elmo.ElmoModel, elmo.flops_per_token, elmo.ElmoConfig.from_config),
}


def _spec(model_cfg) -> ModelSpec:
  name = model_cfg.get('name') if hasattr(model_cfg, 'get') else getattr(model_cfg, 'name', None)
  if name not in REGISTRY:
    raise UserError(f'model.name={name!r} is not a known model; use one of {sorted(REGISTRY)}')
  return REGISTRY[name]


def build_model(model_cfg, vocab_size: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by `model_cfg.name`. Sharded if called under `jax.set_mesh` + `nnx.logical_axis_rules`."""
  return _spec(model_cfg).build(model_cfg, vocab_size, rngs=rngs)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int) -> float:
  """Training (fwd + bwd) matmul FLOPs per token of the model named by `model_cfg.name` (feeds MFU)."""
  return _spec(model_cfg).flops_per_token(model_cfg, vocab_size, seq_len, max_predictions)


def validate_config(model_cfg, vocab_size: int) -> None:
  """Raises UserError for a model config that cannot be built, before any data or tokenizer work starts."""
  _spec(model_cfg).validate(model_cfg, vocab_size)

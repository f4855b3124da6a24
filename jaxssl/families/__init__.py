"""The pretraining families, registered once by `model.name`: bert, gpt, encdec, elmo; on images mae, simclr;
on audio wav2vec2.

  family = families.family_for(config.model)
  model = family.build(config.model, vocab_size, rngs=nnx.Rngs(params=seed))
  batches = family.train_batches(sources['train'], tokenizer, config, start_step=s, **where)

Each family module holds its model builder, objective, batches, config checks, checkpoint shape keys and
embedding hooks (family.py says what a Family is). A new family is one module here plus its name in NAMES.
A family's module is imported when it is first asked for: a generate job loads the GPT family and not the
image or audio pipelines (TFDS, grain), which saved a job's start ~1 s.
"""
import collections.abc
import importlib

from flax import nnx

from jaxssl.errors import UserError
from jaxssl.families.family import Family

# Each model.name is the module under jaxssl/families/ whose FAMILY it is.
NAMES = ('bert', 'gpt', 'encdec', 'elmo', 'mae', 'simclr', 'wav2vec2')


class _Registry(collections.abc.Mapping):
  """{model.name: Family}, importing a family's module on first access."""

  def __getitem__(self, name: str) -> Family:
    if name not in NAMES:
      raise KeyError(name)
    family = importlib.import_module(f'jaxssl.families.{name}').FAMILY
    assert family.name == name, (name, family.name)
    return family

  def __iter__(self):
    return iter(NAMES)

  def __len__(self) -> int:
    return len(NAMES)


FAMILIES: collections.abc.Mapping[str, Family] = _Registry()


def family_for(model_cfg) -> Family:
  """The family of `model_cfg.name` (a config section or a dict); UserError for an unknown name."""
  name = model_cfg.get('name') if hasattr(model_cfg, 'get') else getattr(model_cfg, 'name', None)
  if name not in NAMES:
    raise UserError(f'model.name={name!r} is not a known model; use one of {sorted(NAMES)}')
  return FAMILIES[name]


def family_of_model(model) -> Family | None:
  """The family whose module `model` is, or None."""
  return next((f for f in FAMILIES.values() if isinstance(model, f.model_class)), None)  # imports them all


def build_model(model_cfg, vocab_size: int, *, rngs: nnx.Rngs) -> nnx.Module:
  """The model named by `model_cfg.name`. Sharded if called under `jax.set_mesh` + `nnx.logical_axis_rules`."""
  return family_for(model_cfg).build(model_cfg, vocab_size, rngs=rngs)


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int) -> float:
  """Training (fwd + bwd) matmul FLOPs per token of the model named by `model_cfg.name` (feeds MFU)."""
  return family_for(model_cfg).flops_per_token(model_cfg, vocab_size, seq_len, max_predictions)


def validate_config(model_cfg, vocab_size: int) -> None:
  """Raises UserError for a model config that cannot be built, before any data or tokenizer work starts."""
  family_for(model_cfg).validate(model_cfg, vocab_size)


def reads_text(model_cfg) -> bool:
  """Whether the family of `model_cfg` reads text through a tokenizer (images and audio bring their own corpus
  loading, `load_sources`, and have none): jobs on its exports then look for no tokenizer."""
  return getattr(family_for(model_cfg), 'load_sources', None) is None

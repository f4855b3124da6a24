"""jaxssl: self-supervised pretraining of Transformer language models in JAX/Flax."""


def load(params_dir: str, mesh=None):
  """Loads an export (from `python -m jaxssl.export` or `jaxssl.convert from-hf`): returns (model, tokenizer).

  The model is an nnx module on `mesh` (default: all devices, data-parallel). Imported lazily so `import jaxssl`
  stays light.
  """
  from jaxssl.export import load_export
  _, model, tokenizer = load_export(params_dir, mesh)
  return model, tokenizer

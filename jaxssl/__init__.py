"""jaxssl: self-supervised pretraining of Transformer language models in JAX/Flax."""
from jaxssl import runtime as _runtime
from jaxssl.version import __version__  # noqa: F401  (jaxssl.__version__)

_runtime.local_gcs_defaults()  # before gcsfs or tensorstore read their settings (STORAGE_EMULATOR_HOST only)

if _runtime.runs_xla_cpu():
  # Before numpy or jax start threads: XLA:CPU's per-step scratch then reuses mapped pages (runtime.py says why).
  _runtime.keep_host_memory_mapped()


def load(params_dir: str, mesh=None):
  """Loads an export (from `python -m jaxssl.export` or `jaxssl.convert from-hf`): returns (model, tokenizer).

  `params_dir` may be local or in a bucket (gs://B/export). The model is an nnx module on `mesh` (default: all
  devices, data-parallel). Imported lazily so `import jaxssl` stays light.
  """
  from jaxssl.train import checkpoint  # noqa: PLC0415 (lazy: `import jaxssl` stays light)
  _, model, tokenizer = checkpoint.load_export(params_dir, mesh)
  return model, tokenizer

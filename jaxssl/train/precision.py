"""The compute dtype of a fine-tuning run (`model.dtype`: auto | float32 | bfloat16). Params and optimizer moments
stay float32 either way; the body's matmuls, activations and their gradients run in the compute dtype.

`auto` takes bfloat16 for a text encoder (model.name bert: BERT, RoBERTa, MPNet, DeBERTa, ... imports) where
bfloat16 products are fast: TPUs, GPUs, and CPUs with bfloat16 instructions (x86 `avx512_bf16` or `amx_bf16`:
AMD Zen 4 and later, Intel Cooper Lake / Sapphire Rapids and later), whose products XLA:CPU hands to YNNPACK
(models/products.py). Elsewhere, and for image, audio and ELMo bodies, the body's own dtype (float32 unless its
export says otherwise). BENCHMARKS.md §39 has what it gave: the same dev accuracy, faster jobs.
"""
import os
import re

import jax

from jaxssl.errors import UserError

SETTINGS = ('auto', 'float32', 'bfloat16')
# '1' or '0' overrides what /proc/cpuinfo says of bfloat16 instructions (the test suite pins '0', so that its
# float32 figures hold on every host).
CPU_BF16_ENV = 'JAXSSL_CPU_BF16'


def cpu_has_bf16() -> bool:
  """Whether this host's CPU has bfloat16 dot-product instructions (or JAXSSL_CPU_BF16 says so)."""
  forced = os.environ.get(CPU_BF16_ENV, '')
  if forced in ('0', '1'):
    return forced == '1'
  try:
    with open('/proc/cpuinfo') as f:
      return re.search(r'\b(avx512_bf16|amx_bf16)\b', f.read()) is not None
  except OSError:  # not Linux: no flags to read
    return False


def check_setting(setting: str) -> None:
  """UserError for a `model.dtype` that is not one of SETTINGS."""
  if setting not in SETTINGS:
    raise UserError(f'model.dtype={setting!r}: use one of {", ".join(SETTINGS)} (--config.model.dtype=...)')


def finetune_dtype(setting: str, model_cfg) -> tuple[str, str]:
  """(compute dtype, what the banner says of it) for `model.dtype=setting` and the body `model_cfg`."""
  check_setting(setting)
  own = model_cfg.get('dtype', 'float32')
  if setting != 'auto':
    return setting, f'compute {setting}'
  if model_cfg.get('name') != 'bert':
    return own, ''
  backend = jax.default_backend()
  if backend in ('tpu', 'gpu'):
    return 'bfloat16', f'compute bfloat16 (auto, {backend})'
  if cpu_has_bf16():
    return 'bfloat16', 'compute bfloat16 (auto: this CPU has bfloat16 instructions)'
  return own, f'compute {own} (auto: this CPU has no bfloat16 instructions)'

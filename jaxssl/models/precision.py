"""The compute dtype of a run (`model.dtype`: auto | float32 | bfloat16), for pretraining and fine-tuning alike.
Params and optimizer moments stay float32 either way; the matmuls, activations and their gradients run in the
compute dtype.

`auto` (the configs' default) takes bfloat16 on TPUs and GPUs, whose matmul units are built for it, for every
family. On CPU it takes bfloat16 only for the families whose bfloat16 step measured faster than float32 on a CPU
with bfloat16 instructions (x86 `avx512_bf16` or `amx_bf16`: AMD Zen 4 and later, Intel Cooper Lake / Sapphire
Rapids and later), whose products XLA:CPU hands to YNNPACK (models/products.py), and float32 elsewhere
(BENCHMARKS.md §§39-40). A job resolves `auto` once, when it starts, and records the dtype it computed in.
`model.remat=auto` is resolved with it (`remat_policy`): what recomputation pays depends on the dtype and backend.
"""
import os
import re

from jaxssl.errors import UserError

SETTINGS = ('auto', 'float32', 'bfloat16')
# '1' or '0' overrides what /proc/cpuinfo says of bfloat16 instructions (the test suite pins '0', so that its
# float32 figures hold on every host).
CPU_BF16_ENV = 'JAXSSL_CPU_BF16'
# model.name of the families whose bfloat16 train step beats float32 on such a CPU (a 2-core Zen 4, BENCHMARKS.md
# §40): BERT (and every text encoder imported as one) 1.08x tiny to 1.29x base, GPT 1.10x tiny and 1.19x GPT-2
# small, the encoder-decoder 1.13x (base), MAE 1.12x (ViT-base; SimCLR runs the same encoder). wav2vec 2.0 and
# ELMo are not measured there, so they keep float32 on CPU.
CPU_BF16_FAMILIES = ('bert', 'gpt', 'encdec', 'mae', 'simclr')


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


def compute_dtype(setting: str, family: str, backend: str | None = None) -> tuple[str, str]:
  """(compute dtype, what the banner says of it) for `model.dtype=setting` of a model of `family` (model.name)
  running on `backend` (default: JAX's)."""
  check_setting(setting)
  if setting != 'auto':
    return setting, f'compute {setting}'
  if backend is None:
    from jaxssl import mesh as mesh_lib  # reason: flax's import; the generate job's warm start reads explicit dtypes
    backend = mesh_lib.backend()
  if backend in ('tpu', 'gpu'):
    return 'bfloat16', f'compute bfloat16 (auto, {backend})'
  if not cpu_has_bf16():
    return 'float32', 'compute float32 (auto: this CPU has no bfloat16 instructions)'
  if family not in CPU_BF16_FAMILIES:
    return 'float32', f'compute float32 (auto: {family} is not measured faster in bfloat16 on CPU)'
  return 'bfloat16', 'compute bfloat16 (auto: this CPU has bfloat16 instructions)'


def remat_policy(setting: str, dtype: str, backend: str | None = None) -> tuple[str, str]:
  """(remat policy, what the banner says of it) for `model.remat=setting` computing in `dtype` on `backend`.

  `auto`: 'none' for bfloat16 on CPU, where recomputing costs more than the activations' memory saves (a 2-core
  Intel Xeon with AMX, BENCHMARKS.md §41: GPT-2 small 1.21x, BERT-base 1.11x, BERT-small 1.07x 'dots'); 'dots'
  elsewhere: in float32 on CPU (§13: never slower, half the activation memory), and on TPU and GPU, where memory is
  what limits the batch (GPT-2 small on an H200: 'dots' 1.06x 'none', §23)."""
  if setting != 'auto':
    return setting, f'remat {setting}'
  if backend is None:
    from jaxssl import mesh as mesh_lib  # reason: flax's import, as in compute_dtype
    backend = mesh_lib.backend()
  if backend == 'cpu' and dtype == 'bfloat16':
    return 'none', 'remat none (auto: bfloat16 on CPU)'
  return 'dots', f'remat dots (auto, {backend}, {dtype})'


def resolve(model_cfg, backend: str | None = None) -> str:
  """Sets `model_cfg.dtype` and `model_cfg.remat` (a config section) to what their settings resolve to on
  `backend`; returns what the banner says of the dtype ('' for a family without the setting)."""
  note = ''
  if 'dtype' in model_cfg:
    model_cfg.dtype, note = compute_dtype(model_cfg.dtype, model_cfg.get('name', ''), backend)
  if model_cfg.get('remat') == 'auto':
    model_cfg.remat = remat_policy('auto', model_cfg.get('dtype', 'float32'), backend)[0]
  return note

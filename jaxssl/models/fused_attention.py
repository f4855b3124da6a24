"""The attention core of every Transformer here when no attention-probability dropout is on:
softmax(q k^T / sqrt(d) + mask) v through the fastest kernel the backend has (`model.attention`):

  'auto'    cuDNN flash attention on NVIDIA GPUs in bfloat16/float16, Pallas splash attention on TPU (segment ids
            given), XLA otherwise. What a config should say unless it is measuring one path.
  'xla'     jax.nn.dot_product_attention's XLA path: any backend, any dtype (the reference the others are tested
            against).
  'cudnn'   jax.nn.dot_product_attention(implementation='cudnn'): GPU only, bfloat16/float16, head_dim <= 128; the
            boolean mask (key padding, documents of a packed row) becomes cuDNN's additive bias.
  'splash'  Pallas splash attention (jax.experimental.pallas.ops.tpu): TPU, or anywhere in Pallas interpret mode
            (slow; tests). Masks come as segment ids: a query attends keys of its own segment (and, causal, not
            after it). Under a mesh it runs per shard (shard_map): batch over (data, fsdp), heads over tensor.

Attention dropout needs the probabilities, which no fused kernel exposes: the models take their explicit path
while it is on (train with model.attention_dropout_rate=0 to use a kernel, as most decoder recipes do).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxssl import mesh as mesh_lib
from jaxssl.errors import UserError
from jaxssl.models import attention_core

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')


def check_implementation(name: str) -> None:
  """A UserError unless `name` is one of IMPLEMENTATIONS."""
  if name not in IMPLEMENTATIONS:
    raise UserError(f"model.attention={name!r}: use one of {', '.join(repr(i) for i in IMPLEMENTATIONS)}")


def resolve(implementation: str, dtype, splash_fits: bool = True) -> str:
  """The concrete path 'auto' takes on this backend for `dtype` (others are returned as they are)."""
  if implementation != 'auto':
    return implementation
  backend = mesh_lib.backend()
  if backend == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and _is_nvidia():
    return 'cudnn'
  if backend == 'tpu' and splash_fits:
    return 'splash'
  return 'xla'


def describe(model_cfg, seq_len: int = 0) -> str:
  """What a banner says of a model section's attention path in training, e.g. 'attention cudnn (auto, gpu)', or
  'attention explicit (attention dropout 0.1)' (no kernel exposes the probabilities to drop; in bfloat16 on CPU
  ', bfloat16 CPU core' after the rate: attention_core.softmax_attention); '' for a model
  without the setting. `seq_len` (when known) decides whether splash's tiles fit it on a TPU."""
  if 'attention' not in model_cfg:
    return ''
  if model_cfg.get('attention_type', 'full') == 'block_sparse':
    return f"attention block_sparse from {model_cfg.get('sparse_min_length')} tokens"
  relative = (f", disentangled over {model_cfg['position_buckets']} relative buckets"  # DeBERTa's scores
              if model_cfg.get('position_buckets') else '')
  dtype = jnp.dtype(model_cfg.get('dtype', 'float32'))
  if model_cfg.get('attention_dropout_rate', 0.0) > 0:
    # The written-out gradient's core (not with DeBERTa's score bias).
    core = ', bfloat16 CPU core' if not relative and attention_core.cpu_attention_core(dtype) else ''
    return f"attention explicit (attention dropout {model_cfg['attention_dropout_rate']}{core}){relative}"
  setting = model_cfg['attention']
  path = resolve(setting, dtype)
  why = f'auto, {mesh_lib.backend()}' if setting == 'auto' else ''
  if path == 'splash' and mesh_lib.backend() == 'tpu' and seq_len and not _tiles(seq_len):
    path, why = 'xla', f'{why + ": " if why else ""}{seq_len} tokens are not 128-token tiles'
  return f'attention {path}' + (f' ({why})' if why else '') + relative


@functools.cache
def _is_nvidia() -> bool:
  # jax's 'gpu' backend is CUDA or ROCm; cuDNN is CUDA's.
  return 'rocm' not in jax.devices()[0].client.platform_version.lower()


def attend(q, k, v, *, implementation: str, mask=None, causal: bool = False, segment_ids=None, bias=None):
  """Attention output [B, T, N, D] of q [B, T, N, D] over k, v [B, S, K, D] (K divides N: grouped-query heads).

  `mask` [B, 1, T or 1, S] bool (True = may attend) is what the 'xla' and 'cudnn' paths read; `segment_ids`
  (q_ids [B, T], kv_ids [B, S]; equal ids may attend) is what 'splash' reads: callers pass both, describing the
  same attention for every query whose output is used (a padding query may differ). Scale 1/sqrt(D).
  `bias` (broadcastable to [B, N, T, S]) is added to the scaled scores; splash takes none, so 'auto' is 'xla' then.
  """
  splash_fits = ((segment_ids is not None or mask is None) and bias is None
                 and (mesh_lib.backend() != 'tpu' or _tiles(q.shape[1]) and _tiles(k.shape[1])))
  path = resolve(implementation, q.dtype, splash_fits)
  if path == 'splash':
    if splash_fits:
      return _splash(q, k, v, segment_ids, causal)
    path = 'xla'  # e.g. the encoder-decoder's cross-attention: its mask has no segment-id form
  if path == 'cudnn' and mask is not None:
    # cuDNN reads the mask as a full additive bias [B, 1, T, S].
    mask = jnp.broadcast_to(mask, (mask.shape[0], 1, q.shape[1], k.shape[1]))
  if bias is not None:
    bias = bias.astype(q.dtype)  # the kernels take a bias of q's dtype
  return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, is_causal=causal,
                                      implementation='cudnn' if path == 'cudnn' else 'xla')


def _splash(q, k, v, segment_ids, causal):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  b, t, n, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  if segment_ids is None:
    segment_ids = (jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32))
  q_ids, kv_ids = (x.astype(jnp.int32) for x in segment_ids)
  if kv_heads != n:  # the kernel takes as many k/v heads as query heads (or one: MQA)
    k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
  interpret = mesh_lib.backend() != 'tpu'

  def per_shard(q, k, v, q_ids, kv_ids):
    heads = q.shape[2]
    base = masks.CausalMask((t, s)) if causal else masks.FullMask((t, s))
    block_q, block_kv = _block(t), _block(s)
    sizes = splash.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
                              block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
                              block_q_dq=block_q, block_kv_dq=block_kv)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([base] * heads), block_sizes=sizes, head_shards=1,
                                    q_seq_shards=1, interpret=interpret)
    scale = 1.0 / np.sqrt(d)

    def one(q, k, v, qi, ki):  # the kernel works on one example, heads first: [N, T, D]
      out = kernel(jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 0, 1), jnp.swapaxes(k, 0, 1),
                   jnp.swapaxes(v, 0, 1), segment_ids=splash.SegmentIds(q=qi, kv=ki))
      return jnp.swapaxes(out, 0, 1)
    return jax.vmap(one)(q, k, v, q_ids, kv_ids)

  if jax.sharding.get_abstract_mesh().empty:
    return per_shard(q, k, v, q_ids, kv_ids)
  from jax.sharding import PartitionSpec as P
  heads, rows = P(('data', 'fsdp'), None, 'tensor', None), P(('data', 'fsdp'), None)
  return jax.shard_map(per_shard, in_specs=(heads, heads, heads, rows, rows), out_specs=heads,
                       check_vma=False)(q, k, v, q_ids, kv_ids)


def _tiles(length: int) -> bool:
  """Whether Mosaic's splash kernel takes `length` on a TPU: its blocks are multiples of 128 lanes (a 64-token
  sequence failed to compile, 'bkv_compute=64 must be a multiple of 128'; XLA's attention runs it instead)."""
  return length % 128 == 0


def _block(length: int) -> int:
  """The largest of 512, 256, 128 dividing `length` (splash tiles), else the whole length."""
  for size in (512, 256, 128):
    if length % size == 0:
      return size
  return length

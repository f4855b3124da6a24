"""Every attention path of model.attention equals the reference (softmax attention spelled out in numpy-like jnp).

'xla' and 'splash' (Pallas interpret mode off TPU) run here; 'cudnn' runs where a CUDA GPU is present.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxssl.errors import UserError
from jaxssl.models import fused_attention

B, T, N, D = 2, 128, 4, 32


def reference(q, k, v, allowed):
  """softmax(q k^T / sqrt(D), masked by `allowed` [B, T, S]) v in float32, k/v heads repeated for GQA."""
  q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
  rep = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
  logits = jnp.einsum('btnd,bsnd->bnts', q, k) / np.sqrt(q.shape[-1])
  logits = jnp.where(allowed[:, None], logits, -1e30)
  return jnp.einsum('bnts,bsnd->btnd', jax.nn.softmax(logits, axis=-1), v)


def qkv(kv_heads=N, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, N, D), dtype), jax.random.normal(kk, (B, T, kv_heads, D), dtype),
          jax.random.normal(kv, (B, T, kv_heads, D), dtype))


def padding_case():
  """BERT: key padding (the second row has 50 padding tokens at the end)."""
  lengths = jnp.array([T, T - 50])
  real = jnp.arange(T)[None] < lengths[:, None]
  ids = real.astype(jnp.int32)
  allowed = jnp.broadcast_to(real[:, None, :], (B, T, T))
  return dict(mask=real[:, None, None, :], segment_ids=(ids, ids), causal=False), allowed, real


def packed_causal_case():
  """GPT: causal attention within each document of a packed row (segment 0 = trailing padding)."""
  seg = np.zeros((B, T), np.int32)
  seg[0, :40], seg[0, 40:100], seg[0, 100:] = 1, 2, 3
  seg[1, :90] = 1
  seg = jnp.asarray(seg)
  same = seg[:, :, None] == seg[:, None, :]
  allowed = same & jnp.tril(jnp.ones((T, T), bool))[None]
  return dict(mask=same[:, None], segment_ids=(seg, seg), causal=True), allowed, seg > 0


def paths():
  out = ['xla', 'splash']
  if jax.default_backend() == 'gpu':
    out.append('cudnn')
  return out


@pytest.mark.parametrize('implementation', paths())
@pytest.mark.parametrize('case,kv_heads', [(padding_case, N), (packed_causal_case, N), (packed_causal_case, 2)])
def test_path_equals_reference_forward_and_gradient(implementation, case, kv_heads):
  kwargs, allowed, used = case()
  dtype = jnp.bfloat16 if implementation == 'cudnn' else jnp.float32  # cuDNN flash runs in 16 bits
  tol = 3e-2 if dtype == jnp.bfloat16 else 2e-5
  q, k, v = qkv(kv_heads, dtype)
  weights = jax.random.normal(jax.random.key(7), (B, T, N, D))
  keep = used[:, :, None, None]  # a padding query's output is never read, and paths may differ there

  def loss(fn, q, k, v):
    return jnp.sum(jnp.where(keep, fn(q, k, v).astype(jnp.float32) * weights, 0.0))

  def ours(q, k, v):
    return fused_attention.attend(q, k, v, implementation=implementation, **kwargs)

  def ref(q, k, v):
    return reference(q, k, v, allowed)
  out, expected = jax.jit(ours)(q, k, v), ref(q, k, v)
  np.testing.assert_allclose(np.where(keep, out.astype(np.float32), 0), np.where(keep, expected, 0),
                             atol=tol, rtol=tol)
  grads = jax.jit(jax.grad(lambda *a: loss(ours, *a), argnums=(0, 1, 2)))(q, k, v)
  expected_grads = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(grads, expected_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=tol * 4, rtol=tol * 4)


def test_splash_falls_back_to_xla_for_a_mask_without_segment_ids():
  """The encoder-decoder's cross-attention mask has no segment form: 'splash' must still give the right answer."""
  kwargs, allowed, _ = padding_case()
  q, k, v = qkv()
  out = fused_attention.attend(q, k, v, implementation='splash', mask=kwargs['mask'])
  np.testing.assert_allclose(out, reference(q, k, v, allowed), atol=2e-5, rtol=2e-5)


def test_auto_resolves_to_xla_on_cpu_and_unknown_names_are_refused():
  if jax.default_backend() == 'cpu':
    assert fused_attention.resolve('auto', jnp.bfloat16) == 'xla'
  with pytest.raises(UserError, match=r"model.attention='flash': use one of 'auto', 'xla', 'cudnn', 'splash'"):
    fused_attention.check_implementation('flash')


def tiny_model(family, implementation):
  from flax import nnx
  from jaxssl.config import load_config
  from jaxssl.families import build_model
  c = load_config(f'configs/{family}.py:tiny').model
  c.update(num_layers=2, hidden_size=64, num_heads=2, intermediate_size=128, max_position=T, attention=implementation)
  with nnx.use_eager_sharding(False):
    return build_model(c, 97, rngs=nnx.Rngs(params=0))


def test_bert_and_gpt_take_the_configured_path_and_agree():
  """model.attention='splash' gives the same BERT encoding (padded rows) and GPT logits (packed rows) as 'xla'."""
  ids = jax.random.randint(jax.random.key(1), (B, T), 1, 97)
  _, _, real = padding_case()
  bert_out = [tiny_model('bert', impl).encode(ids, jnp.zeros_like(ids), real.astype(jnp.int32))[0]
              for impl in ('xla', 'splash')]
  np.testing.assert_allclose(*(np.where(real[..., None], o, 0) for o in bert_out), atol=2e-5)
  kwargs, _, used = packed_causal_case()
  seg = kwargs['segment_ids'][0]
  positions = jnp.asarray(np.concatenate([np.arange(40), np.arange(60), np.arange(28)])[None].repeat(B, 0))
  gpt_out = [tiny_model('gpt', impl)(ids, segment_ids=seg, positions=positions) for impl in ('xla', 'splash')]
  np.testing.assert_allclose(*(np.where(used[..., None], o, 0) for o in gpt_out), atol=2e-5)


def test_banner_says_which_attention_path_training_takes(monkeypatch):
  """'auto' resolved per backend and dtype; attention dropout keeps every kernel out; Big Bird its own."""
  cfg = dict(attention='auto', dtype='bfloat16', attention_dropout_rate=0.0)
  assert fused_attention.describe(cfg) == 'attention xla (auto, cpu)'
  assert fused_attention.describe(cfg | dict(attention='splash')) == 'attention splash'
  dropout = cfg | dict(attention_dropout_rate=0.1)
  assert fused_attention.describe(dropout) == 'attention explicit (attention dropout 0.1, bfloat16 CPU core)'
  assert fused_attention.describe(dropout | dict(dtype='float32')) == 'attention explicit (attention dropout 0.1)'
  assert fused_attention.describe(cfg | dict(attention_type='block_sparse', sparse_min_length=1024)) == (
      'attention block_sparse from 1024 tokens')
  assert fused_attention.describe(dict(dtype='float32')) == ''  # a model without the setting (ELMo)
  monkeypatch.setattr(fused_attention.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(fused_attention, '_is_nvidia', lambda: True)
  assert fused_attention.describe(cfg) == 'attention cudnn (auto, gpu)'
  assert fused_attention.describe(cfg | dict(dtype='float32')) == 'attention xla (auto, gpu)'  # cuDNN: 16 bits only


def test_splash_on_a_tpu_takes_only_lengths_of_128_token_tiles():
  """Mosaic's splash kernel on a TPU needs 128-lane blocks: a 64-token sequence (which failed to compile for
  v5e there) runs XLA's attention instead; 128 tokens run the kernel. Traced as for a TPU (compile-only)."""
  from jaxssl import mesh as mesh_lib

  def traced(length):
    q = jnp.ones((1, length, 2, 8), jnp.bfloat16)
    with mesh_lib.compiling_for('tpu'):
      return str(jax.make_jaxpr(lambda q: fused_attention.attend(q, q, q, implementation='splash'))(q))
  assert 'pallas_call' not in traced(64)
  assert 'pallas_call' in traced(128)


def test_the_banner_says_xla_where_splash_tiles_do_not_fit_on_a_tpu():
  from jaxssl import mesh as mesh_lib
  cfg = dict(attention='auto', attention_dropout_rate=0.0, dtype='bfloat16')
  with mesh_lib.compiling_for('tpu'):
    assert fused_attention.describe(cfg, 512) == 'attention splash (auto, tpu)'
    assert fused_attention.describe(cfg, 64) == 'attention xla (auto, tpu: 64 tokens are not 128-token tiles)'
    assert fused_attention.describe(cfg | dict(attention='splash'), 64) == (
        'attention xla (64 tokens are not 128-token tiles)')
  assert fused_attention.describe(cfg, 64) == 'attention xla (auto, cpu)'

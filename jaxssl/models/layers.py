"""Transformer building blocks with logical axis names on every parameter.

Parameters are float32 ("master weights"); each layer casts its parameters and inputs to a compute dtype
inside the matmul, so bfloat16 compute never touches the stored weights. LayerNorm statistics and softmax run in
float32. Dropout takes an explicit key (None = off) instead of nnx.Rngs state, so a train step stays a pure
function of (params, batch, key) and the model state holds no RNG counters.
"""
import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl import mesh as mesh_lib
from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models import fused_attention, precision
from jaxssl.models.attention_core import cpu_attention_core, softmax_attention
from jaxssl.models.dropout import dropout
from jaxssl.models.products import add_bias, project, vocab_logits

Dtype = jnp.dtype


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str | None]) -> nnx.Param:
  """A float32 parameter initialised by `init`, annotated with logical axis `names` (one per dimension)."""
  assert len(names) == len(shape), (names, shape)
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(rngs.params(), tuple(shape), jnp.float32))


def normal_init(stddev: float):
  """BERT's initializer for kernels and embeddings: normal(0, stddev)."""
  return jax.nn.initializers.normal(stddev)


zeros = jax.nn.initializers.zeros
ones = jax.nn.initializers.ones


def float32_activation(fn):
  """fn (elementwise) for x of a narrower dtype computed in float32 and rounded once to x's dtype, its gradient
  recomputing fn's from x, the one array it saves; float32 x takes fn and autodiff as they are.

  Autodiff of jax.nn.gelu on bfloat16 rounded after each of its ~10 operations, saved four bfloat16
  intermediates for the backward pass and wrote the cotangent in float32 (GPT-2 small on XLA:CPU: ~0.4 s of
  thread time a step); PyTorch computes its activations in float32 inside one kernel.
  """
  @jax.custom_vjp
  def activation(x):
    return fn(x.astype(jnp.float32)).astype(x.dtype)

  def activation_fwd(x):
    return activation(x), x

  def activation_bwd(x, g):
    _, vjp = jax.vjp(fn, x.astype(jnp.float32))
    return (vjp(g.astype(jnp.float32))[0].astype(x.dtype),)

  activation.defvjp(activation_fwd, activation_bwd)
  return lambda x: fn(x) if x.dtype == jnp.float32 else activation(x)


ACTIVATIONS = {'gelu': float32_activation(functools.partial(jax.nn.gelu, approximate=False)),  # HF's hidden_act names
               'gelu_new': float32_activation(functools.partial(jax.nn.gelu, approximate=True)), 'relu': jax.nn.relu}


class Embed(nnx.Module):
  """A lookup table (num_embeddings x features); `attend` is its transpose, for a tied output projection."""

  def __init__(self, num_embeddings: int, features: int, names: tuple[str, str], *, stddev: float,
               rngs: nnx.Rngs):
    self.embedding = make_param(rngs, normal_init(stddev), (num_embeddings, features), names)
    self.names = tuple(names)

  def __call__(self, ids: jax.Array) -> jax.Array:
    # Gathered in float32: the embedding sum feeds a LayerNorm, which wants float32 anyway.
    return jnp.take(self.embedding[...], ids, axis=0)

  def gathered(self, dtype: Dtype) -> jax.Array:
    """The table [num_embeddings, features] in `dtype`, whole along its feature axis (for an output projection)."""
    # Gather the table whole along its feature axis first (what FSDP does at every use anyway). Left to XLA's SPMD
    # partitioner, the backward of the tied projection misaligned batch rows on meshes with data, fsdp and tensor
    # all > 1: the loss was right, the gradients wrong (tests/test_train.py guards this).
    return constrain(self.embedding[...], (self.names[0], None)).astype(dtype)

  def attend(self, x: jax.Array, dtype: Dtype, *, decoding: bool = False) -> jax.Array:
    """x @ embedding^T in `dtype`, accumulated and returned in float32 (logits feed a float32 loss); `decoding`:
    see products.vocab_logits."""
    return vocab_logits(x.astype(dtype), self.gathered(dtype), decoding=decoding)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with statistics in float32; output in `dtype`."""

  def __init__(self, features: int, *, eps: float = 1e-12, dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.scale = make_param(rngs, ones, (features,), ('norm',))
    self.bias = make_param(rngs, zeros, (features,), ('norm',))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Dense(nnx.Module):
  """y = x W + b with W (in, out) named `names` and b named `names[-1]`."""

  def __init__(self, in_features: int, out_features: int, names: tuple[str, str], *, stddev: float,
               dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.kernel = make_param(rngs, normal_init(stddev), (in_features, out_features), names)
    self.bias = make_param(rngs, zeros, (out_features,), names[-1:])
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = project(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return add_bias(y, self.bias[...])


class MultiHeadAttention(nnx.Module):
  """Bidirectional multi-head self-attention with a key padding mask and attention-probability dropout.

  q/k/v kernels are (embed, heads, kv) so heads can be split over the tensor axis without reshapes.
  """

  def __init__(self, hidden: int, num_heads: int, *, stddev: float, attention_dropout_rate: float,
               implementation: str = 'auto', dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    head_dim = hidden // num_heads
    init = normal_init(stddev)
    for name in ('query', 'key', 'value'):
      setattr(self, f'{name}_kernel', make_param(rngs, init, (hidden, num_heads, head_dim), ('embed', 'heads', 'kv')))
      setattr(self, f'{name}_bias', make_param(rngs, zeros, (num_heads, head_dim), ('heads', 'kv')))
    self.out_kernel = make_param(rngs, init, (num_heads, head_dim, hidden), ('heads', 'kv', 'embed'))
    self.out_bias = make_param(rngs, zeros, (hidden,), ('embed',))
    self.head_dim = head_dim
    self.attention_dropout_rate = attention_dropout_rate
    self.implementation = implementation
    self.dtype = dtype

  def _project(self, x, name):
    kernel = getattr(self, f'{name}_kernel')[...].astype(self.dtype)
    y = add_bias(project(x, kernel), getattr(self, f'{name}_bias')[...])
    return constrain(y, ('batch', 'length', 'act_heads', 'kv'))

  def __call__(self, x: jax.Array, mask: jax.Array, *, dropout_rng: jax.Array | None = None,
               explicit: bool = False, attend=None, query_positions: jax.Array | None = None,
               bias: jax.Array | None = None) -> jax.Array:
    """x [B, L, H]; mask [B, L] (True/1 = real token). `explicit` forces the hand-written attention path.

    The mask is read as segment ids: a real token attends only the tokens of its own id, so a packed row
    (train/packing.py: ids 1, 2, ... per example) keeps its examples apart; padding (0) attends every real token.
    A 0/1 mask is the plain key-padding mask.

    `attend(q, k, v, key_mask, dropout_rng) -> out` (q, k, v, out [B, L, N, D]; key_mask bool [B, L]) replaces
    the dense attention core, e.g. with Big Bird's block-sparse attention (models/attention.py); it applies
    its own probability dropout. The projections around it, and so the parameters, stay the same.

    `query_positions` [B, P] ints: only these positions query (keys and values are still every position); the
    output is [B, P, H], the rows of the full output at those positions.

    `bias` [1, N, L, L] float32 is added to the scaled scores (MPNet's relative position bias); a callable
    `bias(q, k, project, dropout_rng) -> (q, bias)` computes it from q and k (DeBERTa's, relative_positions.py).
    """
    x = x.astype(self.dtype)
    xq = x if query_positions is None else jnp.take_along_axis(x, query_positions[:, :, None], axis=1)
    q = self._project(xq, 'query')
    k, v = (self._project(x, n) for n in ('key', 'value'))
    if callable(bias) and query_positions is None:
      q, bias = bias(q, k, self._project, dropout_rng)
    ids = mask.astype(jnp.int32)
    query_ids = ids if query_positions is None else jnp.take_along_axis(ids, query_positions, axis=1)
    same = query_ids[:, None, :, None] == ids[:, None, None, :]
    key_mask = (ids[:, None, None, :] != 0) & (same | (query_ids[:, None, :, None] == 0))  # [B, 1, Lq, L]
    use_dropout = dropout_rng is not None and self.attention_dropout_rate > 0.0
    if bias is not None and query_positions is not None:  # the rows of the querying positions: [B, N, P, L]
      bias = jnp.swapaxes(jnp.take(bias[0], query_positions, axis=1), 0, 1)
    if attend is not None:
      if bias is not None:
        raise ValueError('an attention bias needs dense attention (no `attend` core)')
      if query_positions is not None:
        raise ValueError('query_positions needs dense attention (no `attend` core)')
      out = attend(q, k, v, mask.astype(bool), dropout_rng)
    elif use_dropout or explicit:
      # dot_product_attention has no dropout on the probabilities, so spell it out here. Heads go in front of the
      # sequence first: XLA:CPU's batched matmuls with (batch, heads) leading ran the attention core ~1.5x faster
      # (forward + backward, BERT-base shapes) than einsums that stride over heads.
      qh, kh, vh = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [B, N, L, D]
      if bias is None and cpu_attention_core(self.dtype):
        out = softmax_attention(qh, kh, vh, key_mask, self.attention_dropout_rate, dropout_rng)
        return self._output(jnp.swapaxes(out, 1, 2))
      logits = jnp.einsum('bnqd,bnkd->bnqk', qh, kh, preferred_element_type=jnp.float32)
      logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
      if bias is not None:
        logits = logits + bias
      logits = jnp.where(key_mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      probs = dropout(probs, self.attention_dropout_rate, dropout_rng).astype(self.dtype)
      out = jnp.swapaxes(jnp.einsum('bnqk,bnkd->bnqd', probs, vh), 1, 2)
    else:
      # Splash reads the segment ids itself: padding (0) attends padding there, whose outputs nothing reads.
      # A few query rows (query_positions) take the mask path: splash tiles want whole blocks of queries.
      out = fused_attention.attend(q, k, v, implementation=self.implementation, mask=key_mask, bias=bias,
                                   segment_ids=(ids, ids) if query_positions is None else None)
    return self._output(out)

  def _output(self, out):
    out = constrain(out.astype(self.dtype), ('batch', 'length', 'act_heads', 'kv'))
    y = project(out, self.out_kernel[...].astype(self.dtype), in_axes=2)
    return add_bias(y, self.out_bias[...])


class Mlp(nnx.Module):
  """W2 act(W1 x), `activation` one of ACTIVATIONS: BERT's exact (erf) GELU, ALBERT's tanh one, ERNIE 1.0's ReLU."""

  def __init__(self, hidden: int, intermediate: int, *, stddev: float, dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs, activation: str = 'gelu'):
    self.wi = Dense(hidden, intermediate, ('embed', 'mlp'), stddev=stddev, dtype=dtype, rngs=rngs)
    self.wo = Dense(intermediate, hidden, ('mlp', 'embed'), stddev=stddev, dtype=dtype, rngs=rngs)
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    h = ACTIVATIONS[self.activation](self.wi(x))
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    return self.wo(h)


# ----- layer stacks (shared by every Transformer here) -----

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole layer in the backward pass
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,  # keep weight matmul outputs
}
LAYER_LOOPS = ('auto', 'scan', 'unrolled')

# 'auto' unrolls a training step that runs at least this many times (per compiled shape) on the backend: from
# there the faster steps pay back the longer compile. On a 2-core CPU BERT-base gradients at 6-10 rows of 128
# compiled in 13-17 s unrolled against 4 s in the loop and ran 4-8% faster; MiniLM's 15% faster for 7-9 s against
# 3-4 s: even after 30-110 steps (BENCHMARKS.md §24). A whole 60-step MiniLM job (batch 16 packed, one shape) ran
# its steps 1.4 s faster unrolled for 4 s more compile: even after ~170 (§38). H200: BERT-base at seq 512 compiled
# in 83 s against 24 s for 7 ms a step: even after ~8,000 (§23).
UNROLL_MIN_RUNS = {'cpu': 100, 'gpu': 10_000}


def unroll_layers(layer_loop: str, *, gradient: bool = True, runs: float | None = None) -> bool:
  """Whether a stacked (scanned) layer stack runs unrolled; the params are stacked either way.

  'auto' unrolls training steps on CPU and GPU: XLA:CPU ran a 6-layer encoder's gradient 1.4x faster unrolled
  than in its while loop, and BERT-small and BERT-base pretraining steps 1.18x and 1.12x faster (BENCHMARKS.md
  §15); on an H200 the bfloat16 steps of BERT-base (seq 512) and GPT-2 small (seq 1024) ran 1.20x and 1.18x
  faster, for 3.5x and 4x the compile time (83 s and 38 s; §23). With `runs` (how many times one compiled shape
  of the step will run, e.g. in a short fine-tuning job) it unrolls only from UNROLL_MIN_RUNS of the backend.
  A forward-only program (`gradient=False`: dev and evaluation batches) keeps the loop: XLA:CPU runs a forward
  pass as fast in the loop and compiles it 1.5-7x faster (§24), and an evaluation's few batches a shape would
  not pay back the unrolled compile on GPU. TPU keeps the loop, whose compile time is flat in depth (not measured
  there yet); 'scan' asks for it anywhere.
  """
  if layer_loop != 'auto':
    return layer_loop == 'unrolled'
  backend = mesh_lib.backend()
  if backend not in UNROLL_MIN_RUNS or not gradient:
    return False
  return runs is None or runs >= UNROLL_MIN_RUNS[backend]


def forward_graphdef(model: nnx.Module):
  """`nnx.split(model)[0]` for forward-only programs: the layer stacks that 'auto' unrolled (for training) run
  XLA's loop instead where unroll_layers(gradient=False) says so; `nnx.state(model)` fits it as it is. ICL scoring
  of SmolLM2 (30 layers, 16 x 128) compiled in 0.6 s against 4.3 s and ran 6% faster (BENCHMARKS.md §24)."""
  auto = getattr(getattr(model, 'config', None), 'layer_loop', None) == 'auto'
  stacks = [m for _, m in nnx.iter_modules(model) if getattr(m, 'unroll', None) is True]
  stacks = stacks if auto and not unroll_layers('auto', gradient=False) else []
  for stack in stacks:
    stack.unroll = False
  try:
    return nnx.split(model)[0]
  finally:
    for stack in stacks:
      stack.unroll = True


@functools.partial(jax.jit, static_argnums=0)
def _decode_layer(graphdef, state, *args):
  return nnx.merge(graphdef, state).decode(*args)


def decode_layer(layer: nnx.Module, *args):
  """`layer.decode(*args)` as a jit of its own, so that the layers of an unrolled stack (same structure, same
  shapes) share one trace and one lowered function under the caller's jit. Tracing and lowering 30 layers each,
  twice (then the prompt's pass and the one-token step), took ~1.5 s of a generate job's start; XLA inlines the
  calls again."""
  graphdef, state = nnx.split(layer)
  return _decode_layer(graphdef, state, *args)


def describe_layer_loop(model_cfg) -> str:
  """What a banner says of a model section's layer loop, e.g. 'layers unrolled in training, in a loop for eval
  (auto, cpu)'; '' for a model without stacked layers. A section without the key (an imported checkpoint, an
  older export) runs 'auto'."""
  if not model_cfg.get('scan_layers', False):
    return ''
  loop = model_cfg.get('layer_loop', 'auto')
  how = loops_phrase(unroll_layers(loop), unroll_layers(loop, gradient=False), 'eval')
  return f'layers {how}' + (f' (auto, {mesh_lib.backend()})' if loop == 'auto' else '')


def loops_phrase(train_unrolled: bool, forward_unrolled: bool, forward_use: str) -> str:
  """'unrolled' / 'in a loop', or 'unrolled in training, in a loop for FORWARD_USE' when the two differ."""
  def how(unrolled):
    return 'unrolled' if unrolled else 'in a loop'
  if train_unrolled == forward_unrolled:
    return how(train_unrolled)
  return f'{how(train_unrolled)} in training, {how(forward_unrolled)} for {forward_use}'


def maybe_remat(fn, remat: str, *, in_scan: bool):
  """`fn` under `nnx.remat` with the named policy ('none' = as is)."""
  if remat == 'none':
    return fn
  # Inside a scan CSE cannot undo the remat, and prevent_cse would only block optimisations.
  return nnx.remat(fn, policy=REMAT_POLICIES[remat], prevent_cse=not in_scan)


def stack_layers(build, num_layers: int, scan: bool, rngs: nnx.Rngs):
  """`num_layers` layers from `build(rngs)`: one stacked module (params get a leading 'layers' axis, run with
  nnx.scan) when `scan`, else an nnx.List (for comparison and debugging)."""
  if not scan:
    return nnx.List([build(rngs) for _ in range(num_layers)])

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def make(rngs):
    return build(rngs)
  return make(rngs)


def check_compute_settings(c, family: str, *, dropout_names=('dropout_rate', 'attention_dropout_rate'),
                           eps_note: str = '') -> None:
  """The checks every Transformer config shares, as one-line UserErrors: dropout rates in [0, 1), a positive
  `layer_norm_eps` (when the config has one; `eps_note` names the reference value), dtype, remat and the
  attention implementation. A dtype or remat of 'auto' (a config no job resolved) becomes what `family`
  (model.name) takes on this backend (precision.compute_dtype, precision.remat_policy)."""
  for name in dropout_names:
    if not 0.0 <= getattr(c, name) < 1.0:
      raise UserError(f'model.{name}={getattr(c, name)} must be in [0, 1)')
  if hasattr(c, 'layer_norm_eps') and not c.layer_norm_eps > 0:
    raise UserError(f'model.layer_norm_eps={c.layer_norm_eps} must be positive{eps_note}')
  object.__setattr__(c, 'dtype', precision.compute_dtype(c.dtype, family)[0])  # a frozen dataclass
  if c.remat == 'auto':
    object.__setattr__(c, 'remat', precision.remat_policy('auto', c.dtype)[0])
  if c.remat not in ('none', *REMAT_POLICIES):
    raise UserError(f"model.remat={c.remat!r}: use 'auto', 'none', 'full' or 'dots'")
  if c.layer_loop not in LAYER_LOOPS:
    raise UserError(f"model.layer_loop={c.layer_loop!r}: use 'auto', 'scan' or 'unrolled'")
  fused_attention.check_implementation(c.attention)


def config_fields(cls, model_cfg, config_file: str) -> dict:
  """The fields of dataclass `cls` (but vocab_size) that `model_cfg` (a ConfigDict/dict) sets, None dropped;
  a UserError naming `config_file` when a size every Transformer needs is missing."""
  get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
  kw = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.name != 'vocab_size'}
  kw = {k: v for k, v in kw.items() if v is not None}
  missing = [k for k in ('num_layers', 'hidden_size', 'num_heads', 'intermediate_size') if k not in kw]
  if missing:
    raise UserError(f'the model config lacks {", ".join("model." + k for k in missing)}: start from {config_file}')
  return kw

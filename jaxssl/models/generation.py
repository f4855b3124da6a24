"""Sampling from a causal LM with a KV cache: `generate` (prefill + a `lax.while_loop` of one-token decode steps,
all under one jit) and `sample_logits` (greedy / temperature / top-k / top-p).

The model is any module with `config.max_position`, `init_cache(batch, max_len)` and
`decode(tokens, cache, positions) -> (logits, cache)`, i.e. jaxssl/models/gpt.py's GPT.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.models import generate_program
from jaxssl.models.layers import unroll_layers
from jaxssl.models.parts import CausalSelfAttention, Linear
from jaxssl.models.products import out_major_perm

# An attention module's kernels and their input axes.
_ATTENTION_KERNELS = (('query', 1), ('key', 1), ('value', 1), ('out', 2))


def sample_logits(logits: jax.Array, rng: jax.Array, *, temperature=1.0, top_k=0, top_p=1.0,
                  greedy: bool = False) -> jax.Array:
  """One token id per row of `logits` [B, V]: argmax (greedy), or a sample after temperature, top-k, top-p.

  temperature, top_k (0 = all tokens) and top_p (1.0 = all) may be traced scalars: changing them does not
  recompile a jitted caller.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  vocab = logits.shape[-1]
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  # top-k: drop what is below the k-th largest logit (ties with it stay).
  k = jnp.clip(top_k, 1, vocab)
  sorted_logits = jnp.where((jnp.arange(vocab) < k) | (top_k <= 0), sorted_logits, -jnp.inf)
  # top-p: keep the most likely tokens until their mass reaches top_p (always at least one).
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
  keep = (before < top_p) | (top_p >= 1.0)  # top_p = 1 keeps all, whatever the cumsum's rounding
  cutoff = jnp.min(jnp.where(keep & (sorted_logits > -jnp.inf), sorted_logits, jnp.inf), axis=-1, keepdims=True)
  logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def weight_bytes_per_token(model: nnx.Module) -> int:
  """Bytes of weights one decoding step reads at batch 1: every parameter, except the tables a step reads one
  row of (learned positions; token embeddings when the output projection is a separate lm_head). Divided into a
  memory bandwidth, it bounds tokens/s from above."""
  c = model.config
  gathered = {'position_embeddings'} | (set() if c.tie_embeddings else {'token_embeddings'})
  return sum(leaf.nbytes for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if not gathered & {str(key) for key in path})


def runs_layers_apart(model: nnx.Module) -> bool:
  """Whether the generate program takes each layer's weights as arrays of their own (`layers_apart`) rather than
  the stack: where the layers run unrolled (`model.layer_loop`; 'auto' on CPU and GPU).

  Why: a decoding step that slices layer i out of the stacked weights made XLA:CPU copy each slice at every token,
  three times the weight traffic of batch 1's matrix-vector products (SmolLM2-135M: 22.9 tokens/s stacked, 31
  apart). With each layer's cache its own array too (layer_caches_apart), batches gain as well: SmolLM2 at batch
  8, 140 against 108 tokens/s for the stacked loop, at batch 32 242 against 219; Gemma 3 270M at batch 8, 70
  against 54 (BENCHMARKS.md §21). The slices are the program's inputs, not made inside it: a program that sliced
  the stack copied every weight at every call (a second copy of the model in fresh memory, ~1 s of the generate
  job's start for a 2.4 GB model), and the job can hand it slices of a memory-mapped file without a copy
  (weights_cache.load).
  """
  c = model.config
  return c.scan_layers and unroll_layers(c.layer_loop)


def layers_apart(model: nnx.Module) -> nnx.Module:
  """`model` as the generate program takes it: where runs_layers_apart, a model over new module objects whose
  layers hold their own weight arrays (slices of the stack: one copy of the layers, made once, so pass the result
  to repeated `generate` calls), their big kernels output-major (generate_program.OUT_MAJOR_MIN_BYTES); otherwise
  `model` itself. Abstract weights (jax.ShapeDtypeStruct, e.g. an export's before it is restored) give abstract
  slices, their shardings without the layer axis."""
  if not runs_layers_apart(model):
    return model
  c = model.config
  copy = nnx.merge(*nnx.split(model))
  layer_def, stacked = nnx.split(copy.decoder.layers)  # a stacked module's graph is one layer's
  copy.decoder.layers = nnx.List([nnx.merge(layer_def, jax.tree.map(lambda a, i=i: _layer_slice(a, i), stacked))
                                  for i in range(c.num_layers)])
  if not c.tie_embeddings:  # its own Variable (merge shares the model's), stored [V, H] for products.vocab_logits
    copy.lm_head = nnx.merge(*jax.tree.map(lambda a: a, nnx.split(copy.lm_head)))
    _store_out_major(copy.lm_head)
  for layer in copy.decoder.layers:
    _store_out_major(layer)
    _fuse_qkv(layer)
  copy.decoder.scan_layers = False
  copy.config = dataclasses.replace(c, scan_layers=False)
  return copy


def _store_out_major(layer: nnx.Module) -> None:
  """Stores the big kernels of `layer` (its own arrays: layers_apart's) output-major, in place, and tells their
  modules so: Linear [in, out] -> [out, in]; attention q/k/v [H, N, D] -> [N, D, H], output [N, D, H] -> [H, N, D].
  A kernel split over devices keeps its layout."""
  for _, node in nnx.iter_graph(layer):
    if isinstance(node, Linear):
      node.out_major = _transposed(node.kernel, 1)
    elif isinstance(node, CausalSelfAttention):
      node.out_major = tuple(n for n, in_axes in _ATTENTION_KERNELS
                             if _transposed(getattr(node, f'{n}_kernel'), in_axes))


def _fuse_qkv(layer: nnx.Module) -> None:
  """Makes attention's q/k/v kernels one `qkv_kernel` [H, N + 2K, D] (heads after heads; output-major where its
  parts were), in place, where the three share a layout and are whole on each device. Why: a batch-1 decoding step
  is a dozen small matrix-vector products a layer, each paying XLA:CPU's dispatch and thread fan-out; two fewer a
  layer made SmolLM2-135M decode 9% faster at batch 1, within the host's noise at batch 8 (BENCHMARKS.md §33). The
  MLP's gate and up kernels are not fused: +2% at batch 1, -6% at batch 8."""
  for _, node in nnx.iter_graph(layer):
    if isinstance(node, CausalSelfAttention):
      names = ('query', 'key', 'value')
      fused = _concatenated([getattr(node, f'{n}_kernel') for n in names], [n in node.out_major for n in names])
      if fused is not None:
        heads, kv_heads = (getattr(node, f'{n}_kernel').shape[0 if n in node.out_major else 1] for n in names[:2])
        for n in names:
          delattr(node, f'{n}_kernel')
        node.qkv_kernel, node.fused_qkv = fused, (heads, kv_heads)
        node.out_major = tuple(n for n in node.out_major if n not in names) + (('qkv',) if 'query' in node.out_major
                                                                                else ())


def _concatenated(params: list, out_major: list) -> nnx.Param | None:
  """Kernels [H, *O_i] (each output-major where `out_major` says) as one, concatenated along their first output
  axis (logical axis 1); None where their layouts differ or one is split over devices. Abstract ones
  (jax.ShapeDtypeStruct) give an abstract one."""
  values = [p.get_value() for p in params]
  if len(set(out_major)) > 1 or not all(_whole_on_each_device(a) for a in values):
    return None
  axis = 0 if out_major[0] else 1
  if isinstance(values[0], jax.ShapeDtypeStruct):
    shape = list(values[0].shape)
    shape[axis] = sum(a.shape[axis] for a in values)
    value = jax.ShapeDtypeStruct(tuple(shape), values[0].dtype, sharding=values[0].sharding)
  else:
    value = jnp.concatenate(values, axis=axis)
  return nnx.Param(value)


def _whole_on_each_device(a) -> bool:
  """Whether an array or jax.ShapeDtypeStruct is unsharded or replicated (each device holds all of it)."""
  sharding = getattr(a, 'sharding', None)
  return sharding is None or sharding.is_fully_replicated


def _transposed(param: nnx.Variable, in_axes: int) -> bool:
  """Whether `param` (an array or jax.ShapeDtypeStruct) was big and whole on each device, and so now holds its
  value output-major (products.out_major_perm)."""
  a = param.get_value()
  if a.size * a.dtype.itemsize < generate_program.out_major_min_bytes() or not _whole_on_each_device(a):
    return False
  sharding = getattr(a, 'sharding', None)
  perm = out_major_perm(a.ndim, in_axes)
  if isinstance(a, jax.ShapeDtypeStruct):
    if isinstance(sharding, jax.sharding.NamedSharding):
      spec = (*sharding.spec, *[None] * (a.ndim - len(sharding.spec)))
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*[spec[p] for p in perm]))
    param.set_value(jax.ShapeDtypeStruct(tuple(a.shape[p] for p in perm), a.dtype, sharding=sharding))
  else:
    param.set_value(jnp.transpose(a, perm))
  return True


def program_inputs(model: nnx.Module) -> list:
  """The weight arguments of the generate program of `model` (as layers_apart gives it), in its order:
  generate_program.weights_layout entries, with a 4th where an input is not an export's leaf as it is: 'perm',
  the axes order of a kernel stored output-major, and 'parts', the keys of the kernels a fused one concatenates."""
  how = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, Linear) and node.out_major:
      how.setdefault((*path, 'kernel'), {})['perm'] = list(out_major_perm(2, 1))
    elif isinstance(node, CausalSelfAttention):
      for name, in_axes in (*_ATTENTION_KERNELS, ('qkv', 1)):
        if name in node.out_major:
          how.setdefault((*path, f'{name}_kernel'), {})['perm'] = list(out_major_perm(3, in_axes))
      if node.fused_qkv:
        parts = [[*path, f'{n}_kernel'] for n in ('query', 'key', 'value')]
        how.setdefault((*path, 'qkv_kernel'), {})['parts'] = parts
  inputs = generate_program.weights_layout(nnx.to_pure_dict(nnx.state(model)))
  return [[*entry, how[tuple(entry[0])]] if tuple(entry[0]) in how else entry for entry in inputs]


def _layer_slice(a, i: int):
  if not isinstance(a, jax.ShapeDtypeStruct):
    return a[i]
  sharding = a.sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))
  return jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)


_LAYER_ENTRIES = ('key', 'value', 'local_key', 'local_value')  # a cache's entries with a leading layer axis


def layer_caches_apart(cache: dict) -> dict:
  """`cache` (GPT.init_cache) with each stacked key/value entry [L, ...] as a list of L per-layer arrays.

  Why: layers run apart wrote their new slots into slices of the stacked arrays and stacked them again, a copy of
  the whole cache per token: with 512 new tokens a fifth of the time (SmolLM2 at batch 1: 22.7 -> 28.8 tokens/s).
  Apart, each layer's array is its own loop-carried buffer, updated in place.
  """
  return {name: list(entry) if name in _LAYER_ENTRIES else entry for name, entry in cache.items()}


def _decode_fn(graphdef, state, tokens, cache, positions, last=None):
  return nnx.merge(graphdef, state).decode(tokens, cache, positions, last)


@functools.partial(jax.jit, static_argnums=0,
                   static_argnames=('max_new_tokens', 'greedy', 'padding_side', 'layers_apart'))
def _generate(graphdef, state, prompt_ids, prompt_lengths, rng, temperature, top_k, top_p, stop_ids, pad_id, *,
              max_new_tokens, greedy, padding_side, layers_apart):
  batch, width = prompt_ids.shape
  lengths = prompt_lengths.astype(jnp.int32)
  idx = jnp.arange(width, dtype=jnp.int32)[None]
  if padding_side == 'right':
    positions = jnp.where(idx < lengths[:, None], idx, -1)
    last = lengths - 1
  else:
    positions = idx - (width - lengths)[:, None]
    positions = jnp.where(positions >= 0, positions, -1)
    last = jnp.full((batch,), width - 1, jnp.int32)
  cache = nnx.merge(graphdef, state).init_cache(batch, width + max_new_tokens)
  if layers_apart:  # the state holds each layer's weights apart (layers_apart): each layer's cache too
    cache = layer_caches_apart(cache)
  # Pad slots are looked up as token 0 (any pad value is safe) and never attended to (position -1).
  prompt_ids = jnp.where(positions >= 0, prompt_ids.astype(jnp.int32), 0)
  logits, cache = _decode_fn(graphdef, state, prompt_ids, cache, positions, last)
  logits = logits[:, 0]  # [B, V] at each prompt's last real token

  def cond(carry):
    t, _, _, _, done, _, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  # The params ride in the loop carry: NNX refuses variables holding tracers of an outer trace (here, the jit's)
  # inside the loop body's nnx.scan.
  def body(carry):
    t, out, logits, cache, done, num, rng, state = carry
    rng, key = jax.random.split(rng)
    sampled = sample_logits(logits, key, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    out = out.at[:, t].set(jnp.where(done, pad_id, sampled))
    num = jnp.where(done, num, t + 1)
    done = done | jnp.isin(sampled, stop_ids)
    # Stopped rows keep decoding (the batch moves in lockstep); their outputs are ignored.
    logits, cache = _decode_fn(graphdef, state, sampled[:, None], cache, (lengths + t)[:, None])
    return t + 1, out, logits[:, 0], cache, done, num, rng, state

  out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), out, logits, cache, jnp.zeros((batch,), bool),
          jnp.zeros((batch,), jnp.int32), rng, state)
  _, out, _, _, _, num, _, _ = jax.lax.while_loop(cond, body, init)
  return out, num


def _arguments(model, prompt_ids, prompt_lengths, rng, temperature, top_k, top_p, stop_ids, pad_id):
  """(graphdef, state, the other arguments of the program: generate_program.arguments)."""
  graphdef, state = nnx.split(model)
  return graphdef, state, generate_program.arguments(prompt_ids, prompt_lengths, rng, temperature, top_k, top_p,
                                                     stop_ids, pad_id)


def _statics(model: nnx.Module, max_new_tokens: int, greedy: bool, padding_side: str) -> dict:
  """The program's static settings for `model` as layers_apart gives it."""
  return dict(max_new_tokens=int(max_new_tokens), greedy=bool(greedy), padding_side=padding_side,
              layers_apart=not model.config.scan_layers)


@dataclasses.dataclass(frozen=True)
class GenerateProgram:
  """`generate`'s program compiled ahead for one prompt shape and setting (compile_generate)."""
  compiled: object  # jax.stages.Compiled of _flat's function
  prompt_shape: tuple[int, int]
  num_stop_ids: int
  statics: dict


def _flat(graphdef, treedef, statics):
  """_generate over the state's leaves and the rng's key data: what jax.export serializes (no NNX types, no key
  dtype)."""
  def run(leaves, prompt_ids, prompt_lengths, key_data, temperature, top_k, top_p, stop_ids, pad_id):
    return _generate(graphdef, jax.tree.unflatten(treedef, leaves), prompt_ids, prompt_lengths,
                     jax.random.wrap_key_data(key_data), temperature, top_k, top_p, stop_ids, pad_id, **statics)
  return run


def compile_generate(model: nnx.Module, batch: int, width: int, max_new_tokens: int, *, greedy: bool = False,
                     padding_side: str = 'right', num_stop_ids: int = 0, save_to: str | None = None) -> GenerateProgram:
  """`generate`'s program for prompts [batch, width], compiled from `model`'s structure and shapes alone: its
  variables may be jax.ShapeDtypeStruct (an export's abstract params, while the weights are being restored).

  The generate job compiles (or loads from the compile cache) while another thread restores the weights.
  Pass the result to `generate(..., program=)` with a typed rng key (jax.random.key). `save_to`: a file
  (program_cache.path_for) that keeps the traced program for a later start (generate_program.load), with the
  layout of the export's weights it restores and of the leaves it passes (generate_program.program_leaves).
  """
  stacked = nnx.to_pure_dict(nnx.state(model))
  model = layers_apart(model)
  graphdef, state, small = _arguments(model, jnp.zeros((batch, width), jnp.int32), jnp.ones((batch,), jnp.int32),
                                      jax.random.key(0), 1.0, 0, 1.0, range(num_stop_ids), 0)
  leaves, treedef = jax.tree.flatten(state)
  # The weights keep their shardings on the mesh; the small arguments are left for the compiler to place.
  specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, 'sharding', None)) for a in leaves],
           *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in small])
  statics = _statics(model, max_new_tokens, greedy, padding_side)
  program = jax.jit(_flat(graphdef, treedef, statics))
  inputs = program_inputs(model)
  # A later start restores the weights as a nested dict and passes its leaves (or their layers' slices) in
  # `inputs`' order: saved only if that is the state's.
  if save_to is None or [w[1] for w in inputs] != [list(a.shape) for a in leaves]:
    return GenerateProgram(program.lower(*specs).compile(), (batch, width), len(small[-2]), statics)
  exported = jax.export.export(program)(*specs)
  lapack = generate_program.calls_lapack(exported)
  generate_program.save(save_to, exported, statics, generate_program.weights_layout(stacked), inputs, lapack)
  return GenerateProgram(generate_program.compile_exported(exported, lapack=lapack), (batch, width), len(small[-2]),
                         statics)


def generate(model: nnx.Module, prompt_ids, prompt_lengths, max_new_tokens: int, rng: jax.Array | None = None, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
             stop_ids=(), padding_side: str = 'right', pad_id: int = 0, program: GenerateProgram | None = None):
  """Continues a batch of prompts -> (tokens [B, max_new_tokens] int32, num_generated [B] int32).

  prompt_ids [B, P] hold prompts of `prompt_lengths` [B] (each >= 1) tokens, padded on `padding_side`
  ('right' or 'left'). A row stops after emitting a token in `stop_ids` (kept, and counted in num_generated);
  its later slots hold `pad_id`. The loop ends early when every row has stopped. Sampling: `greedy` takes
  the argmax; otherwise logits / temperature, restricted to the top_k (0 = all) most likely tokens and to the
  top_p nucleus (1.0 = all), sampled with `rng`. Compiled once per prompt shape, max_new_tokens, greedy,
  padding side and number of stop ids; the other settings are traced. `program`: the same, compiled ahead
  (compile_generate) for this call's shape and settings. A model whose layers run unrolled has them sliced out of
  the stack at each call (layers_apart): pass `layers_apart(model)` to skip that copy in repeated calls.
  """
  model = layers_apart(model)
  generate_program.check_settings(model.config.max_position, prompt_ids.shape[1], max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy,
                                  padding_side=padding_side)
  if rng is None:
    if not greedy:
      raise UserError('sampling needs an rng key (or pass greedy=True)')
    rng = jax.random.key(0)
  graphdef, state, small = _arguments(model, prompt_ids, prompt_lengths, rng, temperature, top_k, top_p, stop_ids,
                                      pad_id)
  statics = _statics(model, max_new_tokens, greedy, padding_side)
  if program is None:
    return _generate(graphdef, state, *small[:2], rng, *small[3:], **statics)
  stops = len(small[-2])
  if (program.prompt_shape, program.num_stop_ids, program.statics) != (tuple(prompt_ids.shape), stops, statics):
    raise ValueError(f'the program was compiled for prompts {program.prompt_shape}, {program.num_stop_ids} stop ids '
                     f'and {program.statics}; this call has {tuple(prompt_ids.shape)}, {stops}, {statics}')
  return program.compiled(jax.tree.leaves(state), *small)

"""ELMo (Peters et al. 2018): a bidirectional LSTM language model whose layers give contextual word vectors.

  token embedding ──► L forward LSTM layers  ──► shared softmax: predict token t+1 from forward state t
                 └──► L backward LSTM layers ──► shared softmax: predict token t-1 from backward state t

Each direction has its own LSTM parameters; both share the token embedding and the softmax (tied to the
embedding, or one separate output layer when `tie_embeddings=False`, as the paper). Each LSTM cell has
`lstm_size` units and projects its output to `embed_size` inside the recurrence (the paper's LSTMP, torch's
`proj_size`); layers after the first add a residual connection. Cell and projection values may be clipped
(`cell_clip`, `proj_clip`; the paper uses 3). The input (`token_input`) is a token embedding ('tokens') or the
paper's character CNN over each token's characters ('chars', models/elmo_chars.py; char ids [B, T, max_chars]
come with the batch, and the softmax is separate since there is no input table to tie it to). The recurrence is one `jax.lax.scan` over time per layer and direction; the input projections of
all steps are one matmul before it.

Packed rows (data/examples/packed_lm.py): the recurrent state starts from zero wherever `segment_ids` changes, in both
directions, so a document in a packed row gets exactly the outputs it gets alone; losses count only pairs inside
one non-zero segment.

Contextual embeddings: `embed(ids)` gives all L + 1 layer representations [L + 1, B, T, 2 * embed_size]
(layer 0 = the token's input vector twice, layer l = concat(forward_l, backward_l)); `ScalarMix` (softmax-normalised
layer weights times a scale gamma) mixes them for a task. `encode` is the body interface of the downstream
heads (tasks/model.py): (mixed sequence [B, T, 2E], mean over real tokens [B, 2E]), each layer normalised
per token first (`mix_layer_norm`), the biLM frozen (stop_gradient) unless `finetune_bilm`; `config.hidden_size`
is that width, 2 * embed_size. Frozen means no gradient: an optimizer's decoupled weight decay still shrinks
those params unless the fine-tune job masks them out.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models import elmo_chars, precision
from jaxssl.models.layers import Embed, dropout, make_param, normal_init, zeros
from jaxssl.models.parts import next_token_pairs

ACT = ('batch', 'length', 'act_embed')  # logical names of activations between layers


@dataclasses.dataclass(frozen=True)
class ElmoConfig:
  """The `model` config section, validated; frozen (hashable) so modules can hold it as static data."""
  vocab_size: int
  num_layers: int
  embed_size: int                  # token embedding = LSTM projection = each direction's layer output
  lstm_size: int                   # LSTM cell units (the paper: 4096, projected to 512)
  max_position: int = 8192         # no position limit in an LSTM: only bounds data.seq_len (shared checks)
  dropout_rate: float = 0.1        # on each LSTM layer's input and on the softmax input
  initializer_range: float = 0.02  # embedding / softmax init (LSTM kernels: 1 / sqrt(fan_in))
  cell_clip: float = 0.0           # clip LSTM cell values to [-c, c]; 0 = no clipping
  proj_clip: float = 0.0           # clip projected outputs; 0 = no clipping
  tie_embeddings: bool = True      # False: a separate softmax (embed, vocab) + bias shared by both directions
  finetune_bilm: bool = False      # downstream heads: False = the biLM is frozen, only ScalarMix + head learn
  mix_layer_norm: bool = True      # downstream heads: normalise each layer per token before ScalarMix mixes them
  dtype: str = 'float32'
  token_input: str = 'tokens'      # 'tokens': a token embedding table; 'chars': the character CNN (elmo_chars.py)
  max_chars: int = 50              # chars: characters per token with its begin/end marks (longer tokens are cut)
  char_embed_size: int = 16        # chars: character embedding size
  char_filters: tuple = elmo_chars.PAPER_FILTERS  # chars: (width, count) of each convolution
  highway_layers: int = 2          # chars: highway layers after the max-pooled filters
  char_activation: str = 'relu'    # chars: after max-pooling each filter ('relu' as ELMo; 'tanh' as Kim et al.)

  @property
  def hidden_size(self) -> int:
    """Width of a layer representation (forward ⊕ backward): what downstream heads read."""
    return 2 * self.embed_size

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'ElmoConfig':
    """Reads the fields this model uses from a ConfigDict/dict (extra keys such as `name` are ignored)."""
    get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
    kw = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.name != 'vocab_size'}
    kw = {k: v for k, v in kw.items() if v is not None}
    if 'char_filters' in kw:
      kw['char_filters'] = elmo_chars.filters_tuple(kw['char_filters'])
    missing = [k for k in ('num_layers', 'embed_size', 'lstm_size') if k not in kw]
    if missing:
      raise UserError(f'the model config lacks {", ".join("model." + k for k in missing)}: '
                      'start from configs/elmo.py')
    c = cls(vocab_size=int(vocab_size), **kw)
    for name in ('vocab_size', 'num_layers', 'embed_size', 'lstm_size', 'max_position'):
      if int(getattr(c, name)) < 1:
        raise UserError(f'model.{name}={getattr(c, name)} must be a positive integer')
    if not 0.0 <= c.dropout_rate < 1.0:
      raise UserError(f'model.dropout_rate={c.dropout_rate} must be in [0, 1)')
    for name in ('cell_clip', 'proj_clip'):
      if getattr(c, name) < 0:
        raise UserError(f'model.{name}={getattr(c, name)} must be >= 0 (0 = no clipping; the paper uses 3)')
    for name in ('tie_embeddings', 'finetune_bilm', 'mix_layer_norm'):
      if not isinstance(getattr(c, name), bool):
        raise UserError(f'model.{name}={getattr(c, name)!r} must be True or False')
    object.__setattr__(c, 'dtype', precision.compute_dtype(c.dtype, 'elmo')[0])  # 'auto': this backend's
    elmo_chars.check_char_config(c)
    return c


# ----- the LSTM -----

def _gate_bias_init(units: int):
  """Zeros, but 1 on the forget gate (gate order i, f, g, o): the cell remembers by default at the start."""
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[units:2 * units].set(1.0)
  return init


def segment_starts(segment_ids: jax.Array, *, reverse: bool = False) -> jax.Array:
  """[B, T] bool: where a recurrence reading left to right (or right to left when `reverse`) starts afresh:
  the first token of the row or of a segment (the last one of a segment, reading backwards)."""
  if reverse:
    return jnp.concatenate([segment_ids[:, :-1] != segment_ids[:, 1:], jnp.ones_like(segment_ids[:, :1], bool)], 1)
  return jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)


class LstmLayer(nnx.Module):
  """One direction of one layer: an LSTM with projection (LSTMP), as torch.nn.LSTM(proj_size=...) computes it.

    gates = x W_x + h W_h + b  (i, f, g, o)    c = σ(f) c + σ(i) tanh(g)    h = (σ(o) tanh(c)) W_p
  h (projected, `embed_size`) is both the output and the recurrent input. One bias (torch has two: b_ih + b_hh).
  """

  def __init__(self, in_features: int, c: ElmoConfig, *, rngs: nnx.Rngs):
    h, p = c.lstm_size, c.embed_size
    self.input_kernel = make_param(rngs, normal_init(in_features ** -0.5), (in_features, 4 * h),
                                   ('embed', 'lstm_gates'))
    self.recurrent_kernel = make_param(rngs, normal_init(p ** -0.5), (p, 4 * h), ('embed', 'lstm_gates'))
    self.bias = make_param(rngs, _gate_bias_init(h), (4 * h,), ('lstm_gates',))
    self.projection = make_param(rngs, normal_init(h ** -0.5), (h, p), ('lstm', 'embed'))
    self.cell_clip, self.proj_clip, self.dtype = c.cell_clip, c.proj_clip, c.compute_dtype

  def __call__(self, x: jax.Array, starts: jax.Array, *, reverse: bool = False) -> jax.Array:
    """x [B, T, in] -> outputs [B, T, embed_size] float32; the state is zero at `starts` [B, T] (bool).
    `reverse` runs from the last token to the first (the backward LM)."""
    dt = self.dtype
    # All steps' input projections in one matmul; only the recurrent matmul stays inside the scan.
    xw = jnp.einsum('bti,ig->btg', x.astype(dt), self.input_kernel[...].astype(dt),
                    preferred_element_type=jnp.float32) + self.bias[...]
    # Gathered whole once here, not at every time step inside the loop.
    w_h = constrain(self.recurrent_kernel[...], (None, 'lstm_gates')).astype(dt)
    w_p = constrain(self.projection[...], ('lstm', None)).astype(dt)
    batch, units, out = x.shape[0], w_h.shape[1] // 4, w_p.shape[1]

    def step(carry, inputs):
      h, c = carry
      xw_t, start_t = inputs
      keep = ~start_t[:, None]
      h, c = jnp.where(keep, h, 0.0), jnp.where(keep, c, 0.0)
      gates = xw_t + jnp.einsum('bp,pg->bg', h.astype(dt), w_h, preferred_element_type=jnp.float32)
      i, f, g, o = jnp.split(gates, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      if self.cell_clip:
        c = jnp.clip(c, -self.cell_clip, self.cell_clip)
      h = jnp.einsum('bh,hp->bp', (jax.nn.sigmoid(o) * jnp.tanh(c)).astype(dt), w_p,
                     preferred_element_type=jnp.float32)
      if self.proj_clip:
        h = jnp.clip(h, -self.proj_clip, self.proj_clip)
      return (h, c), h

    init = (jnp.zeros((batch, out), jnp.float32), jnp.zeros((batch, units), jnp.float32))
    _, hs = jax.lax.scan(step, init, (jnp.swapaxes(xw, 0, 1), jnp.swapaxes(starts, 0, 1)), reverse=reverse)
    return jnp.swapaxes(hs, 0, 1)


class ScalarMix(nnx.Module):
  """gamma * Σ_l softmax(w)_l * layer_l over the L + 1 ELMo layers (the paper's task-specific weighting).

  Starts as the plain average (w = 0, gamma = 1). `gamma` is named `scale` so weight decay leaves it alone.
  With `layer_norm` each layer is first normalised per token (zero mean, unit variance over its features, no
  parameters; AllenNLP's `do_layer_norm` does it over all tokens): the biLM's layers differ in scale, and a new
  linear head learns far faster on unit-scale features.
  """

  def __init__(self, num_layers: int, *, rngs: nnx.Rngs):
    self.weights = make_param(rngs, zeros, (num_layers,), ('layers',))
    self.scale = make_param(rngs, jax.nn.initializers.ones, (), ())

  def normalized_weights(self) -> jax.Array:
    """The layer weights after the softmax (they sum to 1)."""
    return jax.nn.softmax(self.weights[...])

  def __call__(self, layers: jax.Array, *, layer_norm: bool = False) -> jax.Array:
    """layers [L + 1, ..., D] -> [..., D]."""
    layers = layers.astype(jnp.float32)
    if layer_norm:
      mean = jnp.mean(layers, -1, keepdims=True)
      layers = (layers - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(layers - mean), -1, keepdims=True) + 1e-6)
    return self.scale[...] * jnp.einsum('l,l...->...', self.normalized_weights(), layers)


# ----- the model -----

class ElmoModel(nnx.Module):
  """Bidirectional LSTM LM. `__call__` -> (forward, backward) next/previous-token logits; `embed` -> the layer
  representations; `encode` -> the downstream heads' (sequence, pooled) body output."""

  def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
    c = cfg if isinstance(cfg, ElmoConfig) else ElmoConfig.from_config(cfg, vocab_size)
    self.config = c
    # Eager sharding needs a mesh; without one, keep the annotations but place nothing.
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      if c.token_input == 'chars':
        self.char_encoder = elmo_chars.CharEncoder(c, rngs=rngs)
      else:
        self.token_embeddings = Embed(c.vocab_size, c.embed_size, ('vocab', 'embed'), stddev=c.initializer_range,
                                      rngs=rngs)
      self.forward_layers = nnx.List([LstmLayer(c.embed_size, c, rngs=rngs) for _ in range(c.num_layers)])
      self.backward_layers = nnx.List([LstmLayer(c.embed_size, c, rngs=rngs) for _ in range(c.num_layers)])
      if not c.tie_embeddings:
        self.softmax_kernel = make_param(rngs, normal_init(c.initializer_range), (c.embed_size, c.vocab_size),
                                         ('embed', 'vocab'))
        self.softmax_bias = make_param(rngs, zeros, (c.vocab_size,), ('vocab',))
      self.scalar_mix = ScalarMix(c.num_layers + 1, rngs=rngs)

  def _stack(self, layers, x, starts, reverse, key):
    """One direction: each layer's input gets dropout; layers after the first add their input (residual)."""
    outputs = []
    for i, layer in enumerate(layers):
      k = None if key is None else jax.random.fold_in(key, i)
      y = layer(dropout(x, self.config.dropout_rate, k), starts, reverse=reverse)
      x = constrain(y + x if i else y, ACT)
      outputs.append(x)
    return outputs

  def token_vectors(self, input_ids, char_ids=None) -> jax.Array:
    """Layer 0, [B, T, E] float32: each token's embedding, or (token_input=chars) its char CNN vector from
    `char_ids` [B, T, max_chars]; context-free either way."""
    if self.config.token_input == 'chars':
      if char_ids is None:
        raise UserError('this ELMo reads characters (model.token_input=chars) but was given token ids only: '
                        'pretraining batches carry char ids (jaxssl.data.examples.elmo_chars), the fine-tuning '
                        'heads and the embeddings job not yet: use a token_input=tokens ELMo there')
      return self.char_encoder(char_ids)
    return constrain(self.token_embeddings(input_ids), ACT)

  def hidden_states(self, input_ids, segment_ids=None, *, char_ids=None, dropout_rng=None):
    """(layer 0 [B, T, E], [forward layer l outputs], [backward layer l outputs]), all float32.

    `segment_ids` [B, T] (default: one segment per row): the state restarts at each segment, both ways.
    `char_ids` [B, T, max_chars]: the tokens' characters (read only when token_input=chars).
    """
    if segment_ids is None:
      segment_ids = jnp.ones(input_ids.shape, jnp.int32)
    x = self.token_vectors(input_ids, char_ids)
    keys = [None, None] if dropout_rng is None else [jax.random.fold_in(dropout_rng, d) for d in (0, 1)]
    forward = self._stack(self.forward_layers, x, segment_starts(segment_ids), False, keys[0])
    backward = self._stack(self.backward_layers, x, segment_starts(segment_ids, reverse=True), True, keys[1])
    return x, forward, backward

  def _logits(self, h):
    c = self.config
    if c.tie_embeddings:
      return self.token_embeddings.attend(h, c.compute_dtype)
    kernel = constrain(self.softmax_kernel[...], (None, 'vocab')).astype(c.compute_dtype)
    logits = jnp.einsum('...e,ev->...v', h.astype(c.compute_dtype), kernel, preferred_element_type=jnp.float32)
    return logits + self.softmax_bias[...]

  def __call__(self, input_ids, *, segment_ids=None, positions=None, char_ids=None, dropout_rng=None):
    """input_ids [B, T] -> (forward logits, backward logits) [B, T, V] float32: forward position t predicts token
    t + 1, backward position t predicts token t - 1. `positions` is accepted (packed batches carry it) and not
    needed: the recurrence knows the order. `char_ids` as `hidden_states`. dropout_rng None = eval."""
    del positions
    _, forward, backward = self.hidden_states(input_ids, segment_ids, char_ids=char_ids, dropout_rng=dropout_rng)
    keys = [None, None] if dropout_rng is None else [jax.random.fold_in(dropout_rng, d) for d in (2, 3)]
    rate = self.config.dropout_rate
    return (self._logits(dropout(forward[-1], rate, keys[0])),
            self._logits(dropout(backward[-1], rate, keys[1])))

  def embed(self, input_ids, segment_ids=None, *, char_ids=None, dropout_rng=None) -> jax.Array:
    """All layer representations [L + 1, B, T, 2 * embed_size]: layer 0 = the token's input vector for both
    directions, layer l = concat(forward_l, backward_l). ScalarMix turns them into a task's representation."""
    x, forward, backward = self.hidden_states(input_ids, segment_ids, char_ids=char_ids, dropout_rng=dropout_rng)
    layers = [jnp.concatenate([x, x], -1)] + [jnp.concatenate(fb, -1) for fb in zip(forward, backward)]
    return jnp.stack(layers)

  def encode(self, input_ids, token_type_ids=None, attention_mask=None, *, char_ids=None, dropout_rng=None):
    """The downstream heads' body: (ScalarMix of the layers [B, T, 2E], mean over real tokens [B, 2E]).

    `attention_mask` [B, T] (1 = real token, 0 = padding) keeps padding out of the recurrence and the mean;
    `token_type_ids` are ignored (an LSTM reads a pair as one sequence). Frozen biLM (the paper's setting) unless
    `finetune_bilm`: its outputs are under stop_gradient, and it runs without dropout.
    """
    del token_type_ids
    mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
    frozen = not self.config.finetune_bilm
    layers = self.embed(input_ids, mask, char_ids=char_ids, dropout_rng=None if frozen else dropout_rng)
    if frozen:
      layers = jax.lax.stop_gradient(layers)
    seq = constrain(self.scalar_mix(layers, layer_norm=self.config.mix_layer_norm), ACT)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(seq * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
    return seq, pooled


# ----- losses, FLOPs -----

def _pair_nll(logits, targets, valid):
  """(Σ NLL, Σ correct) of `targets` [B, N] under `logits` [B, N, V] where `valid`."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jax.nn.logsumexp(logits, axis=-1) - target_logit
  correct = (jnp.argmax(logits, -1) == targets) & valid
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(correct).astype(jnp.float32)


def bidirectional_lm_sums(forward_logits, backward_logits, input_ids, segment_ids=None) -> dict:
  """Summed losses of both LMs: forward position t predicts token t + 1, backward position t + 1 predicts token t.

  Each adjacent pair inside one non-zero segment (parts.next_token_pairs) is one target in each direction, so both
  directions have the same `lm_count`.
  """
  if segment_ids is None:
    segment_ids = jnp.ones(input_ids.shape, jnp.int32)
  valid = next_token_pairs(segment_ids)  # [B, T - 1]: (t, t + 1) in one document
  # Targets shifted, logits read whole (slicing them would copy [B, T, V], see gpt.next_token_stats).
  ahead, behind = ((0, 0), (0, 1)), ((0, 0), (1, 0))
  forward_loss, forward_correct = _pair_nll(forward_logits, jnp.pad(input_ids[:, 1:], ahead),
                                            jnp.pad(valid, ahead))
  backward_loss, backward_correct = _pair_nll(backward_logits, jnp.pad(input_ids[:, :-1], behind),
                                              jnp.pad(valid, behind))
  return {'forward_loss': forward_loss, 'forward_correct': forward_correct, 'backward_loss': backward_loss,
          'backward_correct': backward_correct, 'lm_count': jnp.sum(valid).astype(jnp.float32)}


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int = 0) -> float:
  """Training FLOPs per input token (forward + backward = 3x forward; 2 FLOPs per multiply-add), matmuls only.

  Per layer and direction: the gates 4H x (E + P) (input and recurrent kernels) and the projection H x P; per
  direction the E x V softmax at every position; with token_input=chars, once per token the char encoder
  (elmo_chars.char_encoder_flops). `seq_len` and `max_predictions` do not change it.
  """
  del seq_len, max_predictions
  c = ElmoConfig.from_config(model_cfg, vocab_size)
  h, e = c.lstm_size, c.embed_size
  per_layer = 4 * h * (e + e) + h * e
  chars = elmo_chars.char_encoder_flops(c) if c.token_input == 'chars' else 0.0
  return float(3 * (2 * 2 * (c.num_layers * per_layer + e * c.vocab_size) + chars))

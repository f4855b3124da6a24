"""ELMo's character encoder (Peters et al. 2018, after Jozefowicz et al. 2016): a token's vector from its characters.

  char ids [B, T, C] ──► char embeddings [B, T, C, D] ──► for each (width w, count n): a 1-D convolution over the
  C positions (VALID, with bias) ──► max over positions ──► activation ──► concatenated [B, T, F = Σ n]
  ──► `highway_layers` highway layers ──► linear projection (with bias) ──► [B, T, embed_size] = the LSTM input

The paper's encoder: 50 characters per token, 16-dim character embeddings, widths 1..7 with
[32, 32, 64, 128, 256, 512, 1024] filters (2048), ReLU, 2 highway layers, projection to 512 (bilm-tf's
`char_cnn` options). A highway layer (Srivastava et al. 2015, as bilm-tf): g = σ(x W_g + b_g),
x ← g ⊙ relu(x W_t + b_t) + (1 - g) ⊙ x; b_g starts at -2 so each layer mostly carries its input at first.

Character ids (data/examples/elmo_chars.py builds them from each token's text on the host): 0 = padding,
1..256 = UTF-8 byte + 1, then begin-of-word, end-of-word and a special-token mark. The encoder sees no context:
a token's vector depends on its characters only, so ELMo's layer 0 is context-free, and a word no training text
contained still gets a vector of its own.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from jaxssl.data.examples.elmo_chars import CHAR_VOCAB_SIZE
from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models.layers import Embed, make_param, normal_init, zeros

TOKEN_INPUTS = ('tokens', 'chars')
ACTIVATIONS = {'relu': jax.nn.relu, 'tanh': jnp.tanh}
# The paper's filters: (width, count) for widths 1..7, 2048 in all.
PAPER_FILTERS = ((1, 32), (2, 32), (3, 64), (4, 128), (5, 256), (6, 512), (7, 1024))


def filters_tuple(value) -> tuple:
  """`model.char_filters` (pairs, lists from JSON included) -> ((width, count), ...); UserError when malformed."""
  try:
    pairs = tuple((int(w), int(n)) for w, n in value)
  except (TypeError, ValueError):
    raise UserError(f'model.char_filters={value!r} must be (width, count) pairs, e.g. ((1, 32), (2, 32))') from None
  if not pairs or any(w < 1 or n < 1 for w, n in pairs):
    raise UserError(f'model.char_filters={value!r}: give at least one (width, count) pair, both >= 1')
  return pairs


def check_char_config(c) -> None:
  """UserError for char-encoder settings that cannot be built (`c` is an ElmoConfig)."""
  if c.token_input not in TOKEN_INPUTS:
    raise UserError(f'model.token_input={c.token_input!r}: use one of {", ".join(TOKEN_INPUTS)}')
  if c.token_input != 'chars':
    return
  if c.tie_embeddings:
    raise UserError('model.token_input=chars has no input token table to tie the softmax to: '
                    'set model.tie_embeddings=False (the paper\'s separate softmax)')
  widest = max(w for w, _ in c.char_filters)
  if c.max_chars < max(3, widest):
    raise UserError(f'model.max_chars={c.max_chars} must be >= 3 (begin, a character, end) and >= the widest '
                    f'filter ({widest})')
  if c.char_embed_size < 1 or c.highway_layers < 0:
    raise UserError(f'model.char_embed_size={c.char_embed_size} must be >= 1 and model.highway_layers='
                    f'{c.highway_layers} >= 0')
  if c.char_activation not in ACTIVATIONS:
    raise UserError(f'model.char_activation={c.char_activation!r}: use one of {", ".join(ACTIVATIONS)}')


def _highway_gate_bias_init(key, shape, dtype=jnp.float32):
  """Zeros for the transform half, -2 for the gate half: the layer carries its input at first (bilm-tf)."""
  del key
  return jnp.zeros(shape, dtype).at[shape[0] // 2:].set(-2.0)


class CharEncoder(nnx.Module):
  """char ids [B, T, max_chars] -> token vectors [B, T, embed_size] float32 (the module docstring says how)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    d, f = c.char_embed_size, sum(n for _, n in c.char_filters)
    self.char_embeddings = Embed(CHAR_VOCAB_SIZE, d, ('vocab', 'embed'), stddev=1.0, rngs=rngs)
    # One kernel [width, char_embed, count] and bias per width; 'mlp' (output features) is what tensor splits.
    self.conv_kernels = nnx.List([make_param(rngs, normal_init((w * d) ** -0.5), (w, d, n),
                                             ('position', 'embed', 'mlp')) for w, n in c.char_filters])
    self.conv_biases = nnx.List([make_param(rngs, zeros, (n,), ('mlp',)) for _, n in c.char_filters])
    # Each highway layer: one [F, 2F] kernel (transform | gate) and its [2F] bias.
    self.highway_kernels = nnx.List([make_param(rngs, normal_init(f ** -0.5), (f, 2 * f), ('embed', 'mlp'))
                                     for _ in range(c.highway_layers)])
    self.highway_biases = nnx.List([make_param(rngs, _highway_gate_bias_init, (2 * f,), ('mlp',))
                                    for _ in range(c.highway_layers)])
    self.projection_kernel = make_param(rngs, normal_init(f ** -0.5), (f, c.embed_size), ('mlp', 'embed'))
    self.projection_bias = make_param(rngs, zeros, (c.embed_size,), ('embed',))
    self.activation, self.dtype = c.char_activation, c.compute_dtype

  def filters(self, char_ids: jax.Array) -> jax.Array:
    """[B, T, C] -> [B, T, F]: each width's convolution, max-pooled over positions, activated, concatenated."""
    dt = self.dtype
    batch, length, chars = char_ids.shape
    x = self.char_embeddings(char_ids.reshape(batch * length, chars)).astype(dt)  # [N, C, D]
    pooled = []
    for kernel, bias in zip(self.conv_kernels, self.conv_biases):
      y = jax.lax.conv_general_dilated(x, kernel[...].astype(dt), window_strides=(1,), padding='VALID',
                                       dimension_numbers=('NWC', 'WIO', 'NWC'),
                                       preferred_element_type=jnp.float32)
      # max then activation, as bilm-tf (equal to the other order: both activations are monotonic)
      pooled.append(ACTIVATIONS[self.activation](jnp.max(y, axis=1) + bias[...]))
    return jnp.concatenate(pooled, -1).reshape(batch, length, -1)

  def __call__(self, char_ids: jax.Array) -> jax.Array:
    """[B, T, C] int -> [B, T, embed_size] float32."""
    if char_ids.ndim != 3 or char_ids.shape[-1] < 1:
      raise UserError(f'a token_input=chars ELMo needs char ids [batch, length, max_chars], got shape '
                      f'{tuple(char_ids.shape)}: build them with jaxssl.data.examples.elmo_chars')
    dt = self.dtype
    x = self.filters(char_ids)
    for kernel, bias in zip(self.highway_kernels, self.highway_biases):
      h = jnp.einsum('btf,fg->btg', x.astype(dt), kernel[...].astype(dt),
                     preferred_element_type=jnp.float32) + bias[...]
      transform, gate = jnp.split(h, 2, axis=-1)
      gate = jax.nn.sigmoid(gate)
      x = gate * jax.nn.relu(transform) + (1.0 - gate) * x
    y = jnp.einsum('btf,fe->bte', x.astype(dt), self.projection_kernel[...].astype(dt),
                   preferred_element_type=jnp.float32) + self.projection_bias[...]
    return constrain(y, ('batch', 'length', 'act_embed'))


def char_encoder_flops(c) -> float:
  """Forward multiply-adds x 2 per token of the encoder: convolutions at every valid position, highway, projection."""
  convs = sum((c.max_chars - w + 1) * w * c.char_embed_size * n for w, n in c.char_filters)
  f = sum(n for _, n in c.char_filters)
  return float(2 * (convs + c.highway_layers * f * 2 * f + f * c.embed_size))

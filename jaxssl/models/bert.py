"""BERT (Devlin et al. 2018) for masked-LM + next-sentence pretraining; same math as HF BertForPreTraining.

Post-LayerNorm encoder layers, learned positions, exact GELU, LayerNorm eps 1e-12 (model.layer_norm_eps; 1e-5
for imported RoBERTa / XLM-R), MLM decoder tied to the word embedding. The layer stack is created with
`nnx.vmap` (params get a leading 'layers' axis) and run with `nnx.scan`, so compile time is flat in depth. The
MLM head is applied only at the `mlm_positions`.

With `attention_type='block_sparse'` (Big Bird, models/attention.py) sequences of at least `sparse_min_length`
tokens use block-sparse attention, shorter ones full attention; the parameters are the same either way, so a
checkpoint moves freely between the two.

With `relative_attention_buckets` > 0 (MPNet, imported by convert/hf_mpnet.py) every layer's attention scores also
get a learned per-head bias for the bucket of each key's distance from the query (T5's bidirectional buckets):
one table shared by all layers, added to the absolute position embeddings, not in place of them.
With `position_buckets` > 0 (DeBERTa-v3, convert/hf_deberta.py) attention is disentangled: content-to-position
and position-to-content scores from one shared table of relative embeddings (models/relative_positions.py);
DeBERTa-v3 also has no absolute position embeddings (`absolute_positions=False`) and no token types
(`type_vocab_size=0`).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxssl.errors import UserError
from jaxssl.mesh import constrain
from jaxssl.models import attention as sparse
from jaxssl.models import relative_positions, vocab
from jaxssl.models.layers import (ACTIVATIONS, Dense, Embed, LayerNorm, Mlp, MultiHeadAttention, check_compute_settings,
                                  dropout, make_param, maybe_remat, normal_init, stack_layers, unroll_layers, zeros)
from jaxssl.models.parts import layer_keys, run_stack

ACT = ('batch', 'length', 'act_embed')  # logical names of activations at layer boundaries


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The `model` config section, validated; frozen (hashable) so modules can hold it as static data."""
  vocab_size: int
  num_layers: int
  hidden_size: int
  num_heads: int
  intermediate_size: int
  max_position: int = 512
  type_vocab_size: int = 2
  embedding_size: int = 0  # factorised embeddings (ELECTRA): this width, projected to hidden_size; 0 = hidden_size
  relative_attention_buckets: int = 0  # MPNet's relative position bias: buckets of key distance (32); 0 = none
  position_buckets: int = 0       # DeBERTa's disentangled attention: log buckets of distance (256); 0 = none
  max_relative_positions: int = 512  # DeBERTa: distances bucketed up to this
  absolute_positions: bool = True  # learned position embeddings (DeBERTa-v3 has none)
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12   # BERT's; RoBERTa / XLM-R checkpoints use 1e-5
  hidden_act: str = 'gelu'        # layers.ACTIVATIONS: 'gelu' (exact, BERT's), 'gelu_new' (ALBERT's), 'relu' (ERNIE 1)
  dtype: str = 'float32'
  remat: str = 'none'
  layer_loop: str = 'auto'  # layers.LAYER_LOOPS
  scan_layers: bool = True
  # Pretraining reads the last layer only at [CLS] and the masked positions: compute just those rows there.
  final_layer_subset: bool = True
  attention: str = 'auto'
  attention_type: str = 'full'    # 'full' | 'block_sparse' (Big Bird ITC)
  block_size: int = 64            # block_sparse: tokens per block
  num_random_blocks: int = 3      # block_sparse: random key blocks per query block
  sparse_min_length: int = 1024   # block_sparse: shorter sequences use full attention
  # The tokenizer's ids when the embedding has more rows (a padded public vocabulary, models/vocab.py): MLM logits
  # of the rows past it are -inf. 0 = every row is a token. Set by load_export, never by a config file.
  num_token_ids: int = 0

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int) -> 'BertConfig':
    """Reads the fields this model uses from a ConfigDict/dict (extra keys such as `name` are ignored)."""
    get = model_cfg.get if hasattr(model_cfg, 'get') else lambda k, d=None: getattr(model_cfg, k, d)
    kw = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.name != 'vocab_size'}
    kw = {k: v for k, v in kw.items() if v is not None}
    c = cls(vocab_size=int(vocab_size), **kw)
    vocab.check_rows(c.num_token_ids, c.vocab_size, 'model.num_token_ids')
    if c.embedding_size < 0:
      raise UserError(f'model.embedding_size={c.embedding_size} must be >= 0 (0 = hidden_size)')
    if c.hidden_act not in ACTIVATIONS:
      raise UserError(f'model.hidden_act={c.hidden_act!r}: use one of {sorted(ACTIVATIONS)}')
    buckets = c.relative_attention_buckets
    if buckets and (buckets < 4 or buckets % 2):
      raise UserError(f'model.relative_attention_buckets={buckets} must be 0 (none) or an even number >= 4 '
                      '(MPNet: 32)')
    if (buckets or c.position_buckets) and c.attention_type != 'full':
      raise UserError('model.relative_attention_buckets and model.position_buckets need model.attention_type='
                      '\'full\': block-sparse attention takes no relative positions')
    if c.position_buckets and (buckets or c.position_buckets < 2 or c.max_relative_positions <= c.position_buckets):
      raise UserError(f'model.position_buckets={c.position_buckets} needs model.relative_attention_buckets=0 and '
                      f'2 <= position_buckets < model.max_relative_positions={c.max_relative_positions} (DeBERTa-v3: '
                      '256 and 512)')
    if c.hidden_size % c.num_heads:
      raise UserError(f'model.hidden_size={c.hidden_size} is not divisible by model.num_heads={c.num_heads}; '
                      f'set --config.model.num_heads to a divisor (e.g. {max(1, c.hidden_size // 64)})')
    check_compute_settings(c, 'bert')
    if c.attention_type not in ('full', 'block_sparse'):
      raise UserError(f"model.attention_type={c.attention_type!r}: use 'full' or 'block_sparse'")
    if c.attention_type == 'block_sparse':
      if c.block_size < 1 or c.num_random_blocks < 0:
        raise UserError(f'model.block_size={c.block_size}, model.num_random_blocks={c.num_random_blocks}: use a '
                        'block_size >= 1 and num_random_blocks >= 0')
      # Every length that takes the sparse path must have room for the layout (only its block multiple is
      # left to check when the length is known).
      need = sparse.min_blocks(c.num_random_blocks) * c.block_size
      if c.sparse_min_length < need:
        raise UserError(f'model.sparse_min_length={c.sparse_min_length} is below the {need} tokens that '
                        f'block-sparse attention needs with block_size={c.block_size} and num_random_blocks='
                        f'{c.num_random_blocks}: set --config.model.sparse_min_length={need} or more')
    return c

  def sparse_at(self, seq_len: int) -> bool:
    """Whether sequences of `seq_len` tokens take the block-sparse path."""
    return self.attention_type == 'block_sparse' and seq_len >= self.sparse_min_length

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


class BertLayer(nnx.Module):
  """x = LN(x + Drop(MHA(x))); x = LN(x + Drop(MLP(x)))  (post-LayerNorm, as in BERT)."""

  def __init__(self, c: BertConfig, *, rngs: nnx.Rngs):
    dt, std = c.compute_dtype, c.initializer_range
    self.attention = MultiHeadAttention(c.hidden_size, c.num_heads, stddev=std,
                                        attention_dropout_rate=c.attention_dropout_rate,
                                        implementation=c.attention, dtype=dt, rngs=rngs)
    self.attention_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
    self.mlp = Mlp(c.hidden_size, c.intermediate_size, stddev=std, dtype=dt, rngs=rngs, activation=c.hidden_act)
    self.mlp_norm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
    self.dropout_rate = c.dropout_rate
    self.attention_dropout_rate = c.attention_dropout_rate

  def __call__(self, x, mask, dropout_rng=None, random_blocks=None, output_positions=None, bias=None):
    """`random_blocks` (this layer's attention.random_block_table) switches attention to block-sparse.
    `output_positions` [B, P]: compute the output only at these positions ([B, P, H]; keys are all of x).
    `bias` [1, N, L, L]: added to the attention scores (relative_position_bias)."""
    k = [None] * 3 if dropout_rng is None else [jax.random.fold_in(dropout_rng, i) for i in range(3)]
    attend = None if random_blocks is None else functools.partial(
        sparse.block_sparse_attention, random_blocks=random_blocks, dropout_rate=self.attention_dropout_rate)
    a = self.attention(x, mask, dropout_rng=k[0], attend=attend, query_positions=output_positions, bias=bias)
    if output_positions is not None:
      x = jnp.take_along_axis(x, output_positions[:, :, None], axis=1)
    # Residual sums in float32: the LayerNorm right after wants them unrounded.
    x = self.attention_norm(x.astype(jnp.float32) + dropout(a, self.dropout_rate, k[1]).astype(jnp.float32))
    m = self.mlp(x)
    x = self.mlp_norm(x.astype(jnp.float32) + dropout(m, self.dropout_rate, k[2]).astype(jnp.float32))
    return constrain(x, ACT)


class BertEncoder(nnx.Module):
  """The L layers: stacked + nnx.scan (cfg.scan_layers) or a Python list (for comparison)."""

  def __init__(self, c: BertConfig, *, rngs: nnx.Rngs):
    self.config = c
    self.scan_layers = c.scan_layers
    self.unroll = unroll_layers(c.layer_loop)
    self.num_layers = c.num_layers
    self.remat = c.remat
    self.layers = stack_layers(lambda r: BertLayer(c, rngs=r), c.num_layers, c.scan_layers, rngs)

  def random_blocks(self, seq_len: int):
    """int32 [num_layers, heads, blocks - 2, r] Big Bird random blocks (layer i seeded with i, as in HF), or
    None when `seq_len` uses full attention. A constant of the compiled step, drawn when it is traced."""
    c = self.config
    if not c.sparse_at(seq_len):
      return None
    nb = sparse.check_layout(seq_len, c.block_size, c.num_random_blocks)
    return jnp.asarray(np.stack([sparse.random_block_table(nb, c.num_random_blocks, seed=i, num_heads=c.num_heads)
                                 for i in range(c.num_layers)]))

  def __call__(self, x, mask, dropout_rng=None, *, return_hidden_states=False, output_positions=None, bias=None):
    """-> x, or (x, per-layer outputs [num_layers, B, L, H]) with `return_hidden_states`. `bias` (the relative
    position bias, or None) goes to every layer's attention scores.

    `output_positions` [B, P] (full attention only): the result is the last layer's output at these positions
    only, [B, P, H], and the last layer computes nothing else but the keys and values of every position.
    """
    tables = self.random_blocks(x.shape[1])
    if output_positions is not None:
      if tables is not None or return_hidden_states:
        raise ValueError('output_positions needs full attention and no return_hidden_states')
      return self._last_layer_at(x, mask, dropout_rng, output_positions, bias)
    # Layer i gets fold_in(dropout_rng, i) and tables[i] on every path, so scanned == unscanned. No layer boundary:
    # post-norm, each layer's output gradient comes out of a LayerNorm already (with it BERT-base ran ~1% slower).
    return run_stack(self.layers, x, lambda lyr, h, key, *table: lyr(h, mask, key, *table, bias=bias),
                     num_layers=self.num_layers, scan=self.scan_layers, remat=self.remat, unroll=self.unroll,
                     dropout_rng=dropout_rng, per_layer=() if tables is None else (tables,),
                     return_outputs=return_hidden_states, boundary=False)

  def _last_layer_at(self, x, mask, dropout_rng, output_positions, bias):
    """Layers 0..L-2 over every position, then layer L-1 at `output_positions` (same keys as __call__)."""
    n = self.num_layers
    keys = layer_keys(dropout_rng, n)
    key_of = lambda i: None if keys is None else keys[i]  # noqa: E731
    run = lambda lyr, h, k, pos=None: lyr(h, mask, k, None, pos, bias)  # noqa: E731
    if not self.scan_layers:
      for i in range(n - 1):
        x = maybe_remat(run, self.remat, in_scan=False)(self.layers[i], x, key_of(i))
      last = self.layers[-1]
    else:
      # The scan runs layer i by slicing the stacked params at i (what nnx.scan does for its xs), so the first
      # L - 1 layers need no copy of a params[:-1] slice; the gradient lands in place in the stacked buffer.
      graphdef, params = nnx.split(self.layers)
      layer_at = lambda i: nnx.merge(graphdef, jax.tree.map(  # noqa: E731
          lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), params))
      body = maybe_remat(lambda h, i, k: run(layer_at(i), h, k), self.remat, in_scan=True)
      x, _ = jax.lax.scan(lambda h, xs: (body(h, *xs), None), x,
                          (jnp.arange(n - 1), None if keys is None else keys[:-1]), unroll=self.unroll)
      # An index XLA cannot see through: the gradient of a constant slice is a pad, added to the whole stacked
      # gradient (a full pass over every layer's params); that of a dynamic slice is updated in place.
      last = layer_at(jax.lax.optimization_barrier(jnp.int32(n - 1)))
    return maybe_remat(run, self.remat, in_scan=False)(last, x, key_of(n - 1), output_positions)


class BertForPretraining(nnx.Module):
  """BERT body + MLM head (tied decoder, only at `mlm_positions`) + NSP head (pooler -> 2 classes).

  Created inside `with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES)` its params are born sharded; outside a
  mesh they are plain arrays that still carry their logical names (for `nnx.get_named_sharding` later).
  """

  def __init__(self, cfg, vocab_size: int, *, rngs: nnx.Rngs):
    c = cfg if isinstance(cfg, BertConfig) else BertConfig.from_config(cfg, vocab_size)
    self.config = c
    dt, std, h = c.compute_dtype, c.initializer_range, c.hidden_size
    e = c.embedding_size or h
    emb_axis = 'embed' if e == h else 'embed_factor'
    # Eager sharding needs a mesh; without one, keep the annotations but place nothing.
    with nnx.use_eager_sharding(not jax.sharding.get_abstract_mesh().empty):
      self.word_embeddings = Embed(c.vocab_size, e, ('vocab', emb_axis), stddev=std, rngs=rngs)
      if c.absolute_positions:
        self.position_embeddings = Embed(c.max_position, e, ('position', emb_axis), stddev=std, rngs=rngs)
      if c.type_vocab_size:
        self.token_type_embeddings = Embed(c.type_vocab_size, e, ('token_type', emb_axis), stddev=std, rngs=rngs)
      self.embedding_norm = LayerNorm(e, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
      if c.relative_attention_buckets:  # MPNet's, shared by every layer
        self.relative_attention_bias = make_param(rngs, normal_init(std), (c.relative_attention_buckets, c.num_heads),
                                                  ('relative_buckets', 'heads'))
      if c.position_buckets:  # DeBERTa's relative embeddings, shared by every layer, and their LayerNorm
        self.relative_embeddings = make_param(rngs, normal_init(std), (2 * c.position_buckets, h),
                                              ('relative_buckets', 'embed'))
        self.relative_norm = LayerNorm(h, eps=c.layer_norm_eps, dtype=jnp.float32, rngs=rngs)
      if e != h:  # ELECTRA's embeddings_project
        self.embedding_projection = Dense(e, h, ('embed_factor', 'embed'), stddev=std, dtype=dt, rngs=rngs)
      self.encoder = BertEncoder(c, rngs=rngs)
      # H -> H denses: ('embed', 'mlp') because ('embed', 'embed') would name the fsdp mesh axis twice.
      self.pooler = Dense(h, h, ('embed', 'mlp'), stddev=std, dtype=dt, rngs=rngs)
      self.nsp_classifier = Dense(h, 2, ('embed', 'classes'), stddev=std, dtype=jnp.float32, rngs=rngs)
      # The MLM head ends in the embedding's width (the tied decoder's): H -> E for factorised embeddings.
      self.mlm_transform = Dense(h, e, ('embed', 'mlp' if e == h else 'embed_factor'), stddev=std, dtype=dt,
                                 rngs=rngs)
      self.mlm_norm = LayerNorm(e, eps=c.layer_norm_eps, dtype=dt, rngs=rngs)
      self.mlm_bias = make_param(rngs, zeros, (c.vocab_size,), ('vocab',))

  def encode(self, input_ids, token_type_ids, attention_mask, *, dropout_rng=None, return_hidden_states=False,
             output_positions=None, position_ids=None, pool_positions=None):
    """[B, L] ints -> (sequence [B, L, H], pooled [B, H]) in the compute dtype. dropout_rng None = eval.

    With `return_hidden_states` (like HF `output_hidden_states=True`) also returns a tuple of num_layers + 1
    [B, L, H] arrays: the embedding output (after LayerNorm, dropout and a factorised embedding's projection),
    then each layer's output.
    With `output_positions` [B, P] (first column 0, the [CLS] the pooler reads) the sequence is [B, P, H], the
    rows at those positions, and the last layer computes only them (BertEncoder).
    Packed rows (train/packing.py): `attention_mask` holds each example's segment id, `position_ids` [B, L] restart
    at each example, and `pool_positions` [E] (indices into the flattened [B * L]) are the [CLS] rows the pooler
    reads: pooled is then [E, H], one row per example.
    """
    c = self.config
    seq_len = input_ids.shape[1]
    if seq_len > c.max_position:
      raise UserError(f'sequence length {seq_len} exceeds model.max_position={c.max_position}; '
                      'lower data.seq_len or raise model.max_position')
    positions = jnp.arange(seq_len)[None] if position_ids is None else position_ids
    x = self.word_embeddings(input_ids)
    if c.absolute_positions:
      x = x + self.position_embeddings(positions)
    if c.type_vocab_size:
      x = x + self.token_type_embeddings(token_type_ids)
    x = self.embedding_norm(x)
    emb_key, enc_key = (None, None) if dropout_rng is None else (
        jax.random.fold_in(dropout_rng, 0), jax.random.fold_in(dropout_rng, 1))
    x = dropout(x, c.dropout_rate, emb_key)
    if c.embedding_size and c.embedding_size != c.hidden_size:
      x = self.embedding_projection(x)
    x = constrain(x, ACT)
    bias = None
    if c.relative_attention_buckets:
      bias = relative_positions.bucket_bias(self.relative_attention_bias[...], seq_len)
    if c.position_buckets:
      index = relative_positions.relative_index(seq_len, c.position_buckets, c.max_relative_positions)
      table = self.relative_norm(self.relative_embeddings[...])
      bias = relative_positions.DisentangledBias(table, index, c.dropout_rate)
    if return_hidden_states:
      emb = x
      x, layer_outputs = self.encoder(x, attention_mask, enc_key, return_hidden_states=True, bias=bias)
      hidden_states = (emb, *(layer_outputs[i] for i in range(c.num_layers)))
    else:
      x = self.encoder(x, attention_mask, enc_key, output_positions=output_positions, bias=bias)
    cls = x[:, 0] if pool_positions is None else x.reshape(-1, x.shape[-1])[pool_positions]
    pooled = jnp.tanh(self.pooler(cls))
    return (x, pooled, hidden_states) if return_hidden_states else (x, pooled)

  def __call__(self, input_ids, token_type_ids, attention_mask, mlm_positions, *, dropout_rng=None):
    """-> (mlm_logits [B, P, V] float32 at `mlm_positions` [B, P], nsp_logits [B, 2] float32)."""
    c = self.config
    mlm_positions = mlm_positions.astype(jnp.int32)
    if c.final_layer_subset and not c.sparse_at(input_ids.shape[1]) and not c.position_buckets:
      # The heads read [CLS] and the P masked positions: the last layer computes those 1 + P rows only (about
      # 10/12 of its matmuls skipped at the other positions; same loss).
      positions = jnp.concatenate([jnp.zeros_like(mlm_positions[:, :1]), mlm_positions], axis=1)
      seq, pooled = self.encode(input_ids, token_type_ids, attention_mask, dropout_rng=dropout_rng,
                                output_positions=positions)
      h = seq[:, 1:]
    else:
      seq, pooled = self.encode(input_ids, token_type_ids, attention_mask, dropout_rng=dropout_rng)
      # Gather first: the H x V projection then costs P (~0.15 L) positions instead of L.
      h = jnp.take_along_axis(seq, mlm_positions[:, :, None], axis=1)
    nsp_logits = self.nsp_classifier(pooled.astype(jnp.float32))
    h = constrain(h, ('batch', 'predictions', 'act_embed'))
    h = self.mlm_norm(ACTIVATIONS[c.hidden_act](self.mlm_transform(h)))  # HF's prediction head: hidden_act too
    mlm_logits = self.word_embeddings.attend(h, self.config.compute_dtype) + self.mlm_bias[...]
    return vocab.mask_padding_logits(mlm_logits, c.num_token_ids), nsp_logits  # padding rows never predicted


def flops_per_token(model_cfg, vocab_size: int, seq_len: int, max_predictions: int) -> float:
  """Training FLOPs per input token (forward + backward = 3x forward; 2 FLOPs per multiply-add), matmuls only.

  Per layer: 6 x matmul params (4 H^2 for q/k/v/out + 2 H I for the MLP) plus attention scores and
  weighted sum, 12 x H x keys (QK^T and AV, 2 H keys each forward): keys = seq_len for full attention, and for
  block-sparse the mean number of keys a query scores (the 2 global blocks all T, the others (5 + r) blocks).
  With `final_layer_subset` (full attention) the last layer projects keys and values at every position but
  queries, output, MLP and attention only at the 1 + max_predictions rows the heads read. The MLM head (H x E
  transform + E x V tied decoder; E = embedding_size or H) runs at only `max_predictions` of `seq_len` positions, a
  factorised embedding's E x H projection at every one; the pooler + NSP
  classifier once per sequence. Embedding lookups, norms, softmax and biases are not counted (as in
  the usual MFU formula).
  """
  c = BertConfig.from_config(model_cfg, vocab_size)
  h, i, n_layers = c.hidden_size, c.intermediate_size, c.num_layers
  e = c.embedding_size or h
  projection = 6 * e * h if e != h else 0  # a factorised embedding's projection to hidden_size
  keys = seq_len
  if c.sparse_at(seq_len):
    nb = seq_len // c.block_size
    keys = (2 * seq_len + (nb - 2) * sparse.min_blocks(c.num_random_blocks) * c.block_size) / nb
  layer = 6 * (4 * h * h + 2 * h * i) + 12 * h * keys
  if c.position_buckets:  # DeBERTa's c2p and p2c scores (no final layer subset then)
    layer += relative_positions.flops_per_token(h, seq_len)
  layers = n_layers * layer
  if c.final_layer_subset and not c.sparse_at(seq_len) and not c.position_buckets:
    rows = min(1.0, (1 + max_predictions) / seq_len)
    layers += 6 * 2 * h * h + rows * (6 * (2 * h * h + 2 * h * i) + 12 * h * keys) - layer
  mlm = 6 * (h * e + e * c.vocab_size) * max_predictions / seq_len
  nsp = 6 * (h * h + h * 2) / seq_len
  return float(projection + layers + mlm + nsp)

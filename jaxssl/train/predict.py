"""Forward passes of a task model over every row of a featurized set (dev metrics, the evaluate job): sharded
batches on the mesh, shortest rows first, each batch cut to its length bucket (train/length_buckets.py)."""
import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from jaxssl import mesh as mesh_lib
from jaxssl import tasks
from jaxssl.train import length_buckets


def local_rows(global_rows: np.ndarray) -> np.ndarray:
  """This process's contiguous share of a global batch's rows."""
  per_process = len(global_rows) // jax.process_count()
  return global_rows[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]


def make_predictor(setup, mesh, features: dict, batch_size: int, kind: tasks.TaskKind, buckets: tuple = (),
                   compile_worth: float = 0.0):
  """`predict(params, features) -> outputs` over all rows (host numpy, in the rows' order), in sharded batches on
  the mesh. With length `buckets` (length_buckets.eval_lengths) the rows go shortest first, each batch cut to its
  bucket; per-token outputs come back padded to the full length. With `compile_worth` (tokens a compile is worth,
  length_buckets.compile_worth) the batches share as few of their buckets as pays: a dev set of five batches of
  tweets needed five lengths, each a program to compile, and now runs at one or two."""
  input_keys = [*kind.input_keys, *kind.model_inputs]

  def forward(params, batch):
    model = nnx.merge(setup.graphdef, params)
    return model(*(batch[k] for k in kind.input_keys), **{k: batch[k] for k in kind.model_inputs})

  shardings = {k: mesh_lib.batch_sharding(mesh, features[k].ndim) for k in input_keys}
  forward = jax.jit(forward, in_shardings=(setup.param_shardings, shardings))
  divisor = mesh_lib.batch_divisor(mesh)
  batch_size = max(batch_size - batch_size % divisor, divisor)

  def predict(params, rows_of: dict):
    n = len(rows_of[kind.input_keys[0]])
    lengths = length_buckets.real_lengths(rows_of) if buckets else None
    seq_len = np.shape(rows_of['attention_mask'])[1] if lengths is not None else 0
    order = np.arange(n) if lengths is None else np.argsort(lengths, kind='stable')
    batches = [order[np.arange(start, start + batch_size) % n] for start in range(0, n, batch_size)]  # the last
    # batch wraps; its extra rows are dropped
    needed = [length_buckets.batch_length(lengths, rows, buckets) for rows in batches]
    kept = length_buckets.fewest_cost_lengths(needed, batch_size, compile_worth) if lengths is not None else ()
    outputs = []
    for rows in batches:
      length = length_buckets.batch_length(lengths, rows, kept)
      local = length_buckets.cut({k: rows_of[k][local_rows(rows)] for k in input_keys}, length, seq_len)
      with jax.set_mesh(mesh):
        out = forward(params, mesh_lib.global_batch(local, mesh))
      out = jax.tree.map(np.asarray, multihost_utils.process_allgather(out, tiled=True))
      if kind.token_outputs:
        out = length_buckets.pad_outputs(out, length, seq_len, length_buckets.PAD_LOGIT)
      outputs.append(out)
    in_order = np.argsort(order)
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:n][in_order], *outputs)

  return predict

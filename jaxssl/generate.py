"""Generate job: continue prompts with an exported GPT (KV cache, jitted, on the mesh).

  python -m jaxssl.generate --params PARAMS --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--greedy]
                            [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop TOKEN ...] [--json]
                            [--dtype float32|bfloat16|auto]

Prints each prompt followed by its continuation (with --json: one JSON line per prompt holding prompt, prompt_ids,
generated_ids and text, the text that follows the prompt, its leading space included). Generation stops at
--max-new-tokens, at the end-of-document token the model was trained with (GPT-2's <|endoftext|>, Llama's </s>), or
at any --stop token (a vocabulary entry, e.g. Llama 3's <|eot_id|>).
A tokenizer that starts every text with a BOS token (Llama) gets it before each prompt; prompt_ids include it.
PARAMS may be local or in a bucket (gs://B/export). The model computes in the dtype its export records (a converted
checkpoint: float32) unless --dtype says otherwise (the weights stay as stored).
"""
import argparse
import concurrent.futures
import json
import sys

from jaxssl import paths
from jaxssl import runtime
from jaxssl.errors import UserError, exit_on_user_error


def generate(params: str, prompts: list[str], *, max_new_tokens: int = 50, greedy: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_tokens: tuple[str, ...] = (), dtype: str | None = None) -> list[dict]:
  """One dict per prompt: prompt, prompt_ids, generated_ids (up to and including a stop token), text (what follows
  the prompt: `continuation`). `dtype`: the compute dtype (models/precision.py's settings) instead of the export's.

  Why bfloat16: on a CPU with bfloat16 instructions XLA:CPU runs a batch's bfloat16 products 3-3.5x faster than
  float32 ones (a decoding step's [8, 576] x [576, 1536]), so batches decode ~1.5x faster; one prompt at a time it
  gains nothing (XLA computes a one-row bfloat16 product in float32). Greedy text can part from float32's where two
  tokens are near-tied (BENCHMARKS.md §44)."""
  # A job's jax modules load here, after runtime.setup (main) has configured the compile cache and processes.
  import jax
  import numpy as np
  from jaxssl import program_cache
  from jaxssl.models import generate_program
  from jaxssl.train import export_config  # not checkpoint: a warm start never imports orbax (0.2-0.3 s)
  if not prompts or any(not p.strip() for p in prompts):
    raise UserError('give at least one non-empty --prompt')
  saved, config, model_cfg, tokenizer = export_config.describe_export(params, dtype)
  bos = [] if getattr(tokenizer, 'bos_id', None) is None else [tokenizer.bos_id]
  encoded = [bos + ids for ids in tokenizer.encode(prompts)]
  stop = [tokenizer.sep_id]  # the end-of-document token of the packed pretraining stream
  for token in stop_tokens:
    # A special token (<|eot_id|>) is looked up by name: encoding its text gives ordinary pieces.
    ids = [tokenizer.token_id(token)] if hasattr(tokenizer, 'token_id') else tokenizer.encode_one(token)
    if len(ids) != 1 or ids[0] is None:
      raise UserError(f'--stop {token!r} is not one token of this tokenizer: pass a vocabulary entry '
                      '(e.g. <|eot_id|>)')
    stop.append(int(ids[0]))
  lengths = np.array([len(ids) for ids in encoded], np.int32)
  ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, piece in enumerate(encoded):
    ids[row, :len(piece)] = piece
  saved_program = program_cache.path_for('generate', export=saved, model=model_cfg.to_dict(), prompts=ids.shape,
                                         max_new_tokens=max_new_tokens, greedy=greedy, stops=len(stop),
                                         out_major=generate_program.out_major_min_bytes())
  found = saved_program and generate_program.read(saved_program)
  if not found:  # a saved program was compiled for an export that generates; else ask its family (imports flax)
    from jaxssl import families  # reason: flax's import (0.4 s) only on a start that builds the model
    if not families.family_for(config.model).generates:
      raise UserError(f'{params} holds a {config.model.name} model: generation needs a causal LM export such as '
                      'GPT (python -m jaxssl.export of a configs/gpt.py run)')
  generate_program.check_settings(model_cfg.max_position, ids.shape[1], max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, greedy=greedy, names=generate_program.FLAGS)
  small = generate_program.arguments(ids, lengths, jax.random.key(seed), temperature, top_k, top_p, stop,
                                     tokenizer.pad_id)
  # A program an earlier run saved: the weights are restored onto its layout on another thread while it compiles
  # (from XLA's cache), and neither flax nor the model is needed (2 s of every start when traced anew).
  program = None
  if found:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      restoring = pool.submit(_program_weights, params, found[0]['weights'], found[0]['inputs'])
      program = generate_program.load(*found)
      weights = restoring.result()
  if program is not None:
    out, num = program(weights, *small)
  else:
    out, num = _compile_and_generate(params, saved, model_cfg, ids, small, max_new_tokens, greedy, saved_program)
  out, num = np.asarray(out), np.asarray(num)
  results = []
  for prompt, prompt_ids, row, n in zip(prompts, encoded, out, num):
    generated = [int(t) for t in row[:n]]
    text = continuation(tokenizer, prompt_ids, [t for t in generated if t not in stop])  # a stop token is no text
    results.append({'prompt': prompt, 'prompt_ids': [int(t) for t in prompt_ids], 'generated_ids': generated,
                    'text': text})
  return results


def _program_weights(params: str, weights: list, inputs: list, keep: bool = True, target: dict | None = None) -> list:
  """The generate program's weight arguments (`inputs`: generation.program_inputs) for the export at `params`
  (`weights`: its weights_layout; `target`: the jax.ShapeDtypeStruct to restore it onto, by default
  generate_program.weights_target's, built only when it restores): views of the file weights_cache keeps of it (no
  copy), else the export restored through orbax. With `keep`, the export is restored leaf by leaf into that file
  (for the next start too) and the program gets views of it: the job holds one leaf at a time while restoring,
  where orbax's whole-tree restore peaked at about twice the weights, then generates on clean file pages the kernel
  can reclaim (BENCHMARKS.md §29)."""
  import jax
  from jaxssl import weights_cache
  from jaxssl.models import generate_program
  layout = generate_program.kept_layout(weights, inputs)
  kept = keep and weights_cache.path_for(params, layout)
  views = kept and weights_cache.load(kept, layout)  # e.g. written by a start with another prompt shape
  if not views:
    from jaxssl.train import checkpoint as ckpt_lib  # reason: orbax's import only where it restores
    target = target or generate_program.weights_target(weights)
    if kept:  # restored leaf by leaf straight into the file: one leaf in memory at a time
      weights_cache.save(kept, layout, generate_program.kept_leaves(ckpt_lib.export_leaves(params, target), inputs))
      runtime.give_back_freed_host_memory()  # the last leaves' pages: the views replace them
      views = weights_cache.load(kept, layout)
    if not views:  # nothing kept (a bucket, the cache off, a failed write): the restored arrays' layers sliced
      restored = generate_program.to_kept(ckpt_lib.load_export_params(params, target), inputs)
      return generate_program.program_leaves(restored, inputs)
  return jax.device_put(generate_program.program_leaves(views, inputs))


def _compile_and_generate(params, saved, model_cfg, ids, small, max_new_tokens, greedy, save_to):
  """The first start for these settings: the weights are restored (and kept for the next start) on another thread
  while this one compiles the program from the model's shapes (and saves it to `save_to`)."""
  from flax import nnx
  from jaxssl.models import generate_program, generation
  from jaxssl.train import checkpoint as ckpt_lib
  setup = ckpt_lib.setup_export_model(saved, model_cfg)
  abstract = nnx.merge(setup.graphdef, setup.abstract_params)
  inputs = generation.program_inputs(generation.layers_apart(abstract))
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    restoring = pool.submit(_program_weights, params, generate_program.weights_layout(setup.abstract_params), inputs,
                            bool(save_to), setup.abstract_params)
    program = generation.compile_generate(abstract, *ids.shape, max_new_tokens, greedy=greedy,
                                          num_stop_ids=len(small[-2]), save_to=save_to)
    leaves = restoring.result()
  return program.compiled(leaves, *small)


def continuation(tokenizer, prompt_ids, new_ids) -> str:
  """The text that `new_ids` add after the prompt: what decoding prompt and continuation together adds to the
  prompt's own decoding, so that prompt + text reads as the model wrote it. A byte-level BPE's next piece carries its
  space (' Paris'); sentencepiece drops a decoded text's leading space, and a word may go on ('Hel' + 'lo'). Where
  the decoded prompt is not a prefix of the whole (a normalizing tokenizer), the continuation's own decoding after
  a space."""
  head = tokenizer.decode(prompt_ids)
  whole = tokenizer.decode([*prompt_ids, *new_ids])
  if whole.startswith(head):
    return whole[len(head):]
  text = tokenizer.decode(new_ids)
  return text if not text or text[0].isspace() else ' ' + text


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.generate', description=__doc__.split('\n')[0])
  parser.add_argument('--params', required=True, help='an export of a GPT run (python -m jaxssl.export)')
  parser.add_argument('--prompt', action='append', required=True, help='repeat for a batch of prompts')
  parser.add_argument('--max-new-tokens', type=int, default=50)
  parser.add_argument('--greedy', action='store_true', help='argmax decoding (default: sampling)')
  parser.add_argument('--temperature', type=float, default=1.0)
  parser.add_argument('--top-k', type=int, default=0, help='sample from the k most likely tokens (0 = all)')
  parser.add_argument('--top-p', type=float, default=1.0, help='nucleus sampling mass (1.0 = all)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--stop', action='append', default=[], help='a stop token (vocabulary entry); repeatable')
  parser.add_argument('--json', action='store_true', help='one JSON line per prompt')
  parser.add_argument('--dtype', choices=('float32', 'bfloat16', 'auto'),
                      help="compute dtype (default: the export's; 'auto': this backend's, as pretraining picks it)")
  runtime.add_distributed_args(parser)
  args = parser.parse_args(argv)
  args.params = paths.absolute(args.params)
  runtime.setup(args)
  import jax  # noqa: PLC0415 (after runtime.setup)
  results = generate(args.params, args.prompt, max_new_tokens=args.max_new_tokens, greedy=args.greedy,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                     stop_tokens=tuple(args.stop), dtype=args.dtype)
  if jax.process_index() == 0:
    for r in results:
      print(json.dumps(r) if args.json else r['prompt'] + r['text'], flush=True)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))
  runtime.exit_without_teardown()

"""Reference: ../shared/bench/hf_torch_gpt2.py's train step with the model's forward under
torch.autocast('cpu', bfloat16), as hf_torch_bert.py --bf16 runs BERT (params, grads and AdamW stay float32).

On a CPU with bfloat16 instructions (AVX512-BF16, AMX) this is PyTorch's fastest setting, which issue 21 asks
jaxssl to be compared against. The shared script has no such flag, so this wraps it unchanged:

  VENV/bin/python benchmarks/hf_torch_gpt2_bf16.py --config small --steps 4

prints the shared script's JSON line with dtype 'bf16-autocast' added.
"""
import contextlib
import functools
import io
import json
import os
import runpy
import sys

import torch
from transformers import GPT2LMHeadModel

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'bench', 'hf_torch_gpt2.py')


def main():
  forward = GPT2LMHeadModel.forward

  @functools.wraps(forward)
  def autocast_forward(self, *args, **kwargs):
    # A region per forward, as torch.autocast is meant to be used: leaving it clears autocast's cache of bfloat16
    # weight copies, which would otherwise outlive the optimizer step that changes the weights.
    with torch.autocast('cpu', dtype=torch.bfloat16):
      return forward(self, *args, **kwargs)

  GPT2LMHeadModel.forward = autocast_forward
  printed = io.StringIO()
  sys.argv = [SCRIPT, *sys.argv[1:]]
  with contextlib.redirect_stdout(printed):
    runpy.run_path(SCRIPT, run_name='__main__')
  lines = printed.getvalue().strip().splitlines()
  row = json.loads(lines[-1])
  row.update(peer='hf_torch_gpt2_bf16', dtype='bf16-autocast')
  print('\n'.join(lines[:-1] + [json.dumps(row)]), flush=True)


if __name__ == '__main__':
  main()

"""Convert job: public HuggingFace / llama.cpp checkpoints to and from jaxssl exports.

  python -m jaxssl.convert from-hf --src HF_DIR_OR_GGUF --out PARAMS [--overwrite] [--seed N]
  python -m jaxssl.convert to-hf   --src PARAMS --out HF_DIR [--overwrite]

from-hf reads a HuggingFace directory: BERT (BertForPreTraining / BertModel; also RoBERTa / XLM-R /
CamemBERT: XLMRobertaModel / XLMRobertaForMaskedLM / CamembertForMaskedLM ...; DistilBERT; ELECTRA:
ElectraForPreTraining / ElectraForMaskedLM; MPNet: MPNetModel / MPNetForMaskedLM; ALBERT; ERNIE), GPT-2
(GPT2LMHeadModel) or the Llama family (LlamaForCausalLM; also Mistral, Qwen2 and Qwen3 layouts), picked by
config.json's model_type (as transformers 4 or 5 wrote it), with its weights (safetensors, sharded or not, bfloat16
included; pytorch_model.bin when torch is installed) and its tokenizer (tokenizer.json, vocab.txt, or vocab.json +
merges.txt). A `.gguf` file (llama.cpp; GPT-2, Llama, Qwen2, Qwen3 or Gemma 3 architecture) is read with the `gguf`
package, quantised tensors dequantised to float32, the tokenizer rebuilt from its metadata. torch and transformers
are not needed.
to-hf writes config.json, model.safetensors and the tokenizer files that transformers' from_pretrained opens
(BertForPreTraining, GPT2LMHeadModel, LlamaForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM, by the export's
model).
--src and --out may be bucket folders (gs://B/hf, gs://B/export) or a .gguf file in a bucket: the converters read
local copies of the source files and upload a folder they write locally (staging.py); a GPT export goes straight
into the bucket.
"""
import argparse
import json
import sys

from jaxssl import paths
from jaxssl import runtime
from jaxssl import storage
from jaxssl.convert.hf_defaults import ENCODER_TYPES
from jaxssl.errors import UserError, exit_on_user_error


def _source_kind(src: str) -> str:
  """'bert' or 'decoder', from the file name or config.json's model_type (refused types are named later)."""
  if src.endswith('.gguf'):
    return 'decoder'
  config = storage.join(src, 'config.json')
  if not storage.isfile(config):
    raise UserError(f'{src} has no config.json: pass a HuggingFace checkpoint directory or a .gguf file')
  try:
    model_type = json.loads(storage.read_text(config)).get('model_type', 'bert')
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {config} ({e})') from None
  return 'bert' if model_type in ENCODER_TYPES else 'decoder'


def _export_kind(src: str) -> str:
  from jaxssl.train import checkpoint as ckpt_lib  # noqa: PLC0415 (a job: jax modules load in main)
  name = ckpt_lib.read_export_config(src).get('model', {}).get('name')
  if name not in ('bert', 'gpt'):
    raise UserError(f'{src} holds model.name={name!r}: only bert and gpt exports convert to HF')
  return 'bert' if name == 'bert' else 'decoder'


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.convert', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  from_hf = sub.add_parser('from-hf', help='HF directory (BERT, GPT-2, Llama) or .gguf file -> jaxssl export')
  from_hf.add_argument('--seed', type=int, default=0, help='seed for BERT heads the checkpoint lacks')
  to_hf = sub.add_parser('to-hf', help='jaxssl export -> HF directory')
  for p in (from_hf, to_hf):
    p.add_argument('--src', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  args.src, args.out = paths.absolute(args.src), paths.absolute(args.out)
  kind = _source_kind(args.src) if args.command == 'from-hf' else _export_kind(args.src)
  runtime.setup()
  from jaxssl.convert import decoder, hf_bert  # noqa: PLC0415 (jax after runtime.setup)
  if args.command == 'from-hf':
    if kind == 'bert':
      hf_bert.from_hf(args.src, args.out, overwrite=args.overwrite, seed=args.seed)
    else:
      decoder.from_hf(args.src, args.out, overwrite=args.overwrite)
  else:
    (hf_bert if kind == 'bert' else decoder).to_hf(args.src, args.out, overwrite=args.overwrite)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

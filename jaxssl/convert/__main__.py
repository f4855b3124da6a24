"""Convert job: HuggingFace BERT checkpoints to and from jaxssl exports.

  python -m jaxssl.convert from-hf --src HF_DIR --out PARAMS [--overwrite] [--seed N]
  python -m jaxssl.convert to-hf   --src PARAMS --out HF_DIR [--overwrite]

from-hf reads HF_DIR/config.json, model.safetensors and tokenizer.json or vocab.txt (torch is not needed);
to-hf writes config.json, model.safetensors and the tokenizer files for transformers' BertForPreTraining.
"""
import argparse
import sys

from jaxssl import runtime
from jaxssl.errors import exit_on_user_error


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m jaxssl.convert', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='command', required=True)
  from_hf = sub.add_parser('from-hf', help='HF BERT directory -> jaxssl export')
  from_hf.add_argument('--seed', type=int, default=0, help='seed for heads the checkpoint lacks')
  to_hf = sub.add_parser('to-hf', help='jaxssl export -> HF BERT directory')
  for p in (from_hf, to_hf):
    p.add_argument('--src', required=True)
    p.add_argument('--out', required=True)
    p.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  runtime.setup()
  from jaxssl.convert import hf_bert
  if args.command == 'from-hf':
    hf_bert.from_hf(args.src, args.out, overwrite=args.overwrite, seed=args.seed)
  else:
    hf_bert.to_hf(args.src, args.out, overwrite=args.overwrite)


if __name__ == '__main__':
  exit_on_user_error(lambda: main(sys.argv[1:]))

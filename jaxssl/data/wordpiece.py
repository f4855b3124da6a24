"""WordPiece tokenizers of public BERT checkpoints (HuggingFace `tokenizers`), behind jaxssl's tokenizer interface.

A checkpoint directory holds `tokenizer.json` (the whole pipeline: normalizer, pre-tokenizer, vocabulary) or only
a BERT `vocab.txt` (built here exactly as `transformers.BertTokenizerFast` builds it). `tokenizer_config.json`
beside either, when present, names the special tokens and (for vocab.txt) the casing.

Special ids are wherever the vocabulary puts them ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103 in
bert-base-uncased). Text that spells a special token ("[MASK]") is tokenized as ordinary text, as Google's BERT
tokenizer does and as jaxssl's sentencepiece models do, so a corpus cannot forge a mask (HuggingFace's default
would turn it into the [MASK] id).

Any other tokenizer.json (RoBERTa's BPE, XLM-R's sentencepiece Unigram) gets BERT roles here too when it is an MLM
encoder's (`has_encoder_roles`): its tokenizer_config.json names a mask token, or, with no config naming the roles
(roberta-base, xlm-roberta-base and camembert-base ship no tokenizer_config.json), RoBERTa's <s> </s> <mask> (or
[CLS] [SEP] [MASK] beside ALBERT's <pad> <unk>) are among its special tokens. XLM-R's <s> </s> <pad> <unk>
<mask> serve as [CLS] [SEP] [PAD] [UNK] [MASK] (cls_token / sep_token, else bos_token / eos_token, else whichever
spelling the vocabulary has).
"""
import json
import re

import tokenizers as hf_tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

from jaxssl import storage
from jaxssl.data import hf_tokenizer
from jaxssl.data.tokenizer_base import (CONFIG_FILENAME, JSON_FILENAME, random_token_range, read_tokenizer_config,
                                        trim_span)
from jaxssl.errors import UserError

VOCAB_FILENAME = 'vocab.txt'
_ROLES = ('pad', 'unk', 'cls', 'sep', 'mask')
_DEFAULT_TOKENS = {role: f'[{role.upper()}]' for role in _ROLES}
# Each role's other spelling: RoBERTa's (XLM-R's, CamemBERT's, MPNet's; transformers' RobertaTokenizer defaults),
# and ALBERT's <pad> / <unk> beside its [CLS] [SEP] [MASK].
_OTHER_NAMES = {'pad': '<pad>', 'unk': '<unk>', 'cls': '<s>', 'sep': '</s>', 'mask': '<mask>'}
# BERT vocabularies reserve placeholder entries ([unused0] ... [unused993]) that text never produces.
_RESERVED = re.compile(r'\[unused\d+\]')


def _config_token(config: dict, key: str) -> str | None:
  value = config.get(key)
  if isinstance(value, dict):  # tokenizer_config.json may spell a token as {'content': ...}
    value = value.get('content')
  return value if isinstance(value, str) else None


def _token_names(config: dict, defaults: dict | None = None) -> dict[str, str]:
  """Role -> token text, from tokenizer_config.json ([CLS]/[SEP] else bos/eos, RoBERTa's), else `defaults`
  (BERT's [CLS] ... by default)."""
  names = dict(defaults or _DEFAULT_TOKENS)
  for role, fallback in zip(_ROLES, (None, None, 'bos', 'eos', None)):
    value = _config_token(config, f'{role}_token') or (fallback and _config_token(config, f'{fallback}_token'))
    if value:
      names[role] = value
  return names


def _special_tokens(tokenizer: hf_tokenizers.Tokenizer) -> set[str]:
  return {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}


def _default_names(tokenizer: hf_tokenizers.Tokenizer) -> dict[str, str]:
  """Each role's spelling where no config names it: the one that is a special token of the tokenizer, else the
  one in its vocabulary, BERT's ([CLS] ...) first. (roberta-base, XLM-R: <s> ...; ALBERT: <pad> <unk> beside
  [CLS] ...; MPNet's vocabulary has both, its special tokens <s> </s> <pad> <mask>.)"""
  specials = _special_tokens(tokenizer)
  names = {}
  for role, name in _DEFAULT_TOKENS.items():
    spellings = (name, _OTHER_NAMES[role])
    names[role] = next((n for n in spellings if n in specials),
                       next((n for n in spellings if tokenizer.token_to_id(n) is not None), name))
  return names


def has_encoder_roles(tokenizer: hf_tokenizers.Tokenizer, directory: str) -> bool:
  """Whether a tokenizer.json's `tokenizer` (`directory` holds it) is an MLM encoder's, to get BERT roles: WordPiece,
  a tokenizer_config.json beside it naming a mask token, or, where that config names no roles, a CLS, SEP and MASK
  token (either spelling: [CLS] or <s> ...) among its special tokens. Without this, roberta-base as the hub has it
  (no tokenizer_config.json) read as a decoder's BPE whose every role fell back to </s>: pad = cls = sep. Gemma's
  <mask> comes with <bos> / <eos>, Llama 2's <s> </s> without a mask."""
  if hf_tokenizer.model_type(tokenizer) == 'WordPiece':
    return True
  config = read_tokenizer_config(directory)
  if _config_token(config, 'mask_token') is not None:
    return True
  named = any(_config_token(config, f'{role}_token') for role in ('bos', 'eos', 'cls', 'sep', 'pad'))
  specials = _special_tokens(tokenizer)
  return not named and all({_DEFAULT_TOKENS[role], _OTHER_NAMES[role]} & specials for role in ('cls', 'sep', 'mask'))


class WordPieceTokenizer:
  """A HuggingFace `tokenizers.Tokenizer` with BERT special tokens. Build with `from_file` or `from_vocab`."""
  filename = JSON_FILENAME
  bos_id = None  # BERT inputs start with [CLS], which the pipelines add themselves

  def __init__(self, tokenizer: hf_tokenizers.Tokenizer, path: str = '', token_names: dict | None = None):
    self._tok = tokenizer
    self.path = path
    self._tok.encode_special_tokens = True  # "[MASK]" in text is text (module docstring); not saved in the file
    self._tok.no_padding()
    self._tok.no_truncation()
    self.token_names = dict(token_names or _DEFAULT_TOKENS)
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = {role: tokenizer.token_to_id(name) for role, name in self.token_names.items()}
    missing = [self.token_names[role] for role, i in ids.items() if i is None]
    if missing:
      raise UserError(f'tokenizer {path or "(in memory)"} has no {", ".join(missing)} token: BERT inputs need '
                      f'{", ".join(self.token_names.values())} (name others in {CONFIG_FILENAME})')
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (ids[r] for r in _ROLES)
    reserved = {i for piece, i in tokenizer.get_vocab(with_added_tokens=True).items() if _RESERVED.fullmatch(piece)}
    added = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    self.special_ids = frozenset(set(ids.values()) | reserved | added)
    self.random_token_range = random_token_range(self.vocab_size, self.special_ids)

  @classmethod
  def from_file(cls, path: str, tokenizer: hf_tokenizers.Tokenizer | None = None) -> 'WordPieceTokenizer':
    """Loads a HuggingFace `tokenizer.json` (or `tokenizer`, read_tokenizer_json's of it; special token names from
    a tokenizer_config.json beside it)."""
    tok = tokenizer if tokenizer is not None else hf_tokenizer.read_tokenizer_json(path)
    return cls(tok, path, _token_names(read_tokenizer_config(storage.parent(path)), _default_names(tok)))

  @classmethod
  def from_vocab(cls, path: str, lowercase: bool | None = None) -> 'WordPieceTokenizer':
    """Builds BERT's tokenizer over a `vocab.txt` (one entry per line, id = line number).

    Casing: `lowercase`, else `do_lower_case` of a tokenizer_config.json beside it, else inferred from the
    vocabulary (cased when some ordinary entry has an upper-case letter). HuggingFace would lowercase by
    default, which silently breaks a cased vocabulary that comes without its config.
    """
    config = read_tokenizer_config(storage.parent(path))
    try:
      with storage.local_file(path) as local:
        vocab = models.WordPiece.read_file(local)
    except Exception as e:  # pylint: disable=broad-except
      raise UserError(f'{path} is not a WordPiece vocabulary ({str(e)[:200]})') from None
    if lowercase is None:
      lowercase = config.get('do_lower_case')
    if lowercase is None:
      lowercase = not any(c.isupper() for piece in vocab if not piece.startswith('[') for c in piece)
    names = _token_names(config)
    # The same pieces as transformers' BERT converter (BertTokenizerFast), so ids and offsets agree with it.
    tok = hf_tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=names['unk'], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=config.get('tokenize_chinese_chars', True),
        strip_accents=config.get('strip_accents'), lowercase=bool(lowercase))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix='##')
    tok.add_special_tokens([name for name in names.values() if name in vocab])
    return cls(tok, path, names)

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched and multi-threaded in Rust)."""
    return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

  def encode_one(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets into the original text) of each text, without surrounding whitespace.

    WordPiece pieces never include whitespace. A lone sentencepiece '▁' (XLM-R's, before digits, punctuation or
    CJK) stands for whitespace only, yet HF gives it the next character's span: it gets the empty span there.
    """
    out = []
    for text, e in zip(texts, self._tok.encode_batch(list(texts), add_special_tokens=False)):
      spans = [(a, a) if not t.strip('\u2581') else trim_span(text, a, b) for t, (a, b) in zip(e.tokens, e.offsets)]
      out.append((e.ids, spans))
    return out

  def decode(self, ids) -> str:
    """Text of ids (## pieces joined); special ids decode to nothing."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def save(self, directory: str) -> str:
    """Writes `directory/tokenizer.json` (+ a tokenizer_config.json naming the special tokens); returns the path.

    `directory` may be local or in a bucket; each file appears whole."""
    path = storage.join(directory, JSON_FILENAME)
    storage.write_text(path, self._tok.to_str(pretty=True))  # what Tokenizer.save writes
    config = {f'{role}_token': name for role, name in self.token_names.items()}
    # Lets transformers' AutoTokenizer open the directory too (the generic class for non-WordPiece pipelines).
    wordpiece = isinstance(self._tok.model, models.WordPiece)
    config['tokenizer_class'] = 'BertTokenizerFast' if wordpiece else 'PreTrainedTokenizerFast'
    storage.write_text(storage.join(directory, CONFIG_FILENAME), json.dumps(config, indent=2))
    return path

  def __repr__(self):
    return f'WordPieceTokenizer(vocab_size={self.vocab_size}, path={self.path!r})'

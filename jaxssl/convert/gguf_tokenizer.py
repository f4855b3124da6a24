"""GGUF tokenizers (tokenizer.ggml.* metadata) as HuggingFace `tokenizers.Tokenizer` + tokenizer_config dict.

Tokenizers: 'llama' (sentencepiece BPE with byte fallback; merges from the file or derived from the scores, as
transformers' GGUF loader does) and 'gpt2' (byte-level BPE) with any pre-tokenizer (`tokenizer.ggml.pre`) whose
split rule llama.cpp publishes as regexes: gpt-2, llama-bpe, qwen2, smollm, deepseek-llm, ... (the table is
gguf_pretokenizers.py).
"""
import gguf
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

from jaxssl.convert import gguf_pretokenizers
from jaxssl.convert.gguf_reader import K, Metadata
from jaxssl.errors import UserError

SPIECE_SPACE = '\u2581'  # '▁', sentencepiece's visible space


def tokenizer_from_metadata(meta: Metadata) -> tuple[Tokenizer, dict]:
  """The HF tokenizer and tokenizer_config the file's tokenizer.ggml.* metadata describe."""
  kind = meta.get(K.Tokenizer.MODEL, None)
  if kind is None:
    raise UserError(f'{meta.path} carries no tokenizer (no {K.Tokenizer.MODEL!r}): use a GGUF file with its '
                    'vocabulary, or convert from the HuggingFace directory')
  tokens = meta.get(K.Tokenizer.LIST)
  types = meta.get(K.Tokenizer.TOKEN_TYPE, None) or [gguf.TokenType.NORMAL] * len(tokens)
  pre = meta.get(K.Tokenizer.PRE, None)
  if kind == 'llama':
    tok = _sentencepiece_bpe(meta, tokens, types)
    add_bos_default = True  # llama.cpp adds BOS for sentencepiece vocabularies that do not say otherwise
  elif kind == 'gpt2':
    rule = gguf_pretokenizers.split_rule(pre)
    if rule is None:
      known = len(gguf_pretokenizers.PRE_TOKENIZERS)
      raise UserError(f'{meta.path} has a byte-level BPE tokenizer with pre-tokenizer {pre!r}, which jaxssl does '
                      f'not know: the {known} it reads (llama.cpp\'s names: gpt-2, llama-bpe, qwen2, smollm, '
                      'deepseek-llm, ...) are listed in jaxssl/convert/gguf_pretokenizers.py')
    tok = _byte_level_bpe(meta, tokens, rule)
    add_bos_default = rule.add_bos  # as llama.cpp: e.g. Llama 3 vocabularies add BOS, Qwen2's do not
  else:
    raise UserError(f'{meta.path} has tokenizer model {kind!r}: only \'llama\' (sentencepiece BPE) and \'gpt2\' '
                    '(byte-level BPE) can be imported')

  # Control (and the unknown) tokens match whole in text and are skipped when decoding, as in HF's tokenizers;
  # user-defined ones match whole but are ordinary text. Their content is in the vocab, so ids do not change.
  special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
             if ty in (gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN)]
  user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
          if ty == gguf.TokenType.USER_DEFINED]
  tok.add_special_tokens(special)
  tok.add_tokens(user)

  config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'clean_up_tokenization_spaces': False}
  for name, key in (('bos_token', K.Tokenizer.BOS_ID), ('eos_token', K.Tokenizer.EOS_ID),
                    ('unk_token', K.Tokenizer.UNK_ID), ('pad_token', K.Tokenizer.PAD_ID)):
    token_id = meta.get(key, None)
    if token_id is None:
      continue
    if not 0 <= token_id < len(tokens):
      raise UserError(f'{meta.path} has {key}={token_id}, outside its {len(tokens)}-token vocabulary')
    config[name] = tokens[token_id]
  add_bos = bool(meta.get(K.Tokenizer.ADD_BOS, add_bos_default))
  add_eos = bool(meta.get(K.Tokenizer.ADD_EOS, False))
  config['add_bos_token'], config['add_eos_token'] = add_bos, add_eos
  chat_template = meta.get(K.Tokenizer.CHAT_TEMPLATE, None)
  if chat_template:
    config['chat_template'] = chat_template

  post = [processors.ByteLevel(trim_offsets=False)] if kind == 'gpt2' else []
  if add_bos or add_eos:
    # The tokenizer itself adds BOS/EOS (HF's Llama tokenizer.json does the same), so encode(...,
    # add_special_tokens=True) differs from add_special_tokens=False exactly when the model expects them.
    needed = [(n, config.get(n + '_token')) for n, on in (('bos', add_bos), ('eos', add_eos)) if on]
    missing = [n for n, t in needed if t is None]
    if missing:
      raise UserError(f'{meta.path} asks to add {missing[0]} tokens but gives no {missing[0]}_token_id')
    bos = f'{config["bos_token"]}:0 ' if add_bos else ''
    eos = f' {config["eos_token"]}:0' if add_eos else ''
    bos1 = f' {config["bos_token"]}:1' if add_bos else ''
    eos1 = f' {config["eos_token"]}:1' if add_eos else ''
    specials = {(t, tokens.index(t)) for _, t in needed}
    post.append(processors.TemplateProcessing(single=f'{bos}$A:0{eos}', pair=f'{bos}$A:0{eos}{bos1} $B:1{eos1}',
                                              special_tokens=sorted(specials, key=lambda x: x[1])))
  if post:
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)
  return tok, config


def _vocab(tokens: list) -> dict:
  """token -> id; a repeated token keeps its first id (BPE vocabularies must be one-to-one)."""
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  return vocab


def _file_merges(meta: Metadata) -> list | None:
  merges = meta.get(K.Tokenizer.MERGES, None)
  if merges is None:
    return None
  return [tuple(m.split(' ', 1)) for m in merges]


def _merges_from_scores(tokens: list, scores: list, types: list) -> list:
  """BPE merges implied by a sentencepiece BPE vocabulary: each normal piece with score s is made from any two
  normal pieces that concatenate to it, ranked by s (best first). That reproduces sentencepiece's encoder,
  which merges the adjacent pair whose concatenation is the highest-scoring piece."""
  normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == gguf.TokenType.NORMAL}
  merges = []
  for piece, i in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        merges.append((-scores[i], i, cut, left, right))
  merges.sort(key=lambda m: m[:3])
  return [(left, right) for *_, left, right in merges]


def _sentencepiece_bpe(meta: Metadata, tokens: list, types: list) -> Tokenizer:
  """llama.cpp's 'llama' vocabulary (sentencepiece BPE with byte fallback) as HF's Llama tokenizer.json does it:
  Metaspace (space -> '▁', one '▁' before the text), BPE with `<0xXX>` byte fallback, and the reverse decoder."""
  scores = meta.get(K.Tokenizer.SCORES, None)
  merges = _file_merges(meta)
  if merges is None:
    if scores is None:
      raise UserError(f'{meta.path} has a sentencepiece vocabulary with neither merges nor scores')
    merges = _merges_from_scores(tokens, scores, types)
  unk_id = meta.get(K.Tokenizer.UNK_ID, None)
  unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
  tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
  add_prefix = bool(meta.get(K.Tokenizer.ADD_PREFIX, True))
  # A normalizer (as HF's Llama 2 tokenizer.json), not HF's Metaspace(prepend_scheme='first'): Metaspace adds
  # no '▁' to text that starts with a space (' hi' -> '▁hi'), where sentencepiece and llama.cpp always do
  # ('▁▁hi'). Text after an added token (e.g. '<s>', user-defined '<sep>') gets its own '▁' too, as llama.cpp
  # does; sentencepiece itself, which does not split on those, would not add it there.
  steps = [normalizers.Prepend(SPIECE_SPACE)] if add_prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(' ', SPIECE_SPACE)])
  steps = [decoders.Replace(SPIECE_SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if add_prefix:
    steps.append(decoders.Strip(content=' ', left=1, right=0))
  tok.decoder = decoders.Sequence(steps)
  return tok


def _byte_level_bpe(meta: Metadata, tokens: list, rule: gguf_pretokenizers.SplitRule) -> Tokenizer:
  """llama.cpp's 'gpt2' vocabulary (byte-level BPE), split as `rule` says (the file's tokenizer.ggml.pre)."""
  merges = _file_merges(meta)
  if merges is None:
    raise UserError(f'{meta.path} has a byte-level BPE vocabulary without {K.Tokenizer.MERGES!r}')
  # ignore_merges (Llama 3, Tekken, ...): a split that is a whole vocabulary token is taken as is, as llama.cpp
  # and those models' tokenizer.json do.
  tok = Tokenizer(models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=rule.ignore_merges))
  tok.pre_tokenizer = gguf_pretokenizers.pre_tokenizer(rule)
  tok.decoder = decoders.ByteLevel()
  return tok

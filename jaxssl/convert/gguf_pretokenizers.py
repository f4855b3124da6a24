"""llama.cpp's byte-level BPE pre-tokenizers (a GGUF file's `tokenizer.ggml.pre`) as HuggingFace `tokenizers`.

A GGUF file only names its pre-tokenizer; the split rule lives in llama.cpp's source (src/llama-vocab.cpp: name ->
LLAMA_VOCAB_PRE_TYPE_* in llama_vocab::impl::load, type -> list of regexes in llm_tokenizer_bpe). A rule here is
that list: each regex in turn cuts every piece the earlier ones left into its matches and the text between them
(both kept), as llama.cpp's unicode_regex_split and HF's Split(behavior='isolated') do; then the pieces are
spelled in GPT-2's byte alphabet (ByteLevel without its own regex) and BPE-merged one by one.

  rule = split_rule('qwen2')            # None for a name llama.cpp does not publish a rule for here
  tok.pre_tokenizer = pre_tokenizer(rule)

Where llama.cpp quotes the model's own tokenizer.json regex and runs an adaptation for its regex engine
((?i:'s|...) spelled out as '[sS]|..., \\p{Lu}-style classes as lookaheads), the quoted original is used here:
it is what the model's own tokenizer runs (and transformers' GGUF loader, for the names it knows). A file without
the key, and 'default', get GPT-2's split, as in transformers; llama.cpp falls back to an older Falcon-like list
there and warns that quality degrades.

Where llama.cpp's regex engine departs from the model's tokenizer.json (as HF `tokenizers` runs it), jaxssl follows
the tokenizer.json. Compared once with llama.cpp's own splitter (its unicode.cpp, as vendored by llama-cpp-python
0.3.36) on tests/test_gguf_pretokenizers.py's texts plus odd whitespace, marks and cases: the same pieces for
every rule except (1) tekken / gpt-4o, whose lookahead spelling knows case only for A-Z/a-z and cuts combining
marks (a decomposed accent, Devanagari vowel signs) off their letters; (2) youtu / tiny_aya, whose \\p{Lu} /
\\p{Ll} / \\p{Lt} classes llama.cpp reads all as \\p{L} ('CamelCase' stays one piece there); (3) deepseek-llm /
deepseek-coder, where llama.cpp turns non-ASCII whitespace (U+3000, U+2003, ...) into \\x0B before matching, so
its CJK range no longer cuts those characters off the next word.

Not here (refused by name): kimi-k2 and afmoe (hand-written splitters in llama.cpp's unicode.cpp, not regexes),
superbpe (a zero-width split), gemma4 / sarvam-moe / granite-embed-multi-311m / whitespace (not byte-level BPE),
and the encoders' names (jina-*, roberta-bpe, modern-bert, granite-embed-multi-97m), whose models jaxssl's GGUF
import does not read.
"""
import dataclasses

from tokenizers import Regex, pre_tokenizers


@dataclasses.dataclass(frozen=True)
class SplitRule:
  """How llama.cpp pre-tokenizes one family of byte-level BPE vocabularies.

  regexes: applied in order, each isolating its matches. ignore_merges: a piece that is itself a vocabulary token
  is taken whole, without BPE merges (llama.cpp's `ignore_merges`, HF's BPE(ignore_merges=True)). add_bos: whether
  a BOS token goes before the text when the file has no `tokenizer.ggml.add_bos_token`.
  """
  regexes: tuple
  ignore_merges: bool = False
  add_bos: bool = False


def _char_class(ranges: str) -> str:
  """Character-class contents from 'HHHH-HHHH HHHH ...' code points, as Oniguruma \\x{...} escapes (spelled as
  numbers: several of these letters have canonical equivalents that text normalisation would silently swap)."""
  out = []
  for item in ranges.split():
    first, _, last = item.partition('-')
    out.append(f'\\x{{{first}}}' + (f'-\\x{{{last}}}' if last else ''))
  return ''.join(out)


# DeepSeek LLM's cased letters (Latin, Greek, Cyrillic, Armenian, Georgian, Cherokee, ... and their letterlike
# symbols), exactly as its tokenizer.json and llama.cpp list them.
_DEEPSEEK_LETTERS = _char_class(
    '0041-005A 0061-007A 00B5 00C0-00D6 00D8-00F6 00F8-01BA 01BC-01BF 01C4-0293 0295-02AF 0370-0373 0376 0377 '
    '037B-037D 037F 0386 0388-038A 038C 038E-03A1 03A3-03F5 03F7-0481 048A-052F 0531-0556 10A0-10C5 13A0-13F5 '
    '13F8-13FD 1C90-1CBA 1CBD-1CBF 1D00-1D2B 1D6B-1D77 1D79-1D9A 1E00-1F15 1F18-1F1D 1F20-1F45 1F48-1F4D '
    '1F50-1F57 1F59 1F5B 1F5D 1F5F-1F7D 1F80-1FB4 1FB6-1FBC 1FBE 1FC2-1FC4 1FC6-1FCC 1FD0-1FD3 1FD6-1FDB '
    '1FE0-1FEC 1FF2-1FF4 1FF6-1FFC 2102 2107 210A-2113 2115 2119-211D 2124 2126 2128 212A-212D 212F-2134 2139 '
    '213C-213F 2145-2149 214E 2183 2184 2C00-2C7B 2C7E-2CE4 2CEB-2CEE 2CF2 2CF3 A640-A66D A680-A69B A722-A76F '
    'A771-A787 A78B-A78E AB70-ABBF FB00-FB06 FB13-FB17 FF21-FF3A FF41-FF5A 10400-1044F 104B0-104D3 104D8-104FB '
    '10C80-10CB2 10CC0-10CF2 118A0-118DF 1E900-1E943')
# ASCII and full-width punctuation/symbols, curly quotes, the ideographic space, comma and full stop.
_DEEPSEEK_PUNCT = _char_class('0021-002F 003A-007E FF01-FF0F FF1A-FF5E 2018-201F 3000-3002')
# CJK ideographs (and the span below them) and Hangul syllables.
_DEEPSEEK_CJK = _char_class('4E00-9FA5 0800-4E00 AC00-D7FF')
# CJK ideographs, hiragana, katakana.
_CJK_KANA = _char_class('4E00-9FA5 3040-309F 30A0-30FF')
# Youtu: Hangul; CJK/full-width punctuation; bopomofo; CJK ideographs and kana.
_YOUTU_CJK = (f'[{_char_class("AC00-D7A3 3131-318E")}]+'
              f'|[{_char_class("FF01 2026 201C 201D 2018 2019 2014 FF1A FF1B FF0C 3001-303F FE30-FE4F")}]+'
              f'|[{_char_class("3105-312F")}]+|[{_CJK_KANA}]+')
# BLOOM / Poro: anything up to whitespace or sentence punctuation (ASCII, ellipsis, CJK, Devanagari, Arabic).
_BLOOM = f' ?[^(\\s|.,!?{_char_class("2026 3002 FF0C 3001 0964 06D4 060C")})]+'

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
JAIS2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
         r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}")
_UPPER, _LOWER = r'[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]', r'[\p{Ll}\p{Lm}\p{Lo}\p{M}]'
TEKKEN = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Youtu's list has only llama.cpp's spelling (contractions as [sS] classes).
_YOUTU_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_ASCII_PUNCT_WORD = r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+"
DEEPSEEK3 = _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPARK2_5 = _ASCII_PUNCT_WORD + r"|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+|[\r\n]|\s+(?!\S)|\s+"
BAILINGMOE = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]"
              r"|\s+(?!\S)|\s+")
SEED_CODER = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
UFAKZEKA = r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
EXAONE_MOE = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+")
MINICPM5 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

_RULES = {
    'gpt2': SplitRule((GPT2,)),
    'llama3': SplitRule((LLAMA3,), ignore_merges=True, add_bos=True),
    'llama3-merges': SplitRule((LLAMA3,)),  # DBRX, Smaug, ChatGLM: Llama 3's split, merges as usual
    'glm4': SplitRule((LLAMA3,), ignore_merges=True),  # GLM-4/5: Llama 3's split and ignore_merges, no BOS
    'jais2': SplitRule((JAIS2,)),
    'qwen2': SplitRule((QWEN2,)),
    'qwen35': SplitRule((QWEN35,)),
    'tekken': SplitRule((TEKKEN,), ignore_merges=True, add_bos=True),
    'gpt4o': SplitRule((GPT4O,)),
    'tiny-aya': SplitRule((r'\d{1,3}(?=(?:\d{3})*\b)', GPT4O)),
    'youtu': SplitRule((_YOUTU_CJK, _YOUTU_WORDS), ignore_merges=True),
    'deepseek-llm': SplitRule((r'[\r\n]', rf'\s?[{_DEEPSEEK_LETTERS}]+', rf'\s?[{_DEEPSEEK_PUNCT}]+', r'\s+$',
                               rf'[{_DEEPSEEK_CJK}]+', r'\p{N}+')),
    'deepseek-coder': SplitRule((r'[\r\n]', r'\s?\p{L}+', r'\s?\p{P}+', rf'[{_DEEPSEEK_CJK}]+', r'\p{N}')),
    'deepseek3': SplitRule((r'\p{N}{1,3}', rf'[{_CJK_KANA}]+', DEEPSEEK3)),
    'spark2_5': SplitRule((r'\p{N}{1,3}', rf'[{_CJK_KANA}]+', SPARK2_5, r'\p{N}')),
    'falcon': SplitRule((r'[\p{P}\$\+<=>\^~\|`]+', GPT2, r'[0-9][0-9][0-9]')),
    'starcoder': SplitRule((r'\p{N}', GPT2)),  # digits one by one, then GPT-2's split
    'bloom': SplitRule((_BLOOM,)),
    'viking': SplitRule((_BLOOM, r'\p{N}')),
    'chameleon': SplitRule((r'<sentinel:[0-9]+>', r'(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z', r'([\t\n]|    |  )',
                            r'\p{N}', r'[\p{P}!-/:-@\[-`{-~]', GPT2), add_bos=True),
    'bailingmoe': SplitRule((BAILINGMOE,)),
    'seed-coder': SplitRule((SEED_CODER,)),
    'ufakzeka': SplitRule((UFAKZEKA,)),
    'laguna': SplitRule((r'[^\n]+|[\n]+', QWEN2)),
    'exaone-moe': SplitRule((EXAONE_MOE,)),
    'minicpm5': SplitRule((r'\p{N}{1,3}', MINICPM5), ignore_merges=True),
}

# tokenizer.ggml.pre -> rule, grouped as llama.cpp's llama_vocab::impl::load groups the names. 'gpt2' is not a
# llama.cpp name; jaxssl accepted it before and keeps it.
_NAMES = {
    'gpt2': ('gpt-2', 'gpt2', 'default', 'phi-2', 'gigachat', 'a.x-4.0', 'mellum', 'mpt', 'olmo', 'jais', 'trillion',
             'granite-docling', 'exaone4'),
    'llama3': ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0', 'lfm2',
               'jina-v5-nano'),
    'llama3-merges': ('dbrx', 'smaug-bpe', 'chatglm-bpe'),
    'glm4': ('glm4', 'glm5'),
    'jais2': ('jais-2',),
    'qwen2': ('qwen2', 'deepseek-r1-qwen', 'kormo', 'f2llmv2', 'megrez', 'stablelm2', 'hunyuan', 'solar-open',
              'grok-2'),
    'qwen35': ('qwen35',),
    'tekken': ('tekken',),
    'gpt4o': ('gpt-4o', 'llama4', 'kanana2', 'talkie', 'minimax-m2'),
    'tiny-aya': ('tiny_aya', 'cohere2moe'),
    'youtu': ('youtu',),
    'deepseek-llm': ('deepseek-llm',),
    'deepseek-coder': ('deepseek-coder',),
    'deepseek3': ('deepseek-v3', 'hunyuan-dense', 'joyai-llm', 'hy_v4'),
    'spark2_5': ('spark2_5',),
    'falcon': ('falcon',),
    'starcoder': ('starcoder', 'refact', 'command-r', 'smollm', 'codeshell', 'exaone', 'minerva-7b', 'mellum2'),
    'bloom': ('bloom', 'poro-chat', 'gpt3-finnish'),
    'viking': ('viking',),
    'chameleon': ('chameleon',),
    'bailingmoe': ('bailingmoe', 'bailingmoe2', 'llada-moe'),
    'seed-coder': ('seed-coder',),
    'ufakzeka': ('ufakzeka',),
    'laguna': ('laguna',),
    'exaone-moe': ('exaone-moe',),
    'minicpm5': ('minicpm5',),
}
PRE_TOKENIZERS = {name: _RULES[rule] for rule, names in _NAMES.items() for name in names}


def split_rule(name: str | None) -> SplitRule | None:
  """The rule of `tokenizer.ggml.pre` = `name` (None, a file without the key: GPT-2's); None when unknown."""
  return _RULES['gpt2'] if name is None else PRE_TOKENIZERS.get(name)


def pre_tokenizer(rule: SplitRule) -> pre_tokenizers.PreTokenizer:
  """The HF pre-tokenizer of `rule`: its regexes as isolating splits, then GPT-2's byte alphabet."""
  steps = [pre_tokenizers.Split(Regex(r), behavior='isolated', invert=False) for r in rule.regexes]
  return pre_tokenizers.Sequence(steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

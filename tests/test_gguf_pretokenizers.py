"""llama.cpp's byte-level BPE pre-tokenizers (jaxssl/convert/gguf_pretokenizers.py): every `tokenizer.ggml.pre`
name jaxssl reads is written into a tiny GGUF file (a byte-level BPE vocabulary whose merges cross word, digit and
script boundaries, so any difference in splitting changes the ids), read back, and compared token for token on
texts with digits, CJK, emoji, code, runs of whitespace, contractions and accents against:

  * transformers' own GGUF tokenizer (AutoTokenizer.from_pretrained(dir, gguf_file=...)) for the names it splits
    right: those in its own split table (Llama 3, Qwen2, Tekken and GPT-4o families, DBRX, Smaug) and those whose
    llama.cpp rule is GPT-2's split;
  * for every other name (SmolLM, DeepSeek, Falcon, StarCoder, BLOOM, ChatGLM, ...), where transformers splits as
    GPT-2 does and so is no reference (checked below: it differs on these texts), a `tokenizers` Tokenizer built
    here from llama.cpp's regexes as its src/llama-vocab.cpp spells them (its adapted spellings included, e.g.
    '[sS] for (?i:'s)) with llama.cpp's name -> rule table, written out here independently of jaxssl's.
"""
import json
import os
import unicodedata

import pytest

transformers = pytest.importorskip('transformers')
gguf = pytest.importorskip('gguf')
tokenizers = pytest.importorskip('tokenizers')

from tokenizers import Regex, models, pre_tokenizers, trainers  # noqa: E402

from jaxssl.convert import gguf_file, gguf_pretokenizers  # noqa: E402
from jaxssl.errors import UserError  # noqa: E402

TEXTS = [
    '1234567 3.14159 x=1000000, 42nd',
    '中文分词测试，日本語のテキスト。カタカナ 한국어',
    'emoji 🙂🚀 and 👍🏽 flags 🇫🇷!',
    'def f(x):\n\treturn x**2  # hi',
    'a   b\n\n\n  c \r\n d\t\t e   ',
    "I'll don't WE'LL she'S 'twas rock'n'roll",
    "'twas 'tis, 'twas",
    'naïve café résumé Ünïcödé ñ',
    '5µǅs ｆｕｌｌ \U00010400\U00010401 \u2126\u1f7d ß',  # DeepSeek's letter list: µ ǅ, full-width, Deseret
    'CamelCaseWord HTTPServer iPhone',
    'path/to/file.txt </div>\n',
    'Hello, world! ... (ok)? yes… “quoted” — dash',
    '$100+200=300^2|x~y`z @home #tag',
    'مرحبا، بالعالم۔ हिन्दी।',
    '   leading and trailing   ',
    'if x:\n        y = 1      # six spaces',
]
EOT = '<|endoftext|>'

# ----------------------------------------------------------------------- llama.cpp's rules, as it spells them
# src/llama-vocab.cpp, llm_tokenizer_bpe: LLAMA_VOCAB_PRE_TYPE_* -> regexes (C++ escapes undone).
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
CONTR = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
LLAMA3 = CONTR + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = CONTR + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PORO = ' ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+'
DEEPSEEK_CJK = '[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+'
KANA = '[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+'
DEEPSEEK3 = ('[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+'
             '| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+')
TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT4O = (rf"[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))*((?=[\p{{L}}])([^A-Z]))+{CONTR}?"
         rf"|[^\r\n\p{{L}}\p{{N}}]?((?=[\p{{L}}])([^a-z]))+((?=[\p{{L}}])([^A-Z]))*{CONTR}?"
         r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
UPPER, LOWER = r'[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]', r'[\p{Ll}\p{Lm}\p{Lo}\p{M}]'
CASED_WORDS = rf"[^\r\n\p{{L}}\p{{N}}]?{UPPER}*{LOWER}+{CONTR}?|[^\r\n\p{{L}}\p{{N}}]?{UPPER}+{LOWER}*{CONTR}?"
YOUTU_WORDS = CASED_WORDS + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA_CPP_SPLITS = {
    'GPT2': [GPT2],
    'LLAMA3': [LLAMA3],
    'JAIS2': [CONTR + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s{512}(?!\S)|\s{256}(?!\S)|\s{128}(?!\S)|\s{64}(?!\S)|\s{32}(?!\S)|\s{16}(?!\S)|\s{8}(?!\S)"
              r"|\s{4}(?!\S)|\s{1,2}(?!\S)|\s{1}"],
    'DEEPSEEK_LLM': [
        '[\r\n]',
        '\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af'
        '\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5'
        '\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba'
        '\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45'
        '\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe'
        '\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102'
        '\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f'
        '\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d'
        '\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17'
        '\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb'
        '\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+',
        '\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+',
        r'\s+$',
        DEEPSEEK_CJK,
        r'\p{N}+'],
    'DEEPSEEK3_LLM': [r'\p{N}{1,3}', KANA, DEEPSEEK3],
    'SPARK2_5': [r'\p{N}{1,3}', KANA, DEEPSEEK3.replace('| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|',
                                                       '| ?[\\p{P}\\p{S}]+|[\r\n]|'), r'\p{N}'],
    'YOUTU': ['[\uac00-\ud7a3\u3131-\u318e]+|[\uff01\u2026\u201c\u201d\u2018\u2019\u2014\uff1a\uff1b\uff0c'
              '\u3001-\u303f\ufe30-\ufe4f]+|[\u3105-\u312f]+|' + KANA, YOUTU_WORDS],
    'DEEPSEEK_CODER': ['[\r\n]', r'\s?\p{L}+', r'\s?\p{P}+', DEEPSEEK_CJK, r'\p{N}'],
    'FALCON': [r'[\p{P}\$\+<=>\^~\|`]+', GPT2, '[0-9][0-9][0-9]'],
    'STARCODER': [r'\p{N}', GPT2],
    'QWEN2': [QWEN2],
    'QWEN35': [CONTR + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+"],
    'PORO': [PORO],
    'CHATGLM4': [LLAMA3],
    'VIKING': [PORO, r'\p{N}'],
    'TEKKEN': [TEKKEN],
    'CHAMELEON': ['<sentinel:[0-9]+>', '(IMGIMG)((A|B|C|D|E|F|G|H|I){1,4})Z', '([\\t\\n]|    |  )', r'\p{N}',
                  r'[\p{P}!-/:-@\[-`{-~]', GPT2],
    'GPT4O': [GPT4O],
    'TINY_AYA': [r'\d{1,3}(?=(?:\d{3})*\b)',
                 CASED_WORDS + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    'BAILINGMOE': [r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"],
    'SEED_CODER': [CONTR + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"],
    'UFAKZEKA': [r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"],
    'GROK_2': [QWEN2],
    'LAGUNA': [r'[^\n]+|[\n]+', QWEN2],
    'EXAONE_MOE': [CONTR + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]?"
                   r"|\s*[\r\n]|\s+(?!\S)|\s+"],
    'MINICPM5': [r'\p{N}{1,3}', CONTR + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+"],
}
for _same, _as in (('DBRX', 'LLAMA3'), ('SMAUG', 'LLAMA3'), ('STABLELM2', 'QWEN2'), ('HUNYUAN', 'QWEN2'),
                   ('SOLAR_OPEN', 'QWEN2'), ('HUNYUAN_DENSE', 'DEEPSEEK3_LLM'), ('JOYAI_LLM', 'DEEPSEEK3_LLM'),
                   ('HY_V4', 'DEEPSEEK3_LLM'), ('MPT', 'GPT2'), ('OLMO', 'GPT2'), ('JAIS', 'GPT2'),
                   ('TRILLION', 'GPT2'), ('GRANITE_DOCLING', 'GPT2'), ('REFACT', 'STARCODER'),
                   ('COMMAND_R', 'STARCODER'), ('SMOLLM', 'STARCODER'), ('CODESHELL', 'STARCODER'),
                   ('EXAONE', 'STARCODER'), ('MINERVA', 'STARCODER'), ('MELLUM2', 'STARCODER'), ('BLOOM', 'PORO'),
                   ('GPT3_FINNISH', 'PORO'), ('MINIMAX_M2', 'GPT4O')):
  LLAMA_CPP_SPLITS[_same] = LLAMA_CPP_SPLITS[_as]

# llama_vocab::impl::load: tokenizer.ggml.pre -> LLAMA_VOCAB_PRE_TYPE_* (the byte-level names jaxssl reads).
LLAMA_CPP_NAMES = {
    'default': 'GPT2',  # llama.cpp: its DEFAULT list; jaxssl and transformers: GPT-2's split (see the module)
    'gpt2': 'GPT2',  # not a llama.cpp name; jaxssl accepted it before
    'llama3': 'LLAMA3', 'llama-v3': 'LLAMA3', 'llama-bpe': 'LLAMA3', 'falcon3': 'LLAMA3', 'falcon-h1': 'LLAMA3',
    'pixtral': 'LLAMA3', 'midm-2.0': 'LLAMA3', 'lfm2': 'LLAMA3', 'jina-v5-nano': 'LLAMA3',
    'deepseek-llm': 'DEEPSEEK_LLM', 'deepseek-coder': 'DEEPSEEK_CODER', 'deepseek-v3': 'DEEPSEEK3_LLM',
    'spark2_5': 'SPARK2_5', 'youtu': 'YOUTU', 'falcon': 'FALCON', 'mpt': 'MPT', 'starcoder': 'STARCODER',
    'gpt-2': 'GPT2', 'phi-2': 'GPT2', 'gigachat': 'GPT2', 'a.x-4.0': 'GPT2', 'mellum': 'GPT2', 'jais-2': 'JAIS2',
    'refact': 'REFACT', 'command-r': 'COMMAND_R', 'qwen2': 'QWEN2', 'deepseek-r1-qwen': 'QWEN2', 'kormo': 'QWEN2',
    'f2llmv2': 'QWEN2', 'qwen35': 'QWEN35', 'stablelm2': 'STABLELM2', 'olmo': 'OLMO', 'dbrx': 'DBRX',
    'smaug-bpe': 'SMAUG', 'poro-chat': 'PORO', 'glm4': 'CHATGLM4', 'glm5': 'CHATGLM4',
    'chatglm-bpe': 'CHATGLM4', 'viking': 'VIKING', 'jais': 'JAIS', 'tekken': 'TEKKEN', 'smollm': 'SMOLLM',
    'codeshell': 'CODESHELL', 'bloom': 'BLOOM',
    'gpt3-finnish': 'GPT3_FINNISH', 'exaone': 'EXAONE', 'exaone4': 'GPT2', 'exaone-moe': 'EXAONE_MOE',
    'chameleon': 'CHAMELEON', 'minerva-7b': 'MINERVA', 'megrez': 'QWEN2', 'gpt-4o': 'GPT4O', 'llama4': 'GPT4O',
    'kanana2': 'GPT4O', 'talkie': 'GPT4O', 'tiny_aya': 'TINY_AYA', 'cohere2moe': 'TINY_AYA', 'trillion': 'TRILLION',
    'granite-docling': 'GRANITE_DOCLING', 'bailingmoe': 'BAILINGMOE', 'bailingmoe2': 'BAILINGMOE',
    'llada-moe': 'BAILINGMOE', 'seed-coder': 'SEED_CODER', 'hunyuan': 'HUNYUAN', 'hunyuan-dense': 'HUNYUAN_DENSE',
    'hy_v4': 'HY_V4', 'joyai-llm': 'JOYAI_LLM', 'ufakzeka': 'UFAKZEKA', 'grok-2': 'GROK_2', 'laguna': 'LAGUNA',
    'minimax-m2': 'MINIMAX_M2', 'solar-open': 'SOLAR_OPEN', 'mellum2': 'MELLUM2', 'minicpm5': 'MINICPM5',
}
# llama.cpp's per-name flags: a split that is a whole token skips the merges; BOS added by default.
IGNORE_MERGES = {'llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0', 'lfm2',
                 'jina-v5-nano', 'minicpm5', 'youtu', 'tekken', 'glm4', 'glm5'}
ADD_BOS = {'llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0', 'lfm2', 'jina-v5-nano',
           'tekken', 'chameleon'}
# Names transformers' GGUF tokenizer splits as llama.cpp does (its GGUF_PRE_TOKENIZER_SPLITS; every other name it
# splits with GPT-2's regex, which is right exactly for the GPT-2 rule).
TRANSFORMERS_SPLITS = {'llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0', 'lfm2',
                       'jina-v5-nano', 'dbrx', 'smaug-bpe', 'tekken', 'qwen2', 'deepseek-r1-qwen', 'kormo', 'f2llmv2',
                       'megrez', 'qwen35', 'gpt-4o', 'llama4', 'kanana2', 'talkie', 'minimax-m2'}
# llama.cpp byte-level names jaxssl refuses (see the module docstring for why).
REFUSED = ('kimi-k2', 'afmoe', 'superbpe', 'whitespace', 'jina-es', 'jina-v2-code', 'roberta-bpe', 'modern-bert',
           'granite-embed-multi-97m')


def cases_differ(text):
  """Whether llama.cpp's lookahead spelling of tekken / gpt-4o may split `text` otherwise than the original: it
  knows case only for A-Z / a-z (any other letter counts as both) and leaves combining marks out of words."""
  return any(unicodedata.category(c).startswith('M') or unicodedata.category(c) in ('Lu', 'Ll', 'Lt')
             and not c.isascii() for c in text)


def uses_transformers(name):
  return name in TRANSFORMERS_SPLITS or LLAMA_CPP_SPLITS[LLAMA_CPP_NAMES[name]] == LLAMA_CPP_SPLITS['GPT2']


@pytest.fixture(scope='module')
def vocab():
  """(tokens, merges): a byte-level BPE trained on whole lines (no pre-tokenizer split), so merges cross spaces,
  digits, punctuation and scripts, and a split rule that cuts elsewhere gives other ids."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  trainer = trainers.BpeTrainer(vocab_size=900, min_frequency=2, special_tokens=[EOT], show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS * 3 + [t.upper() for t in TEXTS] + [t[::-1] for t in TEXTS], trainer)
  ids = tok.get_vocab()
  merges = json.loads(tok.to_str())['model']['merges']
  return sorted(ids, key=ids.get), [m if isinstance(m, str) else ' '.join(m) for m in merges]


@pytest.fixture(scope='module')
def gguf_dir(vocab, tmp_path_factory):
  """One tokenizer-only GGUF file per name (architecture gpt2, as llama.cpp's _set_vocab_gpt2 writes the keys)."""
  tokens, merges = vocab
  d = tmp_path_factory.mktemp('pre')
  for name in list(LLAMA_CPP_NAMES) + list(REFUSED):
    w = gguf.GGUFWriter(str(d / f'{name}.gguf'), 'gpt2')
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(name)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == EOT else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(EOT))
    w.add_eos_token_id(tokens.index(EOT))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  return d


def llama_cpp_tokenizer(vocab, name):
  """The reference built from llama.cpp's own spelling of `name`'s rule and flags."""
  tokens, merges = vocab
  tok = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                        merges=[tuple(m.split(' ', 1)) for m in merges],
                                        ignore_merges=name in IGNORE_MERGES))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior='isolated') for r in LLAMA_CPP_SPLITS[LLAMA_CPP_NAMES[name]]]
      + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  return tok


def test_names_are_llama_cpps():
  """jaxssl reads exactly the names listed here from llama.cpp, each with llama.cpp's flags."""
  assert set(gguf_pretokenizers.PRE_TOKENIZERS) == set(LLAMA_CPP_NAMES)
  for name, rule in gguf_pretokenizers.PRE_TOKENIZERS.items():
    assert (rule.ignore_merges, rule.add_bos) == (name in IGNORE_MERGES, name in ADD_BOS), name
  assert gguf_pretokenizers.split_rule(None) == gguf_pretokenizers.split_rule('gpt-2')  # no key: GPT-2's split


@pytest.mark.parametrize('name', sorted(LLAMA_CPP_NAMES))
def test_pre_tokenizer_matches_reference(name, vocab, gguf_dir):
  tokens, _ = vocab
  ours, config = gguf_file.read_gguf_tokenizer(str(gguf_dir / f'{name}.gguf'))
  got = [ours.encode(t, add_special_tokens=False).ids for t in TEXTS]
  for text, ids in zip(TEXTS, got):
    assert ours.decode(ids) == text, (name, text)  # byte-level: lossless
  # BOS only where llama.cpp adds it by default (the file has no tokenizer.ggml.add_bos_token).
  assert config['add_bos_token'] is (name in ADD_BOS)
  assert ours.encode(TEXTS[0]).ids == [tokens.index(EOT)] * (name in ADD_BOS) + got[0]
  ref_hf = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=f'{name}.gguf')
  hf = [ref_hf(t, add_special_tokens=False)['input_ids'] for t in TEXTS]
  if uses_transformers(name):
    assert got == hf, name
  else:
    # transformers splits this name as GPT-2 does: wrong here, and these texts show it.
    assert got != hf, name
  # And llama.cpp's own spelling, except where its tekken / gpt-4o spelling is known to split otherwise (below).
  ref = llama_cpp_tokenizer(vocab, name)
  lookahead = LLAMA_CPP_SPLITS[LLAMA_CPP_NAMES[name]] in (LLAMA_CPP_SPLITS['TEKKEN'], LLAMA_CPP_SPLITS['GPT4O'])
  for text, ids in zip(TEXTS, got):
    if not (lookahead and cases_differ(text)):
      assert ids == ref.encode(text).ids, (name, text)
      # The pieces too, which a vocabulary without a merge across some boundary would not show.
      pieces = ours.pre_tokenizer.pre_tokenize_str(text)
      assert pieces == ref.pre_tokenizer.pre_tokenize_str(text), (name, text)


# Rules that split every text alike although llama.cpp spells them differently: Bailing MoE's list is Qwen2's with
# possessive quantifiers made greedy (no backtracking could help there anyway) and '\s*[\r\n]' for '\s*[\r\n]+'
# (\s* takes the other newlines); MiniCPM5 cuts digit runs in threes first, which Llama 3's list does anyway.
SAME_SPLITS = ({'QWEN2', 'BAILINGMOE'}, {'LLAMA3', 'MINICPM5'})


def test_texts_tell_rules_apart(vocab):
  """Every two of llama.cpp's rules that differ give different ids on these texts with this vocabulary (so a
  name mapped to the wrong rule would fail above)."""
  kinds_by_ids = {}
  for kind in LLAMA_CPP_SPLITS:
    name = next(n for n, k in LLAMA_CPP_NAMES.items() if k == kind)
    ids = tuple(tuple(llama_cpp_tokenizer(vocab, name).encode(t).ids) for t in TEXTS)
    kinds_by_ids.setdefault(ids, set()).add(kind)
  for kinds in kinds_by_ids.values():
    rules = {tuple(LLAMA_CPP_SPLITS[k]) for k in kinds}
    if len(rules) > 1:
      assert len(rules) == 2 and any(same <= kinds for same in SAME_SPLITS), sorted(kinds)


def test_llama_cpp_spellings_under_oniguruma():
  """Where llama.cpp runs an adaptation of the model's tokenizer.json regex, jaxssl runs the original (as the
  model's tokenizer and transformers do). Under HF's regex engine (Oniguruma) the two split these texts the same,
  except tekken's and gpt-4o's lookahead forms: they know case only for A-Z / a-z and cut combining marks off
  their letters, so Devanagari vowel signs, a decomposed accent, 'ÜBER' and 'Kώǅ' split otherwise."""
  def splits(regex, text):
    return [p for p, _ in pre_tokenizers.Split(Regex(regex), behavior='isolated').pre_tokenize_str(text)]
  differing = ['हिन्दी', 'cafe\u0301', '\u00dcBER', 'K\u1f7d\u01c5']
  for name in ('llama-bpe', 'qwen2', 'qwen35', 'jais-2', 'tiny_aya', 'bailingmoe', 'seed-coder', 'grok-2',
               'exaone-moe', 'minicpm5', 'chatglm-bpe', 'tekken', 'gpt-4o', 'gpt-2'):
    ours = gguf_pretokenizers.PRE_TOKENIZERS[name].regexes
    theirs = LLAMA_CPP_SPLITS[LLAMA_CPP_NAMES[name]]
    assert len(ours) == len(theirs) and any(a != b for a, b in zip(ours, theirs)), name  # another spelling
    lookahead = name in ('tekken', 'gpt-4o')
    for a, b in zip(ours, theirs):
      for text in TEXTS + differing:
        if lookahead and text in differing:
          assert splits(a, text) != splits(b, text), (name, text)
        elif not (lookahead and cases_differ(text)):
          assert splits(a, text) == splits(b, text), (name, text)
  assert [splits(gguf_pretokenizers.TEKKEN, t) for t in differing[:3]] == [[t] for t in differing[:3]]


@pytest.mark.parametrize('name', REFUSED + ('no-such-tokenizer',))
def test_unknown_pre_tokenizer_is_one_line_error(name, gguf_dir, tmp_path):
  path = gguf_dir / f'{name}.gguf'
  if not path.exists():
    w = gguf.GGUFWriter(str(path), 'gpt2')
    for method, value in (('add_tokenizer_model', 'gpt2'), ('add_tokenizer_pre', name), ('add_token_list', ['a']),
                          ('add_token_merges', [])):
      getattr(w, method)(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
  with pytest.raises(UserError) as e:
    gguf_file.read_gguf_tokenizer(str(path))
  msg = str(e.value)
  assert '\n' not in msg and f'pre-tokenizer {name!r}' in msg and 'gguf_pretokenizers.py' in msg, msg
  assert os.path.basename(str(path)) in msg

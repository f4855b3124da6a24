"""What a README reader is assumed to have at hand: task files and public checkpoints (tiny, built here).

tests/test_readme.py writes these at the relative paths the README's commands name (`sst/train.tsv`,
`~/models/gpt2`, ...), then runs the commands as written. The checkpoints are tiny random models that transformers
builds and saves in the hub's layouts, with real tokenizers trained on PTB text.
"""
import json
import os
import random

import numpy as np
import treebank

POSITIVE, NEGATIVE = ['good', 'great', 'fine', 'lovely'], ['bad', 'awful', 'poor', 'dull']
FILLER = 'the a film movie plot actor was is very quite and but story scene'.split()
ZH_CHARS = '我们你他她是的了在有这个中国人天气很好学习语言文本模型北京城市公园喜欢读书音乐今明大小'
# Penn Treebank tags, punctuation ones included: a POS tag set is not a span scheme.
POS_WORDS = {'the': 'DT', 'a': 'DT', 'film': 'NN', 'story': 'NN', 'actor': 'NN', 'films': 'NNS', 'is': 'VBZ',
             'was': 'VBD', 'good': 'JJ', 'bad': 'JJ', 'very': 'RB', 'and': 'CC', ',': ',', '.': '.', '``': '``',
             "''": "''", '(': '-LRB-', ')': '-RRB-', '$': '$', '5': 'CD', ':': ':'}


def ptb_sentences(n: int) -> list[str]:
  return [l.strip() for l in treebank.penn['train'].split('\n') if l.strip()][:n]


def _sentence(rng, word):
  words = rng.choices(FILLER, k=rng.randint(3, 8))
  words.insert(rng.randint(0, len(words)), word)
  return ' '.join(words)


def write_classification(path, n, seed, pair=False):
  """TSV with a header: text,label (or text_a,text_b,label for pairs)."""
  rng = random.Random(seed)
  rows = ['text_a\ttext_b\tlabel' if pair else 'text\tlabel']
  for _ in range(n):
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    rows.append(f'{_sentence(rng, word)}\t{_sentence(rng, "")}\t{"entailment" if positive else "contradiction"}'
                if pair else f'{_sentence(rng, word)}\t{"positive" if positive else "negative"}')
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(rows) + '\n')


def write_pairs_jsonl(path, n, seed):
  rng = random.Random(seed)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    for _ in range(n):
      positive = rng.random() < 0.5
      word = rng.choice(POSITIVE if positive else NEGATIVE)
      f.write(json.dumps({'text_a': _sentence(rng, word), 'text_b': _sentence(rng, ''),
                          'label': 'entailment' if positive else 'contradiction'}) + '\n')


def write_pos_conll(path, n, seed):
  """CoNLL `token<TAB>tag` with Penn Treebank POS tags, blank line between sentences."""
  rng = random.Random(seed)
  words = list(POS_WORDS)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    for _ in range(n):
      for w in rng.choices(words, k=rng.randint(4, 9)):
        f.write(f'{w}\t{POS_WORDS[w]}\n')
      f.write('\n')


def write_squad(path, n, seed):
  """SQuAD v1.1 JSON: contexts of filler words with one city in them; the question asks for the city."""
  rng = random.Random(seed)
  articles = []
  for i in range(n):
    words = rng.choices(FILLER, k=rng.randint(6, 30))
    city = rng.choice(['Paris', 'Rome'])
    words.insert(rng.randint(0, len(words)), city)
    context = ' '.join(words)
    articles.append({'title': f't{i}', 'paragraphs': [{'context': context, 'qas': [
        {'id': f'q{i}', 'question': 'where is it', 'answers': [{'text': city, 'answer_start': context.index(city)}]}]}]})
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    json.dump({'version': '1.1', 'data': articles}, f)


def write_chinese_text(path, n_docs, seed):
  """Documents of Chinese 'sentences' (random characters of a small set), blank lines between documents."""
  rng = random.Random(seed)
  docs = ['\n'.join(''.join(rng.choices(ZH_CHARS, k=rng.randint(6, 14))) + '。' for _ in range(6))
          for _ in range(n_docs)]
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n\n'.join(docs) + '\n')


def write_embedding_items(path):
  items = [{'sentence': s, 'target': 'bank', 'label': label} for s, label in [
      ('he sat on the bank of the river', 'river'), ('the river bank was muddy', 'river'),
      ('the bank raised its interest rates', 'money'), ('she took a loan from the bank', 'money')]]
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(item) + '\n' for item in items))


# ----------------------------------------------------------------------------------- public checkpoints

def byte_level_bpe(eos='<|endoftext|>'):
  """A GPT-2-style byte-level BPE tokenizer trained on PTB sentences, end-of-text token last."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[], show_progress=False)
  tok.train_from_iterator(ptb_sentences(3000), trainer)
  tok.add_special_tokens([eos])
  return tok


def write_gpt2(directory, seed, n_layer=2):
  """A GPT-2 hub directory: config.json, model.safetensors, tokenizer.json + tokenizer_config.json."""
  import torch
  import transformers
  eos = '<|endoftext|>'
  tok = byte_level_bpe(eos)
  torch.manual_seed(seed)
  config = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=128, n_embd=32, n_layer=n_layer,
                                   n_head=4, n_inner=64, bos_token_id=tok.token_to_id(eos),
                                   eos_token_id=tok.token_to_id(eos))
  model = transformers.GPT2LMHeadModel(config).eval()
  model.save_pretrained(directory)
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos, unk_token=eos)
  fast.save_pretrained(directory)
  return model


def write_llama(directory, seed):
  """A Llama-3-style hub directory: LlamaForCausalLM with GQA and llama3 RoPE scaling, byte-level BPE."""
  import torch
  import transformers
  bos, eos = '<|begin_of_text|>', '<|end_of_text|>'
  tok = byte_level_bpe(eos)
  tok.add_special_tokens([bos])
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
      bos_token_id=tok.token_to_id(bos), eos_token_id=tok.token_to_id(eos), tie_word_embeddings=True,
      rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                    'original_max_position_embeddings': 64}, rope_theta=500000.0)
  model = transformers.LlamaForCausalLM(config).eval()
  model.save_pretrained(directory)
  from tokenizers import processors
  tok.post_processor = processors.TemplateProcessing(single=f'{bos} $A', special_tokens=[(bos, tok.token_to_id(bos))])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
  fast.save_pretrained(directory)
  return model


def write_llama_gguf(path, seed, workdir):
  """A llama.cpp GGUF file (sentencepiece-BPE tokenizer with byte fallback), as tests/test_convert_llama.py."""
  import sentencepiece as spm
  from tests import test_convert_llama as llama_tests
  corpus = os.path.join(workdir, 'spm_corpus.txt')
  with open(corpus, 'w') as f:
    f.write('\n'.join(ptb_sentences(2000)) + '\n')
  spm.SentencePieceTrainer.train(
      input=corpus, model_prefix=os.path.join(workdir, 'sp'), model_type='bpe', vocab_size=400,
      byte_fallback=True, character_coverage=1.0, normalization_rule_name='identity',
      remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=os.path.join(workdir, 'sp.model'))
  model = llama_tests.tiny_llama(sp.vocab_size(), seed, num_key_value_heads=2, tie_word_embeddings=False,
                                 rope_theta=10000.0, rope_scaling=dict(llama_tests.LLAMA3_ROPE))
  llama_tests.write_llama_gguf(path, model, sp)
  return model


def write_xlmr(directory, seed):
  """An XLM-R hub directory (RoBERTa layout, sentencepiece-unigram tokenizer.json) over English and Chinese."""
  import torch
  import transformers
  from tests import test_convert_xlmr as xlmr_tests
  vocab = xlmr_tests.write_tokenizer(directory)
  torch.manual_seed(seed)
  config = transformers.XLMRobertaConfig(
      vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
      max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
  model = transformers.XLMRobertaForMaskedLM(config).eval()
  model.save_pretrained(directory, safe_serialization=True)
  return model


def gpt2_logits(model, ids):
  import torch
  with torch.no_grad():
    return model(torch.tensor(np.asarray(ids))).logits.numpy()

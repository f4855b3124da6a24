"""The generate job's text: what follows the prompt, spaced as the model wrote it, for each kind of tokenizer
(`jaxssl.generate.continuation`). The job used to join prompt and continuation with a space, which doubled the
space a byte-level BPE's next piece carries ('The capital of France is  Paris')."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxssl.data.hf_tokenizer import HFTokenizer
from jaxssl.data.tokenizers import train_tokenizer
from jaxssl.generate import continuation

SENTENCES = ['the capital of france is paris', 'the company said it would buy the stock', 'in october prices rose',
             'hello world said the company'] * 50


@pytest.fixture(scope='module')
def byte_level():
  """A GPT-2-like byte-level BPE: each word's first piece carries its space ('Ġparis')."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return HFTokenizer.from_tokenizer(tok, {'eos': '<|endoftext|>'})


@pytest.fixture(scope='module')
def sentencepiece(tmp_path_factory):
  """jaxssl's own sentencepiece model: decoding drops a text's leading space ('▁paris' alone is 'paris')."""
  return train_tokenizer(SENTENCES, 40, str(tmp_path_factory.mktemp('spm') / 'sp'))


@pytest.mark.parametrize('kind', ['byte_level', 'sentencepiece'])
def test_prompt_and_continuation_read_as_one_text(kind, request):
  """Cut a text's pieces anywhere, at a word's start or inside a word: the prompt (the first pieces' text) and
  the continuation of the rest read as the whole."""
  tok = request.getfixturevalue(kind)
  for sentence in ('the capital of france is paris', 'hello world said the company'):
    ids = tok.encode_one(sentence)
    assert len(ids) > 4 and tok.decode(ids) == sentence
    for cut in range(1, len(ids)):
      prompt = tok.decode(ids[:cut])
      assert prompt + continuation(tok, ids[:cut], ids[cut:]) == sentence, (kind, cut)
  head = tok.encode_one('the capital of france is')
  assert continuation(tok, head, tok.encode_one('the capital of france is paris')[len(head):]) == ' paris'
  assert continuation(tok, head, []) == ''


def test_a_tokenizer_that_does_not_decode_its_prompt_back_gets_a_spaced_continuation():
  """Where the decoded prompt is not a prefix of the decoded whole (a tokenizer that normalizes what it decodes
  together), the continuation's own text follows after a space, or after its own leading space."""

  class Normalizing:
    pieces = {1: 'the', 2: ' cat', 3: 'dog'}

    def decode(self, ids):
      text = ''.join(self.pieces[i] for i in ids)
      return text.upper() if len(ids) > 1 else text

  assert continuation(Normalizing(), [1], [2]) == ' cat'
  assert continuation(Normalizing(), [1], [3]) == ' dog'
  assert continuation(Normalizing(), [1], []) == ''

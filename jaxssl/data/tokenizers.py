"""Tokenizers behind one interface (`TextTokenizer`): jaxssl's own sentencepiece models and WordPiece.

jaxssl trains sentencepiece models with fixed special ids: 0 [PAD], 1 [UNK], 2 [CLS], 3 [SEP], 4 [MASK].
[CLS], [SEP] and [MASK] are sentencepiece *control* symbols: they have ids but plain text never encodes to them
(the text "[MASK]" becomes ordinary pieces), so a corpus cannot forge a mask. Ids >= NUM_SPECIAL are normal
tokens (the range random MLM replacements are drawn from).

Public BERT checkpoints come with WordPiece vocabularies whose special ids lie elsewhere ([CLS]=101 in
bert-base-uncased): `jaxssl.data.wordpiece.WordPieceTokenizer`. Code that builds inputs reads the ids from the
tokenizer (`cls_id`, `special_ids`, `random_token_range`, ...), never from constants. `load_tokenizer(path)` opens
either kind from a directory or file.
"""
import io
import itertools
import re
import time
from typing import Callable, Iterable, Protocol

import sentencepiece as spm

from jaxssl import storage
from jaxssl.data.tokenizer_base import JSON_FILENAME, SPECIAL_PIECES, trim_span
from jaxssl.errors import UserError

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
NUM_SPECIAL = 5
MODEL_FILENAME = 'tokenizer.model'
# The trained model depends on the thread count (per-thread partial sums), so it is a constant, not the
# machine's core count: the same sentences give byte-identical models on every machine.
_NUM_THREADS = 8


class TextTokenizer(Protocol):
  """What the pipeline, exports and downstream jobs need of a tokenizer.

  `special_ids` are never masked or used as random replacements: [PAD] [UNK] [CLS] [SEP] [MASK] and any other
  special or reserved token. MLM random replacements are drawn uniformly from `random_token_range` [low, high).
  Offsets are *character* offsets (start, end) into the original text, one per id: `text[start:end]` is what the
  token stands for, without surrounding whitespace; a token that stands for whitespace only has start == end.
  """
  vocab_size: int
  pad_id: int
  unk_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  bos_id: int | None  # put before every text by jobs that build prompts (Llama's <s>); None = nothing
  special_ids: frozenset
  random_token_range: tuple[int, int]
  filename: str  # what `save` writes, e.g. 'tokenizer.model'

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Ids of each text, without special tokens."""

  def encode_one(self, text: str) -> list[int]:
    """`encode([text])[0]`."""

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text; ids equal `encode(texts)`."""

  def decode(self, ids) -> str:
    """Text of ids; special ids decode to nothing."""

  def id_to_piece(self, i: int) -> str:
    """The vocabulary entry of id i."""

  def save(self, directory: str) -> str:
    """Writes the tokenizer into `directory` (as `filename`); returns the path written."""


def _byte_to_char(text: str) -> list[int] | None:
  """Char index of every UTF-8 byte offset of `text` (plus the end); None when they coincide (ASCII)."""
  if text.isascii():
    return None
  index = []
  for i, ch in enumerate(text):
    index.extend([i] * len(ch.encode('utf-8')))
  index.append(len(text))
  return index


class SentencePieceTokenizer:
  """A sentencepiece model with the jaxssl special ids. Build with `load(path)` or `from_serialized`."""
  pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
  bos_id = None
  num_special = NUM_SPECIAL
  special_ids = frozenset(range(NUM_SPECIAL))
  filename = MODEL_FILENAME

  def __init__(self, processor: spm.SentencePieceProcessor, model_path: str = ''):
    self._sp = processor
    self.model_path = model_path
    self.vocab_size = processor.vocab_size()
    # Every id from NUM_SPECIAL up is an ordinary piece (training reserves no others).
    self.random_token_range = (NUM_SPECIAL, self.vocab_size)
    pieces = tuple(processor.id_to_piece(i) for i in range(min(NUM_SPECIAL, self.vocab_size)))
    if pieces != SPECIAL_PIECES:
      raise UserError(f'tokenizer {model_path or "(serialized)"} has special pieces {pieces}, expected '
                      f'{SPECIAL_PIECES}: train it with jaxssl (delete it and rerun) or pass another one')

  @classmethod
  def load(cls, path: str) -> 'SentencePieceTokenizer':
    """Loads a `.model` file written by `train_tokenizer` (a local path or a URL)."""
    if not storage.isfile(path):
      raise UserError(f'tokenizer model {path!r} not found: pass the path of a .model file')
    try:
      sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(path))
    except (RuntimeError, OSError) as e:
      raise UserError(f'tokenizer model {path!r} is not a sentencepiece model ({e}): delete it and retrain') from None
    return cls(sp, path)

  @classmethod
  def from_serialized(cls, data: bytes) -> 'SentencePieceTokenizer':
    """The inverse of `serialized()` (e.g. a tokenizer stored beside exported params)."""
    return cls(spm.SentencePieceProcessor(model_proto=data))

  def serialized(self) -> bytes:
    """The model file's bytes."""
    return self._sp.serialized_model_proto()

  def encode(self, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (batched in C++, multi-threaded)."""
    return self._sp.encode(list(texts), out_type=int)

  def encode_one(self, text: str) -> list[int]:
    return self._sp.encode(text, out_type=int)

  def encode_with_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, ids as `encode` gives them.

    sentencepiece reports UTF-8 byte spans of the original text; a piece's span includes the whitespace its
    leading '▁' replaced, which is trimmed here (so "▁world" maps to "world"), and a lone '▁' (before digits or
    punctuation) gets the empty span where the next token starts.
    """
    out = []
    for text, proto in zip(texts, self._sp.encode(list(texts), return_type='proto')):
      char_of = _byte_to_char(text)
      ids, spans = [], []
      for p in proto.pieces:
        start, end = (p.begin, p.end) if char_of is None else (char_of[p.begin], char_of[p.end])
        ids.append(p.id)
        spans.append(trim_span(text, start, end))
      out.append((ids, spans))
    return out

  def decode(self, ids) -> str:
    """Text of ids; control ids ([PAD], [CLS], [SEP], [MASK]) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def save(self, directory: str) -> str:
    """Writes `directory/tokenizer.model` (the model file's bytes) whole; returns its path."""
    path = storage.join(directory, self.filename)
    storage.write_bytes(path, self.serialized())
    return path

  def __repr__(self):
    return f'SentencePieceTokenizer(vocab_size={self.vocab_size}, model_path={self.model_path!r})'


Tokenizer = SentencePieceTokenizer  # the name used before WordPiece existed


def _vocab_error(e: RuntimeError, vocab_size: int) -> UserError | None:
  """sentencepiece's messages about an impossible vocab size, as one line with the fix."""
  msg = str(e)
  m = re.search(r'Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)', msg)
  if m:
    return UserError(f'tokenizer vocab_size={vocab_size} is too large for this corpus: pass '
                     f'--config.tokenizer.vocab_size=<={m.group(2)} (or use more text)')
  m = re.search(r'Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)', msg)
  if m:
    return UserError(f'tokenizer vocab_size={vocab_size} is smaller than the {m.group(2)} pieces every '
                     f'vocabulary needs here: pass --config.tokenizer.vocab_size=>{m.group(2)} '
                     '(or a lower --config.tokenizer.character_coverage)')
  return None


def train_tokenizer(sentences: Iterable[str], vocab_size: int, model_prefix_path: str, *,
                    model_type: str = 'unigram', character_coverage: float = 0.9995,
                    max_training_sentences: int = 2_000_000) -> SentencePieceTokenizer:
  """Trains a sentencepiece model on (the first `max_training_sentences` of) `sentences`.

  Writes `<model_prefix_path>.model` (and a human-readable `.vocab`) whole, locally or in a bucket.
  Deterministic: the same sentences and settings give a byte-identical model. Raises UserError for a vocab size
  the corpus cannot support, naming the largest (or smallest) one that works.
  """
  if vocab_size <= NUM_SPECIAL:
    raise UserError(f'tokenizer vocab_size={vocab_size} leaves no room beside the {NUM_SPECIAL} special tokens: '
                    'pass --config.tokenizer.vocab_size=8000 or so')
  # Taking the first N in order (no sampling, no shuffling) keeps training a function of the sentences alone.
  sentences = (s for s in itertools.islice(sentences, max_training_sentences) if s and not s.isspace())
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=writer, vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=-1, eos_id=-1,
        pad_piece='[PAD]', unk_piece='[UNK]', control_symbols=list(SPECIAL_PIECES[2:]),
        shuffle_input_sentence=False, input_sentence_size=0, num_threads=_NUM_THREADS, minloglevel=1)
  except RuntimeError as e:
    error = _vocab_error(e, vocab_size)
    if error is not None:
      raise error from None
    if 'sentences' in str(e).lower() or 'empty' in str(e).lower():
      raise UserError(f'tokenizer training failed ({str(e).splitlines()[0][:200]}): is the corpus empty?') from None
    raise
  model = writer.getvalue()
  tokenizer = SentencePieceTokenizer.from_serialized(model)
  vocab = ''.join(f'{tokenizer.id_to_piece(i)}\t{tokenizer._sp.get_score(i)}\n'  # pylint: disable=protected-access
                  for i in range(tokenizer.vocab_size))
  storage.write_bytes(model_prefix_path + '.vocab', vocab.encode('utf-8'))
  storage.write_bytes(model_prefix_path + '.model', model)  # last: its presence means the tokenizer is complete
  tokenizer.model_path = model_prefix_path + '.model'
  return tokenizer


def get_or_train_tokenizer(workdir: str, sentences_fn: Callable[[], Iterable[str]], cfg,
                           process_index: int = 0, wait_timeout_s: float = 3 * 3600) -> SentencePieceTokenizer:
  """Loads `workdir/tokenizer.model`, or trains it there from `sentences_fn()` when it does not exist yet.

  `cfg` is the `tokenizer` ConfigDict (vocab_size, model_type, character_coverage, max_training_sentences).
  Only process 0 trains. Other processes wait (polling, up to `wait_timeout_s`) until process 0's file
  appears in the shared workdir (a shared folder or a bucket) and load it; the model is written whole (renamed
  into place, or one object upload), so they never read a partial file. A barrier after this call (all
  processes) is still the caller's job.
  Raises UserError when the stored tokenizer's vocab size differs from cfg.vocab_size.
  """
  path = storage.join(workdir, MODEL_FILENAME)
  if not storage.isfile(path):
    if process_index == 0:
      return train_tokenizer(sentences_fn(), cfg.vocab_size, storage.join(workdir, 'tokenizer'),
                             model_type=cfg.model_type, character_coverage=cfg.character_coverage,
                             max_training_sentences=cfg.max_training_sentences)
    deadline = time.monotonic() + wait_timeout_s
    while not storage.isfile(path):
      if time.monotonic() > deadline:
        raise RuntimeError(f'process {process_index} waited {wait_timeout_s:.0f} s for process 0 to write {path}: '
                           'is the workdir a bucket or a folder every host shares, and did process 0 '
                           'fail?')
      time.sleep(1.0)
  tokenizer = SentencePieceTokenizer.load(path)
  if tokenizer.vocab_size != cfg.vocab_size:
    raise UserError(f'workdir {workdir} holds a tokenizer with vocab {tokenizer.vocab_size} but config asks '
                    f'{cfg.vocab_size}: use a new --workdir or --config.tokenizer.vocab_size={tokenizer.vocab_size}')
  return tokenizer


def load_tokenizer(path: str) -> TextTokenizer:
  """Opens the tokenizer at `path`, a file or a directory holding one of (looked for in this order):
  tokenizer.model (jaxssl sentencepiece), tokenizer.json (HuggingFace: WordPiece for BERT checkpoints, or any MLM
  encoder's (RoBERTa's BPE, XLM-R's Unigram: wordpiece.has_encoder_roles): BERT roles; BPE for GPT-2/Llama-family
  decoders), vocab.txt (BERT WordPiece) or vocab.json + merges.txt (GPT-2 BPE).
  A directory's tokenizer.model that is not jaxssl's (Llama 2 ships one beside its tokenizer.json) yields to
  the tokenizer.json. Raises UserError naming what was looked for when there is none."""
  # HuggingFace tokenizers loads only when a file needs it (sentencepiece-only jobs never import it).
  from jaxssl.data import hf_tokenizer, wordpiece  # noqa: PLC0415
  names = (MODEL_FILENAME, JSON_FILENAME, wordpiece.VOCAB_FILENAME, hf_tokenizer.VOCAB_JSON)
  if storage.isdir(path):
    found = [n for n in names if storage.isfile(storage.join(path, n))]
    if not found:
      raise UserError(f'no tokenizer in {path}: looked for {", ".join(names)} (+ {hf_tokenizer.MERGES_TXT})')
    if found[0] == MODEL_FILENAME and len(found) > 1:
      try:
        return load_tokenizer(storage.join(path, MODEL_FILENAME))
      except UserError:
        return load_tokenizer(storage.join(path, found[1]))
    return load_tokenizer(storage.join(path, found[0]))
  if not storage.isfile(path):
    raise UserError(f'tokenizer {path!r} not found: pass a directory holding one of {", ".join(names)}, '
                    'or one of those files')
  if storage.basename(path) == hf_tokenizer.VOCAB_JSON:
    merges = storage.join(storage.parent(path), hf_tokenizer.MERGES_TXT)
    if not storage.isfile(merges):
      raise UserError(f'{path} has no {hf_tokenizer.MERGES_TXT} beside it: a GPT-2 BPE tokenizer needs both')
    return hf_tokenizer.HFTokenizer.from_vocab_merges(path, merges)
  if path.endswith('.json'):
    # Encoders' tokenizers (BERT WordPiece; RoBERTa / XLM-R: <s> </s> <mask>, or a config naming a mask) get BERT roles.
    tok = hf_tokenizer.read_tokenizer_json(path)  # read once: Gemma 3's takes a second
    if wordpiece.has_encoder_roles(tok, storage.parent(path)):
      return wordpiece.WordPieceTokenizer.from_file(path, tok)
    return hf_tokenizer.HFTokenizer.from_file(path, tok)
  if path.endswith('.txt'):
    return wordpiece.WordPieceTokenizer.from_vocab(path)
  return SentencePieceTokenizer.load(path)


def __getattr__(name):
  # `tokenizers.WordPieceTokenizer` without importing HuggingFace tokenizers in every job.
  if name == 'WordPieceTokenizer':
    from jaxssl.data import wordpiece  # noqa: PLC0415 (lazy, as above)
    return wordpiece.WordPieceTokenizer
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

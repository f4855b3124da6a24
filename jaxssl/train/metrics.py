"""Where training figures go: metrics.jsonl, TensorBoard events, and a progress line. Process 0 writes."""
import json
import math
import os
import sys
import time

import jax

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
  """Appends one JSON object per logged step to `metrics.jsonl` and the same scalars to TensorBoard."""

  def __init__(self, workdir: str, *, resume_step: int = 0, total_steps: int = 0):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self.tty = sys.stderr.isatty()
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not self.enabled:
      return
    _drop_after(self.path, resume_step)  # entries past the restored step are replayed by this run
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict, prefix: str = '') -> None:
    if not self.enabled:
      return
    record = {'step': step, **{prefix + k: _plain(v) for k, v in metrics.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    for k, v in record.items():
      if k != 'step' and isinstance(v, (int, float)):
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def drop(self, step: int, prefix: str) -> None:
    """Removes the rows of `step` whose figures all start with `prefix` (an evaluation about to be rerun)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records
            if r.get('step') != step or not all(k.startswith(prefix) for k in r if k != 'step')]
    if len(kept) < len(records):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, self.path)

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
      self.tb.close()
    if self.enabled and self.tty:
      sys.stderr.write('\n')


def _drop_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [line for line in f if line.strip() and json.loads(line).get('step', 0) <= step]
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(lines)
  os.replace(tmp, path)


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

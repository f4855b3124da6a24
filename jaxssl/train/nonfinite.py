"""NaN/Inf guards shared by the pretraining and fine-tuning loops: every step's loss (read one step late, so the
device queue never stalls) and, before a checkpoint is saved, the state it would hold.

A non-finite step is recorded in metrics.jsonl (`{"step": s, "nonfinite": what, "action": ...}`) before the run
stops or goes on, so the record of a failed run names the step that broke it.
"""
import math

import jax

from jaxssl.errors import JobFailed, UserError


class FiniteLossCheck:
  """Stops the run (JobFailed naming the step) when the loss is NaN/Inf; with nonfinite='skip' the optimizer
  has dropped that update instead, and only `max_skipped` such steps in a row stop the run."""

  def __init__(self, mode: str, max_skipped: int, checkpointer, writer):
    if mode not in ('stop', 'skip'):
      raise UserError(f"train.nonfinite={mode!r}: use 'stop' or 'skip'")
    self.mode, self.max_skipped, self.checkpointer, self.writer = mode, max_skipped, checkpointer, writer
    self.skipped_in_a_row, self.checked = 0, 0

  def _newest_checkpoint(self) -> str:
    step = self.checkpointer.latest_step()
    return f'the newest checkpoint is step {step}' if step is not None else 'no checkpoint was saved'

  def check(self, step: int, metrics) -> None:
    if step <= self.checked:
      return
    self.checked = step
    loss = float(jax.device_get(metrics['loss']))
    if math.isfinite(loss):
      self.skipped_in_a_row = 0
      return
    kept = self._newest_checkpoint()
    if self.mode == 'skip':
      self.skipped_in_a_row += 1
      going_on = self.skipped_in_a_row <= self.max_skipped
      self._record(step, 'loss', loss, 'update skipped' if going_on else 'stopped')
      self.writer.log(f'step {step}: loss is {loss}; update skipped ({self.skipped_in_a_row} in a row)')
      if going_on:
        return
      raise JobFailed(f'the loss was non-finite for {self.skipped_in_a_row} steps in a row up to step {step}; '
                      f'{kept} (never a NaN one): lower train.learning_rate or check the data')
    self._record(step, 'loss', loss, 'stopped')
    raise JobFailed(f'the loss is {loss} at step {step}; stopped without saving it ({kept}): lower '
                    'train.learning_rate, or pass --config.train.nonfinite=skip to drop such updates')

  def _record(self, step: int, what: str, value: float, action: str) -> None:
    """The bad step into metrics.jsonl (written at once: the run may stop right after)."""
    # The value as text: strict JSON readers have no NaN, and TensorBoard gets no scalar for it.
    self.writer.write(step, {'nonfinite': what, 'value': str(value), 'action': action})
    self.writer.flush()

  def checkpoint_ok(self, step: int, next_loss, finite) -> bool:
    """Whether the state after update `step` may be saved: its params and moments finite, and the loss the next
    step computes from it finite. If not: 'stop' raises JobFailed naming the step; 'skip' logs it and returns
    False (the loop tries again after the next step, whose update may be dropped)."""
    next_loss, finite = float(jax.device_get(next_loss)), bool(jax.device_get(finite))
    if finite and math.isfinite(next_loss):
      return True
    what = ('non-finite params or optimizer moments' if not finite else
            f'a non-finite loss ({next_loss}) at step {step + 1}')
    self._record(step, 'state' if not finite else 'next_loss', next_loss,
                 'not saved' if self.mode == 'skip' else 'stopped')
    if self.mode == 'skip':
      self.writer.log(f'step {step}: not saved: the state after its update gives {what}; trying after the next step')
      return False
    kept = self._newest_checkpoint()
    raise JobFailed(f'the update of step {step} gives {what}; stopped without saving it ({kept}): lower '
                    'train.learning_rate, or pass --config.train.nonfinite=skip to drop such updates')

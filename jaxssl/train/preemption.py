"""Preemption: SIGTERM (a preempted TPU VM's or SLURM job's notice) → save at a step every process agrees on → exit 0.

With several processes JAX's preemption service does the agreeing: it catches SIGTERM on whichever host gets it,
tells the others, and `reached_preemption_sync_point(step)` turns True on every process at the same step. A
single process catches SIGTERM itself and stops after the step in flight.
"""
import signal

import jax
from jax.experimental import multihost_utils


class PreemptionWatch:
  """`stop_at(step)` is True, on every process at the same step, once a SIGTERM has arrived anywhere."""

  def __init__(self):
    self.received = False
    self._previous = None
    # The JAX preemption service (started by jax.distributed.initialize) owns SIGTERM in a multi-process job.
    self.distributed = jax.process_count() > 1
    if not self.distributed:
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self.received = True

  def stop_at(self, step: int) -> bool:
    """Call after every train step, on every process, with the number of steps done."""
    if self.distributed:
      self.received = multihost_utils.reached_preemption_sync_point(step)
    return self.received

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

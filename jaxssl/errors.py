"""The exceptions a job ends with in one line (a user's mistake: exit 2; a failed run: exit 1), and how."""
import atexit
import errno
import gc
import logging
import signal
import sys


class UserError(Exception):
  """A mistake in the user's input (config, corpus, workdir): the message says what and how to fix it."""


class JobFailed(Exception):
  """A run that cannot go on (e.g. the loss became NaN): the message names the step and what was kept."""


class Preempted(BaseException):
  """SIGTERM while a training job was still starting (before its first step): there is nothing new to save.
  A BaseException, like KeyboardInterrupt, so that no `except Exception` on the way swallows it."""


def stop_on_sigterm_while_starting() -> None:
  """Makes SIGTERM end a starting training job at once with exit status 0 (`Preempted`), instead of killing it
  (143). The training loop then installs its own handler (jaxssl/train/preemption.py): from there on a SIGTERM
  saves a checkpoint after the step in flight. Every write on the way is atomic, so stopping anywhere is safe."""
  def on_sigterm(signum, frame):
    del signum, frame
    raise Preempted()
  signal.signal(signal.SIGTERM, on_sigterm)


def exit_on_user_error(main):
  """Runs `main()`; a UserError ends the process with one clear line on stderr and exit status 2, a JobFailed
  with one line and exit status 1."""
  try:
    return main()
  except Preempted:
    print('preempted (SIGTERM) while starting, before the first step: nothing new to save; rerun the same command '
          'to resume', flush=True)
    sys.exit(0)
  except UserError as e:
    _say_last(f'error: {e}')
    sys.exit(2)
  except JobFailed as e:
    _say_last(f'failed: {e}')
    sys.exit(1)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    # A full disk while writing logs, metrics or the tokenizer: checkpoints are written apart (and said so there).
    _say_last(f'failed: no space left on device writing {e.filename or "a file"}: free space there and rerun the '
              'same command (it resumes from the newest checkpoint)')
    sys.exit(1)


def _say_last(line: str) -> None:
  """Prints `line` on stderr when the process ends, after the library threads still running have finished (a
  failed checkpoint write's or restore's threads log their own errors as they end): the job's last line is its
  own. What Python would still print while tearing down (a failed future collected late: seen once in CI after
  a restore that failed) goes nowhere; the exit status and the line are decided by then."""
  def say():
    gc.collect()  # asyncio reports the failed futures nobody read when they are collected: before the line
    print(line, file=sys.stderr, flush=True)
    logging.disable(logging.CRITICAL)
    sys.stderr = None  # print() and Python's own reports then write nothing (as under pythonw)
  atexit.register(say)

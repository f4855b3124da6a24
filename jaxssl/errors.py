"""The exceptions a job ends with in one line (a user's mistake: exit 2; a failed run: exit 1), and how."""
import sys


class UserError(Exception):
  """A mistake in the user's input (config, corpus, workdir): the message says what and how to fix it."""


class JobFailed(Exception):
  """A run that cannot go on (e.g. the loss became NaN): the message names the step and what was kept."""


def exit_on_user_error(main):
  """Runs `main()`; a UserError ends the process with one clear line on stderr and exit status 2, a JobFailed
  with one line and exit status 1."""
  try:
    return main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except JobFailed as e:
    print(f'failed: {e}', file=sys.stderr)
    sys.exit(1)

"""The one exception type for mistakes a user can fix, and how jobs report it."""
import sys


class UserError(Exception):
  """A mistake in the user's input (config, corpus, workdir): the message says what and how to fix it."""


def exit_on_user_error(main):
  """Runs `main()`; a UserError ends the process with one clear line on stderr and exit status 2."""
  try:
    return main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)

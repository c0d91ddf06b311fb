"""The one exception type for mistakes a user can fix: bad input, bad config, a missing file.

The CLI prints its message as one line on stderr and exits non-zero, with no traceback. Anything else
that escapes is a bug in orpo and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, config or environment, worded so they can fix it."""

    exit_code = 2
    printed = False  # a multi-process run printed the line already, as soon as it was known (train/failures.py)

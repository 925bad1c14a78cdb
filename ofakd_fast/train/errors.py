"""The project's own error types, and how the command-line tools report them.

A :class:`UsageError` (a bad flag or preset value), :class:`DataError` (a dataset that is
missing or unreadable), :class:`CheckpointError` (a weight file that is missing, unreadable or
does not fit) or :class:`DivergedError` (the training diverged) is the user's to fix: the CLIs print its one-line message and exit with status 2.
Any other exception is a bug or an environment problem and keeps its traceback.
"""
import functools
import sys


class UsageError(ValueError):
    """A bad flag or preset value; the message says which, what was wrong and what was expected."""


class DataError(ValueError):
    """A dataset that is missing, malformed or unreadable; the message names the file or folder."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or whose weights do not fit the model."""


class DivergedError(FloatingPointError):
    """A non-finite loss or parameter: the run stops before any checkpoint is written from it."""


USER_ERRORS = (UsageError, DataError, CheckpointError, DivergedError)


def exit_on_user_error(prog: str):
    """Decorates a CLI's main(): the project's own errors become ``prog: error: message`` and exit 2."""
    def decorate(main):
        @functools.wraps(main)
        def wrapper(*args, **kwargs):
            try:
                return main(*args, **kwargs)
            except USER_ERRORS as error:
                print(f"{prog}: error: {error}", file=sys.stderr)
                sys.exit(2)
        return wrapper
    return decorate

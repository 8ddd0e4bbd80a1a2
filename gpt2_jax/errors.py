"""The base of every error a user can act on (a leaf module: it imports nothing).

Each module keeps its own error class (``ConfigError``, ``DataError``, ``CheckpointError``,
...) deriving from ``UserError``; the CLI catches this one class and prints its message as
one line with exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a config key, a flag, a file, a checkpoint, the data."""

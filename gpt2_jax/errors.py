"""The base of every error a user can act on (a leaf module: it imports nothing).

Each module keeps its own error class (``ConfigError``, ``DataError``, ``CheckpointError``,
...) deriving from ``UserError``; the CLI catches this one class and prints its message as
one line with exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a config key, a flag, a file, a checkpoint, the data."""


class ConfigError(UserError, ValueError):
    """A config key with a bad or contradictory value (the message names the key).

    Defined here, not in config.py, so that modules below the config (sharding, preflight)
    can raise it without importing the config module.
    """


def signal_exit_code(signum: int) -> int:
    """A process's exit code after it stopped on a signal: 128 + the signal number (the
    shell's convention). ``train`` exits so after saving on SIGTERM (143) or Ctrl-C (130),
    and ``launch`` reads 143 as "preempted and saved"."""
    return 128 + int(signum)


def require(ok: bool, key: str, message: str) -> None:
    """Raises ``ConfigError("key: message")`` unless ``ok``: the one check of a config value
    (each typed section validates its keys with it, beside its definition)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")

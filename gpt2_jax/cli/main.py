"""The ``gpt2-jax`` command: picks the command, sets up the process once, runs it, and turns
a user's error into one line with exit code 2.

Each command lives in its own module (``cli/train.py``, ``cli/eval.py``, ...): it parses
nothing, calls the library, and prints. ``configure_process`` below is the one place in
gpt2_jax that changes process-wide state; the library itself never does.
"""

from __future__ import annotations

import sys

from gpt2_jax.cli import args as args_lib
from gpt2_jax.errors import UserError


def configure_process(command: str) -> None:
    """What a ``gpt2-jax`` command sets for its whole process, once, before XLA starts:

    - glibc malloc tuned for XLA:CPU's per-step temporaries (``core/allocator.py``: one
      arena, no mmap, freed memory kept), unless the user chose otherwise;
    - ``lm-eval``: the ``forkserver`` start method, so lm-eval's bootstrap pool starts from
      a fresh server process, never a fork of XLA's threads.
    """
    from gpt2_jax.core import allocator

    allocator.tune()  # before XLA starts its threads
    if command == "lm-eval":
        import multiprocessing

        multiprocessing.set_start_method("forkserver", force=True)


def _drop_abandoned_reads(previous):
    """After a failed restore, Orbax's other array reads are abandoned coroutines that
    Python reports at exit ("Exception ignored in ...", a page of TensorStore spec) after
    the one-line error: the command drops those reports, keeps any other."""

    def hook(unraisable):
        if "_read_array_index" not in repr(unraisable.object):
            previous(unraisable)

    return hook


def _handler(command: str):
    if command == "train":
        from gpt2_jax.cli.train import cmd_train as handler
    elif command == "eval":
        from gpt2_jax.cli.eval import cmd_eval as handler
    elif command == "generate":
        from gpt2_jax.cli.generate import cmd_generate as handler
    elif command == "export":
        from gpt2_jax.cli.export import cmd_export as handler
    elif command == "lm-eval":
        from gpt2_jax.cli.lm_eval import cmd_lm_eval as handler
    else:
        from gpt2_jax.cli.plot import cmd_plot as handler
    return handler


def entry() -> int:
    """The ``gpt2-jax`` console script and ``python -m gpt2_jax``."""
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(args_lib.help_text())
        return 0
    if not argv or argv[0] not in args_lib.COMMANDS:
        print(args_lib.help_text(), file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        commands = ", ".join(args_lib.COMMANDS)
        print(f"gpt2-jax: error: {what} (commands: {commands})", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    configure_process(command)
    from gpt2_jax.config import base as config_lib

    try:
        if command == "launch":  # what follows '--' is a whole command line of its own
            from gpt2_jax.cli.launch import cmd_launch

            return cmd_launch(rest)
        rest, overrides = config_lib.split_override_args(rest)
        args = args_lib.parse_args(command, rest)
        return _handler(command)(args, overrides)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # one line, no traceback; anything else is a bug and shows it
        print(f"gpt2-jax {command}: error: {e}", file=sys.stderr)
        sys.unraisablehook = _drop_abandoned_reads(sys.unraisablehook)
        _exit_now_if_multiprocess(2)
        return 2


def _exit_now_if_multiprocess(code: int) -> None:
    """With several processes, a failed one leaves at once: jax.distributed's shutdown
    at exit would wait for peers that may be waiting for it, and the launcher (or the
    cluster) must see the failure to stop the others."""
    jax = sys.modules.get("jax")
    if jax is not None and jax.process_count() > 1:
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(entry())

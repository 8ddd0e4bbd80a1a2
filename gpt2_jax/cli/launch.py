"""``gpt2-jax launch``: one command as N local processes on jax.distributed."""

from __future__ import annotations

from gpt2_jax.cli.args import UsageError


def cmd_launch(argv: list[str]) -> int:
    """N local processes of the gpt2-jax command after ``--`` (see gpt2_jax/launch.py)."""
    from gpt2_jax.parallel import launch

    try:
        return launch.launch(argv)
    except launch.LaunchError as e:
        raise UsageError(str(e)) from None

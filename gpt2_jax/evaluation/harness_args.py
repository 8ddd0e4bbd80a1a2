"""What the harness's model takes, importable without lm-eval (the ``[eval]`` extra): the
one list of its model arguments (the CLI's ``--model_args`` help reads it), its error
type, and the parsing of ``--seed`` and ``step=``."""

from __future__ import annotations

from gpt2_jax.errors import UserError

# The model arguments `model_args="k=v,..."` may set (anything else is an error naming it).
MODEL_ARGS = (
    "init_from", "adapter", "workdir", "step", "batch_size", "dtype", "max_gen_toks", "seed",
)  # fmt: skip
MAX_GEN_TOKS = 256  # lm-eval's default for generate_until (the hf backend's max_gen_toks)
DEFAULT_SEEDS = (0, 1234, 1234, 1234)  # lm-eval's: python, numpy, torch, few-shot


class HarnessError(UserError, ValueError):
    """A harness request or argument the user can fix (reported as one line by the CLI)."""


def check_model_args(args: dict, flag: str = "model_args") -> None:
    """Raises a HarnessError naming the first key of ``args`` not in ``MODEL_ARGS``."""
    unknown = [k for k in args if k not in MODEL_ARGS]
    if unknown:
        raise HarnessError(
            f"{flag}: unknown key {unknown[0]!r} (gpt2_jax takes {', '.join(MODEL_ARGS)})"
        )


def parse_seed(text: str | None) -> tuple[int | None, ...]:
    """lm-eval's ``--seed``: one integer for all four seeds, or four comma-separated
    values (python, numpy, torch, few-shot), ``None`` leaving one unset."""
    if text is None or str(text).strip() == "":
        return DEFAULT_SEEDS
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) == 1:
        parts *= 4
    if len(parts) != 4:
        raise HarnessError(f"--seed={text}: give one integer or four comma-separated values")
    try:
        return tuple(None if p == "None" else int(p) for p in parts)
    except ValueError:
        raise HarnessError(f"--seed={text}: not integers (or None)") from None


def parse_step_arg(step):
    """``step=`` of the model arguments: None, a step number, ``best`` or ``latest``."""
    from gpt2_jax.weights import resolve as weights

    if step is None or isinstance(step, int):
        return step
    try:
        return weights.parse_step(str(step))
    except ValueError:
        raise HarnessError(f"step={step!r} is not a step number, 'best' or 'latest'") from None

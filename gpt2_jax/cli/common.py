"""What several commands share: the config of --config or --workdir, and the weights
of the command's plan."""

from __future__ import annotations

import sys


def load_config(args, overrides):
    """The config from --config, else the one saved in --workdir; overrides applied."""
    from gpt2_jax.config import base as config_lib

    return config_lib.for_command(args.config, args.workdir, overrides)


def with_adapter(args, overrides: dict) -> dict:
    """``overrides`` with ``--adapter=DIR`` as ``lora.init_from`` (a PEFT adapter merged
    into the ``init_from`` weights). A UsageError with ``--workdir`` alone: a run's
    checkpoint is its own weights (a LoRA run's adapters are merged already)."""
    from gpt2_jax.cli.args import UsageError

    if not getattr(args, "adapter", ""):
        return overrides
    if args.workdir and not getattr(args, "init_from", ""):
        raise UsageError(
            "--adapter merges a PEFT adapter into --init_from weights (eval: "
            "--config.init_from), not into a --workdir run's checkpoint"
        )
    return {**overrides, "lora.init_from": args.adapter}


def model_and_params(cfg, args, announce: bool = True):
    """(model config, params, source) of the command's plan (``plan.weights_only``: the one
    resolver, weights.py); says where from on stderr unless ``announce=False`` (the caller
    then says it after its own checks)."""
    import jax

    from gpt2_jax.config import plan as plan_lib
    from gpt2_jax.weights import resolve as weights

    workdir = None if getattr(args, "init_from", "") else args.workdir
    plan = plan_lib.weights_only(cfg, workdir, args.step, jax.device_count())
    params = weights.params_of(plan.source)
    if announce:
        print(f"loaded {plan.source.describe()}", file=sys.stderr)
    return plan.model, params, plan.source

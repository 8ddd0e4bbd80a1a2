"""``gpt2-jax export``: a run's checkpoint as a Hugging Face GPT-2 directory."""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.cli.args import UsageError
from gpt2_jax.cli.common import load_config, model_and_params


def cmd_export(args, overrides) -> int:
    from gpt2_jax.weights import hf

    if not args.workdir:
        raise UsageError("--workdir=DIR is required")
    out = Path(args.out)
    # Checked before loading anything; hf.save_pretrained checks again (its FileExistsError
    # is not a user error, so it would print a traceback) and writes atomically.
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={args.out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(
            f"--out={args.out} exists and is not empty; pass --overwrite to replace it"
        )
    cfg = load_config(args, overrides)
    model_cfg, params, _ = model_and_params(cfg, args)
    hf.save_pretrained(model_cfg, params, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0

"""``gpt2-jax export``: a run's checkpoint as a Hugging Face GPT-2 directory; a LoRA run's
as a PEFT adapter directory, or with ``--merge`` as a Hugging Face GPT-2 with the adapters
merged in."""

from __future__ import annotations

import sys
from pathlib import Path

from gpt2_jax.cli.args import UsageError
from gpt2_jax.cli.common import load_config


def cmd_export(args, overrides) -> int:
    import jax

    from gpt2_jax.config import plan as plan_lib
    from gpt2_jax.weights import hf, lora_base, peft
    from gpt2_jax.weights import resolve as weights

    if not args.workdir:
        raise UsageError("--workdir=DIR is required")
    out = Path(args.out)
    # Checked before loading anything; the writers check again (their FileExistsError
    # is not a user error, so it would print a traceback) and write atomically.
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out={args.out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(
            f"--out={args.out} exists and is not empty; pass --overwrite to replace it"
        )
    cfg = load_config(args, overrides)
    plan = plan_lib.weights_only(cfg, args.workdir, args.step, jax.device_count())
    source = plan.source
    if args.merge and source.lora is None:
        raise UsageError(
            f"--merge: {source.describe()} is not a LoRA run (every weight trained, nothing "
            f"to merge); export it without --merge"
        )
    print(f"loaded {source.describe()}", file=sys.stderr)
    if source.lora is not None and not args.merge:  # the adapters alone, as PEFT saves them
        base = (source.base_record or {}).get("init_from") or f"hf:{source.base.path}"
        peft.write_adapter(
            args.out, source.lora, weights.adapters_of(source), lora_base.base_name(base),
            source.model_cfg, overwrite=args.overwrite,
        )  # fmt: skip
        print(f"wrote {args.out} (a PEFT adapter directory for {base})")
        return 0
    params = weights.params_of(source)  # a LoRA run's: the adapters merged into the base
    hf.save_pretrained(plan.model, params, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0

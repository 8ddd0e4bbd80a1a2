"""``gpt2-jax lm-eval``: lm-evaluation-harness tasks on a checkpoint or hf: weights."""

from __future__ import annotations

import sys

from gpt2_jax.cli.args import UsageError


def cmd_lm_eval(args, overrides) -> int:
    """lm-evaluation-harness tasks on a run's checkpoint or Hugging Face weights."""
    from gpt2_jax.config import base as config_lib
    from gpt2_jax.parallel import sharding

    try:
        from gpt2_jax.evaluation import harness
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise UsageError(
            "lm-eval needs EleutherAI's lm-evaluation-harness: pip install 'gpt2_jax[eval]'"
        ) from None
    bad = [k for k in overrides if not k.startswith("distributed.")]
    if bad:
        raise UsageError(
            f"lm-eval takes no --config.{bad[0]} (only --config.distributed.*; model settings "
            f"go in --model_args)"
        )
    cfg = config_lib.for_weights(None, "", overrides)  # the defaults + distributed.* flags
    sharding.maybe_initialize_distributed(cfg.distributed)  # under launch, or a cluster
    results, path, written = harness.evaluate_command(
        tasks=args.tasks,
        workdir=args.workdir,
        step=args.step,
        init_from=args.init_from,
        adapter=args.adapter,
        model_args=args.model_args,
        batch_size=args.batch_size,
        num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        include_path=args.include_path,
        output_path=args.output_path,
        log_samples=args.log_samples,
        seed=args.seed,
        gen_kwargs=args.gen_kwargs,
        progress=args.progress,
    )
    import jax

    if jax.process_index() != 0:
        return 0
    print(harness.table(results))
    for p in written:
        print(f"wrote {p}", file=sys.stderr)
    if path is None:
        print("(results not saved: pass --output_path=FILE.json to keep them)", file=sys.stderr)
    return 0

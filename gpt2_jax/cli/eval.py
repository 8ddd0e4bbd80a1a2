"""``gpt2-jax eval``: loss and perplexity of a checkpoint or of hf: weights."""

from __future__ import annotations

import json
import sys

from gpt2_jax.cli.common import load_config, with_adapter


def cmd_eval(args, overrides) -> int:
    from gpt2_jax.evaluation import perplexity as evaluate
    from gpt2_jax.train import summary

    cfg = load_config(args, with_adapter(args, overrides))
    results = evaluate.run_command(cfg, args.workdir, args.step, progress=cfg.train.progress)
    for r in results:
        print(json.dumps(r))

    sys.stdout.flush()  # the table follows the JSON lines on a terminal showing both
    print(summary.eval_table(results), file=sys.stderr)
    return 0

"""``gpt2-jax train``: train from a config, or resume the run in --workdir."""

from __future__ import annotations

import json
from pathlib import Path

from gpt2_jax.cli.args import UsageError
from gpt2_jax.cli.common import load_config
from gpt2_jax.core import workdir as wd


def cmd_train(args, overrides) -> int:
    from gpt2_jax.train import loop as train_lib

    if not args.workdir:
        raise UsageError("--workdir=DIR is required")
    if not args.config and not (Path(args.workdir) / wd.CONFIG).is_file():
        raise UsageError("--config=configs/NAME.py is required for a new workdir")
    cfg = load_config(args, overrides)
    try:
        results = train_lib.train(cfg, args.workdir)
    except train_lib.Preempted as e:  # saved; 143 for SIGTERM, 130 for Ctrl-C
        return e.exit_code
    for r in results.values():
        print(json.dumps(r))
    return 0

"""``gpt2-jax train | eval | generate | export | plot``: parses flags, calls the library.

gpt2-jax train    --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
gpt2-jax eval     --workdir=DIR [--config.KEY=VALUE ...]
gpt2-jax eval     --config=configs/NAME.py --config.init_from=hf:PATH_OR_HUB_ID
gpt2-jax generate --workdir=DIR | --init_from=hf:PATH_OR_HUB_ID --prompt=TEXT [...]
gpt2-jax export   --workdir=DIR --out=HF_DIR
gpt2-jax plot     WORKDIR [WORKDIR ...] [--out=FILE.png]   # default: WORKDIR/curves.png
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

COMMANDS = ("train", "eval", "generate", "export", "plot")


class UsageError(ValueError):
    """A missing or contradictory command-line flag (reported as one line, exit code 2)."""


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"gpt2-jax {command}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "plot":
        p.add_argument("workdirs", nargs="*", metavar="WORKDIR", help="run directories")
        p.add_argument("--workdir", action="append", default=[], help="run directory (repeatable)")
        p.add_argument("--out", help="PNG path (default WORKDIR/curves.png; ./curves.png for 2+)")
        p.add_argument("--smoothing", type=float, default=0.6, help="train-loss EMA, in [0, 1)")
        return p
    p.add_argument("--config", help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", help="run directory (checkpoints, metrics, config.json)")
    if command == "generate":
        p.add_argument("--init_from", default="", help="hf:<dir or hub id>")
        p.add_argument("--prompt", default="\n")
        p.add_argument("--max_new_tokens", type=int, default=100)
        p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        p.add_argument("--top_k", type=int, default=200, help="0 = off")
        p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
        p.add_argument("--seed", type=int, default=0)
    if command == "export":
        p.add_argument("--out", required=True, help="output Hugging Face directory")
        p.add_argument("--overwrite", action="store_true")
    return p


def _load_config(args, overrides):
    """The config from --config, else the one saved in --workdir; overrides applied."""
    from gpt2_jax import config as config_lib

    if args.config:
        cfg = config_lib.load_config_file(args.config)
    elif args.workdir and (Path(args.workdir) / "config.json").is_file():
        cfg = config_lib.from_json((Path(args.workdir) / "config.json").read_text())
    elif args.workdir:
        raise config_lib.ConfigError(
            f"--workdir={args.workdir} has no config.json (is it a gpt2-jax run directory?); "
            f"pass --config=configs/NAME.py too"
        )
    else:
        raise config_lib.ConfigError("give --config=configs/NAME.py or --workdir=DIR")
    config_lib.apply_overrides(cfg, overrides)
    return cfg


_NO_CHECKPOINT = (
    "{ckpt_dir} has no checkpoint yet (train first). To use the run's init_from weights, "
    "pass --config=configs/NAME.py --config.init_from=hf:<dir or hub id> without --workdir"
)


def _model_and_params(cfg, workdir: str | None):
    """(model config, params): the workdir's latest checkpoint, else ``init_from`` weights."""
    import jax

    from gpt2_jax import checkpoint as ckpt_lib
    from gpt2_jax import config as config_lib
    from gpt2_jax import model as model_lib

    ckpt_dir = Path(workdir) / "checkpoints" if workdir else None
    if ckpt_dir is not None:
        # --workdir means that run's weights: falling back to its init_from would silently
        # evaluate / export / sample the starting point instead of the trained model.
        if not ckpt_dir.is_dir():
            raise ckpt_lib.CheckpointError(_NO_CHECKPOINT.format(ckpt_dir=ckpt_dir))
        with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
            step = ckpt.latest_step()
            if step is None:
                raise ckpt_lib.CheckpointError(_NO_CHECKPOINT.format(ckpt_dir=ckpt_dir))
            saved = config_lib.from_json(ckpt.restore_config(step))
            with cfg.unlocked():
                # The weights decide the shape; only how to compute may be overridden.
                for k in ("size", "scan_layers", *config_lib.SHAPE_KEYS):
                    if k in saved.model:  # older runs may lack the newer keys
                        cfg.model[k] = saved.model[k]
            model_cfg = config_lib.model_config(cfg)
            abstract = jax.eval_shape(
                functools.partial(model_lib.init_params, model_cfg), jax.random.PRNGKey(0)
            )
            state = ckpt.restore(step, {"params": abstract}, partial=True)
        print(f"loaded {ckpt_dir / str(step)}", file=sys.stderr)
        return model_cfg, state["params"]
    if cfg.init_from:
        from gpt2_jax import hf

        if not cfg.init_from.startswith("hf:") or len(cfg.init_from) <= 3:
            raise config_lib.ConfigError(
                f"init_from: {cfg.init_from!r} must be 'hf:<dir or hub id>'"
            )
        model_cfg, params = hf.load_pretrained(cfg.init_from[3:], **config_lib.runtime_fields(cfg))
        return model_cfg, params
    raise ckpt_lib.CheckpointError(
        "no weights to use: no --workdir given and init_from is empty "
        "(give --workdir=DIR or --config.init_from=hf:<dir or hub id>)"
    )


def cmd_train(args, overrides) -> int:
    from gpt2_jax import train as train_lib

    if not args.workdir:
        raise UsageError("--workdir=DIR is required")
    if not args.config and not (Path(args.workdir) / "config.json").is_file():
        raise UsageError("--config=configs/NAME.py is required for a new workdir")
    cfg = _load_config(args, overrides)
    try:
        results = train_lib.train(cfg, args.workdir)
    except train_lib.Preempted:
        return 143
    for r in results.values():
        print(json.dumps(r))
    return 0


def cmd_eval(args, overrides) -> int:
    import jax

    from gpt2_jax import config as config_lib
    from gpt2_jax import data as data_lib
    from gpt2_jax import sharding
    from gpt2_jax import train as train_lib

    cfg = _load_config(args, overrides)
    model_cfg, params = _model_and_params(cfg, args.workdir)
    config_lib.set_model_shape(cfg, model_cfg)
    config_lib.validate(cfg, jax.device_count())
    splits = data_lib.load_splits(cfg.data, tuple(cfg.eval.splits))
    mesh = sharding.make_mesh(cfg.mesh)
    results = train_lib.evaluate_splits(
        cfg, model_cfg, params, splits, mesh, progress=cfg.train.progress
    )
    for r in results:
        print(json.dumps(r))
    from gpt2_jax import summary

    sys.stdout.flush()  # the table follows the JSON lines on a terminal showing both
    print(summary.eval_table(results), file=sys.stderr)
    return 0


def cmd_generate(args, overrides) -> int:
    from gpt2_jax import config as config_lib
    from gpt2_jax import generate as gen_lib
    from gpt2_jax import tokenizer

    if not (args.workdir or args.init_from or args.config):
        raise UsageError("give --workdir=DIR (a trained run) or --init_from=hf:<dir or hub id>")
    if args.init_from and not args.init_from.startswith("hf:"):
        raise UsageError(f"--init_from={args.init_from!r} must be hf:<dir or hub id>")
    for ok, flag in (
        (args.prompt != "", "--prompt: must not be empty"),
        (args.max_new_tokens >= 0, f"--max_new_tokens={args.max_new_tokens}: must be >= 0"),
        (args.temperature >= 0, f"--temperature={args.temperature}: must be >= 0 (0 = greedy)"),
        (args.top_k >= 0, f"--top_k={args.top_k}: must be >= 0 (0 = off)"),
        (0 < args.top_p <= 1, f"--top_p={args.top_p}: must be in (0, 1] (1 = off)"),
    ):
        if not ok:
            raise UsageError(flag)
    if args.init_from and not args.config and not args.workdir:
        cfg = config_lib.base_config()
        cfg.lock()
        config_lib.apply_overrides(cfg, overrides)
    else:
        cfg = _load_config(args, overrides)
    if args.init_from:
        with cfg.unlocked():
            cfg.init_from = args.init_from
    model_cfg, params = _model_and_params(cfg, None if args.init_from else args.workdir)
    enc = tokenizer.get_tokenizer()
    prompt_ids = enc.encode_ordinary(args.prompt)
    new = gen_lib.generate(
        model_cfg,
        params,
        prompt_ids,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    print(tokenizer.decode(enc, prompt_ids + new))
    return 0


def cmd_export(args, overrides) -> int:
    from gpt2_jax import hf

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
    cfg = _load_config(args, overrides)
    model_cfg, params = _model_and_params(cfg, args.workdir)
    hf.save_pretrained(model_cfg, params, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def cmd_plot(args, overrides) -> int:
    from gpt2_jax import plot

    if overrides:
        raise UsageError(f"plot takes no --config.* flags (got --config.{next(iter(overrides))})")
    print(plot.plot_runs(args.workdirs + args.workdir, args.out, args.smoothing))
    return 0


def _parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    """argparse, but an unknown flag is a UsageError naming the closest known flag."""
    import difflib

    parser = _parser(command)
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    bad = unknown[0]
    if not bad.startswith("-"):
        raise UsageError(f"unexpected argument {bad!r}")
    name = bad.partition("=")[0]
    if "." in name.lstrip("-"):  # --train.steps=5: a config key without its prefix
        raise UsageError(f"unknown flag {name}: did you mean --config.{name.lstrip('-')}?")
    known = [o for o in parser._option_string_actions if o.startswith("--")]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]}?" if close else f" (flags: {', '.join(sorted(known))})"
    raise UsageError(f"unknown flag {name}{hint}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"gpt2-jax: error: {what} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]

    from gpt2_jax import config as config_lib

    try:
        rest, overrides = config_lib.split_override_args(rest)
        args = _parse_args(command, rest)
        handler = {
            "train": cmd_train,
            "eval": cmd_eval,
            "generate": cmd_generate,
            "export": cmd_export,
            "plot": cmd_plot,
        }[command]
        return handler(args, overrides)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        if _is_user_error(e):
            print(f"gpt2-jax {command}: error: {e}", file=sys.stderr)
            return 2
        raise


def _is_user_error(e: Exception) -> bool:
    names = {
        "UsageError",
        "ConfigError",
        "DataError",
        "CheckpointError",
        "TrainingError",
        "HFImportError",
        "TokenizerError",
        "PlotError",
    }
    return any(cls.__name__ in names for cls in type(e).__mro__)


if __name__ == "__main__":
    sys.exit(main())

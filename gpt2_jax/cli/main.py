"""The ``gpt2-jax`` command: parses flags, calls one library function, prints.

``USAGE`` and ``ABOUT`` are the help a user reads (``gpt2-jax --help``, ``gpt2-jax CMD
--help``); this docstring is for readers of the code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2_jax.core import workdir as wd
from gpt2_jax.errors import UserError

COMMANDS = ("train", "eval", "generate", "export", "lm-eval", "plot", "launch")

ABOUT = {
    "": "Train, evaluate, sample and benchmark GPT-2 in JAX: the counterpart of Hugging "
    "Face's run_clm.py, from one CPU to many GPU or TPU hosts.",
    "train": "Train a GPT-2 from a config file, or resume the run already in --workdir; "
    "checkpoints, metrics and the resolved config go to --workdir.",
    "eval": "Loss and perplexity of a run's checkpoint (or of hf: weights) on the config's "
    "eval splits, one JSON line per split.",
    "generate": "Sample text from a run's checkpoint or from Hugging Face weights with the "
    "KV-cache decoder; one prompt streams as it is made.",
    "export": "Write a run's checkpoint as a Hugging Face GPT-2 directory (config.json, "
    "model.safetensors, tokenizer files).",
    "lm-eval": "Score a run's checkpoint or Hugging Face weights on EleutherAI "
    "lm-evaluation-harness tasks (lambada_openai, hellaswag, wikitext, ...).",
    "plot": "Draw one or more runs' training curves into one PNG.",
    "launch": "Run one gpt2-jax command as N local processes on jax.distributed.",
}

USAGE = """\
usage:
  gpt2-jax train    --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
  gpt2-jax eval     --workdir=DIR [--step=N|best] [--config.KEY=VALUE ...]
  gpt2-jax eval     --config=configs/NAME.py --config.init_from=hf:PATH_OR_HUB_ID
  gpt2-jax generate --workdir=DIR | --init_from=hf:PATH_OR_HUB_ID --prompt=TEXT [...]
  gpt2-jax export   --workdir=DIR --out=HF_DIR [--overwrite]
  gpt2-jax lm-eval  --workdir=DIR [--step=N|best] | --init_from=hf:PATH_OR_HUB_ID --tasks=T1,T2
                    [--num_fewshot --limit --batch_size --include_path --output_path
                     --log_samples --seed --gen_kwargs --model_args]
  gpt2-jax launch   --processes=N --devices_per_process=M [--port=P] -- train|eval|lm-eval ...
  gpt2-jax plot     WORKDIR [WORKDIR ...] [--out=FILE.png]
  gpt2-jax COMMAND --help   for a command's flags
"""


def _help() -> str:
    return f"{ABOUT['']}\n\n{USAGE}"


class UsageError(UserError, ValueError):
    """A missing or contradictory command-line flag (reported as one line, exit code 2)."""


def _parser(command: str) -> argparse.ArgumentParser:
    lines = [line for line in USAGE.splitlines() if line.startswith(f"  gpt2-jax {command} ")]
    p = argparse.ArgumentParser(
        prog=f"gpt2-jax {command}",
        description=ABOUT[command] + "\n\n" + "\n".join(x.strip() for x in lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command == "plot":
        p.add_argument("workdirs", nargs="*", metavar="WORKDIR", help="run directories")
        p.add_argument("--workdir", action="append", default=[], help="run directory (repeatable)")
        p.add_argument("--out", help="PNG path (default WORKDIR/curves.png; ./curves.png for 2+)")
        p.add_argument("--smoothing", type=float, default=0.6, help="train-loss EMA, in [0, 1)")
        return p
    if command == "lm-eval":
        _lm_eval_flags(p)
        return p
    p.add_argument("--config", help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", help="run directory (checkpoints, metrics, config.json)")
    if command in ("eval", "generate", "export"):
        p.add_argument(
            "--step",
            type=_step,
            default=None,
            help="checkpoint of --workdir: N, best (train.keep_best), or latest (default)",
        )
    if command == "generate":
        p.add_argument("--init_from", default="", help="hf:<dir or hub id>")
        p.add_argument("--prompt", default=None, help="text to continue (default: a newline)")
        p.add_argument("--prompt_file", default=None, help="one prompt a line, all decoded at once")
        p.add_argument("--max_new_tokens", type=int, default=100)
        p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
        p.add_argument("--top_k", type=int, default=200, help="0 = off")
        p.add_argument("--top_p", type=float, default=1.0, help="1 = off")
        p.add_argument(
            "--repetition_penalty",
            type=float,
            default=1.0,
            help="> 1 makes tokens already in the text less likely (as in transformers); 1 = off",
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
        p.add_argument(
            "--stop_at_eos",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="end a sample at <|endoftext|>",
        )
    if command == "export":
        p.add_argument("--out", required=True, help="output Hugging Face directory")
        p.add_argument("--overwrite", action="store_true")
    return p


def _lm_eval_flags(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness's own flag names, and the weights as eval/generate take them."""
    p.add_argument("--workdir", default="", help="a gpt2-jax run directory")
    p.add_argument("--step", type=_step, default=None, help="N, best, or latest (default)")
    p.add_argument("--init_from", default="", help="hf:<dir or hub id> instead of --workdir")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per task")
    p.add_argument("--limit", type=float, default=None, help="docs per task (< 1: a fraction)")
    p.add_argument("--batch_size", type=int, default=None, help="rows per batch (default 16)")
    p.add_argument("--include_path", default="", help="directories of extra task YAMLs")
    p.add_argument(
        "--output_path",
        default="",
        help="results .json file or directory (default WORKDIR/lm_eval/step_<N>.json)",
    )
    p.add_argument("--log_samples", action="store_true", help="also write every sample")
    p.add_argument("--seed", default=None, help="one int, or python,numpy,torch,fewshot")
    p.add_argument("--gen_kwargs", default="", help="k=v,... for generate_until tasks")
    p.add_argument("--model_args", default="", help="k=v,...: " + ", ".join(_MODEL_ARGS))
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


# gpt2_jax.harness.MODEL_ARGS (not imported here: lm-eval is an optional extra).
_MODEL_ARGS = ("init_from", "workdir", "step", "batch_size", "dtype", "max_gen_toks", "seed")


def _step(text: str):
    from gpt2_jax.weights import resolve as weights

    try:
        return weights.parse_step(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a step number, 'best' or 'latest'"
        ) from None


def _load_config(args, overrides):
    """The config from --config, else the one saved in --workdir; overrides applied."""
    from gpt2_jax.config import base as config_lib

    return config_lib.for_command(args.config, args.workdir, overrides)


def _model_and_params(cfg, args, announce: bool = True):
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


def cmd_train(args, overrides) -> int:
    from gpt2_jax.train import loop as train_lib

    if not args.workdir:
        raise UsageError("--workdir=DIR is required")
    if not args.config and not (Path(args.workdir) / wd.CONFIG).is_file():
        raise UsageError("--config=configs/NAME.py is required for a new workdir")
    cfg = _load_config(args, overrides)
    try:
        results = train_lib.train(cfg, args.workdir)
    except train_lib.Preempted as e:  # saved; 143 for SIGTERM, 130 for Ctrl-C
        return e.exit_code
    for r in results.values():
        print(json.dumps(r))
    return 0


def cmd_eval(args, overrides) -> int:
    from gpt2_jax.evaluation import perplexity as evaluate
    from gpt2_jax.train import summary

    cfg = _load_config(args, overrides)
    results = evaluate.run_command(cfg, args.workdir, args.step, progress=cfg.train.progress)
    for r in results:
        print(json.dumps(r))

    sys.stdout.flush()  # the table follows the JSON lines on a terminal showing both
    print(summary.eval_table(results), file=sys.stderr)
    return 0


def cmd_generate(args, overrides) -> int:
    from gpt2_jax.config import base as config_lib
    from gpt2_jax.data import tokenizer
    from gpt2_jax.evaluation import generate as gen_lib

    if not (args.workdir or args.init_from or args.config):
        raise UsageError("give --workdir=DIR (a trained run) or --init_from=hf:<dir or hub id>")
    if args.init_from:
        try:
            config_lib.parse_init_from(args.init_from)
        except config_lib.ConfigError:
            raise UsageError(f"--init_from={args.init_from!r} must be hf:<dir or hub id>") from None
    if args.prompt == "":
        raise UsageError("--prompt: must not be empty")
    if args.num_samples < 1:
        raise UsageError(f"--num_samples={args.num_samples}: must be >= 1")
    try:  # the API's own checks, before any weights load
        gen_lib.check_sampling(
            args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.repetition_penalty
        )
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    prompts = _read_prompts(args)
    cfg = gen_lib.command_config(args.config, args.workdir, args.init_from, overrides)
    model_cfg, params, source = _model_and_params(cfg, args, announce=False)
    enc = tokenizer.get_tokenizer()
    prompt_ids = [enc.encode_ordinary(text) for text in prompts]
    try:  # the API's own check, each prompt named by its flag
        gen_lib.check_request(
            model_cfg, prompt_ids, args.max_new_tokens, args.temperature, args.top_k,
            args.top_p, args.repetition_penalty, names=_prompt_flags(args, len(prompts)),
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"loaded {source.describe()}", file=sys.stderr)  # after the checks: errors stay one line
    rows = [ids for ids in prompt_ids for _ in range(args.num_samples)]
    stop = tokenizer.EOT_ID if args.stop_at_eos else None
    stats = gen_lib.Stats()
    stream = gen_lib.stream_batch(
        model_cfg,
        params,
        rows,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token=stop,
        chunk_size=16,  # a jitted call per 16 tokens: text appears as it is made
        stats=stats,
        repetition_penalty=args.repetition_penalty,
    )
    if len(rows) == 1:
        _print_streamed(enc, rows[0], stream, stop)
    else:
        _print_rows(enc, rows, stream, stop, args.num_samples)
    print(
        f"prompt tokens: {stats.prompt_tokens}, new tokens: {stats.new_tokens}, "
        f"compile: {stats.compile_seconds:.1f} s, {stats.tokens_per_second:.1f} tokens/s "
        f"({stats.run_seconds:.2f} s)",
        file=sys.stderr,
    )
    return 0


def _read_prompts(args) -> list[str]:
    """The prompt texts from --prompt or --prompt_file (one a line)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give --prompt or --prompt_file, not both")
    if args.prompt_file is None:
        return ["\n" if args.prompt is None else args.prompt]
    path = Path(args.prompt_file)
    if not path.is_file():
        raise UsageError(f"--prompt_file={args.prompt_file}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise UsageError(f"--prompt_file={args.prompt_file}: the file is empty")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise UsageError(f"--prompt_file={args.prompt_file}: line {i} is empty")
    return lines


def _prompt_flags(args, n: int) -> list[str]:
    """How to name each prompt in an error message."""
    if args.prompt_file is None:
        return ["--prompt"]
    return [f"--prompt_file={args.prompt_file} line {i}" for i in range(1, n + 1)]


def _print_streamed(enc, prompt_ids: list[int], stream, stop) -> None:
    """One sample: the text as it comes, chunk by chunk (a chunk can end inside a UTF-8
    character: the trailing replacement characters wait for the next chunk)."""
    from gpt2_jax.data import tokenizer

    ids, printed = list(prompt_ids), ""
    for chunk in stream:
        for tok in chunk[0].tolist():
            if tok == stop:
                break
            ids.append(tok)
        text = tokenizer.decode(enc, ids).rstrip("\ufffd")
        if text.startswith(printed):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        if stop in chunk[0]:
            break
    text = tokenizer.decode(enc, ids)
    sys.stdout.write(text[len(printed) :] + "\n")
    sys.stdout.flush()


def _print_rows(enc, rows: list[list[int]], stream, stop, num_samples: int) -> None:
    """Several samples: each printed whole, as soon as it has ended."""
    from gpt2_jax.data import tokenizer

    new: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)

    def show(b: int) -> None:
        i, j = divmod(b, num_samples)
        print(f"--- prompt {i + 1}, sample {j + 1} ---")
        print(tokenizer.decode(enc, rows[b] + new[b]), flush=True)

    for chunk in stream:
        for b, part in enumerate(chunk.tolist()):
            if ended[b]:
                continue
            if stop in part:
                new[b] += part[: part.index(stop)]
                ended[b] = True
                show(b)
            else:
                new[b] += part
    for b in range(len(rows)):
        if not ended[b]:
            show(b)


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
    cfg = _load_config(args, overrides)
    model_cfg, params, _ = _model_and_params(cfg, args)
    hf.save_pretrained(model_cfg, params, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


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
    cfg = config_lib.base_config()
    cfg.lock()
    config_lib.apply_overrides(cfg, overrides)
    import multiprocessing

    # lm-eval's bootstrap pool, from a fresh server process: never a fork of XLA's threads.
    multiprocessing.set_start_method("forkserver", force=True)
    sharding.maybe_initialize_distributed(cfg.distributed)  # under launch, or a cluster
    results, path, written = harness.evaluate_command(
        tasks=args.tasks,
        workdir=args.workdir,
        step=args.step,
        init_from=args.init_from,
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


def cmd_launch(argv: list[str]) -> int:
    """N local processes of the gpt2-jax command after ``--`` (see gpt2_jax/launch.py)."""
    from gpt2_jax.parallel import launch

    try:
        return launch.main(argv)
    except launch.LaunchError as e:
        raise UsageError(str(e)) from None


def cmd_plot(args, overrides) -> int:
    from gpt2_jax.cli import plot

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


def entry() -> int:
    """The ``gpt2-jax`` command and ``python -m gpt2_jax``: the process re-executes itself
    once with glibc malloc tuned for XLA:CPU (``allocator.reexec``), then runs ``main``."""
    from gpt2_jax.core import allocator

    allocator.reexec()
    return main()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_help())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(_help(), file=sys.stderr)
        what = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"gpt2-jax: error: {what} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]

    from gpt2_jax.core import allocator

    allocator.tune()  # before XLA starts its threads
    from gpt2_jax.config import base as config_lib

    try:
        if command == "launch":  # what follows '--' is a whole command line of its own
            return cmd_launch(rest)
        rest, overrides = config_lib.split_override_args(rest)
        args = _parse_args(command, rest)
        handler = {
            "train": cmd_train,
            "eval": cmd_eval,
            "generate": cmd_generate,
            "export": cmd_export,
            "lm-eval": cmd_lm_eval,
            "plot": cmd_plot,
        }[command]
        return handler(args, overrides)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # one line, no traceback; anything else is a bug and shows it
        print(f"gpt2-jax {command}: error: {e}", file=sys.stderr)
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
    sys.exit(main())

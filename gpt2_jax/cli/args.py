"""The command line's words: the commands, their help texts and flags, and one
UsageError for a flag that is missing, unknown or contradicts another."""

from __future__ import annotations

import argparse

from gpt2_jax.errors import UserError
from gpt2_jax.evaluation import harness_args  # lm-eval-free: the CLI runs without [eval]

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
    "model.safetensors, tokenizer files); a LoRA run's as a PEFT adapter directory, or "
    "with --merge as a Hugging Face GPT-2 with the adapters merged in.",
    "lm-eval": "Score a run's checkpoint or Hugging Face weights on EleutherAI "
    "lm-evaluation-harness tasks (lambada_openai, hellaswag, wikitext, ...).",
    "plot": "Draw one or more runs' training curves into one PNG.",
    "launch": "Run one gpt2-jax command as N local processes on jax.distributed.",
}

USAGE = """\
usage:
  gpt2-jax train    --config=configs/NAME.py[:ARG] --workdir=DIR [--config.KEY=VALUE ...]
  gpt2-jax eval     --workdir=DIR [--step=N|best] [--config.KEY=VALUE ...]
  gpt2-jax eval     --config=configs/NAME.py --config.init_from=hf:PATH_OR_HUB_ID [--adapter=DIR]
  gpt2-jax generate --workdir=DIR | --init_from=hf:PATH_OR_HUB_ID [--adapter=DIR] --prompt=TEXT
  gpt2-jax export   --workdir=DIR --out=HF_DIR [--merge] [--overwrite]
  gpt2-jax lm-eval  --workdir=DIR [--step=N|best] | --init_from=hf:PATH_OR_HUB_ID [--adapter=DIR]
                    --tasks=T1,T2
                    [--num_fewshot --limit --batch_size --include_path --output_path
                     --log_samples --seed --gen_kwargs --model_args]
  gpt2-jax launch   --processes=N --devices_per_process=M [--port=P] -- train|eval|lm-eval ...
  gpt2-jax plot     WORKDIR [WORKDIR ...] [--out=FILE.png]
  gpt2-jax COMMAND --help   for a command's flags
"""


ADAPTER_HELP = (
    "a PEFT LoRA adapter directory merged into the --init_from weights once before use "
    "(the same as --config.lora.init_from=DIR)"
)


def help_text() -> str:
    return f"{ABOUT['']}\n\n{USAGE}"


class _FlagParser(argparse.ArgumentParser):
    """argparse that keeps the flag names it was given (``flags``), so an unknown flag can
    be answered with the closest known one without reading argparse's private tables."""

    flags: tuple[str, ...] = ()

    def add_argument(self, *names, **kwargs):
        # (argparse's own __init__ adds -h/--help through here too.)
        self.flags = (*self.flags, *(n for n in names if n.startswith("-")))
        return super().add_argument(*names, **kwargs)


class UsageError(UserError, ValueError):
    """A missing or contradictory command-line flag (reported as one line, exit code 2)."""


def parser(command: str) -> argparse.ArgumentParser:
    lines = [line for line in USAGE.splitlines() if line.startswith(f"  gpt2-jax {command} ")]
    p = _FlagParser(
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
            type=step_flag,
            default=None,
            help="checkpoint of --workdir: N, best (train.keep_best), or latest (default)",
        )
    if command in ("eval", "generate"):
        p.add_argument("--adapter", default="", help=ADAPTER_HELP)
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
        p.add_argument(
            "--merge",
            action="store_true",
            help="a LoRA run: a Hugging Face GPT-2 with the adapters merged in (default: "
            "a PEFT adapter directory)",
        )
    return p


def _lm_eval_flags(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness's own flag names, and the weights as eval/generate take them."""
    p.add_argument("--workdir", default="", help="a gpt2-jax run directory")
    p.add_argument("--step", type=step_flag, default=None, help="N, best, or latest (default)")
    p.add_argument("--init_from", default="", help="hf:<dir or hub id> instead of --workdir")
    p.add_argument("--adapter", default="", help=ADAPTER_HELP)
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
    p.add_argument(
        "--model_args", default="", help="k=v,...: " + ", ".join(harness_args.MODEL_ARGS)
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)


def step_flag(text: str):
    from gpt2_jax.weights import resolve as weights

    try:
        return weights.parse_step(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a step number, 'best' or 'latest'"
        ) from None


def parse_args(command: str, argv: list[str]) -> argparse.Namespace:
    """argparse, but an unknown flag is a UsageError naming the closest known flag."""
    import difflib

    p = parser(command)
    args, unknown = p.parse_known_args(argv)
    if not unknown:
        return args
    bad = unknown[0]
    if not bad.startswith("-"):
        raise UsageError(f"unexpected argument {bad!r}")
    name = bad.partition("=")[0]
    if "." in name.lstrip("-"):  # --train.steps=5: a config key without its prefix
        raise UsageError(f"unknown flag {name}: did you mean --config.{name.lstrip('-')}?")
    known = [o for o in p.flags if o.startswith("--")]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f": did you mean {close[0]}?" if close else f" (flags: {', '.join(sorted(known))})"
    raise UsageError(f"unknown flag {name}{hint}")

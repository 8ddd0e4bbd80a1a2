"""``gpt2-jax lm-eval``: every check (model arguments, weights, tasks and their data)
before any weights load, then the run and its results JSON."""

from __future__ import annotations

from pathlib import Path

import jax
from lm_eval import utils as lm_utils

from gpt2_jax.config import base as config_lib
from gpt2_jax.evaluation import harness_args
from gpt2_jax.evaluation.harness import loading, results
from gpt2_jax.evaluation.harness import tasks as tasks_lib
from gpt2_jax.evaluation.harness.lm import GPT2JaxLM
from gpt2_jax.evaluation.harness_args import HarnessError


def command_args(model_args: str, workdir, step, init_from, batch_size, adapter="") -> dict:
    """The model arguments of ``--model_args`` with the weights flags and
    ``--batch_size`` merged in; a HarnessError for a key given twice, an unknown key, or
    no weights named."""
    args = lm_utils.simple_parse_args_string(model_args)
    flags = (("workdir", workdir), ("init_from", init_from), ("step", step), ("adapter", adapter))
    for key, value in flags:
        if value not in ("", None):
            if key in args:
                raise HarnessError(f"--{key} and --model_args {key}=... both given")
            args[key] = value
    if batch_size is not None:
        args["batch_size"] = batch_size
    harness_args.check_model_args(args, "--model_args")
    if not args.get("workdir") and not args.get("init_from"):
        raise HarnessError("give --workdir=DIR (a trained run) or --init_from=hf:<dir or hub id>")
    if args.get("init_from"):
        config_lib.init_from_spec(str(args["init_from"]))
    if args.get("adapter") and not args.get("init_from"):
        raise HarnessError("--adapter merges a PEFT adapter into --init_from weights: give both")
    return args


def evaluate_command(
    *,
    tasks: str,
    workdir: str = "",
    step=None,
    init_from: str = "",
    adapter: str = "",
    model_args: str = "",
    batch_size: int | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    include_path: str = "",
    output_path: str = "",
    log_samples: bool = False,
    seed: str | None = None,
    gen_kwargs: str = "",
    progress: bool = True,
) -> tuple[dict, Path | None, list[Path]]:
    """``gpt2-jax lm-eval``: checks everything (tasks, their data, the model arguments)
    before any weights load, scores, and writes the results JSON (process 0) ->
    (results, results path or None, every file written)."""
    seeds = harness_args.parse_seed(seed)
    args = command_args(model_args, workdir, step, init_from, batch_size, adapter)
    if log_samples and not output_path and not args.get("workdir"):
        raise HarnessError("--log_samples needs --output_path (or --workdir) to write them to")
    loading.check_weights(args.get("workdir"), args.get("step"), args.get("init_from", ""),
                          args.get("dtype"), args.get("adapter", ""))  # fmt: skip
    names, manager = tasks_lib.load_tasks(tasks, include_path)
    lm = GPT2JaxLM.from_args(args)
    lm.progress = progress
    out = results.run(
        lm,
        names,
        manager,
        num_fewshot=num_fewshot,
        limit=limit,
        log_samples=log_samples,
        seed=seeds,
        gen_kwargs=gen_kwargs or None,
    )
    path = results.results_path(output_path, lm.source, args.get("workdir"))
    written = []
    if path is not None and jax.process_index() == 0:
        written = results.write_results(out, path, log_samples, merge=True)
    return out, path, written

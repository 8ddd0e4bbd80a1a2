"""Running lm-eval on a backend and what comes out: the results dict, its scalars for
metrics.jsonl / TensorBoard, the results JSON (merged per step) and samples files, the
table the CLI prints."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from gpt2_jax.core import workdir as wd
from gpt2_jax.evaluation.harness_args import DEFAULT_SEEDS

# Top-level keys of lm-eval's results that map task names to values (merged on rewrite).
_PER_TASK = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
             "higher_is_better", "n-samples")  # fmt: skip


@contextlib.contextmanager
def bootstrap_in_process():
    """lm-eval's bootstrap (perplexity stderr) runs a multiprocessing pool: forked from a
    process running XLA's threads it can deadlock. ``gpt2-jax lm-eval`` starts its pools
    from a fork server (cli/main.py); otherwise lm-eval's documented switch,
    ``DISABLE_MULTIPROC``, keeps the bootstrap in this process (the same numbers: it seeds
    every chunk) for this call only: the environment is as it was afterwards."""
    forks = multiprocessing.get_start_method(allow_none=True) in (None, "fork")
    if not forks or "DISABLE_MULTIPROC" in os.environ:
        yield
        return
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        os.environ.pop("DISABLE_MULTIPROC", None)


def run(
    lm,
    tasks: list[str],
    manager,
    *,
    num_fewshot: int | None = None,
    limit: float | None = None,
    log_samples: bool = False,
    seed: Sequence[int | None] = DEFAULT_SEEDS,
    gen_kwargs: str | dict | None = None,
) -> dict:
    """``lm_eval.simple_evaluate`` on ``lm``: its results dict (with ``samples`` if asked).

    ``seed``: lm-eval's four seeds (python, numpy, torch, few-shot); the third also seeds
    gpt2_jax's sampled generation, as it seeds torch's in the hf backend.
    """
    import lm_eval

    if seed[2] is not None:
        lm.seed = int(seed[2])
    with bootstrap_in_process():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs or None,
            task_manager=manager,
            random_seed=seed[0],
            numpy_random_seed=seed[1],
            torch_random_seed=seed[2],
            fewshot_random_seed=seed[3],
        )


def scalars(results: dict) -> dict[str, float]:
    """``{"lm_eval/<task>/<metric>": value}`` from a results dict: every numeric metric
    but the standard errors; a filter other than lm-eval's "none" is appended
    (``exact_match_strict-match``)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if "_stderr" in metric or metric in ("alias", "sample_len") or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)):
                continue
            name = metric if filt in ("", "none") else f"{metric}_{filt}"
            out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def write_results(results: dict, path, log_samples: bool = False, merge: bool = False) -> list:
    """The results JSON at ``path`` (atomically; samples left out), and with
    ``log_samples`` one ``samples_<task>_<time>.jsonl`` beside it, written by lm-eval's
    own tracker (the files its CLI writes). ``merge``: an existing file keeps the tasks
    this run did not score (a step's file collects every task scored at that step).
    Returns the paths written."""
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in results.items() if k != "samples"}
    body = json.loads(json.dumps(body, default=handle_non_serializable))
    if merge and path.is_file():
        old = json.loads(path.read_text())
        for key in _PER_TASK:
            if isinstance(old.get(key), dict) or isinstance(body.get(key), dict):
                body[key] = {**(old.get(key) or {}), **(body.get(key) or {})}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(tmp, path)
    written = [path]
    if log_samples and results.get("samples"):
        written += _write_samples(results, path)
    return written


def _write_samples(results: dict, path: Path) -> list[Path]:
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(path))
    tracker.date_id = datetime.now().isoformat().replace(":", "-")  # as its own save sets
    written = []
    for task in results.get("configs", {}):
        before = set(path.parent.glob(f"samples_{task}_*.jsonl"))
        tracker.save_results_samples(task_name=task, samples=results["samples"][task])
        new = sorted(set(path.parent.glob(f"samples_{task}_*.jsonl")) - before)
        if not new:  # the tracker logs a failure and carries on: we do not
            raise OSError(f"could not write the samples of {task} beside {path}")
        written += new
    return written


def table(results: dict) -> str:
    """The harness's results table (and its groups table, when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text


def results_path(output_path: str, source, workdir) -> Path | None:
    """Where the results JSON goes: ``output_path`` (a .json file, or a directory that
    gets ``step_<N>.json`` / ``results.json``), else ``WORKDIR/lm_eval/step_<N>.json``;
    None for hf weights without ``output_path`` (nothing is written)."""
    checkpoint = source is not None and source.kind == "checkpoint"
    name = f"step_{source.step}.json" if checkpoint else "results.json"
    if output_path:
        out = Path(output_path)
        return out if out.suffix == ".json" else out / name
    if workdir:
        return Path(workdir) / wd.LM_EVAL / name
    return None

"""The harness during ``gpt2-jax train`` (``eval.harness_tasks``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from gpt2_jax.core import workdir as wd
from gpt2_jax.evaluation.harness import results
from gpt2_jax.evaluation.harness import tasks as tasks_lib
from gpt2_jax.evaluation.harness.lm import GPT2JaxLM


class TrainingHook:
    """``eval.harness_tasks`` during ``gpt2-jax train``: ``hook(step, params)`` scores the
    tasks, writes ``WORKDIR/lm_eval/step_<step>.json`` (process 0) and returns
    ``{"lm_eval/<task>/<metric>": value}`` for metrics.jsonl and TensorBoard.

    Built before the train step compiles, so an unknown task or unreachable data stops
    the run before anything is written; one backend is kept for the whole run (its
    executables compile once) and gets each step's params.
    """

    def __init__(self, plan, workdir):
        """``plan``: the run's plan (its eval section, eval batch, seed and model)."""
        e = plan.eval
        self.model_cfg = plan.model
        self.workdir = Path(workdir)
        self.tasks, self.manager = tasks_lib.load_tasks(
            e.harness_tasks,
            e.harness_include_path,
            flag="eval.harness_tasks",
            path_flag="eval.harness_include_path",
        )
        self.batch_size = plan.eval_batch
        self.limit = e.harness_limit or None
        self.num_fewshot = None if e.harness_num_fewshot < 0 else e.harness_num_fewshot
        self.seed = plan.train.seed
        self.lm: GPT2JaxLM | None = None

    def __call__(self, step: int, params: dict) -> dict[str, float]:
        if self.lm is None:
            self.lm = GPT2JaxLM(
                dataclasses.replace(self.model_cfg, resid_pdrop=0.0, embd_pdrop=0.0,
                                    attn_pdrop=0.0),
                params,
                batch_size=self.batch_size,
                seed=self.seed,
                progress=False,
                description=f"{self.workdir} step {step}",
            )  # fmt: skip
        else:
            self.lm.set_params(params)
        out = results.run(
            self.lm, self.tasks, self.manager, num_fewshot=self.num_fewshot, limit=self.limit
        )
        if jax.process_index() == 0:
            path = self.workdir / wd.LM_EVAL / f"step_{step}.json"
            results.write_results(out, path, merge=True)
        return results.scalars(out)

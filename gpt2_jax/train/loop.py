"""Training: the run, from a config to its last checkpoint.

How a config becomes a run (``train(cfg, workdir)``), top to bottom:

1. ``plan.training``: the config's typed sections, where the weights come from, the model
   config, the mesh, the batches, the notes; everything validated before anything is
   written. Below this point nothing reads the ConfigDict;
2. the data (token blocks), the loader, and the checks of what comes later (trackers,
   harness tasks), so that a bad value stops the run before it compiles;
3. ``step.build_step``: optimizer, abstract state, shardings, donation, jit and the
   ahead-of-time compile, once; ``preflight.check_step`` refuses a step that cannot fit;
4. ``_Run``: setup (workdir, state created sharded or restored, logger, summary), a short
   loop that runs the compiled step and the hooks due at each step (log, progress, eval,
   harness, checkpoint, stop), and finish (final eval, harness, last checkpoint, summary).

LoRA (``plan.model.lora``): ``lora_run.prepare`` loads and identifies the frozen base
before the step compiles; the state holds the adapters, the base rides beside it (the
step's third argument, ``_Run.base_args``), and evaluations read the adapters merged into
it (``_Run._weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

from gpt2_jax import data as data_lib
from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.core import workdir as wd
from gpt2_jax.evaluation.perplexity import evaluate_splits  # noqa: F401  (train_lib.evaluate_splits)
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.parallel import sharding
from gpt2_jax.train import lora_run, preflight, summary, trackers
from gpt2_jax.train.monitor import (
    Interrupts,
    MetricLogger,
    NonFinite,
    Preempted,
    Throughput,
    preempted,
    write_config,
)
from gpt2_jax.train.step import Step, build_step, init_state
from gpt2_jax.weights import checkpoint as ckpt_lib
from gpt2_jax.weights import resolve as weights

# ------------------------------------------------------------------ the command


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) per ``cfg`` in ``workdir``; returns the final eval metrics.

    Raises ConfigError / DataError / CheckpointError / TrainingError with a clear message.
    """
    workdir = Path(workdir).absolute()
    sharding.maybe_initialize_distributed(config_lib.sections(cfg).distributed)
    # ---- the plan: weights, model, mesh, batches; everything checked before anything is
    # written. The ConfigDict stops here.
    return run_plan(plan_lib.training(cfg, workdir, jax.device_count()), workdir)


def run_plan(plan: plan_lib.Plan, workdir: Path) -> dict:
    """Trains (or resumes) ``plan`` in ``workdir``; returns the final eval metrics."""
    if jax.process_index() == 0:
        for note in plan.notes:
            print(note, file=sys.stderr)
    splits = data_lib.load_splits(plan.data, ("train", *plan.eval.splits))
    # ("train" may be an eval split too)
    loader = data_lib.BatchLoader(
        len(splits["train"]), plan.train.batch_size, plan.train.seed, jax.process_index(),
        jax.process_count(), unit="rows of examples" if plan.data.examples else "blocks",
    )  # fmt: skip
    data = _Data(splits["train"], {name: splits[name] for name in plan.eval.splits}, loader)
    plan = plan_lib.with_data(plan, data.loader.steps_per_epoch)
    # A bad HF checkpoint (or LoRA base, or adapter) fails here, before the workdir is touched.
    source, lora = plan.source, None
    if plan.model.lora is not None:
        lora = lora_run.prepare(plan)
        plan = dataclasses.replace(plan, record=lora.record)  # with the base's identity
    hf_params = weights.load_hf_params(source) if source.kind == "hf" and not lora else None
    tracker_names = trackers.check_names(plan.train.report_to)  # e.g. wandb, not installed
    # Harness tasks (eval.harness_tasks): known, and their data loadable, before compiling.
    harness_hook = _harness_hook(plan, workdir)
    # ---- the step, compiled once; the memory preflight refuses a run that cannot fit
    # (nothing written yet). With many processes it is also a barrier.
    step = build_step(plan)
    state_sizes = step.abstract_state
    if lora is not None:  # the parameters a step holds: the adapters and the base
        state_sizes = {**state_sizes, "params": (state_sizes["params"], step.abstract_base)}
    preflight.check_step(step.compiled, state_sizes, step.abstract_batch, plan)
    with contextlib.ExitStack() as stack:
        run = _Run(workdir, plan, step, data, stack, harness_hook, tracker_names)
        run.setup(hf_params, lora)
        run.loop()
        return run.finish()


@dataclasses.dataclass(frozen=True)
class _Data:
    train: Any  # data.Blocks of the train split
    evals: dict  # split name -> data.Blocks
    loader: Any  # data.BatchLoader


def eval_plan(plan: plan_lib.Plan) -> plan_lib.Plan:
    """The plan the evaluations read: LoRA's adapters are merged into the weights they get,
    so the model they run has none."""
    if plan.model.lora is None:
        return plan
    return dataclasses.replace(plan, model=dataclasses.replace(plan.model, lora=None))


def _harness_hook(plan: plan_lib.Plan, workdir: Path):
    """``harness.TrainingHook`` when ``eval.harness_tasks`` is set, else None."""
    if not plan.eval.harness_tasks:
        return None
    try:
        from gpt2_jax.evaluation import harness
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise config_lib.ConfigError(
            "eval.harness_tasks needs EleutherAI's lm-evaluation-harness: "
            "pip install 'gpt2_jax[eval]'"
        ) from None
    try:
        return harness.TrainingHook(eval_plan(plan), workdir)
    except harness.HarnessError as e:
        raise config_lib.ConfigError(str(e)) from None


def _prepare_workdir(fresh: bool, workdir: Path, source: weights.Source) -> list[str]:
    """train.fresh / train.resume_step: moves old runs aside (never deletes); what it did."""
    done = []
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        if fresh:
            done += [f"train.fresh: moved {p.name} aside" for p in weights.start_fresh(workdir)]
        if source.kind == "checkpoint":
            moved = weights.supersede_after(workdir / wd.CHECKPOINTS, source.step)
            done += [f"train.resume_step={source.step}: moved {p} aside" for p in moved]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("gpt2_jax workdir ready")
    # (The one-time actions are cleared in plan.record: a resume does not repeat them.)
    return done


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass(frozen=True)
class Hook:
    """A periodic action of the loop: ``fn(step)`` at the steps where ``due(step)``."""

    name: str
    due: Callable[[int], bool]
    fn: Callable[[int], None]


def every(n: int, total: int, last: bool = False) -> Callable[[int], bool]:
    """Due every ``n`` steps (never for n = 0) before the last step; at the last step
    only with ``last`` (the final eval and checkpoint belong to ``finish``)."""
    return lambda s: last if s == total else bool(n and s % n == 0)


class _Run:
    """One training run: ``setup()``, ``loop()``, ``finish()``; the periodic work is the
    hooks list (``_hooks``), each one function and one line."""

    def __init__(self, workdir, plan, step: Step, data: _Data, stack, harness, names):
        self.workdir, self.plan, self.step_build, self.data = workdir, plan, step, data
        self.stack, self.harness_hook, self.tracker_names = stack, harness, names
        self.total = plan.total_steps
        self.pending: list[tuple[int, dict]] = []
        self.window: dict = {}
        self.evals: list[dict] | None = None
        self.harness_scalars: dict = {}
        self.stop_now = False
        self.paused = 0.0  # seconds of evals since the last log: not training time

    # ---------------------------------------------------------------- setup

    def setup(self, hf_params, lora: lora_run.LoraRun | None = None) -> None:
        plan, workdir, source, s = self.plan, self.workdir, self.plan.source, self.step_build
        self.base_args, self.merge = (), None
        if lora is not None:  # the frozen base, placed once; the step's third argument
            self.base_args = (lora_run.place(lora.base, s.base_shardings),)
            self.merge = lora_run.merger(plan.model.lora, s.base_shardings)
            hf_params = lora.adapters  # the starting adapters (None: fresh)
        self.run_start = time.perf_counter()
        moved = _prepare_workdir(plan.train.fresh, workdir, source)
        self.ckpt = ckpt_lib.Checkpointer(
            workdir / wd.CHECKPOINTS,
            max_to_keep=plan.train.keep_checkpoints,
            keep_best=plan.train.keep_best,
        )
        self.stack.callback(self.ckpt.close)  # an open async manager must not outlive an error
        self.resume_step = source.step if source.kind == "checkpoint" else None
        if self.resume_step is not None:
            # In the checkpoint's own layout, converted if scan_layers changed.
            self.state = weights.restore(
                source, self.ckpt, s.abstract_fn, lambda a: sharding.state_sharding(s.mesh, a),
                "--config.train.resume_step",
            )  # fmt: skip
        else:
            init_fn = functools.partial(init_state, model_cfg=self.plan.model, tx=s.tx)
            rng = jax.random.PRNGKey(plan.train.seed)
            self.state = jax.jit(init_fn, out_shardings=s.state_shardings)(rng, params=hf_params)
        write_config(
            plan.record, workdir
        )  # after the restore: an unreadable checkpoint changes nothing
        self.start = int(self.state["step"])
        self._open_log(moved)

    def _weights(self) -> dict:
        """The params the evaluations read: LoRA's adapters merged into the base."""
        if self.merge is None:
            return self.state["params"]
        return self.merge(self.base_args[0], self.state["params"])

    def _open_log(self, moved: list[str]) -> None:
        from tqdm import tqdm

        plan, workdir = self.plan, self.workdir
        show = plan.train.progress and jax.process_index() == 0
        self.bar = tqdm(
            total=self.total, initial=self.start, desc="train", dynamic_ncols=True,
            # Steps are dispatched asynchronously and wait at each log step, so the bar moves
            # in bursts; the whole-run average gives a steady rate and ETA, the EMA does not.
            smoothing=0.0, disable=not show, file=sys.stderr,
        )  # fmt: skip
        self.stack.callback(self.bar.close)
        names, config = self.tracker_names, plan.record
        self.log = MetricLogger(
            workdir, self.resume_step, self.bar if show else None,
            lambda: trackers.make(names, workdir, plan.train, config),
        )  # fmt: skip
        self.stack.callback(self.log.close)
        text = self._start_summary()
        self.log.echo(text)
        self.log.text(self.start, {"run/start": text}, config)
        for line in moved:
            self.log.echo(line)
        if self.resume_step is not None:
            self.log.echo(f"resumed from {self.ckpt.directory / str(self.resume_step)}")

    def _start_summary(self) -> str:
        plan, d = self.plan, self.data
        resumed = None
        if self.resume_step is not None:
            resumed = self.ckpt.directory / str(self.resume_step)
        trained = model_lib.count_params(self.step_build.abstract_state["params"])
        return summary.start_summary(
            plan.record,
            params=trained + sum(model_lib.count_params(b) for b in self.base_args),
            trainable=trained,
            device_count=jax.device_count(),
            process_count=jax.process_count(),
            platform=jax.devices()[0].platform,
            mesh_shape=dict(self.step_build.mesh.shape),
            start_step=self.start,
            total_steps=self.total,
            steps_per_epoch=d.loader.steps_per_epoch,
            blocks={"train": len(d.train), **{k: len(v) for k, v in d.evals.items()}},
            weights=summary.weights_source(resumed, plan.init_from, plan.train.seed),
            workdir=self.workdir,
            data=data_lib.cache_report({"train": d.train, **d.evals}),
        )

    # ---------------------------------------------------------------- the loop

    def _hooks(self) -> list[Hook]:
        """Everything the loop does besides the step, in the order it is done at a step."""
        t, total = self.plan.train, self.total
        harness_every = self.plan.eval.harness_every if self.harness_hook else 0
        log_due = every(t.log_every, total, last=True)
        eval_due = every(t.eval_every, total)
        ckpt_due = every(t.checkpoint_every, total)

        def save_due(s):  # a best candidate needs its weights saved
            return ckpt_due(s) or (t.keep_best and eval_due(s))

        return [
            Hook("preemption", lambda s: True, self._check_preemption),
            Hook("fetch", lambda s: log_due(s) or save_due(s) or self.stop_now, self._fetch),
            Hook("log", log_due, self._log),
            Hook("progress", lambda s: True, lambda s: self.bar.update(1)),
            Hook("eval", eval_due, self._eval),
            Hook("harness", every(harness_every, total), self._harness),
            Hook("checkpoint", save_due, self._save),
            Hook("stop", lambda s: self.stop_now, self._stop),
        ]

    def loop(self) -> None:
        """Runs the compiled step to ``total`` steps; the hooks do the rest."""
        hooks = self._hooks()
        self.throughput = Throughput(self.plan, self.plan.model, jax.devices())
        self.guard = NonFinite(self.plan.train.nonfinite, self.plan.train.max_nonfinite)
        self.last_time, self.last_step = time.perf_counter(), self.start
        self.step = self.start
        with Interrupts() as self.interrupts:
            while self.step < self.total:
                batch = self._batch(self.step)
                self.state, metrics = self.step_build.compiled(self.state, batch, *self.base_args)
                self.step += 1
                if self.step == self.start + 1:
                    # The first step may carry compilation: tokens/s counts from its end.
                    jax.block_until_ready(metrics["loss"])
                    self.last_time, self.last_step = time.perf_counter(), self.step
                self.pending.append((self.step, metrics))
                self.evals = None
                for hook in hooks:
                    if hook.due(self.step):
                        hook.fn(self.step)

    def _batch(self, step: int):
        # [B / processes, T] tokens, or (SFT formats) a dict of such arrays
        local = self.data.train[self.data.loader.indices(step)]
        accum, sh = self.plan.optim.accumulation_steps, self.step_build.batch_sharding
        # -> [accum, micro, T] each
        return jax.tree.map(
            lambda x: sharding.put_batch(x.reshape(accum, -1, x.shape[-1]), sh), local
        )

    # ---------------------------------------------------------------- the hooks

    def _check_preemption(self, step: int) -> None:
        self.stop_now = preempted(self.interrupts, step)  # with many processes, collective

    def _fetch(self, step: int) -> None:
        # Metrics leave the device only here; never checkpoint past a non-finite step.
        self.window = self.guard.check(jax.device_get(self.pending), self.ckpt.latest_step())
        self.pending = []

    def _log(self, step: int) -> None:
        now = time.perf_counter()
        record = {
            "step": step,
            "split": "train",
            "loss": self.window["loss"],
            "learning_rate": float(self.step_build.schedule(step - 1)),
            "grad_norm": self.window["grad_norm"],
        }
        if step > self.last_step:  # not the first step's window alone
            tokens = (
                self.plan.train.batch_size * self.plan.data.block_size * (step - self.last_step)
            )
            record.update(self.throughput.metrics(tokens / (now - self.last_time - self.paused)))
        if self.plan.train.nonfinite == "skip":
            record["nonfinite"] = self.window["nonfinite"]
        self.log.write(record)
        self.last_time, self.last_step, self.paused = now, step, 0.0

    def _eval(self, step: int) -> None:
        t0 = time.perf_counter()
        mesh, plan = self.step_build.mesh, eval_plan(self.plan)
        self.evals = evaluate_splits(plan, self._weights(), self.data.evals, mesh, progress=False)
        for r in self.evals:
            self.log.write({"step": step, **r})
        self.paused += time.perf_counter() - t0

    def _harness(self, step: int) -> None:
        t0 = time.perf_counter()
        self.harness_scalars = self.harness_hook(step, self._weights())
        self.log.write({"step": step, "split": "lm_eval", **self.harness_scalars})
        self.paused += time.perf_counter() - t0

    def _save(self, step: int) -> None:
        # keep_best ranks checkpoints by the first eval split's loss at that step.
        best = self.evals[0]["loss"] if (self.plan.train.keep_best and self.evals) else None
        self.ckpt.save(step, self.state, self.plan.record, eval_loss=best)

    def _stop(self, step: int) -> None:
        if self.ckpt.latest_step() != step:
            self.evals = None
            self._save(step)
        self.ckpt.wait()
        signum = self.interrupts.signum or signal.SIGTERM
        self.log.echo(
            f"{signal.Signals(signum).name}: saved step {step} to {self.ckpt.directory}; "
            f"run the same command to resume"
        )
        raise Preempted(step, signum)

    # ---------------------------------------------------------------- finish

    def finish(self) -> dict:
        """The final eval and harness eval, the last checkpoint (with its eval loss), the
        end-of-run summary; returns ``{split: eval record}``."""
        step = self.step
        self._eval(step)
        if self.harness_hook is not None:
            self._harness(step)
        if self.ckpt.latest_step() != step:
            self._save(step)
        self.ckpt.wait()
        paths = {
            "checkpoints": self.ckpt.directory / str(self.ckpt.latest_step()),
            "metrics": self.workdir / wd.METRICS,
            "tensorboard": self.workdir / wd.TENSORBOARD,
            "config": self.workdir / wd.CONFIG,
            **({"lm_eval": self.workdir / wd.LM_EVAL} if self.harness_hook else {}),
        }
        text = summary.end_summary(
            self.evals,
            harness=self.harness_scalars,
            start_step=self.start,
            end_step=step,
            wall_seconds=time.perf_counter() - self.run_start,
            paths=paths,
        )
        self.log.echo(text)
        self.log.text(step, {"run/end": text})
        return {r["split"]: r for r in self.evals}

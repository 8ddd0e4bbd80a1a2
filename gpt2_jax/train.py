"""Training: state, loss, the one jitted train step, and the loop.

This is the one module that knows everything (config, model, data, optimizer, mesh,
checkpoints). ``train_step`` is a module-level pure function, jitted once per run with
explicit shardings and a donated state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gpt2_jax import checkpoint as ckpt_lib
from gpt2_jax import config as config_lib
from gpt2_jax import data as data_lib
from gpt2_jax import flops, optim, preflight, sharding, summary, trackers, weights
from gpt2_jax import model as model_lib
from gpt2_jax.errors import UserError
from gpt2_jax.evaluate import evaluate_splits

State = dict[str, Any]  # {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2]}


class TrainingError(UserError, RuntimeError):
    pass


# ------------------------------------------------------------------ pure functions


def init_state(
    rng: jax.Array,
    *,
    model_cfg: model_lib.GPT2Config,
    tx: optax.GradientTransformation,
    params=None,
) -> State:
    """A fresh train state (random params unless ``params`` is given)."""
    init_rng, train_rng = jax.random.split(rng)
    if params is None:
        params = model_lib.init_params(model_cfg, init_rng)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rng": train_rng,
    }


def loss_fn(
    params,
    batch: jax.Array,
    dropout_rng: jax.Array,
    *,
    model_cfg: model_lib.GPT2Config,
    deterministic: bool = False,
) -> jax.Array:
    """Mean next-token cross-entropy over a batch [B, T] (each block's T-1 predictions)."""
    hidden = model_lib.GPT2(model_cfg).apply(
        {"params": params},
        batch,
        deterministic=deterministic,
        return_hidden=True,
        rngs={"dropout": dropout_rng},
    )
    return model_lib.mean_token_nll(hidden, params["wte"]["embedding"], batch)


def train_step(
    state: State,
    batch: jax.Array,
    *,
    model_cfg: model_lib.GPT2Config,
    tx: optax.GradientTransformation,
    skip_nonfinite: bool = False,
    nan_step: int = 0,
) -> tuple[State, dict]:
    """One optimizer update from ``batch`` [accum, micro_batch, T] int32.

    Gradients of the ``accum`` microbatches are averaged by a scan inside the step (every
    block has the same T-1 targets, so this is the mean over all tokens).
    ``skip_nonfinite``: a non-finite loss or gradient norm leaves params and optimizer
    state as they were (the step counter still advances). ``nan_step`` (tests only):
    the update to step ``nan_step`` gets NaN gradients.
    """
    rng = jax.random.fold_in(state["rng"], state["step"])
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, model_cfg=model_cfg))
    accum = batch.shape[0]
    params = state["params"]

    if accum == 1:
        loss, grads = grad_fn(params, batch[0], jax.random.fold_in(rng, 0))
    else:

        def micro(carry, xs):
            mb, i = xs
            loss_i, grads_i = grad_fn(params, mb, jax.random.fold_in(rng, i))
            return jax.tree.map(jnp.add, carry, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(micro, zeros, (batch, jnp.arange(accum)))
        loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

    if nan_step:
        poison = state["step"] + 1 == nan_step
        grads = jax.tree.map(lambda g: jnp.where(poison, jnp.nan, g), grads)
    grad_norm = optax.global_norm(grads)
    if hasattr(tx, "apply"):  # optim.FusedTransformation: update and apply in one pass
        new_params, opt_state = tx.apply(grads, state["opt_state"], params)
    else:
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
    if skip_nonfinite:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(ok, new, old))
        new_params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, {"loss": loss, "grad_norm": grad_norm}


# --------------------------------------------------------------------- logging


class MetricLogger:
    """metrics.jsonl + the trackers (``train.report_to``) + stdout, by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int | None, progress, make_trackers):
        self.enabled = jax.process_index() == 0
        self.progress = progress
        self.path = workdir / "metrics.jsonl"
        self.trackers = []
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            # Lines past the restored step were from work that the resume redoes.
            kept = [
                ln
                for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self.trackers = make_trackers()

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        split = record["split"]
        scalars = {
            # A namespaced key (lm_eval/<task>/<metric>) is its own tag.
            (k if "/" in k else f"{split}/{k}"): v
            for k, v in record.items()
            if k not in ("step", "split") and isinstance(v, (int, float))
        }
        for tracker in self.trackers:
            tracker.log(record["step"], scalars)
        self.echo(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def echo(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def text(self, step: int, texts: dict[str, str], config: dict | None = None) -> None:
        """The run's start / end summaries (and the resolved config) to every tracker."""
        for tracker in self.trackers:
            tracker.log_text(step, texts, config)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------------ the loop


class _Interrupts:
    """SIGTERM and a first Ctrl-C (SIGINT) become a flag the loop checks between steps
    (save the current step, then exit 143 / 130); a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if jax.process_count() > 1:
            # jax.distributed's preemption notifier owns SIGTERM there and agrees on one step
            # for every process (_preempted); a Python handler would replace it, and a signal
            # seen by one process only would make it save alone and hang the others.
            return self
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            # The second Ctrl-C: the user does not want to wait for the save. A half-written
            # checkpoint is an Orbax temporary, ignored and removed at the next start.
            print("\nCtrl-C again: aborted", file=sys.stderr, flush=True)
            os._exit(130)
        self.signum = self.signum or signum
        if signum == signal.SIGINT:
            print(
                "\nCtrl-C: saving the current step, then exiting (Ctrl-C again aborts now)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _nan_step() -> int:
    """Test-only fault injection: ``GPT2_JAX_TEST_NAN_STEP=N`` poisons step N's gradients."""
    return int(os.environ.get("GPT2_JAX_TEST_NAN_STEP", "0") or 0)


def step_options(cfg) -> dict:
    """``train_step``'s static options from the config (the preflight compiles the same)."""
    return {"skip_nonfinite": cfg.train.nonfinite == "skip", "nan_step": _nan_step()}


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) per ``cfg`` in ``workdir``; returns the final eval metrics.

    Raises ConfigError / DataError / CheckpointError / TrainingError with a clear message.
    """
    workdir = Path(workdir).absolute()
    sharding.maybe_initialize_distributed(cfg.distributed)
    num_devices = jax.device_count()

    # ---- where the weights come from (weights.py decides), then everything checked
    # before anything is written
    source = weights.resolve(cfg, workdir, cfg.train.resume_step, training=True)
    model_cfg = config_lib.validate(cfg, num_devices)
    notes = [f"warning: {w}" for w in config_lib.warnings(cfg)]
    if source.kind == "checkpoint":
        notes += [
            f"resume: {c} (this run's value, recorded in config.json)"
            for c in weights.runtime_changes(source.saved_cfg, model_cfg)
        ]
    if jax.process_index() == 0:
        for note in notes:
            print(note, file=sys.stderr)
    splits = data_lib.load_splits(cfg.data, ("train", *cfg.eval.splits))
    train_blocks = splits["train"]
    splits = {name: splits[name] for name in cfg.eval.splits}  # "train" may be one of them
    loader = data_lib.BatchLoader(
        len(train_blocks),
        cfg.train.batch_size,
        cfg.train.seed,
        jax.process_index(),
        jax.process_count(),
    )
    # A bad HF checkpoint fails here, before the workdir is touched.
    hf_params = weights.load_hf_params(source) if source.kind == "hf" else None
    trackers.check(cfg.train.report_to)  # e.g. wandb asked for but not installed
    # Harness tasks (eval.harness_tasks): known, and their data loadable, before compiling.
    harness_hook = _harness_hook(cfg, model_cfg, workdir)

    # ---- memory preflight: compile the step, refuse a run that cannot fit (nothing written
    # yet); the loop reuses this executable. With many processes it is also a barrier.
    total_steps = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    compiled_step = preflight.compile_train_step(
        cfg, source.model_cfg, total_steps, **step_options(cfg)
    )

    with contextlib.ExitStack() as stack:
        return _run(
            cfg,
            workdir,
            source,
            splits,
            train_blocks,
            loader,
            hf_params,
            stack,
            compiled_step,
            harness_hook,
        )


def _harness_hook(cfg, model_cfg, workdir: Path):
    """``harness.TrainingHook`` when ``eval.harness_tasks`` is set, else None."""
    if not cfg.eval.harness_tasks:
        return None
    try:
        from gpt2_jax import harness
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise config_lib.ConfigError(
            "eval.harness_tasks needs EleutherAI's lm-evaluation-harness: "
            "pip install 'gpt2_jax[eval]'"
        ) from None
    try:
        return harness.TrainingHook(cfg, model_cfg, workdir)
    except harness.HarnessError as e:
        raise config_lib.ConfigError(str(e)) from None


def _prepare_workdir(cfg, workdir: Path, source: weights.Source) -> list[str]:
    """train.fresh / train.resume_step: moves old runs aside (never deletes); what it did."""
    done = []
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        if cfg.train.fresh:
            done += [f"train.fresh: moved {p.name} aside" for p in weights.start_fresh(workdir)]
        if source.kind == "checkpoint":
            moved = weights.supersede_after(workdir / "checkpoints", source.step)
            done += [f"train.resume_step={source.step}: moved {p} aside" for p in moved]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("gpt2_jax workdir ready")
    # One-time actions: config.json must not repeat them when the same run is resumed.
    with cfg.train.unlocked():
        cfg.train.fresh, cfg.train.resume_step = False, -1
    return done


def _run(
    cfg,
    workdir: Path,
    source,
    splits,
    train_blocks,
    loader,
    hf_params,
    stack,
    step_fn=None,
    harness_hook=None,
) -> dict:
    """The training proper; everything opened is closed by ``stack`` (errors included)."""
    model_cfg = source.model_cfg
    run_start = time.perf_counter()
    # ---- workdir
    moved = _prepare_workdir(cfg, workdir, source)
    ckpt = ckpt_lib.Checkpointer(
        workdir / "checkpoints",
        max_to_keep=cfg.train.keep_checkpoints,
        keep_best=cfg.train.keep_best,
    )
    stack.callback(ckpt.close)  # an open async manager must not outlive an error
    resume_step = source.step if source.kind == "checkpoint" else None
    total_steps = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    tx, schedule = optim.make_optimizer(cfg.optim, total_steps)

    # ---- state, created already sharded (or restored onto the mesh)
    mesh = sharding.make_mesh(cfg.mesh)
    rng = jax.random.PRNGKey(cfg.train.seed)

    def abstract_fn(mcfg):
        return jax.eval_shape(
            functools.partial(init_state, model_cfg=mcfg, tx=tx), rng, params=hf_params
        )

    def shardings_fn(abstract):
        return sharding.state_sharding(mesh, abstract)

    abstract = abstract_fn(model_cfg)
    state_sh = shardings_fn(abstract)
    if resume_step is not None:
        # In the checkpoint's own layout, converted if scan_layers changed.
        state = weights.restore(
            source, ckpt, abstract_fn, shardings_fn, "--config.train.resume_step"
        )
    else:
        init_fn = functools.partial(init_state, model_cfg=model_cfg, tx=tx)
        state = jax.jit(init_fn, out_shardings=state_sh)(rng, params=hf_params)
        hf_params = None  # one copy of the weights is enough
    _write_config(cfg, workdir)  # after the restore: an unreadable checkpoint changes nothing
    start = int(state["step"])

    accum = cfg.optim.accumulation_steps
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    step_fn = step_fn or jax.jit(  # the preflight's compiled step, when given
        functools.partial(train_step, model_cfg=model_cfg, tx=tx, **step_options(cfg)),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, None),
        donate_argnums=0,
    )

    def get_batch(step: int) -> jax.Array:
        local = train_blocks[loader.indices(step)]  # [B / processes, T]
        local = local.reshape(accum, -1, local.shape[-1])  # [accum, micro, T]
        return sharding.put_batch(local, batch_sh)

    from tqdm import tqdm

    show = cfg.train.progress and jax.process_index() == 0
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc="train",
        dynamic_ncols=True,
        # Steps are dispatched asynchronously and wait at each log step, so the bar moves in
        # bursts; the whole-run average gives a steady rate and ETA, the default EMA does not.
        smoothing=0.0,
        disable=not show,
        file=sys.stderr,
    )
    stack.callback(bar.close)
    log = MetricLogger(
        workdir,
        resume_step,
        bar if show else None,
        lambda: trackers.make(
            trackers.check(cfg.train.report_to), workdir, cfg.train, config_lib.to_dict(cfg)
        ),
    )
    stack.callback(log.close)
    # Run summary (summary.py) on stdout, and to the trackers with the resolved config.
    resumed = ckpt.directory / str(resume_step) if resume_step is not None else None
    start_text = summary.start_summary(
        config_lib.to_dict(cfg),
        params=model_lib.count_params(abstract["params"]),
        device_count=jax.device_count(),
        process_count=jax.process_count(),
        platform=jax.devices()[0].platform,
        mesh_shape=dict(mesh.shape),
        start_step=start,
        total_steps=total_steps,
        steps_per_epoch=loader.steps_per_epoch,
        blocks={"train": len(train_blocks), **{k: len(v) for k, v in splits.items()}},
        weights=summary.weights_source(resumed, cfg.init_from, cfg.train.seed),
        workdir=workdir,
        data=data_lib.cache_report({"train": train_blocks, **splits}),
    )
    log.echo(start_text)
    log.text(start, {"run/start": start_text}, config_lib.to_dict(cfg))
    for line in moved:
        log.echo(line)
    if resume_step is not None:
        log.echo(f"resumed from {ckpt.directory / str(resume_step)}")

    def save(step: int, evals: list[dict] | None = None) -> None:
        # keep_best ranks checkpoints by the first eval split's loss at that step.
        best = evals[0]["loss"] if (cfg.train.keep_best and evals) else None
        ckpt.save(step, state, config_lib.to_dict(cfg), eval_loss=best)

    def run_eval(step: int) -> list[dict]:
        results = evaluate_splits(cfg, model_cfg, state["params"], splits, mesh, progress=False)
        for r in results:
            log.write({"step": step, **r})
        return results

    harness_scalars: dict = {}

    def run_harness(step: int) -> None:
        harness_scalars.clear()
        harness_scalars.update(harness_hook(step, state["params"]))
        log.write({"step": step, "split": "lm_eval", **harness_scalars})

    harness_every = cfg.eval.harness_every if harness_hook is not None else 0

    # ---- the loop: metrics leave the device only at log, checkpoint and stop steps
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    throughput = _Throughput(cfg, model_cfg, jax.devices())
    guard = _NonFinite(cfg.train.nonfinite, cfg.train.max_nonfinite)
    pending: list[tuple[int, dict]] = []
    last_time, last_step = time.perf_counter(), start
    paused = 0.0  # seconds of evals since last_time: not training time
    step = start
    with _Interrupts() as interrupts:
        while step < total_steps:
            state, metrics = step_fn(state, get_batch(step))
            step += 1
            if step == start + 1:
                # The first step may carry compilation: tokens/s counts from its end.
                jax.block_until_ready(metrics["loss"])
                last_time, last_step = time.perf_counter(), step
            pending.append((step, metrics))
            log_now = step % cfg.train.log_every == 0 or step == total_steps
            eval_now = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0)
            eval_now = eval_now and step < total_steps  # the final eval comes after the loop
            ckpt_now = step < total_steps and (
                bool(cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0)
                or (cfg.train.keep_best and eval_now)  # a best candidate needs its weights
            )
            stop_now = _preempted(interrupts, step)
            if log_now or ckpt_now or stop_now:
                # Never checkpoint past a non-finite step (stop), nor skip one silently.
                window = guard.check(jax.device_get(pending), ckpt.latest_step())
                pending = []
            if log_now:
                now = time.perf_counter()
                record = {
                    "step": step,
                    "split": "train",
                    "loss": window["loss"],
                    "learning_rate": float(schedule(step - 1)),
                    "grad_norm": window["grad_norm"],
                }
                if step > last_step:  # not the first step's window alone
                    tps = tokens_per_step * (step - last_step) / (now - last_time - paused)
                    record.update(throughput.metrics(tps))
                if cfg.train.nonfinite == "skip":
                    record["nonfinite"] = window["nonfinite"]
                log.write(record)
                last_time, last_step, paused = now, step, 0.0
            bar.update(1)
            t_eval = time.perf_counter()
            evals = run_eval(step) if eval_now else None
            if harness_every and step % harness_every == 0 and step < total_steps:
                run_harness(step)
            paused += time.perf_counter() - t_eval
            if ckpt_now:
                save(step, evals)
            if stop_now:
                if ckpt.latest_step() != step:
                    save(step)
                ckpt.wait()
                name = signal.Signals(interrupts.signum or signal.SIGTERM).name
                log.echo(
                    f"{name}: saved step {step} to {ckpt.directory}; run the same command to resume"
                )
                raise Preempted(step, interrupts.signum or signal.SIGTERM)
        # ---- the end: final eval, then the final checkpoint carrying its eval loss
        results = run_eval(step)
        if harness_hook is not None:
            run_harness(step)
        if ckpt.latest_step() != step:
            save(step, results)
        ckpt.wait()
    end_text = summary.end_summary(
        results,
        harness=harness_scalars,
        start_step=start,
        end_step=step,
        wall_seconds=time.perf_counter() - run_start,
        paths={
            "checkpoints": ckpt.directory / str(ckpt.latest_step()),
            "metrics": workdir / "metrics.jsonl",
            "tensorboard": workdir / "tensorboard",
            "config": workdir / "config.json",
            **({"lm_eval": workdir / "lm_eval"} if harness_hook is not None else {}),
        },
    )
    log.echo(end_text)
    log.text(step, {"run/end": end_text})
    return {r["split"]: r for r in results}


class _Throughput:
    """tokens/s -> tokens/s, tokens/s per device and (where the peak is known) MFU."""

    def __init__(self, cfg, model_cfg, devices):
        self.devices = len(devices)
        self.flops_per_token = flops.flops_per_token(model_cfg, cfg.data.block_size)
        self.peak = float(cfg.train.peak_flops) or flops.peak_flops(
            devices[0].device_kind, model_cfg.dtype
        )

    def metrics(self, tokens_per_second: float) -> dict:
        out = {
            "tokens_per_second": tokens_per_second,
            "tokens_per_second_per_device": tokens_per_second / self.devices,
        }
        if self.peak:
            out["mfu"] = tokens_per_second * self.flops_per_token / (self.peak * self.devices)
        return out


class _NonFinite:
    """train.nonfinite on the host, at the steps metrics are fetched anyway.

    ``stop``: the first non-finite loss or gradient norm ends the run (TrainingError naming
    the step) before anything after it is saved. ``skip``: train_step already dropped those
    updates; this counts them and stops after ``max_nonfinite`` in a row.
    """

    def __init__(self, mode: str, max_in_a_row: int):
        self.mode, self.max_in_a_row, self.in_a_row = mode, max_in_a_row, 0

    def check(self, fetched: list[tuple[int, dict]], latest_saved: int | None) -> dict:
        """``fetched``: (step, host metrics) since the last check -> the window's averages."""
        bad = [s for s, m in fetched if not np.isfinite([m["loss"], m["grad_norm"]]).all()]
        for s, m in fetched:
            self.in_a_row = self.in_a_row + 1 if s in bad else 0
            if self.mode == "stop" and s in bad:
                what = "loss" if not np.isfinite(m["loss"]) else "gradient norm"
                value = m["loss"] if what == "loss" else m["grad_norm"]
                raise TrainingError(
                    f"{what} is {float(value)} at step {s}: training stopped, nothing saved "
                    f"after it (latest checkpoint: {latest_saved}). Lower "
                    f"optim.learning_rate, keep optim.grad_clip > 0, use model.dtype=float32, "
                    f"or set train.nonfinite=skip"
                )
            if self.in_a_row >= self.max_in_a_row:
                raise TrainingError(
                    f"{self.in_a_row} non-finite steps in a row (the last at step {s}, "
                    f"train.max_nonfinite={self.max_in_a_row}): training stopped; the latest "
                    f"checkpoint ({latest_saved}) holds only finite updates"
                )
        good = [m for s, m in fetched if s not in bad]
        return {
            "loss": float(np.mean([m["loss"] for m in good])) if good else None,
            "grad_norm": float(good[-1]["grad_norm"]) if good else None,
            "nonfinite": len(bad),
        }


class Preempted(Exception):
    """The run stopped on SIGTERM / Ctrl-C after saving ``step``; exit ``128 + signum``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        super().__init__(f"preempted at step {step}")
        self.step, self.signum = step, int(signum)
        self.exit_code = 128 + self.signum


def _preempted(interrupts: _Interrupts, step: int) -> bool:
    if jax.process_count() > 1:
        # Every host must agree on the step at which all of them save.
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step) or interrupts.requested
    return interrupts.requested


def _write_config(cfg, workdir: Path) -> None:
    """Records the resolved config; a changed config on resume is reported, not hidden."""
    if jax.process_index() != 0:
        return
    path = workdir / "config.json"
    new = config_lib.to_dict(cfg)
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
        changed = _diff(old, new)
        if changed:
            print(f"note: config differs from {path}: {', '.join(changed)}", file=sys.stderr)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out

"""Training: state, loss, the one jitted train step, and the loop.

This is the one module that knows everything (config, model, data, optimizer, mesh,
checkpoints). ``train_step`` is a module-level pure function, jitted once per run with
explicit shardings and a donated state.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
from gpt2_jax import model as model_lib
from gpt2_jax import optim, sharding, summary

State = dict[str, Any]  # {"step": int32[], "params": ..., "opt_state": ..., "rng": uint32[2]}


class TrainingError(RuntimeError):
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
    return jnp.mean(model_lib.hidden_token_nll(hidden, params["wte"]["embedding"], batch))


def train_step(
    state: State,
    batch: jax.Array,
    *,
    model_cfg: model_lib.GPT2Config,
    tx: optax.GradientTransformation,
) -> tuple[State, dict]:
    """One optimizer update from ``batch`` [accum, micro_batch, T] int32.

    Gradients of the ``accum`` microbatches are averaged by a scan inside the step (every
    block has the same T-1 targets, so this is the mean over all tokens).
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

    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new_state = {
        "step": state["step"] + 1,
        "params": optax.apply_updates(params, updates),
        "opt_state": opt_state,
        "rng": state["rng"],
    }
    return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}


# --------------------------------------------------------------------- logging


class MetricLogger:
    """metrics.jsonl + TensorBoard + stdout, written by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int | None, progress):
        self.enabled = jax.process_index() == 0
        self.progress = progress
        self.path = workdir / "metrics.jsonl"
        self._tb = None
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
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboardX is a dependency
            self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            split = record["split"]
            for k, v in record.items():
                if k not in ("step", "split") and isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{split}/{k}", v, record["step"])
            self._tb.flush()
        self.echo(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def echo(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


# ------------------------------------------------------------------------ the loop


class _Head:
    """The first ``n`` examples of an indexable dataset."""

    def __init__(self, blocks, n: int):
        self.blocks, self.n = blocks, min(n, len(blocks))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, idx):
        return self.blocks[idx]


class _Sigterm:
    """Turns SIGTERM into a flag the loop checks between steps (save, then exit)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners)
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate_splits(cfg, model_cfg, params, splits: dict, mesh, progress: bool) -> list[dict]:
    """Loss / perplexity on each split: run_clm blocks, or sliding windows if eval.stride."""
    from gpt2_jax import evaluate

    micro = cfg.train.batch_size // cfg.optim.accumulation_steps
    batch_size = cfg.eval.batch_size or micro
    if cfg.eval.stride > cfg.data.block_size:
        raise config_lib.ConfigError(
            f"eval.stride={cfg.eval.stride} must be <= data.block_size={cfg.data.block_size} "
            f"(the window length; a longer stride would skip tokens)"
        )
    out = []
    for name, blocks in splits.items():
        if cfg.eval.stride:
            tokens, _ = data_lib.load_token_stream(cfg.data, name)
            if cfg.eval.max_batches:
                # W windows start every stride tokens and the last one ends at the cut, so
                # the first max_batches batches of windows need (W - 1) * stride + block_size.
                windows = cfg.eval.max_batches * batch_size
                tokens = tokens[: (windows - 1) * cfg.eval.stride + cfg.data.block_size]
            res = evaluate.eval_sliding_window(
                model_cfg,
                params,
                np.asarray(tokens),
                max_length=cfg.data.block_size,
                stride=cfg.eval.stride,
                batch_size=batch_size,
                batch_sharding=sharding.batch_sharding(mesh),
                progress=progress,
            )
        else:
            if cfg.eval.max_batches:
                blocks = _Head(blocks, cfg.eval.max_batches * batch_size)
            res = evaluate.eval_blocks(
                model_cfg,
                params,
                blocks,
                batch_size,
                batch_sharding=sharding.batch_sharding(mesh),
                progress=progress,
            )
        out.append(
            {
                "split": name,
                **{
                    k: int(v) if isinstance(v, (int, np.integer)) else float(v)
                    for k, v in res.items()
                },
            }
        )
    return out


def _resolve_model(cfg, workdir: Path) -> tuple[str, Path | None]:
    """Decides where the weights come from and fixes ``cfg.model``'s shape accordingly.

    Resume order: 1. this workdir's own checkpoint (its saved model section wins, so a
    resumed run has exactly the shape it was saved with), 2. ``init_from`` weights (shape
    from their config.json, read before any weights are), 3. random init.
    Returns ("checkpoint" | "hf" | "scratch", the HF directory or None).
    """
    ckpt_dir = workdir / "checkpoints"
    if ckpt_dir.is_dir():
        with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as probe:
            saved = probe.restore_config() if probe.latest_step() is not None else None
        if saved is not None:
            with cfg.unlocked():
                cfg.model = ml_collections.ConfigDict(saved["model"])
            return "checkpoint", None
    if not cfg.init_from:
        return "scratch", None
    if not cfg.init_from.startswith("hf:") or len(cfg.init_from) <= 3:
        raise config_lib.ConfigError(
            f"init_from: {cfg.init_from!r} must be '' or 'hf:<dir or hub id>'"
        )
    from gpt2_jax import hf

    directory = hf.resolve(cfg.init_from)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise hf.HFImportError(f"{directory} has no config.json (a Hugging Face model directory?)")
    mcfg = hf.config_from_hf(
        json.loads(config_path.read_text()), str(config_path), **config_lib.runtime_fields(cfg)
    )
    config_lib.set_model_shape(cfg, mcfg)
    return "hf", directory


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) per ``cfg`` in ``workdir``; returns the final eval metrics.

    Raises ConfigError / DataError / CheckpointError / TrainingError with a clear message.
    """
    workdir = Path(workdir).absolute()
    sharding.maybe_initialize_distributed(cfg.distributed)
    num_devices = jax.device_count()

    # ---- where the weights come from, then everything checked before anything is written
    source, hf_dir = _resolve_model(cfg, workdir)
    model_cfg = config_lib.validate(cfg, num_devices)
    splits = data_lib.load_splits(cfg.data, ("train", *cfg.eval.splits))
    train_blocks = splits.pop("train")
    loader = data_lib.BatchLoader(
        len(train_blocks),
        cfg.train.batch_size,
        cfg.train.seed,
        jax.process_index(),
        jax.process_count(),
    )

    hf_params = None
    if source == "hf":  # a bad checkpoint fails here, before the workdir is touched
        from gpt2_jax import hf

        _, hf_params = hf.load_pretrained(hf_dir, **config_lib.runtime_fields(cfg))

    with contextlib.ExitStack() as stack:
        return _run(cfg, workdir, model_cfg, splits, train_blocks, loader, hf_params, stack)


def _run(cfg, workdir: Path, model_cfg, splits, train_blocks, loader, hf_params, stack) -> dict:
    """The training proper; everything opened is closed by ``stack`` (errors included)."""
    run_start = time.perf_counter()
    # ---- workdir
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep_checkpoints)
    stack.callback(ckpt.close)  # an open async manager must not outlive an error
    resume_step = ckpt.latest_step()
    _write_config(cfg, workdir)
    total_steps = cfg.train.steps or cfg.train.epochs * loader.steps_per_epoch
    tx, schedule = optim.make_optimizer(cfg.optim, total_steps)

    # ---- state, created already sharded (or restored onto the mesh)
    mesh = sharding.make_mesh(cfg.mesh)
    init_fn = functools.partial(init_state, model_cfg=model_cfg, tx=tx)
    rng = jax.random.PRNGKey(cfg.train.seed)
    abstract = jax.eval_shape(init_fn, rng, params=hf_params)
    state_sh = sharding.state_sharding(mesh, abstract)
    if resume_step is not None:
        state = ckpt.restore(resume_step, ckpt_lib.abstract_like(abstract, state_sh))
    else:
        state = jax.jit(init_fn, out_shardings=state_sh)(rng, params=hf_params)
        hf_params = None  # one copy of the weights is enough
    start = int(state["step"])

    accum = cfg.optim.accumulation_steps
    batch_sh = sharding.batch_sharding(mesh, leading=1)
    step_fn = jax.jit(
        functools.partial(train_step, model_cfg=model_cfg, tx=tx),
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
        disable=not show,
        file=sys.stderr,
    )
    stack.callback(bar.close)
    log = MetricLogger(workdir, resume_step, bar if show else None)
    stack.callback(log.close)
    # Run summary (summary.py) on stdout, and as TensorBoard text with the resolved config.
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
    )
    log.echo(start_text)
    if log.enabled:
        tb_dir = workdir / "tensorboard"
        summary.write_tensorboard(tb_dir, {"run/start": start_text}, start, config_lib.to_dict(cfg))
    if resume_step is not None:
        log.echo(f"resumed from {ckpt.directory / str(resume_step)}")

    def save(step: int) -> None:
        ckpt.save(step, state, config_lib.to_dict(cfg))

    def run_eval(step: int) -> list[dict]:
        results = evaluate_splits(cfg, model_cfg, state["params"], splits, mesh, progress=False)
        for r in results:
            log.write({"step": step, **r})
        return results

    # ---- the loop: metrics leave the device only at log steps
    tokens_per_step = cfg.train.batch_size * cfg.data.block_size
    pending: list[jax.Array] = []
    last_time, last_step = time.perf_counter(), start
    step = start
    with _Sigterm() as sigterm:
        while step < total_steps:
            state, metrics = step_fn(state, get_batch(step))
            step += 1
            pending.append(metrics["loss"])
            checkpoint_now = bool(
                cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0
            )
            if checkpoint_now and step % cfg.train.log_every:
                _check_finite(pending, step, ckpt)  # never checkpoint a diverged state
            if step % cfg.train.log_every == 0 or step == total_steps:
                loss = _check_finite(pending, step, ckpt)
                now = time.perf_counter()
                log.write(
                    {
                        "step": step,
                        "split": "train",
                        "loss": loss,
                        "learning_rate": float(schedule(step - 1)),
                        "grad_norm": float(metrics["grad_norm"]),
                        "tokens_per_second": tokens_per_step
                        * (step - last_step)
                        / (now - last_time),
                    }
                )
                pending, last_time, last_step = [], now, step
            bar.update(1)
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < total_steps:
                run_eval(step)
            if checkpoint_now:
                save(step)
            if _preempted(sigterm, step):
                if ckpt.latest_step() != step:
                    save(step)
                ckpt.wait()
                log.echo(
                    f"SIGTERM: saved step {step} to {ckpt.directory}; "
                    f"run the same command to resume"
                )
                raise Preempted(step)
        if ckpt.latest_step() != step:
            save(step)
        results = run_eval(step)
        ckpt.wait()
    end_text = summary.end_summary(
        results,
        start_step=start,
        end_step=step,
        wall_seconds=time.perf_counter() - run_start,
        paths={
            "checkpoints": ckpt.directory / str(ckpt.latest_step()),
            "metrics": workdir / "metrics.jsonl",
            "tensorboard": workdir / "tensorboard",
            "config": workdir / "config.json",
        },
    )
    log.echo(end_text)
    if log.enabled:
        summary.write_tensorboard(workdir / "tensorboard", {"run/end": end_text}, step)
    return {r["split"]: r for r in results}


def _check_finite(pending: list[jax.Array], step: int, ckpt) -> float:
    """Mean of the pending step losses (one host sync); TrainingError if any is not finite."""
    losses = np.asarray(jax.device_get(jnp.stack(pending)))
    loss = float(losses.mean())
    if not np.all(np.isfinite(losses)):
        raise TrainingError(
            f"loss is {loss} at step {step}: training stopped, no checkpoint written for it "
            f"(latest good: {ckpt.latest_step()}). Lower optim.learning_rate, keep "
            f"optim.grad_clip > 0, or use model.dtype=float32."
        )
    return loss


class Preempted(Exception):
    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}")
        self.step = step


def _preempted(sigterm: _Sigterm, step: int) -> bool:
    if jax.process_count() > 1:
        # Every host must agree on the step at which all of them save.
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step) or sigterm.requested
    return sigterm.requested


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

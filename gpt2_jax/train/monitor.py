"""What watches a training run: the metric logger, throughput, non-finite steps, signals.

Used by ``train.py``'s loop; none of it touches the model or the optimizer.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import jax
import numpy as np

from gpt2_jax.core import workdir as wd
from gpt2_jax.errors import UserError, signal_exit_code
from gpt2_jax.model import flops


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite steps): a user-facing stop, nothing saved after it."""


class MetricLogger:
    """metrics.jsonl + the trackers (``train.report_to``) + stdout, by process 0 only."""

    def __init__(self, workdir: Path, resume_step: int | None, progress, make_trackers):
        self.enabled = jax.process_index() == 0
        self.progress = progress
        self.path = workdir / wd.METRICS
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


class Interrupts:
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


class Throughput:
    """tokens/s -> tokens/s, tokens/s per device and (where the peak is known) MFU."""

    def __init__(self, plan, model_cfg, devices):
        self.devices = len(devices)
        self.flops_per_token = flops.flops_per_token(model_cfg, plan.data.block_size)
        self.peak = float(plan.train.peak_flops) or flops.peak_flops(
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


class NonFinite:
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
        self.exit_code = signal_exit_code(self.signum)


def preempted(interrupts: Interrupts, step: int) -> bool:
    if jax.process_count() > 1:
        # Every host must agree on the step at which all of them save.
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step) or interrupts.requested
    return interrupts.requested


def write_config(record: dict, workdir: Path) -> None:
    """Records the resolved config (``plan.record``); a changed config on resume is
    reported, not hidden."""
    if jax.process_index() != 0:
        return
    path = workdir / wd.CONFIG
    new = record
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

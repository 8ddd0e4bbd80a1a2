"""Training curves of one or more runs as one PNG, from each workdir's ``metrics.jsonl``.

    gpt2-jax plot runs/a [runs/b ...] [--out=FILE.png]

Four panels against the optimizer step: loss (train raw and smoothed, eval), learning
rate, tokens/s and gradient norm. Several runs share the panels, one colour per run,
labelled by the workdir's name. Drawn with matplotlib's Agg canvas (no display needed,
no global pyplot state).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gpt2_jax.core import workdir as wd
from gpt2_jax.errors import UserError

METRICS_FILE = wd.METRICS
DEFAULT_NAME = "curves.png"


class PlotError(UserError, ValueError):
    """A workdir without usable metrics, or an output path that can't be written."""


# ---------------------------------------------------------------- reading


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl``, in file order.

    Raises PlotError naming the path when the file is missing, empty or not JSON lines.
    """
    path = Path(workdir) / METRICS_FILE
    if not Path(workdir).is_dir():
        raise PlotError(f"{workdir}: no such run directory")
    if not path.is_file():
        raise PlotError(f"{path}: no such file (has this run logged a step yet?)")
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise PlotError(f"{path}:{n}: a metrics line needs an integer 'step'")
        records.append(rec)
    if not records:
        raise PlotError(f"{path}: no metrics in the file")
    return records


def series(records: list[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps [n] int, values [n] float) of ``key`` on ``split`` lines, sorted by step.

    A step logged twice (a resumed run re-logs the steps after its checkpoint) keeps the
    last value.
    """
    by_step = {
        r["step"]: float(r[key])
        for r in records
        if r.get("split") == split and isinstance(r.get(key), (int, float))
    }
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Debiased exponential moving average [n] (TensorBoard's smoothing slider).

    ``smoothing`` in [0, 1): 0 returns ``values``. Debiasing divides by ``1 - s**k`` so
    the first points are not pulled towards 0.
    """
    out = np.empty_like(values, dtype=np.float64)
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = smoothing * acc + (1 - smoothing) * v
        weight = smoothing * weight + (1 - smoothing)
        out[i] = acc / weight
    return out


def run_labels(workdirs: list[str]) -> list[str]:
    """A legend label per workdir: its name, or the path as given when names repeat."""
    names = [Path(w).resolve().name or str(w) for w in workdirs]
    return [n if names.count(n) == 1 else str(w) for n, w in zip(names, workdirs, strict=True)]


def default_out(workdirs: list[str]) -> Path:
    """``WORKDIR/curves.png`` for one run; ``./curves.png`` for several (no run owns it)."""
    return Path(workdirs[0]) / DEFAULT_NAME if len(workdirs) == 1 else Path(DEFAULT_NAME)


# ---------------------------------------------------------------- drawing


def plot_runs(workdirs: list[str], out: str | Path | None = None, smoothing: float = 0.6) -> Path:
    """Draws the runs' curves into one PNG; returns its path.

    Every workdir is read before anything is drawn, so a bad one writes nothing.
    """
    if not workdirs:
        raise PlotError("give at least one WORKDIR")
    if not 0 <= smoothing < 1:
        raise PlotError(f"--smoothing={smoothing}: must be in [0, 1)")
    runs = [read_metrics(w) for w in workdirs]
    out = Path(out) if out else default_out(workdirs)
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out={out}: the file name must end in .png")
    if not out.parent.is_dir():
        raise PlotError(f"--out={out}: directory {out.parent} does not exist")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    harness = any(r.get("split") == "lm_eval" for records in runs for r in records)
    fig = Figure(figsize=(12, 12 if harness else 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3 if harness else 2, 2).ravel()
    ax_loss, ax_lr, ax_tps, ax_gn = axes[:4]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for records, label, color in zip(runs, run_labels(workdirs), colors, strict=True):
        _draw_run(records, label, color, smoothing, (ax_loss, ax_lr, ax_tps, ax_gn))
        if harness:
            _draw_harness(records, label, color, axes[4:])
    if harness:
        axes[4].set(title="lm-eval: accuracy and match rates", ylabel="fraction")
        axes[5].set(title="lm-eval: perplexities and bits per byte", ylabel="log scale")
        axes[5].set_yscale("log")

    ax_loss.set(
        title="Loss per predicted token (faint: raw train loss)",
        ylabel="cross-entropy (nats, log scale)",
    )
    ax_loss.set_yscale("log")
    _plain_log_ticks(ax_loss)
    ax_lr.set(title="Learning rate", ylabel="learning rate")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax_tps.set(title="Throughput", ylabel="tokens / s (all devices)")
    ax_tps.set_ylim(bottom=0)
    ax_gn.set(title="Gradient norm (before clipping)", ylabel="global L2 norm (log scale)")
    ax_gn.set_yscale("log")
    _plain_log_ticks(ax_gn)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(True, which="major", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    names = ", ".join(run_labels(workdirs))
    fig.suptitle(f"gpt2-jax: {names}" if len(names) < 100 else f"gpt2-jax: {len(runs)} runs")
    fig.savefig(out, format="png")
    return out


def _draw_run(records, label, color, smoothing, axes) -> None:
    ax_loss, ax_lr, ax_tps, ax_gn = axes
    steps, loss = series(records, "train", "loss")
    if len(steps):
        # Raw train loss thin and faint, its smoothed trend in the run's colour.
        ax_loss.plot(steps, loss, color=color, alpha=0.25, linewidth=1)
        ax_loss.plot(steps, ema(loss, smoothing), color=color, label=f"{label} train (smoothed)")
    eval_splits = sorted({r["split"] for r in records if r.get("split", "train") != "train"})
    for i, split in enumerate(eval_splits):
        e_steps, e_loss = series(records, split, "loss")
        if len(e_steps):
            ax_loss.plot(
                e_steps,
                e_loss,
                color=color,
                linestyle="--",
                marker="os^vD"[i % 5],
                label=f"{label} {split}",
            )
            # The last eval is what a run is judged by: print it on the panel.
            ax_loss.annotate(
                f"{e_loss[-1]:.3f}",
                (e_steps[-1], e_loss[-1]),
                textcoords="offset points",
                xytext=(4, 6),
                color=color,
                fontsize="small",
            )
    for ax, key in ((ax_lr, "learning_rate"), (ax_tps, "tokens_per_second"), (ax_gn, "grad_norm")):
        s, v = series(records, "train", key)
        if len(s):
            ax.plot(s, v, color=color, label=label)


def _is_perplexity(metric: str) -> bool:
    return "perplexity" in metric or "bits_per_byte" in metric


def _draw_harness(records, label, color, axes) -> None:
    """Every ``lm_eval/<task>/<metric>`` of the ``lm_eval`` lines: rates on the first
    panel, perplexities (and bits per byte) on the second, one marker a metric."""
    keys = sorted({k for r in records if r.get("split") == "lm_eval" for k in r if "/" in k})
    for i, key in enumerate(keys):
        s, v = series(records, "lm_eval", key)
        ax = axes[1] if _is_perplexity(key) else axes[0]
        name = key.removeprefix("lm_eval/")
        ax.plot(s, v, color=color, marker="os^vDP*X"[i % 8], label=f"{label} {name}")


def _plain_log_ticks(ax) -> None:
    """Log-scale ticks at 1..9 times powers of ten, as plain numbers (4, 5, 6, 8, 10), not
    6x10^0: a loss falling from 10.8 to 5 spans less than one decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=np.arange(1, 10), numticks=30))
    ax.yaxis.set_minor_locator(LogLocator(base=10, subs=np.arange(1, 10) + 0.5, numticks=30))
    ax.yaxis.set_major_formatter(
        FuncFormatter(lambda y, _: f"{y:g}" if y > 0 and math.isfinite(y) else "")
    )
    ax.yaxis.set_minor_formatter(NullFormatter())


def cmd_plot(args, overrides) -> int:
    """``gpt2-jax plot``: the runs' curves into one PNG."""
    from gpt2_jax.cli.args import UsageError

    if overrides:
        raise UsageError(f"plot takes no --config.* flags (got --config.{next(iter(overrides))})")
    print(plot_runs(args.workdirs + args.workdir, args.out, args.smoothing))
    return 0

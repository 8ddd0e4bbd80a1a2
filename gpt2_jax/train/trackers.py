"""Experiment trackers: where a run's metrics go besides metrics.jsonl (always written).

``train.report_to`` lists them: ``tensorboard`` (the default), ``wandb``, or ``none``.
Each is one small class with the same three methods, which the training loop calls on
process 0 only:

- ``log(step, scalars)``: ``{"train/loss": 3.2, "lm_eval/hellaswag/acc": 0.3, ...}``;
- ``log_text(step, texts, config=None)``: ``{"run/start": text}`` (and the resolved config);
- ``finish()``.

metrics.jsonl stays the record that ``gpt2-jax plot`` reads and resumes trim.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from gpt2_jax.core import workdir as wd
from gpt2_jax.errors import UserError

TRACKERS = ("tensorboard", "wandb", "none")


class TrackerError(UserError, ValueError):
    """A ``train.report_to`` problem: an unknown name, or wandb not installed."""


def check_names(report_to) -> tuple[str, ...]:
    """The tracker names of ``train.report_to``, checked before anything compiles."""
    names = tuple(str(n).strip() for n in report_to if str(n).strip())
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"train.report_to: {name!r} is not one of {', '.join(TRACKERS)}")
    if "none" in names and len(names) > 1:
        raise TrackerError("train.report_to: 'none' cannot be combined with other trackers")
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise TrackerError(
                "train.report_to has wandb, but the wandb package is not installed: "
                "pip install 'gpt2_jax[wandb]'"
            ) from None
    return () if names == ("none",) else names


class TensorBoard:
    """tensorboardX event files under ``WORKDIR/tensorboard``."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.logdir = Path(workdir) / wd.TENSORBOARD
        self.writer = SummaryWriter(str(self.logdir))

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_text(self, step: int, texts: dict[str, str], config: dict | None = None) -> None:
        from gpt2_jax.train import summary

        summary.write_tensorboard(self.logdir, texts, step, config)

    def finish(self) -> None:
        self.writer.close()


class WandB:
    """A Weights & Biases run (``train.wandb.{project, entity, name, tags}``), its files under
    ``WORKDIR/wandb``. The run id is kept in ``WORKDIR/wandb_run_id``: a resumed training
    run continues the same W&B run (``resume="allow"``). ``WANDB_MODE=offline`` works."""

    def __init__(self, workdir: Path, wandb_cfg, config: dict):
        import wandb

        workdir = Path(workdir)
        id_file = workdir / wd.WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        tags = [t for t in (wandb_cfg.tags or ()) if t]
        self.run = wandb.init(
            project=wandb_cfg.project or "gpt2_jax",
            entity=wandb_cfg.entity or None,
            name=wandb_cfg.name or workdir.name,
            tags=tags or None,
            config=config,
            id=run_id,
            resume="allow",
            dir=str(workdir),
        )
        id_file.write_text(run_id + "\n")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=step)

    def log_text(self, step: int, texts: dict[str, str], config: dict | None = None) -> None:
        for tag, text in texts.items():  # the config went to wandb.init
            self.run.summary[tag] = text

    def finish(self) -> None:
        self.run.finish()


def make(names: tuple[str, ...], workdir: Path, train_cfg, config: dict) -> list:
    """The trackers ``names`` (from ``check``) for this run; call on process 0 only."""
    out = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoard(workdir))
        elif name == "wandb":
            out.append(WandB(workdir, train_cfg.wandb, config))
    return out

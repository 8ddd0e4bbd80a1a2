"""The typed ``optim`` section: what the optimizer and its schedule are built from.

The plan builds it from the config's ``optim`` keys (same names; their one-line comments
are in ``config/base.py``) and validates it here, beside its definition.
"""

from __future__ import annotations

import dataclasses

from gpt2_jax.errors import require

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    decay_embeddings: bool
    b1: float
    b2: float
    eps: float
    grad_clip: float
    accumulation_steps: int

    def validate(self) -> None:
        """Raises ConfigError naming the key (the batch's divisibility by the accumulation
        is the plan's check: it involves ``train.batch_size``)."""
        require(self.accumulation_steps >= 1, "optim.accumulation_steps", "must be >= 1")
        require(
            self.learning_rate > 0,
            "optim.learning_rate",
            f"must be positive, got {self.learning_rate}",
        )
        require(
            self.schedule in SCHEDULES,
            "optim.schedule",
            f"{self.schedule!r} is not one of {', '.join(SCHEDULES)}",
        )
        require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")

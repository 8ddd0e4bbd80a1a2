"""The config's typed, frozen sections, and how a ConfigDict section becomes one.

Each section is a frozen dataclass whose fields are exactly the config's keys (their one-line
comments are in ``config/base.py``), validated beside its definition:

    model         model.GPT2Config (built by ``model.config_from_section``)
    data          data's DataConfig
    optim         optim.config.OptimConfig
    mesh          parallel.config.MeshConfig;  distributed: parallel.config.DistributedConfig
    train, eval   TrainConfig, EvalConfig (here: only the commands read them)
    lora          LoraSection (here), whose ``lora_config()`` is model.lora.LoraConfig

The plan (``config/plan.py``) builds them once; below it nothing reads a ConfigDict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from gpt2_jax.errors import ConfigError, require
from gpt2_jax.model import lora as lora_lib

T = TypeVar("T")


def typed(cls: type[T], section: Any) -> T:
    """``cls`` (a frozen dataclass) from a config section: one field per key, nested
    dataclasses built the same way, lists as tuples. Keys the dataclass does not have are
    not read (``tests/test_config.py`` checks that the defaults have none)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = section[f.name]
        sub = _dataclass_type(cls, f)
        if sub is not None:
            v = typed(sub, v)
        elif isinstance(v, list):
            v = tuple(v)
        values[f.name] = v
    return cls(**values)


def _dataclass_type(cls, f):
    hint = f.type if not isinstance(f.type, str) else _HINTS.get((cls.__name__, f.name))
    return hint if dataclasses.is_dataclass(hint) else None


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    project: str
    entity: str
    name: str
    tags: tuple


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int
    steps: int
    epochs: int
    seed: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int
    keep_best: bool
    resume_step: int
    fresh: bool
    nonfinite: str
    max_nonfinite: int
    progress: bool
    preflight: bool
    peak_flops: float
    report_to: tuple
    wandb: WandbConfig

    def validate(self) -> None:
        require(self.batch_size > 0, "train.batch_size", f"must be positive, got {self.batch_size}")
        require(
            self.steps >= 0 and self.epochs >= 0,
            "train.steps",
            "train.steps and train.epochs must be >= 0",
        )
        require(self.steps > 0 or self.epochs > 0, "train.steps", "set train.steps or train.epochs")
        for key in ("log_every", "eval_every", "checkpoint_every"):
            value = getattr(self, key)
            require(value >= 0, f"train.{key}", f"must be >= 0, got {value}")
        require(self.log_every > 0, "train.log_every", "must be positive")
        require(
            self.nonfinite in ("stop", "skip"),
            "train.nonfinite",
            f"{self.nonfinite!r} is not one of stop, skip",
        )
        require(self.max_nonfinite >= 1, "train.max_nonfinite", "must be >= 1")
        require(self.resume_step >= -1, "train.resume_step", "must be a saved step, or -1 (latest)")
        require(
            not (self.fresh and self.resume_step >= 0),
            "train.fresh",
            "train.fresh=true starts over: it cannot be combined with train.resume_step",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int
    max_batches: int
    stride: int
    splits: tuple
    harness_tasks: str
    harness_every: int
    harness_include_path: str
    harness_limit: int
    harness_num_fewshot: int

    def validate(self) -> None:
        """The harness keys (the batch and stride are checked where they are decided:
        ``plan.eval_batch``, with the train batch and the block size)."""
        require(self.harness_every >= 0, "eval.harness_every", "must be >= 0 (0: at the end)")
        require(self.harness_limit >= 0, "eval.harness_limit", "must be >= 0 (0: every doc)")
        require(
            self.harness_num_fewshot >= -1,
            "eval.harness_num_fewshot",
            "must be >= 0, or -1 for each task's default",
        )


@dataclasses.dataclass(frozen=True)
class LoraSection:
    """The ``lora`` keys. LoRA is on when ``rank > 0`` or ``init_from`` names a PEFT
    adapter (whose adapter_config.json then fixes rank, alpha and targets)."""

    rank: int
    alpha: float
    dropout: float
    targets: str
    init_from: str

    @property
    def on(self) -> bool:
        return self.rank > 0 or bool(self.init_from)

    def lora_config(self) -> lora_lib.LoraConfig | None:
        """The adapters' config (model.lora.LoraConfig) for ``rank > 0``, else None."""
        return lora_lib.lora_from_section(self)

    def validate(self) -> None:
        require(
            isinstance(self.rank, int) and self.rank >= 0,
            "lora.rank",
            f"must be an integer >= 0 (0 = off), got {self.rank!r}",
        )
        as_config = lora_lib.lora_from_section(dataclasses.replace(self, rank=self.rank or 1))
        try:
            as_config.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None


_HINTS = {("TrainConfig", "wandb"): WandbConfig}

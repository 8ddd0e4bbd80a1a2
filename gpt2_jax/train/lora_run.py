"""What a LoRA training run holds besides its train state: the frozen base, on device.

``prepare(plan)`` (before the step compiles, nothing written yet) loads the base from
``init_from``, hashes it, refuses a resume on other weights than the checkpoint's adapters
were trained on (``weights.lora_base.check_base``), reads ``lora.init_from``'s starting
adapters, and records the base's identity in the run's config record. The loop places the
base on the mesh once (``place``), passes it to every step as a non-donated argument, and
evaluates the adapters merged into it (``merger``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

import jax

from gpt2_jax.errors import ConfigError
from gpt2_jax.model import lora
from gpt2_jax.weights import lora_base, peft
from gpt2_jax.weights import resolve as weights


@dataclasses.dataclass(frozen=True)
class LoraRun:
    """A LoRA run's frozen base and starting adapters (host arrays), and its record."""

    base: dict  # the base params, laid out as the run's model config says
    adapters: dict | None  # lora.init_from's adapters (a new run); None: fresh or resumed
    record: dict  # plan.record with record["lora"]["base"] = the base's identity


def prepare(plan) -> LoraRun:
    """The base of ``plan`` (a LoRA training plan: ``plan.model.lora`` set) loaded from
    ``init_from`` and identified; on resume, checked against the checkpoint's record
    (ConfigError naming both bases); ``lora.init_from``'s adapters for a new run."""
    source = plan.source
    resuming = source.kind == "checkpoint"
    base = weights.load_hf_params(source.base if resuming else source)
    identity = lora_base.base_identity(plan.init_from, base)
    if resuming:
        lora_base.check_base(source.base_record, identity, str(source.path / str(source.step)))
    adapters = None
    if not resuming and plan.lora.init_from:
        try:
            _, adapters, _ = peft.read_adapter(
                plan.lora.init_from, plan.model, plan.model.scan_layers
            )
        except peft.PeftError as e:
            raise ConfigError(f"lora.init_from: {e}") from None
    record = copy.deepcopy(plan.record)
    record["lora"]["base"] = identity
    return LoraRun(base, adapters, record)


def place(base: dict, shardings: Any) -> dict:
    """The host base params on the mesh, each device given only its shard (every process
    holds the whole base: it read the same files)."""

    def put(x, sh):
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    return jax.tree.map(put, base, shardings)


def merger(lora_cfg: lora.LoraConfig, shardings: Any):
    """A jitted ``merge(base, adapters) -> params`` (``model.lora.merge``) whose output is
    laid out as the base: what the in-training evaluations read, with the model config
    without LoRA."""
    return jax.jit(functools.partial(lora.merge, lora_cfg=lora_cfg), out_shardings=shardings)

"""Memory preflight: compile the train step before anything runs and refuse a run that
cannot fit in the device's memory, instead of being killed by the kernel or XLA later.

XLA's ``compiled.memory_analysis()`` gives, per device, the argument bytes (train state +
batch), the output bytes, how much of the output aliases the donated input, and the
temporaries (activations kept for the backward pass, gradients, logits, ...). The peak
is about ``arguments + outputs - aliased + temporaries``. The device's budget is its
``memory_stats()['bytes_limit']`` (GPU / TPU) or, on CPU, MemAvailable from /proc/meminfo
shared among this process's devices (simulated CPU devices share one RAM).

``train.build_step`` compiles the step (once: the loop runs that executable) and hands
it here; this module imports neither the trainer nor the optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import sys
import zlib

import jax
import numpy as np

from gpt2_jax.errors import ConfigError

GiB = 1024**3


class PreflightError(ConfigError):
    """The run would not fit in memory (a user error: exit 2, nothing written)."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device."""

    params: int
    opt_state: int
    batch: int
    temp: int  # activations, gradients, logits and other temporaries
    peak: int  # arguments + outputs not aliased to donated inputs + temporaries

    def describe(self) -> str:
        return (
            f"predicted peak {_gib(self.peak)} per device (parameters {_gib(self.params)}, "
            f"optimizer state {_gib(self.opt_state)}, batch {_gib(self.batch)}, "
            f"activations/temporaries {_gib(self.temp)})"
        )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / 1024**2:.1f} MiB"


# ------------------------------------------------------------------ pure pieces


def device_bytes(abstract_tree) -> int:
    """Bytes one device holds of a pytree of ShapeDtypeStructs carrying shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.shape
        if getattr(leaf, "sharding", None) is not None:
            shape = leaf.sharding.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def estimate(memory_analysis, abstract_state: dict, abstract_batch) -> MemoryEstimate:
    """A MemoryEstimate from XLA's CompiledMemoryStats of the train step."""
    m = memory_analysis
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return MemoryEstimate(
        params=device_bytes(abstract_state["params"]),
        opt_state=device_bytes(abstract_state["opt_state"]),
        batch=device_bytes(abstract_batch),
        temp=int(m.temp_size_in_bytes),
        peak=int(peak),
    )


def meminfo_available(text: str) -> int | None:
    """MemAvailable in bytes from the text of /proc/meminfo (None if absent)."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel reports kB
    return None


def device_budget(device, local_devices: int) -> tuple[int | None, str]:
    """(bytes one device may use, where the figure comes from); None when unknown."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # some backends do not implement it
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.platform} bytes_limit"
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                avail = meminfo_available(f.read())
        except OSError:
            avail = None
        if avail is not None:
            share = avail // max(local_devices, 1)
            return share, f"MemAvailable {_gib(avail)} / {local_devices} CPU devices on this host"
    return None, "unknown"


def advice(plan) -> str:
    """What to change, skipping what is already done (``plan``: the run's plan)."""
    tips = []
    if not plan.model.remat:
        tips.append("--config.model.remat=True (recompute activations)")
    tips.append(
        f"--config.optim.accumulation_steps={2 * plan.optim.accumulation_steps} "
        f"(smaller microbatches, same batch)"
    )
    tips.append("a larger --config.mesh.fsdp (shard parameters and optimizer state)")
    tips.append(f"a smaller --config.train.batch_size (now {plan.train.batch_size})")
    return "; ".join(tips)


def check_fits(est: MemoryEstimate, budget: int | None, source: str, plan) -> None:
    """Raises PreflightError when the predicted peak exceeds the budget."""
    if budget is None or est.peak <= budget:
        return
    raise PreflightError(
        f"memory preflight: {est.describe()} exceeds the {_gib(budget)} available "
        f"({source}). Try {advice(plan)}; or skip this check with --config.train.preflight=False"
    )


def _processes_on_this_host() -> int:
    """How many of the run's processes share this host (collective: every process calls it)."""
    if jax.process_count() == 1:
        return 1
    from jax.experimental import multihost_utils

    mine = np.int32(zlib.crc32(socket.gethostname().encode()) & 0x7FFFFFFF)
    return int(np.sum(multihost_utils.process_allgather(mine) == mine))


# ------------------------------------------------------------------ the train step


def check_step(compiled, abstract_state, abstract_batch, plan) -> MemoryEstimate | None:
    """Refuses a compiled train step that cannot fit in the devices' memory.

    ``compiled``: the jitted step, lowered and compiled on the run's mesh; the abstract
    state and batch it was compiled for (ShapeDtypeStructs with shardings); ``plan`` for
    ``train.preflight`` and the advice. Raises PreflightError when it cannot fit; returns
    the estimate (None when skipped). With several processes all of them agree on the
    verdict (and this is a barrier: no process writes to the workdir before every one has
    decided where its weights come from).
    """
    est, budget, source = None, None, "unknown"
    analysis = compiled.memory_analysis() if plan.train.preflight else None
    if analysis is not None:  # None: skipped, or a backend without the analysis
        est = estimate(analysis, abstract_state, abstract_batch)
        device = jax.local_devices()[0]
        # CPU devices of every process on this host share its RAM (e.g. under launch).
        sharing = jax.local_device_count() * (
            _processes_on_this_host() if device.platform == "cpu" else 1
        )
        budget, source = device_budget(device, sharing)
    fits = est is None or budget is None or est.peak <= budget
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        # Always gathered, even when skipped: every process must take the same exit.
        all_fit = bool(np.all(multihost_utils.process_allgather(np.int32(fits))))
        if fits and not all_fit:
            raise PreflightError("memory preflight: another process's devices cannot fit the run")
    if est is not None and jax.process_index() == 0:
        limit = f"of {_gib(budget)} ({source})" if budget is not None else "(budget unknown)"
        print(f"preflight: {est.describe()} {limit}", file=sys.stderr, flush=True)
    if est is not None:
        check_fits(est, budget, source, plan)
    return est

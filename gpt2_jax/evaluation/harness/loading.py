"""The harness's weights: a run's checkpoint or ``hf:`` weights through the one config path
(``config.base.for_weights``) and the one resolver (``config.plan.weights_only``), as
every other command loads them; and params as the backend keeps them (host, unrolled)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.core import workdir as wd
from gpt2_jax.evaluation import harness_args
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.weights import resolve as weights


def weights_config(workdir, init_from: str, dtype: str | None, adapter: str = ""):
    """The config the resolver reads: the run's saved one, or the defaults + init_from;
    ``dtype`` if given, and no dropout (evaluation is deterministic anyway; the config
    then says what ran); ``adapter``: a PEFT adapter merged into ``init_from``'s weights."""
    if workdir and not (Path(workdir) / wd.CONFIG).is_file():
        raise config_lib.ConfigError(
            f"--workdir={workdir} has no config.json (is it a gpt2-jax run directory?)"
        )
    overrides = {"model.dropout": "0.0"}
    if dtype:
        if dtype not in gpt2_config.DTYPES:
            raise harness_args.HarnessError(
                f"dtype={dtype!r} is not one of {list(gpt2_config.DTYPES)}"
            )
        overrides["model.dtype"] = dtype
    if adapter:
        if workdir and not init_from:
            raise harness_args.HarnessError(
                "adapter= merges a PEFT adapter into init_from= weights, not into a workdir's"
            )
        overrides["lora.init_from"] = str(adapter)
    return config_lib.for_weights(workdir or None, init_from, overrides)


def load_weights(
    workdir=None, step=None, init_from: str = "", dtype: str | None = None, adapter: str = ""
) -> tuple[gpt2_config.GPT2Config, dict, Any]:
    """(model config, params, weights.Source) of a workdir's checkpoint or of ``hf:``
    weights (with ``adapter``, a PEFT adapter directory, merged in), through the one
    resolver every command uses. A LoRA run's checkpoint comes merged into its base."""
    cfg = weights_config(workdir, init_from, dtype, adapter)
    plan = plan_lib.weights_only(cfg, workdir or None, step, jax.device_count())
    return plan.model, weights.params_of(plan.source), plan.source


def check_weights(
    workdir=None, step=None, init_from: str = "", dtype: str | None = None, adapter: str = ""
):
    """Raises the one-line error of a missing run, checkpoint step, HF directory or adapter
    config, without reading any weights (the command checks this before the tasks)."""
    cfg = weights_config(workdir, init_from, dtype, adapter)
    plan_lib.resolve_weights(cfg, workdir or None, harness_args.parse_step_arg(step))


def host_tree(params: dict) -> dict:
    """params as host numpy arrays, layers unrolled (``h_<i>``). An array spread over
    several processes (FSDP) is gathered: every process must call this together."""
    from jax.experimental import multihost_utils

    def host(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.sharding.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    params = jax.tree.map(host, params)
    return model_lib.unstack_layers(params) if "h" in params else params

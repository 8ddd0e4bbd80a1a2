"""The run plan: every value a command derives from (config, workdir), decided once.

How a config becomes a run: the config file and its overrides give a locked ConfigDict
(config/base.py); ``plan.training`` / ``plan.weights_only`` turn it, with the workdir, into a
frozen ``Plan``: the config's typed sections (config/sections.py), the model config that runs,
where its weights come from (weights/resolve.py, the one resolver), the mesh shape, the micro
and eval batch sizes, the total steps, the resolved config to record, and the notes to report
(warnings, runtime changes on resume). The ConfigDict stops here: the commands and everything
they call read the plan; none works these values out again.
"""

from __future__ import annotations

import dataclasses

from gpt2_jax.config import base as config_lib
from gpt2_jax.config.sections import EvalConfig, TrainConfig
from gpt2_jax.data.config import DataConfig
from gpt2_jax.errors import ConfigError
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.optim.config import OptimConfig
from gpt2_jax.parallel.config import DistributedConfig, MeshConfig
from gpt2_jax.weights import resolve as weights


@dataclasses.dataclass(frozen=True)
class Plan:
    model: gpt2_config.GPT2Config  # what runs: the weights' shape with the user's runtime fields
    source: weights.Source  # checkpoint | hf | scratch
    mesh_shape: tuple[int, int]  # (data, fsdp)
    micro_batch: int  # sequences per microbatch (global): train.batch_size / accumulation
    eval_batch: int  # sequences per eval batch (global)
    data: DataConfig
    optim: OptimConfig
    train: TrainConfig
    eval: EvalConfig
    mesh: MeshConfig
    distributed: DistributedConfig
    init_from: str
    record: dict  # the resolved config as a run records it (config.json, checkpoints)
    total_steps: int = 0  # optimizer steps of the whole run (train; 0 until the data is known)
    notes: tuple[str, ...] = ()  # warnings and resume changes, printed once by the command


def weights_request(cfg, training: bool = False) -> weights.Request:
    """What ``cfg`` asks of the weights resolver (weights/resolve.py)."""
    init_from = config_lib.init_from_spec(cfg.init_from)
    return weights.Request(
        hf_spec=init_from,
        runtime=config_lib.runtime_fields(cfg),
        requested=config_lib.model_config(cfg) if training and init_from is None else None,
        fresh=training and cfg.train.fresh,
    )


def resolve_weights(cfg, workdir, step=None, *, training: bool = False) -> weights.Source:
    """The one resolver's answer for ``cfg``; the resolved shape is ``source.model_cfg``
    (``cfg`` is not changed)."""
    return weights.resolve(weights_request(cfg, training), workdir, step, training=training)


def eval_batch(s, num_devices: int) -> int:
    """The eval batch: ``eval.batch_size``, or the train microbatch; checked here alone,
    with the sliding-window stride (both commands that evaluate get them from here).
    ``s``: anything with ``eval``, ``train``, ``optim`` and ``data`` sections."""
    e, d = s.eval, s.data
    if e.batch_size < 0:
        raise ConfigError("eval.batch_size: must be >= 0 (0: train.batch_size)")
    size = e.batch_size or s.train.batch_size // max(s.optim.accumulation_steps, 1)
    if size % num_devices:
        raise ConfigError(f"eval.batch_size: {size} is not divisible by the {num_devices} devices")
    if e.stride < 0:
        raise ConfigError("eval.stride: must be >= 0 (0: non-overlapping blocks)")
    if e.stride > d.block_size:
        raise ConfigError(
            f"eval.stride: eval.stride={e.stride} must be <= data.block_size={d.block_size} "
            f"(the window length; a longer stride would skip tokens)"
        )
    return size


def training(cfg, workdir, num_devices: int) -> Plan:
    """The plan of ``gpt2-jax train``: weights resolved (checkpoint -> init_from ->
    scratch), everything validated; ``total_steps`` follows with ``with_data``."""
    source = resolve_weights(cfg, workdir, cfg.train.resume_step, training=True)
    checked = config_lib.validate(cfg, num_devices, source.model_cfg)
    notes = [f"warning: {w}" for w in config_lib.warnings(cfg)]
    if source.kind == "checkpoint":
        notes += [
            f"resume: {c} (this run's value, recorded in config.json)"
            for c in weights.runtime_changes(source.saved_cfg, checked)
        ]
    return _plan(cfg, source, num_devices, tuple(notes), validated=True)


def _plan(cfg, source, num_devices: int, notes=(), validated: bool = False) -> Plan:
    """The plan of a config: its sections, and with ``validated`` the mesh and batch sizes
    (without, they are not the command's concern: 0)."""
    s = config_lib.sections(cfg)
    mesh_shape = s.mesh.validate(num_devices) if validated else (num_devices, 1)
    micro = s.train.batch_size // s.optim.accumulation_steps if validated else 0
    return Plan(
        model=source.model_cfg,
        source=source,
        mesh_shape=mesh_shape,
        micro_batch=micro,
        eval_batch=eval_batch(s, num_devices) if validated else 0,
        data=s.data,
        optim=s.optim,
        train=s.train,
        eval=s.eval,
        mesh=s.mesh,
        distributed=s.distributed,
        init_from=s.init_from,
        record=config_lib.resolved_record(cfg, source.model_cfg),
        notes=notes,
    )


def with_data(plan: Plan, steps_per_epoch: int) -> Plan:
    """``plan`` with its total steps: ``train.steps``, else epochs of the train split."""
    total = plan.train.steps or plan.train.epochs * steps_per_epoch
    return dataclasses.replace(plan, total_steps=total)


def for_params(cfg, model_cfg: gpt2_config.GPT2Config, num_devices: int) -> Plan:
    """The plan of evaluating params already in hand (the Python API): ``cfg`` validated
    with ``model_cfg`` as the model that runs."""
    config_lib.validate(cfg, num_devices, model_cfg)
    return _plan(cfg, weights.Source("given", model_cfg), num_devices, validated=True)


def weights_only(cfg, workdir, step, num_devices: int, *, validate: bool = False) -> Plan:
    """The plan of eval / generate / export / lm-eval: real weights (a workdir's
    checkpoint or ``hf:``), no training. ``validate`` (eval) checks the whole config and
    the eval batch; without it the mesh and batches are not the command's concern (0)."""
    source = resolve_weights(cfg, workdir, step)
    if validate:
        config_lib.validate(cfg, num_devices, source.model_cfg)
    return _plan(cfg, source, num_devices, validated=validate)

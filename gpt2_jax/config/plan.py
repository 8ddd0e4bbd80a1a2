"""The run plan: every value a command derives from (config, workdir), decided once.

How a config becomes a run: the config file and its overrides give a locked ConfigDict
(config/base.py); ``plan.training`` / ``plan.weights_only`` turn it, with the workdir, into a
frozen ``Plan``: the config's typed sections (config/sections.py), the model config that runs,
where its weights come from (weights/resolve.py, the one resolver), the mesh shape, the micro
and eval batch sizes, the total steps, the resolved config to record, and the notes to report
(warnings, runtime changes on resume). The ConfigDict stops here: the commands and everything
they call read the plan; none works these values out again.

LoRA (``lora.*``): ``training`` decides the adapters' config (``model.lora``: from the
``lora`` keys, a ``lora.init_from`` adapter's adapter_config.json, or the checkpoint being
resumed) and refuses what cannot run (no base to adapt, a checkpoint of another kind).
For the weights-reading commands the model that runs is the merged one: ``model.lora`` is
None there, and the source says what to merge (``weights.params_of``).
"""

from __future__ import annotations

import dataclasses

from gpt2_jax.config import base as config_lib
from gpt2_jax.config.sections import EvalConfig, LoraSection, TrainConfig
from gpt2_jax.data.config import DataConfig
from gpt2_jax.errors import ConfigError
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import lora as lora_lib
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
    lora: LoraSection  # the lora keys as given (what runs is model.lora)
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
        adapter=cfg.lora.init_from,
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
    adapters, lora_notes = training_lora(config_lib.sections(cfg), source)
    if adapters is not None:  # what runs (and what a resume restores) has the adapters
        source = dataclasses.replace(
            source, model_cfg=dataclasses.replace(source.model_cfg, lora=adapters)
        )
    return _plan(cfg, source, num_devices, tuple(notes + lora_notes), validated=True)


def training_lora(s, source: weights.Source) -> tuple[lora_lib.LoraConfig | None, list[str]]:
    """The adapters' config of a training run (None: LoRA off) and notes on the ``lora``
    keys it does not use. A resume keeps the checkpoint's adapters (the keys must agree);
    ``lora.init_from``'s adapter_config.json fixes rank, alpha and targets; else the keys.
    ``lora.dropout`` is this run's. ConfigError naming the key for what cannot run."""
    from gpt2_jax.weights import peft

    lo, notes = s.lora, []
    if lo.on and not s.init_from and source.kind != "checkpoint":  # (a checkpoint: resolve's)
        raise ConfigError(
            "lora.rank: LoRA adapts pretrained weights, and init_from is empty: set "
            "init_from=hf:<dir or hub id> (the base model), or lora.rank=0 (and no "
            "lora.init_from) to train every weight"
        )
    if source.kind == "checkpoint":
        adapters = _resumed_lora(lo, source)
    elif lo.init_from:
        try:
            adapters, _ = peft.read_adapter_config(lo.init_from, source.model_cfg)
        except peft.PeftError as e:
            raise ConfigError(f"lora.init_from: {e}") from None
        notes = [f"note: {d} (lora.init_from's adapter_config.json fixes them)"
                 for d in lora_diff(lo.lora_config(), adapters)]  # fmt: skip
    else:
        adapters = lo.lora_config()
    if adapters is None:
        return None, notes
    return dataclasses.replace(adapters, dropout=float(lo.dropout)), notes


def lora_diff(a: lora_lib.LoraConfig | None, b: lora_lib.LoraConfig | None) -> list[str]:
    """``lora.KEY: A -> B`` for rank, alpha and the adapted modules where ``a`` (the keys)
    and ``b`` differ; nothing when either is None."""
    if a is None or b is None:
        return []
    pairs = (("rank", a.rank, b.rank), ("alpha", float(a.alpha), float(b.alpha)),
             ("targets", lora_lib.module_paths(a), lora_lib.module_paths(b)))  # fmt: skip
    return [f"lora.{k}: {x!r} -> {y!r}" for k, x, y in pairs if x != y]


def _resumed_lora(lo: LoraSection, source: weights.Source) -> lora_lib.LoraConfig | None:
    """A resume's adapters: the checkpoint's. Its kind (LoRA or every weight) and, with
    ``lora.rank > 0``, rank, alpha and targets must be what the keys ask (with
    ``lora.init_from``, what its adapter fixed on the first run: not compared again)."""
    saved, where = source.lora, source.path / str(source.step)
    fresh = "train in another --workdir, or add --config.train.fresh=true to start over"
    if saved is None and lo.on:
        raise ConfigError(f"lora.rank: {where} trained every weight, not LoRA adapters; {fresh}")
    if saved is not None and not lo.on:
        raise ConfigError(
            f"lora.rank: {where} holds LoRA adapters (rank {saved.rank}, targets "
            f"{lora_lib.targets_text(saved)}), and lora.rank=0: set lora.rank={saved.rank} "
            f"to resume them, or {fresh}"
        )
    diff = [] if lo.init_from else lora_diff(lo.lora_config(), saved)
    if diff:
        raise ConfigError(
            f"lora: the keys differ from the adapters of {where} ({'; '.join(diff)}); {fresh}"
        )
    return saved


def _plan(cfg, source, num_devices: int, notes=(), validated: bool = False) -> Plan:
    """The plan of a config: its sections, and with ``validated`` the mesh and batch sizes
    (without, they are not the command's concern: 0)."""
    s = config_lib.sections(cfg)
    mesh_shape = s.mesh.validate(num_devices) if validated else (num_devices, 1)
    micro = s.train.batch_size // s.optim.accumulation_steps if validated else 0
    record = config_lib.resolved_record(cfg, source.model_cfg)
    adapters = source.model_cfg.lora
    if adapters is not None:  # the adapters that run (the base's identity: train.loop)
        record["lora"].update(
            rank=adapters.rank,
            alpha=float(adapters.alpha),
            dropout=adapters.dropout,
            targets=lora_lib.targets_text(adapters),
        )
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
        lora=s.lora,
        record=record,
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

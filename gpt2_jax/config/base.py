"""Experiment configs: ``.py`` files with ``get_config(arg=None)``, overrides, validation.

``--config=configs/NAME.py:ARG`` calls ``get_config("ARG")`` (big_vision style), then
``--config.a.b=VALUE`` overrides are applied to the locked ConfigDict, parsed to the type of
the existing value. Everything is validated here, before anything compiles, and every error
names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
from pathlib import Path

import ml_collections

from gpt2_jax.config import sections as sections_lib
from gpt2_jax.core import workdir as wd
from gpt2_jax.data.config import DataConfig
from gpt2_jax.errors import ConfigError, require  # defined there for the modules below; used here
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.optim.config import OptimConfig
from gpt2_jax.parallel.config import DistributedConfig, MeshConfig

# ---------------------------------------------------------------------------- defaults


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment config; each key with a one-line comment."""
    c = ml_collections.ConfigDict()
    c.init_from = ""  # '' = random init; 'hf:<dir or hub id>' = start from Hugging Face weights

    c.model = _model_defaults()
    c.lora = _lora_defaults()
    c.data = ml_collections.ConfigDict(DataConfig().to_dict())
    c.train = _train_defaults()
    c.optim = _optim_defaults()
    c.eval = _eval_defaults()
    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # data-parallel axis size (-1: all devices not used by fsdp)
    c.mesh.fsdp = 1  # parameter-sharding axis size
    c.distributed = _distributed_defaults()
    return c


def _model_defaults() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.size = ""  # gpt2 | gpt2-medium | gpt2-large | gpt2-xl; n_layer/n_head/n_embd > 0 override it
    m.n_layer = 0  # transformer blocks
    m.n_head = 0  # attention heads (n_embd % n_head == 0)
    m.n_embd = 0  # model width
    m.n_positions = 1024  # longest context (learned position table)
    m.n_inner = 0  # MLP width; 0 = 4 * n_embd
    m.layer_norm_epsilon = 1e-5
    m.vocab_size = 50257  # GPT-2 BPE vocabulary
    m.dropout = 0.1  # embd/attn/resid dropout (HF's *_pdrop)
    m.dtype = "float32"  # compute dtype: float32 | bfloat16
    m.param_dtype = "float32"  # parameter and optimizer-state dtype
    # Unrolled layers (h_<i>) run 11-14% faster steps than scanned ones on CPU
    # (experiments/archive/speed); scan (params under h) compiles once for all layers: set it for
    # deep models, where unrolled compile time grows with every layer.
    m.scan_layers = False
    m.remat = False  # recompute activations in backward (less memory, ~1/3 more compute)
    return m


def _lora_defaults() -> ml_collections.ConfigDict:
    lo = ml_collections.ConfigDict()
    lo.rank = 0  # LoRA rank r (0 = off: every weight trains); > 0 needs init_from (the base)
    lo.alpha = 16.0  # the adapters' output is scaled by alpha / rank (PEFT's lora_alpha)
    lo.dropout = 0.0  # dropout on the input of the LoRA branch (PEFT's lora_dropout)
    lo.targets = "c_attn,c_proj,c_fc"  # PEFT's module names; attn.c_proj / mlp.c_proj pick one
    lo.init_from = ""  # '' = fresh adapters (B = 0); a PEFT adapter directory to start from
    return lo


def _train_defaults() -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.batch_size = 8  # sequences per optimizer step (global, over all devices and microbatches)
    t.steps = 0  # optimizer steps; 0 = train.epochs over the train split
    t.epochs = 0  # used when steps == 0
    t.seed = 0  # parameter init, data order and dropout
    t.log_every = 10  # steps between train-metric fetches (the only host syncs)
    t.eval_every = 0  # steps between evaluations (0: only at the end)
    t.checkpoint_every = 0  # steps between checkpoints (0: only at the end and on SIGTERM)
    t.keep_checkpoints = 3  # newest checkpoints kept
    t.keep_best = False  # also keep the checkpoint with the lowest eval loss (`--step=best`)
    t.resume_step = -1  # resume from this saved step (-1: the latest); later ones moved aside
    t.fresh = False  # move this workdir's checkpoints/metrics aside (never deleted), start over
    t.nonfinite = "stop"  # non-finite loss/grads: stop (exit, save nothing) | skip (no update)
    t.max_nonfinite = 10  # with nonfinite=skip: stop after this many non-finite steps in a row
    t.progress = True  # tqdm progress bar on stderr
    t.preflight = True  # refuse a run whose compiled step cannot fit in memory (preflight.py)
    t.peak_flops = 0.0  # one device's peak FLOP/s for `mfu` (0: flops.PEAK_FLOPS by device kind)
    t.report_to = ("tensorboard",)  # trackers besides metrics.jsonl: tensorboard, wandb | none
    t.wandb = w = ml_collections.ConfigDict()  # with report_to wandb (the [wandb] extra)
    w.project = "gpt2_jax"  # W&B project
    w.entity = ""  # W&B team or user ('' = your default)
    w.name = ""  # run name ('' = the workdir's name)
    w.tags = ()  # run tags, e.g. ('124m', 'fineweb')
    return t


def _optim_defaults() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.learning_rate = 6e-4  # peak learning rate
    o.warmup_steps = 0  # linear warmup from 0
    o.schedule = "cosine"  # cosine | linear | constant (after warmup)
    o.min_lr_ratio = 0.1  # cosine floor as a fraction of the peak
    o.weight_decay = 0.0  # AdamW decoupled decay (kernels only; see decay_embeddings)
    o.decay_embeddings = False  # also decay wte/wpe
    o.b1 = 0.9
    o.b2 = 0.999
    o.eps = 1e-8
    o.grad_clip = 1.0  # global-norm clipping (0: off)
    o.accumulation_steps = 1  # microbatches per optimizer step (scanned inside the jitted step)
    return o


def _eval_defaults() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    e.batch_size = 0  # 0: train.batch_size / optim.accumulation_steps
    e.max_batches = 0  # 0: the whole split; N: only the first N batches (quick looks)
    e.stride = 0  # 0: run_clm blocks; S > 0: sliding-window perplexity with stride S
    e.splits = ("validation",)  # splits scored by eval steps and `gpt2-jax eval`
    # lm-evaluation-harness tasks during training (the [eval] extra): results in
    # metrics.jsonl / TensorBoard as lm_eval/<task>/<metric> and WORKDIR/lm_eval/step_<N>.json.
    e.harness_tasks = ""  # comma-separated task names ('' = off), e.g. 'lambada_openai,hellaswag'
    e.harness_every = 0  # steps between harness evals (0: at the end only)
    e.harness_include_path = ""  # directories of extra task YAMLs (local data, offline)
    e.harness_limit = 0  # docs per task (0: all)
    e.harness_num_fewshot = -1  # few-shot examples (-1: each task's default)
    return e


def _distributed_defaults() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    d.coordinator_address = ""  # 'host:port' of process 0 for multi-host runs ('' = one process)
    d.num_processes = 1
    d.process_id = 0
    d.cpu_collectives = ""  # e.g. 'gloo' for multi-process CPU runs
    return d


# ----------------------------------------------------------------------------- loading


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``path/to/file.py[:arg]`` -> the locked ConfigDict its ``get_config`` returns."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config: no such config file: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_gpt2_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {path} has no get_config(arg=None) function")
    cfg = module.get_config(arg or None) if arg else module.get_config()
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"--config: {path}:get_config() must return an ml_collections.ConfigDict")
    cfg.lock()
    return cfg


def for_command(config_path: str | None, workdir: str | None, overrides: dict):
    """A command's config: ``--config`` if given, else the one saved in ``--workdir``;
    ``--config.KEY=VALUE`` overrides applied."""
    saved = Path(workdir) / wd.CONFIG if workdir else None
    if config_path:
        cfg = load_config_file(config_path)
    elif saved is not None and saved.is_file():
        cfg = from_json(saved.read_text())
    elif workdir:
        raise ConfigError(
            f"--workdir={workdir} has no config.json (is it a gpt2-jax run directory?); "
            f"pass --config=configs/NAME.py too"
        )
    else:
        raise ConfigError("give --config=configs/NAME.py or --workdir=DIR")
    apply_overrides(cfg, overrides)
    return cfg


def for_weights(workdir: str | None, init_from: str, overrides: dict) -> ml_collections.ConfigDict:
    """The config of a command that only reads weights (generate, lm-eval, the harness's
    Python API): ``--workdir``'s saved config, else the defaults with ``init_from``;
    ``overrides`` (``{"model.dtype": "bfloat16"}``) applied by the one override path."""
    if workdir:
        cfg = for_command(None, workdir, overrides)
    else:
        cfg = base_config()
        cfg.lock()
        apply_overrides(cfg, overrides)
    if init_from:
        apply_overrides(cfg, {"init_from": init_from})
    return cfg


def from_json(text_or_dict) -> ml_collections.ConfigDict:
    """A saved config.json; keys added to ``base_config`` since it was written get defaults."""
    d = json.loads(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    cfg = ml_collections.ConfigDict(_with_defaults(d, to_dict(base_config())))
    cfg.lock()
    return cfg


def _with_defaults(d: dict, defaults: dict) -> dict:
    out = dict(d)
    for k, v in defaults.items():
        if k not in out:
            out[k] = v
        elif isinstance(v, dict) and isinstance(out[k], dict):
            out[k] = _with_defaults(out[k], v)
    return out


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    return json.loads(cfg.to_json())


def _parse_value(key: str, text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"--config.{key}={text!r}: expected true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--config.{key}={text!r}: expected a number") from None
    if isinstance(current, (tuple, list)):
        items = [t.strip() for t in text.strip("()[]").split(",") if t.strip()]
        return type(current)(items)
    if current is None or isinstance(current, str):
        return text
    raise ConfigError(
        f"--config.{key}: values of type {type(current).__name__} can't be overridden"
    )


def dotted_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every key of ``cfg`` in full, groups and leaves: ``["data", "data.block_size", ...]``."""
    keys = []
    for k in sorted(cfg.keys()):
        keys.append(prefix + k)
        if isinstance(cfg[k], ml_collections.ConfigDict):
            keys += dotted_keys(cfg[k], f"{prefix}{k}.")
    return keys


def unknown_key_message(cfg: ml_collections.ConfigDict, key: str) -> str:
    """``unknown config key 'train.step': did you mean 'train.steps'?``

    The match is over full dotted names, so a typo in the section (``trian.steps``) or a
    key under the wrong section (``train.learning_rate``) is answered too. A truncated
    name (``data.validation_split``) is completed first; the section the key is already
    in (``train`` for ``train.xyzzy``) is never the answer.
    """
    keys = [k for k in dotted_keys(cfg) if not key.startswith(k + ".")]
    completions = [k for k in keys if k.startswith(key)]
    if completions:
        close = difflib.get_close_matches(key, completions, n=1, cutoff=0.0)
    else:
        # The shared section inflates the ratio of full names ('optim.lr' vs 'optim.b2' is
        # 0.75), so the last parts must look alike too.
        leaf = key.rpartition(".")[2]
        close = [
            k
            for k in difflib.get_close_matches(key, keys, n=5, cutoff=0.6)
            if difflib.SequenceMatcher(None, leaf, k.rpartition(".")[2]).ratio() >= 0.5
        ]
    if close:
        return f"unknown config key {key!r}: did you mean {close[0]!r}?"
    parts = key.split(".")
    node, where = cfg, "<top>"
    for i, part in enumerate(parts[:-1]):  # the deepest existing section
        if part in node and not isinstance(node[part], ml_collections.ConfigDict):
            value = ".".join(parts[: i + 1])
            return f"unknown config key {key!r}: {value} is a value, not a group"
        if part not in node:
            break
        node, where = node[part], ".".join(parts[: i + 1])
    return f"unknown config key {key!r} (keys under {where}: {sorted(node.keys())})"


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Sets ``{"a.b": "text"}`` on ``cfg`` in place; an unknown key is a ConfigError."""
    for key, text in overrides.items():
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ConfigError(unknown_key_message(cfg, key))
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise ConfigError(
                f"--config.{key} is a group; set one of its keys: {sorted(node[leaf])}"
            )
        value = _parse_value(key, text, node[leaf])
        with node.unlocked():
            node[leaf] = value


def split_override_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Separates ``--config.a.b=v`` / ``--config.a.b v`` from the other arguments."""
    rest, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{arg} needs a value (--config.{key}=VALUE)")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


# -------------------------------------------------------------------------- the model


def model_config(cfg: ml_collections.ConfigDict) -> gpt2_config.GPT2Config:
    """The frozen model config from ``cfg.model`` (``size`` first, explicit fields win)."""
    try:
        return gpt2_config.config_from_section(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def runtime_fields(cfg: ml_collections.ConfigDict) -> dict:
    """The GPT2Config fields that say how to run a model, not what it is (HF import keeps
    a checkpoint's shape and takes these from the experiment config)."""
    return gpt2_config.runtime_from_section(cfg.model)


# What the weights decide (as opposed to how to compute with them).
SHAPE_KEYS = gpt2_config.SHAPE_FIELDS


def resolved_record(cfg: ml_collections.ConfigDict, model_cfg: gpt2_config.GPT2Config) -> dict:
    """What a run records as its config (config.json, each checkpoint, the trackers):
    ``cfg`` as a dict, with the shape the weights fixed (``model_cfg``) in its ``model``
    section and the one-time actions (``train.fresh``, ``train.resume_step``) cleared, so
    that resuming the same run does not repeat them. ``cfg`` itself is not changed."""
    record = to_dict(cfg)
    model = record["model"]
    model["size"] = ""
    for k in SHAPE_KEYS:
        model[k] = getattr(model_cfg, k)
    model["n_inner"] = model_cfg.n_inner or 0
    record["train"].update(fresh=False, resume_step=-1)
    return record


# ------------------------------------------------------------------------- validation


def init_from_spec(init_from: str) -> str | None:
    """``init_from`` -> the HF directory or hub id, None for ''; ConfigError otherwise."""
    from gpt2_jax.weights import hf

    try:
        return hf.parse_init_from(init_from)
    except hf.HFImportError as e:
        raise ConfigError(str(e)) from None


def warnings(cfg: ml_collections.ConfigDict) -> list[str]:
    """Settings that run but are probably not what was meant (printed by ``train``)."""
    t, o = cfg.train, cfg.optim
    out = []
    if t.steps and o.warmup_steps > t.steps:
        # As in HF's Trainer and nanoGPT: allowed, the schedule just never reaches its peak.
        out.append(
            f"optim.warmup_steps={o.warmup_steps} exceeds train.steps={t.steps}: the learning "
            f"rate stops at {o.learning_rate * t.steps / o.warmup_steps:.3g}, below its peak"
        )
    return out


@dataclasses.dataclass(frozen=True)
class Sections:
    """The config's sections, typed and frozen (``config/sections.py``); ``model`` is the
    config's own model (``model_config``), before any weights say otherwise."""

    data: DataConfig
    optim: OptimConfig
    train: sections_lib.TrainConfig
    eval: sections_lib.EvalConfig
    mesh: MeshConfig
    distributed: DistributedConfig
    init_from: str
    lora: sections_lib.LoraSection


def sections(cfg: ml_collections.ConfigDict) -> Sections:
    """``cfg`` as typed, frozen sections (not yet validated: ``validate`` does that)."""
    typed = sections_lib.typed
    return Sections(
        data=DataConfig.from_mapping(cfg.data),
        optim=typed(OptimConfig, cfg.optim),
        train=typed(sections_lib.TrainConfig, cfg.train),
        eval=typed(sections_lib.EvalConfig, cfg.eval),
        mesh=typed(MeshConfig, cfg.mesh),
        distributed=typed(DistributedConfig, cfg.distributed),
        init_from=cfg.init_from,
        lora=typed(sections_lib.LoraSection, cfg.lora),
    )


def validate(
    cfg: ml_collections.ConfigDict,
    num_devices: int,
    model_cfg: gpt2_config.GPT2Config | None = None,
) -> gpt2_config.GPT2Config:
    """Checks everything that can be checked before data loads or anything compiles: each
    section beside its definition, then what spans sections. ``model_cfg``: the model that
    will run when the weights fixed it (else the config's own). Returns the model config.
    Raises ConfigError (DataError for data keys) naming the offending key (the eval batch
    and stride are checked where they are decided: ``plan.eval_batch``).
    """
    try:
        mcfg = model_cfg or model_config(cfg)
        mcfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    s = sections(cfg)
    require(
        1 < s.data.block_size <= mcfg.n_positions,
        "data.block_size",
        f"{s.data.block_size} must be in [2, model.n_positions={mcfg.n_positions}]",
    )
    init_from_spec(s.init_from)
    s.lora.validate()
    s.train.validate()
    _check_batches(s.train, s.optim, num_devices)
    s.optim.validate()
    s.eval.validate()
    s.mesh.validate(num_devices)
    s.data.validate()  # DataError: missing files, empty globs, ...
    require(
        not (s.eval.stride and s.data.examples),
        "eval.stride",
        f"the sliding window reads one token stream (data.format='text'); data.format="
        f"{s.data.format!r} evaluates each example's targets: set eval.stride=0",
    )
    return mcfg


def _check_batches(t, o, num_devices: int) -> None:
    require(o.accumulation_steps >= 1, "optim.accumulation_steps", "must be >= 1")
    require(
        t.batch_size % o.accumulation_steps == 0,
        "optim.accumulation_steps",
        f"train.batch_size={t.batch_size} is not divisible by "
        f"optim.accumulation_steps={o.accumulation_steps}",
    )
    micro = t.batch_size // o.accumulation_steps
    require(
        micro % num_devices == 0,
        "train.batch_size",
        f"the microbatch train.batch_size/optim.accumulation_steps={micro} is not divisible "
        f"by the {num_devices} devices",
    )

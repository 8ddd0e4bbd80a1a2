"""Where the weights (and so the model's shape) come from, for every command.

The order, decided here and nowhere else:
  1. the workdir's own checkpoint: the latest step, or the one asked for
     (``train.resume_step``, ``--step=N|best``). Its saved shape wins; the user's runtime
     fields (dtype, param_dtype, remat, scan_layers, dropout) apply. On ``train`` a
     requested shape that differs is an error, not a silent switch;
  2. ``init_from='hf:<dir or hub id>'``: shape from its config.json, then its weights;
  3. random init (``train`` only; eval/export/generate need real weights).

``train`` asks for the source (``resolve``) and restores the whole train state itself;
``eval``/``export``/``generate``/``lm-eval`` call ``params_of``.

LoRA (``weights.lora_base``): a checkpoint whose saved config has ``lora.rank > 0`` holds
adapters, not params; its Source names the base (``init_from``) and the base's recorded
identity, and ``params_of`` loads the base, checks its hash and merges the adapters in. An
``hf`` source with an adapter directory (``lora.init_from``, the commands' ``--adapter``)
is merged the same way; ``train`` reads that adapter itself, as its starting adapters.

Moving checkpoints aside (``train.fresh``, ``train.resume_step``) happens here too, and
never deletes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.core import workdir as wd
from gpt2_jax.errors import ConfigError
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.model import lora
from gpt2_jax.weights import checkpoint as ckpt_lib
from gpt2_jax.weights import lora_base

# ``dropout`` is one config key for the three *_pdrop fields.
_CONFIG_KEY = {"resid_pdrop": "dropout", "embd_pdrop": "dropout", "attn_pdrop": "dropout"}


@dataclasses.dataclass(frozen=True)
class Request:
    """What a command's config asks of the weights (the plan builds it from the config).

    ``hf_spec``: the ``init_from`` directory or hub id (None: no ``init_from``);
    ``runtime``: the user's runtime fields (``model.RUNTIME_FIELDS``), applied to any source;
    ``requested``: the config's own model shape, needed for ``train`` without ``init_from``
    (the shape check against a checkpoint, and random init); ``fresh``: ``train.fresh``;
    ``adapter``: ``lora.init_from``, a PEFT adapter directory that the weights-reading
    commands merge into ``hf`` weights (``train`` starts its adapters from it instead).
    """

    hf_spec: str | None = None
    runtime: dict = dataclasses.field(default_factory=dict)
    requested: gpt2_config.GPT2Config | None = None
    fresh: bool = False
    adapter: str = ""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights come from.

    ``model_cfg`` is what runs: the source's shape with the user's runtime fields.
    ``saved_cfg`` (checkpoints only) is the model config the checkpoint was written with,
    whose ``scan_layers`` is the saved parameter layout. A LoRA run's checkpoint has
    ``lora`` (its adapters' config), ``base`` (the ``hf`` Source of the weights they adapt)
    and ``base_record`` (the base identity it recorded); an ``hf`` source with ``adapter``
    has that PEFT directory merged in by ``params_of``, ``lora`` its config.
    """

    kind: str  # "checkpoint" | "hf" | "scratch" | "given" (params passed in by the caller)
    model_cfg: gpt2_config.GPT2Config
    step: int | None = None
    path: Path | None = None  # the checkpoints directory, or the HF directory
    saved_cfg: gpt2_config.GPT2Config | None = None
    lora: lora.LoraConfig | None = None
    base: Source | None = None
    base_record: dict | None = None
    adapter: Path | None = None

    def describe(self) -> str:
        if self.kind == "checkpoint" and self.lora is not None:
            where = self.base.describe() if self.base is not None else "its base"
            return f"checkpoint {self.path / str(self.step)} (LoRA adapters on {where})"
        if self.kind == "checkpoint":
            return f"checkpoint {self.path / str(self.step)}"
        if self.kind == "hf" and self.adapter is not None:
            return f"hf:{self.path} with the adapter {self.adapter} merged in"
        if self.kind == "hf":
            return f"hf:{self.path}"
        if self.kind == "given":
            return "the params given"
        return "random init"


# ------------------------------------------------------------------ pure helpers


def parse_step(text: str) -> int | str | None:
    """``--step`` flag: '' -> None (latest), 'best', or a step number (ValueError if not)."""
    if text in ("", "latest"):
        return None
    if text == "best":
        return "best"
    step = int(text)
    if step < 0:
        raise ValueError(text)
    return step


def shape_diff(saved: gpt2_config.GPT2Config, requested: gpt2_config.GPT2Config) -> list[str]:
    """``model.KEY: saved X, requested Y`` for each shape field that differs."""
    return [
        f"model.{k}: saved {getattr(saved, k)}, requested {getattr(requested, k)}"
        for k in gpt2_config.SHAPE_FIELDS
        if getattr(saved, k) != getattr(requested, k)
    ]


def runtime_changes(saved: gpt2_config.GPT2Config, now: gpt2_config.GPT2Config) -> list[str]:
    """``model.KEY: X -> Y`` for each runtime field this run changes (dropout once)."""
    out = {}
    for k in gpt2_config.RUNTIME_FIELDS:
        if getattr(saved, k) != getattr(now, k):
            out[_CONFIG_KEY.get(k, k)] = f"{getattr(saved, k)!r} -> {getattr(now, k)!r}"
    return [f"model.{k}: {v}" for k, v in out.items()]


def _is_params(x: Any) -> bool:
    """A params tree, or a LoRA adapters tree (only layers: ``h`` or ``h_<i>``)."""
    if not isinstance(x, dict) or not ("h" in x or "h_0" in x):
        return False
    return "wte" in x or all(k == "h" or re.fullmatch(r"h_\d+", str(k)) for k in x)


def relayout(tree: Any, scan_layers: bool, n_layer: int) -> Any:
    """Every params-shaped dict in ``tree`` (params or LoRA adapters, Adam's mu/nu) in the
    asked layout.

    Scanned (``h`` with a leading layer axis) <-> unrolled (``h_0 .. h_{L-1}``); the
    optimizer state holds the same trees, so a train state converts as a whole.
    """

    def fix(x):
        if not _is_params(x):
            return x
        if scan_layers and "h_0" in x:
            return model_lib.stack_layers(x, n_layer)
        if not scan_layers and "h" in x:
            return model_lib.unstack_layers(x)
        return x

    return jax.tree.map(fix, tree, is_leaf=_is_params)


def _stamp() -> str:
    # No '_' or trailing digits-only part: Orbax reads "<name>_<digits>" dirs as steps.
    return time.strftime("%Y%m%dT%H%M%S")


def _move(path: Path, target: Path) -> Path:
    while target.exists():  # two moves in the same second
        target = target.with_name(target.name + "x")
    path.rename(target)
    return target


# ------------------------------------------------------------------ checkpoint faults


def unreadable(ckpt_dir: Path, step: int, steps: list[int], exc: BaseException, flag: str):
    """The one-line error for a checkpoint step that cannot be read.

    Names the step, the array/file TensorStore or Orbax complained about, and the newest
    earlier step with the flag that uses it (``flag`` is e.g. ``--config.train.resume_step``).
    """
    root = exc
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(root).splitlines()[0] if str(root) else type(root).__name__
    m = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)": (.*)', text)
    if m:  # a truncated/garbled array file: which array, where, and why
        what = f"{m.group(1).rsplit('/', 1)[0]} in {m.group(2).rstrip('/')}: {m.group(3)}"
    else:
        what = text[:300]
    earlier = [s for s in steps if s < step]
    hint = (
        f"the newest earlier step is {earlier[-1]}: use it with {flag}={earlier[-1]}"
        + (" (later steps are moved aside, not deleted)" if "resume_step" in flag else "")
        if earlier
        else "there is no earlier step"
    )
    return ckpt_lib.CheckpointError(
        f"checkpoint step {step} in {ckpt_dir} is unreadable ({what}); {hint}"
    )


def _pick_step(ckpt: ckpt_lib.Checkpointer, step: int | str | None) -> int:
    steps = ckpt.all_steps()
    if step is None or step == -1:
        return max(steps)
    if step == "best":
        best = ckpt.best_step()
        if best is None:
            raise ckpt_lib.CheckpointError(
                f"no checkpoint in {ckpt.directory} has an eval loss recorded "
                f"(train with --config.train.keep_best=true)"
            )
        return best
    if step not in steps:
        raise ckpt_lib.CheckpointError(
            f"step {step} is not saved in {ckpt.directory} (saved steps: {sorted(steps)})"
        )
    return step


def _saved_record(ckpt, step: int, flag: str) -> tuple[gpt2_config.GPT2Config, dict]:
    """(the model config, the whole config record) a checkpoint step was saved with."""
    try:
        saved = ckpt.restore_config(step)  # the run's config: a dict (JSON text before)
        saved = json.loads(saved) if isinstance(saved, str) else saved
        return gpt2_config.config_from_section(saved["model"]), saved
    except Exception as e:  # unreadable config item: as corrupt as a bad array
        raise unreadable(ckpt.directory, step, ckpt.all_steps(), e, flag) from e


# ------------------------------------------------------------------ the resolver


def resolve(
    request: Request, workdir: str | Path | None, step=None, *, training: bool = False
) -> Source:
    """Decides where the weights come from; the resolved shape is ``Source.model_cfg``.

    ``step``: None/-1 = latest, an int, or "best" (checkpoints only). With
    ``training=True`` (the ``train`` command) a missing checkpoint falls through to
    init_from, then scratch, ``train.fresh`` ignores the checkpoints (``start_fresh``
    moves them), and a shape that differs from the checkpoint's is a ConfigError.
    Otherwise a ``workdir`` must hold a checkpoint: falling back to its init_from would
    silently evaluate / export / sample the starting point instead of the trained model.
    """
    flag = "--config.train.resume_step" if training else "--step"
    ckpt_dir = Path(workdir).absolute() / wd.CHECKPOINTS if workdir else None
    fresh = training and request.fresh
    steps = _saved_steps(ckpt_dir) if ckpt_dir is not None and not fresh else []
    if steps:
        return _from_checkpoint(request, ckpt_dir, step, flag, training)
    if ckpt_dir is not None and not training:
        raise ckpt_lib.CheckpointError(
            f"{ckpt_dir} has no checkpoint yet (train first). To use the run's init_from "
            f"weights, pass --config=configs/NAME.py --config.init_from=hf:<dir or hub id> "
            f"without --workdir"
        )
    if step not in (None, -1):
        where = ckpt_dir or "(no --workdir given)"
        raise ckpt_lib.CheckpointError(f"step {step}: there is no checkpoint in {where}")
    if request.hf_spec is not None:
        return _from_hf(request, adapter=not training)
    if not training:
        raise ckpt_lib.CheckpointError(
            "no weights to use: no --workdir given and init_from is empty "
            "(give --workdir=DIR or --config.init_from=hf:<dir or hub id>)"
        )
    return Source("scratch", request.requested)


def _from_checkpoint(request: Request, ckpt_dir: Path, step, flag: str, training: bool) -> Source:
    """Step 1 of the order: the checkpoint's shape with the user's runtime fields."""
    with ckpt_lib.Checkpointer(ckpt_dir, read_only=True) as ckpt:
        step = _pick_step(ckpt, step)
        saved, record = _saved_record(ckpt, step, flag)
    if training and request.hf_spec is None:
        # (With init_from the shape came from those weights, not from the config.)
        diff = shape_diff(saved, request.requested)
        if diff:
            raise ConfigError(
                f"the model shape differs from the checkpoint {ckpt_dir / str(step)} "
                f"({'; '.join(diff)}). A checkpoint fixes the shape: train in another "
                f"--workdir, or add --config.train.fresh=true to move the old "
                f"checkpoints aside (kept, not deleted) and start over"
            )
    model_cfg = dataclasses.replace(saved, **request.runtime)
    source = Source("checkpoint", model_cfg, step, ckpt_dir, saved)
    adapters = lora.lora_from_section(record.get("lora") or {})
    if adapters is None:
        return source
    base_record = (record.get("lora") or {}).get("base")
    return dataclasses.replace(
        source, lora=adapters, base_record=base_record,
        base=_lora_base(request, base_record, ckpt_dir / str(step), training),
    )  # fmt: skip


def _lora_base(request: Request, recorded: dict | None, where: Path, training: bool) -> Source:
    """The ``hf`` Source of the base a LoRA checkpoint's adapters adapt: the config's
    ``init_from``; for the weights-reading commands, else the one the checkpoint recorded."""
    from gpt2_jax.weights import hf

    spec = request.hf_spec
    if spec is None and not training and recorded and recorded.get("init_from"):
        spec = hf.parse_init_from(recorded["init_from"])
    if spec is None:
        raise ConfigError(
            f"init_from: {where} holds LoRA adapters, and init_from names no base to "
            f"apply them to: set init_from=hf:<the base it was trained on>"
        )
    return _from_hf(dataclasses.replace(request, hf_spec=spec), adapter=False)


def _from_hf(request: Request, adapter: bool) -> Source:
    """Step 2 of the order: the shape from the ``hf:`` directory's config.json; with
    ``adapter``, ``request.adapter`` (a PEFT directory, its config checked here) to merge."""
    from gpt2_jax.weights import hf, peft

    directory = hf.checkpoint_dir(request.hf_spec)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise hf.HFImportError(f"{directory} has no config.json (a Hugging Face model directory?)")
    model_cfg = hf.config_from_hf(
        json.loads(config_path.read_text()), str(config_path), **request.runtime
    )
    source = Source("hf", model_cfg, path=directory)
    if not (adapter and request.adapter):
        return source
    try:
        lora_cfg, _ = peft.read_adapter_config(request.adapter, model_cfg)
    except peft.PeftError as e:
        raise peft.PeftError(f"lora.init_from: {e}") from None
    return dataclasses.replace(source, lora=lora_cfg, adapter=Path(request.adapter))


def _saved_steps(ckpt_dir: Path) -> list[int]:
    """The finished checkpoint steps in ``ckpt_dir``, read from the directory names.

    Orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` when done,
    so an all-digits directory is a finished step. No CheckpointManager here: opening one
    is a collective with several processes, and process 0 alone calls this (to move steps).
    """
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def load_hf_params(source: Source) -> dict:
    """The Hugging Face weights of an ``hf`` source, laid out as ``source.model_cfg`` says."""
    from gpt2_jax.weights import hf

    m = source.model_cfg
    _, params = hf.load_pretrained(source.path, **{k: getattr(m, k) for k in hf.OVERRIDABLE})
    return params


def restore(
    source: Source,
    ckpt: ckpt_lib.Checkpointer,
    abstract_fn,
    shardings_fn,
    flag: str,
    partial: bool = False,
):
    """A checkpoint's tree, restored in its saved layout and converted to ``model_cfg``'s.

    ``abstract_fn(model_cfg)`` -> the abstract tree (e.g. the train state, or
    ``{"params": ...}`` with ``partial=True``); ``shardings_fn(abstract)`` -> its shardings.
    An unreadable step raises the ``unreadable`` error (the newest earlier step, ``flag``).
    """
    target_cfg = source.model_cfg
    saved_layout = dataclasses.replace(target_cfg, scan_layers=source.saved_cfg.scan_layers)
    abstract = abstract_fn(saved_layout)
    shardings = shardings_fn(abstract)
    try:
        tree = ckpt.restore(
            source.step, ckpt_lib.abstract_like(abstract, shardings), partial=partial
        )
    except ckpt_lib.CheckpointError as e:
        raise unreadable(ckpt.directory, source.step, ckpt.all_steps(), e, flag) from e
    if saved_layout.scan_layers == target_cfg.scan_layers:
        return tree
    target_sh = shardings_fn(abstract_fn(target_cfg))
    convert = functools.partial(
        relayout, scan_layers=target_cfg.scan_layers, n_layer=target_cfg.n_layer
    )
    return jax.jit(convert, out_shardings=target_sh)(tree)


def _whole_copy(abstract):
    """Shardings for a restore that one command reads whole: one process, one local device
    (eval/generate place them as they need); several, replicated over every device, so
    each process holds the whole (addressable) copy."""
    if jax.process_count() == 1:
        where = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    else:
        mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
        where = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda _: where, abstract)


def params_of(source: Source) -> dict:
    """The params of a resolved checkpoint or ``hf`` source, laid out as its model config
    says (one device; replicated over every device with several processes). LoRA (a LoRA
    run's checkpoint, or ``hf`` with an adapter): the base with the adapters merged in,
    plain params for the model config without LoRA."""
    if source.kind == "hf":
        params = load_hf_params(source)
        if source.adapter is None:
            return params
        try:
            return lora_base.merge_adapter_dir(params, source.model_cfg, source.adapter)
        except lora_base.peft.PeftError as e:
            raise lora_base.peft.PeftError(f"lora.init_from: {e}") from None
    if source.lora is not None:
        base = load_hf_params(source.base)
        now = lora_base.base_identity(source.base.describe(), base)
        where = source.path / str(source.step)
        lora_base.check_base(source.base_record, now, str(where), source_too=False)
        return lora.merge(base, adapters_of(source), source.lora)

    def abstract_fn(mcfg):
        init = functools.partial(model_lib.init_params, mcfg)
        return {"params": jax.eval_shape(init, jax.random.PRNGKey(0))}

    with ckpt_lib.Checkpointer(source.path, read_only=True) as ckpt:
        state = restore(source, ckpt, abstract_fn, _whole_copy, "--step", partial=True)
    return state["params"]


def adapters_of(source: Source) -> dict:
    """The LoRA adapters of a LoRA run's checkpoint (``source.lora`` set), in the
    ``"lora"`` collection's layout of ``source.model_cfg`` (one device, as ``params_of``)."""

    def abstract_fn(mcfg):
        init = functools.partial(lora.init_adapters, source.lora, mcfg, scanned=mcfg.scan_layers)
        return {"params": jax.eval_shape(init, jax.random.PRNGKey(0))}

    with ckpt_lib.Checkpointer(source.path, read_only=True) as ckpt:
        state = restore(source, ckpt, abstract_fn, _whole_copy, "--step", partial=True)
    return state["params"]


# ------------------------------------------------------------------ moving runs aside


def start_fresh(workdir: Path) -> list[Path]:
    """Moves the workdir's checkpoints, metrics, tensorboard and W&B run id aside
    (``*.old-<time>``): a fresh start is a new W&B run too."""
    stamp = _stamp()
    moved = []
    for name in wd.MOVED_ON_FRESH:
        path = workdir / name
        if path.exists():
            moved.append(_move(path, workdir / f"{name}.old-{stamp}"))
    return moved


def supersede_after(ckpt_dir: Path, step: int) -> list[Path]:
    """Moves steps after ``step`` to ``<step>.superseded-<time>`` (Orbax ignores them)."""
    stamp = _stamp()
    later = sorted(s for s in _saved_steps(ckpt_dir) if s > step)
    return [_move(ckpt_dir / str(s), ckpt_dir / f"{s}.superseded-{stamp}") for s in later]

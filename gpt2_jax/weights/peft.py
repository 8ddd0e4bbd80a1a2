"""PEFT LoRA adapter directories <-> gpt2_jax adapters (``model.lora``'s ``"lora"`` tree).

A directory that ``peft.PeftModel.from_pretrained(GPT2LMHeadModel, DIR)`` loads holds

- ``adapter_config.json``: ``peft_type`` LORA, ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules``, ``fan_in_fan_out`` (true: GPT-2's Conv1D stores W as [in, out]), ...;
- ``adapter_model.safetensors``: for every layer i and adapted module M (``attn.c_attn``,
  ``attn.c_proj``, ``mlp.c_fc``, ``mlp.c_proj``)
  ``base_model.model.transformer.h.{i}.{M}.lora_A.weight`` [r, in] and
  ``...lora_B.weight`` [out, r].

Those tensors are ``model.lora``'s A and B as they are: reading and writing is a rename, plus
a stack over layers for the scanned layout. Which modules an adapter adapts follows PEFT's
matching of ``target_modules`` against module names (peft ``check_target_module_exists``):
a list entry matches a module whose name equals it or ends with ``.<entry>``; a string is a
regex that must match the whole name. So ``c_proj`` is both projections and ``attn.c_proj``
one of them; ``write_adapter`` writes the names that match exactly the adapted modules.

Refused with ``PeftError`` (one line naming the path and the key or tensor): a missing
directory or file, a PEFT type other than LORA, targets GPT-2 has no adaptable module for,
an adapter on only some layers, ``fan_in_fan_out`` false, options that change the math
(DoRA, rsLoRA, per-module ranks or alphas, trained biases, extra trained modules, ...), and
tensors missing, unexpected, or of a shape the base does not have.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.errors import UserError
from gpt2_jax.model import lora
from gpt2_jax.model.config import DTYPES, GPT2Config


class PeftError(UserError, ValueError):
    """A PEFT adapter directory gpt2_jax cannot use with this base (the message says why)."""


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel's name of block i of a GPT2LMHeadModel, the prefix of every adapter tensor.
TENSOR_PREFIX = "base_model.model.transformer.h."
# adapter_config.json keys that change the math unless they hold their neutral value
# (None, false, {} or []; bias: "none"), with what they would do.
_REFUSED = {
    "use_dora": "DoRA's magnitude vectors",
    "use_rslora": "rsLoRA's alpha / sqrt(r) scaling",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "bias": "trained base biases",
    "lora_bias": "a bias on lora_B",
    "layers_to_transform": "adapters on only some layers",
    "layer_replication": "replicated layers",
    "modules_to_save": "fully trained extra modules",
    "trainable_token_indices": "trained token embeddings",
    "target_parameters": "adapters on parameters, not modules",
    "exclude_modules": "excluded modules",
    "use_qalora": "QALoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}


def _tensor_name(layer: int, path: str, which: str) -> str:
    """PEFT's name of layer ``layer``'s ``which`` (lora_A / lora_B) on module ``path``."""
    return f"{TENSOR_PREFIX}{layer}.{path}.{which}.weight"


def peft_target_modules(lora_cfg: lora.LoraConfig) -> list[str]:
    """``target_modules`` for adapter_config.json that PEFT matches to exactly
    ``lora.module_paths(lora_cfg)``: ``c_proj`` when both projections are adapted, the
    qualified ``attn.c_proj`` / ``mlp.c_proj`` for one (a suffix match in PEFT)."""
    paths = lora.module_paths(lora_cfg)
    both = "attn.c_proj" in paths and "mlp.c_proj" in paths
    names = []
    for path in paths:
        short = path.split(".")[1]
        if short != "c_proj":
            name = short
        else:
            name = short if both else path
        if name not in names:
            names.append(name)
    return names


def _matches(target_modules: str | list[str], name: str) -> bool:
    """PEFT's rule: a string is a regex for the whole name; a list entry equals the name
    or is a suffix of it after a dot."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in target_modules)


def _resolve_targets(target_modules: Any, n_layer: int, source: str) -> tuple[str, ...]:
    """The ``lora.MODULES`` an adapter_config.json's ``target_modules`` adapts, the same in
    every layer; PeftError for a target matching no adaptable module, or some layers only."""
    valid = ", ".join(lora.TARGETS)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        return lora.MODULES
    if not target_modules or not isinstance(target_modules, (str, list, tuple)):
        raise PeftError(f"{source}: target_modules={target_modules!r} names no module")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise PeftError(f"{source}: target_modules={target_modules!r}: bad regex ({e})") from e
    else:
        target_modules = [str(t) for t in target_modules]
        names = [f"transformer.h.{i}.{m}" for i in range(n_layer) for m in lora.MODULES]
        for t in target_modules:
            if not any(_matches([t], name) for name in names):
                raise PeftError(
                    f"{source}: target_modules entry {t!r} is not a GPT-2 module LoRA can "
                    f"adapt here; valid names: {valid}"
                )
    per_layer = [
        tuple(m for m in lora.MODULES if _matches(target_modules, f"transformer.h.{i}.{m}"))
        for i in range(n_layer)
    ]
    if not per_layer[0] and len(set(per_layer)) == 1:
        raise PeftError(
            f"{source}: target_modules={target_modules!r} matches no GPT-2 module LoRA can "
            f"adapt; valid names: {valid}"
        )
    if len(set(per_layer)) != 1:
        raise PeftError(
            f"{source}: target_modules={target_modules!r} adapts some layers only "
            f"({per_layer}); gpt2_jax adapts the same modules in every layer"
        )
    return per_layer[0]


def _check_options(config: dict, source: str) -> None:
    """PeftError for a PEFT type other than LORA, fan_in_fan_out false, or an option that
    changes the math (``_REFUSED``)."""
    if config.get("peft_type") != "LORA":
        raise PeftError(
            f"{source}: peft_type={config.get('peft_type')!r}; only LORA adapters are supported"
        )
    if config.get("fan_in_fan_out") is not True:
        raise PeftError(
            f"{source}: fan_in_fan_out={config.get('fan_in_fan_out')!r}; GPT-2's Conv1D stores "
            "weights [in, out], so a GPT-2 LoRA adapter has fan_in_fan_out true (PEFT sets it)"
        )
    for key, what in _REFUSED.items():
        value = config.get(key)
        neutral = value == "none" if key == "bias" else value in (None, False, {}, [])
        if not neutral:
            raise PeftError(f"{source}: {key}={value!r} ({what}) is not supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise PeftError(f"{source}: no {key!r} key (is this a PEFT LoRA adapter config?)")


def lora_config_from_peft(config: dict, model_cfg: GPT2Config, source: str) -> lora.LoraConfig:
    """An adapter_config.json dict -> the ``LoraConfig`` it means for ``model_cfg``'s GPT-2
    (targets resolved to qualified module paths). PeftError naming ``source`` and the key."""
    _check_options(config, source)
    targets = _resolve_targets(config["target_modules"], model_cfg.n_layer, source)
    r, alpha = config["r"], config["lora_alpha"]
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise PeftError(f"{source}: r={r!r} must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise PeftError(f"{source}: lora_alpha={alpha!r} must be a number")
    lora_cfg = lora.LoraConfig(
        rank=r, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
        targets=targets,
    )  # fmt: skip
    try:
        lora_cfg.validate()
    except ValueError as e:
        raise PeftError(f"{source}: {e}") from e
    return lora_cfg


def _expected(lora_cfg: lora.LoraConfig, model_cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every adapter tensor's PEFT name -> its shape for ``model_cfg``'s base."""
    shapes, r = lora.module_shapes(model_cfg), lora_cfg.rank
    want = {}
    for i in range(model_cfg.n_layer):
        for path in lora.module_paths(lora_cfg):
            fan_in, fan_out = shapes[path]
            want[_tensor_name(i, path, "lora_A")] = (r, fan_in)
            want[_tensor_name(i, path, "lora_B")] = (fan_out, r)
    return want


def _check_tensors(have: dict, want: dict, file: Path, model_cfg: GPT2Config, r: int) -> None:
    """PeftError naming the first missing, misshapen or unexpected tensor (and how many more)."""
    base = f"n_layer={model_cfg.n_layer}, n_embd={model_cfg.n_embd}, n_inner={model_cfg.inner_dim}"
    problems = [
        f"tensor {n} has shape {have[n]}; the config's r={r} on the base ({base}) wants {want[n]}"
        for n in want
        if n in have and have[n] != want[n]
    ]
    problems += [f"tensor {n} {want[n]} is missing" for n in want if n not in have]
    problems += [
        f"tensor {n} is unexpected (not an adapter of this config's targets on a base with {base})"
        for n in sorted(set(have) - set(want))
    ]
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise PeftError(f"{file}: {problems[0]}{more}")


def _to_tree(tensors: dict, lora_cfg, model_cfg: GPT2Config, scanned: bool) -> dict:
    """PEFT-named host arrays -> the ``"lora"`` collection's tree (either layout)."""
    dtype = DTYPES[model_cfg.param_dtype]

    def layer(i: int) -> dict:
        tree: dict = {}
        for path in lora.module_paths(lora_cfg):
            group, name = path.split(".")
            tree.setdefault(group, {})[name] = {
                which: np.asarray(tensors[_tensor_name(i, path, which)]).astype(dtype)
                for which in ("lora_A", "lora_B")
            }
        return tree

    layers = [layer(i) for i in range(model_cfg.n_layer)]
    if scanned:
        return {"h": jax.tree.map(lambda *xs: np.stack(xs), *layers)}
    return {f"h_{i}": tree for i, tree in enumerate(layers)}


def read_adapter_config(
    path: str | os.PathLike, model_cfg: GPT2Config
) -> tuple[lora.LoraConfig, dict]:
    """A PEFT adapter directory's adapter_config.json -> (the LoraConfig it means for
    ``model_cfg``'s base, the JSON as read), without reading its tensors. PeftError for a
    missing directory or file, bad JSON, or a config gpt2_jax cannot use (naming it)."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise PeftError(f"{directory}: no such adapter directory")
    config_file = directory / ADAPTER_CONFIG
    if not config_file.is_file():
        raise PeftError(f"{directory} has no {ADAPTER_CONFIG} (a PEFT adapter directory?)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise PeftError(f"{config_file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise PeftError(f"{config_file}: not a JSON object")
    return lora_config_from_peft(config, model_cfg, str(config_file)), config


def read_adapter(
    path: str | os.PathLike, model_cfg: GPT2Config, scanned: bool
) -> tuple[lora.LoraConfig, dict, dict]:
    """A PEFT LoRA adapter directory -> (LoraConfig, adapters, meta) for ``model_cfg``'s base.

    ``adapters``: host arrays in ``model_cfg.param_dtype``, in the ``"lora"`` collection's
    layout (stacked over layers when ``scanned``); ``meta``: ``base_model_name_or_path``,
    ``task_type``, ``peft_version`` as the config has them, and ``path``. Raises PeftError
    (see the module docstring), naming the path and the key or tensor.
    """
    from safetensors import safe_open

    directory = Path(path).expanduser()
    lora_cfg, config = read_adapter_config(directory, model_cfg)
    file = directory / ADAPTER_WEIGHTS
    if not file.is_file():
        other = " (adapter_model.bin is not read: save with safetensors)"
        bin_only = (directory / "adapter_model.bin").is_file()
        raise PeftError(f"{directory} has no {ADAPTER_WEIGHTS}{other if bin_only else ''}")
    with safe_open(str(file), framework="np") as handle:
        have = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        _check_tensors(have, _expected(lora_cfg, model_cfg), file, model_cfg, lora_cfg.rank)
        tensors = {k: handle.get_tensor(k) for k in have}
    meta = {k: config.get(k) for k in ("base_model_name_or_path", "task_type", "peft_version")}
    meta["path"] = str(directory)
    return lora_cfg, _to_tree(tensors, lora_cfg, model_cfg, scanned), meta


def adapter_tensors(adapters: dict, lora_cfg: lora.LoraConfig, model_cfg: GPT2Config) -> dict:
    """The ``"lora"`` tree (either layout) -> {PEFT tensor name: host array}, shapes checked."""
    want = _expected(lora_cfg, model_cfg)
    out = {}
    for i in range(model_cfg.n_layer):
        for path in lora.module_paths(lora_cfg):
            group, name = path.split(".")
            for which in ("lora_A", "lora_B"):
                try:
                    if "h" in adapters:
                        leaf = adapters["h"][group][name][which]
                        leaf = np.asarray(jax.device_get(leaf))[i]
                    else:
                        leaf = np.asarray(jax.device_get(adapters[f"h_{i}"][group][name][which]))
                except KeyError as e:
                    raise ValueError(f"adapters have no layer {i} {path} {which}") from e
                key = _tensor_name(i, path, which)
                if tuple(leaf.shape) != want[key]:
                    raise ValueError(f"adapter {key} has shape {leaf.shape}, wants {want[key]}")
                out[key] = np.ascontiguousarray(leaf)
    return out


def _adapter_config(lora_cfg: lora.LoraConfig, base_name: str) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA on GPT-2 (only what it reads)."""
    alpha = lora_cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora_cfg.rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": lora_cfg.dropout,
        "target_modules": peft_target_modules(lora_cfg),
        "fan_in_fan_out": True,
        "bias": "none",
        "base_model_name_or_path": base_name,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_dora": False,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _publish_dir(out_dir, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Runs ``write(tmp)`` into a temporary sibling of ``out_dir``, then renames it into
    place: the directory appears whole or not at all. A non-empty ``out_dir`` is refused
    (FileExistsError) unless ``overwrite``, and then replaced only once the new one is done."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        write(tmp)
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_adapter(
    path: str | os.PathLike,
    lora_cfg: lora.LoraConfig,
    adapters: dict,
    base_name: str,
    model_cfg: GPT2Config,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes ``adapters`` (the ``"lora"`` tree, either layout, any placement one process
    can gather) as a PEFT adapter directory: ``adapter_config.json`` (``base_name`` as
    ``base_model_name_or_path``) and ``adapter_model.safetensors`` (the adapters' dtype).
    ``PeftModel.from_pretrained(GPT2LMHeadModel of the base, path)`` loads it. Atomic; a
    non-empty ``path`` is refused unless ``overwrite``. Returns the directory."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(adapters, lora_cfg, model_cfg)  # before anything is written
    config = _adapter_config(lora_cfg, base_name)

    def write(directory: Path) -> None:
        save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (directory / ADAPTER_CONFIG).write_text(text)

    return _publish_dir(path, overwrite, write)

"""A LoRA run's base model: its identity (where it came from and a hash of its arrays), and
adapters merged into it for the commands that read weights.

A LoRA run trains adapters on frozen pretrained weights (``init_from``, the base) and saves
only the adapters, so the adapters are worth nothing without that exact base. The run
records the base's identity in its config (``config.json`` and every checkpoint):
``record["lora"]["base"] = {"init_from": "hf:...", "sha256": "..."}``, the hash over every
array's bytes with its path, shape and dtype, in a fixed order (the unrolled layout's, so
``scan_layers`` does not change it). A resume loads the base again and refuses another one;
``eval`` / ``generate`` / ``lm-eval`` / ``export --merge`` check the hash before merging.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import numpy as np

from gpt2_jax.errors import ConfigError
from gpt2_jax.model import gpt2 as model_lib
from gpt2_jax.model import lora
from gpt2_jax.model.config import GPT2Config
from gpt2_jax.weights import peft


def base_sha256(params: dict) -> str:
    """sha256 (hex) of a params tree: every leaf's path, shape, dtype and bytes, leaves in
    the unrolled layout's sorted order (the same for the scanned layout of the same
    weights). Host numpy arrays are hashed in place; device arrays are fetched."""
    if "h" in params:
        params = model_lib.unstack_layers(jax.tree.map(np.asarray, params))
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        x = np.ascontiguousarray(np.asarray(leaf))
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        digest.update(f"{name}:{x.shape}:{x.dtype};".encode())
        digest.update(x.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


def base_identity(init_from: str, params: dict) -> dict:
    """What a LoRA run records about its base: ``{"init_from", "sha256"}``."""
    return {"init_from": init_from, "sha256": base_sha256(params)}


def check_base(recorded: dict | None, now: dict, where: str, source_too: bool = True) -> None:
    """ConfigError naming both bases unless ``now`` is the base ``recorded`` (the identity a
    checkpoint holds): the same hash and, with ``source_too``, the same ``init_from``.
    ``where``: the checkpoint, for the message. No record (nothing to compare): passes."""
    if not recorded:
        return
    same = recorded.get("sha256") == now["sha256"]
    if source_too:
        same = same and recorded.get("init_from") == now["init_from"]
    if same:
        return
    raise ConfigError(
        f"init_from: the LoRA adapters of {where} were trained on the base "
        f"{recorded.get('init_from')!r} (sha256 {recorded.get('sha256')}), not on "
        f"{now['init_from']!r} (sha256 {now['sha256']}): adapters fit only the weights they "
        f"were trained on; set init_from={recorded.get('init_from')} (the same weights), or "
        f"train in another --workdir"
    )


def merge_adapter_dir(params: dict, model_cfg: GPT2Config, adapter: str | os.PathLike) -> dict:
    """``params`` (the base, either layout) with the PEFT adapter directory ``adapter``
    merged in (``model.lora.merge``): plain params, for a model config without LoRA.
    PeftError (naming the path and the key or tensor) for an adapter that does not fit."""
    lora_cfg, adapters, _ = peft.read_adapter(Path(adapter), model_cfg, scanned="h" in params)
    return lora.merge(params, adapters, lora_cfg)


def base_name(init_from: str) -> str:
    """``base_model_name_or_path`` of an exported adapter: the base's ``init_from`` without
    ``hf:`` (a hub id, or the directory as given)."""
    return init_from.removeprefix("hf:")

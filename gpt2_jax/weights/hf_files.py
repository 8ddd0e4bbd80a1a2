"""Finding and reading a Hugging Face checkpoint: ``hf:<dir or hub id>``, a local directory
or a hub snapshot (``huggingface_hub``), and its tensors one at a time (safetensors, or
``pytorch_model.bin`` through torch). ``weights/hf.py`` turns them into our params.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpt2_jax.errors import UserError


class HFImportError(UserError, ValueError):
    """A checkpoint or hub id that cannot be turned into our GPT-2 (message says why)."""


# init_from's spelling for Hugging Face weights: 'hf:<dir or hub id>'.
PREFIX = "hf:"
KEY_PREFIX = "transformer."  # how most checkpoints name the trunk's tensors
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class Reader:
    """Lazily readable tensors of a checkpoint: ``shapes`` up front, ``pop(name)`` reads one.

    Names are normalized (``transformer.`` stripped); ``raw`` maps them back.
    """

    def __init__(self, location: Path):
        self.location = location
        self.raw: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.duplicates: list[str] = []

    def _add(self, raw_name: str, shape: tuple[int, ...]) -> None:
        name = raw_name[len(KEY_PREFIX) :] if raw_name.startswith(KEY_PREFIX) else raw_name
        if name in self.raw:
            self.duplicates.append(f"{self.raw[name]} / {raw_name}")
        self.raw[name] = raw_name
        self.shapes[name] = tuple(int(d) for d in shape)

    def pop(self, name: str) -> np.ndarray:
        raise NotImplementedError


class SafetensorsReader(Reader):
    """One or more ``.safetensors`` files, read tensor by tensor through their mmap."""

    def __init__(self, location: Path, files: list[Path], stack: contextlib.ExitStack):
        from safetensors import safe_open

        super().__init__(location)
        self._handle: dict[str, Any] = {}
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="np"))
            for key in handle.keys():
                self._handle[key] = handle
                self._add(key, handle.get_slice(key).get_shape())

    def pop(self, name: str) -> np.ndarray:
        raw = self.raw.pop(name)
        return self._handle.pop(raw).get_tensor(raw)


class TorchReader(Reader):
    """``pytorch_model.bin`` file(s); mmap'd when the file format allows it."""

    def __init__(self, location: Path, files: list[Path]):
        try:
            import torch
        except ImportError as e:
            raise HFImportError(
                f"{location} holds only pytorch_model.bin weights, which need torch to read: "
                "install torch (pip install torch==2.13.0, the CPU wheel) or convert the "
                "checkpoint to model.safetensors"
            ) from e
        super().__init__(location)
        self._tensors: dict[str, Any] = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be mmap'd
                state = torch.load(file, map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                self._tensors[key] = tensor
                self._add(key, tuple(tensor.shape))

    def pop(self, name: str) -> np.ndarray:
        import torch

        tensor = self._tensors.pop(self.raw.pop(name)).detach()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: widen (exact)
            tensor = tensor.float()
        return tensor.numpy()


def weight_files(directory: Path) -> tuple[str, list[Path]]:
    """("safetensors" | "torch", files) for the first weight format found in ``directory``."""
    for name in _WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        kind = "safetensors" if "safetensors" in name else "torch"
        if not name.endswith(".index.json"):
            return kind, [path]
        weight_map = json.loads(path.read_text())["weight_map"]
        return kind, [directory / f for f in sorted(set(weight_map.values()))]
    raise HFImportError(
        f"{directory} has no weights: expected one of {list(_WEIGHT_FILES)} beside config.json"
    )


# ------------------------------------------------------------------ resolving a location


def _is_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once at import; read it again so a later
    # setenv (tests, notebooks) still means offline.
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or env.strip().lower() in ("1", "true", "yes", "on")


def _download(hub_id: str) -> Path:
    """Fetches config + safetensors weights of ``hub_id`` (or finds them in the HF cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    offline = _is_offline()
    try:
        path = snapshot_download(
            hub_id,
            allow_patterns=["config.json", "*.safetensors", "model.safetensors.index.json"],
            local_files_only=offline,
        )
    except RepositoryNotFoundError as e:
        raise HFImportError(
            f"{hub_id!r} is neither a local directory nor a model on the Hugging Face hub"
        ) from e
    except Exception as e:  # connection errors come in many types
        why = "offline mode is on (HF_HUB_OFFLINE)" if offline else f"{type(e).__name__}: {e}"
        raise HFImportError(
            f"cannot fetch {hub_id!r} from the Hugging Face hub ({why}) and it is not a local "
            "directory. Download the model elsewhere (config.json + model.safetensors) and "
            "pass its directory, e.g. init_from=hf:/path/to/dir"
        ) from e
    return Path(path)


def parse_init_from(init_from: str) -> str | None:
    """``init_from`` -> the directory or hub id after ``hf:``; None for '' (no weights).

    The one parser of that spelling; raises HFImportError for anything else.
    """
    if not init_from:
        return None
    if not init_from.startswith(PREFIX) or len(init_from) <= len(PREFIX):
        raise HFImportError(f"init_from: {init_from!r} must be '' or 'hf:<dir or hub id>'")
    return init_from[len(PREFIX) :]


def checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory holding the checkpoint: ``path_or_hub_id`` itself or a hub snapshot.

    A leading ``hf:`` (the config's ``init_from`` spelling) is accepted and dropped.
    """
    spec = os.fspath(path_or_hub_id)
    spec = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HFImportError(f"{path} is a file: pass the directory holding config.json")
    # Hub ids are "name" or "org/name"; anything else that does not exist is a bad path.
    looks_local = spec.startswith(("/", ".", "~")) or spec.count("/") > 1
    if looks_local or not spec:
        raise HFImportError(f"{spec!r}: no such directory")
    return _download(spec)

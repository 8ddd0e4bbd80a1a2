"""Hugging Face GPT-2 checkpoints <-> our params pytree (import and export).

Import reads a local directory (``config.json`` + ``model.safetensors``, sharded
safetensors, or ``pytorch_model.bin`` when torch is installed) or a hub id fetched with
``huggingface_hub``. Export writes what ``transformers.GPT2LMHeadModel.from_pretrained``
and ``AutoTokenizer.from_pretrained`` read, with no torch needed.

HF GPT-2 ``Conv1D`` weights are stored (in, out), already a Flax ``Dense`` kernel: no
transposes anywhere. Tensors are converted one at a time (never the whole checkpoint
twice in memory), so gpt2-xl (1.5B params, 6 GB in fp32) loads in well under 24 GiB.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gpt2_jax.data import tokenizer as tokenizer_lib
from gpt2_jax.model.config import DTYPES, RUNTIME_FIELDS, SHAPE_FIELDS, GPT2Config
from gpt2_jax.weights import hf_files
from gpt2_jax.weights.hf_files import (  # noqa: F401 (hf.HFImportError, hf.checkpoint_dir, ...)
    HFImportError,
    checkpoint_dir,
    parse_init_from,
)

# GPT2Config fields a user may override at import: how we compute, not what the model is.
OVERRIDABLE = frozenset({*RUNTIME_FIELDS, "initializer_range"})
# config.json fields copied into GPT2Config (same names on both sides).
_HF_FIELDS = (*SHAPE_FIELDS, "resid_pdrop", "embd_pdrop", "attn_pdrop", "initializer_range")
# Both are the tanh approximation our MLP computes (jax.nn.gelu(approximate=True)).
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
# Buffers old checkpoints carry (causal mask, -1e4 fill value): not parameters.
_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")

# ------------------------------------------------------------------ name <-> path map


def _block_leaves(model_cfg: GPT2Config) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF name inside block ``h.<i>``, our path inside a block, shape) for every leaf."""
    C, I = model_cfg.n_embd, model_cfg.inner_dim
    return [
        ("ln_1.weight", ("ln_1", "scale"), (C,)),
        ("ln_1.bias", ("ln_1", "bias"), (C,)),
        ("attn.c_attn.weight", ("attn", "c_attn", "kernel"), (C, 3 * C)),
        ("attn.c_attn.bias", ("attn", "c_attn", "bias"), (3 * C,)),
        ("attn.c_proj.weight", ("attn", "c_proj", "kernel"), (C, C)),
        ("attn.c_proj.bias", ("attn", "c_proj", "bias"), (C,)),
        ("ln_2.weight", ("ln_2", "scale"), (C,)),
        ("ln_2.bias", ("ln_2", "bias"), (C,)),
        ("mlp.c_fc.weight", ("mlp", "c_fc", "kernel"), (C, I)),
        ("mlp.c_fc.bias", ("mlp", "c_fc", "bias"), (I,)),
        ("mlp.c_proj.weight", ("mlp", "c_proj", "kernel"), (I, C)),
        ("mlp.c_proj.bias", ("mlp", "c_proj", "bias"), (C,)),
    ]


def _top_leaves(model_cfg: GPT2Config) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """(HF name without ``transformer.``, our path, shape) for the non-block leaves."""
    return [
        ("wte.weight", ("wte", "embedding"), (model_cfg.vocab_size, model_cfg.n_embd)),
        ("wpe.weight", ("wpe", "embedding"), (model_cfg.n_positions, model_cfg.n_embd)),
        ("ln_f.weight", ("ln_f", "scale"), (model_cfg.n_embd,)),
        ("ln_f.bias", ("ln_f", "bias"), (model_cfg.n_embd,)),
    ]


def expected_shapes(model_cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """HF tensor name (without ``transformer.``) -> shape, for every parameter of ``model_cfg``."""
    shapes = {name: shape for name, _, shape in _top_leaves(model_cfg)}
    for i in range(model_cfg.n_layer):
        shapes.update({f"h.{i}.{name}": shape for name, _, shape in _block_leaves(model_cfg)})
    return shapes


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ------------------------------------------------------------------ config


def config_from_hf(hf: dict, source: str = "config.json", **overrides: Any) -> GPT2Config:
    """A Hugging Face GPT-2 ``config.json`` dict (+ non-identity overrides) -> GPT2Config.

    Raises HFImportError naming the field for anything our model does not compute.
    """
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type={hf.get('model_type')!r} (only 'gpt2' is supported)")
    act = hf.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        problems.append(f"activation_function={act!r} (supported: {list(SUPPORTED_ACTIVATIONS)})")
    # (field, value our model computes, its default in HF's GPT2Config)
    for field, ours, default in (
        ("scale_attn_weights", True, True),
        ("scale_attn_by_inverse_layer_idx", False, False),
        ("reorder_and_upcast_attn", False, False),
        ("add_cross_attention", False, False),
    ):
        if bool(hf.get(field, default)) != ours:
            problems.append(f"{field}={hf.get(field)!r} (only {ours} is supported)")
    if problems:
        raise HFImportError(f"{source}: unsupported GPT-2 variant: " + "; ".join(problems))

    bad = sorted(set(overrides) - OVERRIDABLE)
    if bad:
        raise HFImportError(
            f"cannot override {bad} when importing {source}: they define the checkpoint's "
            f"model; overridable fields are {sorted(OVERRIDABLE)}"
        )
    fields = {k: hf[k] for k in _HF_FIELDS if k in hf}
    model_cfg = GPT2Config(**{**fields, **overrides})
    try:
        model_cfg.validate()
    except ValueError as e:
        raise HFImportError(f"{source}: {e}") from e
    return model_cfg


def config_to_hf(model_cfg: GPT2Config, dtype: str) -> dict:
    """GPT2Config -> the ``config.json`` dict transformers' GPT2LMHeadModel writes."""
    # GPT-2's <|endoftext|>; a smaller (test) vocabulary does not contain it.
    eot = tokenizer_lib.EOT_ID if model_cfg.vocab_size > tokenizer_lib.EOT_ID else None
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": model_cfg.attn_pdrop,
        "bos_token_id": eot,
        "dtype": dtype,
        "embd_pdrop": model_cfg.embd_pdrop,
        "eos_token_id": eot,
        "initializer_range": model_cfg.initializer_range,
        "layer_norm_epsilon": model_cfg.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_embd": model_cfg.n_embd,
        "n_head": model_cfg.n_head,
        "n_inner": model_cfg.n_inner,
        "n_layer": model_cfg.n_layer,
        "n_positions": model_cfg.n_positions,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": model_cfg.resid_pdrop,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": model_cfg.vocab_size,
    }


# ------------------------------------------------------------------ tensor sources


# ------------------------------------------------------------------ import


def _check_weights(src: hf_files.Reader, model_cfg: GPT2Config, tied: bool) -> None:
    """Raises one HFImportError listing every missing, unexpected or misshapen tensor.

    ``tied``: config.json's tie_word_embeddings; untied needs an lm_head equal to wte.
    """
    want = expected_shapes(model_cfg)
    have = src.shapes
    missing = sorted(set(want) - set(have))
    unexpected = sorted(
        n for n in set(have) - set(want) if not _IGNORED.match(n) and n != "lm_head.weight"
    )
    wrong = [
        f"{n}: checkpoint {have[n]}, config wants {want[n]}"
        for n in sorted(set(want) & set(have))
        if have[n] != want[n]
    ]
    if "lm_head.weight" in have and have["lm_head.weight"] != want["wte.weight"]:
        wrong.append(
            f"lm_head.weight: checkpoint {have['lm_head.weight']}, "
            f"tied to wte it must be {want['wte.weight']}"
        )
    if not tied and "lm_head.weight" not in have:
        missing.append(
            "lm_head.weight (config.json says tie_word_embeddings=false; "
            "untied output heads are not supported)"
        )
    parts = [
        f"{len(v)} {what}:\n  " + "\n  ".join(v)
        for what, v in (
            ("duplicate tensors (with and without 'transformer.')", src.duplicates),
            ("missing tensors", missing),
            ("unexpected tensors", unexpected),
            ("shape mismatches", wrong),
        )
        if v
    ]
    if parts:
        raise HFImportError(
            f"{src.location} does not match its config.json (n_layer={model_cfg.n_layer}, "
            f"n_embd={model_cfg.n_embd}, n_inner={model_cfg.n_inner}, "
            f"vocab_size={model_cfg.vocab_size}, "
            f"n_positions={model_cfg.n_positions}; tensor names shown without 'transformer.'):\n"
            + "\n".join(parts)
        )


def _convert(src: hf_files.Reader, model_cfg: GPT2Config) -> dict:
    """Reads every tensor once into a params tree in ``model_cfg``'s layout and param_dtype."""
    dtype = np.dtype(DTYPES[model_cfg.param_dtype])
    params: dict = {}
    for name, path, _ in _top_leaves(model_cfg):
        tensor = src.pop(name)
        if name == "wte.weight" and "lm_head.weight" in src.raw:
            # Our head is always tied to wte: a different lm_head would be silently dropped.
            if not np.array_equal(src.pop("lm_head.weight"), tensor):
                raise HFImportError(
                    f"{src.location}: lm_head.weight differs from transformer.wte.weight; "
                    "untied output heads are not supported (our head is tied to wte)"
                )
        # copy=True: params own writable memory, not a read-only buffer or a torch mmap.
        _set(params, path, np.array(tensor, dtype=dtype, copy=True))
        del tensor
    for name, path, shape in _block_leaves(model_cfg):
        if model_cfg.scan_layers:
            # Preallocate the stacked [L, ...] leaf and fill it: no list of L copies to stack.
            stacked = np.empty((model_cfg.n_layer, *shape), dtype=dtype)
            for i in range(model_cfg.n_layer):
                stacked[i] = src.pop(f"h.{i}.{name}")
            _set(params, ("h", *path), stacked)
        else:
            for i in range(model_cfg.n_layer):
                tensor = src.pop(f"h.{i}.{name}")
                _set(params, (f"h_{i}", *path), np.array(tensor, dtype=dtype, copy=True))
    return params


def load_pretrained(path_or_hub_id: str | os.PathLike, **overrides: Any) -> tuple[GPT2Config, dict]:
    """Loads a Hugging Face GPT-2 checkpoint -> ``(GPT2Config, params)``.

    ``path_or_hub_id``: a directory with ``config.json`` and ``model.safetensors`` (or
    sharded safetensors, or ``pytorch_model.bin`` with torch installed), or a hub id
    (fetched online, or found in the HF cache offline). ``overrides``: GPT2Config fields
    in ``OVERRIDABLE`` (dtype, param_dtype, scan_layers, remat, dropout probabilities).

    Params are host numpy arrays in ``model_cfg.param_dtype``, laid out as ``model_cfg.scan_layers``
    says (``h`` with a leading layer axis, or ``h_0 .. h_{L-1}``). Raises HFImportError
    listing every missing / unexpected / misshapen tensor, or an unsupported config field.
    """
    directory = checkpoint_dir(path_or_hub_id)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise HFImportError(f"{directory} has no config.json (a Hugging Face model directory?)")
    hf_config = json.loads(config_path.read_text())
    model_cfg = config_from_hf(hf_config, str(config_path), **overrides)
    kind, files = hf_files.weight_files(directory)
    with contextlib.ExitStack() as stack:
        if kind == "safetensors":
            src: hf_files.Reader = hf_files.SafetensorsReader(directory, files, stack)
        else:
            src = hf_files.TorchReader(directory, files)
        _check_weights(src, model_cfg, tied=bool(hf_config.get("tie_word_embeddings", True)))
        params = _convert(src, model_cfg)
    return model_cfg, params


# ------------------------------------------------------------------ export


def _hf_tensors(model_cfg: GPT2Config, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(``transformer.*`` name, host array) for every parameter; either params layout."""
    scanned = "h" in params
    for name, path, shape in _top_leaves(model_cfg):
        yield hf_files.KEY_PREFIX + name, _host(params, path, shape)
    for name, path, shape in _block_leaves(model_cfg):
        if scanned:
            stacked = _host(params, ("h", *path), (model_cfg.n_layer, *shape))
            for i in range(model_cfg.n_layer):
                yield f"{hf_files.KEY_PREFIX}h.{i}.{name}", stacked[i]
        else:
            for i in range(model_cfg.n_layer):
                yield f"{hf_files.KEY_PREFIX}h.{i}.{name}", _host(params, (f"h_{i}", *path), shape)


def _host(params: dict, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
    try:
        leaf = _get_path(params, path)
    except (KeyError, TypeError) as e:
        raise ValueError(f"params have no leaf {'/'.join(path)}") from e
    if tuple(leaf.shape) != shape:
        raise ValueError(
            f"params {'/'.join(path)} has shape {tuple(leaf.shape)}, the config wants {shape}"
        )
    # device_get gathers a sharded array (it must be fully addressable: one process).
    return np.ascontiguousarray(jax.device_get(leaf))


def _write_tokenizer(directory: Path, n_positions: int) -> None:
    """GPT-2 tokenizer files: ``AutoTokenizer.from_pretrained(directory)`` works offline."""
    encoder_json, vocab_bpe = tokenizer_lib.vocab_files()
    shutil.copyfile(encoder_json, directory / "vocab.json")  # same bytes, HF's file names
    shutil.copyfile(vocab_bpe, directory / "merges.txt")
    eot = tokenizer_lib.EOT_TOKEN
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "add_bos_token": False,
        "errors": "replace",
        "model_max_length": n_positions,
        **special,
    }
    _write_json(directory / "tokenizer_config.json", tokenizer_config)
    _write_json(directory / "special_tokens_map.json", special)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _write_model(directory: Path, model_cfg: GPT2Config, params: dict) -> None:
    from safetensors.numpy import save_file

    tensors = dict(_hf_tensors(model_cfg, params))  # views into one host copy per leaf
    dtypes = {str(t.dtype) for t in tensors.values()}
    if len(dtypes) != 1 or dtypes - set(DTYPES):
        raise ValueError(f"params must share one dtype of {list(DTYPES)}, got {sorted(dtypes)}")
    # transformers 5 saves tied GPT-2 without lm_head.weight (it re-ties on load), with
    # metadata format=pt; we write the same so from_pretrained reports nothing missing.
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    hf_config = config_to_hf(model_cfg, dtypes.pop())
    _write_json(directory / "config.json", hf_config)
    # What transformers derives from the model config; writing it spares a log message.
    _write_json(
        directory / "generation_config.json",
        {
            "_from_model_config": True,
            "bos_token_id": hf_config["bos_token_id"],
            "eos_token_id": hf_config["eos_token_id"],
        },
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_pretrained(
    model_cfg: GPT2Config, params: dict, out_dir: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Writes ``params`` as a Hugging Face GPT-2 directory (model and tokenizer).

    Files: config.json, generation_config.json, model.safetensors (``transformer.*`` keys,
    no lm_head.weight: tied), vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json.
    ``params`` in either layout (``h`` stacked or ``h_0..``), any device placement that
    one process can gather. Tensors keep the params' dtype. The directory appears
    atomically (written to a temporary sibling, then renamed); an existing non-empty
    ``out_dir`` is refused unless ``overwrite=True``. Returns the directory.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700)
        _write_model(tmp, model_cfg, params)
        _write_tokenizer(tmp, model_cfg.n_positions)
        if out.is_dir():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
            try:
                tmp.rename(out)
            except BaseException:
                old.rename(out)  # put the previous export back
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out

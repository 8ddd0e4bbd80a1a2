"""Which rows a split holds: its spec (the token cache key) and run_clm's or a seeded hold-out.

A spec is everything that decides a split's rows and tokens, computed without loading any
data; its JSON is hashed into the cache file names (``token_cache.stem``).
"""

from __future__ import annotations

from pathlib import Path

from gpt2_jax.data import pydoc, tokenizer
from gpt2_jax.data.config import BUILTIN_PYDOC, DataConfig, resolve_files
from gpt2_jax.data.sources import DataError

CACHE_FORMAT_VERSION = 1


def split_spec(data_cfg: DataConfig, split: str) -> dict:
    """Everything that decides the rows of ``split``, cheap to compute (no dataset load).

    Its JSON is hashed into the cache key. ``holdout`` is run_clm's split string over train
    (``train[:5%]`` / ``train[5%:]``), a seeded draw (``holdout``) or None. Keys that are
    not set are left out, so that caches built before they existed stay valid.
    """
    name = data_cfg.dataset
    spec = dict(split=split, text_column=data_cfg.text_column)
    if data_cfg.examples:  # the text format's spec (and so its cache keys) stays as it was
        spec.update(format=data_cfg.format, columns=list(example_columns(data_cfg)))
    if name == BUILTIN_PYDOC:
        spec.update(kind="pydoc", holdout=holdout(data_cfg, split), topics_sha=pydoc.pydoc_sha())
    elif name:
        # The hub's split names are unknown until it is loaded; the hold-out only applies
        # when the dataset has no validation split (decided in rows.load_rows).
        spec.update(
            kind="hub", name=name, config=data_cfg.dataset_config, holdout=holdout(data_cfg, split)
        )
        for key in ("revision", "data_files", "data_dir"):  # only when set: old keys stay valid
            if getattr(data_cfg, key):
                spec[key] = getattr(data_cfg, key)
    else:
        spec.update(_files_spec(data_cfg, split))
    spec.update(
        append_eos=bool(data_cfg.append_eos),
        max_rows=int(data_cfg.max_rows),
        tokenizer=["gpt2", tokenizer.ENCODER_JSON_SHA256, tokenizer.VOCAB_BPE_SHA256],
        version=CACHE_FORMAT_VERSION,
    )
    return spec


def _files_spec(data_cfg: DataConfig, split: str) -> dict:
    """The local files' part of a spec: which key's files, their sizes and times, hold-out."""
    val_files = resolve_files("validation_files", data_cfg.validation_files)
    cut = holdout(data_cfg, split)
    if split == "validation" and val_files:
        key, files, cut = "validation_files", val_files, None
    elif split in ("train", "validation"):
        key, files = "train_files", resolve_files("train_files", data_cfg.train_files)
        cut = None if val_files else cut
    else:
        raise DataError(f"local files have only 'train' and 'validation' splits, not {split!r}")
    if not files:
        raise DataError(f"no data source: data.{key} is not set")
    if split == "validation" and not val_files and cut is None:
        raise DataError(
            "no validation data: set data.validation_files, "
            "data.validation_split_percentage > 0 or data.validation_fraction > 0"
        )
    suffixes = {builder_for(f) for f in files}
    if len(suffixes) > 1:
        raise DataError(f"data.{key}: mix of file types {sorted(suffixes)}; use one type")
    return dict(
        kind="files",
        key=key,
        builder=suffixes.pop(),
        files=[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        holdout=cut,
        encoding_errors=data_cfg.encoding_errors,
    )


def example_columns(data_cfg: DataConfig) -> tuple[str, ...]:
    """The columns an example of the SFT formats is read from, in order."""
    if data_cfg.format == "messages":
        return (data_cfg.messages_column,)
    return (data_cfg.prompt_column, data_cfg.completion_column)


def holdout(data_cfg: DataConfig, split: str):
    """How ``split`` is cut out of train when the source has no validation split: run_clm's
    split string (``train[:5%]`` / ``train[5%:]``), a seeded draw (a dict), or None."""
    if split not in ("train", "validation"):
        return None
    fraction = float(data_cfg.validation_fraction)
    rows = int(data_cfg.validation_rows)
    if fraction or rows:
        size = {"fraction": fraction} if fraction else {"rows": rows}
        return dict(side=split, seed=int(data_cfg.validation_seed), **size)
    pct = int(data_cfg.validation_split_percentage)
    if not pct:
        return None
    return {"validation": f"train[:{pct}%]", "train": f"train[{pct}%:]"}[split]


def builder_for(path: Path) -> str:
    """The ``datasets`` builder that reads ``path``."""
    # run_clm: .txt -> "text", .json/.jsonl -> "json", .csv -> "csv"; any other suffix
    # (wiki.test.raw, input) is read as text too.
    return {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        path.suffix.lower(), "text"
    )


def describe(spec: dict) -> str:
    """The spec's source for messages: ``data.train_files=[...]`` or ``data.dataset='...'``."""
    if spec["kind"] == "files":
        return f"data.{spec['key']}={[f for f, _, _ in spec['files']]}"
    return f"data.dataset={spec.get('name', BUILTIN_PYDOC)!r}"

"""The data section: ``DataConfig``, a frozen dataclass of every ``data.*`` key, and its checks.

The config layer builds its ConfigDict's ``data`` section from ``DataConfig().to_dict()`` and
hands the data layer ``DataConfig.from_mapping(cfg.data)``; nothing in ``data/`` reads a
ConfigDict. ``validate`` is cheap (no loading, no tokenizing) and every error names its key.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import os
from pathlib import Path

from gpt2_jax.data import sources
from gpt2_jax.data.sources import DataError

ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
FORMATS = ("text", "prompt_completion", "messages")
BUILTIN_PYDOC = "pydoc_topics"


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is held out, tokenized, cached and cut into blocks."""

    dataset: str = ""  # hub dataset name, 'pydoc_topics' (builtin, offline), or '' for local files
    dataset_config: str = ""  # hub config name, e.g. 'wikitext-2-raw-v1', 'sample-10BT'
    revision: str = ""  # hub revision (branch, tag, commit), e.g. 'refs/convert/parquet'
    data_files: str = ""  # hub files: 'glob[,glob]' (train), or 'train=glob,validation=glob'
    data_dir: str = ""  # hub sub-directory to load (load_dataset's data_dir)
    streaming: bool = False  # stream rows into the token cache: no Arrow copy on disk, same cache
    train_files: str = ""  # comma-separated paths or globs: text, .json(l), .csv, .parquet
    validation_files: str = ""  # same; when empty, validation is held out of train
    text_column: str = "text"  # column holding the text
    block_size: int = 1024  # tokens per example
    validation_split_percentage: int = 5  # hold-out when there is no validation split (run_clm)
    validation_fraction: float = 0.0  # > 0: hold out this fraction of train instead, rows drawn by
    # a seeded shuffle (nanoGPT: 0.0005); replaces validation_split_percentage
    validation_rows: int = 0  # > 0: hold out exactly this many train rows (the same draw)
    validation_seed: int = 0  # seed of that draw
    append_eos: bool = False  # append <|endoftext|> after each row (False = run_clm parity)
    group_rows: int = 1000  # rows per group_texts chunk (datasets.map batch); 0 = one global chunk
    cache_dir: str = ""  # '' -> core.paths.cache_root(): $GPT2_JAX_CACHE or ~/.cache/gpt2_jax
    num_proc: int = 0  # tokenizer processes; 0 -> every CPU available; 1 -> in this process
    num_threads: int = 0  # the old name of num_proc (used when num_proc is 0)
    encoding_errors: str = "strict"  # undecodable bytes in local text files: strict | replace | ...
    max_rows: int = 0  # 0 = all; else only the first N rows of each split (quick runs)
    # What a row is (docs/finetuning.md): 'text' (concatenated into blocks, every token a
    # target), 'prompt_completion' or 'messages' (one example a row, loss on the completion /
    # assistant turns only).
    format: str = "text"
    prompt_column: str = "prompt"  # prompt_completion: the columns holding the two strings
    completion_column: str = "completion"
    messages_column: str = "messages"  # messages: a list of {role, content} a row
    chat_template: str = ""  # messages: a Jinja template (text, or a .jinja file); '' = the default
    packing: bool = False  # SFT formats: examples share rows (best-fit decreasing), each alone
    document_mask: bool = False  # text: attention and positions restart at every <|endoftext|>

    @classmethod
    def from_mapping(cls, mapping) -> DataConfig:
        """From ``cfg.data`` (a ConfigDict) or any mapping; keys left out keep their default.

        Lists become tuples (the dataclass is frozen); an int given for a float key becomes a
        float, and a whole float for an int key an int, so that a JSON round trip is exact.
        """
        items = dict(mapping.items())  # a ConfigDict is no collections.abc.Mapping
        kinds = _kinds()
        for key in items:
            if key not in kinds:
                close = difflib.get_close_matches(key, kinds, n=1)
                hint = f" (did you mean data.{close[0]}?)" if close else ""
                raise DataError(f"data.{key} is not a data key{hint}; known: {sorted(kinds)}")
        return cls(**{k: _normalized(v, kinds[k]) for k, v in items.items()})

    def to_dict(self) -> dict:
        """``{key: value}`` of every field (the config layer's ``data`` section)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raises DataError for a bad value, naming the key (cheap: no loading, no tokenizing)."""
        _check_types(self)
        if not self.dataset and not self.train_files:
            raise DataError(
                "no data source: set data.dataset (a hub name, or 'pydoc_topics' for the builtin "
                "offline corpus) or data.train_files (e.g. --config.data.train_files=corpus.txt)"
            )
        if self.block_size <= 1:
            raise DataError(f"data.block_size must be > 1, got {self.block_size}")
        pct = self.validation_split_percentage
        if not (float(pct).is_integer() and 0 <= pct < 100):  # datasets' split strings: whole %
            raise DataError(
                f"data.validation_split_percentage must be an integer in [0, 100), got {pct}"
            )
        if self.encoding_errors not in ENCODING_ERRORS:
            raise DataError(f"data.encoding_errors must be one of {ENCODING_ERRORS}")
        for key in ("group_rows", "max_rows", "num_threads", "num_proc", "validation_rows"):
            if getattr(self, key) < 0:
                raise DataError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.validation_fraction < 1:
            raise DataError(
                f"data.validation_fraction must be in [0, 1), got {self.validation_fraction}"
            )
        if self.validation_fraction and self.validation_rows:
            raise DataError(
                "data.validation_fraction and data.validation_rows are both set; set one of them"
            )
        self._check_format()
        self._check_sources()

    @property
    def examples(self) -> bool:
        """True for the SFT formats: one example a row, targets masked (data.examples)."""
        return self.format != "text"

    def _check_format(self) -> None:
        if self.format not in FORMATS:
            close = difflib.get_close_matches(self.format, FORMATS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"data.format={self.format!r} is not one of {list(FORMATS)}{hint}")
        if self.packing and not self.examples:
            raise DataError(
                "data.packing packs whole examples of the prompt_completion and messages "
                "formats; for the text format use data.document_mask=true (with "
                "data.append_eos=true): attention and positions restart at every <|endoftext|>"
            )
        if self.document_mask and self.examples:
            raise DataError(
                f"data.document_mask applies to the text format; data.format={self.format!r} "
                "keeps examples apart already (data.packing=true packs them, each alone)"
            )
        if self.document_mask and not self.append_eos:
            raise DataError(
                "data.document_mask=true needs data.append_eos=true: documents are told apart "
                "by the <|endoftext|> appended after each row"
            )

    def _check_sources(self) -> None:
        name = self.dataset
        for key in ("revision", "data_files", "data_dir"):
            if getattr(self, key) and (not name or name == BUILTIN_PYDOC):
                raise DataError(
                    f"data.{key}={getattr(self, key)!r} selects what data.dataset loads (a hub "
                    "dataset or a dataset directory), and data.dataset is "
                    f"{name!r}; local files go in data.train_files / data.validation_files"
                )
        sources.hub_data_files(self.data_files)
        if not name:
            for key in ("train_files", "validation_files"):
                resolve_files(key, getattr(self, key))


def _kinds() -> dict[str, type]:
    # Each field's type is its default's (the annotations are strings under __future__).
    return {f.name: type(f.default) for f in dataclasses.fields(DataConfig)}


def _normalized(value, kind: type):
    if isinstance(value, list):
        return tuple(value)
    if kind is float and type(value) is int:
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _check_types(data_cfg: DataConfig) -> None:
    for key, kind in _kinds().items():
        value = getattr(data_cfg, key)
        if kind in (int, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            # validation_split_percentage: its own check below says "an integer in [0, 100)"
            if ok and kind is int and key != "validation_split_percentage":
                ok = float(value).is_integer()
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise DataError(f"data.{key} must be {_KIND_NAMES[kind]}, got {value!r}")


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer", float: "a number"}


def split_list(value: str) -> list[str]:
    """``'a, b,,c'`` -> ``['a', 'b', 'c']``."""
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def resolve_files(key: str, value: str) -> list[Path]:
    """Expands ``data.<key>`` (comma-separated paths/globs) to absolute existing files."""
    files = []
    for entry in split_list(value):
        pattern = os.path.expanduser(entry)
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.{key}: the glob {entry!r} matches no file")
        elif os.path.isdir(pattern):
            raise DataError(f"data.{key}: {entry!r} is a directory; use a glob like {entry}/*.txt")
        elif not os.path.isfile(pattern):
            raise DataError(f"data.{key}: no such file: {entry!r}")
        else:
            matches = [pattern]
        for m in matches:
            if os.path.getsize(m) == 0:
                raise DataError(f"data.{key}: {m} is empty")
        files += [Path(m).resolve() for m in matches]
    return files

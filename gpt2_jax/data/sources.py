"""Where rows come from: ``datasets.load_dataset`` (hub or local files, as Arrow or streamed)
and reading them back as Arrow batches; every failure a user can fix as one DataError.

``splits`` and ``rows`` say what the config means (which files, which split, which
hold-out); this module does the ``datasets`` calls, with plain arguments:

- ``load_hub``: a hub dataset (or a dataset directory) with ``revision``, ``data_files``,
  ``data_dir`` and ``streaming``. A dataset that needs a loading script, which datasets
  >= 4 refuses, is one line naming it and the parquet revision to use instead.
- ``load_files``: local text / json(l) / csv / parquet files, streamed or not.
- ``tables``: a source's rows from row N on as Arrow batches. A ``Dataset`` that is
  exactly its Arrow files is read from them as streams, without a memory map (a mapped
  file counts in the resident size as far as it has been read: the corpus, by the end).
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import os
import re
import sys

from gpt2_jax.errors import UserError


class DataError(UserError, ValueError):
    """A data problem the user can fix (config key, file, too little data)."""


def say(message: str) -> None:
    """What the data layer is doing, on stderr (every process's: under launch, its log)."""
    print(f"data: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class RowSource:
    """One pass over rows: ``rows`` (a ``datasets.Dataset`` or, streamed, an
    ``IterableDataset``), and which of them each split takes (``{split: Selection}``)."""

    rows: object
    column: str
    selections: dict
    num_rows: int | None  # None: a stream of unknown length
    what: str  # for messages: data.train_files=[...], data.dataset='...'
    bad_bytes: tuple[str, list[str]] | None = None  # (config key, files) of local text

    def read_error(self, e: Exception, row: int) -> Exception:
        """A failure while reading near row ``row``, as the error a user can act on."""
        if self.bad_bytes and caused_by(e, UnicodeDecodeError):
            return DataError(describe_bad_bytes(*self.bad_bytes))
        if caused_by(e, (ConnectionError, TimeoutError)):
            return DataError(
                f"{self.what}: reading failed near row {row:,} ({e!r}); the same command "
                "resumes the build from its last complete chunk"
            )
        return e


def caused_by(e: BaseException | None, kinds) -> bool:
    while e is not None:
        if isinstance(e, kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def num_rows(rows) -> int | None:
    import datasets

    return len(rows) if isinstance(rows, datasets.Dataset) else None


def check_text_column(column: str, names, kind) -> None:
    """``kind``: the column's datasets feature or pyarrow type (None: no such column)."""
    import pyarrow as pa

    if column not in names:
        raise DataError(
            f"data.text_column={column!r} is not a column of the data; available columns: "
            f"{list(names)}"
        )
    if isinstance(kind, pa.DataType):
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    else:
        text = getattr(kind, "dtype", None) in ("string", "large_string")
    if not text:
        raise DataError(f"data.text_column={column!r} holds {kind}, not text")


# ---------------------------------------------------------------- reading


def tables(source: RowSource, start: int, batch_rows: int):
    """Arrow tables (or record batches) of ``source.rows`` from row ``start`` on."""
    import datasets

    rows, row = source.rows, start
    try:
        if isinstance(rows, datasets.IterableDataset):
            with without_torch():
                rows = (rows.skip(start) if start else rows).with_format("arrow")
            batches = rows.iter(batch_size=batch_rows)
        elif (files := arrow_files(rows)) is not None:
            batches = _read_arrow_files(files, start)
        else:
            rows = rows.skip(start) if start else rows
            batches = rows.with_format("arrow").iter(batch_size=batch_rows)
        for table in batches:
            yield table
            row += len(table)
    except DataError:
        raise
    except Exception as e:
        error = source.read_error(e, row)
        if error is e:
            raise
        raise error from e


def arrow_files(ds) -> list[str] | None:
    """The Arrow files ``ds`` is, in order, when it is exactly their rows (as load_dataset
    returns it; no selection, no replayed transform), else None."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    if ds._indices is not None:
        return None
    table = ds.data
    blocks = table.blocks if isinstance(table, ConcatenationTable) else [[table]]
    if any(len(row) != 1 for row in blocks):
        return None
    blocks = [row[0] for row in blocks]
    if not blocks or not all(isinstance(b, MemoryMappedTable) and not b.replays for b in blocks):
        return None
    return [b.path for b in blocks]


def _read_arrow_files(files: list[str], start: int):
    import pyarrow as pa

    skip = start
    for path in files:
        with pa.OSFile(path) as f:
            for batch in pa.ipc.open_stream(f):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                yield batch.slice(skip) if skip else batch
                skip = 0


@contextlib.contextmanager
def without_torch():
    """datasets makes every new IterableDataset a torch IterableDataset when torch is
    installed, importing it (~3 s, ~200 MB here). Ours never reach a torch DataLoader: for
    their creation, datasets is told torch is absent (read at each creation)."""
    import datasets

    saved = getattr(datasets.config, "TORCH_AVAILABLE", None)
    datasets.config.TORCH_AVAILABLE = False
    try:
        yield
    finally:
        datasets.config.TORCH_AVAILABLE = saved


# ---------------------------------------------------------------- hub datasets


def hub_data_files(value: str):
    """``data.data_files`` as load_dataset takes it: None, a list (train), or {split: list}."""
    entries = [s.strip() for s in str(value or "").split(",") if s.strip()]
    if not entries:
        return None
    named = [re.fullmatch(r"(\w+)=(.+)", e) for e in entries]
    if not any(named):
        return entries
    if not all(named):
        raise DataError(
            f"data.data_files={value!r}: name the split of every entry "
            "('train=glob,validation=glob') or of none ('glob,glob')"
        )
    out: dict[str, list[str]] = {}
    for m in named:
        out.setdefault(m.group(1), []).append(m.group(2))
    return out


def _load_dataset(path: str, name: str | None = None, *, streaming: bool = False, **kwargs):
    """``datasets.load_dataset``; streamed, its two steps (the builder, then its stream) with
    parquet files read without pre-buffering in between.

    datasets reads a parquet file as one Arrow fragment, and Arrow's default
    ``pre_buffer=True`` keeps every row group it has read cached until the file ends, so a
    stream's memory grew with the file (1 GiB of text in 834 row groups: RSS to 952 MB,
    against a flat ~394 MB without; experiments/corpus). Hub parquet files (FineWeb's are
    ~2 GB) are read the same way.
    """
    import datasets

    if not streaming:
        return datasets.load_dataset(path, name, **kwargs)
    builder = datasets.load_dataset_builder(path, name, **kwargs)
    if getattr(builder.config, "fragment_scan_options", False) is None:  # a parquet builder
        import pyarrow.dataset as pds

        builder.config.fragment_scan_options = pds.ParquetFragmentScanOptions(pre_buffer=False)
    return builder.as_streaming_dataset()


def load_hub(
    name: str,
    config: str = "",
    *,
    revision: str = "",
    data_files: str = "",
    data_dir: str = "",
    streaming: bool = False,
):
    """``datasets.load_dataset(name, config, ...)``: a DatasetDict, or streamed an
    IterableDatasetDict; DataError for what the user can fix (offline, not found, a script)."""
    import datasets

    kwargs = dict(revision=revision, data_files=hub_data_files(data_files), data_dir=data_dir)
    kwargs = {k: v for k, v in kwargs.items() if v}
    if streaming:
        kwargs["streaming"] = True
    try:
        with offline_env_honored(), without_torch():
            return _load_dataset(name, config or None, **kwargs)
    except ConnectionError as e:
        raise DataError(
            f"data.dataset={name!r}: cannot reach the Hugging Face Hub ({e}). Offline, train on "
            "local text files instead: --config.data.dataset='' "
            "--config.data.train_files=PATH[,PATH...] [--config.data.validation_files=...], "
            "or use the builtin --config.data.dataset=pydoc_topics"
        ) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"data.dataset={name!r}: not found on the Hugging Face Hub ({e})") from e
    except RuntimeError as e:
        found = re.search(r"Dataset scripts are no longer supported, but found (\S+)", str(e))
        if found is None:
            raise
        raise DataError(script_message(name, found.group(1), revision)) from e
    except ValueError as e:  # e.g. an unknown config name
        raise DataError(f"data.dataset={name!r}, data.dataset_config={config!r}: {e}") from e


def script_message(name: str, script: str, revision: str = "") -> str:
    """One line: ``name`` needs a loading script; what to load instead."""
    import datasets

    why = f"needs its loading script {script}, which datasets {datasets.__version__} no longer runs"
    if os.path.isdir(os.path.expanduser(name)):
        return (
            f"data.dataset={name!r} is a dataset directory that {why}; point "
            "data.train_files (and data.validation_files) at its data files (text, json(l), "
            "csv or parquet) instead"
        )
    if revision == "refs/convert/parquet":
        return f"data.dataset={name!r} {why}, also at data.revision='refs/convert/parquet'"
    return (
        f"data.dataset={name!r} {why}; load the Hub's parquet copy of it instead: "
        "--config.data.revision=refs/convert/parquet (and --config.data.data_dir=CONFIG "
        "when it has several configs)"
    )


@contextlib.contextmanager
def offline_env_honored():
    """Applies ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` set after import, for one load.

    huggingface_hub and datasets read these variables once, at import; set later (a test's
    monkeypatch.setenv, a notebook) they would be ignored and an offline load would retry
    for ~25 s. We only ever turn offline mode on, and restore the flags afterwards.
    """
    import datasets
    from huggingface_hub import constants

    env = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE") or ""
    saved = (constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    if env.upper() in ("1", "ON", "YES", "TRUE"):
        constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved


# ---------------------------------------------------------------- local files


def load_files(
    builder: str,
    split: str,
    files: list[str],
    key: str,
    *,
    encoding_errors: str = "strict",
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """``load_dataset(builder, data_files={split: files})``; ``key`` names the config key."""

    kwargs = {}
    if builder == "text":
        # keep_linebreaks=True is run_clm's default; encoding_errors reaches open().
        kwargs = dict(keep_linebreaks=True, encoding_errors=encoding_errors)
    if streaming:  # rows straight from the files: no Arrow copy
        kwargs["streaming"] = True
    else:
        kwargs["cache_dir"] = cache_dir
    try:
        with without_torch():
            return _load_dataset(builder, data_files={split: files}, **kwargs)
    except Exception as e:
        if caused_by(e, UnicodeDecodeError):
            raise DataError(describe_bad_bytes(key, files)) from e
        raise DataError(f"data.{key}: could not read {files}: {e!r}") from e


def describe_bad_bytes(key: str, files: list[str]) -> str:
    """Names the first file/line/byte offset that is not UTF-8 (streamed, any file size)."""
    for path in files:
        offset, line, pending = 0, 1, b""
        with open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 20)
                data = pending + chunk
                try:
                    _, used = codecs.utf_8_decode(data, "strict", not chunk)
                except UnicodeDecodeError as e:
                    line += data[: e.start].count(b"\n")
                    return (
                        f"data.{key}: {path} is not valid UTF-8 (line {line}, byte offset "
                        f"{offset + e.start}: {data[e.start : e.end]!r}). Fix the file or pass "
                        "--config.data.encoding_errors=replace"
                    )
                line += data[:used].count(b"\n")
                offset, pending = offset + used, data[used:]
                if not chunk:
                    break
    return (
        f"data.{key}: {files} hold bytes that are not UTF-8; "
        "pass --config.data.encoding_errors=replace"
    )

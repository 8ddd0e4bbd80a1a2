"""A split's rows: the ``datasets`` load its spec names, and which rows each side of a
hold-out takes (``corpus.Selection``), as one ``RowSource`` for one pass over the data."""

from __future__ import annotations

from gpt2_jax.core import paths
from gpt2_jax.data import corpus, pydoc, sources, splits
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.sources import DataError, RowSource, say


def load_rows(data_cfg: DataConfig, spec: dict) -> RowSource:
    """The rows of one pass that builds ``spec``'s split (and its hold-out sibling)."""
    import datasets

    ds = _load(data_cfg, spec)
    split, cut, column = spec["split"], spec["holdout"], spec["text_column"]
    what = splits.describe(spec)
    bad = (spec["key"], [f for f, _, _ in spec["files"]]) if spec["kind"] == "files" else None
    # run_clm: hold out of train only when the source has no validation split of its own.
    if cut and "train" in ds and "validation" not in ds:
        rows = ds["train"]
        source = RowSource(rows, column, {}, sources.num_rows(rows), what, bad)
        source.selections = {
            side: holdout_selection(data_cfg, side, source) for side in ("train", "validation")
        }
    elif split in ds:
        rows = ds[split]
        selections = {split: corpus.Selection()}
        source = RowSource(rows, column, selections, sources.num_rows(rows), what, bad)
    else:
        raise DataError(
            f"split {split!r} not found (available: {sorted(ds)}); for a validation split set "
            "data.validation_split_percentage > 0, data.validation_fraction > 0 or "
            "data.validation_files"
        )
    text = "format" not in spec  # the SFT formats check their own columns (data.examples)
    if text and isinstance(rows, datasets.Dataset):  # streamed rows are checked as they come
        sources.check_text_column(column, rows.column_names, rows.features.get(column))
    return source


def _load(data_cfg: DataConfig, spec: dict):
    """The DatasetDict (streamed: IterableDatasetDict) that ``spec``'s rows come from."""
    import datasets

    streaming = bool(data_cfg.streaming)
    if spec["kind"] == "pydoc":  # in memory, nothing to stream
        rows = {"text": pydoc.pydoc_rows()}
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)})
    if spec["kind"] == "hub":
        return sources.load_hub(
            spec["name"],
            spec["config"],
            **{k: spec.get(k, "") for k in ("revision", "data_files", "data_dir")},
            streaming=streaming,
        )
    return sources.load_files(
        spec["builder"],
        "train" if spec["holdout"] else spec["split"],
        [f for f, _, _ in spec["files"]],
        spec["key"],
        encoding_errors=spec["encoding_errors"],
        streaming=streaming,
        cache_dir=str(paths.cache_root(data_cfg.cache_dir) / "datasets"),
    )


def holdout_selection(data_cfg: DataConfig, side: str, source: RowSource) -> corpus.Selection:
    """Which train rows ``side`` ("train" or "validation") takes under the configured hold-out."""
    import datasets

    cut = splits.holdout(data_cfg, side)
    if isinstance(cut, dict) and "fraction" in cut:  # needs no row count
        kind = "below" if side == "validation" else "atleast"
        threshold = corpus.fraction_threshold(cut["fraction"])
        return corpus.Selection(kind, seed=cut["seed"], threshold=threshold)
    num_rows = count_rows(source)
    if isinstance(cut, dict):
        k = cut["rows"]
        if k >= num_rows:
            raise DataError(
                f"data.validation_rows={k} leaves no train rows: {source.what} has {num_rows} rows"
            )
        threshold = corpus.rows_threshold(cut["seed"], num_rows, k)
        kind = "below" if side == "validation" else "atleast"
        return corpus.Selection(kind, seed=cut["seed"], threshold=threshold)
    # The same row arithmetic as load_dataset(split="train[:5%]"): datasets' own parser.
    (ri,) = datasets.ReadInstruction.from_spec(cut).to_absolute({"train": num_rows})
    return corpus.Selection("range", lo=ri.from_, hi=ri.to)


def count_rows(source: RowSource) -> int:
    """``source``'s row count; a stream of unknown length is read once to count it."""
    if source.num_rows is None:
        say(
            f"counting the rows of {source.what} (a whole-percent or validation_rows hold-out "
            "needs the total; data.validation_fraction does not): one read of the stream"
        )
        source.num_rows = sum(len(t) for t in sources.tables(source, 0, batch_rows=65536))
    return source.num_rows

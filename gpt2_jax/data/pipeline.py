"""Text -> GPT-2 tokens -> fixed blocks -> per-process batches; numpy only, no devices.

Pipeline (run_clm.py parity): load a split (Hugging Face hub dataset, local files, or the
builtin offline ``pydoc_topics``; as Arrow, or streamed with ``data.streaming``), hold out
part of train when there is no validation split (run_clm's whole-percent
``validation_split_percentage`` from the first rows, or ``validation_fraction`` /
``validation_rows`` drawn by a seeded shuffle), tokenize each row with tiktoken's
``encode_ordinary``, cache the flat uint16 token stream + int64 row offsets on disk (built
by ``corpus.py``: one pass for train and validation, in parallel processes, resumable), and
cut it into non-overlapping ``block_size`` blocks exactly as run_clm's ``group_texts``
(remainder dropped per ``datasets.map`` batch of ``group_rows`` rows). Batch order is a
pure function of (seed, step), so resuming needs no loader state.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import re
import sys
import time
import warnings
from io import StringIO
from pathlib import Path

import ml_collections
import numpy as np

from gpt2_jax.data import corpus, sources, tokenizer
from gpt2_jax.data.sources import DataError  # noqa: F401 (the user-facing class: data.DataError)

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
BUILTIN_PYDOC = "pydoc_topics"
_PROGRESS_MIN_ROWS = 10_000

DEFAULTS = dict(
    dataset="",  # hub dataset name, 'pydoc_topics' (builtin, offline), or '' for local files
    dataset_config="",  # hub config name, e.g. 'wikitext-2-raw-v1', 'sample-10BT'
    revision="",  # hub revision (branch, tag, commit), e.g. 'refs/convert/parquet'
    data_files="",  # hub files: 'glob[,glob]' (train), or 'train=glob,validation=glob'
    data_dir="",  # hub sub-directory to load (load_dataset's data_dir)
    streaming=False,  # stream rows into the token cache: no Arrow copy on disk, same cache
    train_files="",  # comma-separated paths or globs: text (.txt/.raw...), .json(l), .csv, .parquet
    validation_files="",  # same; when empty, validation is held out of train
    text_column="text",  # column holding the text
    block_size=1024,  # tokens per example
    validation_split_percentage=5,  # hold-out when there is no validation split (run_clm)
    validation_fraction=0.0,  # > 0: hold out this fraction of train instead, rows drawn by a
    # seeded shuffle (nanoGPT: 0.0005); replaces validation_split_percentage
    validation_rows=0,  # > 0: hold out exactly this many train rows (the same draw)
    validation_seed=0,  # seed of that draw
    append_eos=False,  # append <|endoftext|> after each row (False = run_clm parity)
    group_rows=1000,  # rows per group_texts chunk (datasets.map batch); 0 = one global chunk
    cache_dir="",  # '' -> $GPT2_JAX_CACHE or ~/.cache/gpt2_jax
    num_proc=0,  # tokenizer processes; 0 -> every CPU available; 1 -> in this process
    num_threads=0,  # the old name of num_proc (used when num_proc is 0)
    encoding_errors="strict",  # undecodable bytes in local text files: strict | replace | ...
    max_rows=0,  # 0 = all; else only the first N rows of each split (quick runs)
)


def default_data_config() -> ml_collections.ConfigDict:
    """The ``config.data`` block with every key this module reads, at its default."""
    return ml_collections.ConfigDict(dict(DEFAULTS))


def _get(cfg, key):
    return getattr(cfg, key, DEFAULTS[key]) if cfg is not None else DEFAULTS[key]


# ---------------------------------------------------------------- config checks


def _split_list(value: str) -> list[str]:
    return [s.strip() for s in str(value or "").split(",") if s.strip()]


def _resolve_files(key: str, value: str) -> list[Path]:
    """Expands ``data.<key>`` (comma-separated paths/globs) to absolute existing files."""
    files = []
    for entry in _split_list(value):
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


def check_data_config(data_cfg) -> None:
    """Raises DataError for a bad ``config.data`` value (cheap: no loading, no tokenizing)."""
    if not _get(data_cfg, "dataset") and not _get(data_cfg, "train_files"):
        raise DataError(
            "no data source: set data.dataset (a hub name, or 'pydoc_topics' for the builtin "
            "offline corpus) or data.train_files (e.g. --config.data.train_files=corpus.txt)"
        )
    if int(_get(data_cfg, "block_size")) <= 1:
        raise DataError(f"data.block_size must be > 1, got {_get(data_cfg, 'block_size')}")
    pct = _get(data_cfg, "validation_split_percentage")
    if not (float(pct).is_integer() and 0 <= pct < 100):  # datasets' split strings: whole %
        raise DataError(
            f"data.validation_split_percentage must be an integer in [0, 100), got {pct}"
        )
    if _get(data_cfg, "encoding_errors") not in ENCODING_ERRORS:
        raise DataError(f"data.encoding_errors must be one of {ENCODING_ERRORS}")
    for key in ("group_rows", "max_rows", "num_threads", "num_proc", "validation_rows"):
        if int(_get(data_cfg, key)) < 0:
            raise DataError(f"data.{key} must be >= 0, got {_get(data_cfg, key)}")
    fraction = float(_get(data_cfg, "validation_fraction"))
    if not 0 <= fraction < 1:
        raise DataError(f"data.validation_fraction must be in [0, 1), got {fraction}")
    if fraction and int(_get(data_cfg, "validation_rows")):
        raise DataError(
            "data.validation_fraction and data.validation_rows are both set; set one of them"
        )
    name = _get(data_cfg, "dataset")
    for key in ("revision", "data_files", "data_dir"):
        if _get(data_cfg, key) and (not name or name == BUILTIN_PYDOC):
            raise DataError(
                f"data.{key}={_get(data_cfg, key)!r} selects what data.dataset loads (a hub "
                "dataset or a dataset directory), and data.dataset is "
                f"{name!r}; local files go in data.train_files / data.validation_files"
            )
    sources.hub_data_files(_get(data_cfg, "data_files"))
    if not name:
        for key in ("train_files", "validation_files"):
            _resolve_files(key, _get(data_cfg, key))


# ---------------------------------------------------------------- split spec


def _split_spec(data_cfg, split: str) -> dict:
    """Everything that decides the rows of ``split``, cheap to compute (no dataset load).

    Its JSON is hashed into the cache key. ``holdout`` is run_clm's split string over train
    (``train[:5%]`` / ``train[5%:]``), a seeded draw (``_holdout``) or None. Keys that are
    not set are left out, so that caches built before they existed stay valid.
    """
    name = _get(data_cfg, "dataset")
    holdout = _holdout(data_cfg, split)
    spec = dict(split=split, text_column=_get(data_cfg, "text_column"))
    if name == BUILTIN_PYDOC:
        spec.update(kind="pydoc", holdout=holdout, topics_sha=_pydoc_sha())
    elif name:
        # The hub's split names are unknown until it is loaded; the hold-out only applies
        # when the dataset has no validation split (decided in _load_rows).
        spec.update(kind="hub", name=name, config=_get(data_cfg, "dataset_config"), holdout=holdout)
        for key in ("revision", "data_files", "data_dir"):  # only when set: old keys stay valid
            if _get(data_cfg, key):
                spec[key] = _get(data_cfg, key)
    else:
        val_files = _resolve_files("validation_files", _get(data_cfg, "validation_files"))
        if split == "validation" and val_files:
            key, files, holdout = "validation_files", val_files, None
        elif split in ("train", "validation"):
            key, files = "train_files", _resolve_files("train_files", _get(data_cfg, "train_files"))
            holdout = None if val_files else holdout
        else:
            raise DataError(f"local files have only 'train' and 'validation' splits, not {split!r}")
        if not files:
            raise DataError(f"no data source: data.{key} is not set")
        if split == "validation" and not val_files and holdout is None:
            raise DataError(
                "no validation data: set data.validation_files, "
                "data.validation_split_percentage > 0 or data.validation_fraction > 0"
            )
        suffixes = {_builder_for(f) for f in files}
        if len(suffixes) > 1:
            raise DataError(f"data.{key}: mix of file types {sorted(suffixes)}; use one type")
        spec.update(
            kind="files",
            key=key,
            builder=suffixes.pop(),
            files=[(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
            holdout=holdout,
            encoding_errors=_get(data_cfg, "encoding_errors"),
        )
    spec.update(
        append_eos=bool(_get(data_cfg, "append_eos")),
        max_rows=int(_get(data_cfg, "max_rows")),
        tokenizer=["gpt2", tokenizer.ENCODER_JSON_SHA256, tokenizer.VOCAB_BPE_SHA256],
        version=CACHE_FORMAT_VERSION,
    )
    return spec


def _holdout(data_cfg, split: str):
    """How ``split`` is cut out of train when the source has no validation split: run_clm's
    split string (``train[:5%]`` / ``train[5%:]``), a seeded draw (a dict), or None."""
    if split not in ("train", "validation"):
        return None
    fraction = float(_get(data_cfg, "validation_fraction"))
    rows = int(_get(data_cfg, "validation_rows"))
    if fraction or rows:
        size = {"fraction": fraction} if fraction else {"rows": rows}
        return dict(side=split, seed=int(_get(data_cfg, "validation_seed")), **size)
    pct = int(_get(data_cfg, "validation_split_percentage"))
    if not pct:
        return None
    return {"validation": f"train[:{pct}%]", "train": f"train[{pct}%:]"}[split]


def _builder_for(path: Path) -> str:
    # run_clm: .txt -> "text", .json/.jsonl -> "json", .csv -> "csv"; any other suffix
    # (wiki.test.raw, input) is read as text too.
    return {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}.get(
        path.suffix.lower(), "text"
    )


@functools.lru_cache(maxsize=1)
def _pydoc_rows() -> tuple[str, ...]:
    """Python's bundled help topics, sorted by key, laid out by ``normalize_layout`` and
    split into lines like the Text builder."""
    from pydoc_data.topics import topics

    return tuple(
        line for k in sorted(topics) for line in StringIO(normalize_layout(topics[k])).readlines()
    )


# Heading underlines ("*****", "=====") and table borders ("+-----+----+"): no words.
_RULE = re.compile(r"^[ *=\-~^+|]*[*=\-~^+|]{3}[ *=\-~^+|]*$")
_INNER_SPACES = re.compile(r"(?<=\S) {2,}")
# A grid table's border ("+-----+----+", "|=====|====|"), which fixes its column edges.
_GRID_BORDER = re.compile(r"^ *[+|][-=]+[+|]([-=]+[+|])* *$")
MAX_INDENT = 4


def _grid_table_rows(lines: list[str]) -> list[str] | None:
    """A grid table's rows, one line each (``first cell: next cell; ...``), or None.

    Cells wrap over several lines between borders ("| "'<'" | Forces the field to be |" then
    "|  | space (this is ... |"); kept as drawn, a model learns runs of ``| |``. The column
    edges are the ``+`` of the first border; each row's cell text is joined across lines.
    """
    if not _GRID_BORDER.match(lines[0]) or not lines[0].lstrip().startswith("+"):
        return None
    edges = [i for i, ch in enumerate(lines[0]) if ch == "+"]
    rows: list[str] = []
    cells: list[list[str]] = [[] for _ in edges[1:]]

    def flush():
        texts = [" ".join(c) for c in cells]
        if any(texts):
            head, rest = texts[0], "; ".join(t for t in texts[1:] if t)
            rows.append(f"{head}: {rest}" if head and rest else head or rest)
        for c in cells:
            c.clear()

    for ln in lines[1:]:
        if _GRID_BORDER.match(ln):
            flush()
            continue
        for c, lo, hi in zip(cells, edges[:-1], edges[1:], strict=True):
            if part := ln[lo + 1 : hi].strip():
                c.append(part)
    flush()
    return rows


def normalize_layout(text: str) -> str:
    """The builtin corpus's layout, made mostly words (``make demo`` samples it).

    The help text is rendered reStructuredText: paragraphs indented by 3-8 spaces, grammar
    rules aligned with runs of 16+ spaces, heading underlines of ``*`` and table borders.
    Whitespace runs and line breaks are separate GPT-2 tokens, so a small model trained on
    the raw text mostly learns to emit spaces and newlines. So: rules are dropped; a prose
    paragraph (every line at column 0) becomes one line, as the hard wrap at 70 columns
    carries no meaning; any other paragraph (code, grammar, lists, notes) is dedented, its
    remaining indentation capped at ``MAX_INDENT`` spaces (code stays visibly nested); a grid
    table becomes a line a row (``_grid_table_rows``); runs
    of inner spaces (alignment, two spaces after a full stop) become one; paragraphs are
    separated by one line break, not a blank line (each newline is one more token).
    """
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in para.split("\n")]
        lines = [ln for ln in lines if ln]
        if lines and (table := _grid_table_rows(lines)) is not None:
            out.extend(_INNER_SPACES.sub(" ", row) for row in table)
            continue
        lines = [ln for ln in lines if not _RULE.match(ln)]
        if not lines:
            continue
        indents = [len(ln) - len(ln.lstrip(" ")) for ln in lines]
        if max(indents) == 0:  # prose
            lines = [" ".join(lines)]
        base = min(indents)
        for ln in lines:
            body = ln[base:]
            indent = min(len(body) - len(body.lstrip(" ")), MAX_INDENT)
            out.append(" " * indent + _INNER_SPACES.sub(" ", body.lstrip(" ")))
    return "".join(line + "\n" for line in out)


def _pydoc_sha() -> str:
    return hashlib.sha256("".join(_pydoc_rows()).encode()).hexdigest()


# ---------------------------------------------------------------- loading rows


def _load_rows(data_cfg, spec: dict) -> sources.Source:
    """The rows of one pass that builds ``spec``'s split (and its hold-out sibling)."""
    import datasets

    streaming = bool(_get(data_cfg, "streaming"))
    if spec["kind"] == "pydoc":  # in memory, nothing to stream
        ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _pydoc_rows()})})
    elif spec["kind"] == "hub":
        ds = sources.load_hub(
            spec["name"],
            spec["config"],
            **{k: spec.get(k, "") for k in ("revision", "data_files", "data_dir")},
            streaming=streaming,
        )
    else:
        ds = sources.load_files(
            spec["builder"],
            "train" if spec["holdout"] else spec["split"],
            [f for f, _, _ in spec["files"]],
            spec["key"],
            encoding_errors=spec["encoding_errors"],
            streaming=streaming,
            cache_dir=str(_cache_root(data_cfg) / "datasets"),
        )
    split, holdout, column = spec["split"], spec["holdout"], spec["text_column"]
    what = _source(spec)
    bad = (spec["key"], [f for f, _, _ in spec["files"]]) if spec["kind"] == "files" else None
    # run_clm: hold out of train only when the source has no validation split of its own.
    if holdout and "train" in ds and "validation" not in ds:
        rows = ds["train"]
        source = sources.Source(rows, column, {}, sources.num_rows(rows), what, bad)
        source.selections = {
            side: _holdout_selection(data_cfg, side, source) for side in ("train", "validation")
        }
    elif split in ds:
        rows = ds[split]
        selections = {split: corpus.Selection()}
        source = sources.Source(rows, column, selections, sources.num_rows(rows), what, bad)
    else:
        raise DataError(
            f"split {split!r} not found (available: {sorted(ds)}); for a validation split set "
            "data.validation_split_percentage > 0, data.validation_fraction > 0 or "
            "data.validation_files"
        )
    if isinstance(rows, datasets.Dataset):  # streamed rows are checked as they come
        sources.check_text_column(column, rows.column_names, rows.features.get(column))
    return source


def _holdout_selection(data_cfg, side: str, source: sources.Source) -> corpus.Selection:
    """Which train rows ``side`` ("train" or "validation") takes under the configured hold-out."""
    import datasets

    holdout = _holdout(data_cfg, side)
    if isinstance(holdout, dict) and "fraction" in holdout:  # needs no row count
        kind = "below" if side == "validation" else "atleast"
        threshold = corpus.fraction_threshold(holdout["fraction"])
        return corpus.Selection(kind, seed=holdout["seed"], threshold=threshold)
    num_rows = _count_rows(source)
    if isinstance(holdout, dict):
        k = holdout["rows"]
        if k >= num_rows:
            raise DataError(
                f"data.validation_rows={k} leaves no train rows: {source.what} has {num_rows} rows"
            )
        threshold = corpus.rows_threshold(holdout["seed"], num_rows, k)
        kind = "below" if side == "validation" else "atleast"
        return corpus.Selection(kind, seed=holdout["seed"], threshold=threshold)
    # The same row arithmetic as load_dataset(split="train[:5%]"): datasets' own parser.
    (ri,) = datasets.ReadInstruction.from_spec(holdout).to_absolute({"train": num_rows})
    return corpus.Selection("range", lo=ri.from_, hi=ri.to)


def _count_rows(source: sources.Source) -> int:
    if source.num_rows is None:
        _say(
            f"counting the rows of {source.what} (a whole-percent or validation_rows hold-out "
            "needs the total; data.validation_fraction does not): one read of the stream"
        )
        source.num_rows = sum(len(t) for t in sources.tables(source, 0, batch_rows=65536))
    return source.num_rows


# ---------------------------------------------------------------- tokenize + cache


def _cache_root(data_cfg) -> Path:
    root = _get(data_cfg, "cache_dir") or os.environ.get("GPT2_JAX_CACHE") or "~/.cache/gpt2_jax"
    return Path(os.path.expanduser(root)).resolve()


def _say(message: str) -> None:
    """What the data pipeline is doing, on stderr (every process's: under launch, its log)."""
    print(f"data: {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    """Where a split's tokens came from (the run summary's ``data`` line)."""

    path: str  # the cache files' stem
    built: bool = False  # tokenized by this process
    seconds: float = 0.0  # what tokenizing took here
    waited: float = 0.0  # seconds this process waited for another one's build
    processes: int = 0  # tokenizer processes
    tokens: int = 0  # tokens tokenized here (all splits of the build)
    resumed_from: int = 0  # the source row an interrupted build resumed at
    splits: tuple = ()  # the splits of that build


def _stem(data_cfg, spec: dict) -> Path:
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    return _cache_root(data_cfg) / "tokens" / f"{spec['split']}-{key}"


def _paths(stem: Path) -> tuple[Path, Path, Path]:
    return tuple(Path(f"{stem}{s}") for s in (".json", ".tokens", ".offsets"))


def _digest(names) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]


def _num_proc(data_cfg) -> int:
    n = int(_get(data_cfg, "num_proc")) or int(_get(data_cfg, "num_threads"))
    return n or corpus.default_processes()


class _Progress:
    """tqdm over source rows (with the time left when their number is known), tokens and
    tokens/s in its postfix; the lock file gets the same progress for waiting processes."""

    def __init__(self, build: corpus.Build, what: str, lock: corpus.Lock):
        from tqdm import tqdm

        total = build.num_rows
        self.bar = tqdm(
            total=total,
            initial=build.rows_read,
            desc=f"tokenizing {what}",
            unit=" rows",
            unit_scale=True,
            file=sys.stderr,
            mininterval=1.0,
            disable=total is not None and total < _PROGRESS_MIN_ROWS,
        )
        self.lock, self.t0, self.tokens0 = lock, time.perf_counter(), sum(build.tokens)

    def __call__(self, new_rows: int, tokens: int) -> None:
        rate = (tokens - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(f"{tokens / 1e6:,.1f}M tokens, {rate / 1e6:.2f}M tokens/s", False)
        self.bar.update(new_rows)
        self.lock.report(dict(rows=self.bar.n, tokens=tokens))

    def close(self) -> None:
        self.bar.close()


def _tokenize_to(source, targets: list, data_cfg, journal: Path, lock) -> corpus.Build:
    """Tokenizes ``source`` into the ``targets``' cache files in one pass with
    ``data.num_proc`` processes, resuming ``journal``'s build; returns the finished build."""
    build = corpus.Build(journal, targets, source.num_rows)
    build.open(_say)
    column = source.column

    def check(table):  # streamed rows: the column and its type, seen in the first batch
        names = table.column_names
        kind = table.schema.field(column).type if column in names else None
        sources.check_text_column(column, names, kind)

    def chunks(start: int):
        tables = sources.tables(source, start, corpus.READ_ROWS)
        return corpus.chunks(tables, column, start, check)

    encoders = corpus.Encoders(_num_proc(data_cfg), bool(_get(data_cfg, "append_eos")))
    progress = _Progress(build, " + ".join(t.split for t in targets), lock)
    done = False
    try:
        build.run(chunks, encoders, progress)
        done = True
    except DataError:
        if not build.chunks_done:  # e.g. a wrong text_column: nothing worth resuming
            build.discard()
        raise
    finally:
        encoders.close(abort=not done)
        progress.close()
    for t, rows, tokens in zip(targets, build.rows, build.tokens, strict=True):
        if tokens == 0:
            build.discard()
            hint = (
                ""
                if t.selection.kind == "all"
                else " (held out of train: raise data.validation_fraction, or set "
                "data.validation_rows)"
            )
            raise DataError(
                f"split {t.split!r} has 0 tokens ({rows} rows) from {source.what}{hint}"
            )
    build.finalize()
    return build


def _read_cache(meta_path: Path, tok_path: Path, off_path: Path, warn: bool = True):
    """(tokens, offsets) memmaps if the cache is complete and consistent, else None."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        n_tok, n_rows = int(meta["num_tokens"]), int(meta["num_rows"])
        if meta.get("version") != CACHE_FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('version')} != {CACHE_FORMAT_VERSION}")
        for path, want in ((tok_path, 2 * n_tok), (off_path, 8 * (n_rows + 1))):
            if not path.exists() or path.stat().st_size != want:
                size = path.stat().st_size if path.exists() else "missing"
                raise ValueError(f"{path.name}: {size} bytes, expected {want}")
        offsets = np.memmap(off_path, dtype=np.int64, mode="r", shape=(n_rows + 1,))
        if offsets[0] != 0 or offsets[-1] != n_tok:
            raise ValueError("offsets do not span the token stream")
        tokens = (
            np.memmap(tok_path, dtype=np.uint16, mode="r", shape=(n_tok,))
            if n_tok
            else (np.zeros(0, np.uint16))
        )
        return tokens, offsets
    except (ValueError, KeyError, OSError) as e:
        if warn:
            warnings.warn(
                f"token cache {meta_path} is truncated or corrupt ({e}); rebuilding", stacklevel=3
            )
        return None


def load_token_stream(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's tokens, cached on disk.

    Returns ``tokens``: [num_tokens] uint16 (memmap) and ``offsets``: [num_rows + 1] int64,
    ``offsets[i]`` the start of row i and ``offsets[-1] == num_tokens``.
    """
    check_data_config(data_cfg)
    return _token_stream(data_cfg, _split_spec(data_cfg, split))


def _token_stream(data_cfg, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    tokens, offsets, _ = _cached_or_built(data_cfg, spec)
    return tokens, offsets


def _cached_or_built(data_cfg, spec: dict) -> tuple[np.ndarray, np.ndarray, CacheInfo]:
    """The split's (tokens, offsets) from the cache, else built: under a lock, so that of
    the processes sharing a cache directory one tokenizes and the others wait and read."""
    split, stem = spec["split"], _stem(data_cfg, spec)
    cached = _read_cache(*_paths(stem))
    if cached is not None:
        log.info("data: %s split from cache %s", split, stem)
        return (*cached, CacheInfo(str(stem)))
    root = stem.parent
    root.mkdir(parents=True, exist_ok=True)
    # A hold-out's two sides come from one pass over train: one lock for both.
    group = (
        {s: _split_spec(data_cfg, s) for s in ("train", "validation")}
        if spec["holdout"]
        else {split: spec}
    )
    stems = {s: _stem(data_cfg, sp) for s, sp in group.items()}
    lock_path = root / f"build-{_digest(sorted(p.name for p in stems.values()))}.lock"
    with corpus.build_lock(lock_path, " + ".join(group), _say) as lock:
        cached = _read_cache(*_paths(stem), warn=False)
        if cached is not None:  # built by the process we waited for
            _say(f"{split} split tokenized by another process; reading {stem}")
            return (*cached, CacheInfo(str(stem), waited=lock.waited, splits=tuple(group)))
        source = _load_rows(data_cfg, spec)
        targets = [
            corpus.Target(
                s,
                stems[s],
                selection,
                int(_get(data_cfg, "max_rows")),
                meta=dict(version=CACHE_FORMAT_VERSION, spec=group[s]),
            )
            for s, selection in source.selections.items()
            if s == split or _read_cache(*_paths(stems[s]), warn=False) is None
        ]
        journal = root / f"build-{_digest(sorted(t.stem.name for t in targets))}.journal.json"
        build = _tokenize_to(source, targets, data_cfg, journal, lock)
    new_tokens = sum(build.tokens) - build.tokens_at_open
    info = CacheInfo(
        str(stem),
        built=True,
        seconds=build.seconds,
        waited=lock.waited,
        processes=build.processes,
        tokens=new_tokens,
        resumed_from=build.resumed_from,
        splits=tuple(t.split for t in targets),
    )
    _say(
        f"tokenized {' + '.join(info.splits)}: {build.rows_read:,} rows of {source.what} -> "
        + ", ".join(f"{t.split} {n:,}" for t, n in zip(targets, build.tokens, strict=True))
        + f" tokens in {build.seconds:.1f} s ({_rate(info)}); cache {root}"
    )
    result = _read_cache(*_paths(stem))
    assert result is not None
    return (*result, info)


def _rate(info: CacheInfo) -> str:
    procs = f"{info.processes} process" + "es" * (info.processes != 1)
    return f"{procs}, {info.tokens / max(info.seconds, 1e-9) / 1e6:.2f}M tokens/s"


def cache_report(blocks: dict) -> str:
    """One line for the run summary: what was tokenized and how long it took, or that the
    token cache was reused. ``blocks``: ``{split: Blocks}`` as ``load_splits`` returns."""
    infos = {name: b.cache for name, b in blocks.items() if getattr(b, "cache", None)}
    parts, covered = [], set()
    for info in infos.values():
        if info.built and not covered.intersection(info.splits):
            covered.update(info.splits)
            text = f"tokenized {' + '.join(info.splits)} in {_duration(info.seconds)} "
            text += f"({_rate(info)}, {info.tokens:,} tokens"
            text += f", resumed at source row {info.resumed_from:,})" if info.resumed_from else ")"
            parts.append(text)
    for name, info in infos.items():
        if name not in covered and info.waited:
            covered.update(info.splits or (name,))
            parts.append(f"{name} tokenized by another process (waited {info.waited:.0f} s)")
    reused = [name for name in infos if name not in covered]
    if reused:
        parts.append(f"{' + '.join(reused)} from the token cache")
    if not infos:
        return ""
    root = Path(next(iter(infos.values())).path).parent
    return "; ".join(parts) + f" ({root})"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def _source(spec: dict) -> str:
    if spec["kind"] == "files":
        return f"data.{spec['key']}={[f for f, _, _ in spec['files']]}"
    return f"data.dataset={spec.get('name', BUILTIN_PYDOC)!r}"


# ---------------------------------------------------------------- blocks


def block_starts(offsets: np.ndarray, block_size: int, group_rows: int = 1000) -> np.ndarray:
    """Start positions [num_blocks] int64 of run_clm's ``group_texts`` blocks.

    ``datasets.map(group_texts, batched=True)`` concatenates each batch of ``group_rows``
    rows and drops that batch's remainder (``total // block_size * block_size``), so the
    remainder is dropped per chunk, not once. ``group_rows=0``: one global chunk.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_rows = len(offsets) - 1
    step = group_rows if group_rows > 0 else max(n_rows, 1)
    edges = np.append(np.arange(0, n_rows, step), n_rows)
    begin, end = offsets[edges[:-1]], offsets[edges[1:]]
    counts = (end - begin) // block_size  # blocks per chunk
    first = np.cumsum(counts) - counts  # index of each chunk's first block
    within = np.arange(int(counts.sum())) - np.repeat(first, counts)
    return np.repeat(begin, counts) + within * block_size


class Blocks:
    """Fixed ``block_size`` examples over a (memmapped) token stream."""

    def __init__(
        self, tokens: np.ndarray, offsets: np.ndarray, block_size: int, group_rows: int = 1000
    ):
        self.tokens = tokens
        self.offsets = offsets
        self.block_size = int(block_size)
        self.group_rows = int(group_rows)
        self.starts = block_starts(offsets, self.block_size, self.group_rows)
        self.cache: CacheInfo | None = None  # where the tokens came from (load_splits sets it)

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Tokens in all blocks (``len(self) * block_size``), remainders excluded."""
        return len(self) * self.block_size

    def __getitem__(self, idx) -> np.ndarray:
        """``blocks[idx]``: int32 [len(idx), block_size] (index array); [block_size] for an int."""
        starts = self.starts[idx]
        pos = np.asarray(starts)[..., None] + np.arange(self.block_size)
        return np.asarray(self.tokens[pos], dtype=np.int32)


def _too_little(split: str, blocks: Blocks) -> DataError:
    n_tok = int(blocks.offsets[-1])
    msg = (
        f"split {split!r} has {n_tok} tokens, too few for one block of "
        f"data.block_size={blocks.block_size}"
    )
    if n_tok >= blocks.block_size and blocks.group_rows:
        biggest = np.diff(blocks.offsets[:: blocks.group_rows].tolist() + [n_tok]).max()
        msg += (
            f" within one group of data.group_rows={blocks.group_rows} rows (largest group: "
            f"{biggest} tokens; run_clm drops each group's remainder)"
        )
    return DataError(msg + "; use a smaller --config.data.block_size or more data")


def load_splits(data_cfg, splits=("train", "validation")) -> dict[str, Blocks]:
    """Loads, tokenizes (cached) and groups each split; ``{split: Blocks}``."""
    check_data_config(data_cfg)
    specs = {split: _split_spec(data_cfg, split) for split in splits}  # config errors first
    out = {}
    for split, spec in specs.items():
        tokens, offsets, info = _cached_or_built(data_cfg, spec)
        blocks = Blocks(tokens, offsets, _get(data_cfg, "block_size"), _get(data_cfg, "group_rows"))
        blocks.cache = info
        if len(blocks) == 0:
            raise _too_little(split, blocks)
        out[split] = blocks
    return out


# ---------------------------------------------------------------- loader


class BatchLoader:
    """Which examples each process reads at each step; a pure function of (seed, step).

    Epoch ``e`` visits ``np.random.default_rng([seed, e]).permutation(num_examples)``
    (or ``arange`` with shuffle=False) in ``steps_per_epoch`` global batches; the final
    incomplete batch is dropped so shapes stay fixed. Process ``p`` reads rows
    ``[p * local, (p + 1) * local)`` of each global batch.
    """

    def __init__(
        self,
        num_examples: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        shuffle: bool = True,
        block_size: int | None = None,
    ):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise DataError(
                f"global batch size {global_batch_size} must be a positive multiple "
                f"of the process count {process_count}"
            )
        if not 0 <= process_index < process_count:
            raise DataError(f"process_index {process_index} not in [0, {process_count})")
        self.num_examples = int(num_examples)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = global_batch_size // process_count
        self.seed, self.shuffle = int(seed), shuffle
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = self.num_examples // self.global_batch_size
        self._memo: tuple[int, np.ndarray | None] = (-1, None)
        if self.steps_per_epoch == 0:
            what = f" of {block_size} tokens" if block_size else ""
            raise DataError(
                f"{self.num_examples} blocks{what} < global batch "
                f"{self.global_batch_size}: use a smaller batch or block_size, or more data"
            )

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _order(self, epoch: int) -> np.ndarray:
        # Memo of the last epoch's order only: the value is a function of (seed, epoch).
        if self._memo[0] != epoch:
            order = (
                np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                if self.shuffle
                else np.arange(self.num_examples)
            )
            self._memo = (epoch, order)
        return self._memo[1]

    def global_indices(self, step: int) -> np.ndarray:
        """Example indices [global_batch_size] int64 of the global batch at ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        pos = (step % self.steps_per_epoch) * self.global_batch_size
        return self._order(self.epoch(step))[pos : pos + self.global_batch_size]

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices [local_batch_size] int64 at ``step``."""
        lo = self.process_index * self.local_batch_size
        return self.global_indices(step)[lo : lo + self.local_batch_size]

    def batch(self, blocks: Blocks, step: int) -> np.ndarray:
        """This process's tokens at ``step``: int32 [local_batch_size, block_size]."""
        return blocks[self.indices(step)]

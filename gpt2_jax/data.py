"""Text -> GPT-2 tokens -> fixed blocks -> per-process batches; numpy only, no devices.

Pipeline (run_clm.py parity): load a split (Hugging Face hub dataset, local files, or the
builtin offline ``pydoc_topics``), hold out ``validation_split_percentage`` of train when
there is no validation split, tokenize each row with tiktoken's ``encode_ordinary``, cache
the flat uint16 token stream + int64 row offsets on disk, and cut it into non-overlapping
``block_size`` blocks exactly as run_clm's ``group_texts`` (remainder dropped per
``datasets.map`` batch of ``group_rows`` rows). Batch order is a pure function of
(seed, step), so resuming needs no loader state.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import sys
import uuid
import warnings
from io import StringIO
from pathlib import Path

import ml_collections
import numpy as np

from gpt2_jax import tokenizer
from gpt2_jax.errors import UserError

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
ENCODING_ERRORS = ("strict", "replace", "ignore", "backslashreplace")
BUILTIN_PYDOC = "pydoc_topics"
_ENCODE_BATCH_ROWS = 8192  # rows per encode_ordinary_batch call: parallel, bounded memory
_PROGRESS_MIN_ROWS = 10_000

DEFAULTS = dict(
    dataset="",  # hub dataset name, 'pydoc_topics' (builtin, offline), or '' for local files
    dataset_config="",  # hub config name, e.g. 'wikitext-2-raw-v1'
    train_files="",  # comma-separated paths or globs of local text (.txt/.raw...), .json(l), .csv
    validation_files="",  # same; when empty, validation is held out of train
    text_column="text",  # column holding the text
    block_size=1024,  # tokens per example
    validation_split_percentage=5,  # hold-out when there is no validation split (run_clm)
    append_eos=False,  # append <|endoftext|> after each row (False = run_clm parity)
    group_rows=1000,  # rows per group_texts chunk (datasets.map batch); 0 = one global chunk
    cache_dir="",  # '' -> $GPT2_JAX_CACHE or ~/.cache/gpt2_jax
    num_threads=0,  # tokenizer threads; 0 -> os.cpu_count()
    encoding_errors="strict",  # undecodable bytes in local text files: strict | replace | ...
    max_rows=0,  # 0 = all; else only the first N rows of each split (quick runs)
)


class DataError(UserError, ValueError):
    """A data problem the user can fix (config key, file, too little data)."""


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
    for key in ("group_rows", "max_rows", "num_threads"):
        if int(_get(data_cfg, key)) < 0:
            raise DataError(f"data.{key} must be >= 0, got {_get(data_cfg, key)}")
    if not _get(data_cfg, "dataset"):
        for key in ("train_files", "validation_files"):
            _resolve_files(key, _get(data_cfg, key))


# ---------------------------------------------------------------- split spec


def _split_spec(data_cfg, split: str) -> dict:
    """Everything that decides the rows of ``split``, cheap to compute (no dataset load).

    Its JSON is hashed into the cache key. ``holdout`` is run_clm's split string over train
    (``train[:5%]`` / ``train[5%:]``) or None.
    """
    name = _get(data_cfg, "dataset")
    pct = int(_get(data_cfg, "validation_split_percentage"))
    holdout = {"validation": f"train[:{pct}%]", "train": f"train[{pct}%:]"}.get(split)
    if not pct:
        holdout = None
    spec = dict(split=split, text_column=_get(data_cfg, "text_column"))
    if name == BUILTIN_PYDOC:
        spec.update(kind="pydoc", holdout=holdout, topics_sha=_pydoc_sha())
    elif name:
        # The hub's split names are unknown until it is loaded; the hold-out only applies
        # when the dataset has no validation split (decided in _load_rows).
        spec.update(kind="hub", name=name, config=_get(data_cfg, "dataset_config"), holdout=holdout)
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
                "no validation data: set data.validation_files or "
                "data.validation_split_percentage > 0"
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


def _builder_for(path: Path) -> str:
    # run_clm: .txt -> "text", .json/.jsonl -> "json", .csv -> "csv"; any other suffix
    # (wiki.test.raw, input) is read as text too.
    return {".json": "json", ".jsonl": "json", ".csv": "csv"}.get(path.suffix.lower(), "text")


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


def _load_rows(data_cfg, spec: dict):
    """The split's rows as a ``datasets.Dataset`` (hold-out and max_rows applied)."""
    import datasets

    if spec["kind"] == "pydoc":
        ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _pydoc_rows()})})
    elif spec["kind"] == "hub":
        ds = _load_hub(spec["name"], spec["config"])
    else:
        ds = _load_files(data_cfg, spec)
    split, holdout = spec["split"], spec["holdout"]
    # run_clm: hold out of train only when the source has no validation split of its own.
    if holdout and "train" in ds and "validation" not in ds:
        # Same row arithmetic as load_dataset(split="train[:5%]"): datasets' own parser.
        (ri,) = datasets.ReadInstruction.from_spec(holdout).to_absolute({"train": len(ds["train"])})
        rows = ds["train"].select(range(ri.from_, ri.to))
    elif split in ds:
        rows = ds[split]
    else:
        raise DataError(
            f"split {split!r} not found (available: {sorted(ds)}); for a validation split set "
            "data.validation_split_percentage > 0 or data.validation_files"
        )
    column = spec["text_column"]
    if column not in rows.column_names:
        raise DataError(
            f"data.text_column={column!r} is not a column of the data; available columns: "
            f"{rows.column_names}"
        )
    dtype = getattr(rows.features[column], "dtype", None)
    if dtype not in ("string", "large_string"):
        raise DataError(f"data.text_column={column!r} holds {rows.features[column]}, not text")
    if spec["max_rows"]:
        rows = rows.select(range(min(spec["max_rows"], len(rows))))
    return rows.select_columns([column])


def _load_hub(name: str, config: str):
    import datasets

    try:
        with _offline_env_honored():
            return datasets.load_dataset(name, config or None)
    except ConnectionError as e:
        raise DataError(
            f"data.dataset={name!r}: cannot reach the Hugging Face Hub ({e}). Offline, train on "
            "local text files instead: --config.data.dataset='' "
            "--config.data.train_files=PATH[,PATH...] [--config.data.validation_files=...], "
            "or use the builtin --config.data.dataset=pydoc_topics"
        ) from e
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"data.dataset={name!r}: not found on the Hugging Face Hub ({e})") from e
    except ValueError as e:  # e.g. an unknown config name
        raise DataError(f"data.dataset={name!r}, data.dataset_config={config!r}: {e}") from e


@contextlib.contextmanager
def _offline_env_honored():
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


def _load_files(data_cfg, spec: dict):
    import datasets

    split = "train" if spec["holdout"] else spec["split"]
    files = [f for f, _, _ in spec["files"]]
    kwargs = {}
    if spec["builder"] == "text":
        # keep_linebreaks=True is run_clm's default; encoding_errors reaches open().
        kwargs = dict(keep_linebreaks=True, encoding_errors=spec["encoding_errors"])
    try:
        return datasets.load_dataset(
            spec["builder"],
            data_files={split: files},
            cache_dir=str(_cache_root(data_cfg) / "datasets"),
            **kwargs,
        )
    except Exception as e:
        cause = e
        while cause is not None and not isinstance(cause, UnicodeDecodeError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DataError(_describe_bad_bytes(spec["key"], files)) from e
        raise DataError(f"data.{spec['key']}: could not read {files}: {e!r}") from e


def _describe_bad_bytes(key: str, files: list[str]) -> str:
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


# ---------------------------------------------------------------- tokenize + cache


def _cache_root(data_cfg) -> Path:
    root = _get(data_cfg, "cache_dir") or os.environ.get("GPT2_JAX_CACHE") or "~/.cache/gpt2_jax"
    return Path(os.path.expanduser(root)).resolve()


def _tokenize_to(rows, column: str, append_eos: bool, num_threads: int, path: Path, split: str):
    """Tokenizes ``rows[column]`` into the raw uint16 file ``path``; returns offsets [rows+1]."""
    from tqdm import tqdm

    enc = tokenizer.get_tokenizer()
    threads = num_threads or os.cpu_count() or 1
    lengths = []
    bar = tqdm(
        total=len(rows),
        desc=f"tokenizing {split}",
        unit="rows",
        file=sys.stderr,
        disable=len(rows) < _PROGRESS_MIN_ROWS,
    )
    with open(path, "wb") as f, bar:
        for batch in rows.iter(batch_size=_ENCODE_BATCH_ROWS):
            texts = [t or "" for t in batch[column]]
            # encode_ordinary: a literal "<|endoftext|>" in the data is text, never a special.
            ids = enc.encode_ordinary_batch(texts, num_threads=threads)
            if append_eos:
                ids = [row + [tokenizer.EOT_ID] for row in ids]
            n = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            flat = np.fromiter(
                itertools.chain.from_iterable(ids), dtype=np.uint16, count=int(n.sum())
            )
            f.write(flat.tobytes())
            lengths.append(n)
            bar.update(len(texts))
    return np.concatenate([[0], np.cumsum(np.concatenate(lengths or [[]]), dtype=np.int64)])


def _read_cache(meta_path: Path, tok_path: Path, off_path: Path):
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
    split = spec["split"]
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    root = _cache_root(data_cfg) / "tokens"
    stem = root / f"{split}-{key}"
    meta_path, tok_path, off_path = (Path(f"{stem}{s}") for s in (".json", ".tokens", ".offsets"))
    cached = _read_cache(meta_path, tok_path, off_path)
    if cached is not None:
        log.info("data: %s split from cache %s", split, stem)
        return cached

    root.mkdir(parents=True, exist_ok=True)
    rows = _load_rows(data_cfg, spec)
    # Atomic: write to unique tmp names, rename; the meta (written last) marks completeness,
    # so a crash or a concurrent writer (hosts sharing a filesystem) never leaves a torn cache.
    tmp = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tok_tmp, off_tmp, meta_tmp = (Path(f"{p}{tmp}") for p in (tok_path, off_path, meta_path))
    try:
        offsets = _tokenize_to(
            rows,
            spec["text_column"],
            spec["append_eos"],
            int(_get(data_cfg, "num_threads")),
            tok_tmp,
            split,
        )
        if offsets[-1] == 0:
            raise DataError(f"split {split!r} has 0 tokens ({len(rows)} rows) from {_source(spec)}")
        offsets.tofile(off_tmp)
        meta_tmp.write_text(
            json.dumps(
                dict(
                    version=CACHE_FORMAT_VERSION,
                    num_tokens=int(offsets[-1]),
                    num_rows=len(offsets) - 1,
                    spec=spec,
                ),
                indent=1,
            )
        )
        os.replace(tok_tmp, tok_path)
        os.replace(off_tmp, off_path)
        os.replace(meta_tmp, meta_path)
    finally:
        for p in (tok_tmp, off_tmp, meta_tmp):
            p.unlink(missing_ok=True)
    log.info(
        "data: %s split: %d rows -> %d tokens, cached at %s",
        split,
        len(offsets) - 1,
        offsets[-1],
        stem,
    )
    result = _read_cache(meta_path, tok_path, off_path)
    assert result is not None
    return result


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
        tokens, offsets = _token_stream(data_cfg, spec)
        blocks = Blocks(tokens, offsets, _get(data_cfg, "block_size"), _get(data_cfg, "group_rows"))
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

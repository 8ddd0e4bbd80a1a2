"""The token cache: a split's flat uint16 token stream + int64 row offsets on disk, read if
whole, else built by ``corpus`` under a lock; and the run summary's line on how it went.

Files live under ``core.paths.cache_root(data.cache_dir)/tokens``, named by the split and a
hash of its spec (``splits.split_spec``): ``{split}-{key}.tokens``, ``.offsets`` and
``.json`` (the meta file, written last: a cache is complete once it exists).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from gpt2_jax.core import paths
from gpt2_jax.data import corpus, rows, sources, splits, workers
from gpt2_jax.data.config import DataConfig
from gpt2_jax.data.sources import DataError, say

log = logging.getLogger(__name__)

_PROGRESS_MIN_ROWS = 10_000  # a smaller source is tokenized without a progress bar


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


def stem(data_cfg: DataConfig, spec: dict) -> Path:
    """The cache files' common path (no suffix): the split's name and its spec's hash."""
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    return paths.cache_root(data_cfg.cache_dir) / "tokens" / f"{spec['split']}-{key}"


def _paths(stem_path: Path) -> tuple[Path, Path, Path]:
    return tuple(Path(f"{stem_path}{s}") for s in (".json", ".tokens", ".offsets"))


def _digest(names) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:24]


def _num_proc(data_cfg: DataConfig) -> int:
    n = int(data_cfg.num_proc) or int(data_cfg.num_threads)
    return n or workers.default_processes()


# ---------------------------------------------------------------- reading


def read_cache(meta_path: Path, tok_path: Path, off_path: Path, warn: bool = True):
    """(tokens, offsets) memmaps if the cache is complete and consistent, else None."""
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        n_tok, n_rows = int(meta["num_tokens"]), int(meta["num_rows"])
        if meta.get("version") != splits.CACHE_FORMAT_VERSION:
            raise ValueError(
                f"format version {meta.get('version')} != {splits.CACHE_FORMAT_VERSION}"
            )
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


def load_token_stream(data_cfg: DataConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's tokens, cached on disk.

    Returns ``tokens``: [num_tokens] uint16 (memmap) and ``offsets``: [num_rows + 1] int64,
    ``offsets[i]`` the start of row i and ``offsets[-1] == num_tokens``.
    """
    data_cfg.validate()
    tokens, offsets, _ = cached_or_built(data_cfg, splits.split_spec(data_cfg, split))
    return tokens, offsets


def cached_or_built(data_cfg: DataConfig, spec: dict) -> tuple[np.ndarray, np.ndarray, CacheInfo]:
    """The split's (tokens, offsets) from the cache, else built: under a lock, so that of
    the processes sharing a cache directory one tokenizes and the others wait and read."""
    split, path = spec["split"], stem(data_cfg, spec)
    cached = read_cache(*_paths(path))
    if cached is not None:
        log.info("data: %s split from cache %s", split, path)
        return (*cached, CacheInfo(str(path)))
    root = path.parent
    root.mkdir(parents=True, exist_ok=True)
    # A hold-out's two sides come from one pass over train: one lock for both.
    group = (
        {s: splits.split_spec(data_cfg, s) for s in ("train", "validation")}
        if spec["holdout"]
        else {split: spec}
    )
    stems = {s: stem(data_cfg, sp) for s, sp in group.items()}
    lock_path = root / f"build-{_digest(sorted(p.name for p in stems.values()))}.lock"
    with corpus.build_lock(lock_path, " + ".join(group), say) as lock:
        cached = read_cache(*_paths(path), warn=False)
        if cached is not None:  # built by the process we waited for
            say(f"{split} split tokenized by another process; reading {path}")
            return (*cached, CacheInfo(str(path), waited=lock.waited, splits=tuple(group)))
        info = _build(data_cfg, spec, group, stems, lock)
    result = read_cache(*_paths(path))
    assert result is not None
    return (*result, info)


def _build(data_cfg: DataConfig, spec: dict, group: dict, stems: dict, lock) -> CacheInfo:
    """Tokenizes ``spec``'s split, and its hold-out sibling if that is not cached yet."""
    source = rows.load_rows(data_cfg, spec)
    targets = [
        corpus.Target(
            s,
            stems[s],
            selection,
            int(data_cfg.max_rows),
            meta=dict(version=splits.CACHE_FORMAT_VERSION, spec=group[s]),
        )
        for s, selection in source.selections.items()
        if s == spec["split"] or read_cache(*_paths(stems[s]), warn=False) is None
    ]
    root = stems[spec["split"]].parent
    journal = root / f"build-{_digest(sorted(t.stem.name for t in targets))}.journal.json"
    build = tokenize_to(source, targets, data_cfg, journal, lock)
    info = CacheInfo(
        str(stems[spec["split"]]),
        built=True,
        seconds=build.seconds,
        waited=lock.waited,
        processes=build.processes,
        tokens=sum(build.tokens) - build.tokens_at_open,
        resumed_from=build.resumed_from,
        splits=tuple(t.split for t in targets),
    )
    say(
        f"tokenized {' + '.join(info.splits)}: {build.rows_read:,} rows of {source.what} -> "
        + ", ".join(f"{t.split} {n:,}" for t, n in zip(targets, build.tokens, strict=True))
        + f" tokens in {build.seconds:.1f} s ({_rate(info)}); cache {root}"
    )
    return info


# ---------------------------------------------------------------- building


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


def tokenize_to(
    source: sources.RowSource, targets: list, data_cfg: DataConfig, journal: Path, lock
) -> corpus.Build:
    """Tokenizes ``source`` into the ``targets``' cache files in one pass with
    ``data.num_proc`` processes, resuming ``journal``'s build; returns the finished build."""
    build = corpus.Build(journal, targets, source.num_rows)
    build.open(say)
    column = source.column

    def check(table):  # streamed rows: the column and its type, seen in the first batch
        names = table.column_names
        kind = table.schema.field(column).type if column in names else None
        sources.check_text_column(column, names, kind)

    def chunks(start: int):
        tables = sources.tables(source, start, corpus.READ_ROWS)
        return corpus.chunks(tables, column, start, check)

    encoders = workers.Encoders(_num_proc(data_cfg), bool(data_cfg.append_eos))
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
    for t, n_rows, tokens in zip(targets, build.rows, build.tokens, strict=True):
        if tokens == 0:
            build.discard()
            hint = (
                ""
                if t.selection.kind == "all"
                else " (held out of train: raise data.validation_fraction, or set "
                "data.validation_rows)"
            )
            raise DataError(
                f"split {t.split!r} has 0 tokens ({n_rows} rows) from {source.what}{hint}"
            )
    build.finalize()
    return build


# ---------------------------------------------------------------- the report


def _rate(info: CacheInfo) -> str:
    procs = f"{info.processes} process" + "es" * (info.processes != 1)
    return f"{procs}, {info.tokens / max(info.seconds, 1e-9) / 1e6:.2f}M tokens/s"


def cache_report(blocks: dict) -> str:
    """One line for the run summary: what was tokenized and how long it took, or that the
    token cache was reused. ``blocks``: ``{split: Blocks}`` as ``load_splits`` returns."""
    infos = {name: b.cache for name, b in blocks.items() if getattr(b, "cache", None)}
    parts, covered = [], set()
    for name, b in blocks.items():  # examples (the SFT formats): tokenized each run
        if hasattr(b, "report"):
            parts.append(f"{name}: {b.report()}")
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
        return "; ".join(parts)
    root = Path(next(iter(infos.values())).path).parent
    return "; ".join(parts) + f" ({root})"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"

"""Rows -> the token cache in one pass: parallel, bounded memory, resumable, one builder.

``splits`` and ``rows`` decide *which* rows a split holds; this module turns a stream of
Arrow text batches into the cache files (a flat uint16 token stream + int64 row offsets per
split), and knows nothing of config keys.

- **One pass, several splits.** A source's rows are read once; each row goes to one target
  split (or none) by a ``Selection`` of its index: a range (run_clm's whole-percent
  hold-out), or a seeded key below / above a threshold (the fractional hold-out). So a
  streamed corpus is read once for train and validation together.
- **Processes.** The reading process cuts the rows into chunks of ~``CHUNK_BYTES`` of text
  and hands them to ``num_proc`` tokenizer processes (``workers``: fresh interpreters;
  ``encode_to_numpy``, the same ids as ``encode_ordinary``), a few chunks in flight each,
  and writes the results in order: memory is a few chunks, whatever the corpus size.
- **Resumable.** Results are appended to ``*.partial`` files; after each chunk a journal
  records how many source rows, rows and tokens are complete. A rerun after ``kill -9``
  truncates the partial files to the journal and goes on from there; the cache files
  appear under their final names (by ``os.replace``, the meta file last) only when whole.
- **One builder per cache directory.** The build holds an ``flock`` on a lock file beside
  the cache; another process (``launch``, or a host on a shared filesystem) says it is
  waiting, with the builder's progress, and reads the finished cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from gpt2_jax.data import workers
from gpt2_jax.data.sources import DataError

CHUNK_BYTES = 4 << 20  # text per tokenizer task: large enough to amortize the hand-off
READ_ROWS = 256  # rows per Arrow batch read from the source
WAIT_REPORT_SECONDS = 30.0  # a waiting process repeats the builder's progress this often
LOCK_POLL_SECONDS = 0.5
JOURNAL_VERSION = 1


# ---------------------------------------------------------------- hold-out keys
# Each row index i gets a 64-bit key: splitmix64 of (seed, i), a bijection of i for a
# fixed seed, so no two rows share a key. Sorting rows by key is a seeded shuffle; the
# validation rows are its head: keys below floor(fraction * 2**64), or the k smallest keys.
# A key depends on nothing but (seed, i): not on chunking, process counts, hosts, or on
# whether the rows are streamed.

_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def holdout_keys(seed: int, start: int, n: int) -> np.ndarray:
    """Keys [n] uint64 of rows ``start .. start + n - 1``."""
    base = int(_mix(np.array([(int(seed) * _GOLDEN + _GOLDEN) & _M64], np.uint64))[0])
    with np.errstate(over="ignore"):
        i = np.arange(start, start + n, dtype=np.uint64)
        return _mix(i * np.uint64(_GOLDEN) + np.uint64(base))


def fraction_threshold(fraction: float) -> int:
    """Rows with key < this are held out: ``floor(fraction * 2**64)``, exactly."""
    return int(Fraction(fraction) * (1 << 64))


def rows_threshold(seed: int, num_rows: int, k: int, block: int = 1 << 22) -> int:
    """The threshold below which exactly the ``k`` smallest keys of ``num_rows`` rows lie.

    O(k + block) memory: the k smallest so far, merged with one block of keys at a time.
    """
    if not 0 < k < num_rows:
        raise ValueError(f"k={k} must be in (0, {num_rows})")
    best = np.zeros(0, np.uint64)
    for start in range(0, num_rows, block):
        cand = np.concatenate([best, holdout_keys(seed, start, min(block, num_rows - start))])
        best = np.partition(cand, k - 1)[:k] if len(cand) > k else cand
    return int(best.max()) + 1


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which source rows a split takes, as a function of the row index alone.

    ``kind``: "all"; "range" (rows ``lo <= i < hi``); "below" / "atleast" (rows whose
    ``holdout_keys(seed, i)`` is below / at least ``threshold``).
    """

    kind: str = "all"
    lo: int = 0
    hi: int = 0
    seed: int = 0
    threshold: int = 0

    def mask(self, start: int, n: int, keys: Callable[[], np.ndarray]) -> np.ndarray:
        """bool [n]: which of rows ``start .. start + n - 1`` it takes."""
        if self.kind == "all":
            return np.ones(n, bool)
        if self.kind == "range":
            i = np.arange(start, start + n)
            return (i >= self.lo) & (i < self.hi)
        below = keys() < np.uint64(self.threshold) if self.threshold <= _M64 else np.ones(n, bool)
        return below if self.kind == "below" else ~below

    def exhausted(self, row: int) -> bool:
        """True when no row from ``row`` on can be taken (a range that has ended)."""
        return self.kind == "range" and row >= self.hi


@dataclasses.dataclass
class Target:
    """One split written by a build: where, which rows, at most how many (0: all)."""

    split: str
    stem: Path  # the cache files are f"{stem}.tokens", ".offsets", ".json"
    selection: Selection
    max_rows: int = 0
    meta: dict = dataclasses.field(default_factory=dict)  # written into the .json

    def path(self, suffix: str, partial: bool = False) -> Path:
        return Path(f"{self.stem}{suffix}{'.partial' if partial else ''}")


# ---------------------------------------------------------------- chunks


def chunks(
    tables: Iterator, column: str, start: int, check: Callable | None = None
) -> Iterator[tuple[int, object]]:
    """``(first row index, contiguous pyarrow string array)`` of ~``CHUNK_BYTES`` each.

    ``tables``: pyarrow Tables / RecordBatches of the source from row ``start`` on.
    ``check(table)`` sees the first one (column present, text type).
    """
    import pyarrow as pa

    parts, size, first, row = [], 0, start, start
    for table in tables:
        if check is not None:
            check(table)
            check = None
        col = table.column(column)
        for whole in col.chunks if isinstance(col, pa.ChunkedArray) else [col]:
            # A batch of long rows is cut to about CHUNK_BYTES pieces (zero-copy slices).
            step = max(1, len(whole) * CHUNK_BYTES // max(whole.nbytes, 1))
            for lo in range(0, len(whole), step):
                arr = whole.slice(lo, step)
                parts.append(arr)
                size += arr.nbytes
                row += len(arr)
                if size >= CHUNK_BYTES:
                    # concat copies: a slice would pickle its whole parent buffer
                    yield first, pa.concat_arrays(parts)
                    parts, size, first = [], 0, row
    if parts:
        yield first, pa.concat_arrays(parts)


# ---------------------------------------------------------------- the build


def _after_commit(chunks_done: int) -> None:
    """Called after each chunk is on disk (tests slow builds down or stop them here)."""


class Build:
    """The partial files and journal of one build; ``run`` fills them, ``finalize`` publishes.

    ``journal``: the JSON file recording progress (its name is unique to the set of
    targets). ``num_rows``: source rows, if known (the progress bar's total).
    """

    def __init__(self, journal: Path, targets: list[Target], num_rows: int | None = None):
        self.journal = journal
        self.targets = targets
        self.num_rows = num_rows
        self.rows_read = 0
        self.chunks_done = 0
        self.rows = [0] * len(targets)
        self.tokens = [0] * len(targets)
        self.resumed_from = 0
        self.tokens_at_open = 0  # tokens already there when this process opened the build
        self.seconds = 0.0
        self.processes = 1
        self._files: list = []

    # ---- journal
    def _state(self) -> dict:
        return dict(
            version=JOURNAL_VERSION,
            targets={t.split: t.stem.name for t in self.targets},
            rows_read=self.rows_read,
            chunks=self.chunks_done,
            splits={
                t.split: dict(rows=r, tokens=n)
                for t, r, n in zip(self.targets, self.rows, self.tokens, strict=True)
            },
        )

    def _write_journal(self) -> None:
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        tmp.write_text(json.dumps(self._state()))
        os.replace(tmp, self.journal)

    def _resume_state(self) -> str | None:
        """Loads the journal and truncates the partial files to it; why not, else None."""
        try:
            state = json.loads(self.journal.read_text())
        except (OSError, ValueError) as e:
            return f"journal unreadable ({e})"
        want = self._state()["targets"]
        if state.get("version") != JOURNAL_VERSION or state.get("targets") != want:
            return "journal of another build"
        for i, t in enumerate(self.targets):
            s = state["splits"][t.split]
            for path, size in (
                (t.path(".tokens", True), 2 * s["tokens"]),
                (t.path(".offsets", True), 8 * (s["rows"] + 1)),
            ):
                if not path.exists() or path.stat().st_size < size:
                    return f"{path.name} is shorter than its journal says"
            self.rows[i], self.tokens[i] = s["rows"], s["tokens"]
        for t, r, n in zip(self.targets, self.rows, self.tokens, strict=True):
            os.truncate(t.path(".tokens", True), 2 * n)
            os.truncate(t.path(".offsets", True), 8 * (r + 1))
            offsets = np.fromfile(t.path(".offsets", True), np.int64, count=r + 1)
            if offsets[0] != 0 or offsets[-1] != n:
                return f"{t.path('.offsets', True).name} does not match its journal"
        self.rows_read = self.resumed_from = int(state["rows_read"])
        self.chunks_done = int(state["chunks"])
        return None

    def open(self, say: Callable[[str], None]) -> None:
        """Resumes the journal's build if it is usable, else starts from row 0."""
        why = self._resume_state() if self.journal.exists() else "no journal"
        if why is None:
            say(
                f"resuming an interrupted build at source row {self.rows_read:,} "
                f"(chunk {self.chunks_done:,}; "
                + ", ".join(
                    f"{t.split} {n:,} tokens"
                    for t, n in zip(self.targets, self.tokens, strict=True)
                )
                + ")"
            )
        else:
            if self.journal.exists():
                say(f"an interrupted build is not resumable ({why}); starting over")
            self.rows_read = self.chunks_done = 0
            self.rows = [0] * len(self.targets)
            self.tokens = [0] * len(self.targets)
            for t in self.targets:
                t.path(".tokens", True).write_bytes(b"")
                np.zeros(1, np.int64).tofile(t.path(".offsets", True))
            self._write_journal()
        self.tokens_at_open = sum(self.tokens)
        self._files = [
            (open(t.path(".tokens", True), "ab"), open(t.path(".offsets", True), "ab"))
            for t in self.targets
        ]

    # ---- the pass
    def run(
        self,
        chunk_iter: Callable[[int], Iterator[tuple[int, object]]],
        encoders: workers.Encoders,
        progress=None,
        on_commit: Callable[[Build], None] | None = None,
    ) -> None:
        """Reads ``chunk_iter(rows_read)`` to its end (or until every target has its
        ``max_rows``), tokenizes and appends in order, committing after each chunk."""
        t0 = time.perf_counter()
        pending: deque = deque()  # (source row after the chunk, its result), in order
        routed = list(self.rows)  # rows assigned to each target so far (committed + pending)
        try:
            for first, texts in chunk_iter(self.rows_read):
                n = len(texts)
                dest = self._route(first, n, routed)
                everything = len(self.targets) == 1 and bool((dest == 0).all())
                fut = encoders.submit(texts, None if everything else dest, len(self.targets))
                pending.append((first + n, fut))
                while len(pending) >= encoders.max_inflight:
                    self._commit(*pending.popleft(), progress, on_commit)
                caps = zip(self.targets, routed, strict=True)
                end = first + n
                if all(t.selection.exhausted(end) or 0 < t.max_rows <= r for t, r in caps):
                    break  # every split has all it takes: the rest is not read
            while pending:
                self._commit(*pending.popleft(), progress, on_commit)
        finally:
            for f_tok, f_off in self._files:
                f_tok.close()
                f_off.close()
            self._files = []
            self.seconds += time.perf_counter() - t0
            self.processes = encoders.used

    def _route(self, first: int, n: int, routed: list[int]) -> np.ndarray:
        """int8 [n]: the target each of rows ``first .. first + n - 1`` goes to (-1: none);
        ``routed`` (rows given to each target so far) is advanced."""
        cache: list = []

        def keys():  # computed once per chunk, and only if a selection needs them
            if not cache:
                seeds = {t.selection.seed for t in self.targets}
                cache.append({s: holdout_keys(s, first, n) for s in seeds})
            return cache[0]

        dest = np.full(n, -1, np.int8)
        for i, t in enumerate(self.targets):
            m = t.selection.mask(first, n, lambda t=t: keys()[t.selection.seed])
            if t.max_rows:
                m &= np.cumsum(m) <= t.max_rows - routed[i]
            routed[i] += int(m.sum())
            dest[m] = i
        return dest

    def _commit(self, end: int, fut, progress, on_commit) -> None:
        """Appends a chunk's result (``fut.result()``) and records it in the journal."""
        for i, (toks, lens) in enumerate(fut.result()):
            f_tok, f_off = self._files[i]
            f_tok.write(memoryview(toks))
            f_off.write(memoryview(self.tokens[i] + np.cumsum(lens)))
            self.rows[i] += len(lens)
            self.tokens[i] += len(toks)
        for f_tok, f_off in self._files:
            f_tok.flush()
            f_off.flush()
        new_rows, self.rows_read = end - self.rows_read, end
        self.chunks_done += 1
        self._write_journal()  # after the data: a journal never promises more than is there
        if progress is not None:
            progress(new_rows, sum(self.tokens))
        if on_commit is not None:
            on_commit(self)
        _after_commit(self.chunks_done)

    def finalize(self) -> None:
        """Moves the partial files to their final names, each split's meta last."""
        built = dict(seconds=round(self.seconds, 2), processes=self.processes)
        for i, t in enumerate(self.targets):
            meta = dict(t.meta, num_tokens=self.tokens[i], num_rows=self.rows[i], built=built)
            meta_tmp = t.path(".json", True)
            meta_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(t.path(".tokens", True), t.path(".tokens"))
            os.replace(t.path(".offsets", True), t.path(".offsets"))
            os.replace(meta_tmp, t.path(".json"))
        self.journal.unlink(missing_ok=True)

    def discard(self) -> None:
        for t in self.targets:
            for suffix in (".tokens", ".offsets", ".json"):
                t.path(suffix, True).unlink(missing_ok=True)
        self.journal.unlink(missing_ok=True)


# ---------------------------------------------------------------- one builder


class Lock:
    """A held build lock: ``waited`` seconds before it was ours; ``report`` writes the
    holder's progress into the lock file, where a waiting process reads it."""

    def __init__(self, fd: int, waited: float):
        self.fd, self.waited = fd, waited
        self._holder = dict(host=socket.gethostname(), pid=os.getpid(), since=time.time())
        self.report({})

    def report(self, progress: dict) -> None:
        data = json.dumps({**self._holder, **progress}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


@contextlib.contextmanager
def build_lock(path: Path, what: str, say: Callable[[str], None]):
    """Holds an exclusive ``flock`` on ``path`` (created if missing); yields a ``Lock``.

    A process that finds it taken says so at once, then every WAIT_REPORT_SECONDS with the
    holder's progress. The lock dies with its process (``kill -9`` included), so a waiter
    then takes over. flock is shared across hosts on NFS (Linux emulates it with POSIX
    locks); on a filesystem without shared locks give each host its own ``data.cache_dir``.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        waited = 0.0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise DataError(
                    f"cannot lock {path} ({e}): this filesystem has no file locks, so processes "
                    "sharing it could not agree on who tokenizes; give each host its own "
                    "data.cache_dir (a local disk)"
                ) from e
            t0 = last = time.monotonic()
            say(f"waiting for {_holder(fd)} to tokenize {what} (lock {path})")
            while True:
                time.sleep(LOCK_POLL_SECONDS)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() - last >= WAIT_REPORT_SECONDS:
                        last = time.monotonic()
                        say(f"still waiting ({last - t0:.0f} s) for {_holder(fd)}")
            waited = time.monotonic() - t0
        yield Lock(fd, waited)
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    if not info:
        return "another process"
    text = f"process {info.get('pid')} on {info.get('host')}"
    if "rows" in info:
        text += f" ({info['rows']:,} rows, {info.get('tokens', 0):,} tokens so far)"
    return text

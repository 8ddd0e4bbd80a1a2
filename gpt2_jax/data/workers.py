"""Tokenizer processes: chunks of rows in, ``encode_chunk``'s token arrays out, in order.

The reading process (``corpus.Build.run``) hands each chunk of ~``corpus.CHUNK_BYTES`` of
text to one of ``num_proc`` processes, at most ``INFLIGHT_PER_PROC`` each in flight, and
takes the results back in the order it gave them, so memory is a few chunks whatever the
corpus size. Why a pool of its own rather than the standard library's:

- not tiktoken's own threads (``encode_ordinary_batch``): slower here than one plain loop
  of ``encode_to_numpy`` per process (experiments/corpus/README.md);
- not ``multiprocessing`` / ``ProcessPoolExecutor``: fork would copy a process that may hold
  XLA's threads, and spawn / forkserver import the caller's ``__main__`` again (a script
  without a main guard would rerun). Each worker here is a fresh interpreter started as
  ``python -c``, importing only gpt2_jax's tokenizer;
- a worker dies with the reading process even on ``kill -9`` (``PR_SET_PDEATHSIG``), and a
  worker that dies is one DataError saying that the same command resumes the build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2_jax.data import tokenizer
from gpt2_jax.data.sources import DataError

INFLIGHT_PER_PROC = 2  # chunks queued per tokenizer process (bounds memory)


def default_processes() -> int:
    """The CPUs this process may run on (``sched_getaffinity``: containers, taskset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def _encode(enc, text: str) -> np.ndarray:
    # encode_to_numpy with no special token allowed or disallowed = encode_ordinary's ids
    # (a literal "<|endoftext|>" is text), without building a Python list of ints.
    try:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # a lone surrogate: tiktoken's encode_ordinary does the same
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


_EOT = np.array([tokenizer.EOT_ID], np.uint32)
_EMPTY = np.zeros(0, np.uint32)


def encode_chunk(texts, dest: np.ndarray | None, n_out: int, append_eos: bool) -> list:
    """Tokenizes a chunk. ``texts``: a pyarrow string array [n] (or list of str); ``dest``:
    int8 [n], the output each row goes to (-1: none), or None for all to output 0.

    Returns per output ``(tokens uint16 [t], lengths int64 [rows])``, rows in order.
    """
    enc = tokenizer.get_tokenizer()
    rows = texts if isinstance(texts, list) else texts.to_pylist()
    if dest is None:
        dest = np.zeros(len(rows), np.int8)
    out = []
    for o in range(n_out):
        parts, lengths = [], []
        for j in np.flatnonzero(dest == o).tolist():
            ids = _encode(enc, rows[j] or "")
            parts.append(ids)
            if append_eos:
                parts.append(_EOT)
            lengths.append(len(ids) + append_eos)
        tokens = np.concatenate(parts) if parts else _EMPTY
        out.append((tokens.astype(np.uint16), np.asarray(lengths, np.int64)))
    return out


class _Done:
    """The result of a chunk tokenized in this process (the interface of ``_Remote``)."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


# The tokenizer process's program: the same gpt2_jax as this process's (its directory put
# on sys.path if it is not there; the working directory taken off, so that another
# checkout there is not imported instead). A fresh interpreter, not multiprocessing: that
# would import the caller's __main__ again (a script without a main guard would rerun).
_WORKER_CODE = (
    "import sys; here = sys.argv[2]; "
    "sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
    "here in sys.path or sys.path.insert(0, here); "
    "from gpt2_jax.data.workers import _worker_main; "
    "_worker_main(int(sys.argv[3]), sys.argv[4] == '1')"
)


class _Worker:
    """One tokenizer process (``_WORKER_CODE``), length-prefixed pickles over its stdin and
    stdout. A feeder thread writes tasks and a reader thread reads results, so neither side
    ever blocks on a full pipe while the other waits for it."""

    def __init__(self, append_eos: bool):
        import queue
        import threading

        here = str(Path(__file__).resolve().parents[2])
        argv = [sys.executable, "-c", _WORKER_CODE, "gpt2_jax-tokenizer", here]
        self.proc = subprocess.Popen(
            argv + [str(os.getpid()), str(int(append_eos))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.tasks: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.threads = [
            threading.Thread(target=self._feed, daemon=True),
            threading.Thread(target=self._read, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _feed(self) -> None:
        import pickle

        try:
            while (task := self.tasks.get()) is not None:
                data = pickle.dumps(task, protocol=5)
                self.proc.stdin.write(len(data).to_bytes(8, "little") + data)
                self.proc.stdin.flush()
            self.proc.stdin.close()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the process died: the reader reports it

    def _read(self) -> None:
        import pickle

        out = self.proc.stdout
        try:
            while len(head := out.read(8)) == 8:
                size = int.from_bytes(head, "little")
                body = out.read(size)
                if len(body) < size:
                    break
                self.results.put(pickle.loads(body))
        except Exception:  # a torn reply: the process died while writing it
            pass
        self.results.put(("died", None))  # after the last reply: nothing follows

    def submit(self, task) -> _Remote:
        self.tasks.put(task)
        return _Remote(self)

    def close(self, abort: bool = False) -> None:
        """Ends the process: after its queued tasks, or at once (``abort``)."""
        self.tasks.put(None)
        if abort:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Remote:
    """A chunk's result from a ``_Worker``: each worker answers its tasks in order."""

    def __init__(self, worker: _Worker):
        self.worker = worker

    def result(self):
        status, value = self.worker.results.get()
        if status == "ok":
            return value
        if status == "error":
            raise RuntimeError(f"tokenizer process {self.worker.proc.pid} failed:\n{value}")
        code = self.worker.proc.wait()
        raise DataError(
            f"a tokenizer process ({self.worker.proc.pid}) died with exit code {code} (out of "
            "memory, or killed?); the same command resumes the build from its last complete "
            "chunk (fewer processes: data.num_proc)"
        )


class Encoders:
    """``num_proc`` tokenizer processes, started at the second chunk (a corpus of one chunk
    never pays for them); chunks go to them in turn. ``num_proc=1``: in this process."""

    def __init__(self, num_proc: int, append_eos: bool):
        self.num_proc = max(1, int(num_proc))
        self.append_eos = append_eos
        self.workers: list[_Worker] = []
        self.used = 1  # processes that tokenized (for the report)
        self._submitted = 0

    def submit(self, texts, dest, n_out):
        """Queues a chunk; returns an object whose ``result()`` is ``encode_chunk``'s."""
        if not self.workers and self.num_proc > 1 and self._submitted:
            self.workers = [_Worker(self.append_eos) for _ in range(self.num_proc)]
            self.used = self.num_proc
        self._submitted += 1
        if not self.workers:
            return _Done(encode_chunk(texts, dest, n_out, self.append_eos))
        worker = self.workers[self._submitted % len(self.workers)]
        return worker.submit((texts, dest, n_out))

    @property
    def max_inflight(self) -> int:
        return INFLIGHT_PER_PROC * self.num_proc if self.workers else 1

    def close(self, abort: bool = False) -> None:
        for w in self.workers:
            w.close(abort)
        self.workers = []


def _worker_main(parent: int, append_eos: bool) -> None:  # pragma: no cover - subprocess
    import pickle
    import traceback

    if sys.platform.startswith("linux"):
        import ctypes

        # Die with the reading process, even when it is killed by SIGKILL (no orphans).
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the reading process's to handle
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not corrupt the result stream
    inp = sys.stdin.buffer
    tokenizer.get_tokenizer()
    while len(head := inp.read(8)) == 8:
        texts, dest, n_out = pickle.loads(inp.read(int.from_bytes(head, "little")))
        try:
            reply = ("ok", encode_chunk(texts, dest, n_out, append_eos))
        except Exception:
            reply = ("error", traceback.format_exc())
        data = pickle.dumps(reply, protocol=5)
        out.write(len(data).to_bytes(8, "little") + data)
        out.flush()

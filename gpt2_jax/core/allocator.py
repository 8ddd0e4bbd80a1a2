"""Host memory allocation for XLA:CPU: reuse freed memory instead of asking the kernel again.

Each execution of a compiled step on XLA:CPU allocates its temporaries (activations,
logits, gradients: hundreds of MB for GPT-2) with ``malloc`` from a worker thread and frees
them at the end. glibc serves a request that large from ``mmap`` and gives it back with
``munmap`` on ``free``: worker threads use their own arenas, whose heaps top out at 64 MB,
and those fall back to ``mmap`` whatever ``M_MMAP_MAX`` says. So every step the kernel
maps, faults in and zeroes the whole temporary space again. Measured on 2 CPU cores
(``experiments/speed/README.md``): 10 million page faults in 100 quickstart steps, a third
of the wall time in the kernel, and the GPT-2 124M step at B=4 T=512 with dropout took
13.7 s instead of 10.2 s.

The fix is glibc's own settings: every thread allocates from the main heap
(``MALLOC_ARENA_MAX=1``), never from ``mmap`` (``MALLOC_MMAP_MAX_=0``), and freed memory is
kept (``MALLOC_TRIM_THRESHOLD_`` 64 GiB), so the next step's temporaries land on pages
already mapped. The cost is a resident size that stays at its peak.

- ``reexec()`` (the ``gpt2-jax`` entry point, ``python -m gpt2_jax``, the benchmark's
  workers) sets them as environment variables and re-executes the same command line,
  so they hold from the process's first allocation. The trim threshold has to come this
  way: a GPT-2 124M step frees more than the 2 GiB ``mallopt`` can express.
- ``tune()`` (``cli.main`` in-process, the Python API) applies what it can with
  ``mallopt`` in a running process: one arena, no ``mmap``, trim threshold 2 GiB. It must
  run before XLA starts its threads (the first jax computation).

Both leave things alone when:
- ``GPT2_JAX_MALLOC=system`` is set (glibc's defaults);
- the user tuned malloc already (``MALLOC_ARENA_MAX``, ``MALLOC_MMAP_MAX_``,
  ``MALLOC_TRIM_THRESHOLD_``, ``glibc.malloc`` in ``GLIBC_TUNABLES``, or jemalloc/tcmalloc
  in ``LD_PRELOAD``);
- jax will run on an accelerator (a GPU or TPU plugin is installed and ``JAX_PLATFORMS``
  does not say cpu): device memory is XLA's own allocator there;
- the C library is not glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, ~2 GiB

# The same as environment variables (read by glibc at process start; size_t values).
TUNED_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(64 << 30),
    "GPT2_JAX_MALLOC": "tuned",  # marks them as ours: reexec() and tune() stop here
}

_USER_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")

TUNED = "glibc tuned: one arena, no mmap, freed memory kept (GPT2_JAX_MALLOC=system: defaults)"
TUNED_IN_PROCESS = "glibc tuned in-process: one arena, no mmap, trim above 2 GiB"
_AT_START = "tuned at process start"
_state: str | None = None


def skip_reason(env) -> str | None:
    """Why malloc must be left as it is, or None to tune it."""
    if env.get("GPT2_JAX_MALLOC", "").lower() == "system":
        return "GPT2_JAX_MALLOC=system"
    if all(env.get(k) == v for k, v in TUNED_ENV.items()):
        return _AT_START
    for name in _USER_ENV:
        if name in env:
            return f"{name} set by the user"
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES set by the user"
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return "another malloc in LD_PRELOAD"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if not platforms.startswith("cpu"):
        for plugin in _ACCELERATOR_PLUGINS:
            if importlib.util.find_spec(plugin) is not None:
                return f"{plugin} installed (accelerator host)"
    return None


def reexec(env=None) -> None:
    """Re-execute this process's command line with ``TUNED_ENV`` set; returns (doing
    nothing) where ``skip_reason`` applies, which includes the re-executed process."""
    env = dict(os.environ if env is None else env)
    if skip_reason(env) is not None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**env, **TUNED_ENV})


def tune(env=None) -> str:
    """Apply what ``mallopt`` can once per process; returns a one-line description of the
    host allocator (the run summary prints it)."""
    global _state
    if _state is not None:
        return _state
    reason = skip_reason(os.environ if env is None else env)
    if reason == _AT_START:  # reexec() set the variables: nothing left to do
        _state = TUNED
        return _state
    if reason is None:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            reason = "no glibc mallopt"
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            if all(mallopt(k, v) == 1 for k, v in settings):
                _state = TUNED_IN_PROCESS
                return _state
            reason = "mallopt refused"
    _state = f"not tuned ({reason})"
    return _state


def state() -> str | None:
    """What ``tune()`` did in this process, or None if it was not called."""
    return _state

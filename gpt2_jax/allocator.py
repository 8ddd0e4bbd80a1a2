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

``tune()`` sets glibc's ``mallopt`` so that every thread allocates from the main heap
(``M_ARENA_MAX=1``), never from ``mmap`` (``M_MMAP_MAX=0``), and keeps what was freed
(``M_TRIM_THRESHOLD`` 2 GiB): the next step's temporaries reuse the same pages. The cost
is a resident size that stays at its peak rather than shrinking between steps.

It must run before XLA starts its threads (before the first jax computation); the CLI
calls it first thing. Left alone when:
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
import sys

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, ~2 GiB

_USER_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")

TUNED = "glibc tuned: one arena, no mmap, freed memory kept (GPT2_JAX_MALLOC=system: defaults)"
_state: str | None = None


def skip_reason(env) -> str | None:
    if env.get("GPT2_JAX_MALLOC", "").lower() == "system":
        return "GPT2_JAX_MALLOC=system"
    for name in _USER_ENV:
        if name in env:
            return f"{name} set by the user"
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES set by the user"
    preload = env.get("LD_PRELOAD", "")
    if "jemalloc" in preload or "tcmalloc" in preload or "mimalloc" in preload:
        return "another malloc in LD_PRELOAD"
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if not platforms.startswith("cpu"):
        for plugin in _ACCELERATOR_PLUGINS:
            if importlib.util.find_spec(plugin) is not None:
                return f"{plugin} installed (accelerator host)"
    return None


def tune(env=None) -> str:
    """Apply the settings above once per process; returns a one-line description of the
    host allocator (the run summary prints it)."""
    global _state
    if _state is not None:
        return _state
    reason = skip_reason(os.environ if env is None else env)
    if reason is None:
        try:
            mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            reason = "no glibc mallopt"
        else:
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
            if all(mallopt(k, v) == 1 for k, v in settings):
                _state = TUNED

                return _state
            reason = "mallopt refused"
    _state = f"system default ({reason})"
    return _state


def state() -> str | None:
    """What ``tune()`` did in this process, or None if it was not called."""
    return _state

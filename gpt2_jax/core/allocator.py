"""Host memory allocation for XLA:CPU: reuse freed memory instead of asking the kernel again.

Each execution of a compiled step on XLA:CPU allocates its temporaries (activations,
logits, gradients: hundreds of MB for GPT-2) with ``malloc`` from a worker thread and frees
them at the end. glibc serves a request that large from ``mmap`` and gives it back with
``munmap`` on ``free``: worker threads use their own arenas, whose heaps top out at 64 MB,
and those fall back to ``mmap`` whatever ``M_MMAP_MAX`` says. So every step the kernel
maps, faults in and zeroes the whole temporary space again. Measured on 2 CPU cores
(``experiments/archive/speed/README.md``): 10 million page faults in 100 quickstart steps, a third
of the wall time in the kernel, and the GPT-2 124M step at B=4 T=512 with dropout took
13.7 s instead of 10.2 s.

The fix is glibc's own settings: every thread allocates from the main heap (one arena),
never from ``mmap``, and freed memory is never trimmed, so the next step's temporaries land
on pages already mapped. The cost is a resident size that stays at its peak.

``tune()`` applies them with ``mallopt`` in the running process; the ``gpt2-jax`` entry
point calls it once (``cli/main.py: configure_process``), before XLA starts its threads.
Nothing else calls it: importing or calling the library leaves malloc as it is.
``mallopt`` takes an ``int``, but glibc stores the trim threshold as a ``size_t``: -1
becomes SIZE_MAX, "never trim" - what ``MALLOC_TRIM_THRESHOLD_`` set to 64 GiB did when
the command re-executed itself with these variables (measured: a 3 GiB block freed and
allocated again by a worker thread faults in no page the second time, either way; 2 GiB
minus one, the largest positive ``int``, faults in all of them). Hence no re-exec.

``tune()`` leaves things alone when:
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
NEVER_TRIM = -1  # an int for mallopt; glibc's size_t threshold: SIZE_MAX

_USER_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm_plugin", "libtpu")

TUNED = "glibc tuned: one arena, no mmap, freed memory kept (GPT2_JAX_MALLOC=system: defaults)"
_state: str | None = None


def skip_reason(env) -> str | None:
    """Why malloc must be left as it is, or None to tune it."""
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
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return f"not Linux with glibc ({sys.platform}, {platform.libc_ver()[0] or 'unknown libc'})"
    platforms = env.get("JAX_PLATFORMS", "").lower()
    if not platforms.startswith("cpu"):
        for plugin in _ACCELERATOR_PLUGINS:
            if importlib.util.find_spec(plugin) is not None:
                return f"{plugin} installed (accelerator host)"
    return None


def tune(env=None) -> str:
    """Apply what ``mallopt`` can once per process; returns a one-line description of the
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
            settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
            if all(mallopt(k, v) == 1 for k, v in settings):
                _state = TUNED
                return _state
            reason = "mallopt refused"
    _state = f"not tuned ({reason})"
    return _state


def state() -> str | None:
    """What ``tune()`` did in this process, or None if it was not called."""
    return _state

"""gpt2_jax.core.allocator: freed step temporaries are reused, not mapped and zeroed again."""

import os
import subprocess
import sys
import textwrap

from gpt2_jax.core import allocator

# A worker thread (as XLA:CPU's are) allocates, touches and frees 128 MB three times; the
# minor page faults of the last two rounds are printed. With glibc's defaults each round
# is a fresh mmap (~32K faults of 4 KiB); tuned, the freed pages are reused.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from gpt2_jax.core import allocator
    if sys.argv[1:] == ["reexec"]:
        allocator.reexec()
    print(allocator.tune(), file=sys.stderr)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = 128 << 20
    faults = []
    def rounds():
        for _ in range(3):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            p = libc.malloc(n)
            ctypes.memset(p, 1, n)
            libc.free(p)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    t = threading.Thread(target=rounds)
    t.start()
    t.join()
    print(sum(faults[1:]))
    """
)


def _faults(env_extra: dict, *args: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GPT2_JAX_"))}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


def test_tuned_malloc_reuses_freed_memory_across_rounds():
    pages = (128 << 20) // 4096
    default = _faults({"GPT2_JAX_MALLOC": "system"}, "reexec")
    reexec = _faults({"JAX_PLATFORMS": "cpu"}, "reexec")  # as the gpt2-jax command
    in_process = _faults({"JAX_PLATFORMS": "cpu"})  # mallopt only, as cli.main
    assert default > pages, default  # two fresh mappings: ~2 x 32K faults
    assert reexec < pages // 10, reexec  # the same pages again
    assert in_process < pages // 10, in_process


def test_reexec_runs_the_same_command_once_with_the_settings():
    script = (
        "import os, sys\n"
        "from gpt2_jax.core import allocator\n"
        "print(os.getpid(), os.environ.get('MALLOC_TRIM_THRESHOLD_'), sys.argv[1:], flush=True)\n"
        "allocator.reexec()\n"
        "print(allocator.tune())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GPT2_JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script, "a", "--b=c"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    pid = out[0].split()[0]
    assert out[0] == f"{pid} None ['a', '--b=c']"
    assert out[1] == f"{pid} {64 << 30} ['a', '--b=c']"  # same process, same arguments
    assert out[2] == allocator.TUNED
    assert len(out) == 3


def test_skip_reasons_respect_the_user():
    base = {"JAX_PLATFORMS": "cpu"}
    assert allocator.skip_reason(base) is None or not sys.platform.startswith("linux")
    assert "GPT2_JAX_MALLOC" in allocator.skip_reason({**base, "GPT2_JAX_MALLOC": "system"})
    assert "MALLOC_ARENA_MAX" in allocator.skip_reason({**base, "MALLOC_ARENA_MAX": "4"})
    assert "GLIBC_TUNABLES" in allocator.skip_reason(
        {**base, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    )
    assert "LD_PRELOAD" in allocator.skip_reason(
        {**base, "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
    )

"""gpt2_jax.core.allocator: freed step temporaries are reused, not mapped and zeroed again."""

import os
import subprocess
import sys
import textwrap

import pytest

from gpt2_jax.core import allocator

# A worker thread (as XLA:CPU's are) allocates, touches and frees N bytes three times; the
# minor page faults of the last two rounds are printed. With glibc's defaults each round
# is a fresh mmap (N / 4 KiB faults); tuned, the freed pages are reused.
PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys, threading
    from gpt2_jax.core import allocator
    print(allocator.tune(), file=sys.stderr)
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    n = int(sys.argv[1])
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


def _faults(env_extra: dict, nbytes: int) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GPT2_JAX_"))}
    env.update(env_extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(nbytes)],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.strip())


def test_tuned_malloc_reuses_freed_memory_across_rounds():
    pages = (128 << 20) // 4096
    default = _faults({"GPT2_JAX_MALLOC": "system"}, 128 << 20)
    tuned = _faults({"JAX_PLATFORMS": "cpu"}, 128 << 20)  # mallopt, as the gpt2-jax command
    assert default > pages, default  # two fresh mappings: ~2 x 32K faults
    assert tuned < pages // 10, tuned  # the same pages again


# 3 GiB touched three times: ~45 s of the 2-core suite, so `make test-all` runs it.
@pytest.mark.slow
def test_tuned_malloc_keeps_a_block_larger_than_mallopt_can_name():
    # A GPT-2 124M step frees more than 2 GiB (the largest positive int mallopt takes): the
    # trim threshold -1 (SIZE_MAX) keeps it, as the re-exec's MALLOC_TRIM_THRESHOLD_ did.
    n = 3 << 30
    assert _faults({"JAX_PLATFORMS": "cpu"}, n) < n // 4096 // 10


def test_tune_is_the_commands_alone():
    # Importing the library tunes nothing; the gpt2-jax entry point tunes once.
    script = (
        "import sys\n"
        "import gpt2_jax.core.allocator as a, gpt2_jax.cli.main as m\n"
        "print(a.state())\n"
        "m.configure_process('eval')\n"
        "print(a.state())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GPT2_JAX_"))}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == ["None", allocator.TUNED]


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

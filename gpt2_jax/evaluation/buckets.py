"""Shape buckets: how generation and the harness round lengths so that nearby requests
share one compiled executable, and how the harness packs short requests into rows.

- ``pow2``: the power of two >= n, the unit of every bucket here.
- ``decode_buckets``: generation's (prompt bucket, KV-cache length).
- ``length_bucket``: the harness's trunk lengths (powers of two and their midpoints).
- ``pack``: best-fit decreasing of request lengths into rows of a capacity.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

MIN_PROMPT_BUCKET = 8  # generation's smallest prompt bucket: tiny prompts share one executable
MIN_LENGTH_BUCKET = 16  # the harness's shortest trunk: short requests share one executable


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def decode_buckets(n_positions: int, prompt_len: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompt bucket Pb, cache length S) for the longest prompt and ``max_new_tokens``.

    Powers of two, so that nearby lengths share executables. Near the context limit,
    where the rounded-up prompt would leave too little room, Pb is the exact length.
    """
    Pb = max(pow2(prompt_len), MIN_PROMPT_BUCKET)
    if Pb + max_new_tokens > n_positions:
        Pb = prompt_len
    return Pb, min(pow2(Pb + max_new_tokens), n_positions)


def length_bucket(n: int) -> int:
    """The trunk length for ``n`` tokens: the smallest power of two, or midpoint between two
    (3 * 2^k: 16, 24, 32, 48, 64, 96, ...), >= n and >= MIN_LENGTH_BUCKET. A row holds under
    1.5x its tokens, not up to 2x: on GPT-2 124M here a trunk compiles in ~0.8 s and a padded
    token costs ~1 ms (experiments/harness), so the midpoints pay for their compiles."""
    p = max(pow2(n), MIN_LENGTH_BUCKET)
    return 3 * p // 4 if p > MIN_LENGTH_BUCKET and n <= 3 * p // 4 else p


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` in bins of at most ``capacity``
    tokens, longest first (a length over ``capacity`` gets a bin of its own). Deterministic:
    every process of a launch packs alike."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(room, (n, -1))
        if n > capacity or k == len(room):
            bins.append([i])
            if n < capacity:
                bisect.insort(room, (capacity - n, len(bins) - 1))
            continue
        free, b = room.pop(k)
        bins[b].append(i)
        if free > n:
            bisect.insort(room, (free - n, b))
    return bins

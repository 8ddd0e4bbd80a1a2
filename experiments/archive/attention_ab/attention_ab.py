"""A/B of the inference attention inside the whole GPT-2 124M eval forward + loss.

A: the plain attention (``model._xla_attention``, the full causal [T, T] scores);
B: ``model._blocked_attention`` (what every deterministic forward runs). Both are
compiled in one process and timed alternately (median and best of ``--repeats``), so the ratio is
a same-run figure. Random weights and tokens: speed does not depend on their values.

    .venv/bin/python experiments/archive/attention_ab/attention_ab.py [--shapes=4x512,2x1024]
"""

from __future__ import annotations

import argparse
import time

from gpt2_jax.core import allocator

allocator.tune()  # as the CLI runs (before the first jax computation)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gpt2_jax.model import attention as attention_lib  # noqa: E402
from gpt2_jax.model import config as gpt2_config  # noqa: E402
from gpt2_jax.model import gpt2 as m  # noqa: E402
from gpt2_jax.model import losses as losses_lib  # noqa: E402


def _plain(qkv, nh, mask=None, block=None):
    return attention_lib.xla_attention(qkv, nh, None, mask)


def _eval_fn(cfg, attention):
    """The jitted eval forward + mean loss, traced with ``attention`` in place."""
    fn = jax.jit(
        lambda p, ids: losses_lib.token_nll(m.GPT2(cfg).apply({"params": p}, ids), ids).mean()
    )

    def run(params, ids):
        original = attention_lib.blocked_attention
        attention_lib.blocked_attention = attention  # read when the first call traces
        try:
            return fn(params, ids).block_until_ready()
        finally:
            attention_lib.blocked_attention = original

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="gpt2")
    p.add_argument("--shapes", default="4x512,2x1024", help="BxT,BxT,...")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    cfg = gpt2_config.GPT2Config(**gpt2_config.size_fields(a.size))
    params = m.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    for shape in a.shapes.split(","):
        B, T = (int(x) for x in shape.split("x"))
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
        fns = {
            "plain": _eval_fn(cfg, _plain),
            "blocked": _eval_fn(cfg, attention_lib.blocked_attention),
        }
        for fn in fns.values():
            fn(params, ids)  # compile
        times = {name: [] for name in fns}
        for _ in range(a.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(params, ids)
                times[name].append(time.perf_counter() - t0)
        for stat, f in (("median", np.median), ("best", np.min)):
            s = {name: float(f(t)) for name, t in times.items()}
            tps = {name: round(B * T / x, 1) for name, x in s.items()}
            ratio = s["plain"] / s["blocked"]
            print(f"{a.size} {B} x {T}, {stat}: tokens/s {tps}, blocked / plain {ratio:.3f}x")


if __name__ == "__main__":
    main()

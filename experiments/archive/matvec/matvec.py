"""Matrix-vector (1 and 8 rows) products of GPT-2 124M's head, XLA:CPU vs PyTorch.

    .venv/bin/python experiments/archive/matvec/matvec.py

The decode step's bound: every weight is read once a step, so the bytes/s these products
reach bound tokens/s (see README.md). Each product is jitted and called 50 times.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch


def per_call(fn, *args, n=50):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n


def main() -> None:
    torch.set_num_threads(2)
    K, N = 768, 50257
    mb = K * N * 4 / 1e6
    for M in (1, 8):
        x = np.random.randn(M, K).astype(np.float32)
        w = (np.random.randn(K, N) * 0.02).astype(np.float32)
        jx, jw, jwt = jnp.asarray(x), jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
        t_cv = per_call(jax.jit(lambda a, b: a @ b), jx, jw)
        t_vc = per_call(jax.jit(lambda a, b: a @ b.T), jx, jwt)
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)
        with torch.no_grad():
            t_torch = per_call(lambda a=tx, b=tw: a @ b)
        print(
            f"[{M}, {K}] x head: jax [C,V] {t_cv * 1e3:.2f} ms ({mb / t_cv / 1e3:.0f} GB/s), "
            f"jax [V,C]^T {t_vc * 1e3:.2f} ms ({mb / t_vc / 1e3:.0f} GB/s), "
            f"torch {t_torch * 1e3:.2f} ms ({mb / t_torch / 1e3:.0f} GB/s)"
        )


if __name__ == "__main__":
    main()

"""Training loss head: plain [B, T, 50257] logits vs the vocabulary padded to 50304 (masked).

    .venv/bin/python experiments/archive/padded_head/bench.py \
        --n_layer=4 --n_embd=128 --batch=8 --seq=64

Times value_and_grad of the whole model's mean next-token loss, both heads in one process
(alternating, so load on a shared machine hits both alike). The padded head gives the same
loss and gradients (tests/test_model.py checks it); only the speed differs.
"""

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp

from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import gpt2 as m
from gpt2_jax.model import losses as losses_lib


def plain(params, ids, cfg):
    return losses_lib.token_nll(m.GPT2(cfg).apply({"params": params}, ids), ids).mean()


def padded(params, ids, cfg):
    h = m.GPT2(cfg).apply({"params": params}, ids, return_hidden=True)
    return losses_lib.hidden_token_nll(h, params["wte"]["embedding"], ids).mean()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    cfg = gpt2_config.GPT2Config(
        n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, n_positions=a.seq
    )
    params = m.init_params(cfg, jax.random.PRNGKey(0))
    ids = jax.random.randint(jax.random.PRNGKey(1), (a.batch, a.seq), 0, cfg.vocab_size)
    fns = {
        name: jax.jit(jax.value_and_grad(functools.partial(f, cfg=cfg)))
        for name, f in (("plain", plain), ("padded", padded))
    }
    times = {name: [] for name in fns}
    for f in fns.values():
        jax.block_until_ready(f(params, ids))  # compile
    for _ in range(a.rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, ids))
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    loss = {k: float(f(params, ids)[0]) for k, f in fns.items()}
    print(
        json.dumps(
            {
                "args": vars(a),
                "jax": jax.__version__,
                "machine": f"{platform.machine()}, {jax.device_count()} CPU device(s)",
                "best_s": {k: round(v, 3) for k, v in best.items()},
                "speedup_padded": round(best["plain"] / best["padded"], 2),
                "loss": loss,
                "loss_abs_diff": abs(loss["plain"] - loss["padded"]),
                "dtype": str(jnp.float32.dtype),
            }
        )
    )


if __name__ == "__main__":
    main()

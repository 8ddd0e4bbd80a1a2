"""Compile time and step time of the train step: layers scanned vs unrolled.

    .venv/bin/python experiments/archive/scan_vs_unrolled/bench.py --size=gpt2 --batch=4 --seq=256

Each variant: time to lower + compile the step, one warm-up step, then the mean of --steps
further steps (the jitted train_step of gpt2_jax.train, fp32, dropout 0.1, AdamW). Both variants run
in the same process, one after the other, so their ratio is what to read on a noisy machine.
"""

import argparse
import functools
import json
import platform
import time

import jax

from gpt2_jax.config import base as config
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.train import step as train


def bench(model_cfg, batch, seq, steps):
    oc = config.base_config().optim  # the defaults, as a pretraining run would set them:
    oc.update(dict(schedule="constant", weight_decay=0.1, b2=0.95))
    tx, _ = optim.make_optimizer(oc, 100)
    state = jax.jit(functools.partial(train.init_state, model_cfg=model_cfg, tx=tx))(
        jax.random.PRNGKey(0)
    )
    step = jax.jit(
        functools.partial(train.train_step, model_cfg=model_cfg, tx=tx), donate_argnums=0
    )
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, batch, seq), 0, model_cfg.vocab_size)
    t0 = time.perf_counter()
    compiled = step.lower(state, ids).compile()
    compile_s = time.perf_counter() - t0
    state, m = compiled(state, ids)  # warm-up step
    m["loss"].block_until_ready()
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, ids)
    m["loss"].block_until_ready()
    return compile_s, (time.perf_counter() - t0) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="gpt2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    out = {
        "size": a.size,
        "batch": a.batch,
        "seq": a.seq,
        "jax": jax.__version__,
        "machine": f"{platform.machine()}, {jax.device_count()} CPU device(s)",
    }
    for scan in (True, False):
        cfg = gpt2_config.GPT2Config(**gpt2_config.size_fields(a.size), scan_layers=scan)
        compile_s, step = bench(cfg, a.batch, a.seq, a.steps)
        key = "scan" if scan else "unrolled"
        out[key] = {"compile_s": round(compile_s, 2), "step_s": round(step, 3)}
        print(key, out[key], flush=True)
    out["compile_ratio_unrolled_over_scan"] = round(
        out["unrolled"]["compile_s"] / out["scan"]["compile_s"], 2
    )
    out["step_ratio_unrolled_over_scan"] = round(
        out["unrolled"]["step_s"] / out["scan"]["step_s"], 2
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()

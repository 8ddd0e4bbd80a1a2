"""Where a gpt2_jax train step spends its time: step time, and optionally an op profile.

    .venv/bin/python experiments/archive/speed/probe.py --batch=4 --seq=128            # step time
    .venv/bin/python experiments/archive/speed/probe.py --seq=128 --scan --profile     # + top ops
    .venv/bin/python experiments/archive/speed/probe.py --seq=128 --dtype=bfloat16

GPT-2 124M shape, random weights, AdamW as configured by default, the jitted
``train.train_step`` with donated state; median of --steps timed steps after one warm-up.
``--profile`` runs one more step under ``jax.profiler`` and sums the XLA:CPU thunks by
kind (``ynn_fusion`` = YNNPACK matmul fusions, ``dot`` = XLA's own, etc.).
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.config import base as config_lib
from gpt2_jax.core import allocator
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.train import step as step_lib


def main() -> None:
    allocator.tune()  # as the CLI does (GPT2_JAX_MALLOC=system for glibc's defaults)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--scan", action="store_true", help="model.scan_layers=True")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--shape", default="12,12,768", help="n_layer,n_head,n_embd (quickstart: 4,4,128)"
    )
    a = ap.parse_args()
    d = a.dropout
    cfg = gpt2_config.GPT2Config(
        **dict(zip(("n_layer", "n_head", "n_embd"), map(int, a.shape.split(",")), strict=True)),
        n_positions=1024, resid_pdrop=d, embd_pdrop=d,
        attn_pdrop=d, scan_layers=a.scan, dtype=a.dtype,
    )  # fmt: skip
    tx, _ = optim.make_optimizer(config_lib.base_config().optim, 1000)
    state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=cfg, tx=tx)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (1, a.batch, a.seq)), jnp.int32)
    step = jax.jit(functools.partial(step_lib.train_step, model_cfg=cfg, tx=tx), donate_argnums=0)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    s = float(np.median(times))
    print(
        f"B={a.batch} T={a.seq} dropout={d} dtype={a.dtype} scan={a.scan}: first call "
        f"{first:.1f} s, step {s * 1e3:.0f} ms, {a.batch * a.seq / s:.0f} tokens/s"
    )
    if not a.profile:
        return
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            state, m = step(state, batch)
            jax.block_until_ready(m)
        (path,) = glob.glob(f"{tmp}/**/perfetto_trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    total, count, single = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name.startswith("$") or "Thunk" in name or "Slinky" in name:
            continue
        kind = re.sub(r"\.\d+$", "", name)
        total[kind] += e.get("dur", 0)
        count[kind] += 1
        single[name] += e.get("dur", 0)
    for kind, us in total.most_common(12):
        print(f"{us / 1e3:9.1f} ms  {count[kind]:4d} x {kind}")
    print("largest single ops:")
    for name, us in single.most_common(8):
        print(f"{us / 1e3:9.1f} ms  {name}")


if __name__ == "__main__":
    main()

"""A/B of the training head in one process: chunked (model.mean_token_nll) vs plain autodiff.

    .venv/bin/python experiments/archive/speed/ab_head.py 12 12 768 4 512  # n_layer n_head C B T

Both train steps are compiled first, then timed alternately (4 steps each, median), so a
drift of the machine's speed hits both alike.
"""

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_jax.config import base as config_lib
from gpt2_jax.model import config as gpt2_config
from gpt2_jax.model import losses as losses_lib
from gpt2_jax.optim import optimizer as optim
from gpt2_jax.train import step as step_lib


def plain(h, w, ids):
    return losses_lib.hidden_token_nll(h, w, ids).mean()


def main() -> None:
    L, H, C, B, T = map(int, sys.argv[1:6])
    cfg = gpt2_config.GPT2Config(
        n_layer=L, n_head=H, n_embd=C, n_positions=1024, resid_pdrop=0, embd_pdrop=0,
        attn_pdrop=0,
    )  # fmt: skip
    tx, _ = optim.make_optimizer(config_lib.base_config().optim, 1000)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 50257, (1, B, T)), jnp.int32)
    steps = {}
    for name, fn in (("chunked", losses_lib.mean_token_nll), ("plain", plain)):
        losses_lib.mean_token_nll = fn  # train.loss_fn looks it up at trace time
        state = step_lib.init_state(jax.random.PRNGKey(0), model_cfg=cfg, tx=tx)
        step = jax.jit(
            functools.partial(step_lib.train_step, model_cfg=cfg, tx=tx), donate_argnums=0
        )
        state, m = step(state, batch)
        jax.block_until_ready(m)
        steps[name] = [step, state]
    times = {k: [] for k in steps}
    for _ in range(4):
        for name, s in steps.items():
            t0 = time.perf_counter()
            s[1], m = s[0](s[1], batch)
            jax.block_until_ready(m)
            times[name].append(time.perf_counter() - t0)
    print(sys.argv[1:], {k: f"{np.median(v) * 1e3:.0f} ms" for k, v in times.items()})


if __name__ == "__main__":
    main()

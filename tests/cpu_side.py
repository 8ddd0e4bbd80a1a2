"""The CPU half of tests/test_gpu.py, run as ``JAX_PLATFORMS=cpu python -m tests.cpu_side``.

A fresh process that sees no GPU (as a CPU-only machine would): it decodes greedily from
parameters the GPU test saved, and restores the GPU's checkpoint, checks it and saves one of
its own for the GPU test to restore. Files in, files out (npz of flattened trees, JSON).

    python -m tests.cpu_side generate ARGS.json OUT.json
    python -m tests.cpu_side checkpoint ARGS.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import numpy as np


def save_tree(path, tree) -> None:
    """A nested dict of arrays as one npz, keys joined with '/'."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(tree, sep="/")
    np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})


def load_tree(path) -> dict:
    from flax import traverse_util

    with np.load(path) as f:
        return traverse_util.unflatten_dict({k: f[k] for k in f.files}, sep="/")


def model_config(fields: dict):

    from gpt2_jax.model import config as gpt2_config

    return gpt2_config.GPT2Config(**fields)


def config_fields(cfg) -> dict:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------- pieces both sides use


def optimizer():
    from gpt2_jax.config import base as config_lib
    from gpt2_jax.optim import optimizer as optim

    return optim.make_optimizer(config_lib.base_config().optim, 100)[0]


def train_step_fn(cfg):
    import jax

    from gpt2_jax.train import step as step_lib

    step = functools.partial(step_lib.train_step, model_cfg=cfg, tx=optimizer())
    return jax.jit(step)


def batch(cfg, seed: int, rows: int = 2):
    """[1, rows, n_positions] int32 token ids."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, cfg.vocab_size, (1, rows, cfg.n_positions)).astype(np.int32)


def abstract_state(cfg, device):
    """ShapeDtypeStructs of the train state, every leaf placed on ``device``."""
    import jax

    from gpt2_jax.train import step as step_lib
    from gpt2_jax.weights import checkpoint as ckpt_lib

    init = functools.partial(step_lib.init_state, model_cfg=cfg, tx=optimizer())
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    one = jax.sharding.SingleDeviceSharding(device)
    return ckpt_lib.abstract_like(shapes, jax.tree.map(lambda _: one, shapes))


def state_to_numpy(state) -> dict:
    """{keystr: array} of every leaf (the optimizer state holds tuples: no traverse_util)."""
    import jax

    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(state)}


def greedy_margins(cfg, params, prompts, new_ids) -> float:
    """The smallest (top-1 minus top-2) logit gap over the greedy choices: how far each
    choice was from a tie, which bounds what rounding on another device may flip."""
    import jax

    from gpt2_jax.model import gpt2 as model_lib

    rows = [list(p) + list(n) for p, n in zip(prompts, new_ids, strict=True)]
    ids = np.zeros((len(rows), max(map(len, rows))), np.int32)
    for i, row in enumerate(rows):  # right-padded: a causal model's earlier logits unchanged
        ids[i, : len(row)] = row
    logits = np.asarray(jax.jit(model_lib.GPT2(cfg).apply)({"params": params}, ids))
    gaps = []
    for i, (prompt, new) in enumerate(zip(prompts, new_ids, strict=True)):
        chose = logits[i, len(prompt) - 1 : len(prompt) - 1 + len(new)]  # rows that chose
        top2 = np.sort(chose, axis=-1)[:, -2:]
        gaps.append(float(np.min(top2[:, 1] - top2[:, 0])))
    return min(gaps)


# ---------------------------------------------------------------- the two commands


def generate(args: dict) -> dict:
    from gpt2_jax.evaluation import generate as gen

    cfg = model_config(args["cfg"])
    params = load_tree(args["params"])
    new = gen.generate_batch(cfg, params, args["prompts"], args["new_tokens"], temperature=0.0)
    return {"new_ids": new, "margin": greedy_margins(cfg, params, args["prompts"], new)}


def checkpoint(args: dict) -> dict:
    """Restores ``src`` onto the CPU, checks it against ``expect``, trains one step and
    saves that state to ``dst`` (its leaves as ``dst_npz``)."""
    import jax

    from gpt2_jax.weights import checkpoint as ckpt_lib

    cfg = model_config(args["cfg"])
    cpu = jax.devices("cpu")[0]
    with ckpt_lib.Checkpointer(args["src"], read_only=True) as ckpt:
        state = ckpt.restore(None, abstract_state(cfg, cpu))
    with np.load(args["expect"]) as f:
        want = {k: f[k] for k in f.files}
    got = state_to_numpy(state)
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    devices = {d for x in jax.tree.leaves(state) for d in x.devices()}
    assert devices == {cpu}, devices
    state, metrics = train_step_fn(cfg)(state, batch(cfg, seed=2))
    assert np.isfinite(float(metrics["loss"]))
    with ckpt_lib.Checkpointer(args["dst"], async_save=False) as ckpt:
        ckpt.save(int(state["step"]), state, {"saved_on": "cpu"})
    np.savez(args["dst_npz"], **state_to_numpy(state))
    return {"step": int(state["step"]), "leaves": len(got), "platform": cpu.platform}


def main(argv: list[str]) -> int:
    command, args_path, *out = argv
    args = json.loads(open(args_path).read())
    result = {"generate": generate, "checkpoint": checkpoint}[command](args)
    if out:
        with open(out[0], "w") as f:
            json.dump(result, f)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

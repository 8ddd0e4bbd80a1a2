"""Packed vs unpacked SFT, and the cost of packed attention, side by side in one process.

    python experiments/sft/bench.py [--steps 12] [--block 256] [--batch 8] [--out results.json]

Two measurements on ``configs/sft.py:local``'s model (4 layers x 4 heads x n_embd 128, fp32)
and its prompt/completion set (configs/data/pydoc_sft.jsonl: 2,456 pairs, ~40-400 tokens):

1. **Packed vs unpacked SFT.** The real compiled train step (``train.step.build_step``) on
   the real rows of each layout, ``--steps`` steps each, interleaved (A B A B ...), rows in
   the loader's shuffled order (seed 0). Reports completion (target) tokens trained per second, and how much
   of each layout's rows is padding.
2. **Packed attention vs unpacked rows of the same shape.** The same packed rows, once with
   their segment ids and positions (attention within each example) and once without (plain
   causal rows of the same [B, T]): the step time of each, and their ratio. The loss head is
   the same weighted one in both, so the difference is the attention mask alone.

Timing: the median of the interleaved steps, after one compile-and-warm-up step each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax

from gpt2_jax import data as data_lib
from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.train import step as step_lib

ROOT = Path(__file__).resolve().parents[2]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(x.split(":", 1)[1].strip() for x in out.splitlines() if "Model name" in x)
    except Exception:  # noqa: BLE001 - a label only
        return platform.processor() or "unknown"


def plan_for(packing: bool, block: int, batch: int, workdir: str):
    cfg = config_lib.load_config_file(str(ROOT / "configs" / "sft.py:local"))
    config_lib.apply_overrides(
        cfg,
        {"data.packing": str(packing), "data.block_size": str(block),
         "train.batch_size": str(batch), "model.n_positions": str(max(block, 256))},
    )  # fmt: skip
    plan = plan_lib.training(cfg, workdir, jax.device_count())
    return plan_lib.with_data(plan, 1000)


class Runner:
    """One layout's compiled step, state and batches."""

    def __init__(self, plan, rows, drop_segments: bool = False):
        self.step = step_lib.build_step(plan) if not drop_segments else _unpacked_step(plan)
        init = jax.jit(
            lambda rng: step_lib.init_state(rng, model_cfg=plan.model, tx=self.step.tx),
            out_shardings=self.step.state_shardings,
        )
        self.state = init(jax.random.PRNGKey(0))
        self.rows, self.drop = rows, drop_segments
        self.loader = data_lib.BatchLoader(len(rows), plan.train.batch_size, seed=0)
        self.times, self.targets, self.i = [], [], 0

    def next_batch(self):
        idx = self.loader.indices(self.i)  # the shuffled order a run reads
        self.i += 1
        b = self.rows[idx]
        if self.drop:
            b = {k: b[k] for k in ("input_ids", "loss_mask")}
        self.targets.append(int(b["loss_mask"][:, 1:].sum()))
        return jax.tree.map(lambda x: x[None], b)

    def run(self, timed: bool = True) -> None:
        batch = self.next_batch()
        t0 = time.perf_counter()
        self.state, metrics = self.step.compiled(self.state, batch)
        jax.block_until_ready(metrics["loss"])
        if timed:
            self.times.append(time.perf_counter() - t0)
        else:
            self.targets.pop()


def _unpacked_step(plan):
    """The packed plan's step compiled for rows without segment ids and positions."""
    data = dataclasses.replace(plan.data, packing=False)
    return step_lib.build_step(dataclasses.replace(plan, data=data))


def padding(rows) -> float:
    """The fraction of the rows' tokens that are padding (no example token)."""
    used = rows.num_tokens
    return 1 - used / (len(rows) * rows.block_size)


def padding_to_longest(rows, batch: int) -> float:
    """Unpacked rows padded to the longest example of each batch (TRL's collator without
    packing; a JAX step compiles one shape, so gpt2_jax pads to block_size): the padding
    fraction over an epoch of the loader's batches. For comparison only."""
    loader = data_lib.BatchLoader(len(rows), batch, seed=0)
    used = total = 0
    for step in range(loader.steps_per_epoch):
        lengths = rows.lengths[[rows.rows[i][0] for i in loader.indices(step)]]
        used += int(lengths.sum())
        total += int(lengths.max()) * batch
    return 1 - used / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    plans = {p: plan_for(p, args.block, args.batch, tmp) for p in (False, True)}
    rows = {p: data_lib.load_splits(plans[p].data, ("train",))["train"] for p in (False, True)}
    runners = {
        "unpacked": Runner(plans[False], rows[False]),
        "packed": Runner(plans[True], rows[True]),
        "packed rows, no segment mask": Runner(plans[True], rows[True], drop_segments=True),
    }
    for r in runners.values():
        r.run(timed=False)  # compile + warm up
    for _ in range(args.steps):
        for r in runners.values():
            r.run()
    result = {"cpu": cpu_model(), "devices": jax.device_count(), "block": args.block,
              "batch": args.batch, "steps": args.steps, "layouts": {}}  # fmt: skip
    for name, r in runners.items():
        med = statistics.median(r.times)
        tgt = statistics.mean(r.targets)
        result["layouts"][name] = {
            "step_seconds_median": med,
            "target_tokens_per_step": tgt,
            "target_tokens_per_second": tgt / med,
            "padding_fraction": padding(r.rows),
            "rows": len(r.rows),
        }
    lay = result["layouts"]
    lay["unpacked"]["padding_fraction_if_padded_to_batch_longest"] = padding_to_longest(
        rows[False], args.batch
    )
    result["packed_vs_unpacked_target_tokens_per_second"] = (
        lay["packed"]["target_tokens_per_second"] / lay["unpacked"]["target_tokens_per_second"]
    )
    result["packed_attention_step_time_ratio"] = (
        lay["packed"]["step_seconds_median"]
        / lay["packed rows, no segment mask"]["step_seconds_median"]
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()

"""Throughput metrics and compilation: one train-step compile and one eval compile per run."""

import collections
import json
import logging
import re

import jax

from gpt2_jax.config import base as config_lib
from gpt2_jax.train import loop as train_lib

from .helpers import TINY

_COMPILED = re.compile(r"Finished XLA compilation of jit\((\w+)\)")


class _Compiles(logging.Handler):
    """Counts XLA compilations by function name from ``jax.log_compiles`` records."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.names = collections.Counter()

    def emit(self, record):
        m = _COMPILED.search(record.getMessage())
        if m:
            self.names[m.group(1)] += 1


def _train_counting(cfg, workdir) -> collections.Counter:
    handler = _Compiles()
    logger = logging.getLogger("jax._src.dispatch")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            train_lib.train(cfg, workdir)
    finally:
        logger.removeHandler(handler)
    return handler.names


def _cfg(steps: int):
    cfg = config_lib.load_config_file(TINY)
    config_lib.apply_overrides(
        cfg,
        {
            "train.steps": str(steps),
            "train.log_every": "1",
            "train.eval_every": "5",
            "train.checkpoint_every": "5",
            "train.progress": "false",
        },
    )
    return cfg


def test_ten_steps_evals_and_a_resume_compile_the_step_and_the_eval_once(tmp_path):
    jax.clear_caches()  # other tests in this process may have compiled the same eval
    first = _train_counting(_cfg(10), tmp_path)  # evals at steps 5 and 10
    assert first["train_step"] == 1, first
    assert first["_blocks_nll_sum"] == 1, first
    resumed = _train_counting(_cfg(14), tmp_path)  # resumes at 10, evals at 14
    assert resumed["train_step"] == 1, resumed  # a new run compiles its step once
    assert resumed["_blocks_nll_sum"] == 0, resumed  # the eval is still in jax's cache
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["split"] == "train"]
    # Every step after the first of each run reports throughput; the first carries compile.
    with_tps = [r["step"] for r in lines if "tokens_per_second" in r]
    assert steps == list(range(1, 15)) and with_tps == [s for s in steps if s not in (1, 11)]
    r = next(r for r in lines if r.get("step") == 2)
    assert r["tokens_per_second_per_device"] == r["tokens_per_second"] / jax.device_count()
    assert "mfu" not in r  # no known peak for a CPU: no made-up MFU


def test_mfu_from_a_given_peak(tmp_path):
    cfg = _cfg(3)
    config_lib.apply_overrides(cfg, {"train.peak_flops": "1e12", "train.eval_every": "0"})
    train_lib.train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    r = next(r for r in lines if r.get("step") == 3)
    from gpt2_jax.model import flops

    fpt = flops.flops_per_token(config_lib.model_config(cfg), cfg.data.block_size)
    expected = r["tokens_per_second"] * fpt / (1e12 * jax.device_count())
    assert abs(r["mfu"] - expected) <= 1e-9 * expected


def test_flops_per_token_counts_every_parameter_but_the_position_table():
    from gpt2_jax.model import config as gpt2_config
    from gpt2_jax.model import flops
    from gpt2_jax.model import gpt2 as model_lib

    cfg = gpt2_config.GPT2Config(n_layer=3, n_head=3, n_embd=48, n_inner=80, n_positions=96)
    n = model_lib.count_params(model_lib.init_params(cfg, jax.random.PRNGKey(0))) - 96 * 48
    assert flops.flops_per_token(cfg, 10) == 6 * n + 12 * 3 * 10 * 48
    assert flops.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert flops.peak_flops("NVIDIA H200 NVL", "bfloat16") == 835e12
    assert flops.peak_flops("TPU v5 lite", "bfloat16") == 197e12
    assert flops.peak_flops("cpu", "float32") is None

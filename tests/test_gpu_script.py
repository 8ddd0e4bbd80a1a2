"""experiments/gpu/run.sh --dry-run, here on the CPU: the GPU run's script cannot rot unseen.

`make test` runs it with two of the GPU tests and the training benchmark (about a minute on
2 cores); the `slow` test (make test-all) runs all of both, as the GPU run does.
"""

import json
import os
import subprocess
import sys

import pytest

from gpt2_jax.model import flops

from .helpers import ROOT

RUN = ROOT / "experiments" / "gpu" / "run.sh"
QUICK_TESTS = "attention_matches or checkpoint"


def _run(tmp_path, **env_extra) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **env_extra}
    env.pop("GPT2_JAX_GPU", None)
    proc = subprocess.run(
        ["bash", str(RUN), "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    log = (out / "gpu_log.txt").read_text()
    assert log == proc.stdout  # the log is the whole output
    return proc, json.loads((out / "gpu_results.json").read_text())


def _check_bench(results: dict, tasks: set) -> None:
    bench = results["bench"]
    assert bench["errors"] == [], bench["errors"]
    rows = {(r["framework"], r["task"]): r for r in bench["rows"]}
    for task in tasks:
        for fw in ("jax", "torch") if task != "matmul" else ("jax",):
            r = rows[(fw, task)]
            assert r["platform"] == "cpu", r
            if task == "matmul":
                assert r["tflops"] > 0
            else:
                assert r["tokens_per_s"] > 0, r
        if task != "matmul":
            assert bench["summary"][task]["ratio"] > 0
    if "train" in tasks:
        train = rows[("jax", "train")]
        assert train["loss_finite"] and train["compile_s"] > 0
        assert train["mfu"] is None  # no peak for a CPU: none made up
        assert train["flops_per_token"] == pytest.approx(
            flops.flops_per_token(_dry_model(), train["seq"]), rel=1e-12
        )


def _dry_model():

    from gpt2_jax.model import config as gpt2_config

    return gpt2_config.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=128)


def test_dry_run_checks_and_measures_on_the_cpu_and_writes_the_results(tmp_path):
    proc, results = _run(tmp_path, GPU_RUN_TESTS=QUICK_TESTS, GPU_RUN_BENCH="train")
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert results["mode"] == "dry-run"
    phases = {p["name"]: p["rc"] for p in results["phases"]}
    assert phases == {"install": 0, "devices": 0, "tests": 0, "bench": 0}, results["phases"]
    install = results["install"]
    assert install["dry_run"] and install["unmet_requirements"] == [], install
    assert results["devices"]["platform"] == "cpu"
    tests = results["tests"]
    assert (tests["passed"], tests["failed"], tests["errors"], tests["skipped"]) == (2, 0, 0, 0)
    names = {c["name"] for c in tests["cases"]}
    assert "test_cudnn_attention_matches_xla_forward_and_gradients" in names
    errors = next(c for c in tests["cases"] if "attention_matches" in c["name"])["properties"]
    assert "forward fused" in errors["rel_errors_vs_fp32"]
    _check_bench(results, {"train"})
    assert "| train |" in proc.stdout and "tests: 2 passed, 0 failed" in proc.stdout


def test_a_test_that_does_not_finish_fails_the_run_and_is_reported(tmp_path):
    # 20 s in all: pytest is stopped at its limit, the benchmark is left out for want of time.
    proc, results = _run(tmp_path, GPU_RUN_BUDGET_S="20")
    assert proc.returncode == 1, proc.stdout[-4000:]
    phases = {p["name"]: p for p in results["phases"]}
    assert phases["tests"]["rc"] in (124, 137), phases
    assert phases["bench"]["note"] == "not run: out of time"
    assert "error" in results["tests"]  # no junit.xml: pytest did not finish
    assert "FAILED: the GPU tests did not all pass" in proc.stdout


@pytest.mark.slow
def test_full_dry_run_every_gpu_test_and_benchmark(tmp_path):
    proc, results = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:]
    tests = results["tests"]
    assert tests["failed"] == tests["errors"] == tests["skipped"] == 0 and tests["passed"] >= 8
    _check_bench(results, {"train", "train_dropout", "eval", "generate_1", "generate_8", "matmul"})

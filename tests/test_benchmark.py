"""The side-by-side benchmark runs (tiny shape, quick) and writes outputs that parse."""

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


# ~50-70 s of the 2-core suite (jax and torch, six kinds of rows): run by `make test-all`,
# so that `make test` stays under its 12 minutes with the SFT and LoRA tests added.
@pytest.mark.slow
def test_benchmark_quick_tiny_writes_json_markdown_and_png(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "benchmark" / "bench.py"),
            "--sizes=tiny",
            "--quick",
            "--steps=1",
            f"--out={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    kinds = {r["kind"] for r in data["rows"]}
    assert kinds == {"matmul", "train", "eval", "generate", "tokenize", "loader"}
    for r in data["rows"]:
        if "ratio" in r:
            assert r["ratio"] > 0 and r["jax"]["tokens_per_s"] > 0, r
        if r["kind"] in ("train", "eval"):
            assert 0 < r["jax"]["fraction_of_matmul_limit"] < 5, r
    assert {r["dropout"] for r in data["rows"] if r["kind"] == "train"} == {0.0, 0.1}
    assert {r["batch"] for r in data["rows"] if r["kind"] == "generate"} == {1, 8}
    md = (tmp_path / "results.md").read_text()
    assert "| train | tiny |" in md and "matmul limit" in md
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

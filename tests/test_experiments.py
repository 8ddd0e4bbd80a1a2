"""Smoke runs of the live experiments/ scripts: each one end to end, on tiny shapes, offline.

What a full run measures is unchanged; these runs check that the scripts still run against
today's gpt2_jax and that their own checks hold (the pipelines agree on the tokens, the
backends on the log-likelihoods, the decoders on the ids). The numbers they print on tiny
shapes mean nothing. Elsewhere: experiments/benchmark (tests/test_benchmark.py),
experiments/gpu/run.sh and what it runs (tests/test_gpu_script.py). experiments/archive is
run by no test (its README says why).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from .helpers import ROOT, WIKI_HEAD

EXPERIMENTS = ROOT / "experiments"


def _run(argv: list[str], timeout: int = 600, **env_extra) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", **env_extra}  # fmt: skip
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def test_corpus_bench_tokenizes_one_corpus_three_ways_alike(tmp_path):
    # The shipped WikiText-2 head stands in for the shared corpus the script repeats.
    shared = tmp_path / "shared"
    (shared / "wikitext-2-raw").mkdir(parents=True)
    shutil.copyfile(WIKI_HEAD, shared / "wikitext-2-raw" / "wiki.test.raw")
    out = tmp_path / "results.json"
    proc = _run(
        [sys.executable, str(EXPERIMENTS / "corpus" / "bench.py"), "--size_mb=0.2",
         "--validation_fraction=0.05", "--num_proc=2", f"--workdir={tmp_path / 'work'}",
         f"--out={out}"],
        GPT2_JAX_SHARED_DATA=str(shared), GPT2_JAX_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    record = json.loads(out.read_text())
    results = {r["name"]: r for r in record["results"]}
    assert sorted(results) == ["gpt2_jax", "gpt2_jax_stream", "nanogpt"]
    # The script's own check, restated: the same tokens, whichever pipeline.
    assert len({(r["tokens"], r["id_sum"]) for r in results.values()}) == 1
    for r in results.values():
        assert r["tokens"] > 50_000 and r["tokens_per_s"] > 0 and r["peak_tree_pss_mb"] > 0, r
    assert "| gpt2_jax_stream |" in proc.stdout


def test_generation_bench_decodes_the_same_ids_as_transformers(tmp_path):
    out = tmp_path / "results.json"
    proc = _run(
        [sys.executable, str(EXPERIMENTS / "generation" / "bench.py"), "--size=tiny",
         "--new_tokens=8", "--rounds=1", "--batches=1,8", f"--out={out}"],
    )  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["batch"] for r in rows] == [1, 8]
    for r in rows:
        assert r["same_ids"] and r["first_matches"], r
        assert r["gpt2_jax_tok_s"] > 0 and r["transformers_tok_s"] > 0 and r["ratio"] > 0
    assert "| 8 | 8 |" in proc.stdout


def test_harness_bench_runs_both_commands_and_they_agree(tmp_path):
    out = tmp_path / "results"
    _run(
        [sys.executable, str(EXPERIMENTS / "harness" / "bench.py"), "--smoke",
         f"--wiki={WIKI_HEAD}", f"--out={out}"],
        GPT2_JAX_CACHE=str(tmp_path / "cache"),
    )  # fmt: skip
    record = json.loads((out / "results.json").read_text())
    [row] = record["rows"]
    assert (row["task"], row["n"]) == ("bench_lambada", 8)
    assert row["max_rel_diff"] <= 1e-4  # the script stops before this when they disagree
    assert row["jax_median"] > 0 and row["hf_median"] > 0
    assert "| bench_lambada | 8 requests |" in (out / "results.md").read_text()


def test_gpu_bundle_fetches_each_pin_and_refuses_a_short_download(tmp_path):
    # pip stood in (the registry is not the test's business): a PYTHON that "downloads" a
    # wheel per pin, or one short when FAKE_PIP_SHORT is set.
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'dest=""; pins=()\n'
        'while (($#)); do case $1 in -d) dest=$2; shift 2 ;; *==*) pins+=("$1"); shift ;;'
        " *) shift ;; esac; done\n"
        '[[ -n ${FAKE_PIP_SHORT:-} ]] && pins=("${pins[@]:1}")\n'
        'for p in "${pins[@]}"; do\n'
        '  head -c 2048 /dev/zero >"$dest/${p/==/-}-py3-none-any.whl"\n'
        "done\n"
    )
    fake.chmod(0o755)
    pins = [
        line.split("#")[0].strip()
        for line in (EXPERIMENTS / "gpu" / "bundle.txt").read_text().splitlines()
        if line.split("#")[0].strip()
    ]
    dest = tmp_path / "wheels"
    bundle = ["bash", str(EXPERIMENTS / "gpu" / "bundle.sh")]
    proc = _run(bundle, PYTHON=str(fake), GPU_BUNDLE_DIR=str(dest))
    assert len(list(dest.glob("*.whl"))) == len(pins) > 0
    assert f"gpu-bundle: {len(pins)} wheels in {dest}" in proc.stdout
    assert f"{2 * len(pins):.1f} KiB  in all" in proc.stdout
    env = {**os.environ, "PYTHON": str(fake), "GPU_BUNDLE_DIR": str(dest), "FAKE_PIP_SHORT": "1"}
    short = subprocess.run(bundle, env=env, capture_output=True, text=True, timeout=60)
    assert short.returncode == 1
    assert f"{len(pins)} pins in bundle.txt but {len(pins) - 1} wheels" in short.stderr

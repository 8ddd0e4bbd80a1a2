"""Two processes x one CPU device each (jax.distributed + gloo) = one process x two devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

from .conftest import ROOT, run_cli

TINY = str(ROOT / "configs" / "quickstart.py:tiny")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def test_two_processes_match_two_devices(tmp_path):
    common = [
        "train",
        f"--config={TINY}",
        "--config.model.dropout=0.1",
        "--config.train.steps=4",
        "--config.train.checkpoint_every=2",
    ]
    ref = run_cli([*common, f"--workdir={tmp_path}/ref"], devices=2)
    assert ref.returncode == 0, ref.stderr[-3000:]

    port = _free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gpt2_jax",
                *common,
                f"--workdir={tmp_path}/multi",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={i}",
                "--config.distributed.cpu_collectives=gloo",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=False):
        assert p.returncode == 0, err[-3000:]
    assert "'data': 2" in outs[0][0] + outs[0][1]
    got, want = _losses(tmp_path / "multi"), _losses(tmp_path / "ref")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    np.testing.assert_allclose(
        [got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5
    )
    assert sorted(
        p.name for p in (tmp_path / "multi" / "checkpoints").iterdir() if p.name.isdigit()
    ) == ["2", "4"]

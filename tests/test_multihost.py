"""Many processes: `gpt2-jax launch` = one process with as many devices; checkpoints move
between meshes and process counts; eval sharded over processes; cluster auto-detection."""

import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from gpt2_jax.config import base as config_lib
from gpt2_jax.parallel import sharding

from .helpers import ROOT, TINY, cli_in_process, run_cli


def _launch(args, processes, devices, timeout=600):
    """``python -m gpt2_jax launch ...``: the launch command itself, not a hand-rolled spawn."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2_jax",
            "launch",
            f"--processes={processes}",
            f"--devices_per_process={devices}",
            "--",
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _losses(workdir):
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def _drop_checkpoints_after(workdir, step):
    """Simulates a run stopped right after checkpoint ``step``."""
    for p in (workdir / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)


# ------------------------------------------------------------------ training


def test_launch_matches_one_process_and_checkpoints_move_between_meshes(tmp_path):
    """2 processes x 2 devices (fsdp=4: parameters split across processes) = 1 process x 4
    devices; its checkpoint resumes on 1 device, whose checkpoint resumes on 2 (data=2),
    every step's loss equal to the uninterrupted run's."""
    common = [
        "train",
        f"--config={TINY}",
        "--config.model.dropout=0.1",
        "--config.train.steps=6",
        "--config.train.checkpoint_every=2",
    ]
    ref = run_cli([*common, f"--workdir={tmp_path}/ref"], devices=4)
    assert ref.returncode == 0, ref.stderr[-3000:]
    want = _losses(tmp_path / "ref")
    assert sorted(want) == [1, 2, 3, 4, 5, 6]

    run = tmp_path / "run"
    multi = _launch([*common, f"--workdir={run}", "--config.mesh.fsdp=4"], 2, 2)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert "'data': 1, 'fsdp': 4" in multi.stdout
    assert (run / "logs" / "process_0.log").is_file() and (run / "logs" / "process_1.log").is_file()
    got = _losses(run)
    np.testing.assert_allclose(
        [got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5
    )

    # 2 processes x 2 devices (fsdp=4) -> 1 device (this process's), from step 2
    _drop_checkpoints_after(run, 2)
    one = cli_in_process([*common, f"--workdir={run}", "--config.mesh.fsdp=1"])
    assert one.returncode == 0, one.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / '2'}" in one.stdout
    assert "'data': 1, 'fsdp': 1" in one.stdout

    # 1 device -> 2 devices (data=2), from step 4 (written by the 1-device run)
    _drop_checkpoints_after(run, 4)
    two = run_cli([*common, f"--workdir={run}", "--config.mesh.data=2"], devices=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / '4'}" in two.stdout
    assert "'data': 2, 'fsdp': 1" in two.stdout

    got = _losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [got[s] for s in range(1, 7)], [want[s] for s in range(1, 7)], rtol=1e-5
    )


# ------------------------------------------------------------------ evaluation


def test_eval_sharded_over_two_processes_equals_one(tmp_path):
    workdir = tmp_path / "run"
    r = cli_in_process(
        ["train", f"--config={TINY}", f"--workdir={workdir}", "--config.train.steps=2"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    # batch 6 over 2 processes: 3 rows each, the last batch padded (the split is not a
    # multiple of 6), so both processes run the same number of steps.
    for extra in ([], ["--config.eval.stride=16"]):
        args = [
            "eval",
            f"--workdir={workdir}",
            "--config.eval.max_batches=0",
            "--config.eval.batch_size=6",
            *extra,
        ]
        one = cli_in_process(args)  # 1 device, as this process has
        two = _launch(args, 2, 1)
        assert one.returncode == 0, one.stderr[-3000:]
        assert two.returncode == 0, two.stderr[-3000:]
        a = json.loads(one.stdout.strip().splitlines()[-1])
        b = json.loads(two.stdout.strip().splitlines()[-1])
        assert a["tokens"] == b["tokens"]
        assert a.get("windows", a["tokens"] // 31) % 6 != 0  # a padded last batch
        for key in ("loss", "exact_loss") if extra else ("loss",):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6)


# ------------------------------------------------------------------ auto-detection

_SLURM = {
    "SLURM_JOB_ID": "42",
    "SLURM_STEP_NODELIST": "node[1-2]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}
_CLUSTER_VARS = ("OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS")


@pytest.fixture
def record_initialize(monkeypatch):
    calls = []
    monkeypatch.setattr(sharding.jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    for var in (*_CLUSTER_VARS, *_SLURM, "SLURM_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _dist(**kw) -> ml_collections.ConfigDict:
    d = config_lib.base_config().distributed
    d.update(kw)
    return d


def test_no_cluster_no_flags_stays_one_process(record_initialize):
    assert sharding.detected_cluster() is None
    assert sharding.maybe_initialize_distributed(_dist()) is None
    assert record_initialize == []


def test_slurm_is_detected_and_jax_reads_it(monkeypatch, record_initialize):
    for k, v in _SLURM.items():
        monkeypatch.setenv(k, v)
    assert sharding.maybe_initialize_distributed(_dist()) == "SlurmCluster"
    assert record_initialize == [{}]  # no arguments: jax.distributed reads SLURM's variables


def test_flags_override_a_detected_cluster(monkeypatch, record_initialize):
    for k, v in _SLURM.items():
        monkeypatch.setenv(k, v)
    how = sharding.maybe_initialize_distributed(
        _dist(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)
    )
    assert how == "flags"
    assert record_initialize == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    ]


def test_coordinator_address_alone_is_a_clear_error(monkeypatch, record_initialize):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(config_lib.ConfigError, match="distributed.num_processes"):
        sharding.maybe_initialize_distributed(_dist())
    assert record_initialize == []

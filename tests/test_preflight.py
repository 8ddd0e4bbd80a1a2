"""Memory preflight: figures from XLA's analysis, the budget, the refusal, one compile."""

import logging
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt2_jax.config import base as config_lib
from gpt2_jax.config import plan as plan_lib
from gpt2_jax.train import loop as train_lib
from gpt2_jax.train import preflight
from gpt2_jax.train import step as step_lib

from .helpers import ROOT, cli_in_process, tiny_config

GiB = 1024**3


# ------------------------------------------------------------------ pure pieces


def test_meminfo_available_reads_kilobytes():
    text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   17000000 kB\n"
    assert preflight.meminfo_available(text) == 17000000 * 1024
    assert preflight.meminfo_available("MemTotal: 1 kB\n") is None


def test_device_bytes_counts_one_shard_per_device():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    tree = {
        "a": jax.ShapeDtypeStruct((4, 6), np.float32, sharding=NamedSharding(mesh, P())),
        "b": jax.ShapeDtypeStruct((3,), np.int32),
    }
    assert preflight.device_bytes(tree) == 4 * 6 * 4 + 3 * 4


def test_estimate_peak_subtracts_the_donated_alias():
    stats = types.SimpleNamespace(
        argument_size_in_bytes=10 * GiB,
        output_size_in_bytes=10 * GiB,
        alias_size_in_bytes=9 * GiB,
        temp_size_in_bytes=5 * GiB,
    )
    state = {
        "params": jax.ShapeDtypeStruct((GiB // 4,), np.float32),
        "opt_state": jax.ShapeDtypeStruct((GiB // 2,), np.float32),
    }
    batch = jax.ShapeDtypeStruct((2, 8), np.int32)
    est = preflight.estimate(stats, state, batch)
    assert (est.params, est.opt_state, est.batch, est.temp) == (GiB, 2 * GiB, 64, 5 * GiB)
    assert est.peak == 16 * GiB


def test_budget_is_the_accelerators_limit_or_a_share_of_available_ram():
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": 40 * GiB})
    assert preflight.device_budget(gpu, 8) == (40 * GiB, "gpu bytes_limit")
    cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
    one, _ = preflight.device_budget(cpu, 1)
    four, source = preflight.device_budget(cpu, 4)
    assert one > 0 and abs(four - one // 4) < one // 8  # MemAvailable moves a little
    assert "MemAvailable" in source and "4 CPU devices on this host" in source
    odd = types.SimpleNamespace(platform="metal", memory_stats=lambda: None)
    assert preflight.device_budget(odd, 1) == (None, "unknown")


def test_refusal_names_the_figures_and_what_to_change(tmp_path):
    est = preflight.MemoryEstimate(
        params=GiB, opt_state=2 * GiB, batch=0, temp=30 * GiB, peak=33 * GiB
    )
    plan = plan_lib.training(tiny_config(), tmp_path / "a", 1)
    preflight.check_fits(est, 40 * GiB, "test", plan)  # fits: nothing happens
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_fits(est, 16 * GiB, "test budget", plan)
    msg = str(e.value)
    assert "33.00 GiB" in msg and "16.00 GiB" in msg and "test budget" in msg
    for key in ("model.remat", "optim.accumulation_steps", "mesh.fsdp", "train.batch_size"):
        assert key in msg
    assert isinstance(e.value, config_lib.ConfigError)  # the CLI's one-line exit 2
    remat = plan_lib.training(tiny_config(**{"model.remat": True}), tmp_path / "b", 1)
    with pytest.raises(preflight.PreflightError) as e:
        preflight.check_fits(est, GiB, "test", remat)
    assert "model.remat" not in str(e.value)  # already on: not advised


# ------------------------------------------------------------------ in the run


def test_a_run_that_fits_compiles_the_step_once(tmp_path, capsys, caplog):
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        train_lib.train(tiny_config(**{"train.steps": 2}), tmp_path)
    assert "preflight: predicted peak" in capsys.readouterr().err
    compiles = [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert len([r for r in compiles if "train_step" in r.getMessage()]) == 1, [
        r.getMessage() for r in compiles
    ]


def test_a_run_that_does_not_fit_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "device_budget", lambda device, n: (1024, "a test budget"))
    with pytest.raises(preflight.PreflightError, match="a test budget"):
        train_lib.train(tiny_config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # the key that skips the check
    cfg = tiny_config(**{"train.preflight": False})
    plan = plan_lib.with_data(plan_lib.training(cfg, tmp_path / "run", jax.device_count()), 6)
    step = step_lib.build_step(plan)
    assert step.compiled is not None
    skipped = preflight.check_step(step.compiled, step.abstract_state, step.abstract_batch, plan)
    assert skipped is None


def _mem_available() -> int:
    text = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    return preflight.meminfo_available(text) or 0


@pytest.mark.skipif(
    _mem_available() > 150 * GiB, reason="the oversized run (~190 GiB) would fit this machine"
)
def test_oversized_124m_run_is_refused_before_anything_is_written(tmp_path):
    workdir = tmp_path / "run"
    r = cli_in_process(
        [
            "train",
            f"--config={ROOT / 'configs' / 'quickstart.py'}",
            f"--workdir={workdir}",
            "--config.model.size=gpt2",
            "--config.model.n_layer=0",
            "--config.model.n_head=0",
            "--config.model.n_embd=0",
            "--config.model.n_positions=1024",
            "--config.model.remat=False",
            "--config.data.block_size=1024",
            "--config.train.batch_size=64",
        ]
    )
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("gpt2-jax train: error: memory preflight: predicted peak"), last
    assert "model.remat" in last and "per device" in last
    assert not workdir.exists()

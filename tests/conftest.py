import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    # Token caches and HF caches of one test never leak into another's (or the user's).
    cache = tmp_path_factory.getbasetemp() / "gpt2_jax_cache"
    monkeypatch.setenv("GPT2_JAX_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(args, devices: int = 1, timeout: int = 600, env_extra=None, cwd=ROOT):
    """Runs ``python -m gpt2_jax ARGS`` in a fresh process (device count set before jax)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "gpt2_jax", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

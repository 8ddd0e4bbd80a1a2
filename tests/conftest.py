import os
import shutil
import sys
import tempfile

import pytest

# ROOT and run_cli live in tests/helpers.py; re-exported for `from .conftest import ...`.
from .helpers import ROOT, isolation_env, run_cli, shared_data, train_shared  # noqa: F401

SHARED_DATA = shared_data()  # only for `slow` tests; see helpers.require_shared_file


# ---------------------------------------------------------------------- compilation cache
# Most of the suite's time is XLA compiling the same few tiny programs again, in this process
# and in every `python -m gpt2_jax` the tests start. One persistent cache for the session
# (a fresh directory: nothing from an earlier session or the user's cache is reused) lets
# each program compile once. Set as environment variables, so that the processes the tests
# start inherit it, and before the first jax array exists: one created earlier leaves the
# cache off for the process (jax #25768). The two thresholds are lowered because the tiny
# programs compile in well under jax's default 1 s and would never be cached (jax #21908).
# A cached executable is the same XLA binary, so results stay bit-identical (test_train.py
# checks a run's losses with the cache cold and warm).
COMPILATION_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
}
_CACHE_DIR = pytest.StashKey[str]()


def pytest_configure(config):
    cache_dir = tempfile.mkdtemp(prefix="gpt2_jax_test_xla_cache_")
    config.stash[_CACHE_DIR] = cache_dir
    os.environ.update(COMPILATION_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=cache_dir)
    if "jax" in sys.modules:  # imported by a plugin: the variables were read already
        import jax

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    if _CACHE_DIR in config.stash:
        shutil.rmtree(config.stash[_CACHE_DIR], ignore_errors=True)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    # Token caches and HF caches of the tests never leak into the user's.
    for key, value in isolation_env(tmp_path_factory.getbasetemp()).items():
        monkeypatch.setenv(key, value)


# ---------------------------------------------------------------------- shared runs
# Runs several files train alike, trained once a session (each ~15 s of a 2-core box).
# Read-only for the tests: one that resumes, corrupts or prunes works on helpers.copy_run.


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny config as it is: 6 steps, dropout 0, checkpoints at 3 and 6."""
    return train_shared(tmp_path_factory, "tiny_run")


@pytest.fixture(scope="session")
def tiny_dropout_run(tmp_path_factory):
    """The tiny config with dropout 0.1 (a resume must replay the dropout rng too)."""
    return train_shared(tmp_path_factory, "tiny_dropout_run", **{"model.dropout": 0.1})


@pytest.fixture(scope="module")
def torch_one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- no silent skips
# A skipped test checked nothing, and a run with 50 skips looks as green as one without:
# here every skip (pytest.skip, importorskip, a skipped module) is a failure that says why.
# GPT2_JAX_ALLOW_SKIPS=1 turns this off (e.g. to run one file without the test extras).


def _skips_allowed() -> bool:
    return os.environ.get("GPT2_JAX_ALLOW_SKIPS", "") not in ("", "0")


def _skip_to_failure(report) -> None:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = (
        f"skipped ({reason}), and this suite treats a skip as a failure "
        "(GPT2_JAX_ALLOW_SKIPS=1 allows skips)"
    )


# The one skip that stays a skip: a `gpu` test where jax sees no GPU (tests/test_gpu.py's
# NO_GPU reason). `make test` deselects those tests (-m "not gpu"); a `pytest -m gpu` on a
# machine without one lists them as skipped, with the reason, under -rs.
NO_GPU = "needs a GPU: jax sees none"


def _is_no_gpu_skip(item, report) -> bool:
    reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    return item.get_closest_marker("gpu") is not None and NO_GPU in str(reason)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and not _skips_allowed():
        if not _is_no_gpu_skip(item, report):
            _skip_to_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not _skips_allowed():
        _skip_to_failure(report)

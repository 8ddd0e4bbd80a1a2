import os

import pytest

# ROOT and run_cli live in tests/helpers.py; re-exported for `from .conftest import ...`.
from .helpers import ROOT, run_cli, shared_data  # noqa: F401

SHARED_DATA = shared_data()  # only for `slow` tests; see helpers.require_shared_file


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

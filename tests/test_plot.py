"""`gpt2-jax plot`: two tiny runs -> one valid PNG; a workdir without metrics -> exit 2."""

import json

import matplotlib.image
import numpy as np
import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.cli import plot
from gpt2_jax.train import loop as train_lib

from .helpers import copy_run, isolated, tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_run):
    """Two tiny real runs (different seeds and lengths), each with train and eval lines:
    4 steps of seed 1, and a copy of the session's 6 steps of seed 0 (plot writes into it)."""
    root = tmp_path_factory.mktemp("runs")
    overrides = {"train.seed": 1, "train.steps": 4, "train.checkpoint_every": 0}
    with isolated(tmp_path_factory.getbasetemp()):
        train_lib.train(tiny_config(**overrides), root / "run_a")
    return root / "run_a", copy_run(tiny_run, root / "run_b")


def test_two_runs_give_one_valid_png(two_runs, tmp_path, capsys):
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(two_runs[0]), f"--workdir={two_runs[1]}", f"--out={out}"]) == 0
    assert capsys.readouterr().out.strip() == str(out)  # prints the path, nothing else
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 10_000
    image = matplotlib.image.imread(out)
    assert image.shape == (800, 1200, 4)  # figsize (12, 8) at 100 dpi, RGBA
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_one_run_defaults_to_its_workdir(two_runs, capsys):
    assert cli.main(["plot", str(two_runs[1])]) == 0
    out = two_runs[1] / "curves.png"
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_bytes()[:8] == PNG_SIGNATURE


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "metrics.jsonl: no such file"),
        ("", "metrics.jsonl: no metrics in the file"),
        (
            '{"step": 1, "split": "train", "loss": 3.0}\n{"step": 2, "spl',
            "metrics.jsonl:2: not a JSON",
        ),
    ],
)
def test_workdir_without_metrics_is_exit_2_naming_the_path(
    two_runs, tmp_path, capsys, content, message
):
    bad = tmp_path / "not_a_run"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.jsonl").write_text(content)
    out = tmp_path / "never.png"
    assert cli.main(["plot", str(two_runs[0]), str(bad), f"--out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2-jax plot: error: ") and "\n" not in err
    assert str(bad / "metrics.jsonl") in err and message in err
    assert not out.exists()  # every workdir is read before anything is drawn


def test_bad_out_and_missing_workdir_are_user_errors(two_runs, tmp_path, capsys):
    for argv, message in (
        (["plot", str(two_runs[0]), f"--out={tmp_path / 'x.jpg'}"], "must end in .png"),
        (["plot", str(two_runs[0]), f"--out={tmp_path / 'no' / 'x.png'}"], "does not exist"),
        (["plot", str(tmp_path / "nowhere")], "no such run directory"),
        (["plot"], "give at least one WORKDIR"),
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "gpt2-jax plot: error:" in err and message in err, err


def test_series_sorts_and_keeps_the_last_value_of_a_relogged_step():
    records = [
        {"step": 2, "split": "train", "loss": 5.0},
        {"step": 1, "split": "train", "loss": 6.0},
        {"step": 2, "split": "train", "loss": 4.0},  # a resumed run logs step 2 again
        {"step": 2, "split": "validation", "loss": 9.0},
    ]
    steps, loss = plot.series(records, "train", "loss")
    assert steps.tolist() == [1, 2]
    np.testing.assert_allclose(loss, [6.0, 4.0], rtol=0, atol=0)


def test_ema_is_debiased_and_zero_smoothing_is_identity():
    v = np.array([10.0, 8.0, 6.0])
    np.testing.assert_allclose(plot.ema(v, 0.0), v, rtol=1e-12, atol=0)
    smoothed = plot.ema(v, 0.5)
    np.testing.assert_allclose(smoothed[0], 10.0, rtol=1e-12, atol=0)  # not pulled to 0
    # (0.25*10 + 0.5*8) / 0.75 and (0.125*10 + 0.25*8 + 0.5*6) / 0.875
    np.testing.assert_allclose(smoothed[1:], [6.5 / 0.75, 6.25 / 0.875], rtol=1e-12, atol=0)


def test_labels_are_workdir_names_unless_they_repeat():
    assert plot.run_labels(["runs/a", "runs/b"]) == ["a", "b"]
    assert plot.run_labels(["x/run", "y/run"]) == ["x/run", "y/run"]


def test_metrics_lines_are_what_train_writes(two_runs):
    lines = [json.loads(x) for x in (two_runs[1] / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "validation"} == {r["split"] for r in lines}

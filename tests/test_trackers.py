"""train.report_to: TensorBoard, W&B (the real package, offline), none; bad values."""

from __future__ import annotations

import json
import sys

import pytest

from gpt2_jax.core import workdir as wd
from gpt2_jax.train import trackers

from . import helpers


def _train(workdir, *extra, env=None):
    return helpers.run_cli(
        ["train", f"--config={helpers.TINY}", f"--workdir={workdir}", *extra],
        env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})},
    )


def _runs(workdir) -> list:
    return sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_wandb_offline_holds_the_train_losses_and_a_resume_continues_the_run(tmp_path):
    workdir = tmp_path / "run"
    flags = ["--config.train.report_to=tensorboard,wandb", "--config.train.wandb.tags=a,b"]
    r = _train(workdir, *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    run_id = (workdir / wd.WANDB_RUN_ID).read_text().strip()
    (first,) = _runs(workdir)
    assert first.name == f"run-{run_id}.wandb"
    history = helpers.wandb_history(first)
    logged = {h["_step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert logged == helpers.train_losses(workdir) and len(logged) == 6
    assert any("validation/loss" in h for h in history)
    runs = [x.run for x in helpers.wandb_records(first) if x.WhichOneof("record_type") == "run"]
    assert runs[0].run_id == run_id and list(runs[0].tags) == ["a", "b"]
    assert runs[0].display_name == "run"  # the workdir's name
    config = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert config["train"]["steps"] == 6 and config["model"]["n_layer"] == 1
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    # Resume to step 9: the same W&B run id, and its new steps logged.
    r = _train(workdir, *flags, "--config.train.steps=9")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (workdir / wd.WANDB_RUN_ID).read_text().strip() == run_id
    second = [p for p in _runs(workdir) if p != first]
    assert len(second) == 1 and second[0].name == f"run-{run_id}.wandb"
    resumed = {h["_step"]: h["train/loss"] for h in helpers.wandb_history(second[0])
               if "train/loss" in h}  # fmt: skip
    assert sorted(resumed) == [7, 8, 9]
    assert resumed == {s: v for s, v in helpers.train_losses(workdir).items() if s > 6}


def test_report_to_none_writes_only_metrics_jsonl(tmp_path):
    workdir = tmp_path / "run"
    r = helpers.cli_in_process(
        [
            "train",
            f"--config={helpers.TINY}",
            f"--workdir={workdir}",
            "--config.train.report_to=none",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (workdir / "metrics.jsonl").is_file()
    assert not (workdir / "tensorboard").exists() and not (workdir / "wandb").exists()


def test_without_wandb_installed_one_line_before_anything_compiles(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    argv = ["train", f"--config={helpers.TINY}", f"--workdir={workdir}"]
    r = helpers.cli_in_process([*argv, "--config.train.report_to=wandb"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "gpt2-jax train: error: train.report_to has wandb, but the wandb package is not "
        "installed: pip install 'gpt2_jax[wandb]'"
    )
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
    assert "preflight" not in r.stderr  # refused before the step compiled


@pytest.mark.parametrize(
    "value, needle",
    [
        (("tensorbord",), "'tensorbord' is not one of tensorboard, wandb, none"),
        (("none", "wandb"), "'none' cannot be combined"),
    ],
)
def test_bad_report_to(value, needle):
    with pytest.raises(trackers.TrackerError, match=needle):
        trackers.check_names(value)
    assert trackers.check_names(("none",)) == ()
    assert trackers.check_names(("tensorboard", "wandb")) == ("tensorboard", "wandb")

"""Faults that must lose nothing: corrupt checkpoints, write errors, Ctrl-C, non-finite
steps; and the checkpoint kept for its eval loss (train.keep_best)."""

import json
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.train import loop as train_lib
from gpt2_jax.train import monitor
from gpt2_jax.weights import checkpoint as ckpt_lib

from . import helpers
from .conftest import ROOT
from .helpers import TINY, snapshot, tiny_config, train_losses

pytestmark = pytest.mark.filterwarnings("ignore:Sharding info not provided when restoring")


def checkpoint(workdir, step):
    return ckpt_lib.Checkpointer(workdir / "checkpoints", read_only=True).restore(step)


def error_line(capsys, command="train") -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"gpt2-jax {command}: error: "), err[-5:]
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ---------------------------------------------------------------------- corrupt checkpoint


def test_truncated_newest_step_is_named_then_resume_step_reproduces_the_run(
    tiny_run, tmp_path, capsys
):
    full = tiny_run.workdir  # checkpoints at 3 and 6
    work = helpers.copy_run(tiny_run, tmp_path / "broken")
    biggest = max((work / "checkpoints" / "6").rglob("d/*"), key=lambda p: p.stat().st_size)
    with biggest.open("r+b") as f:
        f.truncate(100)
    before = snapshot(work)

    assert cli.main(["train", f"--config={TINY}", f"--workdir={work}"]) == 2
    line = error_line(capsys)
    assert "checkpoint step 6" in line and str(work / "checkpoints" / "6") in line
    assert "--config.train.resume_step=3" in line and len(line) < 600, line
    assert snapshot(work) == before  # nothing deleted, nothing rewritten

    train_lib.train(tiny_config(**{"train.resume_step": 3}), work)
    assert train_losses(work) == train_losses(full)  # bitwise: same device count
    jax.tree.map(np.testing.assert_array_equal, checkpoint(work, 6), checkpoint(full, 6))
    (aside,) = (work / "checkpoints").glob("6.superseded-*")
    assert (aside / biggest.relative_to(work / "checkpoints" / "6")).stat().st_size == 100


def test_resume_step_that_was_never_saved_is_an_error(tiny_run, tmp_path, capsys):
    work = helpers.copy_run(tiny_run, tmp_path / "run")
    argv = ["train", f"--config={TINY}", f"--workdir={work}", "--config.train.resume_step=4"]
    assert cli.main(argv) == 2
    line = error_line(capsys)
    assert "step 4 is not saved" in line and "[3, 6]" in line


# ---------------------------------------------------------------------- config fixes


def test_quickstart_5_steps_with_longer_warmup_trains_with_a_warning(tmp_path, capsys):
    argv = ["train", f"--config={ROOT / 'configs' / 'quickstart.py'}", f"--workdir={tmp_path}"]
    argv += ["--config.train.steps=5", "--config.train.progress=false"]
    argv += ["--config.eval.max_batches=1"]  # the warning is the point, not a whole eval
    assert cli.main(argv) == 0
    assert "warning: optim.warmup_steps=20 exceeds train.steps=5" in capsys.readouterr().err
    assert sorted(train_losses(tmp_path))[-1] == 5


def test_eval_stride_longer_than_block_is_refused_before_anything_is_written(tmp_path, capsys):
    argv = ["train", f"--config={TINY}", f"--workdir={tmp_path / 'run'}", "--config.eval.stride=33"]
    assert cli.main(argv) == 2
    assert "eval.stride=33 must be <= data.block_size=32" in error_line(capsys)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- non-finite steps


def test_nonfinite_stop_names_the_step_and_saves_nothing_after_it(tmp_path, monkeypatch, capsys):
    helpers.poison_step(monkeypatch, 5)
    argv = ["train", f"--config={TINY}", f"--workdir={tmp_path}", "--config.train.log_every=6"]
    assert cli.main(argv) == 2
    assert "gradient norm is nan at step 5" in error_line(capsys)
    assert ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [3]


def test_nonfinite_skip_leaves_the_state_bit_identical_and_counts_it(tmp_path, monkeypatch):
    helpers.poison_step(monkeypatch, 4)
    cfg = tiny_config(
        **{"train.nonfinite": "skip", "train.checkpoint_every": 1, "train.keep_checkpoints": 0}
    )
    train_lib.train(cfg, tmp_path)
    s3, s4, s5 = (checkpoint(tmp_path, s) for s in (3, 4, 5))
    jax.tree.map(np.testing.assert_array_equal, s4["params"], s3["params"])
    jax.tree.map(np.testing.assert_array_equal, s4["opt_state"], s3["opt_state"])
    assert not np.array_equal(s5["params"]["wte"]["embedding"], s4["params"]["wte"]["embedding"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    count = {r["step"]: r["nonfinite"] for r in lines if r["split"] == "train"}
    assert count == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 0}


def test_nonfinite_skip_stops_after_max_in_a_row(tmp_path, monkeypatch):
    helpers.poison_step(monkeypatch, 2)
    cfg = tiny_config(**{"train.nonfinite": "skip", "train.max_nonfinite": 1})
    with pytest.raises(monitor.TrainingError, match="1 non-finite steps in a row .* step 2"):
        train_lib.train(cfg, tmp_path)


# ---------------------------------------------------------------------- keep the best


def test_keep_best_survives_keep_n_pruning(tmp_path):
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2, keep_best=True)
    for step, loss in zip(range(1, 7), [3.0, 1.0, 2.0, 4.0, None, 5.0], strict=True):
        ckpt.save(step, {"x": jnp.full((2,), step)}, {}, eval_loss=loss)
        ckpt.wait()
    assert ckpt.all_steps() == [2, 5, 6] and ckpt.best_step() == 2
    ckpt.close()
    plain = ckpt_lib.Checkpointer(tmp_path / "plain", max_to_keep=2)
    for step in range(1, 4):
        plain.save(step, {"x": jnp.zeros(2)}, {}, eval_loss=float(-step))
    plain.close()
    assert ckpt_lib.Checkpointer(tmp_path / "plain", read_only=True).all_steps() == [2, 3]


def test_eval_step_best_uses_the_lowest_eval_loss(tmp_path, capsys):
    cfg = tiny_config(
        **{
            "train.keep_best": True,
            "train.eval_every": 2,
            "train.checkpoint_every": 0,
            "train.keep_checkpoints": 1,
            "optim.learning_rate": 0.3,  # a loss that goes up and down
        }
    )
    train_lib.train(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["loss"] for r in lines if r["split"] == "validation"}
    best = min(evals, key=evals.get)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.best_step() == best and set(ckpt.all_steps()) == {best, 6}
    capsys.readouterr()
    assert cli.main(["eval", f"--workdir={tmp_path}", "--step=best"]) == 0
    out = capsys.readouterr()
    assert f"checkpoints/{best}" in out.err
    np.testing.assert_allclose(json.loads(out.out.splitlines()[-1])["loss"], evals[best], rtol=1e-6)


# ---------------------------------------------------------------------- write error, Ctrl-C


def test_a_checkpoint_write_error_ends_the_run_naming_the_path(tmp_path, monkeypatch):
    ckpts = tmp_path / "checkpoints"
    original = train_lib.MetricLogger.write

    def write(self, record):
        original(self, record)
        if record["split"] == "train" and record["step"] == 5:
            deadline = time.time() + 120
            while not (ckpts / "3").is_dir() and time.time() < deadline:  # step 3 finalized
                time.sleep(0.05)
            ckpts.rename(tmp_path / "moved")
            ckpts.write_text("not a directory")  # what a read-only or full disk looks like

    monkeypatch.setattr(train_lib.MetricLogger, "write", write)
    with pytest.raises(ckpt_lib.CheckpointError, match=f"saving .* to {ckpts} failed"):
        train_lib.train(tiny_config(), tmp_path)
    kept = ckpt_lib.Checkpointer(tmp_path / "moved", read_only=True)
    assert kept.all_steps() == [3] and int(kept.restore(3)["step"]) == 3


def test_ctrl_c_saves_the_current_step_exits_130_and_resumes(tmp_path):
    args = [sys.executable, "-m", "gpt2_jax", "train", f"--config={TINY}", f"--workdir={tmp_path}"]
    args += ["--config.train.steps=40", "--config.train.checkpoint_every=0"]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        if (tmp_path / "metrics.jsonl").exists() and len(train_losses(tmp_path)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    saved = ckpt_lib.Checkpointer(tmp_path / "checkpoints", read_only=True).latest_step()
    assert saved is not None and 3 <= saved < 40 and f"SIGINT: saved step {saved}" in out + err
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {tmp_path / 'checkpoints' / str(saved)}" in resumed.stdout + resumed.stderr
    )
    assert sorted(train_losses(tmp_path)) == list(range(1, 41))

"""gpt2-jax launch: flag parsing, per-process argv/env, and a process killed mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2_jax.cli import main as cli
from gpt2_jax.parallel import launch

from .conftest import ROOT, run_cli
from .helpers import TINY

# ------------------------------------------------------------------ pure helpers


def test_parse_args_splits_launcher_flags_from_the_command():
    args, command = launch.parse_launch_args(
        ["--processes=3", "--devices_per_process=2", "--", "train", "--workdir", "w"]
    )
    assert (args.processes, args.devices_per_process, args.port) == (3, 2, 0)
    assert command == ["train", "--workdir", "w"]
    assert launch.workdir_of(command) == "w"
    assert launch.workdir_of(["eval", "--workdir=/a/b"]) == "/a/b"
    assert launch.workdir_of(["eval", "--config=x.py"]) is None


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--processes=2", "train"], "'--'"),
        (["--processes=0", "--", "train"], "--processes=0"),
        (["--devices_per_process=0", "--", "train"], "--devices_per_process=0"),
        (["--processes=2", "--", "generate"], "train or eval"),
        (["--", "train", "--config.distributed.process_id=1"], "--config.distributed"),
        (["--bogus=1", "--", "train"], "--bogus"),
        (["--processes=two", "--", "train"], "two"),
    ],
)
def test_bad_launch_flags_are_one_line_exit_2(argv, needle, capsys):
    assert cli.main(["launch", *argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2-jax launch: error:"), err
    assert needle in lines[0]


def test_launch_is_a_command_of_the_cli():
    r = run_cli(["launch", "--processes=0", "--", "train"])
    assert r.returncode == 2 and "gpt2-jax launch: error: --processes=0" in r.stderr


def test_process_argv_and_env():
    argv = launch.process_argv(["eval", "--workdir=w"], 1, 4, 1234)
    assert argv[1:4] == ["-m", "gpt2_jax", "eval"]
    assert "--config.distributed.coordinator_address=127.0.0.1:1234" in argv
    assert "--config.distributed.num_processes=4" in argv
    assert "--config.distributed.process_id=1" in argv
    assert "--config.distributed.cpu_collectives=gloo" in argv
    env = launch.process_env(
        {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1", "A": "b"}, 2
    )
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    assert env["A"] == "b"
    assert launch.exit_code(-9) == 137 and launch.exit_code(3) == 3


# ------------------------------------------------------------------ a killed process


def _pids_with(marker: str) -> list[int]:
    """Live processes whose command line mentions ``marker`` (the test's own workdir)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if marker in cmdline and state != "Z":
            pids.append(int(d.name))
    return pids


def _train_steps(workdir: Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return [r["step"] for r in rows if r["split"] == "train"]


def _checkpoints(workdir: Path) -> list[int]:
    d = workdir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _wait_for_checkpoint_after(proc, workdir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not [s for s in _checkpoints(workdir) if s > step]:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no checkpoint after step {step} in {timeout} s"
        time.sleep(0.3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PDEATHSIG")
def test_sigterm_saves_sigkill_stops_all_and_the_same_command_resumes(tmp_path):
    """SIGTERM to the launcher: every process saves the same step, exit 143. SIGKILL of one
    process: the launcher stops the other and exits non-zero within 60 s, nothing is left
    running. Each time the same command resumes, and the run ends complete."""
    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "gpt2_jax",
        "launch",
        "--processes=2",
        "--devices_per_process=1",
        "--",
        "train",
        f"--config={TINY}",
        f"--workdir={workdir}",
        "--config.train.steps=60",
        "--config.train.checkpoint_every=5",
        "--config.train.log_every=5",
    ]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def start():
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    # ---- SIGTERM to the launcher: forwarded, every process saves one agreed step
    proc = start()
    try:
        _wait_for_checkpoint_after(proc, workdir, 0)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    saved = max(_checkpoints(workdir))
    assert f"SIGTERM: saved step {saved} " in out, out[-3000:]
    assert _pids_with(str(workdir)) == []

    # ---- the same command resumes; SIGKILL one process after its next checkpoint
    proc = start()
    try:
        _wait_for_checkpoint_after(proc, workdir, saved)
        victim = [
            p
            for p in _pids_with(str(workdir))
            if p != proc.pid
            and "process_id=1" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
        ]
        assert len(victim) == 1
        killed_at = time.monotonic()
        os.kill(victim[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
        assert time.monotonic() - killed_at < 60
    finally:
        if proc.poll() is None:
            proc.kill()
    assert f"resumed from {workdir / 'checkpoints' / str(saved)}" in out
    assert proc.returncode != 0
    assert "exited with code" in err, err[-3000:]
    assert _pids_with(str(workdir)) == []  # no orphan left behind
    last = max(_checkpoints(workdir))
    assert saved < last < 60

    # ---- and once more: it resumes from the last checkpoint and finishes
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints' / str(last)}" in again.stdout
    assert _train_steps(workdir) == list(range(5, 61, 5))
    assert (workdir / "logs" / "process_1.log").stat().st_size > 0

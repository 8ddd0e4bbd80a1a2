"""``gpt2-jax launch``: N local processes of one gpt2-jax command on ``jax.distributed``.

    gpt2-jax launch --processes=2 --devices_per_process=2 -- train --config=... --workdir=DIR

For tests and for users without a cluster (on a cluster, SLURM / Open MPI / a TPU pod /
Kubernetes start the processes and ``jax.distributed`` detects them by itself). Each
process gets the coordinator address (a free local port), its process id, a CPU device
count and gloo collectives; it logs to ``WORKDIR/logs/process_<i>.log``, and process 0's
output is also shown here. When one process fails the others are stopped and the launcher
exits with that process's code; SIGTERM / SIGINT are forwarded as SIGTERM, so every process
saves and the same command resumes. Modelled on JAX's ``jax/_src/test_multiprocess.py``
(free port, one log per worker) and MaxText's ``multihost_runner.py`` (stop all on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gpt2_jax.errors import UserError, signal_exit_code

GRACE_SECONDS = 10.0  # after a failure: SIGTERM, then SIGKILL the survivors after this
POLL_SECONDS = 0.2
PREEMPTED = signal_exit_code(signal.SIGTERM)  # train's exit code after saving on SIGTERM
PREEMPT_GRACE_SECONDS = 300.0  # for the others to reach the same step and save


class LaunchError(UserError, ValueError):
    """Bad launcher flags (reported as one line, exit 2)."""


# ------------------------------------------------------------------ pure helpers


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through the CLI's user-error path, not usage + exit
        raise LaunchError(message)


def parse_launch_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """``[--processes=N --devices_per_process=M --port=P] -- CMD ...`` -> (flags, CMD argv)."""
    p = _Parser(
        prog="gpt2-jax launch",
        description=(
            "Run one gpt2-jax command as N local processes on jax.distributed; each logs to "
            "WORKDIR/logs/process_<i>.log, and when one fails the others are stopped.\n\n"
            "gpt2-jax launch --processes=N --devices_per_process=M [--port=P] -- "
            "train|eval|lm-eval ..."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--processes", type=int, default=2, help="local processes to start")
    p.add_argument("--devices_per_process", type=int, default=1, help="CPU devices each")
    p.add_argument("--port", type=int, default=0, help="coordinator port (0: a free one)")
    p.add_argument("--log_dir", default="", help="default: WORKDIR/logs")
    if "--" not in argv:
        p.parse_known_args(argv)  # --help prints and exits; a bad value is reported first
        raise LaunchError("give the command after '--', e.g. launch --processes=2 -- train ...")
    cut = argv.index("--")
    args = p.parse_args(argv[:cut])
    command = argv[cut + 1 :]
    if args.processes < 1:
        raise LaunchError(f"--processes={args.processes}: must be >= 1")
    if args.devices_per_process < 1:
        raise LaunchError(f"--devices_per_process={args.devices_per_process}: must be >= 1")
    if not 0 <= args.port < 65536:
        raise LaunchError(f"--port={args.port}: must be in [0, 65535]")
    if not command or command[0] not in ("train", "eval", "lm-eval"):
        raise LaunchError(
            "the command after '--' must be train or eval (or lm-eval), got "
            f"{' '.join(command) or 'nothing'}"
        )
    if any(a.startswith("--config.distributed.") for a in command):
        # The launcher owns these; a second value would silently win or conflict.
        raise LaunchError("do not pass --config.distributed.* after '--': launch sets them")
    return args, command


def free_port() -> int:
    """A port free right now on 127.0.0.1 (the coordinator binds it moments later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def workdir_of(command: list[str]) -> str | None:
    """The ``--workdir`` value of a gpt2-jax command line (either spelling), else None."""
    for i, a in enumerate(command):
        if a.startswith("--workdir="):
            return a.split("=", 1)[1]
        if a == "--workdir" and i + 1 < len(command):
            return command[i + 1]
    return None


def process_argv(command: list[str], i: int, n: int, port: int) -> list[str]:
    """The full argv of process ``i`` of ``n``."""
    return [
        sys.executable,
        "-m",
        "gpt2_jax",
        *command,
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        f"--config.distributed.num_processes={n}",
        f"--config.distributed.process_id={i}",
        "--config.distributed.cpu_collectives=gloo",
    ]


def process_env(base: dict, devices: int) -> dict:
    """``base`` with the CPU device count set in XLA_FLAGS (other XLA flags kept)."""
    flags = [
        f
        for f in base.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    return {**base, "XLA_FLAGS": " ".join(flags), "PYTHONUNBUFFERED": "1"}


def exit_code(returncode: int) -> int:
    """A child's Popen returncode as a shell exit code (killed by signal S -> 128 + S)."""
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------ processes


def _libc():
    """libc loaded in the parent: the forked child must not import or dlopen anything."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


def _die_with_parent_fn():
    """A preexec_fn: on Linux the child gets SIGKILL when the launcher dies, even by SIGKILL
    (no orphans). None where prctl is unavailable."""
    libc = _libc() if sys.platform.startswith("linux") else None
    if libc is None:
        return None

    def preexec() -> None:  # pragma: no cover - runs in the child before exec
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    return preexec


def _tee(src, sinks: list, lock: threading.Lock) -> None:
    """Copies lines of ``src`` to every sink (process 0: its log and the terminal)."""
    for line in iter(src.readline, b""):
        with lock:
            for s in sinks:
                s.write(line)
                s.flush()
    src.close()


class _TextSink:
    """A bytes sink over a text stream without ``.buffer`` (e.g. a captured sys.stdout)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # start_new_session: pid == its process group id


class Launcher:
    """Starts the processes, watches them, stops them all; ``run()`` returns the exit code."""

    def __init__(self, command, processes, devices_per_process, port=0, log_dir=None):
        self.command, self.n, self.devices = command, processes, devices_per_process
        self.port = port or free_port()
        self.log_dir = Path(log_dir)
        self.procs: list[subprocess.Popen] = []
        self._files, self._threads = [], []
        self._stop_requested = 0  # signals received (a second one kills)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = process_env(dict(os.environ), self.devices)
        lock = threading.Lock()
        preexec = _die_with_parent_fn()
        for i in range(self.n):
            log = open(self.log_dir / f"process_{i}.log", "ab")  # closed in close()
            self._files.append(log)
            pipe = subprocess.PIPE if i == 0 else log
            proc = subprocess.Popen(
                process_argv(self.command, i, self.n, self.port),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=pipe,
                stderr=pipe,
                start_new_session=True,  # own process group: stopped as a whole
                preexec_fn=preexec,
            )
            self.procs.append(proc)
            if i == 0:  # stdout stays stdout and stderr stays stderr on the terminal
                for src, term in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                    sinks = [log, getattr(term, "buffer", None) or _TextSink(term)]
                    t = threading.Thread(target=_tee, args=(src, sinks, lock), daemon=True)
                    t.start()
                    self._threads.append(t)

    def _forward(self, signum, frame) -> None:
        self._stop_requested += 1
        sig = signal.SIGTERM if self._stop_requested == 1 else signal.SIGKILL
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, sig)

    def stop_all(self, grace: float = GRACE_SECONDS) -> None:
        """SIGTERM every live process group, SIGKILL what is left after ``grace`` seconds."""
        for p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(POLL_SECONDS)
        for p in self.procs:
            _signal_group(p, signal.SIGKILL)  # also any grandchildren left in the group
            p.wait()

    def wait(self) -> int:
        """Waits for all; on the first failure stops the rest. Returns the exit code.

        Exit 143 is a process that saved on SIGTERM (a preemption): the others reach the
        same step and save too, so they get PREEMPT_GRACE_SECONDS before being stopped.
        """
        preempt_deadline = None
        while True:
            codes = [p.poll() for p in self.procs]
            if preempt_deadline is None and PREEMPTED in codes:
                preempt_deadline = time.monotonic() + PREEMPT_GRACE_SECONDS
            in_grace = preempt_deadline is not None and time.monotonic() < preempt_deadline
            failed = [c for c in codes if c not in (None, 0) and not (c == PREEMPTED and in_grace)]
            if failed and not self._stop_requested:
                failed_id = codes.index(failed[0])
                print(
                    f"gpt2-jax launch: process {failed_id} exited with code "
                    f"{exit_code(failed[0])}; stopping the others "
                    f"(logs: {self.log_dir})",
                    file=sys.stderr,
                )
                self.stop_all()
                return exit_code(failed[0])
            if all(c is not None for c in codes):
                return max((exit_code(c) for c in codes), default=0)
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        for t in self._threads:
            t.join(timeout=5)
        for f in self._files:
            f.close()

    def run(self) -> int:
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            return self.wait()
        finally:
            if any(p.poll() is None for p in self.procs):  # an error in the launcher itself
                self.stop_all()
            for s, h in previous.items():
                signal.signal(s, h)
            self.close()


def launch(argv: list[str]) -> int:
    """Entry point of ``gpt2-jax launch`` (argv after the command name)."""
    args, command = parse_launch_args(argv)
    log_dir = args.log_dir
    if not log_dir:
        workdir = workdir_of(command)
        log_dir = (
            str(Path(workdir) / "logs") if workdir else tempfile.mkdtemp(prefix="gpt2_jax_launch_")
        )
    launcher = Launcher(command, args.processes, args.devices_per_process, args.port, log_dir)
    print(
        f"gpt2-jax launch: {args.processes} processes x {args.devices_per_process} devices, "
        f"coordinator 127.0.0.1:{launcher.port}, logs {Path(log_dir).absolute()}/process_<i>.log",
        file=sys.stderr,
    )
    return launcher.run()

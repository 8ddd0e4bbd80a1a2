"""The tasks of a harness run: lm-eval's TaskManager, the task names checked (known, their
data loadable) before any model loads, and the one-line error of a task that cannot run.

A command that names its tasks gets a TaskManager of only the lm-eval directories that
define them (task_scope.py; the same entries as the full index). What that costs, measured
back to back in fresh processes on this shared 2-core CPU, lm-eval 0.4.13,
``HF_HUB_OFFLINE=1`` (the data check then fails alike on both sides), for ``lambada_openai``
(the old ``task_manager()`` + ``check_tasks`` with its pickled index -> ``load_tasks``):
load average ~3: 8.3 s cold, 1.7-2.0 s warm -> 0.32-0.36 s (hellaswag 1.3 -> 0.25 s);
load average ~9: 18.0 s cold, 4.8 s warm -> 0.65-0.87 s (an unknown name 2.2 -> 0.74 s).
"""

from __future__ import annotations

import difflib
from pathlib import Path

from lm_eval.tasks import TaskManager

from gpt2_jax.evaluation.harness import task_scope
from gpt2_jax.evaluation.harness_args import HarnessError


def include_paths(include_path: str, flag: str = "--include_path") -> list[str]:
    """The comma-separated directories of ``include_path``, each checked to exist."""
    paths = [p.strip() for p in str(include_path or "").split(",") if p.strip()]
    for p in paths:
        if not Path(p).is_dir():
            raise HarnessError(f"{flag}={p}: no such directory")
    return paths


def task_manager(include_path: str = "", include_defaults: bool = True, flag="--include_path"):
    """lm-eval's full TaskManager: its own tasks (unless ``include_defaults=False``) and
    the task YAMLs under ``include_path`` (comma-separated directories)."""
    paths = include_paths(include_path, flag)
    return TaskManager(include_path=paths or None, include_defaults=include_defaults)


def task_names(tasks, flag: str = "--tasks") -> list[str]:
    """The names of ``tasks`` (comma-separated or a list); at least one."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise HarnessError(f"{flag}: give at least one task name (lm-eval ls tasks lists them)")
    return names


def load_tasks(
    tasks, include_path: str = "", *, flag: str = "--tasks", path_flag: str = "--include_path"
) -> tuple[list[str], TaskManager]:
    """(the task names, a TaskManager that loads them), checked as ``check_tasks`` does.
    The manager indexes only the directories that define the tasks when that gives the
    full index's entries; an unknown name is reported without the full index."""
    names = task_names(tasks, flag)
    scope = task_scope.Scope(include_paths(include_path, path_flag))
    manager = scope.manager_for(names)
    if manager is None:
        unknown = scope.unknown(names)
        if unknown is not None:
            raise HarnessError(_unknown(unknown, scope.hint_names(), flag))
        manager = TaskManager(include_path=scope.include_paths or None)
    return check_tasks(names, manager, flag), manager


def check_tasks(tasks, manager, flag: str = "--tasks") -> list[str]:
    """The task names of ``tasks`` (comma-separated or a list), each known to ``manager``
    and with its data loadable: a HarnessError names an unknown task (with the closest
    names) or a task whose dataset cannot be had (offline, say), before any model loads."""
    names = task_names(tasks, flag)
    known = manager.all_tasks
    for name in names:
        if name not in known and not manager.match_tasks([name]):
            raise HarnessError(_unknown(name, known, flag))
    for name in names:
        try:
            manager.load([name])
        except Exception as e:  # the task's data: the hub offline, a missing file, ...
            raise HarnessError(_data_error(name, manager, e)) from None
    return names


def _unknown(name: str, known: list[str], flag: str) -> str:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{flag}: unknown task {name!r}{hint}"


def _data_error(name: str, manager, exc: Exception) -> str:
    entry = manager.task_index.get(name)
    task_yaml = getattr(entry, "cfg", None) or {}  # the task's YAML, as lm-eval indexed it
    where = task_yaml.get("dataset_path", "?")
    if task_yaml.get("dataset_name"):
        where += f" ({task_yaml['dataset_name']})"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    hub = isinstance(exc, ConnectionError) or "Hub" in text or "offline" in text.lower()
    fix = (
        "it needs the Hugging Face hub, which cannot be reached (offline?); run it where the "
        "hub is reachable, or point --include_path at a task YAML that reads local files "
        "(dataset_path: json, dataset_kwargs: {data_files: ...})"
        if hub
        else "check the task's dataset_path / data_files"
    )
    return f"task {name!r}: its dataset {where} cannot be loaded ({text[:200]}); {fix}"

"""A TaskManager that indexes only the lm-eval task directories a command needs.

lm-eval's ``TaskManager()`` parses all of its own ~14,000 task YAMLs before it can load
one task (~9-13 s a command on this CPU; timings in tasks.py). A command that names its
tasks needs only the directories that define them, decided here with lm-eval's public
API alone:

1. A cheap text scan (no YAML parsing): the top-level directories of ``lm_eval/tasks``
   whose YAML files mention the name as a token, or include (transitively) a file that
   does. Every file that can define the name is among them.
2. Each such directory gets its own ``TaskManager(include_path=[dir],
   include_defaults=False)``; the directories whose index holds the name define it.
3. If one directory defines each name the command needs (the requested names, a group's
   members and a tag's tasks, followed to the end), that directory's entry is the one the
   full index holds (in one directory, files are read in the same order as in the full
   walk, and no other directory adds to or replaces the entry). The command's manager then
   indexes those directories, then ``--include_path`` (which wins, as in the full index).
4. Anything else (a glob, a name defined in two directories) gets lm-eval's full
   TaskManager. A name no file mentions is unknown for sure (``Scope.unknown``); its
   "did you mean" draws on the names the scan reads off the YAMLs (``hint_names``).

Nothing is cached between commands: a cache directory may be shared, and the index it
would hold names the Python files a task runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lm_eval.tasks import TaskManager

_INCLUDE = re.compile(r"""^[ \t]*(?:-[ \t]*)?["']?include["']?[ \t]*:[ \t]*(.*)$""", re.M)
_BLOCK_ITEMS = re.compile(r"(?:[ \t]*-[ \t]*\S.*(?:\n|$))+")  # "  - a.yaml" lines
# A top-level task/group/tag value (a scalar or a flow list): hints for unknown names.
_DEFINED = re.compile(r"""^(?:task|group|tag):[ \t]*([^\n#]*)""", re.M)
_ITEM = re.compile(r"^[ \t]*-[ \t]*(.+?)[ \t]*$", re.M)


def builtin_root() -> Path:
    """lm-eval's own task directory (the one ``TaskManager`` indexes by default)."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


class Scope:
    """lm-eval's task directories as one command sees them: its ``--include_path``
    directories (indexed whole, they are small) and lm-eval's own, scanned as text."""

    def __init__(self, include_paths: list[str]):
        self.include_paths = list(include_paths)
        self.user = (
            TaskManager(include_path=include_paths, include_defaults=False)
            if include_paths
            else None
        )
        self.scan = _Scan(builtin_root())

    def manager_for(self, names: list[str]) -> TaskManager | None:
        """A TaskManager whose entries for ``names`` (and everything they load) equal the
        full index's, built from the few directories that define them; None when that
        cannot be shown (the caller builds the full one)."""
        if any(ch in name for name in names for ch in "*?["):
            return None  # a glob matches names that no text scan can find
        managers: dict[Path, TaskManager] = {}
        defining: dict[str, Path | None] = {}
        todo = list(names)
        while todo:
            name = todo.pop()
            if name in defining:
                continue
            dirs = self.scan.dirs_mentioning(name)
            if dirs is None:
                return None
            for d in dirs - managers.keys():
                managers[d] = TaskManager(include_path=[str(d)], include_defaults=False)
            hits = sorted(d for d in dirs if name in managers[d].task_index)
            if len(hits) > 1:
                return None
            defining[name] = hits[0] if hits else None
            entry = self.user.task_index.get(name) if self.user else None
            entry = entry or (managers[hits[0]].task_index[name] if hits else None)
            if entry is None:
                if name in names:
                    return None  # unknown: its error lists the closest of every name
                continue  # a group member defined inline, as in the full index
            todo += _members(entry)
        roots = sorted({d for d in defining.values() if d is not None})
        if len(roots) == 1 and not self.include_paths:
            return managers[roots[0]]
        return TaskManager(include_path=[*map(str, roots), *self.include_paths] or None,
                           include_defaults=False)  # fmt: skip

    def unknown(self, names: list[str]) -> str | None:
        """The first of ``names`` that no task directory can define (no lm-eval YAML
        mentions it, no ``--include_path`` index holds it), else None. Globs: None."""
        for name in names:
            if any(ch in name for ch in "*?["):
                continue
            if self.user is not None and name in self.user.task_index:
                continue
            if self.scan.dirs_mentioning(name) == set():
                return name
        return None

    def hint_names(self) -> list[str]:
        """Names to suggest for an unknown one: every ``--include_path`` name, and the
        ``task:``, ``group:`` and ``tag:`` values written in lm-eval's own YAMLs."""
        found = set(self.user.all_tasks) if self.user else set()
        for text in self.scan.text.values():
            for m in _DEFINED.finditer(text):
                value = m.group(1).strip()
                if value.startswith("["):
                    found.update(v.strip().strip("'\"") for v in value.strip("[]").split(","))
                elif value:
                    found.add(value.strip("'\""))
        return sorted(n for n in found if n)


def _members(entry) -> list[str]:
    """The names an index entry loads: a group's members (recursively through inline
    groups), a tag's tasks."""
    kind = entry.kind.name  # TASK, PY_TASK, GROUP or TAG
    if kind == "TAG":
        return sorted(entry.tags)
    items = (entry.cfg or {}).get("task") if kind == "GROUP" else None
    out: list[str] = []
    stack = list(items) if isinstance(items, list) else []
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for key in ("task", "group"):
                value = item.get(key)
                if isinstance(value, str):
                    out.append(value)
                elif isinstance(value, list):
                    stack += value
    return out


class _Scan:
    """The text of every YAML under ``root`` and who includes whom, read once. Paths are
    normalized strings: ``Path.resolve`` on ~13,000 includes would cost seconds."""

    def __init__(self, root: Path):
        self.root = os.path.normpath(root)
        self.text: dict[str, str] = {}
        for folder, subdirs, files in os.walk(self.root):
            subdirs[:] = [d for d in subdirs if d != "__pycache__"]
            for f in files:
                if f.endswith(".yaml"):
                    path = os.path.join(folder, f)
                    with open(path, encoding="utf-8", errors="replace") as fh:
                        self.text[path] = fh.read()
        self.included_by: dict[str, set[str]] = {}
        for path, text in self.text.items():
            for target in _includes(path, text) if "include" in text else ():
                self.included_by.setdefault(target, set()).add(path)

    def dirs_mentioning(self, name: str) -> set[Path] | None:
        """The top-level directories whose files mention ``name`` or include a file that
        does; None if a file directly in the root does (no directory to narrow to)."""
        token = re.compile(rf"(?<![\w.\-/]){re.escape(name)}(?![\w.\-])")
        found = [p for p, text in self.text.items() if name in text and token.search(text)]
        seen, todo = set(found), list(found)
        while todo:
            for parent in self.included_by.get(todo.pop(), ()):
                if parent not in seen:
                    seen.add(parent)
                    todo.append(parent)
        dirs = set()
        for p in seen:
            rel = os.path.relpath(p, self.root).split(os.sep)
            if len(rel) < 2:
                return None
            dirs.add(Path(self.root, rel[0]))
        return dirs


def _includes(path: str, text: str) -> list[str]:
    """The files ``path`` includes (any ``include:`` key, scalar or list), resolved as
    lm-eval resolves them: relative to the including file's directory."""
    out = []
    for m in _INCLUDE.finditer(text):
        value = m.group(1).split(" #")[0].strip()
        if value.startswith("["):
            names = value.strip("[]").split(",")
        elif value:
            names = [value]
        else:  # a block list on the next lines
            block = _BLOCK_ITEMS.match(text, m.end() + 1)
            names = _ITEM.findall(block.group(0)) if block else []
        for n in names:
            n = n.strip().strip("'\"")
            if n:
                out.append(os.path.normpath(os.path.join(os.path.dirname(path), n)))
    return out

"""Every gpt2_jax module and name that tests/ and experiments/ use exists (nothing stale).

Static: each .py file under tests/ and experiments/ is parsed, never run, so a GPU test or a
benchmark that no CPU test runs is checked too. What is checked, as Python would bind it:

- ``from gpt2_jax.X import Y``: gpt2_jax.X imports and has Y (an attribute or a submodule);
- ``import gpt2_jax.X`` / ``import gpt2_jax.X as M``: gpt2_jax.X imports;
- ``M.a.b``, where an import in the same file binds ``M`` to a gpt2_jax module, in the scope
  where it binds it (module level: the whole file; a function: that function and those nested
  in it; a parameter, assignment or other import of the same name in between hides it).

A chain is followed while it names modules: ``model_lib.GPT2Config.x`` checks GPT2Config, not
``x`` (what a class holds is its own tests' business). A string that parses as Python and
names gpt2_jax (a ``python -c`` script; an f-string's fields read as names) is checked the same
way. Each module is imported once.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import textwrap
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "gpt2_jax"
SCANNED = ("tests", "experiments")

Chain = tuple[str, ...]  # ("gpt2_jax", "train", "loop", "build_step")


@dataclasses.dataclass(frozen=True)
class Use:
    line: int
    chain: Chain
    # The gpt2_jax modules its file (or script) imports by name: only these, and those that
    # their package's __init__ imports itself, are attributes of that package at run time.
    imported: frozenset[str] = frozenset()


def _ours(module: str | None) -> bool:
    return module is not None and (module == PACKAGE or module.startswith(PACKAGE + "."))


# ------------------------------------------------------------------ where names are bound

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _own_nodes(scope: ast.AST):
    """The nodes of ``scope``'s own body: nested functions are left out, their defaults and
    decorators (evaluated in this scope) kept."""
    stack = list(ast.iter_child_nodes(scope))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, _FUNCTIONS):
            stack.extend(node.args.defaults + [d for d in node.args.kw_defaults if d])
            stack.extend(getattr(node, "decorator_list", []))
        else:
            stack.extend(ast.iter_child_nodes(node))


def _import_bindings(node: ast.AST) -> list[tuple[str, Chain | None]]:
    """(name, what it is bound to: a gpt2_jax chain, or None for anything else) of an import."""
    if isinstance(node, ast.Import):
        out = []
        for a in node.names:
            if a.asname:
                out.append((a.asname, tuple(a.name.split(".")) if _ours(a.name) else None))
            else:  # ``import gpt2_jax.x.y`` binds ``gpt2_jax``
                top = a.name.split(".")[0]
                out.append((top, (PACKAGE,) if _ours(a.name) else None))
        return out
    if isinstance(node, ast.ImportFrom):
        ours = node.level == 0 and _ours(node.module)
        return [
            (a.asname or a.name, (*node.module.split("."), a.name) if ours else None)
            for a in node.names
            if a.name != "*"
        ]
    return []


def _bindings(scope: ast.AST) -> dict[str, list[tuple[int, Chain | None]]]:
    """The names ``scope`` binds, each with [(line, chain or None), ...] in source order."""
    out: dict[str, list[tuple[int, Chain | None]]] = {}

    def bind(name, line, chain):
        out.setdefault(name, []).append((line, chain))

    if isinstance(scope, _FUNCTIONS):
        a = scope.args
        for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
            if arg is not None:
                bind(arg.arg, scope.lineno, None)
    for node in _own_nodes(scope):
        for name, chain in _import_bindings(node):
            bind(name, node.lineno, chain)
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            bind(node.id, node.lineno, None)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bind(node.name, node.lineno, None)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bind(node.name, node.lineno, None)
    for entries in out.values():
        entries.sort(key=lambda e: e[0])
    return out


def _bound_at(entries: list[tuple[int, Chain | None]], line: int) -> Chain | None:
    """What a name is bound to at ``line``: the last binding before it (else the first: a
    function's name is local from its first line on). An import of gpt2_jax wins over a
    non-import binding on the same line."""
    before = [e for e in entries if e[0] <= line] or entries[:1]
    last_line = before[-1][0]
    same = [c for ln, c in before if ln == last_line]
    return next((c for c in same if c is not None), same[-1])


# ------------------------------------------------------------------ what a file uses


def _imported(tree: ast.AST) -> frozenset[str]:
    """Every gpt2_jax module a parsed file imports by name, anywhere in it, with its parents
    (``from gpt2_jax.a import b`` counts gpt2_jax.a.b: b may be a module)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    parts = [n.split(".") for n in names if _ours(n)]
    return frozenset(".".join(p[:i]) for p in parts for i in range(1, len(p) + 1))


class _Uses(ast.NodeVisitor):
    """Collects the gpt2_jax uses of one parsed file (``tree``: its module node)."""

    def __init__(self, tree: ast.Module):
        self.tree, self.imported = tree, _imported(tree)
        self.scopes: list[dict] = []
        self.uses: list[Use] = []

    def use(self, line: int, chain: Chain) -> None:
        self.uses.append(Use(line, chain, self.imported))

    def lookup(self, name: str, line: int) -> Chain | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return _bound_at(scope[name], line)
        return None

    def visit_Module(self, node):
        self._scoped(node)

    def visit_FunctionDef(self, node):
        for child in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if child is not None:
                self.visit(child)
        self._scoped(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node):
        for child in [*node.args.defaults, *node.args.kw_defaults]:
            if child is not None:
                self.visit(child)
        self._scoped(node)

    def _scoped(self, node):
        self.scopes.append(_bindings(node))
        body = node.body if isinstance(node.body, list) else [node.body]
        for child in body:
            self.visit(child)
        self.scopes.pop()

    def visit_Import(self, node):
        for a in node.names:
            if _ours(a.name):
                self.use(node.lineno, tuple(a.name.split(".")))

    def visit_ImportFrom(self, node):
        if node.level == 0 and _ours(node.module):
            base = tuple(node.module.split("."))
            for a in node.names:
                self.use(node.lineno, base if a.name == "*" else (*base, a.name))

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            self._script(node.value, node.lineno)

    def visit_JoinedStr(self, node):
        # f"...{x}...": each field stands in as a name, so the script around it parses.
        parts = [v.value if isinstance(v, ast.Constant) else "_" for v in node.values]
        self._script("".join(parts), node.lineno)

    def _script(self, text: str, line: int) -> None:
        """The uses of a string that is a Python script (``python -c``), at their lines."""
        if PACKAGE not in text:
            return
        try:
            tree = ast.parse(textwrap.dedent(text))
        except SyntaxError:  # prose, a path, a message: not a script
            return
        # A script runs in its own process: its imports, not this file's, bind its names.
        self.uses += [dataclasses.replace(u, line=line + u.line - 1) for u in _collect(tree)]

    def visit_Attribute(self, node):
        names, base = [], node
        while isinstance(base, ast.Attribute):
            names.append(base.attr)
            base = base.value
        if not isinstance(base, ast.Name):
            self.generic_visit(node)
            return
        names.reverse()
        if not isinstance(node.ctx, ast.Load):  # ``mod.x = ...`` may add x: check up to it
            names = names[:-1]
        bound = self.lookup(base.id, node.lineno)
        if bound is not None:
            self.use(node.lineno, (*bound, *names))


def _collect(tree: ast.Module) -> list[Use]:
    visitor = _Uses(tree)
    visitor.visit(tree)
    return visitor.uses


def uses(source: str) -> list[Use]:
    """The gpt2_jax uses in ``source`` (the text of a .py file)."""
    return _collect(ast.parse(source))


# ------------------------------------------------------------------ do they exist


def _own_imports(package: types.ModuleType) -> set[str]:
    """The submodules that ``package``'s __init__ imports when it runs (names below it)."""
    tree = ast.parse(Path(package.__file__).read_text())
    found = set()
    for node in _own_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package itself, or above it
                anchor = package.__name__.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


class Resolver:
    """Follows chains through gpt2_jax, importing each module once; remembers verdicts."""

    def __init__(self):
        self.verdicts: dict[tuple[Chain, frozenset[str]], str | None] = {}
        self.exposed: dict[str, set[str]] = {}

    def miss(self, use: Use) -> str | None:
        """None when the use's chain exists, else what is missing
        ("gpt2_jax.x has no attribute y")."""
        key = (use.chain, use.imported)
        if key not in self.verdicts:
            self.verdicts[key] = self._follow(use.chain, use.imported)
        return self.verdicts[key]

    def _follow(self, chain: Chain, imported: frozenset[str]) -> str | None:
        obj = importlib.import_module(chain[0])
        for name in chain[1:]:
            if not isinstance(obj, types.ModuleType):
                return None  # a class or value: its attributes are not this test's concern
            full = f"{obj.__name__}.{name}"
            is_package = hasattr(obj, "__path__")
            if is_package and importlib.util.find_spec(full) is not None:
                # A submodule is the package's attribute only once something imports it.
                if full not in imported and not self._exposes(obj, name):
                    return f"{obj.__name__} has no attribute {name} (import {full})"
                try:
                    obj = importlib.import_module(full)
                except Exception as e:  # noqa: BLE001  (reported, with the others)
                    return f"{full} fails to import: {type(e).__name__}: {e}"
            elif hasattr(obj, name):
                obj = getattr(obj, name)
            else:
                return f"{obj.__name__} has no attribute {name}"
        return None

    def _exposes(self, package: types.ModuleType, name: str) -> bool:
        """Whether ``package`` gives its submodule ``name`` itself: its __init__ imports it,
        or its module ``__getattr__`` serves it."""
        if package.__name__ not in self.exposed:
            self.exposed[package.__name__] = _own_imports(package)
        full = f"{package.__name__}.{name}"
        if any(m == full or m.startswith(full + ".") for m in self.exposed[package.__name__]):
            return True
        lazy = vars(package).get("__getattr__")
        try:
            return lazy is not None and lazy(name) is not None
        except AttributeError:
            return False


def misses(files: list[Path], root: Path = ROOT) -> list[str]:
    """Every "path:line: gpt2_jax.X has no attribute Y" of ``files`` (paths from ``root``)."""
    resolver, out = Resolver(), []
    for path in files:
        for use in uses(path.read_text()):
            what = resolver.miss(use)
            if what is not None:
                out.append(f"{path.relative_to(root)}:{use.line}: {what}")
    return out


def scanned_files() -> list[Path]:
    # This file is left out: its probes name missing modules on purpose.
    here = Path(__file__).resolve()
    return sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py") if p != here)


# ------------------------------------------------------------------ the tests


def test_every_gpt2_jax_name_that_tests_and_experiments_use_exists():
    t0 = time.perf_counter()
    files = scanned_files()
    assert len(files) > 20 and any("experiments" in p.parts for p in files)
    found = misses(files)
    assert not found, f"{len(found)} stale gpt2_jax names:\n" + "\n".join(found)
    assert time.perf_counter() - t0 < 60  # a few seconds: each module is imported once


def _chains(source: str) -> list[tuple[int, str]]:
    return [(u.line, ".".join(u.chain)) for u in uses(source)]


def test_the_checker_binds_names_as_python_does():
    source = """
import os
import gpt2_jax.train.loop
from gpt2_jax.train import loop as L, preflight
from gpt2_jax.model.gpt2 import GPT2Config

L.build_step
GPT2Config.field

def f(L):
    return L.anything

def g():
    from gpt2_jax.model import flops as L
    return L.peak_flops, preflight.check_step

def h():
    L = os.path
    return L.join

gpt2_jax.train.preflight.check_step
L.x = 1
script = (
    "from gpt2_jax import cli\\n"
    f"cli.main(['--workdir={os.sep}'])\\n"
)
"""
    assert _chains(source) == [
        (3, "gpt2_jax.train.loop"),
        (4, "gpt2_jax.train.loop"),
        (4, "gpt2_jax.train.preflight"),
        (5, "gpt2_jax.model.gpt2.GPT2Config"),
        (7, "gpt2_jax.train.loop.build_step"),
        (8, "gpt2_jax.model.gpt2.GPT2Config.field"),
        (14, "gpt2_jax.model.flops"),
        (15, "gpt2_jax.model.flops.peak_flops"),
        (15, "gpt2_jax.train.preflight.check_step"),
        (21, "gpt2_jax.train.preflight.check_step"),
        (22, "gpt2_jax.train.loop"),
        (24, "gpt2_jax.cli"),
        (25, "gpt2_jax.cli.main"),
    ]


def test_the_checker_reports_every_miss_with_its_path_and_line(tmp_path):
    (tmp_path / "probe.py").write_text(
        "from gpt2_jax.train import preflight, no_such_module\n"
        "from gpt2_jax.model.gpt2 import GPT2Config\n"
        "import gpt2_jax.no_such_layer as gone\n"
        "\n"
        "def f():\n"
        "    preflight.compile_train_step(None)\n"
        "    return GPT2Config.whatever, preflight.check_step, gone.x\n"
        "\n"
        "# A python -c script: a fresh process, where a package's submodule that nobody\n"
        "# imported is no attribute of it (gpt2_jax.cli's __init__ imports no command).\n"
        "SCRIPT = 'from gpt2_jax import cli\\ncli.main([])\\n'\n"
        "OK = 'from gpt2_jax.cli import main as cli\\ncli.main([])\\n'\n"
    )
    assert misses([tmp_path / "probe.py"], root=tmp_path) == [
        "probe.py:1: gpt2_jax.train has no attribute no_such_module",
        "probe.py:3: gpt2_jax has no attribute no_such_layer",
        "probe.py:6: gpt2_jax.train.preflight has no attribute compile_train_step",
        "probe.py:7: gpt2_jax has no attribute no_such_layer",
        "probe.py:12: gpt2_jax.cli has no attribute main (import gpt2_jax.cli.main)",
    ]

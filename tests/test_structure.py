"""The package's shape: layers that import only downward, no import cycles, small modules.

The layer order, lowest first (written here once; the README's layout section repeats it):

    errors       the one top-level leaf: UserError and its kin
    core         shared plumbing: workdir file names, the cache root, bounded caches, malloc
    model        the decoder, attention, decoding, loss heads, FLOPs
    data         tokenizer, sources, tokenizing corpora, blocks, the per-host loader
    optim        optimizers and schedules
    parallel     mesh, shardings, jax.distributed, launch
    weights      checkpoints, Hugging Face import/export, the weights resolver
    config       defaults, overrides, validation, the plan (the ConfigDict stops here)
    evaluation   perplexity, generation, the lm-eval harness backend
    train        the step, its builder, preflight, the loop, monitor, trackers, summary
    cli          one module per command; the only place that sets process-wide state

A module may import its own subpackage and any lower layer, never a higher one, at module
level or inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"
LAYERS = (
    "errors", "core", "model", "data", "optim", "parallel", "weights", "config",
    "evaluation", "train", "cli",
)  # fmt: skip
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py"}  # everything else is in a layer
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def module_name(path: Path) -> str:
    """``gpt2_jax/data/blocks.py`` -> ``data.blocks``; a package's ``__init__`` -> its name."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The gpt2_jax modules ``path`` imports, at module level or inside functions
    (``from gpt2_jax.data import blocks`` is the module ``data.blocks``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "gpt2_jax" or node.module.startswith("gpt2_jax."):
                base = node.module[len("gpt2_jax.") :] if "." in node.module else ""
                for a in node.names:
                    sub = f"{base}.{a.name}" if base else a.name
                    names.append(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            names = [
                a.name[len("gpt2_jax.") :] for a in node.names if a.name.startswith("gpt2_jax.")
            ]
        out |= {n for n in names if n}
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(p, known) - {name} for name, p in mods.items()}


def layer(module: str) -> str:
    return module.split(".")[0]


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first search (each reported once)."""
    found, seen = [], set()

    def visit(node, path):
        for nxt in sorted(g.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt) :]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append([*cycle, nxt])
            elif len(path) < len(g):
                visit(nxt, [*path, nxt])

    for start in sorted(g):
        visit(start, [start])
    return found


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for mod, deps in sorted(g.items()):
        if layer(mod) not in rank:  # __init__ / __main__: the public API and the entry
            continue
        for dep in sorted(deps):
            if layer(dep) in rank and rank[layer(dep)] > rank[layer(mod)]:
                bad.append(f"{mod} imports {dep} ({layer(dep)} is above {layer(mod)})")
    return bad


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_layer_checker_finds_an_upward_import():
    assert upward_imports({"data.x": {"train.loop"}, "train.loop": {"data.x"}}) == [
        "data.x imports train.loop (train is above data)"
    ]


def test_every_module_is_in_a_declared_layer():
    strays = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if p.parent == PACKAGE
        and p.name not in TOP_LEVEL
        or p.parent != PACKAGE
        and p.relative_to(PACKAGE).parts[0] not in LAYERS
    ]
    assert strays == []


def test_no_layer_imports_a_higher_one():
    assert upward_imports(graph()) == []


def test_no_import_cycles_among_modules():
    assert cycles(graph()) == []


def test_no_import_cycles_among_subpackages():
    g = graph()
    packages: dict[str, set[str]] = {}
    for mod, deps in g.items():
        packages.setdefault(layer(mod), set()).update(
            layer(d) for d in deps if layer(d) != layer(mod)
        )
    assert cycles(packages) == []


def test_errors_is_a_leaf():
    assert graph()["errors"] == set()


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({n})")
    assert long == []


def test_no_module_is_longer_than_500_lines():
    long = [
        f"{p.relative_to(PACKAGE)} ({n})"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long == []


def top_level_names(path: Path) -> set[str]:
    """Names a module defines at its top level (imports are not definitions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_no_two_modules_define_the_same_name():
    where: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for name in top_level_names(path):
            where.setdefault(name, []).append(str(path.relative_to(PACKAGE)))
    assert {n: ps for n, ps in where.items() if len(ps) > 1} == {}


def _annotated_args(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
                if arg.annotation is not None:
                    yield node, arg.arg, ast.unparse(arg.annotation)


def test_cfg_is_a_config_dict_and_model_cfg_a_gpt2_config():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for fn, name, annotation in _annotated_args(ast.parse(path.read_text())):
            if name == "cfg" and "GPT2Config" in annotation:
                wrong.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}({name})")
            if name == "model_cfg" and "ConfigDict" in annotation:
                wrong.append(f"{path.relative_to(PACKAGE)}:{fn.lineno} {fn.name}({name})")
    assert wrong == []


def test_the_config_dict_stops_at_the_plan():
    # Only the config layer and the commands read ml_collections; the library's entry
    # points that take a ConfigDict hand it to the plan at once (their modules are listed).
    entries = {"train/loop.py", "evaluation/perplexity.py"}
    readers = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if "ml_collections" in p.read_text()
        and layer(module_name(p)) not in ("config", "cli")
        and str(p.relative_to(PACKAGE)) not in entries
    )
    assert readers == []


def test_config_mutation_is_the_config_layers_alone():
    mutating = sorted(
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if ".unlocked()" in p.read_text() and layer(module_name(p)) != "config"
    )
    assert mutating == []

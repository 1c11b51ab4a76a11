"""The floor plan (docs/architecture.md), enforced: imports only go down, never sideways
between siblings, and no module uses another module's private names.

Every import counts, also those inside functions and ``TYPE_CHECKING`` blocks: a lazy
import that goes up is still a dependency that goes up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The design card's folders and the import names they install as (pyproject's package-dir).
SOURCES = {"zoo": "zoo", "merge": "zoo.merge", "protect": "zoo.protect", "cli": "zoo.cli"}

# Floor of each part, lowest first. Parts on one floor are siblings: neither imports the other.
FLOORS: dict[str, int] = {
    "zoo.errors": 1, "zoo.progress": 1, "zoo.memory": 1, "zoo.fileio": 1,
    "zoo.checkpoints": 2,
    "zoo.registry": 3, "zoo.textgen": 3,
    "zoo.hub": 4, "zoo.evaluate": 4, "zoo.merge": 4, "zoo.protect": 4,
    "zoo.publish": 5,
    "zoo.demo": 6,  # the demo tour ends by publishing, so it stands on publishing
    "zoo.cli": 7,
}
BASE = 1  # the helpers on the ground floor may use one another
# Private by convention but public API of the standard library's named tuples.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([name, *parts])] = path
    return out


MODULES = modules()


def part_of(module: str) -> str | None:
    """The FLOORS entry a module belongs to (None: the root package ``zoo`` itself)."""
    best = None
    for part in FLOORS:
        if (module == part or module.startswith(part + ".")) and (best is None or len(part) > len(best)):
            best = part
    return best


def ours(module: str) -> bool:
    return module == "zoo" or module.startswith("zoo.")


def imports(module: str, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every import of zoo's own modules."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if ours(a.name)]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            if not ours(target):
                continue
            names = [a.name for a in node.names]
            # `from zoo.registry import card` imports the submodule zoo.registry.card
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for n in subs:
                out.append((node.lineno, f"{target}.{n}", []))
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                out.append((node.lineno, target, rest))
    return out


def test_every_source_module_has_a_floor():
    missing = [m for m in MODULES if m != "zoo" and part_of(m) is None]
    assert not missing, f"modules outside the floor plan (add them to FLOORS and docs/architecture.md): {missing}"


def test_the_floor_plan_knows_real_parts():
    assert all(any(m == p or m.startswith(p + ".") for m in MODULES) for p in FLOORS)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_only_go_down(module):
    path = MODULES[module]
    here = part_of(module)
    wrong = []
    for line, target, names in imports(module, path):
        there = part_of(target)
        if here is None:  # zoo/__init__.py: exports lazily by name, imports nothing of zoo's
            wrong.append(f"{path.name}:{line} imports {target} (the root package must stay import-free)")
            continue
        if there is None:
            if names and all(n.startswith("__") for n in names):
                continue  # zoo.__version__ and the like live on the root package
            wrong.append(f"{path.name}:{line} imports the root package zoo (import the module that owns the name)")
        elif there == here:
            continue
        elif FLOORS[there] > FLOORS[here]:
            wrong.append(f"{line}: {target} is on floor {FLOORS[there]}, above {here} (floor {FLOORS[here]})")
        elif FLOORS[there] == FLOORS[here] and FLOORS[here] != BASE:
            wrong.append(f"{line}: {target} is a sibling of {here} on floor {FLOORS[here]}")
    assert not wrong, f"{module}: " + "; ".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_uses_another_modules_private_names(module):
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    wrong = [f"{line}: from {target} import {n}" for line, target, names in imports(module, path)
             for n in names if n.startswith("_") and not n.startswith("__")]
    # aliases bound to zoo's own modules in this file: `alias._private` is reaching in too
    aliases = {a.asname or a.name.split(".")[0]: a.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for a in node.names if ours(a.name)}
    aliases.update({a.asname or a.name: f"{t}.{a.name}" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and ours(t := node.module)
                    for a in node.names if f"{t}.{a.name}" in MODULES})
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if node.attr in PUBLIC_UNDERSCORED:
            continue
        base = node.value
        if isinstance(base, ast.Name):
            if base.id in ("self", "cls"):
                continue
            # another name: one of zoo's modules, or a parameter typed as one of zoo's classes;
            # not a third-party module's private (pinned with the library)
            if base.id not in aliases and not _names_zoo_object(tree, base.id):
                continue
        # an attribute chain (self.registry._read()) always reaches into another object
        wrong.append(f"{node.lineno}: {ast.unparse(node)}")
    assert not wrong, f"{module} reaches into private names: " + "; ".join(wrong)


def _names_zoo_object(tree: ast.AST, name: str) -> bool:
    """True when ``name`` is a parameter or variable annotated with one of zoo's types
    (``registry: Registry``), the usual way code reaches into another class's privates."""
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.arg == name and node.annotation is not None:
            text = ast.unparse(node.annotation)
            if any(t in text for t in ("Registry", "Checkpoint", "BlobStore", "Database", "HubRepos", "Plan")):
                return True
    return False


def test_the_checker_sees_a_wrong_import(tmp_path):
    """The checks above would fail on an import that goes up and on a private name."""
    bad = tmp_path / "bad.py"
    bad.write_text("from zoo.cli.main import app\nfrom zoo.registry.catalogue import _summary\n"
                   "def f(registry: Registry):\n    return registry._private()\n")
    assert [(t, n) for _, t, n in imports("zoo.checkpoints.bad", bad)][0][0] == "zoo.cli.main"
    found = imports("zoo.checkpoints.bad", bad)
    assert [(t, n) for _, t, n in found] == [("zoo.cli.main", ["app"]), ("zoo.registry.catalogue", ["_summary"])]
    assert FLOORS[part_of("zoo.cli.main")] > FLOORS[part_of("zoo.checkpoints.bad")]
    assert _names_zoo_object(ast.parse(bad.read_text()), "registry")


def runtime_imports(module: str, path: Path) -> set[str]:
    """zoo modules ``module`` imports when it runs: every import, lazy ones included,
    except those only for type checkers (``if TYPE_CHECKING:``)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out = set()
    for line, target, _ in imports(module, path):
        if any(getattr(n, "lineno", None) == line and id(n) in typing_only for n in ast.walk(tree)
               if isinstance(n, (ast.Import, ast.ImportFrom))):
            continue
        out.add(target if target in MODULES else target.rpartition(".")[0] if target.rpartition(".")[0] in MODULES
                else target)
    return {t for t in out if t in MODULES and t != module}


def test_no_import_cycles():
    """No module depends on itself through others, lazy imports included: a cycle means
    two modules are one concept, or one of them sits on the wrong floor."""
    graph = {m: runtime_imports(m, p) for m, p in MODULES.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"

"""The package's shape: imports point one way (down the README's floors), no module imports
another's private names, modules stay short, hook names live in one place, the convenience
methods keep their functions' signatures, and the package face is cheap to import."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "circuitlab"
README = PACKAGE.parent / "README.md"

#: The documented upward delegations (README, "How it works"): (method's module, target).
DELEGATIONS = {
    ("circuitlab.graph", "circuitlab.viz"),
    ("circuitlab.graph", "circuitlab.comparison"),
    ("circuitlab.graph", "circuitlab.validation"),
    ("circuitlab.replacement", "circuitlab.interventions"),
    ("circuitlab.replacement", "circuitlab.search"),
    ("circuitlab.replacement", "circuitlab.qk"),
    ("circuitlab.graph", "circuitlab.attention"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _base(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute name of the module a ``from ... import`` statement imports from."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    parts = parts[: len(parts) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _resolve(module: str, path: Path, node: ast.ImportFrom | ast.Import, known) -> list[str]:
    """The circuitlab modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = _base(module, path, node)
    if not base.startswith("circuitlab"):
        return []
    hits = [base] if base in known else []
    hits += [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
    return hits


def _imports():
    """``(module, target, in_function)`` for every import of a circuitlab module, and every
    import statement inside a function (any target) as ``(module, line)``."""
    known = _modules()
    edges, in_function = [], []
    for module, path in known.items():
        tree = ast.parse(path.read_text())
        parents = {}
        for parent in ast.walk(tree):
            for child in ast.iter_child_nodes(parent):
                parents[child] = parent
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            chain, p = [], parents.get(node)
            while p is not None:
                chain.append(p)
                p = parents.get(p)
            if any(isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test) for p in chain):
                continue
            local = any(isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)) for p in chain)
            if local:
                in_function.append((module, node.lineno))
            for target in _resolve(module, path, node, known):
                if target != module:
                    edges.append((module, target, local))
    return edges, in_function


def test_module_level_imports_have_no_cycle():
    edges, _ = _imports()
    g = nx.DiGraph([(a, b) for a, b, local in edges if not local])
    assert list(nx.simple_cycles(g)) == []


def test_imports_inside_functions_are_few_and_only_documented_delegations_point_up():
    edges, in_function = _imports()
    # Optional or heavy dependencies (ray, plotly) and the documented delegations.
    assert len(in_function) < 22, in_function
    def delegation(a, b):
        return any(a == src and (b == dst or b.startswith(dst + ".")) for src, dst in DELEGATIONS)

    g = nx.DiGraph([(a, b) for a, b, local in edges if not (local and delegation(a, b))])
    assert list(nx.simple_cycles(g)) == []
    used = {(a, b) for a, b, local in edges if local}
    assert DELEGATIONS <= used, "a documented delegation is gone: update DELEGATIONS and the README"


def _floors() -> dict[str, tuple[int, str]]:
    """The README's floor table ("How it works"): each module or package named in its module
    column (``graph.py``, ``viz/``) -> ``(floor number, floor name)``, ground first."""
    text = README.read_text().split("## How it works", 1)[1]
    rows = re.search(r"^\| floor \| module \| owns \|\n\|[-|]+\|\n((?:\|.*\n)+)", text, re.M)
    assert rows, "README lacks the floor table"
    out, floor = {}, None
    for row in rows.group(1).splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        floor = cells[0] or floor
        for name in re.findall(r"`([^`]+)`", cells[1]):
            parts = name.removesuffix("/").removesuffix(".py").split("/")
            out[".".join(["circuitlab", *parts]).removesuffix(".__init__")] = floor
    order = list(dict.fromkeys(out.values()))
    return {m: (order.index(f), f) for m, f in out.items()}


def _module_floors() -> dict[str, tuple[int, str] | None]:
    """Each circuitlab module's floor: its own row of the table, or its package's (``viz/``);
    ``None`` where the table has neither."""
    floors = _floors()

    def floor_of(module):
        hits = [name for name in floors if module == name or module.startswith(name + ".")]
        return floors[max(hits, key=len)] if hits else None

    return {m: floor_of(m) for m in _modules()}


def test_the_readme_floor_table_lists_every_module():
    assert [m for m, floor in _module_floors().items() if floor is None] == []
    assert [name for name in _floors() if name not in _modules()] == []


def test_module_level_imports_point_to_the_same_floor_or_below():
    """The README's floors hold in the code: a module imports (at module level) only modules
    of its own floor or lower ones; the documented delegations import inside a method."""
    floor = _module_floors()
    assert None not in floor.values(), "a module is missing from the README's floor table"
    edges, _ = _imports()
    up = [f"{a} ({floor[a][1]}) imports {b} ({floor[b][1]})"
          for a, b, local in edges if not local and floor[b][0] > floor[a][0]]
    assert up == []


def test_no_private_name_is_imported_across_modules():
    """``from circuitlab.x import _name`` couples a module to another's internals: what two
    modules share is public (a name without a leading underscore, with a docstring)."""
    known = _modules()
    offenders = []
    for module, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and _base(module, path, node).startswith("circuitlab"):
                offenders += [f"{module}:{node.lineno}: {_base(module, path, node)}.{a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert offenders == []


def test_no_module_is_long():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}


def test_only_the_model_floor_spells_hook_plumbing():
    """Hook names and the MLP-input capture live in ``hooks.py``, hooked runs in
    ``replacement.py``; elsewhere only exported transcoder configs name hooks (as data)."""
    offenders = []
    for module, path in _modules().items():
        if module in ("circuitlab.replacement", "circuitlab.hooks"):
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if any(s in line for s in ("hook_normalized", ".split(\".\")[1]", "hook_resid",
                                       "hook_pattern", "hook_scale")):
                offenders.append(f"{module}:{i}: {line.strip()}")
    assert offenders == []


def test_the_package_face_and_the_cli_help_do_not_import_torch():
    code = ("import sys, circuitlab, circuitlab.cli\n"
            "try:\n    circuitlab.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'transformer_lens' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.parametrize("method, function", [
    ("ReplacementModel.intervene", "interventions.intervene"),
    ("ReplacementModel.generate", "interventions.generate"),
    ("ReplacementModel.sweep", "interventions.sweep"),
    ("ReplacementModel.features_for", "search.features_for"),
    ("ReplacementModel.features_by_output", "search.features_by_output"),
    ("ReplacementModel.features_by_examples", "search.features_by_examples"),
    ("Graph.show", "viz.explore"),
    ("Graph.to_html", "viz.to_html"),
    ("Graph.prune", "prune.prune"),
    ("Graph.scores", "prune.scores"),
    ("Graph.suggest_supernodes", "comparison.suggest_supernodes"),
    ("Graph.validate", "validation.validate"),
])
def test_delegations_keep_their_functions_signatures(method, function):
    """``rm.intervene(...)`` and ``interventions.intervene(rm, ...)`` take the same
    arguments with the same defaults, so the two spellings cannot drift."""
    import importlib

    import circuitlab

    cls, name = method.split(".")
    owner = getattr(circuitlab, cls)
    mod, fn = function.rsplit(".", 1)
    target = getattr(importlib.import_module(f"circuitlab.{mod}"), fn)
    m = list(inspect.signature(getattr(owner, name)).parameters.values())[1:]
    f = list(inspect.signature(target).parameters.values())[1:]
    strip = lambda ps: [(p.name, p.kind, p.default) for p in ps]  # noqa: E731
    if m and m[-1].kind is inspect.Parameter.VAR_KEYWORD:  # **kwargs passes the rest through
        assert strip(m[:-1]) == strip(f[:len(m) - 1])
    else:
        assert strip(m) == strip(f)

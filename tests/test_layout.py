"""The package's layout rules, checked over the source tree (docs/DEVELOPING.md, "The package map"):
data flows one way between the rooms, no import circle, no module reaches into another's private
names, no library module grows past 600 lines, and the benchmark harness stays out of the wheel."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "loramix"

# Rooms in the order data flows; a module may import only from its own room or rooms before it.
ROOMS = ["version", "_core", "core", "data", "profiles", "bank", "weights", "mixing", "pipeline", "recipe",
         "evaluation", "minibank", "explain", "demo", "cliutil", "cli"]
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every import, lazy ones included."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "loramix"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "loramix":
                out.append((mod, [a.name for a in node.names], node.lineno))
    return out


def _edges() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for m, f in MODULES.items():
        for mod, names, _ in _imports(m, f):
            targets = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES or f"{mod}.{n}" == "loramix._core"] or [mod]
            g[m].update(t for t in targets if t in MODULES and t != m)
    return g


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_modules_found():
    assert {"loramix.pipeline", "loramix.bank.bank", "loramix.weights.pipelines", "loramix.mixing.modes",
            "loramix.core.divergence"} <= set(MODULES)


def test_no_import_circle():
    g = _edges()
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for v in g:
        if v not in index:
            visit(v)
    # a package __init__ importing its own submodules is how a package shows its face, not a circle
    circles = [sorted(c) for c in sccs if len(c) > 1 and not all(x.startswith(min(c, key=len)) for x in c)]
    assert not circles, circles


def test_imports_flow_one_way():
    bad = []
    for m, f in MODULES.items():
        src = _room(m)
        if src == "__init__":
            continue
        for mod, names, line in _imports(m, f):
            subs = {f"{mod}.{n}" for n in names if f"{mod}.{n}" in MODULES or f"{mod}.{n}" == "loramix._core"}
            for dst in ({_room(s) for s in subs} or {_room(mod)}):
                if dst in ("__init__",):
                    bad.append(f"{f.relative_to(PKG)}:{line} imports the package root")
                elif dst in ROOMS and src in ROOMS and ROOMS.index(dst) > ROOMS.index(src):
                    bad.append(f"{f.relative_to(PKG)}:{line} ({src}) imports {mod} ({dst})")
    assert not bad, "\n".join(bad)


def test_no_private_name_across_modules():
    bad = []
    for m, f in MODULES.items():
        tree = ast.parse(f.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("loramix") or \
                    isinstance(node, ast.ImportFrom) and node.level:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_core":
                        bad.append(f"{f.relative_to(PKG)}:{node.lineno} imports {a.name}")
                    aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("loramix"):
                        aliases[a.asname or a.name.split(".")[0]] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") and node.value.id != "_core":
                full = aliases[node.value.id]
                if any(k.endswith("." + full) or k == full or k.endswith("." + full.split(".")[-1]) for k in MODULES):
                    bad.append(f"{f.relative_to(PKG)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_length(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{module} has {n} lines (> {MAX_LINES}): split it by job"


def test_benchmark_harness_outside_the_library():
    assert not (PKG / "bench").exists(), "the benchmark harness belongs in benches/, not in the wheel"

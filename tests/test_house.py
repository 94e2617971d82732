"""The house's floors (DESIGN.md): imports run one way, down, and no modules import each other in
a circle. Read from the source (every import statement, also those inside functions), so an
upward import fails here even when it is lazy and never runs in the tests."""

import ast
import pathlib

import undertow

ROOT = pathlib.Path(undertow.__file__).parent
# floor -> rank: a module may import its own floor and floors of lower rank, nothing else
FLOORS = {
    "cli": 6,
    "launch": 5, "hf": 5, "planning": 5,
    "pretrain": 4,
    "parallel": 3,
    "models": 2,
    "kernels": 1, "data_prep": 1,
    "cache": 0, "configtools": 0, "log": 0, "recipes": 0, "versions": 0,
    "": -1,  # the package's own __init__ (its version)
}


def module_name(path: pathlib.Path) -> str:
    parts = ("undertow",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(path: pathlib.Path) -> set[str]:
    """The undertow modules `path` imports anywhere in it (a `from a.b import c` names a.b.c when
    that is a module of ours, else a.b)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in MODULES else base)
    return {m for m in found if m == "undertow" or m.startswith("undertow.")}


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_every_module_has_a_floor():
    assert {floor(m) for m in MODULES} - set(FLOORS) == set()


def test_imports_run_down_the_house():
    upward = []
    for module, path in sorted(MODULES.items()):
        mine = floor(module)
        for target in sorted(imports(path)):
            theirs = floor(target)
            if theirs != mine and FLOORS[theirs] >= FLOORS[mine]:
                upward.append(f"{module} -> {target} ({mine or 'undertow'} may not import {theirs or 'undertow'})")
    assert upward == [], "\n".join(upward)


def test_no_import_circles():
    graph = {m: {t for t in imports(p) if t in MODULES and t != m} for m, p in MODULES.items()}
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert circles == [], circles

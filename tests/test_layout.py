"""The layout keeps its promises: no import cycle, and no stage imports a later one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "featcache"
# Flow order: a module may import its own layer and the ones before it, never a later one.
LAYERS = {"errors": 0, "registry": 0, "files": 0, "data": 1, "backbones": 2, "extraction": 3, "fuse": 4,
          "records": 4, "comparison": 4, "run_files": 4, "finetuning": 5, "sweep": 5, "reporting": 6, "predict": 6, "api": 7, "cli": 7}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] != "__main__":
            out[".".join(("featcache",) + (parts[:-1] if parts[-1] == "__init__" else parts))] = path
    return out


def imports(path: Path, top_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("featcache"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # `from featcache.cli import browse`
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("featcache"))
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_no_import_cycle_between_featcache_modules():
    known = modules()
    graph = {m: {i for i in imports(p, top_only=True) if i in known and i != m} for m, p in known.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert len(graph) > 40  # the walk saw the package


# The one exception: the sweep package stands in for the API function of the same name once it is
# imported (``featcache.sweep(...)`` must keep working), so its ``__call__`` reaches the API, when called.
API_SHIMS = {("featcache.sweep", "featcache.api"), ("featcache.sweep", "featcache.api.sweep")}


def test_no_stage_imports_a_later_one():
    late = [f"{m} imports {i}" for m, p in modules().items() if m != "featcache"
            for i in imports(p, top_only=False) if layer(i) > layer(m) and (m, i) not in API_SHIMS]
    assert not late

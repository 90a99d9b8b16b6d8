"""The layout keeps its promises: no import cycle (at module level or inside functions), and no stage
imports a later one."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "featcache"
# Flow order, one subpackage a layer: a module may import its own layer and the ones before it, never a later one.
ORDER = ("data", "backbones", "extraction", "runs", "solvers", "fuse", "finetuning", "sweeping", "ranking", "choosing",
         "reporting", "pipeline", "api", "cli")
BASE = ("_version", "errors", "registry", "files", "requests", "device", "torchrun")  # below every stage
LAYERS = {**dict.fromkeys(BASE, 0), **{name: i for i, name in enumerate(ORDER, start=1)}}


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


def graph(top_only: bool) -> dict[str, set[str]]:
    """module -> the featcache modules it imports (a package's ``__init__`` is not imported by its children)."""
    known = modules()
    out = {}
    for m, p in known.items():
        found = {i for i in imports(p, top_only) if i in known and i != m}
        out[m] = {i for i in found if not m.startswith(i + ".")}  # importing featcache.x.y runs featcache.x first,
    return out                                                       # which imports nothing of its children


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``edges`` as [a, b, ..., a], or None."""
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n, stack + [n])
                if found:
                    return found
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or not (PACKAGE / parts[1]).is_dir() and not (PACKAGE / f"{parts[1]}.py").is_file():
        return 0  # featcache itself, or a name it defines (__version__)
    if parts[1] not in LAYERS:
        pytest.fail(f"featcache.{parts[1]} has no layer in tests/test_layout.py: add it to ORDER or BASE")
    return LAYERS[parts[1]]


def test_the_cycle_check_finds_a_planted_cycle():
    planted = {"featcache.a": {"featcache.b"}, "featcache.b": {"featcache.c"}, "featcache.c": {"featcache.a"}}
    assert find_cycle(planted) == ["featcache.a", "featcache.b", "featcache.c", "featcache.a"]
    assert find_cycle({**planted, "featcache.c": set()}) is None
    real = graph(top_only=False)
    real["featcache.errors"] = real["featcache.errors"] | {"featcache.cli.commands"}  # one lazy import upwards
    assert find_cycle(real) is not None


@pytest.mark.parametrize("top_only", [True, False], ids=["module level", "inside functions too"])
def test_no_import_cycle_between_featcache_modules(top_only):
    edges = graph(top_only)
    assert len(edges) > 40  # the walk saw the package
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_imports_a_later_one():
    late = [f"{m} imports {i}" for m, p in modules().items() if m != "featcache"
            for i in imports(p, top_only=False) if layer(i) > layer(m)]
    assert not late


def test_no_module_below_the_package_imports_the_packages_init():
    """The version comes from featcache/_version.py; ``from featcache import X`` inside the package would run the
    package's __init__ from below it (a back-edge)."""
    import ast

    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent == PACKAGE and path.name in ("__init__.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            named = node.module == "featcache" if isinstance(node, ast.ImportFrom) and node.level == 0 else \
                isinstance(node, ast.Import) and any(a.name == "featcache" for a in node.names)
            if named and not (isinstance(node, ast.ImportFrom) and all(
                    (PACKAGE / a.name).is_dir() or (PACKAGE / f"{a.name}.py").is_file() for a in node.names)):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not offenders, offenders

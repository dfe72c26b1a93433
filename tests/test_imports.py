"""The import graph of the package: no circles, and the allowed directions only.

Every module is parsed with `ast`, imports inside functions included (a fresh import would not
see those until the function runs).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moma_jax"
ENTRY_POINTS = (
    "moma_jax.cli",
    "moma_jax.describe",
    "moma_jax.bench",
    "moma_jax.prepare_data",
    "moma_jax.aot",
    "moma_jax.compare",
    "moma_jax.compare_report",
    "moma_jax.compare_plots",
    "moma_jax.evaluate",
    "moma_jax.generate",
)
# What config may import: the bottom of the graph, which imports no other project module.
BOTTOM = ("moma_jax.modality", "moma_jax.errors", "moma_jax.sparse_config", "moma_jax.routers")
# The routing rows' JAX bodies import the routing primitives (pure JAX, no project imports)
# inside the functions, where the model is loaded; nothing else below config may.
BOTTOM_MAY_USE = ("moma_jax.model.routing",)


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest project module that `name` names (moma_jax.model.routing.x -> ...routing)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its source."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    modules = set(paths)
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                # `from pkg import sub` imports the submodule when there is one.
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.add(resolved)
        # `from pkg import sub` also listed pkg itself; keep only the most specific target.
        graph[name] = {e for e in edges if not any(o.startswith(e + ".") for o in edges)}
    return graph


GRAPH = import_graph()


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_graph_sees_function_level_imports():
    assert "moma_jax.model.kinds" in GRAPH["moma_jax.runtime"]
    assert GRAPH["moma_jax.config"] == {"moma_jax.errors", "moma_jax.sparse_config"}


def test_no_import_circles():
    """Tarjan's strongly connected components: every component is a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH.get(v, ())):
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

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert circles == []


@pytest.mark.parametrize(
    "importer, forbidden",
    [
        ("moma_jax.model", ("moma_jax.data", "moma_jax.train", "moma_jax.runtime", *ENTRY_POINTS)),
        ("moma_jax.model", ("moma_jax.registry", "moma_jax.experiments")),
        ("moma_jax.data", ("moma_jax.model", "moma_jax.train", "moma_jax.runtime", *ENTRY_POINTS)),
        ("moma_jax.registry", ("moma_jax.experiments", "moma_jax.model", "moma_jax.data")),
        ("moma_jax.losses", ("moma_jax.data", "moma_jax.model", "moma_jax.train")),
        ("moma_jax.flops", ("moma_jax.data", "moma_jax.model", "moma_jax.train")),
        ("moma_jax.train", ENTRY_POINTS),
        ("moma_jax.runtime", ENTRY_POINTS),
        ("moma_jax.experiments", ("moma_jax.model", "moma_jax.train", *ENTRY_POINTS)),
    ],
)
def test_allowed_directions(importer, forbidden):
    bad = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _in(m, (importer,))
        for t in targets
        if _in(t, forbidden)
    }
    assert not bad


def test_config_imports_only_the_bottom():
    assert GRAPH["moma_jax.config"] <= set(BOTTOM)
    for module in BOTTOM:
        assert GRAPH[module] <= set(BOTTOM + BOTTOM_MAY_USE), module
    assert GRAPH["moma_jax.model.routing"] == set()
    assert GRAPH["moma_jax.modality"] == GRAPH["moma_jax.errors"] == set()


def test_entry_points_are_imported_by_no_library_module():
    importers = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if _in(t, ENTRY_POINTS) and not _in(m, ENTRY_POINTS)
    }
    assert not importers

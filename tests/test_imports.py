"""The import graph of the package and the bundled experiments: no circles, and the allowed
directions only (the library never imports `experiments`; the registry loads it by name).

Every module is parsed with `ast`, imports inside functions included (a fresh import would not
see those until the function runs).
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moma_jax"
EXPERIMENTS = PACKAGE.parent / "experiments"
COMMANDS = "moma_jax.commands"
ENTRY_POINTS = (COMMANDS, "moma_jax.bench")
# What config may import: the bottom of the graph, which imports no other project module.
BOTTOM = (
    "moma_jax.modality",
    "moma_jax.errors",
    "moma_jax.sparse_config",
    "moma_jax.kind_config",  # the other layer kinds' sections
    "moma_jax.routers",
    "moma_jax.routers_per_token",  # more rows of the routers' table
    "moma_jax.routers_relu",  # ReMoE's row (its loss weight is training state)
)
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
    paths = {module_name(p): p for root in (PACKAGE, EXPERIMENTS) for p in root.rglob("*.py")}
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
    assert GRAPH["moma_jax.config"] == {
        "moma_jax.errors",
        "moma_jax.kind_config",
        "moma_jax.sparse_config",
    }
    assert "moma_jax.modality" in GRAPH["moma_jax.kind_config"]  # attention experts' groups


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
        ("moma_jax.model", ("moma_jax.registry", "moma_jax.suites")),
        ("moma_jax.data", ("moma_jax.model", "moma_jax.train", "moma_jax.runtime", *ENTRY_POINTS)),
        ("moma_jax.registry", ("moma_jax.model", "moma_jax.data")),
        ("moma_jax.losses", ("moma_jax.data", "moma_jax.model", "moma_jax.train")),
        ("moma_jax.flops", ("moma_jax.data", "moma_jax.model", "moma_jax.train")),
        ("moma_jax.train", ENTRY_POINTS),
        ("moma_jax.runtime", ENTRY_POINTS),
        ("experiments", ("moma_jax.model", "moma_jax.train", "moma_jax.runtime", *ENTRY_POINTS)),
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


def test_no_library_module_imports_the_experiments():
    """moma_jax never imports the top-level `experiments` package: entry points load it by
    module name through the registry (`registry.load_bundled`, `--experiments MODULE`), so a
    researcher's experiments and the bundled ones are found the same way."""
    assert "experiments" in GRAPH and "experiments.moma" in GRAPH  # the scan sees them
    importers = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _in(m, ("moma_jax",))
        for t in targets
        if _in(t, ("experiments",))
    }
    assert not importers


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


def test_no_library_module_imports_a_command():
    """Commands sit on top of the library: nothing outside moma_jax/commands/ imports them (a
    library module that needs a command's code means that code is library code)."""
    commands = {m for m in GRAPH if _in(m, (COMMANDS,))}
    assert {f"{COMMANDS}.{c}" for c in ("cli", "evaluate", "generate", "compare")} <= commands
    importers = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if not _in(m, (COMMANDS,))
        for t in targets
        if _in(t, (COMMANDS,))
    )
    assert importers == [], "library modules import commands"


def test_commands_live_in_commands():
    """A module with a top-level `main` is a command: it belongs in commands/ (or bench/), not
    beside the library code."""
    stray = sorted(
        name
        for name in GRAPH
        if not _in(name, ENTRY_POINTS)
        and any(
            isinstance(node, ast.FunctionDef) and node.name == "main"
            for node in ast.parse(_path(name).read_text()).body
        )
    )
    assert stray == []


def _path(module: str) -> Path:
    """The file of a project module (of moma_jax or the top-level experiments package)."""
    relative = Path(*module.split("."))
    package = PACKAGE.parent / relative / "__init__.py"
    return package if package.exists() else (PACKAGE.parent / relative).with_suffix(".py")


def _third_party_importers(top: str) -> set[str]:
    """Project modules that import the third-party package `top` anywhere in their source."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == top or n.startswith(top + ".") for n in names):
                found.add(module_name(path))
    return found


def test_runs_are_opened_one_way():
    """Checkpoints are read only through train/checkpoint.py (`RunCheckpoints`, verified and
    read-only); the training loop uses it directly, and every reader (evaluate, generate, the
    compare report, notebooks) opens a run through `analysis.load_run`."""
    assert _third_party_importers("orbax") == {"moma_jax.train.checkpoint"}
    openers = {m for m, targets in GRAPH.items() if "moma_jax.train.checkpoint" in targets}
    assert {m for m in openers if not _in(m, ("moma_jax.train",))} == {"moma_jax.analysis"}
    run_files = ("moma_jax.train.checkpoint", "moma_jax.train.workdir", "moma_jax.train.metrics")
    bypass = {
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        if _in(m, (COMMANDS,))
        for t in targets
        if t in run_files
    }
    assert bypass == set()

"""The layering a newcomer can rely on: imports flow one way, apps use the public API only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in (SRC / "forge").rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every import in a file, in functions too; TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, name in _imports(path):
            if target.startswith("forge"):
                resolved = resolve(f"{target}.{name}" if name else target)
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_forge_has_no_import_cycle_even_through_imports_inside_functions():
    graph = _import_graph()
    assert graph["forge.controller.actor"] and graph["forge.controller.spawn"]  # the graph is really built
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_class_module_does_not_import_the_spawning_and_the_leaves_import_no_upper_layer():
    graph = _import_graph()
    assert "forge.controller.actor" not in graph["forge.controller.spawn"]
    assert graph["forge.controller.endpoints"] <= {"forge.controller.errors"}
    for leaf in ("forge.engine", "forge.weights", "forge.data", "forge.models", "forge.losses", "forge.observability"):
        for module, targets in graph.items():
            if module == leaf or module.startswith(leaf + "."):
                assert not any(t.startswith(("forge.controller", "forge.actors")) for t in targets), (module, targets)


def test_apps_import_only_public_names_and_call_no_built_in_endpoint():
    for path in (ROOT / "apps").rglob("*.py"):
        text = path.read_text()
        assert "_forge_" not in text, f"{path} calls a built-in endpoint by name"
        for module, name in _imports(path):
            private = [part for part in module.split(".") + [name] if part.startswith("_") and part != "__future__"]
            assert not private, f"{path} imports the private {module}.{name}"
            if module.startswith("forge.controller."):
                raise AssertionError(f"{path} reaches past forge.controller into {module}")


def test_the_project_refers_to_nothing_outside_itself():
    for path in list(SRC.rglob("*.py")) + list((ROOT / "apps").rglob("*.py")) + [ROOT / "README.md"]:
        assert "shared/" not in path.read_text(), f"{path} refers to a file outside the project"

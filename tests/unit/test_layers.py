"""The import graph of data_pipeline/: no cycles between its modules, nothing imported from the
layers above it (trainer, models, parallel), and no module using another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "data_pipeline"
FORBIDDEN = ("trainer", "models", "parallel")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) of every import statement, at any depth of the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in imports_of(path):
            # `from data_pipeline import prepare` imports the module data_pipeline.prepare.
            candidates = [target, *(f"{target}.{n}" for n in names)]
            edges[name] |= {c for c in candidates if c in modules and c != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_inside_data_pipeline():
    edges = graph()
    assert len(edges) > 10 and "data_pipeline.dataset" in edges["data_pipeline.micro_batch"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_data_pipeline_imports_no_higher_layer():
    for path in PACKAGE.rglob("*.py"):
        for target, _ in imports_of(path):
            assert target.split(".")[0] not in FORBIDDEN, f"{path.name} imports {target}"


def test_no_module_imports_another_modules_private_names():
    for path in PACKAGE.rglob("*.py"):
        for target, names in imports_of(path):
            if target.startswith("data_pipeline"):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports {private} from {target}"

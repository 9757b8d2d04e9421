"""The layers of the architecture, checked on the import graph of every package: nothing is
imported from a layer a package may not use (imports inside functions included), no two
modules import each other through any chain, and no module uses another's private names.

    common/         imports no other Loom package (every package may use it)
    models/         none of parallel/, trainer/, data_pipeline/
    data_pipeline/  neither trainer/ nor models/
    parallel/       neither trainer/ nor data_pipeline/ (what it needs is passed in)
    trainer/        composes the other three; launch/ composes everything
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "common": ("models", "data_pipeline", "parallel", "trainer"),
    "models": ("parallel", "trainer", "data_pipeline"),
    "data_pipeline": ("trainer", "models", "parallel"),
    "parallel": ("trainer", "data_pipeline"),
    "trainer": (),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> list[Path]:
    return [p for package in FORBIDDEN for p in sorted((ROOT / package).rglob("*.py"))]


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
    modules = {module_name(p): p for p in sources()}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in imports_of(path):
            # `from parallel import dist` imports the module parallel.dist.
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


def test_no_import_cycles_between_modules():
    edges = graph()
    assert "data_pipeline.dataset" in edges["data_pipeline.micro_batch"]
    assert "parallel.engine" in edges["parallel.native_engine"]
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_packages_import_only_their_layers(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        for target, _ in imports_of(path):
            top = target.split(".")[0]
            assert top not in FORBIDDEN[package], f"{path.relative_to(ROOT)} imports {target}"


def test_no_module_imports_another_modules_private_names():
    for path in sources():
        for target, names in imports_of(path):
            if target.split(".")[0] in FORBIDDEN:
                private = [n for n in names if n.startswith("_") and n != "__version__"]
                assert not private, f"{path.relative_to(ROOT)} imports {private} from {target}"


@pytest.mark.parametrize(
    ("module", "absent"),
    [
        ("parallel.state", ("trainer", "data_pipeline", "parallel.pipeline", "models")),
        ("parallel.parallelize", ("trainer", "data_pipeline")),
        ("models", ("parallel", "trainer", "data_pipeline")),
    ],
)
def test_importing_a_module_loads_no_higher_layer(module, absent):
    """What a process really loads: converting a checkpoint needs parallel.state alone."""
    code = f"import sys, {module}; print(sorted(sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = [m for m in ast.literal_eval(out) if m.split(".")[0] in FORBIDDEN]
    unwanted = [m for m in loaded if any(m == a or m.startswith(a + ".") for a in absent)]
    assert not unwanted, f"importing {module} loads {unwanted}"

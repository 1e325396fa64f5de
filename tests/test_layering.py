"""The library's floors: each module imports only from its own floor or below, and no import cycle
exists (function-level imports included). See safetybook/zoo.py for the top floor."""
from __future__ import annotations

import ast
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "safetybook"
FLOORS = {
    "models": 0, "data": 0, "cache": 0, "display": 0,
    "refusal": 1, "frozen": 1, "stats": 1, "results": 1,
    "directions": 2, "checks": 2,
    "interventions": 3, "tokens": 3, "sae": 3,
    "adapters": 4, "attribution": 4, "repair": 4, "monitor": 4,
    "zoo": 5,
    "__main__": 6, "__init__": 6,
}


def imports() -> dict[str, set[str]]:
    """Every module's imports of other library modules, anywhere in its source."""
    out = {}
    for path in LIBRARY.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safetybook"):
                found |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
        out[path.stem] = found
    return out


def test_every_module_has_a_floor():
    assert set(imports()) == set(FLOORS)


def test_imports_go_down_the_floors():
    wrong = [f"{m} (floor {FLOORS[m]}) imports {d} (floor {FLOORS[d]})"
             for m, deps in imports().items() for d in deps if FLOORS[d] > FLOORS[m]]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])

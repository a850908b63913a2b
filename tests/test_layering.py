"""Imports flow one way: tasks -> data -> models -> train / eval -> build -> run modules (no cycles)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# A module may import only from its own layer or the layers listed before it.
LAYERS = ["tasks", "lab.errors", "lab.overrides", "lab.runs", "lab.data", "lab.models", "lab.train", "lab.eval", "lab.build",
          "lab.results", "lab.cli"]
ALLOWED_UP = {  # documented exceptions: the run modules sit on top of the builder
    "lab.train.run": {"lab.build"}, "lab.eval.run": {"lab.build"}, "lab.eval.standalone": {"lab.build"},
}


def _imports() -> dict[str, set[str]]:
    out = {}
    for path in [*ROOT.joinpath("lab").rglob("*.py"), *ROOT.joinpath("tasks").rglob("*.py")]:
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("lab", "tasks"):  # from lab import runs
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("lab", "tasks"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] in ("lab", "tasks")}
        out[name] = deps
    return out


def _layer(module: str) -> int:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return matches[-1] if matches else len(LAYERS)


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(module, stack):
        state[module] = 1
        for dep in graph.get(module, ()):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack + [dep])}"
            if dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_imports_flow_from_tasks_up():
    wrong = []
    for module, deps in _imports().items():
        for dep in deps:
            if dep in ALLOWED_UP.get(module, ()):
                continue
            if _layer(dep) > _layer(module):
                wrong.append(f"{module} imports {dep}")
    assert not wrong, wrong

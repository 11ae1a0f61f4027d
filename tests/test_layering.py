"""Imports run downward only and no module imports itself back: the package's layers, checked on every import
statement (function-level ones too, which hide circles until they run)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "asyncopd"
# bottom to top: a package may import its own modules and any package listed before it
LAYERS = ["core", "config", "data", "net", "estimators", "model", "weights", "rollout", "teacher", "learner",
          "validation", "pipeline", "bench", "cli"]


def _modules() -> dict[str, Path]:
    return {".".join(("asyncopd", *p.relative_to(PKG).with_suffix("").parts)).removesuffix(".__init__"): p
            for p in PKG.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("asyncopd"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("asyncopd"))
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return -1 if len(parts) == 1 else LAYERS.index(parts[1])  # the root package holds only __version__


def test_every_package_has_a_layer():
    packages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS)


def test_imports_run_downward_only():
    modules = _modules()
    upward = [f"{m} -> {i}" for m, path in modules.items() for i in _imports(path)
              if i in modules and _layer(i) > _layer(m)]
    assert upward == []


def test_no_import_circles():
    modules = _modules()
    graph = {m: {i for i in _imports(p) if i in modules and i != m and not m.startswith(i + ".")}
             for m, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]) if n in stack else f"{m} -> {n}")
            elif n not in state:
                visit(n, [*stack, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []

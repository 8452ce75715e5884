"""The layout rules of DESIGN.md section 4, checked on the source tree: dependencies point
downwards, no import cycles, no private names imported across packages, no function over 60
lines, and ``import beyondgrad`` pulls in no plotting or app dependency (tqdm is imported by
torch.hub itself when installed; tests/test_app.py blocks it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "beyondgrad"
MAX_FUNCTION_LINES = 60
# lower layers may not import the packages listed for them
FORBIDDEN = {
    "forms": {"engine", "rules", "quantities", "linops", "linalg", "optim", "cockpit", "app"},
    "rules": {"engine", "quantities", "linops", "linalg", "optim", "cockpit", "app"},
    "engine": {"quantities", "linops", "linalg", "optim", "cockpit", "app"},
    "quantities": {"linops", "linalg", "optim", "cockpit", "app"},
    "conv": {"engine", "quantities", "linops", "linalg", "optim", "cockpit", "app"},
}
# the packages built on top (methods and trainer integrations): nothing below imports them
TOP = {"pinn", "merging", "pruning", "integrations", "app"}
for _lower in ("forms", "rules", "engine", "quantities", "conv", "linalg", "linops", "optim"):
    FORBIDDEN[_lower] = FORBIDDEN.get(_lower, set()) | TOP
FORBIDDEN["cockpit"] = FORBIDDEN.get("cockpit", set()) | TOP


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return (SRC.parent / Path(*name.split(".")) / "__init__.py").exists()


def _imports(name: str, tree: ast.Module) -> list[tuple[str, list[str], int]]:
    """Top-level (module-scope) imports of beyondgrad modules: (target, names, line)."""
    base = name.split(".") if _is_package(name) else name.split(".")[:-1]
    found = []
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(
                    base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                )
            else:
                target = node.module or ""
            if target.startswith("beyondgrad"):
                found.append((target, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("beyondgrad"):
                    found.append((a.name, [], node.lineno))
    return found


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_dependencies_point_downwards():
    bad = []
    for name, tree in MODULES.items():
        forbidden = FORBIDDEN.get(_package(name), set())
        for target, _, line in _imports(name, tree):
            if _package(target) in forbidden:
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_packages():
    bad = []
    for name, tree in MODULES.items():
        for target, names, line in _imports(name, tree):
            if _package(target) == _package(name):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private or any(p.startswith("_") for p in target.split(".")[2:]):
                bad.append(f"{name}:{line} imports {private or target} from {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for name, tree in MODULES.items():
        deps = set()
        for target, names, _ in _imports(name, tree):
            for n in names:  # `from pkg import submodule` depends on the submodule
                if f"{target}.{n}" in MODULES:
                    deps.add(f"{target}.{n}")
            if target in MODULES and not (
                _is_package(target) and all(f"{target}.{n}" in MODULES for n in names)
            ):
                deps.add(target)
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_no_function_over_60_lines():
    long = []
    for name, tree in MODULES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)


def test_import_needs_only_torch_numpy_scipy():
    code = (
        "import sys, beyondgrad\n"
        "heavy = sorted(m for m in ('matplotlib', 'sklearn', 'pandas', 'tensorboard')"
        " if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import beyondgrad pulls in {out.stdout.strip()}"

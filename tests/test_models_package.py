"""The shape of service/models/ (what models exist) beside service/llama/ (the processes): models/ never imports
llama/, and its modules import each other without a circle, lazy imports inside functions included."""
import ast
from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parent.parent / "service" / "models"


def imported(path: Path) -> set:
    """Every module the file at path imports, anywhere in it, as a dotted name (relative ones resolved)."""
    package = ["service", "models"]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import hub` imports the module service.models.hub
            found.update([module] if node.module else [f"{module}.{alias.name}" for alias in node.names])
    return found


def graph() -> dict:
    """service.models.NAME -> the service.models modules it imports."""
    modules = {f"service.models.{path.stem}": imported(path) for path in MODELS.glob("*.py")}
    return {name: {target for target in targets if target in modules} for name, targets in modules.items()}


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.py")), ids=lambda path: path.name)
def test_models_never_imports_the_processes(path):
    assert not {name for name in imported(path) if name == "service.llama" or name.startswith("service.llama.")}


def test_the_models_modules_import_each_other_without_a_circle():
    edges, done, trail = graph(), set(), []

    def visit(name):
        assert name not in trail, "import circle: " + " -> ".join(trail[trail.index(name):] + [name])
        if name in done:
            return
        trail.append(name)
        for target in sorted(edges[name]):
            visit(target)
        trail.pop()
        done.add(name)

    assert "service.models.hub" in edges and "service.models.model_file" in edges  # the pair that once circled
    for name in sorted(edges):
        visit(name)

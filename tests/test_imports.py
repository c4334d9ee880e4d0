"""The package's import graph has no circles: every import of a ``peft_sat`` module, at module level or inside a
function (where a circle would hide), points down the layers. ``if TYPE_CHECKING:`` imports are annotations only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "peft_sat"


def _module_name(path: Path) -> str:
    parts = ["peft_sat", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").is_file() or (PACKAGE / relative / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """The ``peft_sat`` modules (and sub-packages) that ``path`` imports, outside ``if TYPE_CHECKING:`` blocks."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
            else:
                self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names if alias.name.startswith("peft_sat"))

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not base.startswith("peft_sat"):
                return
            submodules = {f"{base}.{alias.name}" for alias in node.names if _is_module(f"{base}.{alias.name}")}
            # `from . import zero3` needs the module zero3, not the (partially imported) package
            if not submodules or len(submodules) < len(node.names):
                found.add(base)
            found.update(submodules)
            # importing a.b.c from outside a.b runs the __init__ of a.b first (inside it, that __init__ is running)
            parts = base.split(".")
            parents = (".".join(parts[:i]) for i in range(2, len(parts)))
            found.update(parent for parent in parents if not name.startswith(parent + "."))

    Visitor().visit(ast.parse(path.read_text()))
    found.discard(name)
    return found


def test_no_import_circles():
    graph = {_module_name(path): _imports(path) for path in PACKAGE.rglob("*.py")}
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycles.append(path[path.index(module) :] + [module])
            return
        for dependency in sorted(graph.get(module, ())):
            visit(dependency, [*path, module])

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles[:5])

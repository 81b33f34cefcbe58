"""The package's rooms: every module imports, no import cycle, and dependencies point one way.

cli -> export -> training -> evaluation -> inference -> checkpoints -> method -> backbones; the side
modules (data, config, runtime, files, logs, visualize) serve every room and import only one
another and backbones. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import hpseg

SOURCE = Path(hpseg.__file__).parent

#: Rooms from the top; a module may import its own room, lower rooms and the side modules.
ROOMS = ["cli", "export", "training", "evaluation", "inference", "checkpoints", "method", "backbones"]
SIDE = {"data", "config", "runtime", "files", "logs", "visualize"}
#: The package's front door (``hpseg.load``, ``python -m hpseg``) stands above every room.
TOP = {"hpseg", "hpseg.__main__"}


def module_name(path: Path) -> str:
    parts = ("hpseg", *path.relative_to(SOURCE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imported_modules(name: str) -> set[str]:
    """The hpseg modules ``name`` imports, anywhere in its file (``from a import b`` counts as
    ``a.b`` when ``b`` is a module)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names)
    return {module for module in found if module in MODULES and module != name}


def room(name: str) -> str:
    if name in TOP:
        return "top"
    return name.split(".")[1]


def allowed(importer: str, imported: str) -> bool:
    if imported == "hpseg":
        return True  # the package root: ``__version__``, and ``load`` imported only when asked for
    source, target = room(importer), room(imported)
    if source == "top" or target == source:
        return True
    if source in SIDE:
        return target in SIDE or target == "backbones"
    return target in SIDE or (target in ROOMS and ROOMS.index(target) > ROOMS.index(source))


def test_rooms_are_known() -> None:
    assert {room(name) for name in MODULES} <= {"top", *ROOMS, *SIDE}


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"hpseg.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_dependencies_point_down() -> None:
    wrong = sorted(f"{a} -> {b}" for a in MODULES for b in imported_modules(a) if not allowed(a, b))
    assert not wrong, "imports from a higher room:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    graph = {name: imported_modules(name) for name in MODULES}
    # A package's __init__ re-exporting its own modules is not a cycle; an __init__ importing a
    # module that imports the package back would be (both edges are in the graph).
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[name] = 2
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checks_see_a_higher_import_and_a_cycle() -> None:
    """The checks themselves, on hand-made cases."""
    assert not allowed("hpseg.backbones.weights", "hpseg.checkpoints.store")
    assert not allowed("hpseg.inference.segmenter", "hpseg.cli.predict")
    assert not allowed("hpseg.data.prepare", "hpseg.method.model")
    assert allowed("hpseg.cli.predict", "hpseg.inference.segmenter") and allowed("hpseg.checkpoints.trained", "hpseg.runtime")
    assert "hpseg.inference.crf" in imported_modules("hpseg.inference.label_maps")
    assert not allowed("hpseg.export.hub", "hpseg.cli.errors") and allowed("hpseg.cli.predict", "hpseg.export.hub")
    assert not allowed("hpseg.inference.segmenter", "hpseg.export.hub")


def test_the_onnx_runtime_imports_neither_torch_nor_hpseg() -> None:
    """``hpseg/export/onnx_runner.py`` is copied beside scripts where only numpy, Pillow and onnxruntime exist."""
    tree = ast.parse(MODULES["hpseg.export.onnx_runner"].read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    assert not imported & {"torch", "hpseg", "timm", "torchvision"}, imported
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))

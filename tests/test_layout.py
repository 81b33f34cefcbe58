"""The package's rooms: every module imports, no import cycle, and dependencies point one way.

cli -> export -> training -> evaluation -> inference -> checkpoints -> method -> backbones; the side
modules (data, config, runtime, files, logs, visualize, errors) serve every room and import only
one another and backbones. What counts as an import of a module:

- ``import`` / ``from ... import`` anywhere in the file: a lazy import inside a function is still a
  dependency;
- a name the package root serves lazily through ``hpseg.__getattr__`` (``from hpseg import load``,
  ``hpseg.load``) is an import of the module that defines it, not of the torch-free root;
- ``importlib.import_module("hpseg.x")`` / ``__import__("hpseg.x")``; a dynamic import of a name
  not written out in the file cannot be checked and is itself a violation.

The checker is a set of functions of a source tree (:class:`Layout`), so that the tests at the end
can plant each kind of violation in a copy of the package and see the check fail.
"""

from __future__ import annotations

import ast
import importlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import hpseg

SOURCE = Path(hpseg.__file__).parent

#: Rooms from the top; a module may import its own room, lower rooms and the side modules.
ROOMS = ["cli", "export", "training", "evaluation", "inference", "checkpoints", "method", "backbones"]
SIDE = {"data", "config", "runtime", "files", "logs", "visualize", "errors"}
#: The package's front door (``hpseg.load``, ``python -m hpseg``) stands above every room.
TOP = {"hpseg", "hpseg.__main__"}
DYNAMIC_IMPORTS = {("importlib", "import_module"), (None, "import_module"), (None, "__import__")}


@dataclass
class Layout:
    """The modules of the ``hpseg`` package in the folder ``source`` (its ``__init__.py`` inside)."""

    source: Path
    modules: dict[str, Path] = field(init=False)
    #: Names ``hpseg.__getattr__`` imports when asked for them -> the module they come from.
    lazy_names: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.modules = {self.module_name(path): path for path in sorted(self.source.rglob("*.py"))}
        self.lazy_names = {}
        for node in _getattr_functions(ast.parse((self.source / "__init__.py").read_text())):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    self.lazy_names.update({a.asname or a.name: inner.module for a in inner.names})

    def module_name(self, path: Path) -> str:
        parts = ("hpseg", *path.relative_to(self.source).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    def _resolve(self, base: str, names: list[str]) -> set[str]:
        """``from base import names``: ``base.name`` for each name that is a module, else ``base``;
        from the package root, a lazily served name is its defining module."""
        found: set[str] = set()
        for name in names:
            if f"{base}.{name}" in self.modules:
                found.add(f"{base}.{name}")
            elif base == "hpseg" and name in self.lazy_names:
                found.add(self.lazy_names[name])
            else:
                found.add(base)
        return found

    def imports(self, name: str) -> tuple[set[str], list[str]]:
        """The hpseg modules ``name`` imports, and its dynamic imports that cannot be checked."""
        path = self.modules[name]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        skipped = {id(n) for f in _getattr_functions(tree) for n in ast.walk(f)} if name == "hpseg" else set()
        found: set[str] = set()
        unchecked: list[str] = []
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue  # the root's lazy imports belong to whoever asks for the name
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                found |= self._resolve(base, [a.name for a in node.names])
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "hpseg":
                found |= self._resolve("hpseg", [node.attr]) - {"hpseg"}  # hpseg.load(...) after `import hpseg`
            elif isinstance(node, ast.Call) and _is_dynamic_import(node):
                target = node.args[0] if node.args else None
                if isinstance(target, ast.Constant) and isinstance(target.value, str):
                    found.add(target.value)
                else:
                    unchecked.append(f"{name}:{node.lineno}: dynamic import of a computed name: "
                                     f"{ast.unparse(node)}")
        return {module for module in found if module in self.modules and module != name}, unchecked

    def graph(self) -> dict[str, set[str]]:
        return {name: self.imports(name)[0] for name in self.modules}


def _getattr_functions(tree: ast.Module) -> Iterator[ast.FunctionDef]:
    return (node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__")


def _is_dynamic_import(call: ast.Call) -> bool:
    function = call.func
    if isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name):
        return (function.value.id, function.attr) in DYNAMIC_IMPORTS
    return isinstance(function, ast.Name) and (None, function.id) in DYNAMIC_IMPORTS


def room(name: str) -> str:
    if name in TOP:
        return "top"
    return name.split(".")[1]


def allowed(importer: str, imported: str) -> bool:
    if imported == "hpseg":
        return True  # the package root: ``__version__``; its lazy names resolve to their modules
    source, target = room(importer), room(imported)
    if source == "top" or target == source:
        return True
    if source in SIDE:
        return target in SIDE or target == "backbones"
    return target in SIDE or (target in ROOMS and ROOMS.index(target) > ROOMS.index(source))


def upward_imports(layout: Layout) -> list[str]:
    graph = layout.graph()
    return sorted(f"{a} -> {b}" for a in graph for b in graph[a] if not allowed(a, b))


def unchecked_imports(layout: Layout) -> list[str]:
    return sorted(line for name in layout.modules for line in layout.imports(name)[1])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None (depth-first)."""
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
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def help_imports(source: Path) -> list[str]:
    """The heavy modules (torch, timm, torchvision) that ``hpseg --help`` and every command's
    ``--help`` import, in a fresh interpreter running the package in ``source``."""
    script = (
        "import contextlib, io, sys\n"
        "from hpseg.cli.main import build_parser, main\n"
        "commands = [[]] + [[name] for name in build_parser()._subparsers._group_actions[0].choices]\n"
        "for command in commands:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([*command, '--help'])\n"
        "print(' '.join(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules)))\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(source.parent)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def assert_layout(layout: Layout) -> None:
    """The static checks, failing with a message that names each violation."""
    wrong = upward_imports(layout)
    assert not wrong, "imports from a higher room:\n" + "\n".join(wrong)
    unchecked = unchecked_imports(layout)
    assert not unchecked, "imports the layout test cannot follow:\n" + "\n".join(unchecked)
    cycle = find_cycle(layout.graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def assert_help_is_torch_free(source: Path) -> None:
    heavy = help_imports(source)
    assert not heavy, f"`hpseg --help` imports {', '.join(heavy)} (docs/architecture.md: it must not)"


# ------------------------------------------------------------------------------ the package itself

LAYOUT = Layout(SOURCE)


def test_rooms_are_known() -> None:
    assert {room(name) for name in LAYOUT.modules} <= {"top", *ROOMS, *SIDE}
    assert set(LAYOUT.lazy_names) >= {"load", "Segmenter"}


@pytest.mark.parametrize("name", sorted(set(LAYOUT.modules) - {"hpseg.__main__"}))  # __main__ runs the CLI
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_dependencies_point_down_without_a_cycle() -> None:
    assert_layout(LAYOUT)


def test_help_imports_no_torch() -> None:
    assert_help_is_torch_free(SOURCE)


def test_no_test_module_imports_another() -> None:
    """Shared test code lives in tests/helpers.py and tests/conftest.py, not in a test module."""
    tests = Path(__file__).parent
    found = sorted(f"{path.name}: {module}" for path in tests.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                   for module in ([a.name for a in node.names] if isinstance(node, ast.Import) else
                                  [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                   if module.startswith("tests.test_") or module.startswith("test_"))
    assert not found, found


def test_the_onnx_runtime_imports_neither_torch_nor_hpseg() -> None:
    """``hpseg/export/onnx_runner.py`` is copied beside scripts where only numpy, Pillow and onnxruntime exist."""
    tree = ast.parse(LAYOUT.modules["hpseg.export.onnx_runner"].read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
    assert not imported & {"torch", "hpseg", "timm", "torchvision"}, imported
    assert not any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree))


# ------------------------------------------------------------------ the checks on planted violations


def test_the_rules_on_hand_made_pairs() -> None:
    assert not allowed("hpseg.backbones.weights", "hpseg.checkpoints.store")
    assert not allowed("hpseg.inference.segmenter", "hpseg.cli.predict")
    assert not allowed("hpseg.data.prepare", "hpseg.method.model")
    assert allowed("hpseg.cli.predict", "hpseg.inference.segmenter") and allowed("hpseg.checkpoints.trained", "hpseg.runtime")
    assert not allowed("hpseg.export.hub", "hpseg.cli.errors") and allowed("hpseg.cli.predict", "hpseg.export.hub")
    assert allowed("hpseg.method.model", "hpseg.errors") and not allowed("hpseg.errors", "hpseg.method.model")


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A copy of the package, to plant violations in; returns its ``hpseg`` folder."""
    copy = tmp_path / "src" / "hpseg"
    shutil.copytree(SOURCE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert_layout(Layout(copy))  # the copy itself passes
    return copy


def _plant(package: Path, module: str, text: str) -> None:
    path = package.joinpath(*module.split(".")[1:]).with_suffix(".py")
    path.write_text(text)


def test_a_name_served_by_hpseg_getattr_is_an_import_of_its_module(planted: Path) -> None:
    """``from hpseg import load`` in method/ passed when bare ``hpseg`` imports were all allowed."""
    _plant(planted, "hpseg.method.planted", "from hpseg import load\n")
    _plant(planted, "hpseg.backbones.planted", "import hpseg\n\n\ndef f():\n    return hpseg.Segmenter\n")
    with pytest.raises(AssertionError) as failure:
        assert_layout(Layout(planted))
    message = str(failure.value)
    loader = Layout(planted).lazy_names["load"]
    assert f"hpseg.method.planted -> {loader}" in message
    assert "hpseg.backbones.planted -> hpseg.inference.segmenter" in message


def test_a_dynamic_import_is_an_import(planted: Path) -> None:
    _plant(planted, "hpseg.inference.planted",
           'import importlib\n\n\ndef cli():\n    return importlib.import_module("hpseg.cli.main")\n')
    with pytest.raises(AssertionError, match=r"hpseg\.inference\.planted -> hpseg\.cli\.main"):
        assert_layout(Layout(planted))


def test_a_dynamic_import_of_a_computed_name_cannot_be_checked(planted: Path) -> None:
    _plant(planted, "hpseg.data.planted", 'from importlib import import_module\n\n\n'
                                          'def room(name):\n    return import_module(f"hpseg.{name}")\n')
    with pytest.raises(AssertionError, match=r"hpseg\.data\.planted:5: dynamic import of a computed name"):
        assert_layout(Layout(planted))


def test_a_cycle_inside_one_room(planted: Path) -> None:
    """Both modules in one room: the direction check passes them, only the cycle check sees it."""
    _plant(planted, "hpseg.data.planted_a", "from hpseg.data import planted_b\n")
    _plant(planted, "hpseg.data.planted_b", "def f():\n    from hpseg.data.planted_a import g\n")
    layout = Layout(planted)
    assert not upward_imports(layout)
    with pytest.raises(AssertionError) as failure:
        assert_layout(layout)
    assert str(failure.value).startswith(
        "import cycle: hpseg.data.planted_a -> hpseg.data.planted_b -> hpseg.data.planted_a")


def test_a_cycle_through_the_root_is_not_assumed_from_version_imports() -> None:
    """``from hpseg import __version__`` depends on the torch-free root only, not on every lazy name."""
    graph = LAYOUT.graph()
    assert graph["hpseg"] == set() and "hpseg" in graph["hpseg.cli.main"]


def test_torch_in_help_is_seen(planted: Path) -> None:
    parser_module = planted / "cli" / "export.py"  # imported by cli/main.py to build the parser
    parser_module.write_text(parser_module.read_text() + "\nimport torch  # noqa: E402,F401\n")
    with pytest.raises(AssertionError, match=r"`hpseg --help` imports torch"):
        assert_help_is_torch_free(planted)

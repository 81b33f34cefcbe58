"""The README and the documentation pages are tested: every ``hpseg`` command they show parses
with the real CLI (subcommand, flags, presets, config keys), and README's Python example runs.
Documentation that drifts is a bug."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from hpseg.cli.main import build_parser
from tests.helpers import DOCUMENTS, README, code_blocks

TEST_COMMAND = 'pip install -e ".[test,crf]" && HF_HUB_OFFLINE=1 python -m pytest -n 2'


def shell_commands(body: str) -> list[list[str]]:
    """The ``hpseg ...`` commands of a shell block, split into argv (after ``hpseg``)."""
    joined = re.sub(r"\\\n", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|\|\||;|\|", line):
            words = shlex.split(part, comments=True)
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
                words = words[1:]
            if words[:1] == ["hpseg"]:
                commands.append(words[1:])
            elif words[:3] == ["python", "-m", "hpseg"]:
                commands.append(words[3:])
    return commands


def readme_commands(document: Path = README) -> list[list[str]]:
    blocks = code_blocks(document.read_text())
    return [argv for language, body in blocks if language in ("", "bash", "sh", "shell", "console")
            for argv in shell_commands(body)]


def documented_commands() -> list[tuple[str, list[str]]]:
    """(file name, argv) of every command in README and the documentation pages."""
    return [(document.name, argv) for document in DOCUMENTS for argv in readme_commands(document)]


def test_readme_keeps_the_ci_test_command() -> None:
    text = README.read_text()
    after = text.split("<!-- test-command -->", 1)[1]
    block = re.search(r"```[^\n]*\n(.*?)```", after, re.S)
    assert block is not None and block.group(1).strip() == TEST_COMMAND


def test_quick_start_installs_and_runs_the_demo() -> None:
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [body.strip() for _, body in code_blocks(quick)]
    assert commands[0] == "pip install -e . && hpseg demo" and commands[1] == TEST_COMMAND


def test_test_command_note_gives_the_cpu_install() -> None:
    """The note above the test command must not suggest the default (CUDA) wheels: the tests run
    on the CPU, and README's own install advice for the CPU is the CPU index."""
    note = README.read_text().split("## Quick start", 1)[1].split("<!-- test-command -->", 1)[0]
    installs = re.findall(r"pip install torch[^`\n]*", note)
    assert installs and all("--index-url https://download.pytorch.org/whl/cpu" in line for line in installs)


def test_quick_start_mentions_offline_use() -> None:
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "HF_HUB_OFFLINE=1" in quick.split("<!-- test-command -->", 1)[0]


def test_readme_shows_every_subcommand() -> None:
    shown = {argv[0] for argv in readme_commands()}
    assert {"demo", "predict", "prepare", "train", "eval", "import-checkpoint"} <= shown


def test_docs_show_every_subcommand() -> None:
    from hpseg.cli.main import build_parser

    subcommands = set(next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices).choices)
    shown = {argv[0] for _, argv in documented_commands()}
    assert subcommands <= shown, f"commands no page shows: {sorted(subcommands - shown)}"


@pytest.mark.parametrize(("document", "argv"), documented_commands(),
                         ids=[f"{name}: {' '.join(argv)[:60]}" for name, argv in documented_commands()])
def test_readme_command_parses(document: str, argv: list[str]) -> None:
    from hpseg.config import load_preset

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"{document}: command `hpseg {' '.join(argv)}` does not parse (exit {exit_.code})")
    if getattr(args, "preset", None):
        config = load_preset(args.preset)  # a shipped preset name
        config.override(list(getattr(args, "overrides", [])))  # every key=value is a real config key


def test_readme_python_example_runs(tiny_run: Path, data_root: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The API example, on a checkpoint and an image placed where the example looks for them."""
    blocks = [body for language, body in code_blocks(README.read_text()) if language == "python"]
    example = next(body for body in blocks if "hpseg.load(" in body)
    checkpoint = tmp_path / "hpseg-demo" / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(tiny_run / "checkpoints" / "last.pt", checkpoint)
    image = re.search(r'Image\.open\("([^"]+)"\)', example)
    assert image is not None
    source = next((data_root / "val" / "images").glob("*.png"))
    (tmp_path / image.group(1)).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, tmp_path / image.group(1))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    from PIL import Image

    height, width = Image.open(tmp_path / image.group(1)).size[::-1]
    assert namespace["clusters"].shape == (height, width) and namespace["classes"].shape == (height, width)
    assert namespace["features"].segmentation.ndim == 3

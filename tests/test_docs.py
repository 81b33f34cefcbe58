"""The documentation site's generated parts and README's links: the CLI reference lists every
command and option of the real parser, and every relative link of README points to a file that
exists (``mkdocs build --strict`` checks the pages under docs/, not README)."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

from hpseg.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _cli_reference() -> str:
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "docs" / "hooks" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "docs" / "cli.md").read_text()
    assert module.MARKER in page
    return module.on_page_markdown(page, None, None, None)


def test_cli_reference_lists_every_command_and_option() -> None:
    text = _cli_reference()
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in subparsers.choices.items():
        section = text.split(f"\n## hpseg {name}\n", 1)[1].split("\n## hpseg ", 1)[0]
        for action in parser._actions:
            if action.dest in ("help", "verbosity", "debug"):
                continue
            shown = action.option_strings or [action.metavar or action.dest]
            assert all(f"`{flag}`" in section for flag in shown), (name, shown)
    assert "`--quiet`" in text.split("\n## hpseg backbones\n", 1)[0]  # shared options: once, at the top


def test_readme_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    anchors = {re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-")
               for heading in re.findall(r"^#+ (.+)$", readme, re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        if target.startswith("#"):
            assert target[1:] in anchors, target
        else:
            assert (ROOT / target.split("#", 1)[0]).exists(), target

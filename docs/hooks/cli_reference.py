"""MkDocs hook: the command-line reference, generated from hpseg's own argparse parsers.

A page containing the marker ``<!-- cli-reference -->`` gets, in its place, one section per
``hpseg`` subcommand: its help line, its usage and a table of its arguments (flags, default,
help), read from :func:`hpseg.cli.main.build_parser` at build time. The reference therefore
cannot drift from the command: a new flag appears on the next ``mkdocs build``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

MARKER = "<!-- cli-reference -->"
SRC = Path(__file__).resolve().parents[2] / "src"


def _parser() -> argparse.ArgumentParser:
    if str(SRC) not in sys.path:  # the docs build from a clone also works without `pip install -e .`
        sys.path.insert(0, str(SRC))
    from hpseg.cli.main import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help line, parser) of every subcommand, in the order ``hpseg --help`` lists them."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
    return [(name, helps.get(name, ""), sub) for name, sub in action.choices.items()]


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _argument_row(action: argparse.Action) -> str | None:
    if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
        return None
    if action.option_strings:
        names = ", ".join(f"`{flag}`" for flag in action.option_strings)
        if action.nargs != 0:
            names += f" `{action.metavar or action.dest.upper()}`" + (" ..." if action.nargs in ("+", "*") else "")
    else:
        names = f"`{action.metavar or action.dest}`" + (" ..." if action.nargs in ("+", "*") else "")
    default = action.default
    shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs in ("+", "*") else f"`{default}`"
    choices = f" (one of: {', '.join(f'`{c}`' for c in action.choices)})" if action.choices else ""
    return f"| {names} | {shown} | {_cell((action.help or '') % {'default': default} if action.help else '')}{choices} |"


#: Options every subcommand shares (``--quiet``, ``--verbose``, ``--debug``): listed once, under ``hpseg``.
SHARED = {"verbosity", "debug"}


def _section(name: str, help_line: str, parser: argparse.ArgumentParser) -> str:
    usage = parser.format_usage().replace("usage: ", "", 1).strip()
    rows = [row for action in parser._actions if action.dest not in SHARED and (row := _argument_row(action))]
    lines = [f"## hpseg {name}", "", help_line[:1].upper() + help_line[1:] + ".", "", "```", usage, "```", ""]
    if rows:
        lines += ["| argument | default | meaning |", "|---|---|---|", *rows, ""]
    return "\n".join(lines)


def cli_reference() -> str:
    """The Markdown of every subcommand's section."""
    parser = _parser()
    parser.prog = "hpseg"
    global_rows = [row for action in parser._actions
                   if not isinstance(action, argparse._SubParsersAction) and (row := _argument_row(action))]
    subcommands = _subcommands(parser)
    head = ["## hpseg", "", parser.description or "", "", "```", parser.format_usage().replace("usage: ", "", 1).strip(),
            "```", "", "| command | what it does |", "|---|---|",
            *[f"| [`{name}`](#hpseg-{name}) | {_cell(help_line)} |" for name, help_line, _ in subcommands], "",
            "Options of every command (before or after its name):", "",
            "| argument | default | meaning |", "|---|---|---|", *global_rows, ""]
    return "\n".join(head) + "\n" + "\n".join(_section(*sub) for sub in subcommands)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 - MkDocs' hook signature
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())

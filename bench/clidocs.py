"""Shared by the CLI reference generators: render every command's ``--help`` of a click group.

The help is rendered at a fixed width so the files do not depend on the terminal. Each
generator (gen_fleet_cli_docs.py, gen_agent_cli_docs.py) names its group, program name, output
file and header; a test per CLI fails when the checked-in file differs from what it generates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click

__all__ = ["WIDTH", "commands", "generate", "help_text", "main"]

WIDTH = 100


def _context(command: click.Command, parent: click.Context | None, prog: str) -> click.Context:
    settings = {k: v for k, v in command.context_settings.items()
                if k not in ("terminal_width", "max_content_width")}
    return click.Context(command, info_name=prog if parent is None else command.name,
                         parent=parent, terminal_width=WIDTH, max_content_width=WIDTH,
                         **settings)


def help_text(command: click.Command, parent: click.Context | None, prog: str) -> str:
    """The ``--help`` output of ``command`` (a subcommand of ``parent``), at :data:`WIDTH`."""
    return command.get_help(_context(command, parent, prog))


def commands(group: click.Group, prog: str, parent: click.Context | None = None
             ) -> Iterator[tuple[str, click.Command, click.Context | None]]:
    """Every command and group under ``group``, depth first: (full path, command, parent)."""
    ctx = _context(group, parent, prog)
    yield ctx.command_path, group, parent
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        assert sub is not None, name
        if isinstance(sub, click.Group):
            yield from commands(sub, prog, ctx)
        else:
            yield f"{ctx.command_path} {name}", sub, ctx


def generate(group: click.Group, prog: str, header: str) -> str:
    """The whole reference file, from the live click commands."""
    sections = [header]
    for path, command, parent in commands(group, prog):
        sections.append(f"## `{path}`\n\n```text\n{help_text(command, parent, prog)}\n```\n")
    return "\n".join(sections)


def main(text: str, docs_path: Path, script: str, argv: list[str] | None = None) -> int:
    """Write ``text`` to ``docs_path`` (or with ``--check``, compare); return the exit code."""
    args = sys.argv[1:] if argv is None else argv
    if args == ["--check"]:
        current = docs_path.read_text(encoding="utf-8") if docs_path.is_file() else ""
        if current != text:
            print(f"{docs_path} is out of date: run .venv/bin/python {script}", file=sys.stderr)
            return 1
        return 0
    if args:
        print(f"usage: {Path(script).name} [--check]", file=sys.stderr)
        return 2
    docs_path.write_text(text, encoding="utf-8")
    print(f"wrote {docs_path}")
    return 0

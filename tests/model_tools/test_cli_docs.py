"""The CLI documents itself (STYLE rule 19) and the public surface is explicit (rule 20).

* every command and the group answer ``-h`` and ``--help``, show an example and the exit codes;
* ``--version`` prints the installed version;
* docs/cli-reference.md is exactly what bench/gen_cli_docs.py generates from ``--help`` now;
* ``__all__`` of the wire-format and error modules lists exactly the public names they define.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import click
import pytest
from click.testing import CliRunner

from model_tools.cli import cli

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "bench" / "gen_cli_docs.py"
DOCS = ROOT / "docs" / "cli-reference.md"
REGENERATE = "run .venv/bin/python bench/gen_cli_docs.py"

COMMANDS = sorted(cli.commands)
# (argv prefix, id): the group itself and each of its commands
TARGETS = [pytest.param([], id="group")] + [pytest.param([c], id=c) for c in COMMANDS]


def _invoke(args: list[str]) -> click.testing.Result:
    return CliRunner().invoke(cli, args, prog_name="model_tools")


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_cli_docs", GENERATOR)
    assert spec is not None and spec.loader is not None, f"cannot import {GENERATOR}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_commands_we_document_exist() -> None:
    assert {"convert", "profiles", "inspect"} <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("prefix", TARGETS)
def test_help_flags_work(prefix: list[str], flag: str) -> None:
    result = _invoke([*prefix, flag])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: model_tools")
    assert " ".join(["model_tools", *prefix]) in result.output.splitlines()[0]


@pytest.mark.parametrize("prefix", TARGETS)
def test_help_has_an_example_and_the_exit_codes(prefix: list[str]) -> None:
    text = _invoke([*prefix, "--help"]).output
    assert "Example" in text, f"`model_tools {' '.join(prefix)} --help` shows no example"
    assert "model_tools " + " ".join(prefix) in text.split("Example", 1)[1]
    assert "Exit codes:" in text
    for code in ("0 ok", "1 error", "2 usage error", "3 refused"):
        assert code in " ".join(text.split()), f"exit code {code!r} is not documented"


def test_version_prints_the_installed_version() -> None:
    result = _invoke(["--version"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"model_tools, version {version('edgefleet')}"


def test_cli_reference_is_generated_from_help() -> None:
    expected = _load_generator().generate()
    current = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "<missing>"
    assert current == expected, f"{DOCS.relative_to(ROOT)} is out of date: {REGENERATE}"


def test_cli_reference_documents_every_command() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for name in COMMANDS:
        assert f"## `model_tools {name}`" in text, f"{name} is not documented: {REGENERATE}"


def test_generated_help_matches_what_users_see() -> None:
    """The docs are rendered without a terminal; they must still be the real help text."""
    generator = _load_generator()
    for name in COMMANDS:
        shown = _invoke([name, "--help"]).output
        documented = generator.help_text(cli.commands[name], click.Context(
            cli, info_name="model_tools"))
        # same text, possibly wrapped at another width
        assert " ".join(shown.split()) == " ".join(documented.split())


# --- explicit public surface (cf. httpx tests/test_exported_members.py) --------------------

def _defined_public_names(module: ModuleType) -> set[str]:
    """Public names bound at the top level of the module's own source (not imported ones)."""
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("module_name", ["agent.protocol.manifest", "model_tools.errors"])
def test_all_lists_exactly_the_public_names(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"{module_name}.__all__ has duplicates"
    defined = _defined_public_names(module)
    assert set(exported) == defined, (
        f"{module_name}.__all__ is missing {sorted(defined - set(exported))} "
        f"and lists undefined {sorted(set(exported) - defined)}")
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name!r}"

"""The agent CLI is documented: help, examples, exit codes, and a generated reference."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import click
import pytest
from click.testing import CliRunner

from agent.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def _generator() -> ModuleType:
    path = ROOT / "bench" / "gen_agent_cli_docs.py"
    spec = importlib.util.spec_from_file_location("gen_agent_cli_docs", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COMMANDS = sorted(cli.list_commands(click.Context(cli)))


def test_the_commands_the_design_names_exist() -> None:
    assert {"run", "status", "predict"} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_has_help_with_an_example_and_exit_codes(command: str, flag: str) -> None:
    result = CliRunner().invoke(cli, [command, flag])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output and "Exit codes" in result.output


def test_version() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and version("edgefleet") in result.output


def test_reference_doc_is_up_to_date() -> None:
    gen = _generator()
    assert gen.DOCS_PATH.read_text(encoding="utf-8") == gen.generate(), (
        "docs/agent-cli.md is stale: run .venv/bin/python bench/gen_agent_cli_docs.py")
    for command in COMMANDS:
        assert f"## `edgefleet-agent {command}`" in gen.generate()


def test_bad_config_exits_1_naming_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('provisioning = "p.json"\ndata_dir = "d"\nhttp_port = "x"\n')
    done = subprocess.run([sys.executable, "-m", "agent", "status", "--config", str(cfg)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "http_port" in done.stderr


def test_predict_with_a_malformed_body_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["predict", "digits", "--json", json.dumps({"x": 1})])
    assert result.exit_code == 2 and "inputs" in result.output


def test_the_agent_imports_nothing_from_the_server_or_the_converter() -> None:
    """`pip install edgefleet[agent]` must stay light: the daemon and CLI may not import the
    server, the converter or their heavy dependencies (checked in a fresh interpreter)."""
    code = ("import sys, agent.daemon.app, agent.cli\n"
            "heavy = ('fleet_server', 'model_tools', 'fastapi', 'uvicorn', 'sqlalchemy', 'amqtt',"
            " 'onnx', 'torch', 'sklearn', 'skl2onnx', 'tensorflow', 'rich')\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout

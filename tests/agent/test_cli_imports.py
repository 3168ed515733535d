"""``edgefleet-agent --help``, ``--version`` and ``predict`` do not import the daemon, and
``run`` refuses an unknown event loop before it starts anything (fresh interpreters)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

#: modules only the daemon needs: importing any of them for --help is the slow path
DAEMON_ONLY = ("agent.daemon", "agent.updater", "agent.buffer", "tuf", "paho", "sqlite_utils",
               "onnxruntime", "asyncio")

PROBE = """
import sys
from agent.cli import cli
try:
    cli(args=sys.argv[1:], prog_name="edgefleet-agent")
except SystemExit as exc:
    code = exc.code
heavy = sorted({{m for m in sys.modules for d in {daemon!r} if m == d or m.startswith(d + ".")}})
print("IMPORTED", heavy, "EXIT", code)
"""


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["predict", "--help"],
                                  ["run", "--help"], ["status", "--help"]],
                         ids=["help", "version", "predict-help", "run-help", "status-help"])
def test_help_and_version_import_nothing_of_the_daemon(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(daemon=DAEMON_ONLY), *args],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("IMPORTED [] EXIT 0"), done.stdout + done.stderr
    if args == ["--version"]:
        assert f"edgefleet-agent, version {version('edgefleet')}" in done.stdout


def test_run_refuses_an_unknown_event_loop(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('provisioning = "p.json"\ndata_dir = "d"\n')
    done = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(cfg)],
                          capture_output=True, text=True, check=False,
                          env=dict(os.environ, EDGEFLEET_EVENT_LOOP="trio"))
    assert done.returncode == 1, done.stderr
    assert "EDGEFLEET_EVENT_LOOP: expected one of auto, uvloop, asyncio, got 'trio'" in done.stderr

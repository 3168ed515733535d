"""bench/ingest.py end to end at a tiny size: real Mosquitto, real publisher processes, the real
server runtime and SQLite, one ceiling run and two server runs.

It asserts what the benchmark checks (every device's seqs stored exactly once, every ack stored
and received) and that both rates were measured; never how fast anything was.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from fleet_server.mqtt.mosquitto import find_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
DEVICES = 10
ROWS = 2_000


@pytest.fixture
def bench_ingest(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/ingest.py imported by name from bench/ on sys.path: its publisher processes are
    spawned and import it the same way (spawn hands them this sys.path)."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    module = importlib.import_module("ingest")
    monkeypatch.setitem(sys.modules, "ingest", module)  # so it is forgotten afterwards
    return module


def test_every_row_is_stored_once_and_both_rates_are_measured(
        bench_ingest: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_ingest.main(["--devices", str(DEVICES), "--rows", str(ROWS), "--batch", "40",
                              "--repeat", "2", "--workers", "2", "--in-flight", "8",
                              "--dir", str(tmp_path / "work"), "--json"])
    out = json.loads(capsys.readouterr().out)

    assert code == 0
    assert out["integrity"] is True
    assert (out["lost"], out["duplicated"], out["stray"]) == (0, 0, 0)
    assert [c["passed"] for c in out["checks"]] == [True, True]
    second = out["checks"][1]  # seqs continue: two runs of ROWS rows each
    assert second["stored_rows"] == second["expected_rows"] == 2 * ROWS
    assert second["devices_exact"] == second["acks_stored"] == second["acks_received"] == DEVICES
    assert [r["kind"] for r in out["runs"]] == ["ceiling", "server", "ceiling", "server"]
    assert all(r["rows"] == ROWS and r["messages"] == ROWS // 40 for r in out["runs"])
    assert out["ceiling_rows_per_s"] > 0 and out["server_rows_per_s"] > 0
    assert out["server_cpu_s"] > 0
    assert out["goal"] in ("PASS", "MISS")


def test_a_batch_over_the_message_limit_is_refused_by_name(
        bench_ingest: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_ingest.main(["--devices", "2", "--rows", "2000", "--batch", "1000",
                              "--repeat", "1", "--workers", "1", "--dir", str(tmp_path / "work")])

    assert code == 1
    assert "--batch 1000" in capsys.readouterr().err

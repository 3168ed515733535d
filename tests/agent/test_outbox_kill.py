"""kill -9 against a real outbox file: every row the writer saw committed survives, once.

A child process appends rows in committed transactions (single rows and batches, on both
streams) and prints each committed seq after the commit returns. The parent reads a few
hundred of those lines, SIGKILLs the child mid-stream, reopens the file and checks it. Three
kills at different points, on the same file, so each run also restarts after the previous
kill. WAL with synchronous=NORMAL loses nothing committed to a process kill; only a power cut
can roll back the last transactions (see agent.buffer.store).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.buffer import Outbox

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEVICE = "pi-01"

# prints "<stream> <seq> <token>" for every row, only after its transaction committed
CHILD = r"""
import sys
from agent.buffer import Outbox

path, run = sys.argv[1], int(sys.argv[2])
box = Outbox.open(path, device_id="pi-01", max_rows=10_000_000, now=1000.0)
out = sys.stdout
i = 0
while True:
    if i % 4 == 0:  # a batch in one transaction
        tokens = [f"{run}:{i + j}" for j in range(25)]
        seqs = box.append_many("telemetry", [("m", {"t": t, "pad": "x" * 100}, 1000.0)
                                             for t in tokens], priority="metrics")
        for seq, token in zip(seqs, tokens):
            out.write(f"telemetry {seq} {token}\n")
        i += 25
    else:
        stream = "drift" if i % 4 == 1 else "telemetry"
        token = f"{run}:{i}"
        seq = box.append(stream, "e", {"t": token}, at=1000.0, priority="event")
        out.write(f"{stream} {seq} {token}\n")
        i += 1
    out.flush()
"""


def run_and_kill(script: Path, db: Path, run: int, kill_after: int) -> list[tuple[str, int, str]]:
    """Start the child, read ``kill_after`` committed lines, SIGKILL it, return every line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(db), str(run)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env, cwd=db.parent)
    assert child.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < kill_after:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"child died early: {child.stderr.read()}"
                                     if child.stderr else "child died early")
            lines.append(line)
        os.kill(child.pid, signal.SIGKILL)
        # whatever it printed before dying was committed too
        lines.extend(child.stdout.readlines())
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
        child.stdout.close()
        if child.stderr:
            child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    parsed = []
    for line in lines:
        if not line.endswith("\n"):  # killed mid-write of the line: the row may or may not be
            continue                 # there, and was not reported
        stream, seq, token = line.split()
        parsed.append((stream, int(seq), token))
    return parsed


def test_kill_9_loses_no_committed_row_and_duplicates_none(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "outbox.db"
    reported: list[tuple[str, int, str]] = []
    for run, kill_after in enumerate((150, 400, 275)):
        reported += run_and_kill(script, db, run, kill_after)

        box = Outbox.open(db, device_id=DEVICE, max_rows=10_000_000, now=2000.0)
        try:
            assert box.corrupt_reset is None
            assert box.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            present = {}
            for stream in ("telemetry", "drift"):
                for rec in box.pending(stream, 1_000_000):
                    present[(stream, rec.seq)] = rec.body["t"]
            # every row the child saw committed is there, under the seq it was given
            missing = [r for r in reported if present.get((r[0], r[1])) != r[2]]
            assert not missing, f"run {run}: {len(missing)} committed rows lost: {missing[:5]}"
            # nothing duplicated: each token once, each (stream, seq) once (primary key)
            tokens = list(present.values())
            assert len(tokens) == len(set(tokens))
            # the counters are past everything stored: no seq can be handed out twice
            stats = box.stats()
            for stream in ("telemetry", "drift"):
                seqs = [seq for (s, seq) in present if s == stream]
                assert stats.streams[stream].next_seq == max(seqs) + 1
                assert sorted(seqs) == list(range(1, max(seqs) + 1))  # no gaps either
        finally:
            box.close()
    assert len(reported) >= 825

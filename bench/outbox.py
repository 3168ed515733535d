"""Benchmark the SQLite outbox: append rate against raw sqlite3, and the local cost of a drain.

Usage::

    .venv/bin/python bench/outbox.py                   # 200k-row drain, ~30 s
    .venv/bin/python bench/outbox.py --rows 1000000    # the full figure
    .venv/bin/python bench/outbox.py --dir /mnt/sd     # measure on another filesystem

What it measures, on real files in ``--dir`` (default ``bench/out/outbox``, gitignored):

1. **append, transactions of 500 rows**: ``Outbox.append_many`` against the peer, raw
   ``sqlite3`` ``executemany`` into an equivalent table (same columns, same UNIQUE and priority
   indexes, WAL, ``synchronous=NORMAL``) with bodies serialised by ``json.dumps``: the least any
   store of these rows can cost from Python. Reported as rows/s and as the ratio outbox/peer.
2. **append, one row per transaction**: ``Outbox.append`` against the peer doing one INSERT per
   ``BEGIN ... COMMIT``.
3. **drain**: a backlog of ``--rows`` metrics rows sent the way the daemon sends them:
   ``build_batches(stream, 500)`` (which checkpoints the WAL first: nothing leaves the device
   before it is durable), ``to_bytes()`` of every batch (what would be published; the wire
   format re-checks each message) and ``ack`` of the last seq. No broker here, so this is the
   device's local cost per row. The peer selects 500 rows, joins their stored JSON into one
   payload and deletes them.

The runs of the outbox and the peer alternate (``--repeat`` times; the median is reported)
so that drift in the machine's speed hits both. Results go to stdout as Markdown tables;
progress to stderr. Exit codes: 0 done, 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.buffer import Outbox  # noqa: E402 - after the sys.path line above

DEVICE = "bench-01"
BODY: dict[str, Any] = {
    "version": 1, "model": "digits-mlp", "model_version": "3",
    "interval": {"start": 1700000000.0, "end": 1700000010.0},
    "count": 120, "ok": 117, "errors": {"4xx": 2, "5xx": 0, "runtime": 1},
    "latency_ms": {"p50": 1.6, "p95": 4.1, "p99": 8.2, "max": 9.7, "sum": 201.4},
}
PEER_SCHEMA = """
CREATE TABLE records (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, seq INTEGER NOT NULL,
                      priority TEXT NOT NULL, kind TEXT NOT NULL, at INTEGER NOT NULL,
                      body TEXT NOT NULL, UNIQUE (stream, seq));
CREATE INDEX records_priority ON records (priority, id);
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fresh(directory: Path, name: str) -> Path:
    path = directory / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return path


def open_outbox(path: Path, max_rows: int = 50_000_000) -> Outbox:
    return Outbox.open(path, device_id=DEVICE, max_rows=max_rows, now=1.0)


def open_peer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=wal")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(PEER_SCHEMA)
    return conn


# ---------------------------------------------------------------------------------------------
# append
# ---------------------------------------------------------------------------------------------
def outbox_append(directory: Path, rows: int, batch: int) -> float:
    box = open_outbox(fresh(directory, "outbox.db"))
    try:
        started = time.perf_counter()
        if batch == 1:
            for i in range(rows):
                box.append("telemetry", "metrics.requests", BODY, at=1700000000 + i,
                           priority="metrics")
        else:
            for start in range(0, rows, batch):
                box.append_many("telemetry", [("metrics.requests", BODY, 1700000000 + i)
                                              for i in range(start, min(rows, start + batch))],
                                priority="metrics")
        return rows / (time.perf_counter() - started)
    finally:
        box.close()


def peer_append(directory: Path, rows: int, batch: int) -> float:
    conn = open_peer(fresh(directory, "peer.db"))
    try:
        started = time.perf_counter()
        for start in range(0, rows, batch):
            end = min(rows, start + batch)
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO records (stream, seq, priority, kind, at, body) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [("telemetry", i + 1, "metrics", "metrics.requests", 1700000000 + i,
                  json.dumps(BODY, sort_keys=True, separators=(",", ":")))
                 for i in range(start, end)])
            conn.execute("COMMIT")
        return rows / (time.perf_counter() - started)
    finally:
        conn.close()


def interleaved(repeat: int, a: Callable[[], float], b: Callable[[], float]
                ) -> tuple[float, float]:
    ours, peer = [], []
    for i in range(repeat):
        # alternate which goes first, so neither always gets the warm cache
        if i % 2 == 0:
            ours.append(a())
            peer.append(b())
        else:
            peer.append(b())
            ours.append(a())
    return statistics.median(ours), statistics.median(peer)


# ---------------------------------------------------------------------------------------------
# drain
# ---------------------------------------------------------------------------------------------
def fill_outbox(path: Path, rows: int) -> Outbox:
    box = open_outbox(path)
    for start in range(0, rows, 5000):
        box.append_many("telemetry", [("metrics.requests", BODY, 1700000000 + i)
                                      for i in range(start, min(rows, start + 5000))],
                        priority="metrics")
    box.sync()
    return box


def outbox_drain(directory: Path, rows: int, per_round: int) -> dict[str, float]:
    box = fill_outbox(fresh(directory, "outbox.db"), rows)
    timings = {"build": 0.0, "checkpoint": 0.0, "to_bytes": 0.0, "ack": 0.0}
    real_sync = box.sync

    def timed_sync() -> None:
        t = time.perf_counter()
        real_sync()
        timings["checkpoint"] += time.perf_counter() - t

    box.sync = timed_sync  # type: ignore[method-assign]
    sent = batches_n = payload = 0
    try:
        started = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            batches = box.build_batches("telemetry", per_round)
            t1 = time.perf_counter()
            if not batches:
                break
            for batch in batches:
                payload += len(batch.to_bytes())
                sent += len(batch.records)
            batches_n += len(batches)
            t2 = time.perf_counter()
            box.ack("telemetry", batches[-1].last_seq)
            t3 = time.perf_counter()
            timings["build"] += t1 - t0
            timings["to_bytes"] += t2 - t1
            timings["ack"] += t3 - t2
        total = time.perf_counter() - started
    finally:
        box.close()
    assert sent == rows, (sent, rows)
    timings["build"] -= timings["checkpoint"]
    return {"rows_s": rows / total, "us_row": total / rows * 1e6, "batches": batches_n,
            "bytes_row": payload / rows,
            **{f"us_{k}": v / rows * 1e6 for k, v in timings.items()}}


def peer_drain(directory: Path, rows: int, per_round: int) -> float:
    conn = open_peer(fresh(directory, "peer.db"))
    body = json.dumps(BODY, sort_keys=True, separators=(",", ":"))
    for start in range(0, rows, 5000):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO records (stream, seq, priority, kind, at, body) "
                         "VALUES ('telemetry', ?, 'metrics', 'metrics.requests', ?, ?)",
                         [(i + 1, 1700000000 + i, body)
                          for i in range(start, min(rows, start + 5000))])
        conn.execute("COMMIT")
    try:
        started = time.perf_counter()
        done = 0
        while True:
            got = conn.execute("SELECT seq, kind, at, body FROM records WHERE stream = ? "
                               "ORDER BY seq LIMIT ?", ("telemetry", per_round)).fetchall()
            if not got:
                break
            payload = "[" + ",".join(
                f'{{"at":{at},"body":{b},"kind":"{k}","seq":{s}}}' for s, k, at, b in got) + "]"
            payload.encode("utf-8")
            conn.execute("DELETE FROM records WHERE stream = ? AND seq <= ?",
                         ("telemetry", got[-1][0]))
            done += len(got)
        assert done == rows
        return rows / (time.perf_counter() - started)
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def filesystem(directory: Path) -> str:
    try:
        best = ""
        with open("/proc/mounts", encoding="utf-8") as mounts:
            for line in mounts:
                _, mount, fstype, *_ = line.split()
                if str(directory.resolve()).startswith(mount) and len(mount) >= len(best):
                    best, kind = mount, fstype
        return f"{kind} ({best})" if best else "unknown"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000, help="drain backlog (rows)")
    parser.add_argument("--append-rows", type=int, default=100_000,
                        help="rows per run of the batched append")
    parser.add_argument("--single-rows", type=int, default=5_000,
                        help="rows per run of the one-row-per-transaction append")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, median reported")
    parser.add_argument("--dir", type=Path, default=REPO / "bench" / "out" / "outbox")
    args = parser.parse_args(argv)
    if min(args.rows, args.append_rows, args.single_rows, args.repeat) < 1:
        parser.error("every count must be >= 1")
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        log(f"append: {args.repeat} x {args.append_rows} rows in transactions of 500")
        ours500, peer500 = interleaved(args.repeat,
                                       lambda: outbox_append(args.dir, args.append_rows, 500),
                                       lambda: peer_append(args.dir, args.append_rows, 500))
        log(f"append: {args.repeat} x {args.single_rows} rows, one per transaction")
        ours1, peer1 = interleaved(args.repeat,
                                   lambda: outbox_append(args.dir, args.single_rows, 1),
                                   lambda: peer_append(args.dir, args.single_rows, 1))
        log(f"drain: {args.rows} rows through build_batches(500) + to_bytes + ack")
        drain = outbox_drain(args.dir, args.rows, 500)
        log(f"drain peer: {args.rows} rows through raw select + join + delete")
        peer_rate = peer_drain(args.dir, args.rows, 500)
    finally:
        shutil.rmtree(args.dir, ignore_errors=True)

    print(f"Outbox on {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
          f"{filesystem(args.dir.parent)}; WAL + synchronous=NORMAL; median of "
          f"{args.repeat} interleaved runs.\n")
    print("| measurement | outbox | raw sqlite3 peer | outbox / peer |")
    print("|---|---:|---:|---:|")
    print(f"| append, 500 rows per transaction ({args.append_rows:,} rows) | "
          f"{ours500:,.0f} rows/s | {peer500:,.0f} rows/s | {ours500 / peer500:.2f} |")
    print(f"| append, 1 row per transaction ({args.single_rows:,} rows) | "
          f"{ours1:,.0f} rows/s | {peer1:,.0f} rows/s | {ours1 / peer1:.2f} |")
    print(f"| drain {args.rows:,} rows, 500 per batch (local cost, no broker) | "
          f"{drain['rows_s']:,.0f} rows/s | {peer_rate:,.0f} rows/s | "
          f"{drain['rows_s'] / peer_rate:.2f} |")
    print()
    print(f"Drain cost per row ({drain['us_row']:.1f} us; {drain['batches']:,.0f} batches of "
          f"{drain['bytes_row']:.0f} bytes/row on the wire):\n")
    print("| step | us/row |")
    print("|---|---:|")
    for key, label in (("us_build", "build_batches: read + JSON parse + size split"),
                       ("us_checkpoint", "build_batches: WAL checkpoint (durable before send)"),
                       ("us_to_bytes", "TelemetryBatch.to_bytes (re-check + canonical JSON)"),
                       ("us_ack", "ack (delete)")):
        print(f"| {label} | {drain[key]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

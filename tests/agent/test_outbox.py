"""agent.buffer: the SQLite outbox on a real file (and its in-memory twin).

Kill -9 durability is in test_outbox_kill.py (slow); everything here runs in well under a second
per test.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlite_utils import Database

import agent.buffer
from agent.buffer import (
    CORRUPT_RESET_KIND,
    EVICTED_KIND,
    MAX_RECORD_BYTES,
    PRIORITIES,
    IncompatibleSchema,
    Outbox,
)
from agent.buffer.migrations import MIGRATIONS, Migrations
from agent.config import AgentConfig
from agent.errors import StoreError
from agent.protocol.messages import (
    MAX_BODY_DEPTH,
    MAX_MESSAGE_BYTES,
    DriftBatch,
    TelemetryBatch,
    parse_device_message,
)
from agent.protocol.topics import device_topic

DEVICE = "pi-01"
NOW = 1_700_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "outbox.db"


@pytest.fixture
def outbox(path: Path) -> Any:
    box = Outbox.open(path, device_id=DEVICE, max_rows=1000, now=NOW)
    yield box
    box.close()


def fill(box: Outbox, n: int, *, stream: str = "telemetry", priority: str = "metrics",
         kind: str = "m", start: int = 0) -> range:
    return box.append_many(stream, [(kind, {"i": start + i}, NOW + i) for i in range(n)],
                           priority=priority)


def held(box: Outbox, stream: str = "telemetry") -> list[int]:
    return [r.seq for r in box.pending(stream, 1_000_000)]


def test_public_surface_is_exported() -> None:
    for name in agent.buffer.__all__:
        assert hasattr(agent.buffer, name), name


# ---------------------------------------------------------------------------------------------
# the file: WAL, NORMAL, migrations, schema version
# ---------------------------------------------------------------------------------------------
def test_a_real_file_in_wal_mode_with_synchronous_normal(outbox: Outbox, path: Path) -> None:
    assert path.is_file()
    assert outbox.db.journal_mode == "wal"
    assert outbox.db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert outbox.stats().schema_version == MIGRATIONS.version
    assert outbox.db.execute("PRAGMA user_version").fetchone()[0] == MIGRATIONS.version


def test_migrations_are_recorded_once_with_the_given_time(path: Path) -> None:
    Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW).close()
    box = Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW + 99)
    rows = box.db.execute("SELECT migration_set, name, version, applied_at FROM _migrations"
                          ).fetchall()
    assert rows == [("outbox", m.name, m.version, NOW) for m in MIGRATIONS]
    assert MIGRATIONS.pending(box.db) == []
    box.close()


def test_a_failing_migration_rolls_back_with_its_record(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    box = Outbox(conn, device_id=DEVICE, max_rows=10, path=tmp_path / "m.db")
    box.db.execute("CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value NOT NULL)")
    steps = Migrations("test")

    @steps(version=1)
    def first(db: Database) -> None:
        db.execute("CREATE TABLE a (x)")

    @steps(version=2)
    def second(db: Database) -> None:
        db.execute("CREATE TABLE b (x)")
        raise RuntimeError("boom in the middle of a migration")

    with pytest.raises(RuntimeError, match="boom"):
        steps.apply(box.db, box.atomic, now=NOW)
    assert steps.applied(box.db) == ["first"]
    assert box.db["a"].exists() and not box.db["b"].exists()
    assert [m.name for m in steps.pending(box.db)] == ["second"]
    assert box.db.execute("PRAGMA user_version").fetchone()[0] == 1


@pytest.mark.parametrize(("name", "version", "message"), [
    ("first", 2, "already registered"),
    ("other", 1, "expected a version above 1"),
], ids=["duplicate-name", "version-does-not-grow"])
def test_migrations_register_in_order(name: str, version: int, message: str) -> None:
    steps = Migrations("test")
    steps(version=1, name="first")(lambda db: None)
    with pytest.raises(ValueError, match=message):
        steps(version=version, name=name)(lambda db: None)


def test_a_file_a_newer_agent_marked_incompatible_is_refused_not_moved(path: Path) -> None:
    Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE outbox_meta SET value = 99 WHERE key = 'compat_version'")
    with pytest.raises(IncompatibleSchema, match="needs an agent at schema >= 99"):
        Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW)
    assert path.exists() and not list(path.parent.glob("*.corrupt-*"))


def test_from_config_opens_outbox_db_in_the_data_dir(tmp_path: Path) -> None:
    cfg = AgentConfig(provisioning=tmp_path / "p.json", data_dir=tmp_path, outbox_max_rows=7)
    with Outbox.from_config(cfg, device_id=DEVICE, now=NOW) as box:
        assert box.path == tmp_path / "outbox.db" and box.max_rows == 7


# ---------------------------------------------------------------------------------------------
# atomic()
# ---------------------------------------------------------------------------------------------
def test_nested_atomic_rolls_back_only_the_savepoint(outbox: Outbox) -> None:
    with outbox.atomic():
        outbox.append("telemetry", "outer", {}, at=NOW, priority="event")
        with pytest.raises(ZeroDivisionError), outbox.atomic():
            outbox.append("telemetry", "inner", {}, at=NOW, priority="event")
            1 / 0  # noqa: B018
        outbox.append("telemetry", "after", {}, at=NOW, priority="event")
    assert [r.kind for r in outbox.pending("telemetry", 10)] == ["outer", "after"]
    assert outbox.depth() == 2
    # the rolled-back seq is not handed out again: the counter rolled back with the row, and
    # nothing with that number ever left the device
    assert held(outbox) == [1, 2]


def test_an_exception_rolls_back_the_whole_block_and_the_counters(outbox: Outbox) -> None:
    with pytest.raises(KeyError), outbox.atomic():
        fill(outbox, 5)
        raise KeyError("x")
    assert outbox.depth() == 0
    assert outbox.append("telemetry", "m", {}, at=NOW, priority="metrics") == 1


@pytest.mark.parametrize("mode", ["DEFERRED", "", "IMMEDIATE"])
def test_atomic_refuses_implicit_transaction_modes(outbox: Outbox, mode: str) -> None:
    outbox.db.conn.isolation_level = mode
    with pytest.raises(RuntimeError, match="isolation_level=None"), outbox.atomic():
        pass


def test_atomic_refuses_to_nest_into_a_transaction_it_does_not_own(outbox: Outbox) -> None:
    outbox.db.execute("BEGIN")
    with pytest.raises(RuntimeError, match="outside atomic"), outbox.atomic():
        pass
    outbox.db.execute("ROLLBACK")


def test_sqlite_errors_leave_as_store_error(outbox: Outbox) -> None:
    outbox.close()
    with pytest.raises(StoreError, match="append failed") as info:
        outbox.append("telemetry", "m", {}, at=NOW, priority="metrics")
    assert isinstance(info.value.__cause__, sqlite3.Error)


# ---------------------------------------------------------------------------------------------
# append / pending
# ---------------------------------------------------------------------------------------------
def test_seqs_are_per_stream_and_pending_is_oldest_first(outbox: Outbox) -> None:
    assert fill(outbox, 3) == range(1, 4)
    assert outbox.append("drift", "drift.summary", {"x": 1}, at=NOW, priority="summary") == 1
    assert outbox.append("telemetry", "e", {"y": [1, "z"]}, at=NOW + 0.9,
                         priority="event") == 4
    recs = outbox.pending("telemetry", 10)
    assert [(r.seq, r.kind, r.at) for r in recs] == [
        (1, "m", NOW), (2, "m", NOW + 1), (3, "m", NOW + 2), (4, "e", int(NOW))]
    assert recs[3].body == {"y": [1, "z"]}
    assert [r.seq for r in outbox.pending("telemetry", 2, after=1)] == [2, 3]
    assert outbox.depth() == 5 and outbox.depth("drift") == 1


def _nested(levels: int) -> dict[str, Any]:
    """A body ``levels`` + 1 objects deep (itself and ``levels`` nested below it)."""
    body: dict[str, Any] = {}
    inner = body
    for _ in range(levels):
        inner["a"] = {}
        inner = inner["a"]
    return body


BAD_APPENDS = [
    ("unknown-stream", {"stream": "status"}, "stream"),
    ("unknown-priority", {"priority": "urgent"}, "priority"),
    ("empty-kind", {"kind": ""}, "kind"),
    ("long-kind", {"kind": "k" * 201}, "kind"),
    ("body-not-a-mapping", {"body": [1, 2]}, "body"),
    ("nan-in-body", {"body": {"x": math.nan}}, "JSON"),
    ("lone-surrogate", {"body": {"x": "\ud800"}}, "JSON"),
    ("body-too-large", {"body": {"x": "a" * MAX_RECORD_BYTES}}, "at most"),
    # the server refuses a body deeper than MAX_BODY_DEPTH: stored, it would stall the stream
    ("body-too-deep", {"body": _nested(MAX_BODY_DEPTH)}, "nested at most 100 deep, got '101"),
    ("body-deep-list", {"body": {"x": [[[]]] * 40 + [_nested(MAX_BODY_DEPTH - 1)]}},
     "nested at most 100 deep, got '102"),
    ("negative-at", {"at": -1.0}, "at"),
    ("infinite-at", {"at": math.inf}, "at"),
    ("bool-at", {"at": True}, "at"),
]


def test_a_body_exactly_as_deep_as_the_server_takes_is_appended_and_sent(outbox: Outbox) -> None:
    body = _nested(MAX_BODY_DEPTH - 1)  # MAX_BODY_DEPTH objects in all
    assert outbox.append("telemetry", "m", body, at=NOW, priority="metrics") == 1
    ((payload, last),) = outbox.build_payloads("telemetry", 10)
    topic = device_topic(outbox.device_id, "telemetry")
    batch = parse_device_message(topic, payload)  # what the server reads
    assert last == 1 and isinstance(batch, TelemetryBatch) and batch.records[0].body == body


@pytest.mark.parametrize(("name", "change", "match"), BAD_APPENDS,
                         ids=[c[0] for c in BAD_APPENDS])
def test_bad_appends_are_refused_and_append_nothing(outbox: Outbox, name: str,
                                                    change: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"stream": "telemetry", "kind": "m", "body": {"x": 1}, "at": NOW,
                                "priority": "metrics"}
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        outbox.append(args.pop("stream"), args.pop("kind"), args.pop("body"), **args)
    assert outbox.depth() == 0
    assert outbox.append("telemetry", "m", {}, at=NOW, priority="metrics") == 1


def test_appends_from_many_threads_get_unique_consecutive_seqs(outbox: Outbox) -> None:
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            seq = outbox.append("telemetry", "m", {}, at=NOW, priority="metrics")
            with lock:
                got.append(seq)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 201))


def test_the_in_memory_twin_behaves_the_same() -> None:
    box = Outbox.in_memory(device_id=DEVICE, max_rows=5)
    fill(box, 7)
    assert held(box) == [4, 5, 6, 7, 8]  # 3 metrics evicted, the event is seq 8
    assert box.build_batches("telemetry", 10)[0].unrecognized == {"floor": 4, "from_seq": 1}


# ---------------------------------------------------------------------------------------------
# ack
# ---------------------------------------------------------------------------------------------
ACK_CASES = [
    # (name, acks in order, deleted by each, seqs held after; 5 rows appended first)
    ("ack-some", [3], [3], [4, 5]),
    ("ack-all", [5], [5], []),
    ("ack-zero-is-a-no-op", [0], [0], [1, 2, 3, 4, 5]),
    ("stale-lower-ack-is-a-no-op", [4, 2], [4, 0], [5]),
    ("repeated-ack-is-a-no-op", [3, 3], [3, 0], [4, 5]),
    ("ack-above-appended-deletes-only-what-exists", [10**9], [5], []),
    ("acks-in-steps", [1, 2, 5], [1, 1, 3], []),
]


@pytest.mark.parametrize(("name", "acks", "deleted", "after"), ACK_CASES,
                         ids=[c[0] for c in ACK_CASES])
def test_ack_semantics(outbox: Outbox, name: str, acks: list[int], deleted: list[int],
                       after: list[int]) -> None:
    fill(outbox, 5)
    outbox.append("drift", "d", {}, at=NOW, priority="summary")
    assert [outbox.ack("telemetry", upto) for upto in acks] == deleted
    assert held(outbox) == after
    assert held(outbox, "drift") == [1]  # another stream's rows are never touched


def test_an_ack_above_every_seq_handed_out_moves_the_counter_past_it(outbox: Outbox) -> None:
    """The server saw numbers this file does not know (it was lost): never reuse them."""
    fill(outbox, 3)
    assert outbox.ack("telemetry", 500) == 3
    assert outbox.append("telemetry", "m", {}, at=NOW, priority="metrics") == 501


@pytest.mark.parametrize(("stream", "upto"), [("nope", 1), ("telemetry", -1),
                                              ("telemetry", True), ("telemetry", 2**62),
                                              ("telemetry", 1.0)],
                         ids=["unknown-stream", "negative", "bool", "too-large", "float"])
def test_bad_acks_are_refused(outbox: Outbox, stream: str, upto: Any) -> None:
    fill(outbox, 2)
    with pytest.raises(ValueError):
        outbox.ack(stream, upto)
    assert outbox.depth() == 2


def test_seqs_are_never_reused_after_ack_and_restart(path: Path) -> None:
    box = Outbox.open(path, device_id=DEVICE, max_rows=100, now=NOW)
    fill(box, 5)
    assert box.ack("telemetry", 5) == 5
    assert box.depth() == 0
    box.close()
    box = Outbox.open(path, device_id=DEVICE, max_rows=100, now=NOW)
    assert box.append("telemetry", "m", {}, at=NOW, priority="metrics") == 6
    assert box.stats().streams["telemetry"].floor == 6
    box.close()


# ---------------------------------------------------------------------------------------------
# eviction
# ---------------------------------------------------------------------------------------------
def evicted_events(box: Outbox) -> list[dict[str, Any]]:
    return [dict(r.body) for r in box.pending("telemetry", 10_000) if r.kind == EVICTED_KIND]


def test_metrics_are_evicted_first_and_the_loss_is_recorded(path: Path) -> None:
    box = Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW)
    box.append("telemetry", "boot", {}, at=NOW, priority="event")               # seq 1
    fill(box, 3, start=0)                                                         # 2..4
    box.append("drift", "drift.summary", {"w": 1}, at=NOW, priority="summary")  # drift 1
    fill(box, 5, start=3)                                                         # 5..9
    assert box.depth() == 10 and not evicted_events(box)
    fill(box, 2, start=8)                                                         # 10..11
    # 12 rows > 10: the 3 oldest metrics go (2 over, plus room for the event), event is seq 12
    assert held(box) == [1, 5, 6, 7, 8, 9, 10, 11, 12]
    assert held(box, "drift") == [1]
    [event] = evicted_events(box)
    assert event["evicted"] == {"metrics": 3, "summary": 0, "event": 0}
    assert event["totals"] == {"metrics": 3, "summary": 0, "event": 0}
    assert box.depth() == 10
    stats = box.stats()
    assert stats.evicted_total == {"metrics": 3, "summary": 0, "event": 0}
    assert stats.priorities == {"metrics": 7, "summary": 1, "event": 2}
    assert stats.streams["telemetry"].floor == 1

    # the floor and from_seq let a contiguous-ack server skip the gap 2..4 above seq 1
    [batch] = box.build_batches("telemetry", 100)
    assert batch.unrecognized == {"floor": 1, "from_seq": 1}
    assert [r.seq for r in batch.records] == [1, 5, 6, 7, 8, 9, 10, 11, 12]
    box.close()


def test_others_are_evicted_oldest_first_only_when_no_metrics_remain() -> None:
    box = Outbox.in_memory(device_id=DEVICE, max_rows=4)
    box.append("drift", "drift.summary", {}, at=NOW, priority="summary")   # drift 1
    box.append("telemetry", "boot", {}, at=NOW, priority="event")          # tel 1
    fill(box, 2)                                                           # tel 2, 3
    box.append("drift", "drift.summary", {}, at=NOW, priority="summary")   # drift 2
    # 5 > 4: the two metrics go (1 over + room for the event): only summaries/events left
    assert held(box) == [1, 4] and held(box, "drift") == [1, 2]
    box.append("drift", "drift.summary", {}, at=NOW, priority="summary")   # drift 3
    # 5 > 4 again, no metrics: the two oldest others go (drift 1, tel 1 boot)
    assert held(box, "drift") == [2, 3]
    assert [r.kind for r in box.pending("telemetry", 10)] == [EVICTED_KIND, EVICTED_KIND]
    first, second = evicted_events(box)
    assert first["evicted"] == {"metrics": 2, "summary": 0, "event": 0}
    assert second["evicted"] == {"metrics": 0, "summary": 1, "event": 1}
    assert second["totals"] == {"metrics": 2, "summary": 1, "event": 1}


def test_a_full_outbox_evicts_in_chunks_not_one_event_per_append() -> None:
    box = Outbox.in_memory(device_id=DEVICE, max_rows=1000)
    fill(box, 1000)
    for i in range(100):
        box.append("telemetry", "m", {"i": i}, at=NOW, priority="metrics")
    events = evicted_events(box)
    # each eviction frees ~1 % (10 rows + 1 for its event): 100 appends -> ~10 events, not 100
    assert 5 <= len(events) <= 12
    assert box.depth() <= 1000
    assert sum(e["evicted"]["metrics"] for e in events) == events[-1]["totals"]["metrics"]


class ContiguousAckServer:
    """What fleet_server.ingest does with a batch, plus the ``from_seq`` rule."""

    def __init__(self, *, honour_from_seq: bool) -> None:
        self.stored: set[int] = set()
        self.upto = 0
        self.honour_from_seq = honour_from_seq

    def receive(self, batch: TelemetryBatch | DriftBatch) -> int:
        seqs = [r.seq for r in batch.records]
        self.stored.update(seqs)
        floor = batch.unrecognized.get("floor")
        if isinstance(floor, int) and 1 <= floor <= seqs[0]:
            self.upto = max(self.upto, floor - 1)
        start = batch.unrecognized.get("from_seq")
        if (self.honour_from_seq and isinstance(start, int) and 1 <= start <= seqs[0]
                and start <= self.upto + 1):
            self.upto = max(self.upto, seqs[-1])
        while self.upto + 1 in self.stored:
            self.upto += 1
        return self.upto


@pytest.mark.parametrize(("honour_from_seq", "one_round"), [(True, True), (False, False)],
                         ids=["floor-and-from_seq-one-round", "floor-alone-resends-per-gap"])
def test_gaps_left_by_eviction_do_not_hold_up_the_servers_contiguous_ack(
        honour_from_seq: bool, one_round: bool) -> None:
    """Metrics evicted above an older event leave gaps *above* the floor. With ``floor``
    alone the server's ack stops below each gap: one more round trip, and a re-send of
    everything above it, per gap. With ``from_seq`` one pass acks everything."""
    box = Outbox.in_memory(device_id=DEVICE, max_rows=50)
    server = ContiguousAckServer(honour_from_seq=honour_from_seq)
    box.append("telemetry", "boot", {}, at=NOW, priority="event")
    for round_ in range(6):  # offline: metrics pile up and get evicted around the event rows
        fill(box, 30, start=round_ * 30)
    last = box.stats().streams["telemetry"].next_seq - 1
    rounds, sent = 0, 0
    while box.depth("telemetry") and rounds < 50:  # back online: send all, ack, repeat
        rounds += 1
        for batch in box.build_batches("telemetry", 1000, 700):
            sent += len(batch.records)
            upto = server.receive(parse_device_message(device_topic(DEVICE, "telemetry"),
                                                       batch.to_bytes()))  # over the wire
        box.ack("telemetry", upto)
    assert box.depth("telemetry") == 0 and server.upto == last
    assert (rounds == 1 and sent == len(server.stored)) is one_round


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def test_batches_are_split_by_size_and_each_fits_a_message(outbox: Outbox) -> None:
    big = "x" * 20_000
    outbox.append_many("drift", [("drift.summary", {"pad": big, "i": i}, NOW)
                                 for i in range(40)], priority="summary")
    batches = outbox.build_batches("drift", 40)
    assert len(batches) >= 3 and all(isinstance(b, DriftBatch) for b in batches)
    sizes = [len(b.to_bytes()) for b in batches]
    assert all(size <= MAX_MESSAGE_BYTES for size in sizes)
    # packed tightly: one more record would not have fitted
    assert all(size + 20_050 > MAX_MESSAGE_BYTES for size in sizes[:-1])
    assert [r.seq for b in batches for r in b.records] == list(range(1, 41))
    # each batch accounts for the range since the previous one
    assert [b.unrecognized["from_seq"] for b in batches] == (
        [1] + [b.last_seq + 1 for b in batches[:-1]])
    assert {b.unrecognized["floor"] for b in batches} == {1}


@pytest.mark.parametrize("max_bytes", [600, 1000, 4096])
def test_a_smaller_byte_cap_is_honoured_exactly(outbox: Outbox, max_bytes: int) -> None:
    fill(outbox, 60)
    batches = outbox.build_batches("telemetry", 60, max_bytes)
    assert all(len(b.to_bytes()) <= max_bytes for b in batches)
    assert sum(len(b.records) for b in batches) == 60
    assert all(isinstance(b, TelemetryBatch) and b.device_id == DEVICE for b in batches)


def test_build_batches_honours_max_records_and_after(outbox: Outbox) -> None:
    fill(outbox, 30)
    [first] = outbox.build_batches("telemetry", 10)
    assert (first.first_seq, first.last_seq) == (1, 10)
    [second] = outbox.build_batches("telemetry", 10, after=first.last_seq)
    assert (second.first_seq, second.last_seq) == (11, 20)
    assert second.unrecognized == {"floor": 1, "from_seq": 11}
    assert outbox.build_batches("telemetry", 10, after=30) == []
    assert outbox.build_batches("drift", 10) == []


def test_a_byte_cap_below_one_record_is_refused(outbox: Outbox) -> None:
    outbox.append("telemetry", "m", {"pad": "x" * 500}, at=NOW, priority="metrics")
    with pytest.raises(ValueError, match="too small for record seq 1"):
        outbox.build_batches("telemetry", 10, 300)


def test_build_batches_inside_atomic_is_refused(outbox: Outbox) -> None:
    fill(outbox, 1)
    with pytest.raises(RuntimeError, match="inside atomic"), outbox.atomic():
        outbox.build_batches("telemetry", 10)


def test_what_build_batches_returns_is_already_in_the_main_file(outbox: Outbox, path: Path,
                                                                 tmp_path: Path) -> None:
    """Durable before it is sent: the WAL was checkpointed, so the file alone has the rows."""
    fill(outbox, 25)
    outbox.build_batches("telemetry", 100)
    copy = tmp_path / "copy.db"
    shutil.copyfile(path, copy)  # the main file only: no -wal
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_records").fetchone()[0] == 25
        assert conn.execute("SELECT next_seq FROM outbox_streams WHERE stream = 'telemetry'"
                            ).fetchone()[0] == 26


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: unicode and escapes, big and negative ints, floats, nesting."""
    pick = rng.randrange(9 if depth < 3 else 6)
    if pick == 0:
        return rng.choice([None, True, False])
    if pick == 1:
        return rng.choice([0, -1, 7, 2**53 + 1, -(2**63), 10**30])
    if pick == 2:
        return rng.choice([0.0, -0.0, 1.5, 1e-7, 1e22, -3.25, 0.1 + 0.2, rng.random()])
    if pick in (3, 4, 5):
        return "".join(rng.choice('aZ09 "\\/\n\t\u00e9\u2028\U0001f600\x00\x1f<>&')
                       for _ in range(rng.randrange(12)))
    if pick == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_json_key(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def random_json_key(rng: random.Random) -> str:
    return "".join(rng.choice("abAB_\u00e9\U0001f600\"\\ 1") for _ in range(rng.randrange(1, 6)))


def both_ways(box: Outbox, stream: str, max_records: int, max_bytes: int = MAX_MESSAGE_BYTES,
              *, after: int = 0) -> list[tuple[bytes, int]]:
    """``build_payloads``, checked byte for byte against ``build_batches`` + ``to_bytes``."""
    payloads = box.build_payloads(stream, max_records, max_bytes, after=after)
    batches = box.build_batches(stream, max_records, max_bytes, after=after)
    assert payloads == [(b.to_bytes(), b.last_seq) for b in batches]
    return payloads


@pytest.mark.parametrize("stream", ["telemetry", "drift"])
@pytest.mark.parametrize("seed", range(4))
def test_build_payloads_is_byte_identical_to_the_batches(outbox: Outbox, stream: str,
                                                         seed: int) -> None:
    rng = random.Random(seed)
    kinds = ["m", "drift.summary", "k\u00e9y \"q\"", "\U0001f600"]
    for _ in range(6):
        outbox.append_many(stream, [
            (rng.choice(kinds), {random_json_key(rng): random_json(rng)
                                 for _ in range(rng.randrange(6))}, NOW + rng.randrange(10**6))
            for _ in range(rng.randrange(1, 40))], priority=rng.choice(["metrics", "event"]))
    total = outbox.depth(stream)
    sent = both_ways(outbox, stream, 1000)
    assert sent and sent[-1][1] == total
    for max_bytes in (1500, 4096, 20_000):  # split by size: from_seq moves per batch
        assert both_ways(outbox, stream, 1000, max_bytes)
    outbox.ack(stream, 17)  # floor above 1
    after = 30  # from_seq above the floor, as with batches in flight
    assert both_ways(outbox, stream, 25, 3000, after=after) or total <= after
    assert both_ways(outbox, stream, 1000, after=total) == []


def test_non_string_keys_are_stored_canonically(outbox: Outbox) -> None:
    """Int keys sort as numbers when encoded (10 before 9): stored re-sorted as text, so the
    stored body is what the server's canonical encoding of the message holds."""
    body: dict[Any, Any] = {10: "a", 9: {2.5: None, 1: [True]}}
    outbox.append("telemetry", "m", body, at=NOW, priority="metrics")
    [(payload, _)] = both_ways(outbox, "telemetry", 10)
    assert b'"body":{"10":"a","9":{"1":[true],"2.5":null}}' in payload


def test_build_payloads_checkpoints_only_after_a_counter_moved(outbox: Outbox) -> None:
    calls: list[int] = []
    real_sync = outbox.sync

    def counting_sync() -> None:
        calls.append(1)
        real_sync()

    outbox.sync = counting_sync  # type: ignore[method-assign]
    fill(outbox, 30)
    outbox.build_payloads("telemetry", 10)
    outbox.build_payloads("telemetry", 10, after=10)
    outbox.ack("telemetry", 10)  # deletes only: no counter moved
    outbox.build_batches("telemetry", 10, after=20)
    assert len(calls) == 1
    fill(outbox, 1)
    outbox.build_payloads("telemetry", 10, after=30)
    assert len(calls) == 2
    outbox.ack("telemetry", 500)  # above every seq handed out: the counter jumps
    fill(outbox, 1)
    outbox.build_payloads("telemetry", 10, after=500)
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------
def make_db_with_rows(path: Path, n: int = 3000) -> None:
    with Outbox.open(path, device_id=DEVICE, max_rows=100_000, now=NOW) as box:
        box.append_many("telemetry", [("m", {"pad": "y" * 200, "i": i}, NOW)
                                      for i in range(n)], priority="metrics")


def truncate_half(path: Path) -> None:
    make_db_with_rows(path)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def garbage(path: Path) -> None:
    path.write_bytes(b"this is not an sqlite file at all\n" * 300)


def foreign(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO photos (name) VALUES ('cat.jpg')")


def scribbled_pages(path: Path) -> None:
    make_db_with_rows(path)
    with open(path, "r+b") as f:
        f.seek(4096 * 3)
        f.write(b"\xff" * 4096 * 4)


CORRUPT_CASES = [
    ("garbage-bytes", garbage, "NOTADB"),
    ("truncated-db", truncate_half, "SQLITE_CORRUPT|quick_check"),
    ("scribbled-pages", scribbled_pages, "SQLITE_CORRUPT|quick_check"),
    ("another-apps-sqlite-file", foreign, "not an outbox"),
]


@pytest.mark.parametrize(("name", "damage", "reason"), CORRUPT_CASES,
                         ids=[c[0] for c in CORRUPT_CASES])
def test_a_corrupt_file_is_moved_aside_and_the_loss_reported(path: Path, name: str,
                                                             damage: Any, reason: str) -> None:
    damage(path)
    damaged = path.read_bytes()
    box = Outbox.open(path, device_id=DEVICE, max_rows=100, now=NOW)
    reset = box.corrupt_reset
    assert reset is not None and re.search(reason, reset.reason)
    assert reset.moved_to == path.with_name("outbox.db.corrupt-1")
    assert reset.moved_to.read_bytes() == damaged and reset.size == len(damaged)
    [event] = box.pending("telemetry", 10)
    assert event.kind == CORRUPT_RESET_KIND
    assert event.body == {"reason": reset.reason, "moved_to": "outbox.db.corrupt-1",
                          "size": len(damaged)}
    # the fresh counters start above anything the lost file can have handed out
    assert event.seq == int(NOW * 1000)
    assert box.append("drift", "d", {}, at=NOW, priority="summary") == int(NOW * 1000)
    assert box.stats().corrupt_reset == reset
    box.close()
    # reopening the fresh file is not another reset
    again = Outbox.open(path, device_id=DEVICE, max_rows=100, now=NOW)
    assert again.corrupt_reset is None and again.depth() == 2
    again.close()


def test_each_reset_gets_its_own_name(path: Path) -> None:
    for n in (1, 2, 3):
        garbage(path)
        with Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW) as box:
            assert box.corrupt_reset is not None
            assert box.corrupt_reset.moved_to.name == f"outbox.db.corrupt-{n}"


def test_an_empty_file_is_a_fresh_outbox_not_a_corrupt_one(path: Path) -> None:
    path.write_bytes(b"")
    with Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW) as box:
        assert box.corrupt_reset is None
        assert box.append("telemetry", "m", {}, at=NOW, priority="metrics") == 1


def test_a_directory_in_the_way_is_a_store_error(path: Path) -> None:
    path.mkdir()
    with pytest.raises(StoreError, match="expected a file"):
        Outbox.open(path, device_id=DEVICE, max_rows=10, now=NOW)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"device_id": "bad id/with slash"}, "device_id"),
    ({"max_rows": 1}, "max_rows"),
    ({"max_rows": True}, "max_rows"),
], ids=["bad-device-id", "cap-too-small", "bool-cap"])
def test_bad_construction_is_refused(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"device_id": DEVICE, "max_rows": 10}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Outbox.in_memory(**args)


def test_stats_report_streams_priorities_and_the_cap(outbox: Outbox) -> None:
    fill(outbox, 4)
    outbox.append("drift", "d", {}, at=NOW, priority="summary")
    outbox.ack("telemetry", 2)
    stats = outbox.stats()
    assert stats.rows == 3 and stats.max_rows == 1000
    assert stats.streams["telemetry"].rows == 2
    assert stats.streams["telemetry"].floor == 3
    assert stats.streams["telemetry"].next_seq == 5
    assert stats.streams["drift"].floor == 1
    assert stats.priorities == {"metrics": 2, "summary": 1, "event": 0}
    assert set(stats.priorities) == set(PRIORITIES)
    json.dumps(stats.evicted_total)

"""Ingest: device messages stored exactly once, acked contiguously, hostile input dropped."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from agent.protocol.messages import Ack, Record, Reported, RunningModel, Status, TelemetryBatch
from agent.protocol.topics import device_topic
from fleet_server import auth
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.ingest import (
    REJECT_COUNTS,
    SQLITE_ROWS_PER_INSERT,
    handle_message,
    handle_messages,
)
from fleet_server.registry import devices
from fleet_server.settings import Settings

NOW = 1_800_000_000


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    f = open_fleet(settings, clock=lambda: NOW)
    with atomic(f.engine) as conn:
        admin = auth.Principal("t", "test", "admin")
        for dev in ("dev-a", "dev-b"):
            devices.provision(f, conn, device_id=dev, profile="rpi4", tags=[], actor=admin)
    return f


def batch(device: str, seqs: list[int]) -> bytes:
    return TelemetryBatch(device_id=device, records=tuple(
        Record(seq=s, kind="metrics", at=NOW, body={"n": s}) for s in seqs)).to_bytes()


def stored(fleet: Fleet, device: str) -> list[int]:
    with atomic(fleet.engine) as conn:
        return list(conn.execute(select(tables.device_records.c.seq).where(
            tables.device_records.c.device_id == device).order_by(
            tables.device_records.c.seq)).scalars())


def ack_upto(result) -> int:
    return Ack.from_bytes(result.ack_payload).upto_seq


def test_records_are_stored_once_and_acked_contiguously(fleet: Fleet) -> None:
    topic = device_topic("dev-a", "telemetry")
    r1 = handle_message(fleet, topic, batch("dev-a", [1, 2, 3]), now=NOW)
    assert (r1.stored, r1.duplicates, ack_upto(r1)) == (3, 0, 3)
    assert r1.ack_topic == device_topic("dev-a", "ack")
    # a gap: 5 and 6 arrive before 4 -> ack stays at 3
    r2 = handle_message(fleet, topic, batch("dev-a", [5, 6]), now=NOW)
    assert ack_upto(r2) == 3
    # redelivery after a reconnect: duplicates are not stored again
    r3 = handle_message(fleet, topic, batch("dev-a", [2, 3, 4]), now=NOW)
    assert (r3.stored, r3.duplicates, ack_upto(r3)) == (1, 2, 6)
    assert stored(fleet, "dev-a") == [1, 2, 3, 4, 5, 6]


def test_a_batch_longer_than_one_insert_statement_counts_every_duplicate(fleet: Fleet) -> None:
    # SQLite inserts SQLITE_ROWS_PER_INSERT rows per statement: the counts and the stored
    # rows must not depend on where the statements split a message
    size = SQLITE_ROWS_PER_INSERT
    topic = device_topic("dev-a", "telemetry")
    early = handle_message(fleet, topic, batch("dev-a", [5, size, size + 1, 2 * size + 3]),
                           now=NOW)
    assert (early.stored, early.duplicates, ack_upto(early)) == (4, 0, 0)
    seqs = list(range(1, 2 * size + 5))  # three statements: size, size and 4 rows
    result = handle_message(fleet, topic, batch("dev-a", seqs), now=NOW)
    assert (result.stored, result.duplicates, ack_upto(result)) == (len(seqs) - 4, 4, seqs[-1])
    assert stored(fleet, "dev-a") == seqs


def test_a_batch_continuing_the_ack_still_walks_on_past_records_stored_early(
        fleet: Fleet) -> None:
    topic = device_topic("dev-a", "telemetry")
    handle_message(fleet, topic, batch("dev-a", [1, 2]), now=NOW)
    assert ack_upto(handle_message(fleet, topic, batch("dev-a", [5, 6, 8]), now=NOW)) == 2
    # 3, 4 continue the ack without a gap: the ack runs on through 5, 6 and stops before 7
    r = handle_message(fleet, topic, batch("dev-a", [3, 4]), now=NOW)
    assert (r.stored, r.duplicates, ack_upto(r)) == (2, 0, 6)
    # the same contiguous batch again: nothing stored, the ack does not move
    r = handle_message(fleet, topic, batch("dev-a", [3, 4]), now=NOW)
    assert (r.stored, r.duplicates, ack_upto(r)) == (0, 2, 6)
    r = handle_message(fleet, topic, batch("dev-a", [7]), now=NOW)
    assert (r.stored, ack_upto(r)) == (1, 8)
    with atomic(fleet.engine) as conn:
        bodies = dict(conn.execute(select(tables.device_records.c.seq,
                                          tables.device_records.c.body)).all())
    assert bodies[7] == '{"n":7}'


def test_floor_skips_gaps_the_device_evicted_but_never_past_what_it_sent(fleet: Fleet) -> None:
    topic = device_topic("dev-a", "telemetry")
    handle_message(fleet, topic, batch("dev-a", [1, 2]), now=NOW)
    # 3..9 were evicted on the device; it now holds 10.. and says so with floor=10
    evicted = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=10, kind="metrics", at=NOW, body={}),), unrecognized={"floor": 10})
    assert ack_upto(handle_message(fleet, topic, evicted.to_bytes(), now=NOW)) == 10
    # a floor above the batch's first record is not believed
    lying = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=12, kind="metrics", at=NOW, body={}),), unrecognized={"floor": 50})
    assert ack_upto(handle_message(fleet, topic, lying.to_bytes(), now=NOW)) == 10


def test_from_seq_skips_gaps_above_the_floor_only_when_it_continues(fleet: Fleet) -> None:
    topic = device_topic("dev-a", "telemetry")
    handle_message(fleet, topic, batch("dev-a", [1, 2]), now=NOW)
    # the device evicted 4 and 6 (metrics) but kept 3, 5, 7 (events): the batch says so
    gappy = TelemetryBatch(device_id="dev-a", records=tuple(
        Record(seq=s, kind="event", at=NOW, body={}) for s in (3, 5, 7)),
        unrecognized={"from_seq": 3})
    assert ack_upto(handle_message(fleet, topic, gappy.to_bytes(), now=NOW)) == 7
    # a from_seq that does not continue what the server holds is not believed
    detached = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=20, kind="event", at=NOW, body={}),), unrecognized={"from_seq": 15})
    assert ack_upto(handle_message(fleet, topic, detached.to_bytes(), now=NOW)) == 7


def test_reported_and_status_update_the_device(fleet: Fleet) -> None:
    rep = Reported(device_id="dev-a", applied_sequence=3, running=(
        RunningModel(name="digits", version="1.0.0", sha256="a" * 64),), state="Committed",
        last_result="ok", last_error=None, agent_version="0.1.0", reported_at=NOW)
    assert handle_message(fleet, device_topic("dev-a", "reported"), rep.to_bytes(),
                          now=NOW + 5).stored == 1
    handle_message(fleet, device_topic("dev-a", "status"),
                   Status(device_id="dev-a", online=True, at=NOW).to_bytes(), now=NOW + 6)
    with atomic(fleet.engine) as conn:
        got = devices.get_device(conn, "dev-a")
    assert got["online"] is True and got["last_seen_at"] == NOW + 6
    assert got["reported"]["applied_sequence"] == 3 and got["reported_at"] == NOW + 5


HOSTILE = [
    ("not-json", device_topic("dev-a", "telemetry"), b"{nope", "JSON"),
    ("body-claims-other-device", device_topic("dev-a", "telemetry"), None, "dev-b"),
    ("oversized", device_topic("dev-a", "telemetry"), b"x" * (300 * 1024), "over"),
    ("unknown-device", device_topic("dev-zzz", "telemetry"), None, "unknown or revoked"),
    ("not-our-topic", "other/app/telemetry", b"{}", "topic"),
    ("device-sends-ack", device_topic("dev-a", "ack"),
     Ack(device_id="dev-a", stream="telemetry", upto_seq=99).to_bytes(), "server -> device"),
    ("desired-is-not-a-plain-message", device_topic("dev-a", "desired"), b"{}", "desired"),
]


@pytest.mark.parametrize(("topic", "payload", "why"), [h[1:] for h in HOSTILE],
                         ids=[h[0] for h in HOSTILE])
def test_hostile_messages_are_dropped_counted_and_never_stored(fleet: Fleet, topic: str,
                                                               payload: bytes | None,
                                                               why: str) -> None:
    if payload is None:  # a well-formed batch for dev-b (forged) or an unknown device
        owner = "dev-b" if why == "dev-b" else "dev-zzz"
        payload = batch(owner, [1])
    result = handle_message(fleet, topic, payload, now=NOW)
    assert result.rejected is not None and why in result.rejected
    assert result.ack_payload is None
    with atomic(fleet.engine) as conn:
        assert conn.execute(select(func.count()).select_from(tables.device_records)).scalar() == 0
        rejects = conn.execute(select(tables.ingest_rejects)).all()
    assert len(rejects) == 1 and rejects[0].size == len(payload)


def test_revoked_device_is_refused(fleet: Fleet) -> None:
    with atomic(fleet.engine) as conn:
        devices.revoke(fleet, conn, "dev-a", actor=auth.Principal("t", "test", "admin"))
    result = handle_message(fleet, device_topic("dev-a", "telemetry"), batch("dev-a", [1]),
                            now=NOW)
    assert result.rejected and "revoked" in result.rejected
    assert stored(fleet, "dev-a") == []


def test_reject_reason_never_contains_the_payload(fleet: Fleet) -> None:
    secret = b'{"password": "hunter2-' + b"x" * 10 + b'"'
    result = handle_message(fleet, device_topic("dev-a", "telemetry"), secret, now=NOW)
    assert result.rejected is not None
    with atomic(fleet.engine) as conn:
        reasons = [r.reason for r in conn.execute(select(tables.ingest_rejects))]
    assert all("hunter2" not in r for r in reasons), json.dumps(reasons)


def acks_held(fleet: Fleet) -> dict[tuple[str, str], int]:
    with atomic(fleet.engine) as conn:
        return {(r.device_id, r.stream): r.upto_seq
                for r in conn.execute(select(tables.stream_acks))}


def test_a_group_is_stored_in_order_and_each_hostile_message_is_refused_alone(
        fleet: Fleet) -> None:
    tel_a, tel_b = device_topic("dev-a", "telemetry"), device_topic("dev-b", "telemetry")
    handle_message(fleet, tel_a, batch("dev-a", [1]), now=NOW)
    before = REJECT_COUNTS.copy()
    group = [
        (tel_a, batch("dev-a", [3, 4])),  # a gap: the ack stays at 1
        (tel_b, batch("dev-b", [1, 2])),  # a stream seen for the first time
        (tel_a, b"{nope"),
        (device_topic("dev-zzz", "telemetry"), batch("dev-zzz", [1])),
        (device_topic("dev-a", "ack"), Ack(device_id="dev-a", stream="telemetry",
                                           upto_seq=9).to_bytes()),
        (tel_a, batch("dev-a", [2, 3])),  # closes the gap; 3 is a duplicate within the group
        (device_topic("dev-b", "status"),
         Status(device_id="dev-b", online=True, at=NOW).to_bytes()),
        (tel_b, batch("dev-b", [3])),
    ]
    results = handle_messages(fleet, group, now=NOW + 7)
    assert [r.kind for r in results] == ["telemetry", "telemetry", "rejected", "rejected",
                                         "rejected", "telemetry", "status", "telemetry"]
    assert [r.reject_class for r in results if r.rejected] == [
        "malformed", "unknown_device", "forged"]
    assert [(r.stored, r.duplicates, ack_upto(r)) for r in results if r.kind == "telemetry"
            ] == [(2, 0, 1), (2, 0, 2), (1, 1, 4), (1, 0, 3)]
    assert stored(fleet, "dev-a") == [1, 2, 3, 4] and stored(fleet, "dev-b") == [1, 2, 3]
    assert acks_held(fleet) == {("dev-a", "telemetry"): 4, ("dev-b", "telemetry"): 3}
    assert REJECT_COUNTS - before == {"malformed": 1, "unknown_device": 1, "forged": 1}
    with atomic(fleet.engine) as conn:
        assert conn.execute(select(func.count()).select_from(tables.ingest_rejects)).scalar() == 3
        got = devices.get_device(conn, "dev-a")
    assert got["last_seen_at"] == NOW + 7


def test_records_the_columns_cannot_hold_are_refused_before_the_transaction(
        fleet: Fleet) -> None:
    topic = device_topic("dev-a", "telemetry")
    huge_seq = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=2**63, kind="metrics", at=NOW, body={}),)).to_bytes()
    long_kind = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=5, kind="k" * 61, at=NOW, body={}),)).to_bytes()
    nul_kind = TelemetryBatch(device_id="dev-a", records=(
        Record(seq=6, kind="a\x00b", at=NOW, body={}),)).to_bytes()
    results = handle_messages(fleet, [(topic, huge_seq), (topic, batch("dev-a", [1])),
                                      (topic, long_kind), (topic, nul_kind)], now=NOW)
    assert [r.reject_class for r in results] == ["malformed", None, "malformed", "malformed"]
    assert results[0].rejected is not None and str(2**63) in results[0].rejected
    assert results[2].rejected is not None and "got 61 characters" in results[2].rejected
    assert results[3].rejected is not None and "no NUL, got 3 characters" in (
        results[3].rejected)
    assert stored(fleet, "dev-a") == [1]


def test_a_failed_group_stores_nothing_and_counts_nothing(fleet: Fleet) -> None:
    from fleet_server.errors import StoreError

    with atomic(fleet.engine) as conn:  # the database refuses dev-b's records
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_b BEFORE INSERT ON device_records WHEN "
            "NEW.device_id = 'dev-b' BEGIN SELECT RAISE(ABORT, 'refused for dev-b'); END")
    before = REJECT_COUNTS.copy()
    with pytest.raises(StoreError, match="refused for dev-b"):
        handle_messages(fleet, [
            (device_topic("dev-a", "telemetry"), batch("dev-a", [1])),
            (device_topic("dev-a", "telemetry"), b"{nope"),
            (device_topic("dev-b", "telemetry"), batch("dev-b", [1]))], now=NOW)
    assert stored(fleet, "dev-a") == [] and acks_held(fleet) == {}
    assert before == REJECT_COUNTS


def _reference_bodies(payload: bytes) -> list[tuple[int, str]]:
    """What ingest stored before the one-pass read: from_bytes, then each body re-encoded."""
    msg = TelemetryBatch.from_bytes(payload)
    return [(r.seq, json.dumps(r.body, sort_keys=True, separators=(",", ":")))
            for r in msg.records]


STORED_AS_BEFORE = [
    ("canonical", batch("dev-a", [1, 2])),
    ("non-ascii and DEL", TelemetryBatch(device_id="dev-a", records=(
        Record(seq=1, kind="metrics", at=NOW, body={"model": "é日\x7f", "n": [1.5, -0.25]}),)
    ).to_bytes()),
    ("spaces, escapes, 1.50", (b'{"schema_version": 1, "device_id": "dev-a", "records": '
     b'[{"seq": 1, "kind": "metrics", "at": 5, "body": {"b": 1.50, "a": "\\u00e9"}}]}')),
    ("record with an extra field", (b'{"device_id":"dev-a","records":[{"at":5,"body":{"z":1},'
     b'"kind":"m","seq":1,"x_future":true}],"schema_version":1}')),
    # where orjson (the server's codec) writes otherwise than Python's json, and its int limit
    ("floats as Python writes them", TelemetryBatch(device_id="dev-a", records=(
        Record(seq=1, kind="m", at=5, body={"a": 1e-05, "b": 1e-07, "c": 2**64}),)).to_bytes()),
    ("floats as orjson writes them", (b'{"device_id":"dev-a","records":[{"at":5,"body":'
     b'{"a":0.00001,"b":1e-7},"kind":"m","seq":1}],"schema_version":1}')),
]


@pytest.mark.parametrize("payload", [p for _, p in STORED_AS_BEFORE],
                         ids=[n for n, _ in STORED_AS_BEFORE])
def test_bodies_are_stored_byte_for_byte_as_the_reference_path_stores_them(
        fleet: Fleet, payload: bytes) -> None:
    handle_message(fleet, device_topic("dev-a", "telemetry"), payload, now=NOW)
    with atomic(fleet.engine) as conn:
        got = [(seq, body) for seq, body in conn.execute(select(
            tables.device_records.c.seq, tables.device_records.c.body).order_by(
            tables.device_records.c.seq))]
    assert got == _reference_bodies(payload)


@pytest.mark.parametrize("number", [b"1e999", b"-1E+400", b"1" + b"0" * 250 + b"e99"],
                         ids=["1e999", "-1E+400", "250-digits-e99"])
def test_a_number_overflowing_to_infinity_is_refused(fleet: Fleet, number: bytes) -> None:
    payload = (b'{"device_id":"dev-a","records":[{"at":5,"body":{"x":' + number
               + b'},"kind":"m","seq":1}],"schema_version":1}')
    result = handle_message(fleet, device_topic("dev-a", "telemetry"), payload, now=NOW)
    assert result.reject_class == "malformed" and "Out of range float" in (result.rejected or "")
    assert stored(fleet, "dev-a") == []


def test_an_orjson_that_writes_floats_otherwise_is_not_used(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """orjson before 3.12 wrote 1e16 where Python writes 1e+16: stored bodies would differ
    from the reference path's, so such a version is refused at start and json reads alone."""
    import types

    import orjson

    from fleet_server import ingest_parse

    assert ingest_parse._orjson_codec() is not None  # the installed one agrees
    old = types.ModuleType("orjson")
    old.__dict__.update({k: getattr(orjson, k) for k in dir(orjson) if not k.startswith("__")})
    old.__version__ = "3.11.0"  # type: ignore[attr-defined]
    old.dumps = lambda value, **kw: (  # type: ignore[attr-defined]
        orjson.dumps(value, **kw).replace(b"e+", b"e"))
    monkeypatch.setitem(sys.modules, "orjson", old)
    with caplog.at_level("WARNING", logger="fleet_server.ingest_parse"):
        assert ingest_parse._orjson_codec() is None
    assert "orjson 3.11.0 writes 1e+16, 1e+22" in caplog.text

"""Retention of device records: real ingest into a real SQLite file, pruned on an injected
clock in bounded chunks; what ack bookkeeping needs is kept, each prune is audited, and a
pruned sequence re-sent by a device is never stored again as new.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from monitoring_helpers import START, Fleetlet, metrics_body
from pydantic import ValidationError
from sqlalchemy import select

from agent.metrics import METRICS_KIND
from agent.protocol.messages import Ack, Record, TelemetryBatch
from agent.protocol.topics import device_topic
from fleet_server import audit
from fleet_server.db import atomic, tables
from fleet_server.ingest import IngestResult
from fleet_server.monitoring import TimeRange, model_view
from fleet_server.monitoring.retention import ACTOR, RecordRetention
from fleet_server.settings import Settings

DAY = 86400
KEEP = 30 * DAY


@pytest.fixture
def fleetlet(tmp_path: Path) -> Iterator[Fleetlet]:
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4"}, {})
    yield f
    f.close()


def send(f: Fleetlet, device_id: str, seqs: list[int], *, at: int,
         **extra: int) -> IngestResult:
    """A telemetry batch of ``metrics.requests`` records with these sequence numbers."""
    body = metrics_body([5.0, 6.0, 7.0])
    batch = TelemetryBatch(device_id=device_id, records=tuple(
        Record(seq=s, kind=METRICS_KIND, at=at, body=body) for s in seqs),
        unrecognized=dict(extra))
    return f.receive(device_topic(device_id, "telemetry"), batch.to_bytes(), at)


def acked(result: IngestResult) -> int:
    assert result.ack_payload is not None
    return Ack.from_bytes(result.ack_payload).upto_seq


def stored(f: Fleetlet, device_id: str) -> list[int]:
    c = tables.device_records.c
    with atomic(f.fleet.engine) as conn:
        return list(conn.execute(select(c.seq).where(c.device_id == device_id)
                                 .order_by(c.seq)).scalars())


def prunes(f: Fleetlet) -> list[dict[str, object]]:
    with atomic(f.fleet.engine) as conn:
        assert audit.verify_chain(conn) is None
        return [{"actor": e.actor, **e.after} for e in audit.entries(conn, limit=1000)
                if e.action == "device_records.prune"]


def test_old_records_are_deleted_in_chunks_and_the_prune_is_audited(
        fleetlet: Fleetlet) -> None:
    f = fleetlet
    assert acked(send(f, "pi-1", list(range(1, 13)), at=START)) == 12
    assert acked(send(f, "pi-2", [1, 2, 3], at=START + 5)) == 3
    assert acked(send(f, "pi-1", [13, 14], at=START + 10 * DAY)) == 14
    retention = RecordRetention(f.fleet.engine, keep_s=KEEP, chunk_rows=5)

    # at START + 30 days nothing is older than 30 days yet (the cut-off is inclusive)
    report = retention.run(START + KEEP - 1)
    assert (report.deleted, report.chunks, report.complete) == (0, 0, True)
    assert prunes(f) == []  # nothing deleted: nothing audited

    report = retention.run(START + KEEP + 5)
    assert (report.cutoff, report.deleted, report.complete) == (START + 5, 15, True)
    assert report.chunks == 3  # 15 rows in chunks of at most 5
    assert stored(f, "pi-1") == [13, 14] and stored(f, "pi-2") == []
    assert prunes(f) == [{"actor": ACTOR, "cutoff": START + 5, "deleted": 15, "chunks": 3,
                          "complete": True, "by_stream": {"telemetry": 15}, "keep_s": KEEP}]
    assert retention.counters.snapshot() == {
        "pruned": {"telemetry": 15, "drift": 0}, "runs": 2, "last_run_at": START + KEEP + 5,
        "last_prune_at": START + KEEP + 5}
    # the ack positions stay: they are what de-duplication and the next ack build on
    assert acked(send(f, "pi-2", [4], at=START + KEEP + 10)) == 4


def test_records_past_a_gap_are_kept_until_the_ack_covers_them(fleetlet: Fleetlet) -> None:
    """Records above the ack position are what ingest walks when the gap fills: never
    deleted, however old."""
    f = fleetlet
    assert acked(send(f, "pi-1", [1, 2, 3], at=START)) == 3
    assert acked(send(f, "pi-1", [5, 6], at=START)) == 3  # 4 is missing
    retention = RecordRetention(f.fleet.engine, keep_s=KEEP)
    assert retention.run(START + 40 * DAY).deleted == 3
    assert stored(f, "pi-1") == [5, 6]
    # the gap fills: the walk still finds 5 and 6, and the ack covers them
    assert acked(send(f, "pi-1", [4], at=START + 40 * DAY)) == 6
    assert stored(f, "pi-1") == [4, 5, 6]
    assert retention.run(START + 80 * DAY).deleted == 3
    assert stored(f, "pi-1") == []


def test_a_pruned_sequence_sent_again_is_a_duplicate_not_a_new_record(
        fleetlet: Fleetlet) -> None:
    f = fleetlet
    assert acked(send(f, "pi-1", [1, 2, 3], at=START)) == 3
    assert RecordRetention(f.fleet.engine, keep_s=KEEP).run(START + 31 * DAY).deleted == 3
    # the device never got the ack, was offline a month, and sends 2 and 3 again
    again = send(f, "pi-1", [2, 3], at=START + 31 * DAY)
    assert (again.stored, again.duplicates, acked(again)) == (0, 2, 3)
    assert stored(f, "pi-1") == []


def test_a_run_is_capped_and_the_next_pass_goes_on(fleetlet: Fleetlet) -> None:
    f = fleetlet
    send(f, "pi-1", list(range(1, 8)), at=START)
    send(f, "pi-2", list(range(1, 4)), at=START)
    retention = RecordRetention(f.fleet.engine, keep_s=KEEP, chunk_rows=2, max_rows=4,
                                every_s=3600)
    now = START + 31 * DAY
    got = []
    while (report := retention.maybe_run(now)) is not None:
        got.append((report.deleted, report.chunks, report.complete))
        assert len(got) < 10
    # 10 rows, at most 4 per run: the runs follow each other until one finds less than 4
    assert got == [(4, 2, False), (4, 2, False), (2, 1, True)]
    assert stored(f, "pi-1") == [] and stored(f, "pi-2") == []
    assert retention.maybe_run(now + 3599) is None  # done: the next run is an hour later
    report = retention.maybe_run(now + 3600)
    assert report is not None and report.deleted == 0
    assert [p["deleted"] for p in prunes(f)] == [4, 4, 2]


def test_retention_off_keeps_everything(fleetlet: Fleetlet) -> None:
    f = fleetlet
    send(f, "pi-1", [1, 2], at=START)
    off = RecordRetention.for_days(f.fleet.engine, 0)
    assert off.maybe_run(START + 3650 * DAY) is None
    with pytest.raises(ValueError, match="retention is off"):
        off.run(START)
    assert stored(f, "pi-1") == [1, 2]
    with pytest.raises(ValueError, match="keep_s and every_s: expected >= 0, got -86400"):
        RecordRetention.for_days(f.fleet.engine, -1)
    with pytest.raises(ValueError, match="chunk_rows and max_rows: expected >= 1, got 0"):
        RecordRetention(f.fleet.engine, keep_s=1, chunk_rows=0)


def test_the_setting_defaults_to_30_days_and_refuses_negative_days(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).record_retention_days == 30
    assert Settings(data_dir=tmp_path, record_retention_days=0).record_retention_days == 0
    with pytest.raises(ValidationError, match="record_retention_days"):
        Settings(data_dir=tmp_path, record_retention_days=-1)


def test_views_over_a_pruned_period_are_empty_and_recent_ones_intact(
        fleetlet: Fleetlet) -> None:
    f = fleetlet
    send(f, "pi-1", [1, 2], at=START)
    send(f, "pi-1", [3], at=START + 31 * DAY)
    old = TimeRange.make(START + 31 * DAY, since=START - 60, until=START + 60)
    new = TimeRange.make(START + 31 * DAY, since=START + 31 * DAY - 60,
                         until=START + 31 * DAY)
    assert model_view(f.fleet, "digits", old)["totals"]["requests"] == 6
    RecordRetention(f.fleet.engine, keep_s=KEEP).run(START + 31 * DAY)
    assert model_view(f.fleet, "digits", old)["totals"]["requests"] == 0
    assert model_view(f.fleet, "digits", new)["totals"]["requests"] == 3


"""What devices send: reported state, status, telemetry and drift, stored exactly once.

:func:`handle_message` takes one MQTT message (topic + payload) and the time it arrived, and
returns what happened plus the ack to publish, if any. It never raises on device input:
malformed, oversized, forged (body claims another device) or unknown-device messages are
dropped, counted in ``ingest_rejects`` and logged without their payload.

:class:`IngestCounters` counts the results for the server's Prometheus ``/metrics``: records
stored and duplicates per stream, rejects per reason class, acks sent. The runtime that feeds
this module owns one (nothing here is global but :data:`REJECT_COUNTS`, kept for callers of
the module alone).

Records are de-duplicated on (device, stream, seq), so a device re-sending after a reconnect
never double-counts. The ack carries the highest *contiguous* sequence stored: the device
deletes only what the server has. A batch's optional ``floor`` field (the lowest sequence the
device still holds) lets the ack pass gaps left by records the device evicted when its outbox
was full; the eviction itself arrives as an ``outbox.evicted`` event, so the loss is reported.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    Ack,
    DriftBatch,
    MessageError,
    Reported,
    Status,
    TelemetryBatch,
    parse_device_message,
)
from agent.protocol.topics import TopicError, ack_topic
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet

__all__ = ["REJECT_COUNTS", "IngestCounters", "IngestResult", "handle_message"]

log = logging.getLogger(__name__)
#: process-wide reject counters by reason class (exported as metrics later)
REJECT_COUNTS: Counter[str] = Counter()
# the body column's canonical JSON; one encoder for all (json.dumps with options builds one
# per call, a third of its cost on small bodies)
_BODY_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class IngestResult:
    device_id: str | None
    kind: str
    stored: int = 0
    duplicates: int = 0
    ack_topic: str | None = None
    ack_payload: bytes | None = None
    rejected: str | None = None  # why, in words
    reject_class: str | None = None  # oversized | malformed | forged | unknown_device


class IngestCounters:
    """What ingest did since the server started, for ``/metrics`` (thread-safe: the ingest
    thread counts results, the ack thread acks, a scrape reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: Counter[str] = Counter()
        self._stored: Counter[str] = Counter()
        self._duplicates: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._acks = 0

    def count(self, result: IngestResult) -> None:
        """Count one :func:`handle_message` result."""
        with self._lock:
            self._messages[result.kind] += 1
            if result.reject_class is not None:
                self._rejected[result.reject_class] += 1
            elif result.kind in ("telemetry", "drift"):
                self._stored[result.kind] += result.stored
                self._duplicates[result.kind] += result.duplicates

    def ack_sent(self) -> None:
        with self._lock:
            self._acks += 1

    def snapshot(self) -> dict[str, Any]:
        """``messages`` per kind, ``stored`` and ``duplicates`` records per stream,
        ``rejected`` per reason class, ``acks`` sent."""
        with self._lock:
            return {"messages": dict(self._messages), "stored": dict(self._stored),
                    "duplicates": dict(self._duplicates), "rejected": dict(self._rejected),
                    "acks": self._acks}


def _reject(conn: Connection, topic: str, reason: str, size: int, now: int,
            kind: str) -> IngestResult:
    REJECT_COUNTS[kind] += 1
    conn.execute(insert(tables.ingest_rejects).values(at=now, topic=topic[:300],
                                                      reason=reason[:500], size=size))
    log.warning("dropped device message on %r (%d bytes): %s", topic[:200], size, reason)
    return IngestResult(None, "rejected", rejected=reason, reject_class=kind)


def _live_device(conn: Connection, device_id: str) -> bool:
    row = conn.execute(select(tables.devices.c.revoked_at).where(
        tables.devices.c.id == device_id)).first()
    return row is not None and row.revoked_at is None


_RECORD_COLUMNS = ("device_id", "stream", "seq", "kind", "at", "body", "received_at")
_SQLITE_INSERT: list[str] = []  # the compiled statement below, for SQLite (one compile)


def _insert_ignoring_duplicates(conn: Connection, device_id: str, stream: str,
                                rows: list[tuple[object, ...]]) -> int:
    """Insert ``rows`` (values in ``_RECORD_COLUMNS`` order) into ``device_records`` in one
    statement, skipping those already stored (same device, stream, seq); return how many
    were inserted."""
    table = tables.device_records
    postgres = conn.dialect.name == "postgresql"
    stmt = (pg_insert if postgres else sqlite_insert)(table).on_conflict_do_nothing(
        index_elements=[table.c.device_id, table.c.stream, table.c.seq])
    if not postgres:
        if not _SQLITE_INSERT:
            compiled = stmt.compile(dialect=conn.dialect, column_keys=list(_RECORD_COLUMNS))
            if not compiled.positional or tuple(compiled.positiontup or ()) != _RECORD_COLUMNS:
                raise RuntimeError(f"device_records insert: expected positional parameters "
                                   f"{_RECORD_COLUMNS}, got {compiled.positiontup}")
            _SQLITE_INSERT.append(str(compiled))
        # executemany straight to the driver with tuples: SQLAlchemy's per-row parameter
        # processing was a tenth of ingest; sqlite3's rowcount is the sum over the rows
        inserted = conn.exec_driver_sql(_SQLITE_INSERT[0], rows).rowcount
        return min(len(rows), max(0, int(inserted)))
    # psycopg's executemany rowcount is not the sum: count the batch's rows already stored
    have = conn.execute(select(func.count()).select_from(table).where(
        table.c.device_id == device_id, table.c.stream == stream,
        table.c.seq.in_([row[2] for row in rows]))).scalar_one()
    conn.execute(stmt, [dict(zip(_RECORD_COLUMNS, row, strict=True)) for row in rows])
    return len(rows) - int(have)


def _store_records(conn: Connection, msg: TelemetryBatch | DriftBatch, now: int
                   ) -> tuple[int, int, int]:
    stream = msg.STREAM
    device_id = msg.device_id
    seqs = [r.seq for r in msg.records]
    encode = _BODY_ENCODER.encode
    stored = _insert_ignoring_duplicates(conn, device_id, stream, [
        (device_id, stream, r.seq, r.kind, r.at,
         encode(r.body if type(r.body) is dict else dict(r.body)), now)
        for r in msg.records])
    upto = conn.execute(select(tables.stream_acks.c.upto_seq).where(
        tables.stream_acks.c.device_id == msg.device_id,
        tables.stream_acks.c.stream == stream)).scalar()
    first = upto is None
    upto = upto or 0
    # ``floor``: the lowest seq the device still holds for this stream. Everything below it
    # was acked or evicted on the device (outbox full) and will never arrive: skip that gap.
    # Trusted only up to the batch's first record, so a device cannot ack what it never sent.
    floor = msg.unrecognized.get("floor")
    if isinstance(floor, int) and not isinstance(floor, bool) and 1 <= floor <= seqs[0]:
        upto = max(upto, floor - 1)
    # ``from_seq``: every seq in [from_seq, last record] missing from the batch was evicted
    # (the outbox evicts raw metrics before older events, so gaps open above the floor too).
    # Believed only when it continues what we already hold.
    from_seq = msg.unrecognized.get("from_seq")
    if (isinstance(from_seq, int) and not isinstance(from_seq, bool)
            and 1 <= from_seq <= seqs[0] and from_seq <= upto + 1):
        upto = max(upto, seqs[-1])
    if seqs[0] == upto + 1 and seqs[-1] - seqs[0] == len(seqs) - 1:
        # the batch continues what we hold without a gap (seqs strictly increase): all of it
        # is stored now, so walk on only from its last record (usually nothing follows)
        upto = seqs[-1]
    following = conn.execute(select(tables.device_records.c.seq).where(
        tables.device_records.c.device_id == msg.device_id,
        tables.device_records.c.stream == stream,
        tables.device_records.c.seq > upto).order_by(tables.device_records.c.seq)).scalars()
    for seq in following:
        if seq != upto + 1:
            break
        upto = seq
    if first:
        conn.execute(insert(tables.stream_acks).values(device_id=msg.device_id, stream=stream,
                                                       upto_seq=upto))
    else:
        conn.execute(update(tables.stream_acks).where(
            tables.stream_acks.c.device_id == msg.device_id,
            tables.stream_acks.c.stream == stream).values(upto_seq=upto))
    return stored, len(seqs) - stored, upto


def handle_message(fleet: Fleet, topic: str, payload: bytes, *, now: int) -> IngestResult:
    """Store one device message; return what happened and the ack to publish, if any.

    Raises:
        StoreError: the database failed (the caller retries; nothing was half-stored).
    """
    with atomic(fleet.engine) as conn:
        if len(payload) > MAX_MESSAGE_BYTES:
            return _reject(conn, topic, f"payload of {len(payload)} bytes, over "
                           f"{MAX_MESSAGE_BYTES}", len(payload), now, "oversized")
        try:
            msg = parse_device_message(topic, payload)
        except (TopicError, MessageError) as exc:
            return _reject(conn, topic, str(exc), len(payload), now, "malformed")
        if isinstance(msg, Ack):
            return _reject(conn, topic, "acks flow server -> device only", len(payload), now,
                           "forged")
        if not _live_device(conn, msg.device_id):
            return _reject(conn, topic, f"unknown or revoked device {msg.device_id!r}",
                           len(payload), now, "unknown_device")
        dev = tables.devices.c
        if isinstance(msg, Reported):
            conn.execute(update(tables.devices).where(dev.id == msg.device_id).values(
                reported=msg.to_bytes().decode("utf-8"), reported_at=now, last_seen_at=now))
            return IngestResult(msg.device_id, "reported", stored=1)
        if isinstance(msg, Status):
            conn.execute(update(tables.devices).where(dev.id == msg.device_id).values(
                online=msg.online, last_seen_at=now))
            return IngestResult(msg.device_id, "status", stored=1)
        stored, dups, upto = _store_records(conn, msg, now)
        conn.execute(update(tables.devices).where(dev.id == msg.device_id).values(
            last_seen_at=now))
        ack = Ack(device_id=msg.device_id, stream=msg.STREAM, upto_seq=upto)
        return IngestResult(msg.device_id, msg.STREAM, stored=stored, duplicates=dups,
                            ack_topic=ack_topic(msg.device_id), ack_payload=ack.to_bytes())

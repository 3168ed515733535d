"""What devices send: reported state, status, telemetry and drift, stored exactly once.

:func:`handle_messages` takes MQTT messages (topic + payload) in arrival order and the time
they arrived, stores them in ONE transaction (group commit), and returns what happened to each
plus the ack to publish, if any; :func:`handle_message` is the same for one message. They never
raise on device input: malformed, oversized, forged (body claims another device) or
unknown-device messages are dropped alone, counted in ``ingest_rejects`` and logged without
their payload, and the rest of the group is stored. Everything that needs no database (size,
strict parse, direction, values the columns cannot hold) is checked before the transaction,
by :func:`fleet_server.ingest_parse.check_message`, so device input never fails a group.
:func:`store_checked` is the transaction alone, for messages already checked (the runtime
checks them in parse processes, :class:`fleet_server.ingest_parse.ParsePool`).

Why a group: at 10 records per message, a transaction's fixed cost (its begin and commit, the
live-device check, the ack position's read and write, the device's ``last_seen_at``) was most
of the ingest CPU. In a group those are one statement each for the whole group, sent straight
to the driver, and each message adds one insert (on SQLite a multi-row ``INSERT`` per
:data:`SQLITE_ROWS_PER_INSERT` records, not an ``executemany``: see
``_insert_ignoring_duplicates``) and one read of what follows its stream's ack position.
Nothing is cached across transactions: the database stays the one truth on ack positions and
on revocation.

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

import logging
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from agent.protocol.messages import Ack
from agent.protocol.topics import ack_topic
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet
from fleet_server.ingest_parse import (
    Checked,
    RecordBatch,
    Refused,
    ReportedState,
    StatusChange,
    check_messages,
)

__all__ = ["REJECT_COUNTS", "SQLITE_ROWS_PER_INSERT", "IngestCounters", "IngestResult",
           "handle_message", "handle_messages", "store_checked"]

log = logging.getLogger(__name__)
#: process-wide reject counters by reason class (exported as metrics later)
REJECT_COUNTS: Counter[str] = Counter()


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
        #: the runtime's parse processes, whose restarts and re-parses a scrape reports
        #: (anything with ``restarts`` and ``reparsed`` ints; None: parsing in-thread)
        self.parse_pool: Any = None

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
        ``rejected`` per reason class, ``acks`` sent, and the parse processes' ``restarts``
        and ``reparsed`` messages (0 without them)."""
        pool = self.parse_pool
        with self._lock:
            return {"messages": dict(self._messages), "stored": dict(self._stored),
                    "duplicates": dict(self._duplicates), "rejected": dict(self._rejected),
                    "acks": self._acks,
                    "parse_restarts": pool.restarts if pool is not None else 0,
                    "parse_reparsed": pool.reparsed if pool is not None else 0}


def _driver_sql(conn: Connection, text: str) -> str:
    """``text`` (``?`` placeholders) in the driver's own parameter style, for
    ``exec_driver_sql``: the hot statements skip SQLAlchemy's per-call compile and parameter
    processing, which cost about 1.5 ms per message."""
    style = conn.dialect.paramstyle
    if style == "qmark":
        return text
    if style in ("format", "pyformat"):
        return text.replace("?", "%s")
    raise RuntimeError(f"ingest SQL: expected a qmark, format or pyformat driver, got "
                       f"{style!r} ({conn.dialect.name})")


def _marks(count: int) -> str:
    return ", ".join("?" * count)


def _value_rows(rows: int, width: int) -> str:
    """``(?, ?), (?, ?)`` for ``rows`` rows of ``width`` values."""
    return ", ".join(["(" + _marks(width) + ")"] * rows)


#: rows per multi-row statement, so that its parameters stay under the 999 that SQLite allows
#: before 3.32. Why multi-row statements rather than ``executemany``: see
#: ``_insert_ignoring_duplicates``.
_ROWS_PER_STATEMENT = 128


def _live_devices(conn: Connection, device_ids: list[str]) -> set[str]:
    """Which of ``device_ids`` are registered and not revoked (one statement)."""
    if not device_ids:
        return set()
    rows = conn.exec_driver_sql(_driver_sql(
        conn, f"SELECT id FROM devices WHERE revoked_at IS NULL AND id IN "
              f"({_marks(len(device_ids))})"), tuple(device_ids))
    return {row[0] for row in rows}


def _ack_positions(conn: Connection, device_ids: list[str]) -> dict[tuple[str, str], int]:
    """``stream_acks.upto_seq`` per (device, stream) of these devices (one statement)."""
    if not device_ids:
        return {}
    rows = conn.exec_driver_sql(_driver_sql(
        conn, f"SELECT device_id, stream, upto_seq FROM stream_acks WHERE device_id IN "
              f"({_marks(len(device_ids))})"), tuple(device_ids))
    return {(row[0], row[1]): int(row[2]) for row in rows}


def _write_ack_positions(conn: Connection, before: dict[tuple[str, str], int],
                         after: dict[tuple[str, str], int]) -> None:
    """Write the positions that moved or are new: one upsert (``INSERT ... ON CONFLICT DO
    UPDATE``, as SQLite and PostgreSQL both write it) per :data:`_ROWS_PER_STATEMENT`."""
    changed = [(*key, upto) for key, upto in after.items() if before.get(key) != upto]
    for start in range(0, len(changed), _ROWS_PER_STATEMENT):
        part = changed[start:start + _ROWS_PER_STATEMENT]
        conn.exec_driver_sql(_driver_sql(
            conn, f"INSERT INTO stream_acks (device_id, stream, upto_seq) VALUES "
                  f"{_value_rows(len(part), 3)} ON CONFLICT (device_id, stream) "
                  f"DO UPDATE SET upto_seq = excluded.upto_seq"),
            tuple(chain.from_iterable(part)))


def _touch_devices(conn: Connection, device_ids: list[str], now: int) -> None:
    """Set ``last_seen_at`` of these devices: one statement per :data:`_ROWS_PER_STATEMENT`."""
    for start in range(0, len(device_ids), _ROWS_PER_STATEMENT):
        part = device_ids[start:start + _ROWS_PER_STATEMENT]
        conn.exec_driver_sql(_driver_sql(
            conn, f"UPDATE devices SET last_seen_at = ? WHERE id IN ({_marks(len(part))})"),
            (now, *part))


def _reject(conn: Connection, refused: Refused, now: int) -> IngestResult:
    conn.execute(insert(tables.ingest_rejects).values(
        at=now, topic=refused.topic[:300], reason=refused.reason[:500], size=refused.size))
    return IngestResult(None, "rejected", rejected=refused.reason, reject_class=refused.kind)


_RECORD_COLUMNS = ("device_id", "stream", "seq", "kind", "at", "body", "received_at")
_RECORD_KEY = [tables.device_records.c.device_id, tables.device_records.c.stream,
               tables.device_records.c.seq]
# built once: building them per message was about 45 us of SQLAlchemy Core
_PG_INSERT = pg_insert(tables.device_records).on_conflict_do_nothing(index_elements=_RECORD_KEY)
_SQLITE_INSERT_STMT = sqlite_insert(tables.device_records).on_conflict_do_nothing(
    index_elements=_RECORD_KEY)
#: rows per ``device_records`` INSERT on SQLite (7 values each: see ``_ROWS_PER_STATEMENT``)
SQLITE_ROWS_PER_INSERT = _ROWS_PER_STATEMENT
#: _SQLITE_INSERT_STMT compiled for SQLite, one per row count (at most SQLITE_ROWS_PER_INSERT)
_SQLITE_INSERTS: dict[int, str] = {}


def _sqlite_insert(conn: Connection, rows: int) -> str:
    """The SQLite ``INSERT ... VALUES (...), (...) ON CONFLICT DO NOTHING`` of ``rows`` rows,
    positional parameters row by row in ``_RECORD_COLUMNS`` order (compiled once, then
    cached)."""
    text = _SQLITE_INSERTS.get(rows)
    if text is None:
        compiled = _SQLITE_INSERT_STMT.compile(dialect=conn.dialect,
                                               column_keys=list(_RECORD_COLUMNS))
        one = "VALUES " + _value_rows(1, len(_RECORD_COLUMNS))
        if (not compiled.positional or tuple(compiled.positiontup or ()) != _RECORD_COLUMNS
                or str(compiled).count(one) != 1):
            raise RuntimeError(f"device_records insert: expected one row of positional "
                               f"parameters {_RECORD_COLUMNS}, got {str(compiled)!r}")
        text = str(compiled).replace(one, "VALUES " + _value_rows(rows, len(_RECORD_COLUMNS)))
        _SQLITE_INSERTS[rows] = text
    return text


def _insert_ignoring_duplicates(conn: Connection, device_id: str, stream: str,
                                rows: Sequence[tuple[object, ...]]) -> int:
    """Insert ``rows`` (values in ``_RECORD_COLUMNS`` order) into ``device_records``,
    skipping those already stored (same device, stream, seq); return how many were
    inserted.

    On SQLite, one multi-row statement per :data:`SQLITE_ROWS_PER_INSERT` rows, sent straight
    to the driver (SQLAlchemy's per-row parameter processing was a tenth of ingest), rather
    than an ``executemany``: that one steps SQLite once per row, and each step releases the
    GIL and then waits to take it back from the server's other threads (paho's network
    thread), up to the 5 ms switch interval; with a busy thread beside it, that wait, not
    SQLite, was most of the time the ingest thread spent storing."""
    table = tables.device_records
    if conn.dialect.name != "postgresql":
        inserted = 0
        for start in range(0, len(rows), SQLITE_ROWS_PER_INSERT):
            part = rows[start:start + SQLITE_ROWS_PER_INSERT]
            # sqlite3's rowcount: the rows this statement inserted (conflicts skipped)
            inserted += conn.exec_driver_sql(
                _sqlite_insert(conn, len(part)),
                tuple(chain.from_iterable(part))).rowcount
        return min(len(rows), max(0, inserted))
    # psycopg's executemany rowcount is not the sum: count the batch's rows already stored
    have = conn.execute(select(func.count()).select_from(table).where(
        table.c.device_id == device_id, table.c.stream == stream,
        table.c.seq.in_([row[2] for row in rows]))).scalar_one()
    conn.execute(_PG_INSERT, [dict(zip(_RECORD_COLUMNS, row, strict=True)) for row in rows])
    return len(rows) - int(have)


def _store_records(conn: Connection, batch: RecordBatch,
                   positions: dict[tuple[str, str], int]) -> tuple[int, int, int]:
    """Insert a batch's records and move its stream's ack position in ``positions`` (the
    caller writes the positions back once per transaction)."""
    stream = batch.stream
    device_id = batch.device_id
    rows = batch.rows
    first, last = rows[0][2], rows[-1][2]
    upto = positions.get((device_id, stream), 0)
    # A seq at or below the ack position was stored, or declared gone by the device (floor /
    # from_seq): a duplicate even when retention (fleet_server.monitoring.retention) has
    # deleted its row since. Seqs strictly increase, so only a re-send needs the filter.
    fresh = rows if first > upto else [row for row in rows if row[2] > upto]
    stored = _insert_ignoring_duplicates(conn, device_id, stream, fresh) if fresh else 0
    # ``floor``: the lowest seq the device still holds for this stream. Everything below it
    # was acked or evicted on the device (outbox full) and will never arrive: skip that gap.
    # Trusted only up to the batch's first record, so a device cannot ack what it never sent.
    floor = batch.floor
    if floor is not None and 1 <= floor <= first:
        upto = max(upto, floor - 1)
    # ``from_seq``: every seq in [from_seq, last record] missing from the batch was evicted
    # (the outbox evicts raw metrics before older events, so gaps open above the floor too).
    # Believed only when it continues what we already hold.
    from_seq = batch.from_seq
    if from_seq is not None and 1 <= from_seq <= first and from_seq <= upto + 1:
        upto = max(upto, last)
    if first == upto + 1 and last - first == len(rows) - 1:
        # the batch continues what we hold without a gap (seqs strictly increase): all of it
        # is stored now, so walk on only from its last record (usually nothing follows)
        upto = last
    following = conn.exec_driver_sql(_driver_sql(
        conn, "SELECT seq FROM device_records WHERE device_id = ? AND stream = ? AND seq > ? "
              "ORDER BY seq"), (device_id, stream, upto))
    for (seq,) in following:
        if seq != upto + 1:
            break
        upto = seq
    following.close()
    positions[(device_id, stream)] = upto
    return stored, len(rows) - stored, upto


def handle_messages(fleet: Fleet, messages: Sequence[tuple[str, bytes]], *, now: int
                    ) -> list[IngestResult]:
    """Store device messages, given as (topic, payload) in arrival order, in ONE transaction
    (group commit); return what happened to each, in the same order, with the ack to publish.

    A message refused for what it holds (size, parse, direction, unknown or revoked device)
    is refused alone: the others of the group are stored. Each ack carries its stream's
    position after its own message: publish them only after this returns, since only then
    are their records committed.

    Raises:
        StoreError: the database failed; nothing of the group was stored (the caller retries,
            or lets the devices resend: none of it was acked).
    """
    return store_checked(fleet, check_messages(messages, now), now=now)


def store_checked(fleet: Fleet, checked: Sequence[Checked], *, now: int) -> list[IngestResult]:
    """:func:`handle_messages` for messages already checked by
    :func:`fleet_server.ingest_parse.check_message` (in arrival order).

    Raises:
        StoreError: the database failed; nothing of the group was stored.
    """
    ids = list(dict.fromkeys(m.device_id for m in checked if not isinstance(m, Refused)))
    streaming = list(dict.fromkeys(m.device_id for m in checked if isinstance(m, RecordBatch)))
    results: list[IngestResult] = []
    refused: list[Refused] = []
    dev = tables.devices.c
    with atomic(fleet.engine) as conn:
        live = _live_devices(conn, ids)
        before = _ack_positions(conn, [d for d in streaming if d in live])
        positions = dict(before)
        seen: dict[str, None] = {}  # devices whose records were stored, for last_seen_at
        for msg in checked:
            if not isinstance(msg, Refused) and msg.device_id not in live:
                msg = Refused(msg.topic, msg.size, f"unknown or revoked device "
                              f"{msg.device_id!r}", "unknown_device")
            if isinstance(msg, Refused):
                refused.append(msg)
                results.append(_reject(conn, msg, now))
            elif isinstance(msg, ReportedState):
                conn.execute(update(tables.devices).where(dev.id == msg.device_id).values(
                    reported=msg.text, reported_at=now, last_seen_at=now))
                results.append(IngestResult(msg.device_id, "reported", stored=1))
            elif isinstance(msg, StatusChange):
                conn.execute(update(tables.devices).where(dev.id == msg.device_id).values(
                    online=msg.online, last_seen_at=now))
                results.append(IngestResult(msg.device_id, "status", stored=1))
            else:
                stored, dups, upto = _store_records(conn, msg, positions)
                seen[msg.device_id] = None
                ack = Ack(device_id=msg.device_id, stream=msg.stream, upto_seq=upto)
                results.append(IngestResult(
                    msg.device_id, msg.stream, stored=stored, duplicates=dups,
                    ack_topic=ack_topic(msg.device_id), ack_payload=ack.to_bytes()))
        _write_ack_positions(conn, before, positions)
        _touch_devices(conn, list(seen), now)
    for r in refused:  # counted once committed: a failed group is retried
        REJECT_COUNTS[r.kind] += 1
        log.warning("dropped device message on %r (%d bytes): %s", r.topic[:200], r.size,
                    r.reason)
    return results


def handle_message(fleet: Fleet, topic: str, payload: bytes, *, now: int) -> IngestResult:
    """Store one device message; return what happened and the ack to publish, if any.

    Raises:
        StoreError: the database failed (the caller retries; nothing was half-stored).
    """
    return handle_messages(fleet, [(topic, payload)], now=now)[0]

"""Retention of ``device_records``: records older than ``record_retention_days`` are deleted.

Without it the table grows forever (about a million rows a day for 100 devices sending a
record every 10 s), and every monitoring read of a long range grows with it. The
maintenance pass calls :meth:`RecordRetention.run` with the injected clock; it deletes the
records the server *received* (``received_at``, the server's clock, as every view and gate
reads it) at or before ``now - keep_s``:

- **in chunks**: at most ``chunk_rows`` (5,000) rows per write transaction, so ingest (the
  other writer, one SQLite write lock) waits at most one chunk's delete, a few tens of
  milliseconds, never the whole backlog. Which rows to delete is found before the
  transaction, on a read snapshot that never takes the write lock, through the health index
  ``(device_id, kind, received_at)``: per device, per kind (found by a loose index scan), a
  range seek on ``received_at``. No new index, so ingest writes what it always wrote.
- **bounded per pass**: at most ``max_rows`` (200,000) rows, so a first run over a long
  backlog does not hold up the rest of the maintenance pass (timestamp re-signing, alerts);
  the next pass continues where it stopped.
- **at most every** ``every_s`` (an hour) once the backlog is done: records age by the
  second, but pruning by the hour keeps the pass cheap and the audit log short.
- **audited**: each run that deleted something appends ``device_records.prune`` to the audit
  log (rows deleted, per stream, cut-off, whether the backlog is done) and logs the same line.
- **counted**: :attr:`RecordRetention.counters` (:class:`PruneCounters`) adds up the rows
  deleted per stream and keeps the time of the last run and of the last run that deleted
  something, since the process started; ``/metrics`` reads them
  (:mod:`fleet_server.monitoring.prometheus`).

What ack bookkeeping needs is never deleted. ``stream_acks.upto_seq`` is the highest
*contiguous* sequence stored per (device, stream); a record above it sits past a gap, and
ingest walks such records to move the ack when the gap fills (:mod:`fleet_server.ingest`).
Only records at or below their stream's ``upto_seq`` are deleted, whatever their age, and
``stream_acks`` itself is never pruned (one row per device and stream).

Why a pruned record is never stored again as new: ingest de-duplicates on the primary key
(device, stream, seq), which a deleted row no longer holds. It must therefore also refuse any
record at or below the stream's ack position: every such sequence was stored (the ack covers
only contiguous stored records) or was declared gone by the device itself (``floor`` /
``from_seq``: evicted from its outbox). A device re-sending an old, acked and pruned record
(its ack was lost, then it was offline past the retention) gets it counted as a duplicate
and acked again. Retention only deletes at or below that position, so the two rules together
mean a sequence is stored at most once, pruned or not. (``tests/fleet_server/
test_retention.py`` checks it through the real ingest.)

Views over a pruned period show nothing for it: there are no rollups (yet), so retention
is also what bounds the cost of a view (``docs/monitoring.md``). Alert rules (a window of
at most 7 days) and rollout health gates read recent records only; keep at least as many
days as the longest window they use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, and_, delete, or_, select

from fleet_server import audit
from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading

__all__ = ["ACTOR", "CHUNK_ROWS", "EVERY_S", "MAX_ROWS", "STREAMS", "PruneCounters",
           "PruneReport", "RecordRetention"]

log = logging.getLogger(__name__)

#: rows deleted per write transaction at most
CHUNK_ROWS: Final = 5000
#: rows deleted per run at most (the next pass continues)
MAX_ROWS: Final = 200_000
#: seconds between two runs once nothing is left over
EVERY_S: Final = 3600
#: the audit actor of a prune
ACTOR: Final = "fleet_server retention"
#: the record streams, each counted even before it had anything pruned
STREAMS: Final = ("telemetry", "drift")
_DAY: Final = 86400


@dataclass(frozen=True)
class PruneReport:
    """What one run did."""

    cutoff: int  # records received at or before this were due
    deleted: int  # rows deleted
    chunks: int  # write transactions
    complete: bool  # False: stopped at max_rows; the next pass goes on
    by_stream: Mapping[str, int]  # rows deleted per stream (only streams with deletions)

    def to_dict(self) -> dict[str, Any]:
        return {"cutoff": self.cutoff, "deleted": self.deleted, "chunks": self.chunks,
                "complete": self.complete, "by_stream": dict(sorted(self.by_stream.items()))}


class PruneCounters:
    """What the retention did since the process started, for ``/metrics`` (thread-safe: the
    maintenance pass adds, a scrape reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pruned: dict[str, int] = dict.fromkeys(STREAMS, 0)
        self._runs = 0
        self._last_run_at: int | None = None
        self._last_prune_at: int | None = None

    def deleted(self, by_stream: Mapping[str, int]) -> None:
        """Count rows whose delete committed (called per chunk, so a run that fails later
        still counts what it deleted)."""
        with self._lock:
            for stream, n in by_stream.items():
                self._pruned[stream] = self._pruned.get(stream, 0) + n

    def ran(self, now: int, deleted: int) -> None:
        """Count one finished run at ``now`` that deleted ``deleted`` rows."""
        with self._lock:
            self._runs += 1
            self._last_run_at = now
            if deleted:
                self._last_prune_at = now

    def snapshot(self) -> dict[str, Any]:
        """``{pruned: {stream: rows}, runs, last_run_at, last_prune_at}`` (times: server
        unix seconds, None before the first run / the first run that deleted rows)."""
        with self._lock:
            return {"pruned": dict(self._pruned), "runs": self._runs,
                    "last_run_at": self._last_run_at, "last_prune_at": self._last_prune_at}


@dataclass(frozen=True)
class _Due:
    """Rows of one (device, stream) to delete, by sequence."""

    device_id: str
    stream: str
    seqs: list[int]


class RecordRetention:
    """Deletes old ``device_records`` in bounded chunks (module docstring).

    Args:
        engine: the fleet's database.
        keep_s: keep records received in the last ``keep_s`` seconds; 0 keeps them forever.
        every_s: seconds between runs once a run found nothing left over.
        chunk_rows: rows per write transaction at most.
        max_rows: rows per run at most.

    Raises:
        ValueError: a negative ``keep_s`` or ``every_s``, or a chunk or cap under 1.
    """

    def __init__(self, engine: Engine, *, keep_s: int, every_s: int = EVERY_S,
                 chunk_rows: int = CHUNK_ROWS, max_rows: int = MAX_ROWS) -> None:
        if keep_s < 0 or every_s < 0:
            raise ValueError(f"keep_s and every_s: expected >= 0, got {keep_s}, {every_s}")
        if chunk_rows < 1 or max_rows < 1:
            raise ValueError(f"chunk_rows and max_rows: expected >= 1, got {chunk_rows}, "
                             f"{max_rows}")
        self.engine = engine
        self.keep_s = keep_s
        self.every_s = every_s
        self.chunk_rows = chunk_rows
        self.max_rows = max_rows
        #: rows pruned per stream and the time of the last runs, since the process started
        self.counters = PruneCounters()
        self._next_at: int | None = None  # None: run at the first call

    @classmethod
    def for_days(cls, engine: Engine, days: int) -> RecordRetention:
        """Keep ``days`` days (the ``record_retention_days`` setting; 0 = forever).

        Raises:
            ValueError: ``days`` < 0.
        """
        return cls(engine, keep_s=days * _DAY)

    def maybe_run(self, now: int) -> PruneReport | None:
        """:meth:`run` if retention is on and a run is due at ``now``; else None.

        Raises:
            StoreError: the database failed (chunks committed before stay deleted; the next
                call tries again).
        """
        if self.keep_s == 0 or (self._next_at is not None and now < self._next_at):
            return None
        report = self.run(now)
        self._next_at = now + (self.every_s if report.complete else 0)
        return report

    def run(self, now: int) -> PruneReport:
        """Delete what is due at ``now`` (at most ``max_rows`` rows), then audit and log it.

        Raises:
            ValueError: retention is off (``keep_s`` 0).
            StoreError: the database failed (chunks committed before stay deleted).
        """
        if self.keep_s == 0:
            raise ValueError("retention is off (keep_s 0): nothing to run")
        cutoff = now - self.keep_s
        by_stream: dict[str, int] = {}
        chunks = 0
        taken = 0  # rows found due in this run: what max_rows bounds
        batch: list[_Due] = []
        size = 0  # rows in batch
        for device_id, streams in self._acked_streams():
            for kind in self._kinds(device_id):
                while taken < self.max_rows:
                    room = min(self.chunk_rows - size, self.max_rows - taken)
                    found = self._due(device_id, kind, streams, cutoff, room, batch)
                    taken += found
                    size += found
                    if size >= self.chunk_rows:  # found == room: there may be more
                        self._delete(batch, cutoff, by_stream)
                        chunks += 1
                        batch, size = [], 0
                    if found < room:
                        break  # this device's due records of this kind are all found
                if taken >= self.max_rows:
                    break
            if taken >= self.max_rows:
                break
        if batch:
            self._delete(batch, cutoff, by_stream)
            chunks += 1
        complete = taken < self.max_rows
        deleted = sum(by_stream.values())
        report = PruneReport(cutoff, deleted, chunks, complete, by_stream)
        if deleted:
            with atomic(self.engine) as conn:
                audit.record(conn, at=now, actor=ACTOR, action="device_records.prune",
                             target="device_records",
                             after={**report.to_dict(), "keep_s": self.keep_s})
            log.info("retention: deleted %d device record(s) received at or before %d in %d "
                     "transaction(s)%s", deleted, cutoff, chunks,
                     "" if complete else "; more next pass")
        self.counters.ran(now, deleted)
        return report

    # ------------------------------------------------------------------ reads (no write lock)
    def _acked_streams(self) -> list[tuple[str, dict[str, int]]]:
        """Per device with an ack position: ``{stream: upto_seq}``."""
        a = tables.stream_acks.c
        with reading(self.engine) as conn:
            rows = conn.execute(select(a.device_id, a.stream, a.upto_seq)
                                .order_by(a.device_id, a.stream)).all()
        out: dict[str, dict[str, int]] = {}
        for row in rows:
            out.setdefault(row.device_id, {})[row.stream] = int(row.upto_seq)
        return list(out.items())

    def _kinds(self, device_id: str) -> list[str]:
        """The record kinds ``device_id`` has, by a loose scan of the health index (one seek
        per kind, not a scan of the device's records)."""
        c = tables.device_records.c
        kinds: list[str] = []
        with reading(self.engine) as conn:
            while True:
                where = [c.device_id == device_id] + ([c.kind > kinds[-1]] if kinds else [])
                kind = conn.execute(select(c.kind).where(*where).order_by(c.kind)
                                    .limit(1)).scalar()
                if kind is None:
                    return kinds
                kinds.append(str(kind))

    def _due(self, device_id: str, kind: str, streams: dict[str, int], cutoff: int,
             limit: int, batch: list[_Due]) -> int:
        """Append up to ``limit`` due rows of one device and kind to ``batch``, oldest first
        (only at or below their stream's ack position); return how many."""
        c = tables.device_records.c
        acked = or_(*(and_(c.stream == stream, c.seq <= upto)
                      for stream, upto in sorted(streams.items())))
        with reading(self.engine) as conn:
            rows = conn.execute(select(c.stream, c.seq).where(
                c.device_id == device_id, c.kind == kind, c.received_at <= cutoff, acked)
                .order_by(c.received_at).limit(limit)).all()
        # the caller queries the same (device, kind) again only after deleting what it found
        by_stream: dict[str, list[int]] = {}
        for row in rows:
            by_stream.setdefault(row.stream, []).append(int(row.seq))
        batch.extend(_Due(device_id, s, seqs) for s, seqs in sorted(by_stream.items()))
        return len(rows)

    # ------------------------------------------------------------------ one write transaction
    def _delete(self, batch: Sequence[_Due], cutoff: int, by_stream: dict[str, int]) -> None:
        """Delete ``batch`` in one transaction; add the rows deleted to ``by_stream`` once it
        committed. ``received_at`` is checked again: a row is only ever deleted if it is
        still the old one."""
        c = tables.device_records.c
        counts: dict[str, int] = {}
        with atomic(self.engine) as conn:
            for due in batch:
                result = conn.execute(delete(tables.device_records).where(
                    c.device_id == due.device_id, c.stream == due.stream,
                    c.received_at <= cutoff, c.seq.in_(due.seqs)))
                counts[due.stream] = counts.get(due.stream, 0) + max(0, int(result.rowcount))
        counts = {stream: n for stream, n in counts.items() if n}
        for stream, n in counts.items():
            by_stream[stream] = by_stream.get(stream, 0) + n
        self.counters.deleted(counts)

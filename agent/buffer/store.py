"""The device outbox: sequence-numbered telemetry/drift rows kept in SQLite until the server acks.

One SQLite file (``<data_dir>/outbox.db``) opened through sqlite-utils, in WAL mode with
``synchronous=NORMAL``. What that survives:

* **process kill** (``kill -9``, OOM killer, a crash in the daemon): nothing committed is lost.
  A commit has written the transaction's WAL frames to the file before ``append`` returns, and
  the OS keeps them whatever happens to the process; the next open replays the WAL.
* **power cut / kernel panic**: the file is never corrupted, but the last transactions committed
  since the WAL was last synced (at a checkpoint) may be rolled back, counters included.
  Because a rolled-back counter would hand out a sequence number again, nothing leaves the
  device before it is on stable storage: :meth:`Outbox.build_batches` checkpoints (which syncs
  the WAL, then the database) before it returns a batch, when a counter moved since the last
  checkpoint (rows appended, or an ack raised a counter); acks that only delete rows do not
  need one (rows they delete and a power cut brings back are sent again and de-duplicated).
  Lost un-sent rows are the price of not calling ``fsync`` on every metrics row, which an SD
  card could not sustain.

Rows are ``(stream, seq, priority, kind, at, body)``. ``stream`` is one of
:data:`agent.protocol.messages.STREAMS`; ``seq`` comes from a per-stream counter kept in the
``outbox_streams`` table: it only grows, so a number is never reused after an ack, an
eviction or a restart. ``priority`` says what goes first when the file is full
(:data:`PRIORITIES`): ``"metrics"`` (raw per-interval metrics) before ``"summary"`` (drift
summaries) and ``"event"`` (things that happened).

Bounded: at most ``max_rows`` rows. When an append would go over, the outbox evicts the oldest
``"metrics"`` rows, and the oldest of the others only once no metrics rows remain, down to
about 99 % of the cap (so a full outbox writes one eviction record per ~1 % of the cap, not one
per append), and appends an ``"event"`` row of kind :data:`EVICTED_KIND` on the telemetry
stream saying how many rows of each priority went (and the running totals), so the loss
reaches the server.

**Gaps, and what a batch promises the server.** Acks delete rows, eviction deletes rows, so
the sequence numbers a device still holds have gaps the server would otherwise wait on
forever. Every batch from :meth:`Outbox.build_batches` carries two fields in its
``unrecognized`` part (the wire format keeps unknown fields, python-tuf ADR 0008):

* ``"floor"``: the lowest seq the device still holds for the stream. Every seq below it was
  acked or evicted and will never be sent.
* ``"from_seq"``: the batch accounts for every seq in ``[from_seq, last_seq]``: a seq in that
  range that is not in ``records`` was evicted and will never be sent. Needed because metrics
  are evicted before older events, which leaves gaps *above* the floor.

Both claims stay true forever (new rows always get higher numbers). A server that acks the
highest contiguous seq can therefore set ``upto = max(upto, floor - 1)``, and, once it has
stored the batch, ``upto = max(upto, last_seq)`` when ``from_seq <= upto + 1``.

On open, ``PRAGMA quick_check`` runs. A corrupt or non-SQLite file (or a SQLite file that is
not an outbox) is moved aside to ``<name>.corrupt-<n>`` (with its ``-wal``/``-shm``), a fresh
file is started and an ``"event"`` row of kind :data:`CORRUPT_RESET_KIND` is appended;
:attr:`Outbox.corrupt_reset` says it happened. The fresh file's counters start at ``now`` in
milliseconds (not 1), so they stay above the numbers the lost file handed out, as long as the
device appended fewer than 1,000 rows a second on average and its clock is not behind.
If the clock is behind, the first ack above what this file handed out raises its counter
(:meth:`Outbox.ack`).

No wall clock inside: ``at`` and ``now`` are passed in. Thread-safe (one lock per outbox);
one process should write a file at a time. Every ``sqlite3`` error leaves as
:class:`agent.errors.StoreError`; misuse raises ``ValueError``/``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Self

from sqlite_utils import Database

from agent.buffer.migrations import MIGRATIONS
from agent.config import AgentConfig
from agent.errors import StoreError
from agent.protocol.messages import (
    MAX_BODY_DEPTH,
    MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    STREAMS,
    DriftBatch,
    Record,
    TelemetryBatch,
    canonical_json,
)
from agent.protocol.topics import DEVICE_ID_PATTERN, is_valid_device_id

__all__ = [
    "CORRUPT_RESET_KIND",
    "EVENT_STREAM",
    "EVICTED_KIND",
    "MAX_RECORD_BYTES",
    "OUTBOX_FILENAME",
    "PRIORITIES",
    "CorruptReset",
    "Outbox",
    "OutboxStats",
    "StreamStats",
]

#: eviction order: the first is evicted first; the others only when none of it is left
PRIORITIES: Final = ("metrics", "summary", "event")
#: kind of the event row that reports evicted rows
EVICTED_KIND: Final = "outbox.evicted"
#: kind of the event row that reports a corrupt file moved aside
CORRUPT_RESET_KIND: Final = "outbox.corrupt_reset"
#: the stream the outbox's own events go to
EVENT_STREAM: Final = "telemetry"
#: the outbox file in the data directory (listed in ``agent/config.py``)
OUTBOX_FILENAME: Final = "outbox.db"
#: a record's JSON must fit a batch on its own, with room for the envelope
MAX_RECORD_BYTES: Final = MAX_MESSAGE_BYTES - 1024

_MAX_KIND = 200  # characters
_MAX_SEQ = 1 << 62  # far below SQLite's int64; an ack above this is refused
_RECORD_OVERHEAD = len(b'{"at":,"body":,"kind":,"seq":}')
_BATCH_TYPES: Final[Mapping[str, type[TelemetryBatch | DriftBatch]]] = {
    "telemetry": TelemetryBatch, "drift": DriftBatch}
_CORRUPT_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_INSERT = ("INSERT INTO outbox_records (stream, seq, priority, kind, at, body) "
           "VALUES (?, ?, ?, ?, ?, ?)")


@dataclass(frozen=True)
class CorruptReset:
    """An unreadable outbox file was moved aside and a fresh one started."""

    moved_to: Path
    reason: str
    size: int  # bytes of the file moved aside


@dataclass(frozen=True)
class StreamStats:
    rows: int
    floor: int  # lowest seq held; next_seq when none is held
    next_seq: int


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    max_rows: int
    streams: Mapping[str, StreamStats]
    priorities: Mapping[str, int]  # rows held per priority
    evicted_total: Mapping[str, int]  # rows ever evicted, per priority
    schema_version: int
    corrupt_reset: CorruptReset | None


@dataclass
class _State:
    next_seq: dict[str, int]
    rows: int


def _check_stream(stream: str) -> None:
    if stream not in STREAMS:
        raise ValueError(f"stream: expected one of {', '.join(STREAMS)}, got {stream!r}")


def _check_seq(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_SEQ:
        raise ValueError(f"{name}: expected an integer in 0..2**62-1, got {value!r}")
    return value


# the same settings as agent.protocol's canonical JSON (so the stored text is what to_bytes()
# writes, which build_batches relies on to size batches), built once: json.dumps builds a new
# encoder per call, which was a third of the cost of an append
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False)


def _str_keys_only(value: object) -> bool:
    """Whether every dict in ``value`` has only ``str`` keys (then its encoding is canonical:
    re-parsing and re-encoding it gives the same text)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if type(key) is not str or (isinstance(item, (dict, list, tuple))
                                        and not _str_keys_only(item)):
                return False
        return True
    if isinstance(value, (list, tuple)):
        return all(not isinstance(x, (dict, list, tuple)) or _str_keys_only(x) for x in value)
    return True


def _encode(kind: str, body: Mapping[str, Any], at: float) -> tuple[str, int, str]:
    """``(kind, at, body JSON)`` of one row, checked (misuse -> ValueError).

    The body text is canonical JSON, exactly what ``canonical_json`` makes of the parsed text
    (:meth:`Outbox.build_payloads` splices it into messages as it is).
    """
    if not isinstance(kind, str) or not 0 < len(kind) <= _MAX_KIND:
        raise ValueError(f"kind: expected a string of 1..{_MAX_KIND} characters, got {kind!r}")
    if not isinstance(body, Mapping):
        raise TypeError(f"body: expected a mapping, got {type(body).__name__}")
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) \
            or at < 0:
        raise ValueError(f"at: expected unix seconds >= 0, got {at!r}")
    try:
        data = body if type(body) is dict else dict(body)
        text = _ENCODER.encode(data)
        if not _str_keys_only(data):  # int/float/bool/None keys: sorted as numbers, not text
            text = _ENCODER.encode(json.loads(text))
        size = len(text.encode("utf-8"))
    except (ValueError, TypeError, UnicodeEncodeError, RecursionError) as exc:
        raise ValueError(f"body of kind {kind!r}: expected JSON data (no NaN, no lone "
                         f"surrogates), got {type(exc).__name__}: {exc}") from exc
    if text.count("{") + text.count("[") > MAX_BODY_DEPTH:  # maybe too deep: check for real
        try:  # the server refuses a deeper body: stored here it would stall the stream
            Record.from_dict({"seq": 1, "kind": kind, "at": 0, "body": json.loads(text)})
        except ValueError as exc:
            raise ValueError(f"body of kind {kind!r}: {exc}") from exc
    # worst case: 6 bytes per escaped kind character, 19 digits each for at and seq
    size += _RECORD_OVERHEAD + 6 * len(kind) + 2 + 2 * 19
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"body of kind {kind!r}: expected at most {MAX_RECORD_BYTES} bytes "
                         f"as a record, got {size}")
    return kind, int(at), text


class Outbox:
    """The outbox file (see the module docstring). Build with :meth:`open` or :meth:`in_memory`."""

    def __init__(self, conn: sqlite3.Connection, *, device_id: str, max_rows: int,
                 path: Path | None, corrupt_reset: CorruptReset | None = None) -> None:
        if not is_valid_device_id(device_id):
            raise ValueError(f"device_id: expected a string matching {DEVICE_ID_PATTERN}, "
                             f"got {device_id!r}")
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
            raise ValueError(f"max_rows: expected an integer >= 2, got {max_rows!r}")
        self.device_id = device_id
        self.max_rows = max_rows
        self.path = path
        self.corrupt_reset = corrupt_reset
        self.db = Database(conn, recursive_triggers=False, execute_plugins=False)
        self._conn = conn
        self._lock = threading.RLock()
        self._depth = 0
        self._state_cache: _State | None = None
        # a counter moved (rows appended, an ack raised one) since the last checkpoint
        self._unsynced = True

    # -----------------------------------------------------------------------------------------
    # opening
    # -----------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str, *, device_id: str, max_rows: int, now: float) -> Outbox:
        """Open (or create) the outbox file, checking and migrating it.

        A corrupt or foreign file is moved aside first (see the module docstring); the returned
        outbox's :attr:`corrupt_reset` then says so, and its first row is the
        :data:`CORRUPT_RESET_KIND` event.

        Args:
            path: the SQLite file; its directory must exist.
            device_id: put into every batch.
            max_rows: the cap (``AgentConfig.outbox_max_rows``), at least 2.
            now: unix seconds, for the migration records and a reset event.

        Raises:
            StoreError: the file cannot be opened, moved aside or migrated, or a newer agent
                migrated it incompatibly (:class:`agent.buffer.migrations.IncompatibleSchema`).
            ValueError: a bad ``device_id`` or ``max_rows``.
        """
        path = Path(path)
        reset = None
        reason = _probe(path)
        if reason is not None:
            size = path.stat().st_size
            reset = CorruptReset(_move_aside(path), reason, size)
        try:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False,
                                   timeout=5.0)
        except sqlite3.Error as exc:
            raise StoreError(f"outbox {path}: cannot open: {exc}") from exc
        try:
            outbox = cls(conn, device_id=device_id, max_rows=max_rows, path=path,
                         corrupt_reset=reset)
            outbox._setup(now, first_seq=_seq_base(now) if reset else 1)
            if reset is not None:
                with outbox._translate("record the reset"):
                    outbox._append_rows(EVENT_STREAM, "event", [_encode(CORRUPT_RESET_KIND, {
                        "reason": reset.reason, "moved_to": reset.moved_to.name,
                        "size": reset.size}, now)])
        except BaseException:
            conn.close()
            raise
        return outbox

    @classmethod
    def in_memory(cls, *, device_id: str, max_rows: int, now: float = 0.0) -> Outbox:
        """An outbox in a private in-memory database: the fake for tests (same code path).

        Raises:
            ValueError: a bad ``device_id`` or ``max_rows``.
        """
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        outbox = cls(conn, device_id=device_id, max_rows=max_rows, path=None)
        outbox._setup(now, first_seq=1)
        return outbox

    @classmethod
    def from_config(cls, config: AgentConfig, *, device_id: str, now: float) -> Outbox:
        """:meth:`open` ``<data_dir>/outbox.db`` capped at ``config.outbox_max_rows``.

        Raises:
            StoreError: see :meth:`open`.
        """
        return cls.open(config.data_dir / OUTBOX_FILENAME, device_id=device_id,
                        max_rows=config.outbox_max_rows, now=now)

    def _setup(self, now: float, *, first_seq: int) -> None:
        with self._translate("set up"):
            if self.path is not None:
                self.db.enable_wal()
                if self.db.journal_mode != "wal":
                    raise StoreError(f"outbox {self.path}: expected journal_mode wal, got "
                                     f"{self.db.journal_mode!r}")
            self.db.execute("PRAGMA synchronous = NORMAL")
            MIGRATIONS.apply(self.db, self.atomic, now=now)
            with self.atomic():
                self.db.execute("INSERT OR IGNORE INTO outbox_meta (key, value) "
                                "VALUES ('created_at', ?)", [float(now)])
                self._conn.executemany(
                    "INSERT OR IGNORE INTO outbox_streams (stream, next_seq) VALUES (?, ?)",
                    [(s, first_seq) for s in STREAMS])
                self._conn.executemany(
                    "INSERT OR IGNORE INTO outbox_evicted (priority, total) VALUES (?, 0)",
                    [(p,) for p in PRIORITIES])

    def close(self) -> None:
        """Close the connection (the last close checkpoints the WAL into the file)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Outbox({str(self.path) if self.path else ':memory:'}, max_rows={self.max_rows})"

    # -----------------------------------------------------------------------------------------
    # transactions
    # -----------------------------------------------------------------------------------------
    def _check_connection_mode(self) -> None:
        autocommit = getattr(self._conn, "autocommit", None)
        if autocommit is not None and autocommit != getattr(
                sqlite3, "LEGACY_TRANSACTION_CONTROL", autocommit):
            raise RuntimeError("outbox: connections with autocommit=True/False make commit() "
                               "and rollback() open transactions of their own; expected the "
                               "legacy mode with isolation_level=None")
        if self._conn.isolation_level is not None:
            raise RuntimeError(
                f"outbox: expected isolation_level=None, got "
                f"{self._conn.isolation_level!r}: the driver would open implicit "
                "transactions that atomic() would nest into as savepoints and never commit")

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Outbox]:
        """One transaction (``BEGIN IMMEDIATE``); nested blocks are savepoints.

        Like ``sqlite_utils.Database.atomic``: an exception rolls back the block (only the
        savepoint when nested) and propagates. Holds the outbox's lock for the whole block.

        Raises:
            RuntimeError: the connection is in a mode that breaks this (implicit transactions,
                Python 3.12 ``autocommit``), or a transaction was opened outside ``atomic()``.
            sqlite3.Error: BEGIN/COMMIT failed (the public methods translate it).
        """
        with self._lock:
            self._check_connection_mode()
            conn = self._conn
            if self._depth == 0:
                if conn.in_transaction:
                    raise RuntimeError("outbox: a transaction was opened outside atomic(); "
                                       "atomic() will not nest into what it does not own")
                conn.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self
                    conn.execute("COMMIT")
                except BaseException:
                    self._state_cache = None  # re-read counters after the rollback
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                finally:
                    self._depth = 0
            else:
                name = f"outbox_sp{self._depth}"
                conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self
                except BaseException:
                    self._state_cache = None
                    # an error such as a full disk may have destroyed the whole transaction
                    if conn.in_transaction:
                        conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                        conn.execute(f"RELEASE SAVEPOINT {name}")
                    raise
                else:
                    conn.execute(f"RELEASE SAVEPOINT {name}")
                finally:
                    self._depth -= 1

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            where = self.path if self.path is not None else ":memory:"
            raise StoreError(f"outbox {where}: {what} failed: {exc}") from exc

    def _state(self) -> _State:
        if self._state_cache is None:
            seqs = dict(self._conn.execute("SELECT stream, next_seq FROM outbox_streams"))
            rows = self._conn.execute("SELECT count(*) FROM outbox_records").fetchone()[0]
            self._state_cache = _State(next_seq=seqs, rows=int(rows))
        return self._state_cache

    # -----------------------------------------------------------------------------------------
    # writing
    # -----------------------------------------------------------------------------------------
    def append(self, stream: str, kind: str, body: Mapping[str, Any], *, at: float,
               priority: str) -> int:
        """Append one row in its own transaction; returns its seq.

        Raises:
            ValueError: bad stream, priority, kind, ``at`` or body (not JSON, too large).
            TypeError: the body is not a mapping.
            StoreError: the database failed; nothing was appended.
        """
        return self.append_many(stream, [(kind, body, at)], priority=priority)[0]

    def append_many(self, stream: str, items: Iterable[tuple[str, Mapping[str, Any], float]],
                    *, priority: str) -> range:
        """Append ``(kind, body, at)`` rows in one transaction; returns their seqs.

        The seqs are consecutive. If the cap is reached, eviction happens in the same
        transaction (possibly of rows just appended, if they are the oldest of the lowest
        priority held).

        Raises:
            ValueError: bad stream or priority, or a bad row (nothing is appended then).
            TypeError: a body is not a mapping (nothing is appended then).
            StoreError: the database failed; nothing was appended.
        """
        _check_stream(stream)
        if priority not in PRIORITIES:
            raise ValueError(f"priority: expected one of {', '.join(PRIORITIES)}, "
                             f"got {priority!r}")
        rows = [_encode(kind, body, at) for kind, body, at in items]
        with self._translate("append"):
            return self._append_rows(stream, priority, rows)

    def _append_rows(self, stream: str, priority: str, rows: list[tuple[str, int, str]],
                     *, evict: bool = True) -> range:
        with self.atomic():
            state = self._state()
            first = state.next_seq[stream]
            if not rows:
                return range(first, first)
            self._conn.executemany(_INSERT, [
                (stream, first + i, priority, kind, at, body)
                for i, (kind, at, body) in enumerate(rows)])
            self._conn.execute("UPDATE outbox_streams SET next_seq = ? WHERE stream = ?",
                               (first + len(rows), stream))
            self._unsynced = True
            state.next_seq[stream] = first + len(rows)
            state.rows += len(rows)
            if evict and state.rows > self.max_rows:
                self._evict(at=max(at for _, at, _ in rows))
            return range(first, first + len(rows))

    def _evict(self, *, at: int) -> None:
        """Evict down to ~99 % of the cap, lowest priority and oldest first; record it."""
        state = self._state()
        target = self.max_rows - self.max_rows // 100 - 1  # room for the event row
        excess = state.rows - target
        evicted = dict.fromkeys(PRIORITIES, 0)
        cur = self._conn.execute(
            "SELECT max(id), count(*) FROM (SELECT id FROM outbox_records "
            "WHERE priority = ? ORDER BY id LIMIT ?)", (PRIORITIES[0], excess))
        max_id, count = cur.fetchone()
        if count:
            self._conn.execute("DELETE FROM outbox_records WHERE priority = ? AND id <= ?",
                               (PRIORITIES[0], max_id))
            evicted[PRIORITIES[0]] = count
        if count < excess:  # no metrics rows left: the oldest of the others go
            groups = self._conn.execute(
                "SELECT priority, max(id), count(*) FROM (SELECT id, priority FROM "
                "outbox_records ORDER BY id LIMIT ?) GROUP BY priority",
                (excess - count,)).fetchall()
            if groups:
                self._conn.execute("DELETE FROM outbox_records WHERE id <= ?",
                                   (max(g[1] for g in groups),))
                for priority, _, n in groups:
                    evicted[priority] = evicted.get(priority, 0) + n
        state.rows -= sum(evicted.values())
        self._conn.executemany("UPDATE outbox_evicted SET total = total + ? WHERE priority = ?",
                               [(n, p) for p, n in evicted.items() if n])
        totals = dict(self._conn.execute("SELECT priority, total FROM outbox_evicted"))
        body = {"evicted": evicted, "totals": totals, "max_rows": self.max_rows}
        self._append_rows(EVENT_STREAM, "event", [_encode(EVICTED_KIND, body, at)], evict=False)

    def ack(self, stream: str, upto_seq: int) -> int:
        """The server has every record of ``stream`` up to ``upto_seq``: delete those held.

        Deletes only rows that exist with ``seq <= upto_seq``; a stale (lower) ack deletes
        nothing. An ack above every seq this file handed out means the server saw numbers this
        file does not know (it was lost and restarted): the counter jumps past ``upto_seq`` so
        they are never reused.

        Returns:
            How many rows were deleted.

        Raises:
            ValueError: unknown stream, or ``upto_seq`` not an integer in ``0..2**62-1``.
            StoreError: the database failed; nothing was deleted.
        """
        _check_stream(stream)
        _check_seq("upto_seq", upto_seq)
        with self._translate("ack"), self.atomic():
            state = self._state()
            deleted = self._conn.execute(
                "DELETE FROM outbox_records WHERE stream = ? AND seq <= ?",
                (stream, upto_seq)).rowcount
            state.rows -= deleted
            if upto_seq >= state.next_seq[stream]:
                self._conn.execute("UPDATE outbox_streams SET next_seq = ? WHERE stream = ?",
                                   (upto_seq + 1, stream))
                self._unsynced = True
                state.next_seq[stream] = upto_seq + 1
            return int(deleted)

    # -----------------------------------------------------------------------------------------
    # reading
    # -----------------------------------------------------------------------------------------
    def _rows_after(self, stream: str, limit: int, after: int) -> list[tuple[int, str, int, str]]:
        _check_stream(stream)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit: expected an integer >= 1, got {limit!r}")
        _check_seq("after", after)
        with self._lock, self._translate("read"):
            return self._conn.execute(
                "SELECT seq, kind, at, body FROM outbox_records WHERE stream = ? AND seq > ? "
                "ORDER BY seq LIMIT ?", (stream, after, limit)).fetchall()

    def pending(self, stream: str, limit: int, *, after: int = 0) -> list[Record]:
        """Up to ``limit`` held records of ``stream`` with ``seq > after``, oldest first.

        Raises:
            ValueError: unknown stream, ``limit < 1`` or a bad ``after``.
            StoreError: the database failed.
        """
        rows = self._rows_after(stream, limit, after)
        bodies = json.loads("[" + ",".join(r[3] for r in rows) + "]")
        return [Record(seq=seq, kind=kind, at=at, body=body)
                for (seq, kind, at, _), body in zip(rows, bodies, strict=True)]

    def floor(self, stream: str) -> int:
        """The lowest seq held for ``stream`` (the next seq when none is held).

        Raises:
            ValueError: unknown stream.
            StoreError: the database failed.
        """
        _check_stream(stream)
        with self._lock, self._translate("read"):
            low = self._conn.execute("SELECT min(seq) FROM outbox_records WHERE stream = ?",
                                     (stream,)).fetchone()[0]
            return int(low) if low is not None else self._state().next_seq[stream]

    def build_batches(self, stream: str, max_records: int,
                      max_bytes: int = MAX_MESSAGE_BYTES, *,
                      after: int = 0) -> list[TelemetryBatch] | list[DriftBatch]:
        """Batches of up to ``max_records`` held records with ``seq > after``, oldest first.

        The records are split so that each batch's ``to_bytes()`` is at most ``max_bytes``.
        Each batch carries ``floor`` and ``from_seq`` in ``unrecognized`` (module docstring:
        the server may skip the gaps they describe). Before returning anything, the outbox
        is made durable (a WAL checkpoint, when a counter moved since the last one), so no seq
        sent can be handed out again after a power cut. Send them in order; call :meth:`ack`
        with the server's ack. :meth:`build_payloads` gives the same batches as bytes, faster.

        Args:
            stream: one of ``STREAMS``.
            max_records: records read this call (``AgentConfig.sync_batch``), >= 1.
            max_bytes: the size cap of one batch, at most ``MAX_MESSAGE_BYTES``.
            after: only records above this seq (what is already in flight).

        Returns:
            ``TelemetryBatch`` or ``DriftBatch`` objects (empty: nothing to send).

        Raises:
            ValueError: bad arguments, or ``max_bytes`` too small for one of the records.
            RuntimeError: called inside :meth:`atomic` (a checkpoint cannot run there).
            StoreError: the database failed.
        """
        cls = _BATCH_TYPES.get(stream)
        batches: list[Any] = []
        for part, floor, from_seq in self._split(stream, max_records, max_bytes, after):
            assert cls is not None  # _split checked the stream
            # one parse for the whole batch: per-call overhead was a third of json.loads' cost
            bodies = json.loads("[" + ",".join(r[3] for r in part) + "]")
            records = tuple(Record(seq=seq, kind=kind, at=at, body=body)
                            for (seq, kind, at, _), body in zip(part, bodies, strict=True))
            batches.append(cls(device_id=self.device_id, records=records,
                               unrecognized={"floor": floor, "from_seq": from_seq}))
        return batches

    def build_payloads(self, stream: str, max_records: int,
                       max_bytes: int = MAX_MESSAGE_BYTES, *,
                       after: int = 0) -> list[tuple[bytes, int]]:
        """:meth:`build_batches` as wire bytes: ``(payload, last seq)`` per batch.

        Each payload is byte-identical to the ``to_bytes()`` of the batch ``build_batches``
        returns, without parsing and re-encoding the bodies: the stored body text (canonical
        JSON, see ``_encode``) is spliced into the canonical envelope. Rows written before
        bodies were stored canonically (only bodies with non-string keys differ) still make
        valid messages holding the same data, with those keys in another order.

        Raises:
            ValueError: bad arguments, or ``max_bytes`` too small for one of the records.
            RuntimeError: called inside :meth:`atomic` (a checkpoint cannot run there).
            StoreError: the database failed.
        """
        head = ('{"device_id":' + canonical_json(self.device_id).decode("utf-8")
                + ',"floor":')
        tail = '],"schema_version":' + str(SCHEMA_VERSION) + "}"
        kinds: dict[str, str] = {}
        out: list[tuple[bytes, int]] = []
        for part, floor, from_seq in self._split(stream, max_records, max_bytes, after):
            pieces = [head, str(floor), ',"from_seq":', str(from_seq), ',"records":[']
            for i, (seq, kind, at, body) in enumerate(part):
                kind_json = kinds.get(kind)
                if kind_json is None:
                    kind_json = kinds[kind] = canonical_json(kind).decode("utf-8")
                pieces.append(f'{"," if i else ""}{{"at":{at},"body":{body},'
                              f'"kind":{kind_json},"seq":{seq}}}')
            pieces.append(tail)
            out.append(("".join(pieces).encode("utf-8"), part[-1][0]))
        return out

    def _split(self, stream: str, max_records: int, max_bytes: int, after: int
               ) -> list[tuple[list[tuple[int, str, int, str]], int, int]]:
        """Rows for :meth:`build_batches`, split by size: ``(rows, floor, from_seq)`` per
        batch; checkpoints first when needed."""
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) \
                or not 0 < max_bytes <= MAX_MESSAGE_BYTES:
            raise ValueError(f"max_bytes: expected 1..{MAX_MESSAGE_BYTES}, got {max_bytes!r}")
        with self._lock:  # one consistent view: rows, floor and checkpoint together
            rows = self._rows_after(stream, max_records, after)
            if not rows:
                return []
            floor = self.floor(stream)
            if self._unsynced:
                self.sync()
            kinds: dict[str, int] = {}
            parts: list[tuple[list[tuple[int, str, int, str]], int, int]] = []
            start = 0
            from_seq = after + 1
            while start < len(rows):
                envelope = {"device_id": self.device_id, "schema_version": SCHEMA_VERSION,
                            "records": [],
                            "floor": floor, "from_seq": from_seq}
                size = len(canonical_json(envelope))
                end = start
                while end < len(rows):
                    seq, kind, at, body = rows[end]
                    if kind not in kinds:
                        kinds[kind] = len(canonical_json(kind))
                    rec = (_RECORD_OVERHEAD + len(str(at)) + len(body.encode("utf-8"))
                           + kinds[kind] + len(str(seq)) + (1 if end > start else 0))
                    if size + rec > max_bytes:
                        break
                    size += rec
                    end += 1
                if end == start:
                    raise ValueError(f"max_bytes: {max_bytes} is too small for record seq "
                                     f"{rows[start][0]} of {stream} ({size + rec} bytes with "
                                     "the envelope)")
                parts.append((rows[start:end], floor, from_seq))
                from_seq = rows[end - 1][0] + 1
                start = end
            return parts

    def sync(self) -> None:
        """Make every committed row durable against a power cut (a WAL checkpoint).

        Raises:
            RuntimeError: called inside :meth:`atomic`.
            StoreError: the checkpoint failed.
        """
        with self._lock:
            if self._conn.in_transaction:
                raise RuntimeError("outbox: sync() cannot run inside atomic()")
            if self.path is not None:
                with self._translate("checkpoint"):
                    self._conn.execute("PRAGMA wal_checkpoint(FULL)").fetchall()
            self._unsynced = False

    def depth(self, stream: str | None = None) -> int:
        """Rows held, in all streams or in one.

        Raises:
            ValueError: unknown stream.
            StoreError: the database failed.
        """
        with self._lock, self._translate("read"):
            if stream is None:
                return self._state().rows
            _check_stream(stream)
            return int(self._conn.execute(
                "SELECT count(*) FROM outbox_records WHERE stream = ?", (stream,)).fetchone()[0])

    def stats(self) -> OutboxStats:
        """Counts for ``status`` and for the daemon's own telemetry (a few indexed scans).

        Raises:
            StoreError: the database failed.
        """
        with self._lock, self._translate("read"):
            state = self._state()
            per_stream = {s: (int(n), int(lo)) for s, n, lo in self._conn.execute(
                "SELECT stream, count(*), min(seq) FROM outbox_records GROUP BY stream")}
            streams = {s: StreamStats(rows=per_stream.get(s, (0, 0))[0],
                                      floor=per_stream.get(s, (0, state.next_seq[s]))[1],
                                      next_seq=state.next_seq[s]) for s in STREAMS}
            held = dict.fromkeys(PRIORITIES, 0)
            held.update(self._conn.execute(
                "SELECT priority, count(*) FROM outbox_records GROUP BY priority"))
            evicted = dict(self._conn.execute("SELECT priority, total FROM outbox_evicted"))
            version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
            return OutboxStats(rows=state.rows, max_rows=self.max_rows, streams=streams,
                               priorities=held, evicted_total=evicted,
                               schema_version=version, corrupt_reset=self.corrupt_reset)


# ---------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------
def _seq_base(now: float) -> int:
    """First seq of a file that replaces a lost one: ``now`` in milliseconds (at least 1)."""
    return max(1, int(now * 1000)) if math.isfinite(now) else 1


def _probe(path: Path) -> str | None:
    """Why ``path`` cannot be used as an outbox (None: it can, or it does not exist).

    Raises:
        StoreError: the file cannot be read for another reason (permissions, locked).
    """
    if not path.exists():
        return None
    if not path.is_file():
        raise StoreError(f"outbox {path}: expected a file, got a directory or device")
    if path.stat().st_size == 0 and not Path(f"{path}-wal").exists():
        return None  # a crash right after creating it: an empty database is a valid one
    conn = None
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=5.0)
        result = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        if result != ["ok"]:
            return "quick_check: " + "; ".join(str(r) for r in result[:5])
        tables = {r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and MIGRATIONS.table not in tables:
            return f"not an outbox: tables {sorted(tables)[:5]}"
        return None
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in _CORRUPT_CODES:
            return f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}"
        raise StoreError(f"outbox {path}: cannot check it: {exc}") from exc
    finally:
        if conn is not None:
            conn.close()


def _move_aside(path: Path) -> Path:
    """Rename ``path`` (and its -wal/-shm/-journal) to the first free ``<name>.corrupt-<n>``.

    Raises:
        StoreError: the rename failed.
    """
    n = 1
    while Path(f"{path}.corrupt-{n}").exists():
        n += 1
    aside = Path(f"{path}.corrupt-{n}")
    try:
        os.replace(path, aside)
        for suffix in ("-wal", "-shm", "-journal"):
            if Path(f"{path}{suffix}").exists():
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
        _fsync_dir(path.parent)
    except OSError as exc:
        raise StoreError(f"outbox {path}: cannot move the corrupt file aside to {aside}: "
                         f"{exc}") from exc
    return aside


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

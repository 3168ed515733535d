"""Persisted update records: :class:`UpdateRecord` and :class:`StateStore` over ``state.db``.

Persist before you act: the runner writes the record with its *new* state (one transaction)
before that state's work starts, so after a crash the record says what was in flight, and
:func:`agent.updater.recovery.recover` decides what to do about it. A ``durable`` write is also
flushed to the disk (``synchronous=FULL``: it survives a power cut); the others
(``synchronous=NORMAL`` under WAL) survive a crashed or killed process, and become durable with
the next durable write. Which writes must be durable is the machine's decision
(:data:`agent.updater.machine.DURABLE_STATES`).

Index of what this module keeps on disk (STYLE rule 6; ``<data_dir>/state.db``)::

    table meta      key TEXT PRIMARY KEY, value TEXT              (since schema 1)
        "schema_version"    "1"; a newer number was written by a newer agent: refused
        "applied_sequence"  the highest desired-state sequence the agent acted on ("0": none)
    table updates   one row per update, newest last               (since schema 1)
        n               INTEGER PRIMARY KEY AUTOINCREMENT: creation order
        update_id       TEXT UNIQUE: "<sequence>/<model name>"
        record_version  INTEGER: UpdateRecord.record_version of ``record``
        state           TEXT: State value, duplicated from ``record`` for people with sqlite3
        record          TEXT: UpdateRecord.to_dict() as JSON (unknown fields kept on rewrite)
        updated_at      REAL: unix seconds of the last write

Compatibility: a record written by a newer agent with a higher ``record_version`` is refused
(:class:`StoreError`); fields an older agent does not know survive its rewrites, so rolling
the agent back does not lose them (mender's ``StateDataVersion``). Finished records beyond the
newest :data:`KEEP_FINISHED` are pruned.

sqlite3 errors are translated into :class:`StoreError` here and never leave this module.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import StoreError
from agent.protocol.messages import DesiredModel, MessageError
from agent.updater.machine import FINAL_STATES, State

__all__ = [
    "KEEP_FINISHED",
    "RECORD_VERSION",
    "SCHEMA_VERSION",
    "STATE_DB",
    "StateStore",
    "UpdateRecord",
]

#: file name of the state database inside the data directory
STATE_DB = "state.db"
#: version of the database layout (tables and meta keys)
SCHEMA_VERSION = 1
#: version of the :class:`UpdateRecord` JSON
RECORD_VERSION = 1
#: finished records kept for ``status`` and debugging; older ones are pruned
KEEP_FINISHED = 20

_FIELDS = ("record_version", "update_id", "sequence", "desired", "state", "attempt", "waiting",
           "done", "reported", "previous_version", "model_download", "manifest_download",
           "last_error", "transient_error", "created_at", "updated_at")


@dataclass(frozen=True)
class UpdateRecord:
    """One update of one model: what is wanted, where it is, and how it went.

    ``attempt`` counts the writes that *entered* ``state`` (1 on first entry; each start-up that
    re-enters it adds one): the boot-loop counter. ``waiting`` says the last try of this state
    ended in a transient error (``transient_error``), so nothing was in flight. ``done`` says a
    final state's work is finished and only its report may be pending; ``reported`` that the
    report went out, which finishes the update.
    """

    update_id: str
    sequence: int  # the desired state's sequence
    desired: DesiredModel  # target name, version, sha256, length, TUF target names, profile
    state: State
    attempt: int = 1
    waiting: bool = False
    done: bool = False
    reported: bool = False
    previous_version: str | None = None  # what `current` pointed to when the update began
    model_download: str | None = None  # fetched model file (downloads/), once Fetched
    manifest_download: str | None = None  # fetched manifest.json, once Fetched
    last_error: str | None = None  # the fatal error the outcome is about (reported)
    transient_error: str | None = None  # why the update is waiting (not reported)
    created_at: float = 0.0  # unix seconds
    updated_at: float = 0.0  # unix seconds
    record_version: int = RECORD_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @staticmethod
    def make_id(sequence: int, name: str) -> str:
        """The update id: desired-state sequence and model name (``"12/digits"``)."""
        return f"{sequence}/{name}"

    @property
    def name(self) -> str:
        return self.desired.name

    @property
    def version(self) -> str:
        return self.desired.version

    @property
    def sha256(self) -> str:
        return self.desired.sha256

    @property
    def length(self) -> int:
        return self.desired.length

    @property
    def finished(self) -> bool:
        """The update ended: a final state, its work done and its report sent."""
        return self.state in FINAL_STATES and self.reported

    def evolve(self, **changes: Any) -> UpdateRecord:
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included."""
        return {
            **self.unrecognized,
            "record_version": self.record_version,
            "update_id": self.update_id,
            "sequence": self.sequence,
            "desired": self.desired.to_dict(),
            "state": self.state.value,
            "attempt": self.attempt,
            "waiting": self.waiting,
            "done": self.done,
            "reported": self.reported,
            "previous_version": self.previous_version,
            "model_download": self.model_download,
            "manifest_download": self.manifest_download,
            "last_error": self.last_error,
            "transient_error": self.transient_error,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, data: object) -> UpdateRecord:
        """Rebuild a record read from ``state.db``.

        Raises:
            StoreError: not a record, a newer ``record_version``, or a field of the wrong type.
        """
        if not isinstance(data, dict):
            raise StoreError(f"update record: expected an object, got {type(data).__name__}")
        d = dict(data)
        version = d.get("record_version")
        if not isinstance(version, int) or not 1 <= version <= RECORD_VERSION:
            raise StoreError(f"update record: expected record_version 1..{RECORD_VERSION}, got "
                             f"{version!r} (written by a newer agent?)")
        try:
            rec = cls(
                record_version=version,
                update_id=_typed(d, "update_id", str),
                sequence=_typed(d, "sequence", int),
                desired=DesiredModel.from_dict(d.get("desired"), "desired", "update record"),
                state=State(_typed(d, "state", str)),
                attempt=_typed(d, "attempt", int),
                waiting=_typed(d, "waiting", bool),
                done=_typed(d, "done", bool),
                reported=_typed(d, "reported", bool),
                previous_version=_typed(d, "previous_version", str, optional=True),
                model_download=_typed(d, "model_download", str, optional=True),
                manifest_download=_typed(d, "manifest_download", str, optional=True),
                last_error=_typed(d, "last_error", str, optional=True),
                transient_error=_typed(d, "transient_error", str, optional=True),
                created_at=float(_typed(d, "created_at", (int, float))),
                updated_at=float(_typed(d, "updated_at", (int, float))),
                unrecognized={k: v for k, v in d.items() if k not in _FIELDS},
            )
        except (MessageError, ValueError) as exc:
            raise StoreError(f"update record {d.get('update_id')!r}: {exc}") from exc
        return rec


def _typed(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
           optional: bool = False) -> Any:
    value = d.get(key)
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise StoreError(f"update record field {key!r}: expected "
                         f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ("CREATE TABLE IF NOT EXISTS updates ("
     " n INTEGER PRIMARY KEY AUTOINCREMENT,"
     " update_id TEXT NOT NULL UNIQUE,"
     " record_version INTEGER NOT NULL,"
     " state TEXT NOT NULL,"
     " record TEXT NOT NULL,"
     " updated_at REAL NOT NULL)"),
)


class StateStore:
    """The update records in a real SQLite file (``<data_dir>/state.db``).

    Every :meth:`save` is one ``BEGIN IMMEDIATE`` transaction: when it returns, the record
    survives the process dying, and, if it was ``durable`` (``synchronous=FULL``), a power cut.
    Safe to share between threads (one connection behind a lock); several processes may open
    the same file (WAL).
    """

    def __init__(self, path: str | Path) -> None:
        """Open (creating if needed) the database at ``path``.

        Raises:
            StoreError: it cannot be opened or created, or a newer agent wrote its schema.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._durable = True  # the connection's synchronous setting: FULL
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open state database {self.path}: {exc}") from exc
        with self._tx() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"state database {self.path}: schema version {row[0]} is newer "
                                 f"than this agent's {SCHEMA_VERSION}")

    @classmethod
    def in_dir(cls, data_dir: str | Path) -> StateStore:
        """The store at ``<data_dir>/state.db``.

        Raises:
            StoreError: as for the constructor.
        """
        return cls(Path(data_dir) / STATE_DB)

    @contextmanager
    def _tx(self, durable: bool | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction; ``durable`` True/False sets ``synchronous`` FULL/NORMAL for it
        (``None``: as it is, for reads)."""
        with self._lock:
            try:
                if durable is not None and durable != self._durable:
                    self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"state database {self.path}: {exc}") from exc

    def save(self, record: UpdateRecord, *, applied_sequence: int | None = None,
             durable: bool = True) -> None:
        """Write ``record`` (insert or replace by update id), in one transaction.

        Args:
            record: the record to persist.
            applied_sequence: also raise the applied desired-state sequence to this, atomically
                with the record (it never goes down).
            durable: flush it to the disk before returning (else it survives a crashed
                process, not a power cut, until the next durable write).

        Raises:
            StoreError: the write failed; nothing was written.
        """
        body = json.dumps(record.to_dict(), sort_keys=True, allow_nan=False)
        with self._tx(durable) as db:
            db.execute(
                "INSERT INTO updates (update_id, record_version, state, record, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(update_id) DO UPDATE SET "
                "record_version=excluded.record_version, state=excluded.state, "
                "record=excluded.record, updated_at=excluded.updated_at",
                (record.update_id, record.record_version, record.state.value, body,
                 record.updated_at))
            if applied_sequence is not None:
                self._raise_applied(db, applied_sequence)

    def load(self) -> UpdateRecord | None:
        """The newest update record (finished or not), or ``None`` when there is none.

        Raises:
            StoreError: the read failed or the record cannot be understood.
        """
        with self._tx() as db:
            row = db.execute("SELECT record FROM updates ORDER BY n DESC LIMIT 1").fetchone()
        return None if row is None else self._decode(row[0])

    def get(self, update_id: str) -> UpdateRecord | None:
        """The record of ``update_id``, or ``None``.

        Raises:
            StoreError: the read failed or the record cannot be understood.
        """
        with self._tx() as db:
            row = db.execute("SELECT record FROM updates WHERE update_id=?",
                             (update_id,)).fetchone()
        return None if row is None else self._decode(row[0])

    def history(self, limit: int = KEEP_FINISHED) -> list[UpdateRecord]:
        """The newest ``limit`` records, newest first.

        Raises:
            StoreError: the read failed or a record cannot be understood.
        """
        with self._tx() as db:
            rows = db.execute("SELECT record FROM updates ORDER BY n DESC LIMIT ?",
                              (limit,)).fetchall()
        return [self._decode(r[0]) for r in rows]

    def applied_sequence(self) -> int:
        """The highest desired-state sequence the agent acted on (0: none), for replay checks.

        Raises:
            StoreError: the read failed.
        """
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key='applied_sequence'").fetchone()
        return 0 if row is None else int(row[0])

    def set_applied_sequence(self, sequence: int) -> None:
        """Raise the applied sequence to ``sequence``; a lower one leaves it unchanged.

        Raises:
            StoreError: the write failed.
        """
        with self._tx(durable=True) as db:  # replay protection: never lost to a power cut
            self._raise_applied(db, sequence)

    def prune(self, keep: int = KEEP_FINISHED) -> int:
        """Delete finished records beyond the newest ``keep``; the newest record always stays.

        Returns:
            How many were deleted.

        Raises:
            StoreError: the write failed.
        """
        with self._tx(durable=False) as db:  # reads and decodes only rows past the newest `keep`
            rows = db.execute("SELECT n, record FROM updates ORDER BY n DESC LIMIT -1 OFFSET ?",
                              (max(keep, 1),)).fetchall()
            doomed = [n for n, body in rows if self._decode(body).finished]
            db.executemany("DELETE FROM updates WHERE n=?", [(n,) for n in doomed])
        return len(doomed)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._db.close()

    @staticmethod
    def _raise_applied(db: sqlite3.Connection, sequence: int) -> None:
        if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
            raise ValueError(f"applied_sequence: expected an integer >= 0, got {sequence!r}")
        db.execute("INSERT INTO meta VALUES ('applied_sequence', ?) ON CONFLICT(key) DO UPDATE "
                   "SET value=excluded.value WHERE CAST(value AS INTEGER) < "
                   "CAST(excluded.value AS INTEGER)", (str(sequence),))

    def _decode(self, body: str) -> UpdateRecord:
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise StoreError(f"state database {self.path}: unreadable record: {exc}") from exc
        return UpdateRecord.from_dict(data)

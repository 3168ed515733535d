"""Named, ordered, transactional migrations of the outbox file (STYLE rules 6 and 18).

Modelled on ``sqlite_utils.migrations.Migrations``: migrations are registered in order under a
unique name, and each one runs *together with its bookkeeping row in one transaction*, so a
kill or power cut leaves a migration either fully applied and recorded, or neither. Two
differences from sqlite-utils' class, both deliberate:

* no wall clock: the caller passes ``now`` (STYLE rule 13), recorded as ``applied_at``;
* the bookkeeping table is created inside the first migration's transaction (sqlite-utils
  creates the table and its unique index in two autocommitted statements, so a kill between
  them leaves the index missing for good).

Every table and key of ``<data_dir>/outbox.db``, with the schema version that introduced it
(the index STYLE rule 6 asks for; ``agent/config.py`` lists the file itself)::

    table / key                          since  what
    _migrations                          1      (migration_set, name, version, applied_at):
                                                one row per applied migration
    outbox_meta['schema_version']        1      highest migration version applied
    outbox_meta['compat_version']        1      oldest agent schema that may still write this
                                                file (see "Compatibility" below)
    outbox_meta['created_at']            1      the ``now`` of the open that created the file
    outbox_streams(stream, next_seq)     1      the per-stream sequence counter: the next seq
                                                to hand out. Only ever grows; never derived
                                                from the rows (which acks and eviction delete)
    outbox_records                       1      (id, stream, seq, priority, kind, at, body):
                                                the rows waiting for the server's ack.
                                                ``id`` is the global insertion order (oldest
                                                first, for eviction); UNIQUE(stream, seq)
    outbox_records_priority (index)      1      (priority, id): oldest "metrics" rows first
    outbox_evicted(priority, total)      1      rows evicted so far, cumulative, per priority
    PRAGMA user_version                  1      == outbox_meta['schema_version']

Compatibility (mender's "rollback to the previous agent must keep working"): a migration is
*additive* by default (new tables, new nullable columns, new indexes) and an older agent keeps
using a file a newer agent migrated, ignoring what it does not know. A migration that breaks
older writers must say so with ``breaks_older=True``; it raises ``compat_version`` to its own
version and older agents then refuse the file (:class:`IncompatibleSchema`) instead of
corrupting it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from sqlite_utils import Database

from agent.errors import StoreError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "IncompatibleSchema",
    "Migration",
    "Migrations",
]

MigrationFn = Callable[[Database], None]


class IncompatibleSchema(StoreError):
    """The file was migrated by a newer agent in a way this agent cannot safely write."""


@dataclass(frozen=True)
class Migration:
    """One named schema step.

    Attributes:
        name: unique within its set; the bookkeeping key, so never rename an applied one.
        version: schema version of the file once this migration is applied; strictly
            increasing along the set.
        fn: the DDL/DML, run inside the transaction (must not commit, VACUUM or change the
            journal mode).
        breaks_older: True when agents at an older schema must no longer write the file.
    """

    name: str
    version: int
    fn: MigrationFn
    breaks_older: bool = False


class Migrations:
    """An ordered set of named migrations, applied each in one transaction with its record."""

    table = "_migrations"

    def __init__(self, name: str) -> None:
        self.name = name
        self._migrations: list[Migration] = []

    def __iter__(self) -> Iterator[Migration]:
        return iter(self._migrations)

    def __repr__(self) -> str:
        return f"<Migrations {self.name!r}: {[m.name for m in self._migrations]}>"

    @property
    def version(self) -> int:
        """The schema version this code brings a file to (0 when the set is empty)."""
        return self._migrations[-1].version if self._migrations else 0

    def __call__(self, *, version: int, name: str | None = None,
                 breaks_older: bool = False) -> Callable[[MigrationFn], MigrationFn]:
        """Register the decorated function as the next migration.

        Raises:
            ValueError: the name is already registered or the version does not grow.
        """

        def register(fn: MigrationFn) -> MigrationFn:
            migration_name = name or fn.__name__
            if any(m.name == migration_name for m in self._migrations):
                raise ValueError(f"migration {migration_name!r} is already registered in "
                                 f"set {self.name!r}")
            if version <= self.version:
                raise ValueError(f"migration {migration_name!r}: expected a version above "
                                 f"{self.version}, got {version}")
            self._migrations.append(Migration(migration_name, version, fn, breaks_older))
            return fn

        return register

    def applied(self, db: Database) -> list[str]:
        """Names of the migrations of this set already applied to ``db``, in order (read-only).

        Raises:
            sqlite3.Error: the database cannot be read.
        """
        if not db[self.table].exists():
            return []
        rows = db.execute(f"SELECT name FROM {self.table} WHERE migration_set = ? "
                          "ORDER BY version, rowid", [self.name]).fetchall()
        return [r[0] for r in rows]

    def pending(self, db: Database) -> list[Migration]:
        """Migrations not applied yet, in order (read-only).

        Raises:
            sqlite3.Error: the database cannot be read.
        """
        done = set(self.applied(db))
        return [m for m in self._migrations if m.name not in done]

    def check_compatible(self, db: Database) -> None:
        """Refuse a file that a newer agent marked as unsafe for this code to write.

        Raises:
            IncompatibleSchema: the file's ``compat_version`` is above :attr:`version`.
            sqlite3.Error: the database cannot be read.
        """
        if not db["outbox_meta"].exists():
            return
        row = db.execute("SELECT value FROM outbox_meta WHERE key = 'compat_version'"
                         ).fetchone()
        if row is not None and int(row[0]) > self.version:
            file_version = db.execute("PRAGMA user_version").fetchone()[0]
            raise IncompatibleSchema(
                f"{self.name} schema {file_version} needs an agent at schema >= {row[0]}, "
                f"this agent is at schema {self.version}")

    def apply(self, db: Database,
              atomic: Callable[[], AbstractContextManager[object]], *, now: float) -> list[str]:
        """Apply every pending migration, each in one ``atomic()`` block with its record.

        Args:
            db: the database to migrate.
            atomic: the caller's transaction context manager (savepoints when nested).
            now: unix seconds, recorded as ``applied_at``.

        Returns:
            Names of the migrations applied by this call.

        Raises:
            IncompatibleSchema: see :meth:`check_compatible`.
            sqlite3.Error: a migration failed; it and its record were rolled back, the
                migrations before it stay applied.
        """
        self.check_compatible(db)
        done: list[str] = []
        for migration in self.pending(db):
            with atomic():
                db.execute(f"CREATE TABLE IF NOT EXISTS {self.table} ("
                           " migration_set TEXT NOT NULL, name TEXT NOT NULL,"
                           " version INTEGER NOT NULL, applied_at REAL NOT NULL,"
                           " PRIMARY KEY (migration_set, name))")
                migration.fn(db)
                db.execute(f"INSERT INTO {self.table} (migration_set, name, version, "
                           "applied_at) VALUES (?, ?, ?, ?)",
                           [self.name, migration.name, migration.version, float(now)])
                current = db.execute("PRAGMA user_version").fetchone()[0]
                version = max(int(current), migration.version)
                _set_meta(db, "schema_version", version)
                if migration.breaks_older:
                    _set_meta(db, "compat_version", migration.version)
                # PRAGMA takes no parameters; ``version`` is an int we computed
                db.execute(f"PRAGMA user_version = {int(version)}")
            done.append(migration.name)
        return done


def _set_meta(db: Database, key: str, value: object) -> None:
    db.execute("INSERT INTO outbox_meta (key, value) VALUES (?, ?) "
               "ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value])


# ---------------------------------------------------------------------------------------------
# the outbox's migrations, in order. Never edit an applied one: add the next.
# ---------------------------------------------------------------------------------------------
MIGRATIONS = Migrations("outbox")


@MIGRATIONS(version=1, name="0001_create_outbox")
def _create_outbox(db: Database) -> None:
    db.execute("CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value NOT NULL)")
    db.execute("INSERT INTO outbox_meta (key, value) VALUES ('compat_version', 1)")
    db.execute("CREATE TABLE outbox_streams ("
               " stream TEXT PRIMARY KEY,"
               " next_seq INTEGER NOT NULL CHECK (next_seq >= 1))")
    db.execute("CREATE TABLE outbox_records ("
               " id INTEGER PRIMARY KEY,"
               " stream TEXT NOT NULL,"
               " seq INTEGER NOT NULL CHECK (seq >= 1),"
               " priority TEXT NOT NULL,"
               " kind TEXT NOT NULL,"
               " at INTEGER NOT NULL,"
               " body TEXT NOT NULL,"
               " UNIQUE (stream, seq))")
    db.execute("CREATE INDEX outbox_records_priority ON outbox_records (priority, id)")
    db.execute("CREATE TABLE outbox_evicted ("
               " priority TEXT PRIMARY KEY, total INTEGER NOT NULL)")


SCHEMA_VERSION = MIGRATIONS.version

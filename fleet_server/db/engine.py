"""Engine factory, transactions and migrations. SQLite gets WAL, a busy timeout and foreign
keys; PostgreSQL needs nothing special. Migrations are named and ordered, each applied together
with its bookkeeping row in one transaction (sqlite-utils ``Migrations`` idea).

Two kinds of transaction, because SQLite has one writer at a time:

- :func:`atomic` for anything that may write: ``BEGIN IMMEDIATE`` takes the write lock up
  front, so two writers queue on the busy timeout instead of one failing when its read lock
  cannot be upgraded (``SQLITE_BUSY`` that no timeout cures);
- :func:`reading` for read-only work (token lookups, polling, listing what is pending): a plain
  deferred ``BEGIN``. Under WAL a reader sees the last committed snapshot and never waits for
  the writer, nor makes the writer wait, so hot read paths stay off the write lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.db import tables
from fleet_server.db.migrations import m0003_monitoring
from fleet_server.errors import StoreError

__all__ = ["MIGRATIONS", "atomic", "make_engine", "migrate", "reading"]

#: execution option that marks a connection's transactions read-only (see :func:`reading`)
_READ_ONLY = "edgefleet_read_only"


def make_engine(url: str) -> Engine:
    """An engine for ``url`` (``sqlite:///path`` or ``postgresql+psycopg://...``).

    Raises:
        StoreError: the URL is not usable.
    """
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
                # let SQLAlchemy's "begin" below issue BEGIN itself (pysqlite's own is DEFERRED)
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.close()

            @event.listens_for(engine, "begin")
            def _sqlite_begin(conn):  # type: ignore[no-untyped-def]
                # writers: IMMEDIATE takes the write lock up front (see the module docstring);
                # readers (`reading`): a deferred BEGIN, a WAL snapshot without the lock
                read_only = conn.get_execution_options().get(_READ_ONLY, False)
                conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")
        else:
            engine = create_engine(url, pool_pre_ping=True)
    except (SQLAlchemyError, ValueError, ImportError) as exc:
        raise StoreError(f"cannot use database {url!r}: {exc}") from exc
    return engine


def _v1_initial(conn: Connection) -> None:
    tables.METADATA.create_all(conn)


def _v2_rollouts(conn: Connection) -> None:
    """Rollouts: their own tables, and an index for the health gates' telemetry reads."""
    tables.METADATA_0002.create_all(conn)
    # plain DDL: an Index object on device_records would join METADATA, hence 0001_initial
    conn.execute(text("CREATE INDEX ix_device_records_health "
                      "ON device_records (device_id, kind, received_at)"))


#: (name, function) in order; never edit or reorder one that shipped, only append
MIGRATIONS: list[tuple[str, Callable[[Connection], None]]] = [
    ("0001_initial", _v1_initial),
    ("0002_rollouts", _v2_rollouts),
    (m0003_monitoring.NAME, m0003_monitoring.upgrade),
]


def migrate(engine: Engine, now: Callable[[], float] = time.time) -> list[str]:
    """Apply pending migrations; return the names applied.

    Raises:
        StoreError: the database failed.
    """
    applied: list[str] = []
    try:
        with engine.begin() as conn:
            tables.schema_migrations.create(conn, checkfirst=True)
        for name, fn in MIGRATIONS:
            with engine.begin() as conn:
                done = conn.execute(select(tables.schema_migrations.c.name).where(
                    tables.schema_migrations.c.name == name)).first()
                if done:
                    continue
                fn(conn)
                conn.execute(insert(tables.schema_migrations).values(
                    name=name, applied_at=int(now())))
                applied.append(name)
    except SQLAlchemyError as exc:
        raise StoreError(f"database migration failed: {exc}") from exc
    return applied


@contextmanager
def atomic(engine: Engine) -> Iterator[Connection]:
    """One transaction; database errors become :class:`StoreError`.

    Raises:
        StoreError: the database failed (the transaction was rolled back).
    """
    try:
        with engine.begin() as conn:
            yield conn
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {exc}") from exc


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction (a consistent snapshot); database errors become
    :class:`StoreError`. On SQLite it does not take the write lock (see the module docstring).

    Read-only is the caller's contract: a write inside it would have to take the lock late,
    and may fail with ``SQLITE_BUSY`` under contention. Use :func:`atomic` to write.

    Raises:
        StoreError: the database failed.
    """
    try:
        with engine.connect() as conn:
            conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn
    except SQLAlchemyError as exc:
        raise StoreError(f"database error: {exc}") from exc

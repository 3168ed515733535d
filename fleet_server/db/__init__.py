"""The server database: SQLAlchemy Core tables, one engine factory, named migrations.

SQLite (WAL) by default, PostgreSQL with the same code. See :mod:`fleet_server.db.tables` for
the index of every table and the version it was introduced in.
"""

from fleet_server.db.engine import atomic, make_engine, migrate
from fleet_server.db.tables import METADATA

__all__ = ["METADATA", "atomic", "make_engine", "migrate"]

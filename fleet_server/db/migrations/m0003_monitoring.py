"""``0003_monitoring``: alert rules, alerts and their webhook deliveries.

Creates the tables of :data:`fleet_server.db.tables.METADATA_0003` (``alert_rules``,
``alerts``, ``alert_webhooks``, ``webhook_attempts``) with their indexes, on SQLite and
PostgreSQL alike. Nothing else changes: the monitoring views are computed on read from
``device_records``, so ingest writes no more than before.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection

from fleet_server.db import tables

__all__ = ["NAME", "upgrade"]

NAME: Final = "0003_monitoring"


def upgrade(conn: Connection) -> None:
    """Create the monitoring tables (inside the migration's transaction)."""
    tables.METADATA_0003.create_all(conn)

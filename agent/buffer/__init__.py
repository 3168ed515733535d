"""The on-device outbox: telemetry and drift rows in SQLite until the fleet server acks them.

See :mod:`agent.buffer.store` for what survives a kill or a power cut, the eviction order and
the ``floor``/``from_seq`` fields every batch carries; :mod:`agent.buffer.migrations` indexes
every table of the file.
"""

from agent.buffer.migrations import SCHEMA_VERSION, IncompatibleSchema
from agent.buffer.store import (
    CORRUPT_RESET_KIND,
    EVENT_STREAM,
    EVICTED_KIND,
    MAX_RECORD_BYTES,
    OUTBOX_FILENAME,
    PRIORITIES,
    CorruptReset,
    Outbox,
    OutboxStats,
    StreamStats,
)

__all__ = [
    "CORRUPT_RESET_KIND",
    "EVENT_STREAM",
    "EVICTED_KIND",
    "MAX_RECORD_BYTES",
    "OUTBOX_FILENAME",
    "PRIORITIES",
    "SCHEMA_VERSION",
    "CorruptReset",
    "IncompatibleSchema",
    "Outbox",
    "OutboxStats",
    "StreamStats",
]

"""Reading what devices sent back, for the monitoring views and the alert evaluation (adapter).

Views are computed on read from ``device_records`` (no rollup tables, so ingest writes what it
always wrote). :func:`load_samples` selects one time range of ``metrics.requests`` and
``drift.summary`` records through the index the rollout gates use (``ix_device_records_health``
on ``device_id, kind, received_at``: the query names every device, chunked, so the index's
leading column is always bound), and narrows a model's records in SQL on the canonical body
text (``"model":"NAME"``), which :mod:`fleet_server.ingest` writes with sorted keys. The rows
are fetched in one short read-only transaction (on SQLite a WAL snapshot that never takes the
write lock, so a large query never holds up ingest) and parsed after it ends
(:func:`fleet_server.rollout.health.parse_record`): a body that is not JSON or is malformed is
skipped and logged, never trusted to raise.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Engine, select

from fleet_server.db import tables
from fleet_server.db.engine import reading
from fleet_server.rollout.health import (
    DRIFT_KIND,
    METRICS_KIND,
    DriftPoint,
    MetricsPoint,
    parse_record,
)

__all__ = ["KINDS", "Sample", "device_rows", "load_samples"]

log = logging.getLogger(__name__)

#: the record kinds monitoring reads
KINDS: Final = (METRICS_KIND, DRIFT_KIND)
#: devices per ``IN (...)`` query
_CHUNK: Final = 500


@dataclass(frozen=True)
class Sample:
    """One parsed record: which device sent it, when the server received it, what it says."""

    device_id: str
    at: int
    point: MetricsPoint | DriftPoint


def device_rows(engine: Engine) -> list[Any]:
    """Every device row (``id, profile, online, revoked_at, last_seen_at, reported``), by id.

    Raises:
        StoreError: the database failed.
    """
    d = tables.devices.c
    with reading(engine) as conn:
        return list(conn.execute(select(d.id, d.profile, d.online, d.revoked_at,
                                        d.last_seen_at, d.reported).order_by(d.id)).all())


def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield list(ids[i:i + _CHUNK])


def load_samples(engine: Engine, *, since: int, until: int, device_ids: Sequence[str],
                 model: str | None = None, version: str | None = None,
                 kinds: Sequence[str] = KINDS, features: bool = False) -> list[Sample]:
    """The records ``device_ids`` sent that the server received in ``(since, until]``, parsed,
    oldest first.

    Args:
        model: only this model's records.
        version: only this model version's records.
        kinds: record kinds to read (of :data:`KINDS`).
        features: parse drift summaries' per-feature statistics too.

    Raises:
        StoreError: the database failed.
    """
    c = tables.device_records.c
    conditions = [c.kind.in_(list(kinds)), c.received_at > since, c.received_at <= until]
    # a prefilter on the canonical text; the parsed body decides (a nested "model" key that
    # happens to match is dropped below)
    if model is not None:
        conditions.append(c.body.contains(f'"model":{json.dumps(model)}', autoescape=True))
    if version is not None:
        conditions.append(c.body.contains(f'"model_version":{json.dumps(version)}',
                                          autoescape=True))
    rows: list[Any] = []
    with reading(engine) as conn:
        for chunk in _chunks(sorted(set(device_ids))):
            rows.extend(conn.execute(select(c.device_id, c.seq, c.kind, c.received_at, c.body)
                                     .where(c.device_id.in_(chunk), *conditions)).all())
    rows.sort(key=lambda r: (r.received_at, r.device_id, r.seq))
    out = []
    for row in rows:
        try:
            body = json.loads(row.body)
        except ValueError:  # ingest stores JSON; a hand-edited row is skipped
            log.warning("device record %s/%s of %s is not JSON; skipped", row.kind, row.seq,
                        row.device_id)
            continue
        point = parse_record(row.kind, body, features=features)
        if point is None or (model is not None and point.model != model) or (
                version is not None and point.version != version):
            continue
        out.append(Sample(row.device_id, int(row.received_at), point))
    return out

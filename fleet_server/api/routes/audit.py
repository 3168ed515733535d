"""``GET /v1/audit`` (admin): the hash-chained audit log, and whether the chain is intact."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query

from fleet_server import audit
from fleet_server.api.deps import MAX_INT64, AdminDep, FleetDep, LimitDep
from fleet_server.api.schemas import AuditPage, error_responses
from fleet_server.db import atomic

router = APIRouter(prefix="/v1/audit", tags=["audit"])


@router.get("", response_model=AuditPage, responses=error_responses(403),
            summary="Audit entries after an id, oldest first, with a chain check")
def list_audit(caller: AdminDep, fleet: FleetDep, limit: LimitDep,
               after_id: Annotated[int, Query(ge=0, le=MAX_INT64,
                                              description="return entries with id > after_id")]
               = 0) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        items = audit.entries(conn, after_id=after_id, limit=limit)
        broken = audit.verify_chain(conn)
    return {"items": [asdict(e) for e in items], "chain_intact": broken is None,
            "first_broken_id": broken}

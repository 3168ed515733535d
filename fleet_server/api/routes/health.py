"""``GET /healthz``: liveness, the only route without a token."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api.schemas import HealthOut

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthOut, summary="Liveness (no token needed)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}

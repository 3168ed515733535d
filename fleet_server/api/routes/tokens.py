"""``POST /v1/tokens``: create an API token (admin)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from fleet_server import auth
from fleet_server.api.deps import AdminDep, FleetDep
from fleet_server.api.schemas import TokenCreate, TokenOut, error_responses
from fleet_server.db import atomic

router = APIRouter(prefix="/v1/tokens", tags=["tokens"])


@router.post("", status_code=201, response_model=TokenOut, responses=error_responses(403),
             summary="Create an API token (the secret is shown once)")
def create_token(body: TokenCreate, caller: AdminDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        principal, secret = auth.issue_token(conn, name=body.name, scope=body.scope,
                                             now=fleet.now(), actor=caller)
    return {"id": principal.token_id, "name": principal.name, "scope": principal.scope,
            "token": secret}

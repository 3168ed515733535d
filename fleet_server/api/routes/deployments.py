"""Deployments: list (reader), create and cancel (publisher).

Creating or cancelling re-signs the desired state of every device it changes (inside the
transaction) and publishes the new states once the transaction has committed. A deployment
with a ``rollout`` object moves its devices in waves (see ``/v1/rollouts``).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from fastapi import Path as PathParam

from fleet_server.api.deps import MAX_INT64, FleetDep, PageDep, PublisherDep, ReaderDep
from fleet_server.api.schemas import (
    DeploymentCreate,
    DeploymentCreated,
    DeploymentOut,
    Page,
    SelectorIn,
    error_responses,
)
from fleet_server.db import atomic
from fleet_server.deploy import rollouts, service
from fleet_server.deploy.plan import Selector
from fleet_server.errors import InvalidInput

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])


def _selector(body: SelectorIn) -> Selector:
    try:
        return Selector(devices=tuple(body.devices), tags=tuple(body.tags),
                        profiles=tuple(body.profiles), all=body.all)
    except ValueError as exc:
        raise InvalidInput(f"selector: {exc}") from exc


@router.get("", response_model=Page[DeploymentOut], responses=error_responses(403),
            summary="List deployments, newest first")
def list_deployments(caller: ReaderDep, fleet: FleetDep, page: PageDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        items, total = service.list_deployments(conn, limit=page.limit, offset=page.offset)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.post("", status_code=201, response_model=DeploymentCreated,
             responses=error_responses(403, 404, 409),
             summary="Deploy a model version to the devices a selector matches, at once or "
                     "in waves; supersedes the model's running rollouts")
def create_deployment(body: DeploymentCreate, caller: PublisherDep,
                      fleet: FleetDep) -> dict[str, Any]:
    selector = _selector(body.selector)
    spec = (rollouts.parse_spec(body.rollout.model_dump(exclude_unset=True))
            if body.rollout is not None else None)
    with atomic(fleet.engine) as conn:
        out = service.deploy(fleet, conn, model=body.model, version=body.version,
                             selector=selector, actor=caller, rollout=spec)
    service.publish_pending(fleet)
    return out


@router.post("/{deployment_id}/cancel", response_model=DeploymentOut,
             responses=error_responses(403, 404, 409),
             summary="Cancel a deployment; its devices fall back to older deployments")
def cancel_deployment(deployment_id: Annotated[int, PathParam(ge=1, le=MAX_INT64)],
                      caller: PublisherDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        out = service.cancel(fleet, conn, deployment_id, actor=caller)
    service.publish_pending(fleet)
    return out

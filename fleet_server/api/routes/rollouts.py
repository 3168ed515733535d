"""Rollouts: list and read (reader), pause, resume and cancel (publisher).

A rollout has the id of the deployment that started it (``POST /v1/deployments`` with a
``rollout`` object). A command re-plans at once: every change to desired states is signed in
the same transaction and published after it. A command the rollout's status does not allow
(e.g. resuming a completed or cancelled rollout) is a 409.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from fleet_server.api.deps import MAX_INT64, FleetDep, PageDep, PublisherDep, ReaderDep
from fleet_server.api.schemas import (
    Page,
    RolloutCommandIn,
    RolloutOut,
    RolloutSummaryOut,
    error_responses,
)
from fleet_server.db import atomic
from fleet_server.deploy import rollouts, service

router = APIRouter(prefix="/v1/rollouts", tags=["rollouts"])

RolloutId = Annotated[int, PathParam(ge=1, le=MAX_INT64, description="the rollout's id (that "
                                                                      "of its deployment)")]
#: fleet_server.rollout.state.STATUSES (a test checks they agree)
StatusQuery = Literal["running", "paused", "completed", "rolled_back", "cancelled",
                      "superseded"]


@router.get("", response_model=Page[RolloutSummaryOut], responses=error_responses(403),
            summary="List rollouts, newest first, with per-wave counts")
def list_rollouts(caller: ReaderDep, fleet: FleetDep, page: PageDep,
                  status: Annotated[StatusQuery | None, Query()] = None) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        items, total = rollouts.list_rollouts(conn, limit=page.limit, offset=page.offset,
                                              status=status)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.get("/{rollout_id}", response_model=RolloutOut, responses=error_responses(403, 404),
            summary="One rollout: waves, gates, and every moved device's desired and running "
                    "version")
def get_rollout(rollout_id: RolloutId, caller: ReaderDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        return rollouts.get_rollout(conn, rollout_id)


def _command(fleet: FleetDep, caller: PublisherDep, rollout_id: int, command: str,
             body: RolloutCommandIn | None) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        out = service.command_rollout(fleet, conn, rollout_id, command, actor=caller,
                                      reason=body.reason if body else None)
    service.publish_pending(fleet)
    return out


@router.post("/{rollout_id}/pause", response_model=RolloutOut,
             responses=error_responses(403, 404, 409),
             summary="Pause a running rollout: no more devices are moved until it resumes")
def pause_rollout(rollout_id: RolloutId, caller: PublisherDep, fleet: FleetDep,
                  body: RolloutCommandIn | None = None) -> dict[str, Any]:
    return _command(fleet, caller, rollout_id, "pause", body)


@router.post("/{rollout_id}/resume", response_model=RolloutOut,
             responses=error_responses(403, 404, 409),
             summary="Resume a paused rollout (its gates are judged again at once)")
def resume_rollout(rollout_id: RolloutId, caller: PublisherDep, fleet: FleetDep,
                   body: RolloutCommandIn | None = None) -> dict[str, Any]:
    return _command(fleet, caller, rollout_id, "resume", body)


@router.post("/{rollout_id}/cancel", response_model=RolloutOut,
             responses=error_responses(403, 404, 409),
             summary="Cancel a rollout: every device it moved goes back to its previous "
                     "version")
def cancel_rollout(rollout_id: RolloutId, caller: PublisherDep, fleet: FleetDep,
                   body: RolloutCommandIn | None = None) -> dict[str, Any]:
    return _command(fleet, caller, rollout_id, "cancel", body)

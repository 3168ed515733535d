"""Alert rules: list (reader), create and delete (publisher); alerts: list (reader).

A rule names a model that has at least one pushed artifact (and a version that does, when it
names one): a typo is a 404, never a rule that can never hold. A ``webhook_url`` outside the
server's ``webhook_allow`` list (:mod:`fleet_server.monitoring.allowlist`) is a 422 naming
the list. What a rule means and how its alerts move between ``pending``, ``firing`` and
``resolved`` is in :mod:`fleet_server.monitoring.rules`; the maintenance pass evaluates the
rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from fastapi import Path as PathParam
from sqlalchemy import Connection, select

from fleet_server.api.deps import MAX_INT64, FleetDep, PageDep, PublisherDep, ReaderDep
from fleet_server.api.schemas import (
    AlertOut,
    AlertRuleCreate,
    AlertRuleOut,
    Page,
    error_responses,
)
from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading
from fleet_server.errors import NotFound
from fleet_server.monitoring import AlertRule, create_rule, delete_rule, list_alerts, list_rules

__all__ = ["router"]

router = APIRouter(tags=["alerts"])

RuleId = Annotated[int, PathParam(ge=1, le=MAX_INT64, description="the rule's id")]


def _check_model(conn: Connection, model: str, version: str | None) -> None:
    """Raises: NotFound: no artifact of the model (or of that version) was pushed."""
    a = tables.artifacts.c
    where = [a.name == model] + ([a.version == version] if version is not None else [])
    if conn.execute(select(a.id).where(*where).limit(1)).first() is None:
        what = f"model {model!r}" + (f" version {version!r}" if version is not None else "")
        raise NotFound(f"{what} not found: push it before adding rules about it")


@router.get("/v1/alert-rules", response_model=Page[AlertRuleOut],
            responses=error_responses(403), summary="List alert rules")
def get_rules(caller: ReaderDep, fleet: FleetDep, page: PageDep) -> dict[str, Any]:
    with reading(fleet.engine) as conn:
        items, total = list_rules(conn, limit=page.limit, offset=page.offset)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}


@router.post("/v1/alert-rules", status_code=201, response_model=AlertRuleOut,
             responses=error_responses(403, 404),
             summary="Add an alert rule on a model's devices (drift, error rate, p95)")
def add_rule(body: AlertRuleCreate, caller: PublisherDep, fleet: FleetDep) -> dict[str, Any]:
    rule = AlertRule(id=0, model=body.model, kind=body.kind, threshold=body.threshold,
                     version=body.version, min_devices=body.min_devices, for_s=body.for_s,
                     window_s=body.window_s, min_samples=body.min_samples,
                     webhook_url=body.webhook_url).check()
    with atomic(fleet.engine) as conn:
        _check_model(conn, rule.model, rule.version)
        return create_rule(conn, rule, actor=caller, now=fleet.now(),
                           allow=fleet.settings.webhook_allow_list)


@router.delete("/v1/alert-rules/{rule_id}", response_model=AlertRuleOut,
               responses=error_responses(403, 404),
               summary="Delete an alert rule (its open alert resolves)")
def remove_rule(rule_id: RuleId, caller: PublisherDep, fleet: FleetDep) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        out = delete_rule(conn, rule_id, actor=caller, now=fleet.now(),
                          allow=fleet.settings.webhook_allow_list)
    webhooks = fleet.extra.get("webhooks")  # the running server's WebhookSender
    if webhooks is not None:  # a resolve of a fired alert may be queued
        webhooks.notify()
    return out


@router.get("/v1/alerts", response_model=Page[AlertOut], responses=error_responses(403),
            summary="List alerts, newest first")
def get_alerts(caller: ReaderDep, fleet: FleetDep, page: PageDep,
               state: Annotated[Literal["pending", "firing", "resolved"] | None,
                                Query()] = None,
               model: Annotated[str | None, Query(max_length=200)] = None) -> dict[str, Any]:
    with reading(fleet.engine) as conn:
        items, total = list_alerts(conn, state=state, model=model, limit=page.limit,
                                   offset=page.offset)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset}

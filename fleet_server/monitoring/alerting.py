"""Alert rules and alerts in the database: create, list, delete, and one evaluation pass.

:func:`evaluate_alerts` runs in the server's maintenance pass on the injected clock. It reads
each model's records once (the longest window of its rules), judges every rule
(:func:`fleet_server.monitoring.rules.judge`), and then, in ONE transaction, steps each rule's
open alert through :data:`~fleet_server.monitoring.rules.TRANSITIONS`: every transition is
audited (``alert.pending``, ``alert.firing``, ``alert.resolved``) and, for a rule with a
webhook, an alert that starts firing or resolves after firing queues a delivery in
``alert_webhooks`` in that same transaction (so none is lost in a crash). The deliveries go
out from their own thread (:mod:`fleet_server.monitoring.webhooks`): neither ingest nor the
maintenance pass ever waits for a webhook.

Deleting a rule resolves its open alert the same way (audited, webhook if it had fired).

Webhook URLs are checked against the server's ``webhook_allow`` list
(:mod:`fleet_server.monitoring.allowlist`) when a rule is created (refused) and when a
delivery is queued: a URL the list no longer allows (it was narrowed after the rule was made)
queues the delivery as ``failed`` with the reason, and logs it, so the refusal shows in the
delivery log instead of a request going out.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import Connection, delete, func, insert, select, update

from fleet_server import audit
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading
from fleet_server.errors import NotFound, StoreError
from fleet_server.fleet import Fleet
from fleet_server.monitoring.allowlist import WebhookAllowList, check_webhook_url
from fleet_server.monitoring.records import device_rows, load_samples
from fleet_server.monitoring.rules import (
    OPEN,
    AlertRule,
    Breach,
    event_for,
    judge,
    next_state,
    summary,
)
from fleet_server.rollout.health import Accumulator

__all__ = [
    "EVALUATOR",
    "PAYLOAD_VERSION",
    "Transition",
    "alert_dict",
    "create_rule",
    "delete_rule",
    "evaluate_alerts",
    "list_alerts",
    "list_rules",
    "rule_dict",
]

log = logging.getLogger(__name__)

#: the audit actor of transitions nobody commanded
EVALUATOR: Final = "fleet_server alert evaluator"
#: version of the webhook payload
PAYLOAD_VERSION: Final = 1
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Transition:
    """One alert changed state (``before`` None: it was created)."""

    alert_id: int
    rule_id: int
    before: str | None
    after: str
    webhook: bool  # a delivery was queued


def _new_id(pk: Any) -> int:
    if not pk or pk[0] is None:
        raise StoreError("the database returned no id for a new row")
    return int(pk[0])


# ------------------------------------------------------------------------------- rules
def _rule(row: Any) -> AlertRule:
    return AlertRule(id=int(row.id), model=row.model, kind=row.kind, threshold=row.threshold,
                     version=row.version, min_devices=int(row.min_devices),
                     for_s=int(row.for_s), window_s=int(row.window_s),
                     min_samples=int(row.min_samples), webhook_url=row.webhook_url)


def rule_dict(row: Any) -> dict[str, Any]:
    """A rule row as the API shows it."""
    return {**_rule(row).to_dict(), "created_at": row.created_at,
            "created_by": row.created_by}


def create_rule(conn: Connection, rule: AlertRule, *, actor: Principal, now: int,
                allow: WebhookAllowList | None = None) -> dict[str, Any]:
    """Store ``rule`` (its ``id`` is ignored) and audit it; return it with its new id.

    Args:
        allow: the server's ``webhook_allow`` list (None: any webhook URL).

    Raises:
        InvalidInput: a field is out of range, or the webhook URL is outside ``allow``.
    """
    rule.check()
    check_webhook_url(allow, rule.webhook_url)
    values = {k: v for k, v in rule.to_dict().items() if k != "id"}
    rule_id = _new_id(conn.execute(insert(tables.alert_rules).values(
        **values, created_at=now, created_by=actor.actor)).inserted_primary_key)
    audit.record(conn, at=now, actor=actor.actor, action="alert_rule.create",
                 target=f"alert_rule:{rule_id}", after=values)
    row = conn.execute(select(tables.alert_rules).where(
        tables.alert_rules.c.id == rule_id)).one()
    return rule_dict(row)


def list_rules(conn: Connection, *, limit: int, offset: int = 0
               ) -> tuple[list[dict[str, Any]], int]:
    """Rules by id, one page, and how many there are."""
    t = tables.alert_rules
    total = int(conn.execute(select(func.count()).select_from(t)).scalar_one())
    rows = conn.execute(select(t).order_by(t.c.id).limit(limit).offset(offset)).all()
    return [rule_dict(r) for r in rows], total


def delete_rule(conn: Connection, rule_id: int, *, actor: Principal, now: int,
                allow: WebhookAllowList | None = None) -> dict[str, Any]:
    """Delete a rule; its open alert resolves (audited; a webhook if it had fired and
    ``allow``, the server's ``webhook_allow`` list, allows its URL).

    Returns:
        The deleted rule.

    Raises:
        NotFound: no such rule.
    """
    t = tables.alert_rules
    row = conn.execute(select(t).where(t.c.id == rule_id)).first()
    if row is None:
        raise NotFound(f"alert rule {rule_id} not found")
    rule = _rule(row)
    opened = _open_alert(conn, rule_id)
    if opened is not None:
        _resolve(conn, rule, opened, now=now, actor=actor.actor,
                 why=f"rule {rule_id} deleted", allow=allow)
    conn.execute(delete(t).where(t.c.id == rule_id))
    audit.record(conn, at=now, actor=actor.actor, action="alert_rule.delete",
                 target=f"alert_rule:{rule_id}", before=rule.to_dict())
    return rule_dict(row)


# ------------------------------------------------------------------------------- alerts
def alert_dict(row: Any) -> dict[str, Any]:
    """An alert row as the API (and a webhook payload) shows it."""
    return {"id": int(row.id), "rule_id": int(row.rule_id), "rule": json.loads(row.rule),
            "model": row.model, "kind": row.kind, "state": row.state,
            "started_at": row.started_at, "fired_at": row.fired_at,
            "resolved_at": row.resolved_at, "updated_at": row.updated_at,
            "devices": json.loads(row.devices), "value": row.value, "summary": row.summary}


def list_alerts(conn: Connection, *, state: str | None = None, model: str | None = None,
                limit: int, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Alerts, newest first, optionally in one state or of one model; and how many match."""
    a = tables.alerts
    where = [c for c in (a.c.state == state if state else None,
                         a.c.model == model if model else None) if c is not None]
    total = int(conn.execute(select(func.count()).select_from(a).where(*where)).scalar_one())
    rows = conn.execute(select(a).where(*where).order_by(a.c.id.desc()).limit(limit)
                        .offset(offset)).all()
    return [alert_dict(r) for r in rows], total


def _open_alert(conn: Connection, rule_id: int) -> Any:
    a = tables.alerts.c
    return conn.execute(select(tables.alerts).where(
        a.rule_id == rule_id, a.state.in_(OPEN)).order_by(a.id.desc()).limit(1)).first()


def _queue_webhook(conn: Connection, rule: AlertRule, alert: Mapping[str, Any], event: str,
                   now: int, allow: WebhookAllowList | None) -> bool:
    """Queue a delivery; return whether one is pending (a URL outside ``allow`` is stored
    as ``failed`` at once, with the reason)."""
    if rule.webhook_url is None:
        return False
    payload = _ENCODER.encode({"version": PAYLOAD_VERSION, "event": event,
                               "alert": dict(alert), "rule": rule.to_dict()})
    refused: str | None = None
    if allow is not None and not allow.allows(rule.webhook_url):
        refused = (f"not sent: the URL is outside the server's webhook_allow list "
                   f"[{', '.join(allow.entries)}]")
        log.warning("alert %s webhook of rule %d to %s %s", alert["id"], rule.id,
                    rule.webhook_url, refused)
    conn.execute(insert(tables.alert_webhooks).values(
        alert_id=alert["id"], event=event, url=rule.webhook_url, payload=payload,
        status="pending" if refused is None else "failed", attempts=0, next_at=now,
        last_error=refused, created_at=now, done_at=None if refused is None else now))
    return refused is None


def _reread(conn: Connection, alert_id: int) -> dict[str, Any]:
    return alert_dict(conn.execute(select(tables.alerts).where(
        tables.alerts.c.id == alert_id)).one())


def _resolve(conn: Connection, rule: AlertRule, opened: Any, *, now: int, actor: str,
             why: str, allow: WebhookAllowList | None) -> Transition:
    conn.execute(update(tables.alerts).where(tables.alerts.c.id == opened.id).values(
        state="resolved", resolved_at=now, updated_at=now))
    alert = _reread(conn, opened.id)
    audit.record(conn, at=now, actor=actor, action="alert.resolved",
                 target=f"alert:{opened.id}", before={"state": opened.state},
                 after={"state": "resolved", "rule_id": rule.id, "why": why,
                        "fired": opened.state == "firing"})
    hooked = opened.state == "firing" and _queue_webhook(conn, rule, alert, "resolved", now,
                                                         allow)
    return Transition(int(opened.id), rule.id, opened.state, "resolved", hooked)


def _step(conn: Connection, rule: AlertRule, breaches: list[Breach], now: int,
          allow: WebhookAllowList | None) -> Transition | None:
    """Step the rule's open alert (if any) for one evaluation; store and audit."""
    opened = _open_alert(conn, rule.id)
    holds = len(breaches) >= rule.min_devices
    before = opened.state if opened is not None else None
    after = next_state(before, event_for(holds, opened.started_at if opened is not None
                                         else None, now, rule.for_s))
    if after is None:
        return None
    if after == "resolved":
        return _resolve(conn, rule, opened, now=now, actor=EVALUATOR,
                        why="the condition no longer holds", allow=allow)
    values = {"devices": _ENCODER.encode([b.to_dict() for b in breaches]),
              "value": breaches[0].value if breaches else None,
              "summary": summary(rule, breaches), "updated_at": now}
    if opened is None:
        alert_id = _new_id(conn.execute(insert(tables.alerts).values(
            rule_id=rule.id, rule=_ENCODER.encode(rule.to_dict()), model=rule.model,
            kind=rule.kind, state=after, started_at=now,
            fired_at=now if after == "firing" else None, **values)).inserted_primary_key)
    else:
        alert_id = int(opened.id)
        fired = {"fired_at": now} if after == "firing" and before != "firing" else {}
        conn.execute(update(tables.alerts).where(tables.alerts.c.id == alert_id).values(
            state=after, **fired, **values))
    if before == after:
        return None
    alert = _reread(conn, alert_id)
    audit.record(conn, at=now, actor=EVALUATOR, action=f"alert.{after}",
                 target=f"alert:{alert_id}", before={"state": before} if before else None,
                 after={"state": after, "rule_id": rule.id, "summary": alert["summary"],
                        "devices": alert["devices"]})
    hooked = after == "firing" and _queue_webhook(conn, rule, alert, "firing", now, allow)
    return Transition(alert_id, rule.id, before, after, hooked)


def _judge_all(fleet: Fleet, rules: Sequence[AlertRule], now: int) -> dict[int, list[Breach]]:
    """Every rule's breaches at ``now`` (reads each model's records once)."""
    rows = device_rows(fleet.engine)
    budgets: dict[str, float | None] = {}
    for r in rows:
        profile = fleet.profiles.get(r.profile)
        budgets[r.id] = profile.latency_budget_ms if profile else None
    out: dict[int, list[Breach]] = {}
    for model in sorted({r.model for r in rules}):
        mine = [r for r in rules if r.model == model]
        samples = load_samples(fleet.engine, since=now - max(r.window_s for r in mine),
                               until=now, device_ids=[r.id for r in rows], model=model)
        for rule in mine:
            devices: dict[str, Accumulator] = {}
            for s in samples:
                if s.at > now - rule.window_s and rule.version in (None, s.point.version):
                    devices.setdefault(s.device_id, Accumulator()).add(s.point)
            out[rule.id] = judge(rule, devices, budgets)
    return out


def evaluate_alerts(fleet: Fleet, *, now: int) -> list[Transition]:
    """One evaluation pass of every rule at ``now`` (module docstring).

    Returns:
        The transitions, in rule order.

    Raises:
        StoreError: the database failed (nothing of the pass was stored).
    """
    with reading(fleet.engine) as conn:
        rules = [_rule(r) for r in conn.execute(select(tables.alert_rules).order_by(
            tables.alert_rules.c.id))]
    if not rules:
        return []
    breaches = _judge_all(fleet, rules, now)
    allow = fleet.settings.webhook_allow_list
    out = []
    with atomic(fleet.engine) as conn:
        alive = set(conn.execute(select(tables.alert_rules.c.id)).scalars())
        for rule in rules:
            if rule.id in alive:  # a rule deleted since it was read resolved its alert then
                step = _step(conn, rule, breaches[rule.id], now, allow)
                if step is not None:
                    out.append(step)
    return out

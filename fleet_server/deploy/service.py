"""Deployments and desired states: the I/O shell around :mod:`fleet_server.deploy.plan`.

Level-triggered like a device twin: the database holds each device's last signed desired state
with ``published`` false until the broker acknowledged it. :func:`refresh_desired` recomputes
every device's state from all active deployments and signs what changed (or is near expiry);
:func:`publish_pending` sends every unpublished state, retained, and marks it published. A
crash between the two only delays publication: the next pass sends it again, and a device
refuses nothing it already applied because the sequence is the same.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import Connection, insert, select, update

from agent.protocol.messages import DesiredModel, DesiredState
from agent.protocol.signed import sign_desired
from fleet_server import audit
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.deploy.plan import (
    ArtifactView,
    DeploymentView,
    DeviceView,
    Selector,
    StoredDesired,
    compute_desired,
    missing_artifacts,
    needs_new_state,
    targeted,
)
from fleet_server.errors import BrokerError, Conflict, InvalidInput, NotFound
from fleet_server.fleet import Fleet

__all__ = [
    "cancel",
    "deploy",
    "list_deployments",
    "load_artifacts",
    "load_devices",
    "publish_pending",
    "refresh_desired",
]

log = logging.getLogger(__name__)


def load_devices(conn: Connection, *, include_revoked: bool = False) -> list[DeviceView]:
    q = select(tables.devices.c.id, tables.devices.c.profile, tables.devices.c.tags,
               tables.devices.c.revoked_at).order_by(tables.devices.c.id)
    return [DeviceView(r.id, r.profile, frozenset(json.loads(r.tags)))
            for r in conn.execute(q) if include_revoked or r.revoked_at is None]


def load_artifacts(conn: Connection) -> dict[tuple[str, str, str], ArtifactView]:
    return {(r.name, r.version, r.profile): ArtifactView(
        r.name, r.version, r.profile, r.sha256, r.length, r.target_path, r.manifest_target)
        for r in conn.execute(select(tables.artifacts))}


def _active(conn: Connection) -> list[DeploymentView]:
    rows = conn.execute(select(tables.deployments).where(
        tables.deployments.c.status == "active")).all()
    return [DeploymentView(r.id, r.model, r.version, Selector.from_dict(json.loads(r.selector)))
            for r in rows]


def _deployment_dict(row: Any) -> dict[str, Any]:
    return {"id": row.id, "model": row.model, "version": row.version,
            "selector": json.loads(row.selector), "status": row.status,
            "created_at": row.created_at}


def deploy(fleet: Fleet, conn: Connection, *, model: str, version: str, selector: Selector,
           actor: Principal) -> dict[str, Any]:
    """Store a deployment and re-sign the desired state of every device it changes.

    Raises:
        NotFound: no such model version.
        InvalidInput: the selector matches no (live) device.
        Conflict: some targeted devices have no artifact for their profile (lists them).
    """
    artifacts = load_artifacts(conn)
    if not any(k[0] == model and k[1] == version for k in artifacts):
        raise NotFound(f"model {model!r} version {version!r} not found (push it first)")
    devices = targeted(selector, load_devices(conn))
    if not devices:
        raise InvalidInput(f"selector {selector.to_dict()} matches no live device")
    missing = missing_artifacts(model, version, devices, artifacts)
    if missing:
        detail = "; ".join(f"profile {p}: {', '.join(sorted(ids))}"
                           for p, ids in sorted(missing.items()))
        raise Conflict(f"model {model} {version} has no artifact for the profile of "
                       f"{sum(len(v) for v in missing.values())} targeted device(s): {detail}. "
                       "Convert and push it for those profiles first")
    now = fleet.now()
    result = conn.execute(insert(tables.deployments).values(
        model=model, version=version, selector=json.dumps(selector.to_dict(), sort_keys=True),
        status="active", created_at=now, created_by=actor.token_id))
    pk = result.inserted_primary_key
    if pk is None:  # only for executemany(), which a single-row insert is not
        raise RuntimeError("insert into deployments returned no primary key")
    dep_id = int(pk[0])
    audit.record(conn, at=now, actor=actor.actor, action="deployment.create",
                 target=f"deployment:{dep_id}",
                 after={"model": model, "version": version, "selector": selector.to_dict(),
                        "devices": [d.id for d in devices]})
    changed = refresh_desired(fleet, conn)
    row = conn.execute(select(tables.deployments).where(tables.deployments.c.id == dep_id)).one()
    out = _deployment_dict(row)
    out["devices"] = sorted(d.id for d in devices)
    out["desired_changed"] = changed
    return out


def cancel(fleet: Fleet, conn: Connection, deployment_id: int, *,
           actor: Principal) -> dict[str, Any]:
    """Cancel a deployment; devices fall back to what older active deployments say.

    Raises:
        NotFound: no such deployment.
        Conflict: it is not active.
    """
    row = conn.execute(select(tables.deployments).where(
        tables.deployments.c.id == deployment_id)).first()
    if row is None:
        raise NotFound(f"deployment {deployment_id} not found")
    if row.status != "active":
        raise Conflict(f"deployment {deployment_id} is {row.status}, not active")
    now = fleet.now()
    conn.execute(update(tables.deployments).where(tables.deployments.c.id == deployment_id)
                 .values(status="cancelled"))
    audit.record(conn, at=now, actor=actor.actor, action="deployment.cancel",
                 target=f"deployment:{deployment_id}", before={"status": "active"},
                 after={"status": "cancelled"})
    refresh_desired(fleet, conn)
    return _deployment_dict(conn.execute(select(tables.deployments).where(
        tables.deployments.c.id == deployment_id)).one())


def list_deployments(conn: Connection, *, limit: int, offset: int = 0
                     ) -> tuple[list[dict[str, Any]], int]:
    rows = conn.execute(select(tables.deployments).order_by(tables.deployments.c.id.desc())).all()
    return [_deployment_dict(r) for r in rows[offset:offset + limit]], len(rows)


def _stored(conn: Connection) -> dict[str, StoredDesired]:
    out = {}
    for r in conn.execute(select(tables.desired_states)):
        models = tuple(DesiredModel.from_dict(m, "models") for m in json.loads(r.models))
        out[r.device_id] = StoredDesired(r.sequence, models, r.expires_at)
    return out


def refresh_desired(fleet: Fleet, conn: Connection) -> list[str]:
    """Sign a new desired state for every device whose models changed or whose state nears
    expiry; return their ids. Runs inside the caller's transaction."""
    now = fleet.now()
    devices = load_devices(conn)
    desired = compute_desired(devices, _active(conn), load_artifacts(conn))
    stored = _stored(conn)
    changed = []
    for device in devices:
        models = desired[device.id]
        prev = stored.get(device.id)
        if not needs_new_state(prev, models, now, fleet.settings.desired_refresh_margin_s):
            continue
        seq = (prev.sequence if prev else 0) + 1
        state = DesiredState(device_id=device.id, sequence=seq, issued_at=now,
                             expires_at=now + fleet.settings.desired_ttl_s, models=models)
        envelope = sign_desired(state, fleet.director_key)
        values = {"sequence": seq,
                  "models": json.dumps([m.to_dict() for m in models], sort_keys=True),
                  "issued_at": now, "expires_at": state.expires_at,
                  "envelope": envelope.decode("utf-8"), "published": False}
        if prev is None:
            conn.execute(insert(tables.desired_states).values(device_id=device.id, **values))
        else:
            conn.execute(update(tables.desired_states).where(
                tables.desired_states.c.device_id == device.id).values(**values))
        changed.append(device.id)
    return changed


def publish_pending(fleet: Fleet) -> list[str]:
    """Publish every unpublished desired state (retained, QoS 1); return the device ids sent.

    A broker failure leaves the rest unpublished for the next pass.
    """
    if fleet.publisher is None:
        return []
    with atomic(fleet.engine) as conn:
        pending = conn.execute(select(tables.desired_states.c.device_id,
                                      tables.desired_states.c.sequence,
                                      tables.desired_states.c.envelope).where(
            tables.desired_states.c.published.is_(False))
            .order_by(tables.desired_states.c.device_id)).all()
    sent = []
    for row in pending:
        try:
            fleet.publisher.publish_desired(row.device_id, row.envelope.encode("utf-8"))
        except BrokerError as exc:
            log.warning("desired state for %s not published yet: %s", row.device_id, exc)
            break
        with atomic(fleet.engine) as conn:
            conn.execute(update(tables.desired_states).where(
                tables.desired_states.c.device_id == row.device_id,
                tables.desired_states.c.sequence == row.sequence).values(published=True))
        sent.append(row.device_id)
    return sent

"""Deployments and desired states: the I/O shell around :mod:`fleet_server.deploy.plan`.

Level-triggered like a device twin: the database holds each device's last signed desired state
with ``published`` false until the broker acknowledged it. :func:`refresh_desired` recomputes
every device's state from all active deployments and signs what changed (or is near expiry);
:func:`publish_pending` sends every unpublished state, retained, and marks it published. A
crash between the two only delays publication: the next pass sends it again, and a device
refuses nothing it already applied because the sequence is the same.

A deployment with a ``rollout`` spec moves its devices in waves (:mod:`fleet_server.rollout`,
stored by :mod:`fleet_server.deploy.rollouts`): its rollout's per-device map, not its selector,
says which devices get its version. :func:`advance_rollouts` is THE re-planning step (plan every
rollout, store, audit, re-sign, in the caller's transaction); it runs after every deploy,
cancel and rollout command, from the MQTT runtime's maintenance pass, and after a device in a
rollout reported (:func:`replan_after_reports`). A new deployment of a model supersedes the
model's rollouts that still hold devices.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update

from agent.protocol.messages import DesiredModel, DesiredState
from agent.protocol.signed import sign_desired
from fleet_server import audit
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading
from fleet_server.deploy import rollouts
from fleet_server.deploy.plan import (
    Selector,
    StoredDesired,
    compute_desired,
    missing_artifacts,
    needs_new_state,
    targeted,
)
from fleet_server.deploy.views import load_active_deployments, load_artifacts, load_devices
from fleet_server.errors import BrokerError, Conflict, InvalidInput, NotFound
from fleet_server.fleet import Fleet
from fleet_server.rollout import Cancel, Command, Pause, Resume, RolloutSpec, Supersede

__all__ = [
    "COMMANDS",
    "PUBLISH_CONCURRENCY",
    "Advanced",
    "advance_rollouts",
    "cancel",
    "command_rollout",
    "deploy",
    "list_deployments",
    "load_artifacts",
    "load_devices",
    "publish_pending",
    "refresh_desired",
    "replan_after_reports",
]

log = logging.getLogger(__name__)


def _rollout_statuses(conn: Connection, ids: Collection[int]) -> dict[int, str]:
    if not ids:
        return {}
    c = tables.rollouts.c
    return {int(row.id): str(row.status) for row in conn.execute(
        select(c.id, c.status).where(c.id.in_(list(ids))))}


def _deployment_dict(row: Any, rollout_status: str | None) -> dict[str, Any]:
    return {"id": row.id, "model": row.model, "version": row.version,
            "selector": json.loads(row.selector), "status": row.status,
            "created_at": row.created_at,
            "rollout_id": row.id if rollout_status is not None else None,
            "rollout_status": rollout_status}


def _one_deployment(conn: Connection, deployment_id: int) -> dict[str, Any]:
    row = conn.execute(select(tables.deployments).where(
        tables.deployments.c.id == deployment_id)).one()
    return _deployment_dict(row, _rollout_statuses(conn, [deployment_id]).get(deployment_id))


# ------------------------------------------------------------------------------- rollouts
@dataclass(frozen=True)
class Advanced:
    """What :func:`advance_rollouts` did: the rollout steps, and the devices re-signed."""

    steps: tuple[rollouts.Step, ...]
    desired_changed: tuple[str, ...]

    @property
    def rollout_ids(self) -> list[int]:
        return [s.rollout_id for s in self.steps]


def advance_rollouts(fleet: Fleet, conn: Connection, *,
                     commands: Mapping[int, Sequence[Command]] | None = None,
                     actor: str = rollouts.PLANNER) -> Advanced:
    """Re-plan every rollout and re-sign what changed, in the caller's transaction.

    Plans every rollout still holding devices (and every commanded one), stores the new states
    and audits each step (:func:`fleet_server.deploy.rollouts.plan_rollouts`), re-signs every
    desired state that changed (or nears expiry), then records which signed sequence carries
    each rollout's version. Publish with :func:`publish_pending` after the commit.

    Raises:
        NotFound: a command names no rollout.
        Conflict: a command the rollout's status does not allow.
        StoreError: the database failed, or a commanded rollout cannot be planned.
    """
    steps = rollouts.plan_rollouts(fleet, conn, commands=commands, actor=actor)
    changed = refresh_desired(fleet, conn)
    rollouts.record_desired_sequences(conn)
    return Advanced(tuple(steps), tuple(changed))


#: what ``command_rollout`` accepts
COMMANDS = ("pause", "resume", "cancel")


def command_rollout(fleet: Fleet, conn: Connection, rollout_id: int, command: str, *,
                    actor: Principal, reason: str | None = None) -> dict[str, Any]:
    """Pause, resume or cancel a rollout; return its summary after the re-plan.

    Args:
        command: ``pause``, ``resume`` or ``cancel``.
        reason: shown in the rollout's status (pause and cancel; default: "... by <actor>").

    Raises:
        NotFound: no such rollout.
        Conflict: the rollout's status does not allow the command (e.g. it finished).
        ValueError: an unknown command (programmer misuse).
    """
    given: Command
    if command == "pause":
        given = Pause(reason or f"paused by {actor.actor}")
    elif command == "resume":
        given = Resume()
    elif command == "cancel":
        given = Cancel(reason or f"cancelled by {actor.actor}")
    else:
        raise ValueError(f"command: expected one of {', '.join(COMMANDS)}, got {command!r}")
    rollouts.load(conn, rollout_id)  # 404 before anything else
    advance_rollouts(fleet, conn, commands={rollout_id: [given]}, actor=actor.actor)
    return rollouts.get_rollout(conn, rollout_id)


def replan_after_reports(fleet: Fleet, device_ids: Collection[str]) -> bool:
    """After devices reported: re-plan and publish if a rollout holding any of them may move.

    Called by the MQTT runtime (off its ingest thread) with the devices whose ``reported``
    state it stored. Returns whether it re-planned.

    Raises:
        StoreError: the database failed.
    """
    with reading(fleet.engine) as conn:  # most reports: no rollout holds the device
        if not rollouts.holds_device(conn, device_ids):
            return False
    with atomic(fleet.engine) as conn:
        advance_rollouts(fleet, conn)
    publish_pending(fleet)
    return True


# ------------------------------------------------------------------------------- deployments
def deploy(fleet: Fleet, conn: Connection, *, model: str, version: str, selector: Selector,
           actor: Principal, rollout: RolloutSpec | None = None) -> dict[str, Any]:
    """Store a deployment and re-sign the desired state of every device it changes.

    Without ``rollout`` every selected device gets the version at once; with one, the
    rollout's first wave does, and later waves as the gates pass (:func:`advance_rollouts`).
    Either way the model's rollouts that still hold devices are superseded.

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
                        "devices": [d.id for d in devices],
                        "rollout": rollout.to_dict() if rollout else None})
    c = tables.rollouts.c
    older = conn.execute(select(c.id).where(c.model == model, c.status.in_(rollouts.ACTIVE))
                         ).scalars().all()
    if rollout is not None:
        rollouts.create(conn, deployment_id=dep_id, model=model, version=version, spec=rollout,
                        now=now)
    advanced = advance_rollouts(fleet, conn, commands={
        int(i): [Supersede(f"deployment {dep_id}")] for i in older}, actor=actor.actor)
    out = _one_deployment(conn, dep_id)
    out["devices"] = sorted(d.id for d in devices)
    out["desired_changed"] = list(advanced.desired_changed)
    out["superseded_rollouts"] = sorted(int(i) for i in older)
    out["rollout"] = rollouts.get_rollout(conn, dep_id) if rollout else None
    return out


def cancel(fleet: Fleet, conn: Connection, deployment_id: int, *,
           actor: Principal) -> dict[str, Any]:
    """Cancel a deployment; devices fall back to what older active deployments say.

    Its rollout, if it has one still holding devices, is cancelled too.

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
    status = _rollout_statuses(conn, [deployment_id]).get(deployment_id)
    commands: dict[int, list[Command]] = {}
    if status in rollouts.ACTIVE:
        commands[deployment_id] = [Cancel(f"deployment {deployment_id} cancelled by "
                                          f"{actor.actor}")]
    advance_rollouts(fleet, conn, commands=commands, actor=actor.actor)
    return _one_deployment(conn, deployment_id)


def list_deployments(conn: Connection, *, limit: int, offset: int = 0
                     ) -> tuple[list[dict[str, Any]], int]:
    rows = conn.execute(select(tables.deployments).order_by(tables.deployments.c.id.desc())).all()
    page = rows[offset:offset + limit]
    statuses = _rollout_statuses(conn, [int(r.id) for r in page])
    return [_deployment_dict(r, statuses.get(int(r.id))) for r in page], len(rows)


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
    desired = compute_desired(devices, load_active_deployments(conn), load_artifacts(conn))
    stored = _stored(conn)
    changed = []
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
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
            inserts.append({"device_id": device.id, **values})
        else:
            updates.append({"dev": device.id, **values})
        changed.append(device.id)
    # one statement each, many parameter sets: a rollout re-signs thousands of states
    if inserts:
        conn.execute(insert(tables.desired_states), inserts)
    if updates:
        conn.execute(update(tables.desired_states).where(
            tables.desired_states.c.device_id == bindparam("dev")), updates)
    return changed


#: desired states in flight at once. A Publisher blocks until the broker acknowledged (PUBACK),
#: so one at a time costs a broker round trip per device, and a 1,000-device deploy waited
#: seconds for its publishes on a busy host
PUBLISH_CONCURRENCY = 32


def publish_pending(fleet: Fleet) -> list[str]:
    """Publish every unpublished desired state (retained, QoS 1); return the device ids sent,
    sorted.

    Up to :data:`PUBLISH_CONCURRENCY` publishes are in flight at once; the sent states are then
    marked published in one transaction. A broker failure stops further publishes and leaves
    the rest unpublished for the next pass. A crash before the marking only sends the same
    envelopes again, which devices ignore (same sequence).

    Raises:
        StoreError: the database failed.
    """
    publisher = fleet.publisher
    if publisher is None:
        return []
    d = tables.desired_states.c
    with reading(fleet.engine) as conn:
        pending = conn.execute(select(d.device_id, d.sequence, d.envelope)
                               .where(d.published.is_(False)).order_by(d.device_id)).all()
    if not pending:
        return []
    failed = threading.Event()

    def send(row: Any) -> str | None:
        if failed.is_set():
            return None
        try:
            publisher.publish_desired(row.device_id, row.envelope.encode("utf-8"))
        except BrokerError as exc:
            failed.set()
            log.warning("desired state for %s not published yet: %s", row.device_id, exc)
            return None
        return str(row.device_id)

    workers = min(PUBLISH_CONCURRENCY, len(pending))
    with concurrent.futures.ThreadPoolExecutor(workers,
                                               thread_name_prefix="edgefleet-publish") as pool:
        done = list(pool.map(send, pending))
    sent = {row.device_id: row.sequence for row, ok in zip(pending, done, strict=True) if ok}
    if sent:
        with atomic(fleet.engine) as conn:
            conn.execute(update(tables.desired_states)
                         .where(d.device_id == bindparam("dev"), d.sequence == bindparam("seq"))
                         .values(published=True),
                         [{"dev": dev, "seq": seq} for dev, seq in sent.items()])
    return sorted(sent)

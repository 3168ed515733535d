"""Rollouts: storage, device reports and one planning pass around the pure planner.

:mod:`fleet_server.rollout` decides; this module loads what it decides on and stores what it
decided, inside the caller's transaction:

- ``rollouts`` holds one row per rollout-backed deployment (same id): the spec, the planner's
  :class:`~fleet_server.rollout.RolloutState` (versioned JSON) and its status;
- ``rollout_devices`` holds one row per assigned device: when, and the desired-state sequence
  that first carried the rollout's version to it (:func:`record_desired_sequences` fills it in
  after the states are signed). That is the ``desired_sequence`` of its
  :class:`~fleet_server.rollout.DeviceReport`: a device that applied that sequence and runs
  another version, or reports a failure, failed.

A report is built from the device row (what it reported it runs, ``applied_sequence``,
``last_result``, ``last_error``, ``online``) and, for the health gates, from the
``metrics.requests`` and ``drift.summary`` records it sent since its assignment about the
rollout's model version (:func:`fleet_server.rollout.health.aggregate`).

:func:`plan_rollouts` is one planning pass over every rollout that still holds devices
(running, paused, completed) and every rollout given a command; each step that did something
is audited once (``rollout.<command>`` by the operator, else ``rollout.advance``) with every
action's ``to_dict()``. The caller then re-signs desired states (the rollouts' per-device maps
feed :func:`fleet_server.deploy.plan.compute_desired`) and records the sequences: see
:func:`fleet_server.deploy.service.advance_rollouts`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update

from agent.protocol.profiles import DeviceProfile
from fleet_server import audit
from fleet_server.db import tables
from fleet_server.deploy.plan import Selector, targeted
from fleet_server.deploy.views import load_artifacts, load_devices
from fleet_server.errors import Conflict, InvalidInput, NotFound, StoreError
from fleet_server.fleet import Fleet
from fleet_server.rollout import (
    Action,
    AssignVersion,
    Command,
    CommandError,
    DeviceReport,
    RolloutSpec,
    RolloutState,
    SpecError,
    plan,
    summary,
)
from fleet_server.rollout.health import DRIFT_KIND, METRICS_KIND, Health, aggregate
from fleet_server.rollout.state import ACTIVE

__all__ = [
    "ACTIVE",
    "PLANNER",
    "Step",
    "StoredRollout",
    "create",
    "device_reports",
    "device_rollouts",
    "get_rollout",
    "holds_device",
    "list_rollouts",
    "load",
    "parse_spec",
    "plan_rollouts",
    "record_desired_sequences",
]

log = logging.getLogger(__name__)

#: the audit actor of planning steps nobody commanded
PLANNER = "fleet_server rollout planner"
#: devices per ``IN (...)`` query (SQLite's limit on bound parameters is far above)
_CHUNK = 500


@dataclass(frozen=True)
class StoredRollout:
    id: int  # = the deployment's id
    spec: RolloutSpec
    state: RolloutState
    selector: Selector
    deployment_status: str
    created_at: int


@dataclass(frozen=True)
class Step:
    """One rollout's planning step: its status before and after, and what it did."""

    rollout_id: int
    before: str
    status: str
    actions: tuple[Action, ...]


def parse_spec(data: Mapping[str, Any]) -> RolloutSpec:
    """A spec from the API's ``rollout`` object.

    Raises:
        InvalidInput: the spec is invalid (the message names the field).
    """
    try:
        return RolloutSpec.from_dict(data)
    except SpecError as exc:
        raise InvalidInput(str(exc)) from exc


def _dump(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def create(conn: Connection, *, deployment_id: int, model: str, version: str,
           spec: RolloutSpec, now: int) -> None:
    """Store a new rollout (nothing assigned yet) for a deployment just inserted."""
    state = RolloutState(str(deployment_id), model, version)
    conn.execute(insert(tables.rollouts).values(
        id=deployment_id, model=model, version=version, spec=_dump(spec.to_dict()),
        state=_dump(state.to_dict()), status=state.status, created_at=now, updated_at=now))


# ------------------------------------------------------------------------------- loading
def _stored(row: Any) -> StoredRollout:
    try:
        spec = RolloutSpec.from_dict(json.loads(row.spec))
        state = RolloutState.from_dict(json.loads(row.state))
        selector = Selector.from_dict(json.loads(row.selector))
    except ValueError as exc:  # SpecError and json.JSONDecodeError are ValueErrors
        raise StoreError(f"rollout {row.id}: the stored spec or state cannot be read: "
                         f"{exc}") from exc
    return StoredRollout(int(row.id), spec, state, selector, row.deployment_status,
                         int(row.created_at))


def _select(for_update: bool) -> Any:
    r, d = tables.rollouts.c, tables.deployments.c
    q = select(r.id, r.spec, r.state, r.created_at, d.selector,
               d.status.label("deployment_status")).select_from(
        tables.rollouts.join(tables.deployments, d.id == r.id)).order_by(r.id)
    return q.with_for_update(of=tables.rollouts) if for_update else q


def load(conn: Connection, rollout_id: int, *, for_update: bool = False) -> StoredRollout:
    """Raises: NotFound: no such rollout. StoreError: it cannot be read."""
    row = conn.execute(_select(for_update).where(tables.rollouts.c.id == rollout_id)).first()
    if row is None:
        raise NotFound(f"rollout {rollout_id} not found (a rollout has the id of its "
                       "deployment; deployments without waves have none)")
    return _stored(row)


def _load_for_planning(conn: Connection, ids: Collection[int]) -> list[StoredRollout]:
    c = tables.rollouts.c
    where = or_(c.status.in_(ACTIVE), c.id.in_(list(ids))) if ids else c.status.in_(ACTIVE)
    return [_stored(row) for row in conn.execute(_select(True).where(where))]


# ------------------------------------------------------------------------------- reports
def _chunks(ids: Sequence[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield list(ids[i:i + _CHUNK])


def _running_version(reported: Mapping[str, Any] | None, model: str) -> str | None:
    for m in (reported or {}).get("running") or ():
        if isinstance(m, Mapping) and m.get("name") == model:
            version = m.get("version")
            return version if isinstance(version, str) else None
    return None


def _health(conn: Connection, st: RolloutState, device_ids: Collection[str]
            ) -> dict[str, Health]:
    """Health on the rollout's version since each device's assignment."""
    wanted = set(device_ids)
    since = {a.device_id: a.assigned_at for a in st.assignments if a.device_id in wanted}
    if not since:
        return {}
    c = tables.device_records.c
    bodies: dict[str, list[tuple[str, Any]]] = {d: [] for d in since}
    for chunk in _chunks(sorted(since)):
        rows = conn.execute(select(c.device_id, c.kind, c.body, c.received_at).where(
            c.device_id.in_(chunk), c.kind.in_((METRICS_KIND, DRIFT_KIND)),
            c.received_at >= min(since[d] for d in chunk)))
        for row in rows:
            if row.received_at < since[row.device_id]:
                continue
            try:
                bodies[row.device_id].append((row.kind, json.loads(row.body)))
            except ValueError:  # stored by ingest as JSON; a hand-edited row is skipped
                log.warning("device record of %s is not JSON; skipped", row.device_id)
    return {d: aggregate(st.model, st.version, b) for d, b in bodies.items()}


def device_reports(conn: Connection, rollout_id: int, st: RolloutState,
                   device_ids: Iterable[str], *, health: bool,
                   profiles: Mapping[str, DeviceProfile] | None = None
                   ) -> dict[str, DeviceReport]:
    """The planner's view of ``device_ids`` for rollout ``st`` (devices that do not exist are
    left out: the planner counts them as offline).

    Args:
        health: read the health records too (only the gates need them).
        profiles: the device profiles, for their latency budgets (the p95 gate needs them).
    """
    ids = sorted(set(device_ids))
    rd = tables.rollout_devices.c
    sequences: dict[str, int | None] = {
        row.device_id: row.desired_sequence for row in conn.execute(
            select(rd.device_id, rd.desired_sequence).where(rd.rollout_id == rollout_id))}
    judged = [a.device_id for a in st.assignments if a.active and a.failed is None]
    healths = _health(conn, st, judged) if health else {}
    d = tables.devices.c
    out: dict[str, DeviceReport] = {}
    for chunk in _chunks(ids):
        for row in conn.execute(select(d.id, d.profile, d.online, d.reported).where(
                d.id.in_(chunk))):
            reported = json.loads(row.reported) if row.reported else None
            profile = (profiles or {}).get(row.profile)
            h = healths.get(row.id, Health())
            out[row.id] = DeviceReport(
                device_id=row.id, profile=row.profile,
                running_version=_running_version(reported, st.model),
                applied_sequence=int((reported or {}).get("applied_sequence") or 0),
                desired_sequence=sequences.get(row.id),
                last_result=(reported or {}).get("last_result"),
                last_error=(reported or {}).get("last_error"),
                online=bool(row.online), requests=h.requests, errors=h.errors,
                p95_ms=h.p95_ms, max_psi=h.max_psi, samples=h.samples,
                latency_budget_ms=profile.latency_budget_ms if profile else None)
    return out


# ------------------------------------------------------------------------------- planning
def _command_dict(command: Command) -> dict[str, Any]:
    return {"command": type(command).__name__.lower(), **asdict(command)}


def plan_rollouts(fleet: Fleet, conn: Connection, *,
                  commands: Mapping[int, Sequence[Command]] | None = None,
                  actor: str = PLANNER) -> list[Step]:
    """One planning pass: every rollout holding devices, and every rollout given commands.

    Args:
        commands: rollout id -> operator commands, applied first (see
            :func:`fleet_server.rollout.plan`).
        actor: who gave the commands (the audit actor of those rollouts' steps).

    Returns:
        The steps that changed something (actions), in rollout order.

    Raises:
        NotFound: a command names no rollout.
        Conflict: a command the rollout's status does not allow.
        StoreError: a commanded rollout's stored state cannot be planned.
    """
    commands = commands or {}
    stored = _load_for_planning(conn, commands.keys())
    missing = sorted(set(commands) - {s.id for s in stored})
    if missing:
        raise NotFound(f"rollout {missing[0]} not found")
    if not stored:
        return []
    now = fleet.now()
    devices = load_devices(conn)
    artifacts = set(load_artifacts(conn))
    steps = []
    for s in stored:
        given = tuple(commands.get(s.id, ()))
        if not given and s.deployment_status != "active":
            continue  # its deployment was cancelled: nothing of it is in force
        st = s.state
        selected = [d.id for d in targeted(s.selector, devices)
                    if (st.model, st.version, d.profile) in artifacts]
        reports = device_reports(conn, s.id, st,
                                 {*selected, *(a.device_id for a in st.assignments)},
                                 health=st.status in ("running", "paused") or bool(given),
                                 profiles=fleet.profiles)
        at = max(now, st.updated_at or now)  # a clock stepped back must not wedge a rollout
        try:
            new, actions = plan(s.spec, st, selected, reports, at, given)
        except CommandError as exc:
            raise Conflict(str(exc)) from exc
        except ValueError as exc:
            if given:
                raise StoreError(f"rollout {s.id} cannot be planned: {exc}") from exc
            log.error("rollout %d cannot be planned (left as it is): %s", s.id, exc)
            continue
        conn.execute(update(tables.rollouts).where(tables.rollouts.c.id == s.id).values(
            state=_dump(new.to_dict()), status=new.status, updated_at=at))
        assigned = [a.device_id for a in actions if isinstance(a, AssignVersion)]
        if assigned:
            conn.execute(insert(tables.rollout_devices), [
                {"rollout_id": s.id, "device_id": d, "assigned_at": at,
                 "desired_sequence": None} for d in assigned])
        if actions:
            kind = _command_dict(given[-1])["command"] if given else "advance"
            audit.record(conn, at=at, actor=actor if given else PLANNER,
                         action=f"rollout.{kind}", target=f"rollout:{s.id}",
                         before={"status": st.status, "wave": st.wave},
                         after={"status": new.status, "wave": new.wave, "reason": new.reason,
                                "commands": [_command_dict(c) for c in given],
                                "actions": [a.to_dict() for a in actions]})
            steps.append(Step(s.id, st.status, new.status, actions))
    return steps


def record_desired_sequences(conn: Connection) -> int:
    """Fill in ``rollout_devices.desired_sequence`` where the device's signed desired state now
    carries the rollout's version; return how many. Run after the states were re-signed."""
    rd, r, ds = tables.rollout_devices.c, tables.rollouts.c, tables.desired_states.c
    rows = conn.execute(select(rd.rollout_id, rd.device_id, r.model, r.version, ds.sequence,
                               ds.models).select_from(
        tables.rollout_devices.join(tables.rollouts, r.id == rd.rollout_id)
        .join(tables.desired_states, ds.device_id == rd.device_id)).where(
        rd.desired_sequence.is_(None), r.status.in_(ACTIVE))).all()
    done = 0
    for row in rows:
        models = json.loads(row.models)
        if any(m.get("name") == row.model and m.get("version") == row.version for m in models):
            conn.execute(update(tables.rollout_devices).where(
                rd.rollout_id == row.rollout_id, rd.device_id == row.device_id).values(
                desired_sequence=row.sequence))
            done += 1
    return done


def holds_device(conn: Connection, device_ids: Collection[str]) -> bool:
    """Whether a rollout still holding devices (running, paused, completed) assigned any of
    ``device_ids``: a report from one of them may change its outcome."""
    if not device_ids:
        return False
    rd, r = tables.rollout_devices.c, tables.rollouts.c
    return conn.execute(select(rd.device_id).select_from(
        tables.rollout_devices.join(tables.rollouts, and_(r.id == rd.rollout_id,
                                                          r.status.in_(ACTIVE))))
        .where(rd.device_id.in_(list(device_ids))).limit(1)).first() is not None


# ------------------------------------------------------------------------------- reading
def _view(conn: Connection, s: StoredRollout, *, devices: bool) -> dict[str, Any]:
    st = s.state
    reports = device_reports(conn, s.id, st, [a.device_id for a in st.assignments],
                             health=False)
    out = summary(st, reports)
    for wave in out["waves"]:
        index = wave["index"]
        wave["target"] = s.spec.waves[index].to_text() if index < len(s.spec.waves) else None
    out.update(id=s.id, deployment_id=s.id, selector=s.selector.to_dict(),
               spec=s.spec.to_dict(), waves_text=s.spec.waves_text(),
               on_failure=s.spec.on_failure, deployment_status=s.deployment_status,
               created_at=s.created_at, wave_count=len(s.spec.waves))
    if devices:
        for row in out["devices"]:
            report = reports.get(row["device_id"])
            row["desired_sequence"] = report.desired_sequence if report else None
            row["applied_sequence"] = report.applied_sequence if report else None
    else:
        del out["devices"]
    return out


def get_rollout(conn: Connection, rollout_id: int) -> dict[str, Any]:
    """The planner's :func:`~fleet_server.rollout.summary` of a rollout, with its spec,
    selector and each moved device's desired sequence.

    Raises:
        NotFound: no such rollout.
        StoreError: it cannot be read.
    """
    return _view(conn, load(conn, rollout_id), devices=True)


def list_rollouts(conn: Connection, *, limit: int, offset: int = 0,
                  status: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """Rollouts, newest first, with their per-wave counts (not their devices).

    Raises:
        StoreError: a rollout cannot be read.
    """
    c = tables.rollouts.c
    total_q = select(func.count()).select_from(tables.rollouts)
    q = _select(False).order_by(None).order_by(c.id.desc())
    if status is not None:
        total_q, q = total_q.where(c.status == status), q.where(c.status == status)
    total = int(conn.execute(total_q).scalar() or 0)
    rows = conn.execute(q.limit(limit).offset(offset)).all()
    return [_view(conn, _stored(row), devices=False) for row in rows], total


def device_rollouts(conn: Connection, device_id: str) -> list[dict[str, Any]]:
    """The rollouts that moved a device, newest first: its outcome there and why.

    Raises:
        StoreError: a rollout cannot be read.
    """
    ids = conn.execute(select(tables.rollout_devices.c.rollout_id).where(
        tables.rollout_devices.c.device_id == device_id).order_by(
        tables.rollout_devices.c.rollout_id.desc())).scalars().all()
    out = []
    for rollout_id in ids:
        s = load(conn, int(rollout_id))
        reports = device_reports(conn, s.id, s.state, [device_id], health=False)
        row = next(r for r in summary(s.state, reports)["devices"]
                   if r["device_id"] == device_id)
        out.append({"rollout_id": s.id, "model": s.state.model, "version": s.state.version,
                    "status": s.state.status, "wave": row["wave"], "outcome": row["outcome"],
                    "reason": row["reason"], "desired_version": row["desired_version"],
                    "previous_version": row["previous_version"]})
    return out

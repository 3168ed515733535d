"""What each page shows, read inside the caller's transaction (reads only).

The figures come from the functions the admin API serves, so a page and ``GET /v1/...`` can
never disagree: devices from :mod:`fleet_server.registry.devices`, models from
:mod:`fleet_server.registry.models`, rollouts (waves, gates, per-device outcomes) from
:mod:`fleet_server.deploy.rollouts`, the audit chain check from :mod:`fleet_server.audit`.
What the API has no call for is queried here, read-only: the device counts of the overview,
the audit log newest first (``GET /v1/audit`` pages oldest first), and each rollout's number of
selected devices, which turns a wave's ``25%`` into a device count. The model-health pages
(models, drift, alerts, a device's health) are in :mod:`fleet_server.dashboard.health`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy import Connection, func, select

from fleet_server import audit
from fleet_server.audit import AuditEntry
from fleet_server.dashboard.charts import BarSeries, bar_chart
from fleet_server.db import tables
from fleet_server.deploy import rollouts
from fleet_server.deploy.plan import Selector, targeted
from fleet_server.deploy.views import load_artifacts, load_devices
from fleet_server.monitoring import list_alerts
from fleet_server.registry import devices, models
from fleet_server.rollout import RolloutSpec
from fleet_server.rollout.state import ACTIVE

__all__ = [
    "AuditPage",
    "DeviceCounts",
    "DeviceRow",
    "GateRow",
    "Overview",
    "Paging",
    "RolloutView",
    "WaveRow",
    "audit_page",
    "device_counts",
    "device_detail",
    "device_page",
    "overview",
    "rollout_detail",
    "rollout_page",
    "wave_chart",
]

#: wave chart colours: target, committed, failed, pending
_WAVE_COLOURS = ("#9db4c8", "#009e73", "#d55e00", "#b0b0b0")
#: the largest listing read whole (models on the overview, active rollouts)
_ALL = 10_000


@dataclass(frozen=True)
class Paging:
    page: int  # 1-based
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.per_page))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    @property
    def first(self) -> int:
        """1-based position of the page's first item (0 when there is none)."""
        return min(self.offset + 1, self.total)

    @property
    def last(self) -> int:
        return min(self.offset + self.per_page, self.total)


# ------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DeviceCounts:
    total: int  # revoked included
    online: int  # live devices whose last status said online
    offline: int
    revoked: int


def device_counts(conn: Connection) -> DeviceCounts:
    d = tables.devices.c
    rows = conn.execute(select(d.online, d.revoked_at.is_(None).label("live"),
                               func.count().label("n")).group_by(
        d.online, d.revoked_at.is_(None))).all()
    online = sum(r.n for r in rows if r.live and r.online)
    offline = sum(r.n for r in rows if r.live and not r.online)
    revoked = sum(r.n for r in rows if not r.live)
    return DeviceCounts(online + offline + revoked, online, offline, revoked)


@dataclass(frozen=True)
class DeviceRow:
    """One device as the devices table shows it (from ``registry.devices.device_dict``)."""

    id: str
    profile: str
    tags: tuple[str, ...]
    online: bool
    revoked: bool
    running: tuple[str, ...]  # "name version" per model it reported running
    state: str | None  # the update state machine's state it reported
    last_result: str | None
    last_error: str | None
    applied_sequence: int | None
    last_seen_at: int | None
    reported_at: int | None


def _device_row(d: Mapping[str, Any]) -> DeviceRow:
    reported: Mapping[str, Any] = d.get("reported") or {}
    running = tuple(f"{m.get('name')} {m.get('version')}"
                    for m in reported.get("running") or () if isinstance(m, Mapping))
    return DeviceRow(
        id=d["id"], profile=d["profile"], tags=tuple(d["tags"]), online=d["online"],
        revoked=d["revoked"], running=running, state=reported.get("state"),
        last_result=reported.get("last_result"), last_error=reported.get("last_error"),
        applied_sequence=reported.get("applied_sequence"), last_seen_at=d["last_seen_at"],
        reported_at=d["reported_at"])


def device_page(conn: Connection, *, page: int, per_page: int
                ) -> tuple[list[DeviceRow], Paging]:
    """Devices by id, as ``GET /v1/devices`` lists them."""
    items, total = devices.list_devices(conn, limit=per_page, offset=(page - 1) * per_page)
    return [_device_row(d) for d in items], Paging(page, per_page, total)


def device_detail(conn: Connection, device_id: str) -> tuple[DeviceRow, dict[str, Any]]:
    """The device's row and everything ``GET /v1/devices/{id}`` says about it.

    Raises:
        NotFound: no such device.
    """
    full = devices.get_device(conn, device_id)
    return _device_row(full), full


# ------------------------------------------------------------------------------- rollouts
@dataclass(frozen=True)
class GateRow:
    wave: int  # 0-based
    gate: str
    status: str  # passed | failed | waiting
    value: float | None
    limit: float | None
    detail: str


@dataclass(frozen=True)
class WaveRow:
    index: int  # 0-based; pages show index + 1
    target_text: str  # as the spec says it: "2", "25%", "all"
    target: int  # cumulative devices this wave reaches, of the devices selected now
    assigned: int
    committed: int
    failed: int
    pending: int
    reverted: int
    state: str  # done | current | next
    gates: tuple[GateRow, ...]


@dataclass(frozen=True)
class RolloutView:
    id: int
    model: str
    version: str
    status: str
    reason: str | None
    wave: int  # the current wave, 0-based
    waves: tuple[WaveRow, ...]
    selected: int  # devices the deployment selects now that have an artifact for it
    on_failure: str
    selector: dict[str, Any]
    created_at: int
    updated_at: int | None
    why: tuple[str, ...]  # why it is waiting, paused or stopped
    chart: Markup
    devices: tuple[dict[str, Any], ...]  # detail page only: each moved device's row

    @property
    def gates(self) -> tuple[GateRow, ...]:
        """The latest evaluation of every gate, wave by wave."""
        return tuple(g for w in self.waves for g in w.gates)


def _gate_status(ok: bool | None) -> str:
    return "waiting" if ok is None else "passed" if ok else "failed"


class _Selection:
    """The live devices and the artifacts, read once per page: a rollout selects the devices
    :func:`fleet_server.deploy.rollouts.plan_rollouts` counts (live, matching its selector,
    with an artifact of its version for their profile)."""

    def __init__(self, conn: Connection) -> None:
        self.devices = load_devices(conn)
        self.artifacts = set(load_artifacts(conn))

    def count(self, selector: Selector, model: str, version: str) -> int:
        return sum(1 for d in targeted(selector, self.devices)
                   if (model, version, d.profile) in self.artifacts)


def _why(view: Mapping[str, Any], gates: Sequence[GateRow]) -> tuple[str, ...]:
    status = view["status"]
    if status == "completed":
        return ()
    if status != "running":
        return (f"{status}: {view.get('reason') or 'no reason given'}",)
    current = [g for g in gates if g.wave == view["wave"]]
    failing = [f"{g.gate} failed: {g.detail}" for g in gates if g.status == "failed"]
    waiting = [f"waiting for {g.gate}: {g.detail}" for g in current if g.status == "waiting"]
    return tuple(failing + waiting)


def wave_chart(rollout_id: int, waves: Sequence[WaveRow]) -> Markup:
    """Grouped bars per wave: target, committed, failed, pending devices."""
    names = ("target", "committed", "failed", "pending")
    series = [BarSeries(name, [float(getattr(w, name)) for w in waves], colour)
              for name, colour in zip(names, _WAVE_COLOURS, strict=True)]
    return bar_chart([f"wave {w.index + 1}" for w in waves], series,
                     title=f"Rollout {rollout_id}: devices per wave", y_label="devices",
                     width=560, height=230)


def _rollout(selection: _Selection, view: Mapping[str, Any]) -> RolloutView:
    spec = RolloutSpec.from_dict(view["spec"])
    selected = selection.count(Selector.from_dict(view["selector"]), view["model"],
                               view["version"])
    gates = [GateRow(g["wave"], g["gate"], _gate_status(g["ok"]), g["value"], g["limit"],
                     g["detail"]) for g in view["gates"]]
    counted = {w["index"]: w for w in view["waves"]}
    waves = []
    for i, w in enumerate(spec.waves):
        c = counted.get(i, {})
        state = "done" if i < view["wave"] else "current" if i == view["wave"] else "next"
        if view["status"] == "completed":
            state = "done"
        waves.append(WaveRow(
            index=i, target_text=w.to_text(),
            target=max(spec.waves[k].target(selected) for k in range(i + 1)),
            assigned=c.get("assigned", 0), committed=c.get("committed", 0),
            failed=c.get("failed", 0), pending=c.get("pending", 0),
            reverted=c.get("reverted", 0), state=state,
            gates=tuple(g for g in gates if g.wave == i)))
    return RolloutView(
        id=view["id"], model=view["model"], version=view["version"], status=view["status"],
        reason=view["reason"], wave=view["wave"], waves=tuple(waves), selected=selected,
        on_failure=view["on_failure"], selector=view["selector"],
        created_at=view["created_at"], updated_at=view["updated_at"],
        why=_why(view, gates), chart=wave_chart(view["id"], waves),
        devices=tuple(view.get("devices", ())))


def rollout_page(conn: Connection, *, page: int, per_page: int
                 ) -> tuple[list[RolloutView], Paging]:
    """Rollouts newest first, as ``GET /v1/rollouts`` lists them.

    Raises:
        StoreError: a stored rollout cannot be read.
    """
    items, total = rollouts.list_rollouts(conn, limit=per_page, offset=(page - 1) * per_page)
    selection = _Selection(conn)
    return [_rollout(selection, v) for v in items], Paging(page, per_page, total)


def rollout_detail(conn: Connection, rollout_id: int) -> RolloutView:
    """One rollout with its devices, as ``GET /v1/rollouts/{id}``.

    Raises:
        NotFound: no such rollout.
        StoreError: it cannot be read.
    """
    return _rollout(_Selection(conn), rollouts.get_rollout(conn, rollout_id))


# ------------------------------------------------------------------------------- overview
@dataclass(frozen=True)
class Overview:
    devices: DeviceCounts
    models: list[dict[str, Any]]  # name, version, profiles, created_at (registry.models)
    model_names: int
    active_deployments: int
    rollouts_by_status: dict[str, int]
    active_rollouts: list[RolloutView]
    alerts: dict[str, int]  # firing, pending (totals of ``GET /v1/alerts?state=...``)


def overview(conn: Connection) -> Overview:
    """Device counts, model versions, deployments, the rollouts still in progress and how
    many alerts are firing and pending.

    Raises:
        StoreError: a stored rollout cannot be read.
    """
    versions, _ = models.list_models(conn, limit=_ALL)
    r = tables.rollouts.c
    by_status = {str(row.status): int(row.n) for row in conn.execute(
        select(r.status, func.count().label("n")).group_by(r.status))}
    d = tables.deployments.c
    active = int(conn.execute(select(func.count()).select_from(tables.deployments).where(
        d.status == "active")).scalar() or 0)
    running = [v for status in ("running", "paused")
               for v in rollouts.list_rollouts(conn, limit=_ALL, status=status)[0]]
    running.sort(key=lambda v: -int(v["id"]))
    selection = _Selection(conn) if running else None
    return Overview(
        devices=device_counts(conn), models=versions,
        model_names=len({v["name"] for v in versions}), active_deployments=active,
        rollouts_by_status={s: by_status.get(s, 0) for s in (*ACTIVE, *sorted(
            set(by_status) - set(ACTIVE)))},
        active_rollouts=[_rollout(selection, v) for v in running] if selection else [],
        alerts={state: list_alerts(conn, state=state, limit=1)[1]
                for state in ("firing", "pending")})


# ------------------------------------------------------------------------------- audit
@dataclass(frozen=True)
class AuditPage:
    entries: list[AuditEntry]  # newest first
    paging: Paging
    first_broken_id: int | None  # None: the whole chain verifies

    @property
    def chain_intact(self) -> bool:
        return self.first_broken_id is None


def _json(value: str | None) -> Any:
    return None if value is None else json.loads(value)


def audit_page(conn: Connection, *, page: int, per_page: int) -> AuditPage:
    """One page of the audit log, newest first, and the whole chain's verification (as
    ``GET /v1/audit`` reports it)."""
    a = tables.audit.c
    rows = conn.execute(select(tables.audit).order_by(a.id.desc())
                        .limit(per_page).offset((page - 1) * per_page)).all()
    entries = [AuditEntry(r.id, r.at, r.actor, r.action, r.target, _json(r.before),
                          _json(r.after), r.prev_hash, r.hash) for r in rows]
    total = int(conn.execute(select(func.count()).select_from(tables.audit)).scalar() or 0)
    return AuditPage(entries, Paging(page, per_page, total), audit.verify_chain(conn))

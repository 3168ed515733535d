"""Rows -> the views :mod:`fleet_server.deploy.plan` computes over (reads only, inside the
caller's transaction)."""

from __future__ import annotations

import json

from sqlalchemy import Connection, select

from fleet_server.db import tables
from fleet_server.deploy.plan import ArtifactView, DeploymentView, DeviceView, Selector
from fleet_server.errors import StoreError
from fleet_server.rollout import RolloutState, desired

__all__ = ["load_active_deployments", "load_artifacts", "load_devices", "rollout_maps"]


def load_devices(conn: Connection, *, include_revoked: bool = False) -> list[DeviceView]:
    q = select(tables.devices.c.id, tables.devices.c.profile, tables.devices.c.tags,
               tables.devices.c.revoked_at).order_by(tables.devices.c.id)
    return [DeviceView(r.id, r.profile, frozenset(json.loads(r.tags)))
            for r in conn.execute(q) if include_revoked or r.revoked_at is None]


def load_artifacts(conn: Connection) -> dict[tuple[str, str, str], ArtifactView]:
    return {(r.name, r.version, r.profile): ArtifactView(
        r.name, r.version, r.profile, r.sha256, r.length, r.target_path, r.manifest_target)
        for r in conn.execute(select(tables.artifacts))}


def rollout_maps(conn: Connection) -> dict[int, dict[str, str | None]]:
    """Deployment id -> :func:`fleet_server.rollout.desired` of its rollout, for every
    rollout-backed deployment that is still active.

    Raises:
        StoreError: a stored rollout state cannot be read.
    """
    r, d = tables.rollouts.c, tables.deployments.c
    rows = conn.execute(select(r.id, r.state).select_from(
        tables.rollouts.join(tables.deployments, d.id == r.id)).where(d.status == "active"))
    out: dict[int, dict[str, str | None]] = {}
    for row in rows:
        try:
            state = RolloutState.from_dict(json.loads(row.state))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            raise StoreError(f"rollout {row.id}: the stored state cannot be read: "
                             f"{exc}") from exc
        out[int(row.id)] = desired(state)
    return out


def load_active_deployments(conn: Connection) -> list[DeploymentView]:
    """Every active deployment; rollout-backed ones carry their rollout's per-device map.

    Raises:
        StoreError: a stored rollout state cannot be read.
    """
    maps = rollout_maps(conn)
    rows = conn.execute(select(tables.deployments).where(
        tables.deployments.c.status == "active")).all()
    return [DeploymentView(r.id, r.model, r.version, Selector.from_dict(json.loads(r.selector)),
                           rollout=maps.get(int(r.id))) for r in rows]

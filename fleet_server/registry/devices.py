"""Devices: provision, list, read, revoke.

Provisioning creates the device row, its MQTT credentials (username = device id; only the
password's PBKDF2 hash is stored, in Mosquitto's format so the same hash serves the embedded
broker and a Mosquitto password file), a device-scope HTTP token, and the provisioning file the
agent starts from (TUF root pinned, director public key, URLs).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from agent.protocol.provisioning import Provisioning
from agent.protocol.topics import DEVICE_ID_PATTERN, is_valid_device_id
from fleet_server import audit, auth
from fleet_server.auth import Principal
from fleet_server.db import tables
from fleet_server.deploy.rollouts import device_rollouts
from fleet_server.deploy.service import advance_rollouts
from fleet_server.errors import Conflict, InvalidInput, NotFound
from fleet_server.fleet import Fleet

__all__ = ["TAG_PATTERN", "Provisioned", "credential_hash", "device_dict", "get_device",
           "list_devices", "mqtt_credentials", "mqtt_public_url", "provision", "revoke"]

TAG_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$"


@dataclass(frozen=True)
class Provisioned:
    device: dict[str, Any]
    provisioning: Provisioning


def mqtt_public_url(fleet: Fleet) -> str:
    s = fleet.settings
    if s.mqtt_public_url:
        return s.mqtt_public_url
    if s.mqtt_url != "embedded":
        # the server's own URL minus its credentials
        scheme, rest = s.mqtt_url.split("://", 1)
        return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
    port = fleet.extra.get("mqtt_port", s.mqtt_port)
    return f"mqtt://{s.mqtt_host}:{port}"


def _check_tags(tags: Sequence[str]) -> tuple[str, ...]:
    import re

    for t in tags:
        if not re.match(TAG_PATTERN, t):
            raise InvalidInput(f"tag {t!r}: expected letters, digits and . _ : - "
                               "(1-63 characters)")
    return tuple(sorted(set(tags)))


def provision(fleet: Fleet, conn: Connection, *, device_id: str, profile: str,
              tags: Sequence[str], actor: Principal) -> Provisioned:
    """Register a device and return its provisioning file (with secrets, shown once).

    Signs the device's first desired state at once when an active deployment selects it (it is
    then pending publication: call ``deploy.service.publish_pending`` after the commit).

    Raises:
        InvalidInput: bad device id, unknown profile, bad tag.
        Conflict: the device id is taken (also by a revoked device: ids are never reused).
    """
    from fleet_server.mqtt.passwords import hash_password

    if not is_valid_device_id(device_id):
        raise InvalidInput(f"device id {device_id!r}: expected {DEVICE_ID_PATTERN}")
    if profile not in fleet.profiles:
        raise InvalidInput(f"unknown profile {profile!r}; valid profiles: "
                           f"{', '.join(sorted(fleet.profiles))}")
    clean_tags = _check_tags(tags)
    if conn.execute(select(tables.devices.c.id).where(tables.devices.c.id == device_id)).first():
        raise Conflict(f"device {device_id!r} already exists (ids are never reused, even "
                       "after revocation)")
    now = fleet.now()
    password = secrets.token_urlsafe(24)
    conn.execute(insert(tables.devices).values(
        id=device_id, profile=profile, tags=json.dumps(list(clean_tags)),
        mqtt_password_hash=hash_password(password), created_at=now, online=False))
    _, token = auth.create_token(conn, name=f"device:{device_id}", scope="device", now=now,
                                 device_id=device_id)
    audit.record(conn, at=now, actor=actor.actor, action="device.provision",
                 target=f"device:{device_id}",
                 after={"profile": profile, "tags": list(clean_tags)})
    # a deployment stored earlier may already select this device (by tag, profile or all);
    # a completed rollout takes it at once, a running one when its wave comes
    advance_rollouts(fleet, conn)
    base = fleet.settings.base_url
    prov = Provisioning(
        device_id=device_id, profile=profile, mqtt_url=mqtt_public_url(fleet),
        mqtt_username=device_id, mqtt_password=password, http_url=base, http_token=token,
        tuf_metadata_url=f"{base}/tuf/metadata/", tuf_targets_url=f"{base}/tuf/targets/",
        tuf_root=fleet.repo.root_bytes(), director_keys_pem=(fleet.director_public_pem,),
    )
    return Provisioned(device=get_device(conn, device_id), provisioning=prov)


def device_dict(row: Any) -> dict[str, Any]:
    return {
        "id": row.id,
        "profile": row.profile,
        "tags": json.loads(row.tags),
        "created_at": row.created_at,
        "revoked": row.revoked_at is not None,
        "revoked_at": row.revoked_at,
        "online": bool(row.online),
        "last_seen_at": row.last_seen_at,
        "reported": json.loads(row.reported) if row.reported else None,
        "reported_at": row.reported_at,
    }


def get_device(conn: Connection, device_id: str) -> dict[str, Any]:
    """The device with its last signed desired state and the rollouts that moved it (its
    outcome in each, and why: e.g. that it rolled back by itself).

    Raises:
        NotFound: no such device.
    """
    row = conn.execute(select(tables.devices).where(tables.devices.c.id == device_id)).first()
    if row is None:
        raise NotFound(f"device {device_id!r} not found")
    out = device_dict(row)
    desired = conn.execute(select(tables.desired_states).where(
        tables.desired_states.c.device_id == device_id)).first()
    out["desired"] = None if desired is None else {
        "sequence": desired.sequence, "models": json.loads(desired.models),
        "issued_at": desired.issued_at, "expires_at": desired.expires_at,
        "published": bool(desired.published)}
    out["rollouts"] = device_rollouts(conn, device_id)
    return out


def list_devices(conn: Connection, *, limit: int, offset: int = 0, tag: str | None = None,
                 profile: str | None = None) -> tuple[list[dict[str, Any]], int]:
    q = select(tables.devices)
    cq = select(func.count()).select_from(tables.devices)
    if profile:
        q, cq = q.where(tables.devices.c.profile == profile), cq.where(
            tables.devices.c.profile == profile)
    rows = [device_dict(r) for r in conn.execute(q.order_by(tables.devices.c.id))]
    if tag:
        rows = [r for r in rows if tag in r["tags"]]
    total = len(rows)
    return rows[offset:offset + limit], total


def revoke(fleet: Fleet, conn: Connection, device_id: str, *, actor: Principal) -> dict[str, Any]:
    """Revoke a device: its MQTT credentials and token stop working; the row stays.

    Raises:
        NotFound: no such device.
        Conflict: already revoked.
    """
    before = get_device(conn, device_id)
    if before["revoked"]:
        raise Conflict(f"device {device_id!r} is already revoked")
    now = fleet.now()
    fleet.tokens.revoke(device_id=device_id)  # before the commit: see fleet_server.auth
    conn.execute(update(tables.devices).where(tables.devices.c.id == device_id)
                 .values(revoked_at=now, online=False))
    conn.execute(update(tables.tokens).where(tables.tokens.c.device_id == device_id)
                 .values(revoked_at=now))
    audit.record(conn, at=now, actor=actor.actor, action="device.revoke",
                 target=f"device:{device_id}", before={"revoked": False},
                 after={"revoked": True})
    return get_device(conn, device_id)


def credential_hash(conn: Connection, username: str) -> str | None:
    """The stored MQTT password hash of a live (not revoked) device, else None."""
    row = conn.execute(select(tables.devices.c.mqtt_password_hash, tables.devices.c.revoked_at)
                       .where(tables.devices.c.id == username)).first()
    if row is None or row.revoked_at is not None:
        return None
    return str(row.mqtt_password_hash)


def mqtt_credentials(conn: Connection) -> dict[str, str]:
    """username -> stored hash for every live device (for a broker's password file)."""
    rows = conn.execute(select(tables.devices.c.id, tables.devices.c.mqtt_password_hash).where(
        tables.devices.c.revoked_at.is_(None))).all()
    return {r.id: r.mqtt_password_hash for r in rows}

"""API tokens: random secrets shown once, stored as sha256 only, scoped, revocable.

Scopes nest: ``admin`` ⊇ ``publisher`` ⊇ ``reader``. ``device`` tokens belong to one device
and may only read TUF metadata and targets. Token secrets look like ``ef_<scope>_<random>``
so a leaked one is recognisable by secret scanners.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from fleet_server import audit
from fleet_server.db import tables
from fleet_server.errors import Forbidden, InvalidInput, NotFound, Unauthenticated

__all__ = [
    "SCOPES",
    "Principal",
    "authenticate",
    "create_token",
    "hash_secret",
    "issue_token",
    "require",
    "revoke_token",
]

SCOPES = ("admin", "publisher", "reader", "device")
_RANK = {"reader": 1, "publisher": 2, "admin": 3}


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    scope: str
    device_id: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.scope}:{self.name}"


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_token(conn: Connection, *, name: str, scope: str, now: int,
                 device_id: str | None = None) -> tuple[Principal, str]:
    """Create a token; return it and its secret (the only time the secret exists in clear).

    Raises:
        InvalidInput: unknown scope, empty name, or a device scope without a device.
    """
    if scope not in SCOPES:
        raise InvalidInput(f"token scope: expected one of {', '.join(SCOPES)}, got {scope!r}")
    if not name or len(name) > 200:
        raise InvalidInput(f"token name: expected 1-200 characters, got {len(name)}")
    if (scope == "device") != (device_id is not None):
        raise InvalidInput("token scope 'device' goes with exactly one device id")
    token_id = secrets.token_hex(8)
    secret = f"ef_{scope}_{secrets.token_urlsafe(32)}"
    conn.execute(insert(tables.tokens).values(
        id=token_id, name=name, scope=scope, secret_sha256=hash_secret(secret),
        device_id=device_id, created_at=now))
    return Principal(token_id, name, scope, device_id), secret


def issue_token(conn: Connection, *, name: str, scope: str, now: int,
                actor: Principal) -> tuple[Principal, str]:
    """Create a token on behalf of ``actor`` and record it in the audit log.

    Raises:
        InvalidInput: as :func:`create_token`.
    """
    principal, secret = create_token(conn, name=name, scope=scope, now=now)
    audit.record(conn, at=now, actor=actor.actor, action="token.create",
                 target=f"token:{principal.token_id}", after={"scope": scope, "name": name})
    return principal, secret


def authenticate(conn: Connection, secret: str | None) -> Principal:
    """The principal behind a bearer secret.

    Raises:
        Unauthenticated: no secret, or an unknown or revoked one.
    """
    if not secret:
        raise Unauthenticated("missing token: send 'Authorization: Bearer <token>'")
    digest = hash_secret(secret)
    row = conn.execute(select(tables.tokens).where(
        tables.tokens.c.secret_sha256 == digest)).first()
    # compare again in constant time: the index lookup is by digest, not by secret
    if row is None or not hmac.compare_digest(row.secret_sha256, digest):
        raise Unauthenticated("invalid token")
    if row.revoked_at is not None:
        raise Unauthenticated("token revoked")
    return Principal(row.id, row.name, row.scope, row.device_id)


def require(principal: Principal, scope: str) -> None:
    """Check that ``principal`` may act with ``scope``.

    Raises:
        Forbidden: the principal's scope is lower, or a device token on an admin route.
    """
    if principal.scope == "device" or _RANK.get(principal.scope, 0) < _RANK[scope]:
        raise Forbidden(f"this needs a {scope!r} token; yours is {principal.scope!r}")


def revoke_token(conn: Connection, token_id: str, now: int) -> None:
    """Revoke a token by id.

    Raises:
        NotFound: no such token.
    """
    done = conn.execute(update(tables.tokens).where(tables.tokens.c.id == token_id)
                        .values(revoked_at=now))
    if done.rowcount == 0:
        raise NotFound(f"token {token_id!r} not found")

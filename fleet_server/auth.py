"""API tokens: random secrets shown once, stored as sha256 only, scoped, revocable.

Scopes nest: ``admin`` ⊇ ``publisher`` ⊇ ``reader``. ``device`` tokens belong to one device
and may only read TUF metadata and targets. Token secrets look like ``ef_<scope>_<random>``
so a leaked one is recognisable by secret scanners.

:class:`TokenCache` remembers, for a few seconds, which principal a bearer secret belongs to, so
the hot read-only routes (every device reads TUF metadata and targets on every update) do not
hit the database per request. Revocation still takes effect at once in this process:

- an entry is keyed by the secret's sha256 (the secret itself is never kept) and expires
  ``ttl_s`` after it was read from the database;
- revoking (:func:`revoke_token`, or a device revoke in :mod:`fleet_server.registry.devices`)
  tells the cache *inside* the revoking transaction, before its commit. From then on the cache
  neither answers for that token (or device) nor stores it again: every request goes to the
  database, which says "valid" until the commit and "revoked" after it. Nothing read before
  the commit can be stored afterwards, because storing re-checks the revoked set under the
  same lock. A revoke that rolls back only costs that token its cache;
- a revocation this process did not perform (another server replica, a direct database edit)
  takes effect here within ``ttl_s``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Connection, Engine, insert, select, update

from fleet_server import audit
from fleet_server.db import tables
from fleet_server.db.engine import reading
from fleet_server.errors import Forbidden, InvalidInput, NotFound, Unauthenticated

__all__ = [
    "SCOPES",
    "Principal",
    "TokenCache",
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


def _bearer(secret: str | None) -> str:
    if not secret:
        raise Unauthenticated("missing token: send 'Authorization: Bearer <token>'")
    return secret


def authenticate(conn: Connection, secret: str | None) -> Principal:
    """The principal behind a bearer secret.

    Raises:
        Unauthenticated: no secret, or an unknown or revoked one.
    """
    digest = hash_secret(_bearer(secret))
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


def revoke_token(conn: Connection, token_id: str, now: int,
                 cache: TokenCache | None = None) -> None:
    """Revoke a token by id; ``cache`` (the server's) stops answering for it at once.

    Raises:
        NotFound: no such token.
    """
    if cache is not None:  # before the commit: see the module docstring
        cache.revoke(token_id=token_id)
    done = conn.execute(update(tables.tokens).where(tables.tokens.c.id == token_id)
                        .values(revoked_at=now))
    if done.rowcount == 0:
        raise NotFound(f"token {token_id!r} not found")


class TokenCache:
    """Principals of bearer secrets seen in the last ``ttl_s`` seconds (thread-safe).

    See the module docstring for why revocation stays immediate. Only principals the database
    confirmed are stored (an unknown secret is never cached), so the size is bounded by the
    live tokens in use, and by ``max_entries`` (expired entries go first, then the oldest).
    """

    def __init__(self, *, ttl_s: float = 5.0, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s < 0 or max_entries < 1:
            raise ValueError(f"TokenCache: expected ttl_s >= 0 and max_entries >= 1, got "
                             f"{ttl_s} and {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, Principal]] = {}  # digest -> (expiry, principal)
        self._revoked_tokens: set[str] = set()
        self._revoked_devices: set[str] = set()
        self.hits = 0
        self.misses = 0

    def _usable(self, principal: Principal) -> bool:
        return principal.token_id not in self._revoked_tokens and (
            principal.device_id is None or principal.device_id not in self._revoked_devices)

    def get(self, secret: str) -> Principal | None:
        """The principal cached for ``secret``, or ``None`` (ask the database)."""
        digest = hash_secret(secret)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None and entry[0] > self._clock() and self._usable(entry[1]):
                self.hits += 1
                return entry[1]
            if entry is not None:
                del self._entries[digest]
            self.misses += 1
        return None

    def put(self, secret: str, principal: Principal) -> None:
        """Remember that the database just said ``secret`` is ``principal`` (unless revoked
        meanwhile)."""
        digest = hash_secret(secret)
        with self._lock:
            if not self._usable(principal) or self.ttl_s == 0:
                return
            now = self._clock()
            if len(self._entries) >= self.max_entries and digest not in self._entries:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                while len(self._entries) >= self.max_entries:  # oldest first (insertion order)
                    del self._entries[next(iter(self._entries))]
            self._entries[digest] = (now + self.ttl_s, principal)

    def revoke(self, *, token_id: str | None = None, device_id: str | None = None) -> None:
        """Stop answering for this token, or for every token of this device, from now on."""
        with self._lock:
            if token_id is not None:
                self._revoked_tokens.add(token_id)
            if device_id is not None:
                self._revoked_devices.add(device_id)
            self._entries = {k: v for k, v in self._entries.items() if self._usable(v[1])}

    def authenticate(self, engine: Engine, secret: str | None) -> Principal:
        """:func:`authenticate`, answered from the cache when it can, else from the database
        in a read-only transaction (no write lock).

        Raises:
            Unauthenticated: no secret, or an unknown or revoked one.
            StoreError: the database failed.
        """
        secret = _bearer(secret)
        cached = self.get(secret)
        if cached is not None:
            return cached
        with reading(engine) as conn:
            principal = authenticate(conn, secret)
        self.put(secret, principal)
        return principal

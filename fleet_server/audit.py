"""The audit log: append-only and hash-chained, so an edited or deleted row shows.

Each row's ``hash`` is sha256 over the previous row's hash and this row's canonical content.
:func:`verify_chain` recomputes the chain and names the first row that does not fit.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select

from fleet_server.db import tables

__all__ = ["GENESIS", "AuditEntry", "entries", "record", "verify_chain"]

GENESIS = "0" * 64


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: int
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    prev_hash: str
    hash: str


def _digest(prev: str, at: int, actor: str, action: str, target: str, before: str | None,
            after: str | None) -> str:
    body = json.dumps([prev, at, actor, action, target, before, after], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


def record(conn: Connection, *, at: int, actor: str, action: str, target: str,
           before: Any = None, after: Any = None) -> str:
    """Append one entry inside the caller's transaction; return its hash."""
    last = conn.execute(select(tables.audit.c.hash).order_by(tables.audit.c.id.desc())
                        .limit(1)).scalar()
    prev = last or GENESIS
    b, a = _dump(before), _dump(after)
    digest = _digest(prev, at, actor, action, target, b, a)
    conn.execute(insert(tables.audit).values(at=at, actor=actor, action=action, target=target,
                                             before=b, after=a, prev_hash=prev, hash=digest))
    return digest


def entries(conn: Connection, *, after_id: int = 0, limit: int = 100) -> list[AuditEntry]:
    rows = conn.execute(select(tables.audit).where(tables.audit.c.id > after_id)
                        .order_by(tables.audit.c.id).limit(limit)).all()
    return [AuditEntry(r.id, r.at, r.actor, r.action, r.target,
                       None if r.before is None else json.loads(r.before),
                       None if r.after is None else json.loads(r.after), r.prev_hash, r.hash)
            for r in rows]


def count(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(tables.audit)).scalar() or 0)


def verify_chain(conn: Connection) -> int | None:
    """Recompute the chain; return the id of the first row that breaks it, or None if intact."""
    prev = GENESIS
    for r in conn.execute(select(tables.audit).order_by(tables.audit.c.id)):
        want = _digest(prev, r.at, r.actor, r.action, r.target, r.before, r.after)
        if r.prev_hash != prev or r.hash != want:
            return int(r.id)
        prev = r.hash
    return None

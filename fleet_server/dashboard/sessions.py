"""Dashboard sessions: a random id in an HttpOnly cookie, everything else on the server.

Why not put the token in the cookie: a browser's cookie jar, proxies' logs and crash dumps
would then hold a bearer secret for the whole admin API. The cookie holds only a random
session id (256 bits); the store keeps the sha256 of that id (so a dump of the store cannot be
replayed as cookies) with the token's *id*, name and scope - never its secret.

Every request re-reads the token's row (see ``pages``), so revoking the token ends its sessions
at once; logout deletes the session here, so a copied cookie dies with it. Sessions expire
``ttl_s`` after login (absolute, not sliding: a forgotten tab does not stay signed in for ever).

The store is in memory: a server restart signs everyone out, and several server replicas do
not share sessions (put sticky sessions in front, or sign in on each). It holds at most
``max_sessions``: when full, expired sessions go first, then the oldest.

Pure apart from ``secrets``: the caller passes ``now`` (the fleet's injected clock).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass

__all__ = ["Session", "SessionStore"]


@dataclass(frozen=True)
class Session:
    token_id: str
    name: str
    scope: str
    created_at: int  # unix seconds
    expires_at: int  # unix seconds

    @property
    def actor(self) -> str:
        """As :attr:`fleet_server.auth.Principal.actor`."""
        return f"{self.scope}:{self.name}"


def _key(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8")).hexdigest()


class SessionStore:
    """Thread-safe (pages run on the server's thread pool)."""

    def __init__(self, *, ttl_s: int, max_sessions: int = 10_000) -> None:
        if ttl_s < 60:
            raise ValueError(f"session ttl_s: expected >= 60 seconds, got {ttl_s}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions: expected >= 1, got {max_sessions}")
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}  # sha256(session id) -> session, oldest first

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def create(self, *, token_id: str, name: str, scope: str, now: int) -> tuple[str, Session]:
        """A new session; returns its id (for the cookie, shown only here) and the session."""
        session = Session(token_id, name, scope, now, now + self.ttl_s)
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                self._prune(now)
            while len(self._sessions) >= self.max_sessions:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[_key(session_id)] = session
        return session_id, session

    def get(self, session_id: str | None, now: int) -> Session | None:
        """The live session behind a cookie value; an expired one is dropped."""
        if not session_id:
            return None
        key = _key(session_id)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and now >= session.expires_at:
                del self._sessions[key]
                return None
            return session

    def delete(self, session_id: str | None) -> bool:
        """End a session (logout); False when there was none."""
        if not session_id:
            return False
        with self._lock:
            return self._sessions.pop(_key(session_id), None) is not None

    def end_token(self, token_id: str) -> int:
        """End every session of a token (found revoked); returns how many."""
        with self._lock:
            keys = [k for k, s in self._sessions.items() if s.token_id == token_id]
            for k in keys:
                del self._sessions[k]
        return len(keys)

    def _prune(self, now: int) -> None:
        for key in [k for k, s in self._sessions.items() if now >= s.expires_at]:
            del self._sessions[key]

"""The server's data directory and the context every operation runs in.

Layout of ``--data-dir`` (index of on-disk files; cf. STYLE rule 6)::

    datadir.json          layout version, created_at                      (since 1)
    fleet.db              SQLite database, WAL (unless database_url is set) (since 1)
    tuf/                  TUF repository: keys/ (0700, 0600 PEMs) and public/ (served)
    director/key.pem      Ed25519 key signing desired states (0600)       (since 1)
    director/public.pem   its public half, copied into provisioning files (since 1)
    uploads/              bundle uploads being received (0700; each deleted after its push)

:class:`Fleet` bundles the engine, the TUF repository, the director key, the device profiles,
the injected clock and the token cache (:class:`~fleet_server.auth.TokenCache`). It is built
once (``open_fleet``) and passed explicitly; nothing here is global.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Engine

from agent.protocol.profiles import DeviceProfile, ProfileError, load_profiles
from fleet_server.auth import TokenCache
from fleet_server.db import atomic, make_engine, migrate
from fleet_server.errors import Conflict, InvalidInput, StoreError
from fleet_server.settings import Settings
from fleet_server.tuf_repo import TufRepository

__all__ = ["LAYOUT_VERSION", "Fleet", "Publisher", "init_data_dir", "load_director_key",
           "open_fleet", "server_mqtt_secret"]

LAYOUT_VERSION = 1


class Publisher(Protocol):
    """Where signed desired states go (the MQTT link in production, a recorder in tests)."""

    def publish_desired(self, device_id: str, envelope: bytes) -> None: ...

    def publish_ack(self, device_id: str, payload: bytes) -> None: ...


@dataclass
class Fleet:
    settings: Settings
    engine: Engine
    repo: TufRepository
    director_key: Any  # Ed25519PrivateKey
    director_public_pem: str
    profiles: dict[str, DeviceProfile]
    clock: Callable[[], float] = time.time
    publisher: Publisher | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    #: bearer secret -> principal for a few seconds (the TUF routes; see fleet_server.auth)
    tokens: TokenCache = field(default_factory=TokenCache)

    def now(self) -> int:
        return int(self.clock())

    def now_dt(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), tz=dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def server_mqtt_secret(data_dir: Path) -> str:
    """The server's MQTT password from ``<data_dir>/mqtt/server.secret``, created if absent.

    Only its hash ever reaches a broker's password file; the file itself is 0600.

    Raises:
        StoreError: the file is readable by others, empty, or cannot be read/written.
    """
    import secrets as _secrets

    path = data_dir / "mqtt" / "server.secret"
    try:
        if not path.exists():
            # another process may create it first: then read theirs below
            with contextlib.suppress(FileExistsError):
                _write_private(path, (_secrets.token_urlsafe(32) + "\n").encode())
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StoreError(f"{path} is readable by others (mode {mode:o}); expected 0600")
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise StoreError(f"cannot read or create {path}: {exc}") from exc
    if not secret:
        raise StoreError(f"{path} is empty; delete it to have a new password generated")
    return secret


def load_director_key(data_dir: Path) -> tuple[Any, str]:
    """The director's private key and public PEM.

    Raises:
        StoreError: missing, unreadable, or readable by others.
    """
    from cryptography.hazmat.primitives import serialization

    path = data_dir / "director" / "key.pem"
    try:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise StoreError(f"{path} is readable by others (mode {mode:o}); expected 0600")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        public = (data_dir / "director" / "public.pem").read_text()
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot load the director key {path}: {exc}") from exc
    return key, public


def init_data_dir(settings: Settings, *, clock: Callable[[], float] = time.time) -> str:
    """Create the data directory: database, TUF repository, director key, first admin token.

    Returns the first admin token's secret (shown once; only its hash is stored).

    Raises:
        Conflict: the data directory already holds a fleet (never overwritten).
        StoreError: the directory or the database cannot be created.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fleet_server import audit, auth

    data_dir = settings.data_dir
    if (data_dir / "datadir.json").exists() or (data_dir / "tuf").exists():
        raise Conflict(f"{data_dir} already holds a fleet; refusing to overwrite it (use "
                       "another --data-dir, or delete it yourself if you mean it)")
    if data_dir.exists() and any(data_dir.iterdir()):
        raise Conflict(f"{data_dir} is not empty; expected a new or empty directory")
    now = int(clock())
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        TufRepository.create(data_dir / "tuf",
                             now=dt.datetime.fromtimestamp(now, tz=dt.UTC))
        key = Ed25519PrivateKey.generate()
        _write_private(data_dir / "director" / "key.pem", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (data_dir / "director" / "public.pem").write_bytes(key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        engine = make_engine(settings.db_url)
        migrate(engine, clock)
        with atomic(engine) as conn:
            principal, secret = auth.create_token(conn, name="initial-admin", scope="admin",
                                                  now=now)
            audit.record(conn, at=now, actor="fleet_server init", action="token.create",
                         target=f"token:{principal.token_id}",
                         after={"scope": "admin", "name": principal.name})
        engine.dispose()
        (data_dir / "datadir.json").write_text(json.dumps(
            {"layout_version": LAYOUT_VERSION, "created_at": now}) + "\n")
    except OSError as exc:
        raise StoreError(f"cannot create the data directory {data_dir}: {exc}") from exc
    return secret


def open_fleet(settings: Settings, *, clock: Callable[[], float] = time.time,
               publisher: Publisher | None = None,
               profiles_dir: Path | None = None) -> Fleet:
    """Open an initialised data directory (migrating the database if needed).

    Raises:
        StoreError: not initialised, or unreadable.
        InvalidInput: a device profile file is malformed.
    """
    data_dir = settings.data_dir
    marker = data_dir / "datadir.json"
    if not marker.is_file():
        raise StoreError(f"{data_dir} is not a fleet data directory (no datadir.json); run "
                         f"`fleet_server init --data-dir {data_dir}` first")
    layout = json.loads(marker.read_text()).get("layout_version")
    if layout != LAYOUT_VERSION:
        raise StoreError(f"{marker}: layout version {layout}, this server reads "
                         f"{LAYOUT_VERSION}")
    if profiles_dir is None:
        from device_profiles import PROFILE_DIR

        profiles_dir = Path(os.environ.get("EDGEFLEET_PROFILES") or PROFILE_DIR)
    try:
        profiles = load_profiles(profiles_dir)
    except ProfileError as exc:
        raise InvalidInput(str(exc)) from exc
    engine = make_engine(settings.db_url)
    migrate(engine, clock)
    key, public = load_director_key(data_dir)
    repo = TufRepository.open(data_dir / "tuf")
    return Fleet(settings=settings, engine=engine, repo=repo, director_key=key,
                 director_public_pem=public, profiles=profiles, clock=clock,
                 publisher=publisher)

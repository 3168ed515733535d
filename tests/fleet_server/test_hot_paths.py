"""The server's hot paths during a rollout, and that their shortcuts keep their guarantees.

- :class:`~fleet_server.auth.TokenCache`: a revoked token is refused at once, also while the
  cache holds it (device revoke through the API, ``revoke_token``, and a request that read the
  database before the revoke committed); entries expire after the TTL (injected clock);
  unknown secrets are never cached.
- :func:`~fleet_server.db.engine.reading`: a read-only transaction does not wait for a writer
  holding SQLite's write lock, and sees the last committed snapshot.
- :class:`~fleet_server.tuf_repo.served.ServedFiles` and the ``/tuf`` routes: files are read
  from disk once, then served from memory while unchanged on disk; a replaced file is served
  new at once; large targets are streamed.

Real SQLite files, the real app under ``TestClient``, a real TUF repository.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, select, update

from agent.protocol.provisioning import Provisioning
from fleet_server import auth
from fleet_server.api.app import create_app
from fleet_server.auth import Principal, TokenCache
from fleet_server.db import atomic, tables
from fleet_server.db.engine import make_engine, migrate, reading
from fleet_server.errors import Unauthenticated
from fleet_server.fleet import Fleet, init_data_dir
from fleet_server.settings import Settings
from fleet_server.tuf_repo.served import ServedFiles

NOW = 1_800_000_000


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------------ token cache
P_DEV = Principal("tok-1", "pi-1", "device", "pi-1")
P_ADMIN = Principal("tok-2", "ops", "admin")


def test_cache_answers_within_the_ttl_then_asks_again() -> None:
    clock = Clock()
    cache = TokenCache(ttl_s=5.0, clock=clock)
    assert cache.get("ef_device_a") is None
    cache.put("ef_device_a", P_DEV)
    clock.t = 4.9
    assert cache.get("ef_device_a") == P_DEV
    clock.t = 5.0  # a revocation made elsewhere (another replica) takes effect by now
    assert cache.get("ef_device_a") is None
    assert (cache.hits, cache.misses) == (1, 2)


def test_cache_refuses_revoked_tokens_and_devices_even_if_stored_later() -> None:
    cache = TokenCache(ttl_s=60.0, clock=Clock())
    cache.put("ef_device_a", P_DEV)
    cache.put("ef_admin_b", P_ADMIN)
    cache.revoke(device_id="pi-1")
    assert cache.get("ef_device_a") is None
    assert cache.get("ef_admin_b") == P_ADMIN  # another principal is unaffected
    # a request that read the database before the revoke committed stores what it read:
    # the cache must not keep it
    cache.put("ef_device_a", P_DEV)
    assert cache.get("ef_device_a") is None
    cache.revoke(token_id="tok-2")
    assert cache.get("ef_admin_b") is None
    cache.put("ef_admin_b", P_ADMIN)
    assert cache.get("ef_admin_b") is None


def test_cache_is_bounded_expired_first_then_oldest() -> None:
    clock = Clock()
    cache = TokenCache(ttl_s=10.0, max_entries=2, clock=clock)
    cache.put("s1", Principal("t1", "a", "reader"))
    clock.t = 6.0
    cache.put("s2", Principal("t2", "b", "reader"))
    clock.t = 11.0  # s1 expired, s2 not
    cache.put("s3", Principal("t3", "c", "reader"))
    assert cache.get("s2") is not None and cache.get("s3") is not None
    cache.put("s4", Principal("t4", "d", "reader"))  # full, nothing expired: s2 goes
    assert cache.get("s2") is None
    assert cache.get("s3") is not None and cache.get("s4") is not None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ttl_s": -1.0}, "ttl_s >= 0"), ({"max_entries": 0}, "max_entries >= 1")],
    ids=["negative-ttl", "no-room"])
def test_cache_rejects_nonsense_settings(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TokenCache(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[object]:
    eng = make_engine(f"sqlite:///{tmp_path / 'fleet.db'}")
    migrate(eng, lambda: NOW)
    yield eng
    eng.dispose()


def test_authenticate_through_the_cache_and_revoke_token(engine: object) -> None:
    cache = TokenCache(ttl_s=60.0, clock=Clock())
    with atomic(engine) as conn:  # type: ignore[arg-type]
        principal, secret = auth.create_token(conn, name="ci", scope="reader", now=NOW)
    assert cache.authenticate(engine, secret) == principal  # type: ignore[arg-type]
    assert cache.authenticate(engine, secret) == principal  # type: ignore[arg-type]
    assert (cache.hits, cache.misses) == (1, 1)
    with atomic(engine) as conn:  # type: ignore[arg-type]
        auth.revoke_token(conn, principal.token_id, NOW, cache)
    with pytest.raises(Unauthenticated, match="revoked"):
        cache.authenticate(engine, secret)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated, match="missing token"):
        cache.authenticate(engine, None)  # type: ignore[arg-type]
    for _ in range(2):  # an unknown secret is never cached: the database says no each time
        with pytest.raises(Unauthenticated, match="invalid token"):
            cache.authenticate(engine, "ef_reader_nope")  # type: ignore[arg-type]
    assert cache.get("ef_reader_nope") is None


# ------------------------------------------------------------------------------ reading()
def test_reading_does_not_wait_for_a_writer_and_sees_the_committed_snapshot(
        engine: object) -> None:
    with atomic(engine) as conn:  # type: ignore[arg-type]
        conn.execute(insert(tables.tokens).values(id="t0", name="before", scope="reader",
                                                  secret_sha256="0" * 64, created_at=NOW))
    seen: list[list[str]] = []

    def read() -> None:
        with reading(engine) as rconn:  # type: ignore[arg-type]
            seen.append(list(rconn.execute(select(tables.tokens.c.name)).scalars()))

    with atomic(engine) as conn:  # the writer holds the write lock (BEGIN IMMEDIATE) ...
        conn.execute(update(tables.tokens).values(name="uncommitted"))
        reader = threading.Thread(target=read)
        reader.start()
        reader.join(timeout=10)  # ... a reader taking that lock would wait out the 30 s timeout
        assert not reader.is_alive(), "reading() waited for the writer's lock"
    assert seen == [["before"]]


# ------------------------------------------------------------------------------ served files
def test_served_files_read_once_then_revalidate_by_stat(tmp_path: Path) -> None:
    served = ServedFiles(max_file_bytes=1000, max_total_bytes=2000)
    path = tmp_path / "timestamp.json"
    path.write_bytes(b"v1")
    assert served.cached(path) is None
    assert served.load(path) == b"v1"
    assert served.cached(path) == b"v1" and served.reads == 1
    new = tmp_path / ".tmp"
    new.write_bytes(b"v2")
    os.replace(new, path)  # how the repository writes metadata: a new inode
    assert served.cached(path) is None
    assert served.load(path) == b"v2" and served.reads == 2
    with pytest.raises(FileNotFoundError):
        served.cached(tmp_path / "missing.json")


def test_served_files_are_bounded(tmp_path: Path) -> None:
    served = ServedFiles(max_file_bytes=1000, max_total_bytes=2000)
    files = {}
    for name, size in (("a", 900), ("b", 900), ("big", 1500), ("c", 900)):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode() * size)
    assert served.load(files["big"]) == b"big" * 1500  # read, but too large to keep
    assert served.cached(files["big"]) is None
    served.load(files["a"])
    served.load(files["b"])
    assert served.cached(files["a"]) is not None  # a is now the most recently served
    served.load(files["c"])  # over 2000 bytes: the least recently served (b) goes
    assert served.cached(files["b"]) is None
    assert served.cached(files["a"]) is not None and served.cached(files["c"]) is not None
    with pytest.raises(ValueError, match="max_file_bytes <= max_total_bytes"):
        ServedFiles(max_file_bytes=10, max_total_bytes=5)


# ------------------------------------------------------------------------------ /tuf routes
@dataclass
class Server:
    client: TestClient
    admin: str

    def get(self, url: str, token: str) -> tuple[int, bytes]:
        r = self.client.get(url, headers={"Authorization": f"Bearer {token}"})
        return r.status_code, r.content

    @property
    def fleet(self) -> Fleet:
        fleet: Fleet = self.client.app.state.fleet  # type: ignore[attr-defined]
        return fleet

    def device(self, device_id: str) -> str:
        r = self.client.post("/v1/devices", json={"id": device_id, "profile": "rpi4"},
                             headers={"Authorization": f"Bearer {self.admin}"})
        assert r.status_code == 201, r.text
        return Provisioning.from_dict(r.json()["provisioning"]).http_token


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    settings = Settings(data_dir=tmp_path / "data")
    admin = init_data_dir(settings, clock=lambda: NOW)
    with TestClient(create_app(settings, clock=lambda: NOW)) as client:
        yield Server(client, admin)


def test_tuf_routes_use_the_token_cache_and_refuse_a_revoked_device_at_once(
        server: Server) -> None:
    token = server.device("pi-1")
    cache = server.fleet.tokens
    for _ in range(3):
        assert server.get("/tuf/metadata/timestamp.json", token)[0] == 200
    assert cache.hits >= 2  # the database was asked once for three requests
    r = server.client.post("/v1/devices/pi-1/revoke",
                           headers={"Authorization": f"Bearer {server.admin}"})
    assert r.status_code == 200, r.text
    status, body = server.get("/tuf/metadata/timestamp.json", token)
    assert status == 401 and b"revoked" in body
    assert server.get("/tuf/metadata/timestamp.json", server.admin)[0] == 200


def test_tuf_metadata_comes_from_memory_until_it_changes_on_disk(server: Server) -> None:
    token = server.device("pi-1")
    served = server.fleet.repo.served
    reads = served.reads
    first = [server.get("/tuf/metadata/timestamp.json", token) for _ in range(3)]
    assert served.reads == reads + 1  # read from disk once
    assert {f for f in first} == {(200, first[0][1])}
    assert first[0][1] == (server.fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    import datetime as dt

    # far enough ahead that the timestamp is due: the repository writes a new file
    later = dt.datetime.fromtimestamp(NOW, tz=dt.UTC) + dt.timedelta(days=30)
    assert server.fleet.repo.refresh_timestamp(later)
    status, body = server.get("/tuf/metadata/timestamp.json", token)
    assert status == 200 and body != first[0][1]
    assert body == (server.fleet.repo.metadata_dir / "timestamp.json").read_bytes()


def test_tuf_targets_are_served_whole_from_memory_or_streamed_when_large(
        server: Server, tmp_path: Path) -> None:
    token = server.device("pi-1")
    repo = server.fleet.repo
    import datetime as dt

    now = dt.datetime.fromtimestamp(NOW, tz=dt.UTC)
    small, large = os.urandom(3000), os.urandom(20_000)
    for name, data in (("small.bin", small), ("large.bin", large)):
        (tmp_path / name).write_bytes(data)
        repo.add_target(f"models/x/1/rpi4/{name}", tmp_path / name, now=now)
    repo.served.max_file_bytes = 10_000
    for name, data in (("small.bin", small), ("large.bin", large)):
        digest = hashlib.sha256(data).hexdigest()
        url = f"/tuf/targets/models/x/1/rpi4/{digest}.{name}"
        assert server.get(url, token) == (200, data)
        assert server.get(url, token) == (200, data)
        cached = repo.served.cached(repo.targets_dir / "models/x/1/rpi4" / f"{digest}.{name}")
        assert (cached == data) if name == "small.bin" else cached is None
    assert server.get("/tuf/targets/models/x/1/rpi4/nope.bin", token)[0] == 404
    assert server.get("/tuf/metadata/timestamp.json", "ef_device_nope")[0] == 401

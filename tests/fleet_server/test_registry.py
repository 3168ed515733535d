"""Library-level tests of the registry, the deployment planner and service, auth and the audit log.

The planner is pure and tested with plain values. The service runs on a real SQLite file in a
fresh data dir with a fixed clock and a recording publisher; artifacts are inserted as rows
(publishing real bundles is the API tests' job).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, delete, insert, select, update

from agent.protocol.messages import DesiredModel
from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from fleet_server import audit, auth
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.deploy import service
from fleet_server.deploy.plan import (
    ArtifactView,
    DeploymentView,
    DeviceView,
    Selector,
    StoredDesired,
    compute_desired,
    matches,
    missing_artifacts,
    needs_new_state,
    targeted,
)
from fleet_server.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    Unauthenticated,
)
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.registry import devices, models
from fleet_server.settings import Settings

T0 = 1_800_000_000
ADMIN = Principal("tok-admin", "tester", "admin")


# ------------------------------------------------------------------------------ planner (pure)
PI = DeviceView("pi-1", "rpi4", frozenset({"lab", "edge"}))
PI2 = DeviceView("pi-2", "rpi4", frozenset({"lab"}))
NUC = DeviceView("nuc-1", "x86-generic", frozenset({"edge"}))

MATCH_ROWS = [
    ("all-matches-everything", Selector(all=True), NUC, True),
    ("device-listed", Selector(devices=("pi-1", "nuc-1")), PI, True),
    ("device-not-listed", Selector(devices=("nuc-1",)), PI, False),
    ("one-tag", Selector(tags=("lab",)), PI2, True),
    ("every-tag-required", Selector(tags=("lab", "edge")), PI2, False),
    ("every-tag-present", Selector(tags=("lab", "edge")), PI, True),
    ("profile-in-list", Selector(profiles=("rpi4", "rpi5")), PI, True),
    ("profile-not-in-list", Selector(profiles=("rpi5",)), PI, False),
    ("criteria-intersect-id-but-wrong-profile",
     Selector(devices=("pi-1", "nuc-1"), profiles=("x86-generic",)), PI, False),
    ("criteria-intersect-all-hold",
     Selector(devices=("pi-1", "nuc-1"), profiles=("x86-generic",)), NUC, True),
    ("criteria-intersect-tag-and-profile", Selector(tags=("edge",), profiles=("rpi4",)), NUC,
     False),
    ("all-overrides-other-criteria", Selector(devices=("nobody",), all=True), PI, True),
]


@pytest.mark.parametrize(("selector", "device", "expected"), [r[1:] for r in MATCH_ROWS],
                         ids=[r[0] for r in MATCH_ROWS])
def test_selector_matches(selector: Selector, device: DeviceView, expected: bool) -> None:
    assert matches(selector, device) is expected


def test_selector_must_select_something_and_round_trips() -> None:
    with pytest.raises(ValueError, match="empty selector"):
        Selector()
    with pytest.raises(ValueError, match=r"selector\.tags"):
        Selector.from_dict({"tags": "lab"})
    sel = Selector(devices=("a",), tags=("t",), profiles=("rpi4",))
    assert Selector.from_dict(sel.to_dict()) == sel
    assert [d.id for d in targeted(Selector(tags=("edge",)), [PI, PI2, NUC])] == ["pi-1", "nuc-1"]


def _art(name: str, version: str, profile: str) -> ArtifactView:
    base = f"models/{name}/{version}/{profile}"
    digest = hashlib.sha256(base.encode()).hexdigest()
    return ArtifactView(name, version, profile, digest, 100, f"{base}/model.onnx",
                        f"{base}/manifest.json")


ARTS = {(a.name, a.version, a.profile): a for a in [
    _art("det", "1", "rpi4"), _art("det", "1", "x86-generic"),
    _art("det", "2", "rpi4"), _art("det", "2", "x86-generic"),
    _art("cls", "1", "rpi4"),
]}


def _versions(desired: dict[str, tuple[DesiredModel, ...]]) -> dict[str, list[tuple[str, str]]]:
    return {d: [(m.name, m.version) for m in ms] for d, ms in desired.items()}


def test_newer_deployment_supersedes_per_device_not_wholesale() -> None:
    deps = [DeploymentView(1, "det", "1", Selector(all=True)),
            DeploymentView(2, "det", "2", Selector(tags=("edge",)))]
    assert _versions(compute_desired([PI, PI2, NUC], deps, ARTS)) == {
        "pi-1": [("det", "2")], "pi-2": [("det", "1")], "nuc-1": [("det", "2")]}
    # the order the deployments come in does not matter: the higher id is newer
    assert compute_desired([PI, PI2, NUC], deps[::-1], ARTS) == compute_desired(
        [PI, PI2, NUC], deps, ARTS)


def test_models_are_independent_and_sorted_and_profile_specific() -> None:
    deps = [DeploymentView(1, "det", "1", Selector(all=True)),
            DeploymentView(2, "cls", "1", Selector(all=True))]
    desired = compute_desired([PI, NUC], deps, ARTS)
    assert _versions(desired) == {"pi-1": [("cls", "1"), ("det", "1")],
                                  "nuc-1": [("det", "1")]}  # no cls artifact for x86: skipped
    assert {m.profile for m in desired["nuc-1"]} == {"x86-generic"}
    assert desired["pi-1"][1] == ARTS[("det", "1", "rpi4")].desired()


def test_missing_artifacts_lists_devices_by_profile() -> None:
    assert missing_artifacts("cls", "1", [PI, PI2, NUC], ARTS) == {"x86-generic": ["nuc-1"]}
    assert missing_artifacts("det", "2", [PI, NUC], ARTS) == {}
    assert missing_artifacts("det", "9", [PI, NUC], ARTS) == {"rpi4": ["pi-1"],
                                                              "x86-generic": ["nuc-1"]}


_M = (ARTS[("det", "1", "rpi4")].desired(),)
NEEDS_ROWS = [
    ("never-signed-nothing-assigned", None, (), T0, False),
    ("never-signed-assigned", None, _M, T0, True),
    ("unchanged-far-from-expiry", StoredDesired(3, _M, T0 + 1000), _M, T0, False),
    ("unchanged-within-margin", StoredDesired(3, _M, T0 + 50), _M, T0, True),
    ("unchanged-at-margin", StoredDesired(3, _M, T0 + 100), _M, T0 + 0, True),
    ("models-changed", StoredDesired(3, _M, T0 + 1000), (), T0, True),
]


@pytest.mark.parametrize(("stored", "models_", "now", "expected"), [r[1:] for r in NEEDS_ROWS],
                         ids=[r[0] for r in NEEDS_ROWS])
def test_needs_new_state(stored: StoredDesired | None, models_: tuple[DesiredModel, ...],
                         now: int, expected: bool) -> None:
    assert needs_new_state(stored, models_, now, refresh_margin=100) is expected


# ------------------------------------------------------------------------------ service (I/O)
class FixedClock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> float:
        return float(self.t)


@dataclass
class RecordingPublisher:
    """Thread-safe: publish_pending publishes from several threads at once."""

    desired: list[tuple[str, bytes]] = field(default_factory=list)
    fail_after: int | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        with self.lock:
            if self.fail_after is not None and len(self.desired) >= self.fail_after:
                raise BrokerError("broker down")
            self.desired.append((device_id, envelope))

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        pass


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    settings = Settings(data_dir=tmp_path / "data", desired_ttl_s=10_000,
                        desired_refresh_margin_s=1_000)
    clock = FixedClock(T0)
    init_data_dir(settings, clock=clock)
    f = open_fleet(settings, clock=clock, publisher=RecordingPublisher())
    yield f
    f.engine.dispose()


def _clock(fleet: Fleet) -> FixedClock:
    assert isinstance(fleet.clock, FixedClock)
    return fleet.clock


def _recorder(fleet: Fleet) -> RecordingPublisher:
    assert isinstance(fleet.publisher, RecordingPublisher)
    return fleet.publisher


def _add_artifact(conn: Connection, name: str, version: str, profile: str) -> None:
    a = _art(name, version, profile)
    conn.execute(insert(tables.artifacts).values(
        name=name, version=version, profile=profile, runtime="onnxruntime", precision="fp32",
        sha256=a.sha256, length=a.length, target_path=a.target_path,
        manifest_target=a.manifest_target, manifest=json.dumps({"task": "classification"}),
        created_at=T0, created_by="tok-admin"))


def _setup(fleet: Fleet, devs: dict[str, tuple[str, tuple[str, ...]]],
           arts: list[tuple[str, str, str]]) -> dict[str, Any]:
    provs = {}
    with atomic(fleet.engine) as conn:
        for key in arts:
            _add_artifact(conn, *key)
        for device_id, (profile, tags) in devs.items():
            provs[device_id] = devices.provision(fleet, conn, device_id=device_id,
                                                 profile=profile, tags=tags, actor=ADMIN)
    return provs


def _deploy(fleet: Fleet, model: str, version: str, selector: Selector) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        return service.deploy(fleet, conn, model=model, version=version, selector=selector,
                              actor=ADMIN)


def _cancel(fleet: Fleet, dep_id: int) -> dict[str, Any]:
    with atomic(fleet.engine) as conn:
        return service.cancel(fleet, conn, dep_id, actor=ADMIN)


def _states(fleet: Fleet) -> dict[str, tuple[int, list[str]]]:
    with atomic(fleet.engine) as conn:
        rows = conn.execute(select(tables.desired_states)).all()
    return {r.device_id: (r.sequence, [f"{m['name']}:{m['version']}"
                                       for m in json.loads(r.models)]) for r in rows}


DEVS = {"pi-1": ("rpi4", ("lab", "edge")), "pi-2": ("rpi4", ("lab",)),
        "nuc-1": ("x86-generic", ("edge",))}
ALL_ARTS = [("det", v, p) for v in ("1", "2") for p in ("rpi4", "x86-generic")]


def test_deploy_signs_states_and_publish_pending_sends_each_once(fleet: Fleet) -> None:
    provs = _setup(fleet, DEVS, ALL_ARTS)
    assert _states(fleet) == {}  # provisioned with nothing deployed: nothing signed
    out = _deploy(fleet, "det", "1", Selector(all=True))
    assert out["desired_changed"] == ["nuc-1", "pi-1", "pi-2"]
    assert _states(fleet) == {d: (1, ["det:1"]) for d in DEVS}
    assert service.publish_pending(fleet) == ["nuc-1", "pi-1", "pi-2"]
    assert service.publish_pending(fleet) == []
    keys = trusted_keys_from_pem([fleet.director_public_pem])
    for device_id, envelope in _recorder(fleet).desired:
        prov = provs[device_id].provisioning
        assert prov.director_keys_pem == (fleet.director_public_pem,)
        state = verify_desired(envelope, public_keys=keys, device_id=device_id,
                               last_sequence=0, now=T0)
        assert state.expires_at == T0 + 10_000
        assert state.models[0].profile == DEVS[device_id][0]


def test_cancel_falls_back_to_older_deployments_then_to_nothing(fleet: Fleet) -> None:
    _setup(fleet, DEVS, ALL_ARTS)
    dep1 = _deploy(fleet, "det", "1", Selector(all=True))
    dep2 = _deploy(fleet, "det", "2", Selector(devices=("pi-1",)))
    assert dep2["desired_changed"] == ["pi-1"]
    assert _states(fleet)["pi-1"] == (2, ["det:2"])
    assert _cancel(fleet, dep2["id"])["status"] == "cancelled"
    assert _states(fleet) == {"pi-1": (3, ["det:1"]), "pi-2": (1, ["det:1"]),
                              "nuc-1": (1, ["det:1"])}
    _cancel(fleet, dep1["id"])  # nothing left: every device is told to run nothing
    assert _states(fleet) == {"pi-1": (4, []), "pi-2": (2, []), "nuc-1": (2, [])}
    with pytest.raises(Conflict, match="cancelled, not active"):
        _cancel(fleet, dep1["id"])
    with pytest.raises(NotFound, match="deployment 99"):
        _cancel(fleet, 99)


def test_refresh_near_expiry_bumps_the_sequence_with_the_same_models(fleet: Fleet) -> None:
    _setup(fleet, DEVS, ALL_ARTS)
    _deploy(fleet, "det", "1", Selector(tags=("lab",)))
    assert _states(fleet) == {"pi-1": (1, ["det:1"]), "pi-2": (1, ["det:1"])}
    clock = _clock(fleet)
    clock.t = T0 + 10_000 - 1_000 - 1  # just outside the refresh margin
    with atomic(fleet.engine) as conn:
        assert service.refresh_desired(fleet, conn) == []
    clock.t += 1  # inside it
    with atomic(fleet.engine) as conn:
        assert service.refresh_desired(fleet, conn) == ["pi-1", "pi-2"]
    assert _states(fleet) == {"pi-1": (2, ["det:1"]), "pi-2": (2, ["det:1"])}
    with atomic(fleet.engine) as conn:
        row = conn.execute(select(tables.desired_states).where(
            tables.desired_states.c.device_id == "pi-1")).one()
    assert (row.issued_at, row.expires_at, row.published) == (clock.t, clock.t + 10_000, False)


def test_deploy_refuses_missing_artifacts_unknown_versions_and_empty_targets(
        fleet: Fleet) -> None:
    _setup(fleet, {**DEVS, "nuc-2": ("x86-generic", ("lab",))}, [("cls", "1", "rpi4")])
    with pytest.raises(Conflict) as err:
        _deploy(fleet, "cls", "1", Selector(tags=("lab",)))
    assert "profile x86-generic: nuc-2" in str(err.value) and "pi-1" not in str(err.value)
    with pytest.raises(NotFound, match="'cls' version '9'"):
        _deploy(fleet, "cls", "9", Selector(all=True))
    with pytest.raises(InvalidInput, match="matches no live device"):
        _deploy(fleet, "cls", "1", Selector(devices=("ghost",)))
    with atomic(fleet.engine) as conn:
        assert service.list_deployments(conn, limit=10) == ([], 0)
    assert _states(fleet) == {}


def test_later_provisioned_and_revoked_devices(fleet: Fleet) -> None:
    _setup(fleet, DEVS, ALL_ARTS)
    _deploy(fleet, "det", "1", Selector(tags=("edge",)))
    _setup(fleet, {"pi-3": ("rpi4", ("edge",))}, [])
    assert _states(fleet)["pi-3"] == (1, ["det:1"])  # signed in the provisioning transaction
    with atomic(fleet.engine) as conn:
        devices.revoke(fleet, conn, "pi-3", actor=ADMIN)
    with pytest.raises(InvalidInput):  # revoked devices are not live
        _deploy(fleet, "det", "2", Selector(devices=("pi-3",)))
    _deploy(fleet, "det", "2", Selector(tags=("edge",)))
    states = _states(fleet)
    assert states["pi-3"] == (1, ["det:1"]) and states["pi-1"] == (2, ["det:2"])


def test_publish_pending_stops_at_a_broker_error_and_resumes(fleet: Fleet) -> None:
    _setup(fleet, DEVS, ALL_ARTS)
    _deploy(fleet, "det", "1", Selector(all=True))
    recorder = _recorder(fleet)
    recorder.fail_after = 1
    first = service.publish_pending(fleet)  # publishes run concurrently: any one gets through
    assert first == [d for d, _ in recorder.desired] and len(first) == 1
    recorder.fail_after = None
    rest = service.publish_pending(fleet)
    assert sorted(first + rest) == sorted(DEVS)  # the rest, each exactly once
    assert sorted(d for d, _ in recorder.desired) == sorted(DEVS)
    assert service.publish_pending(fleet) == []


@dataclass
class RendezvousPublisher(RecordingPublisher):
    """Every publish waits until ``parties`` publishes are in flight together: one-at-a-time
    publishing breaks the barrier (BrokerError) instead of passing."""

    barrier: threading.Barrier = field(default_factory=lambda: threading.Barrier(3))

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        try:
            self.barrier.wait(timeout=30)
        except threading.BrokenBarrierError as exc:
            raise BrokerError("publishes did not overlap") from exc
        super().publish_desired(device_id, envelope)


def test_publish_pending_keeps_several_publishes_in_flight(fleet: Fleet) -> None:
    _setup(fleet, DEVS, ALL_ARTS)
    _deploy(fleet, "det", "1", Selector(all=True))
    fleet.publisher = publisher = RendezvousPublisher(barrier=threading.Barrier(len(DEVS)))
    assert len(DEVS) <= service.PUBLISH_CONCURRENCY
    assert service.publish_pending(fleet) == sorted(DEVS)
    assert sorted(d for d, _ in publisher.desired) == sorted(DEVS)
    with atomic(fleet.engine) as conn:  # marked published in the one transaction after
        assert conn.execute(select(tables.desired_states.c.published)).scalars().all() == [
            True] * len(DEVS)


# ------------------------------------------------------------------------------ registry
def test_device_registry_rules(fleet: Fleet) -> None:
    provs = _setup(fleet, DEVS, [])
    with atomic(fleet.engine) as conn:
        with pytest.raises(Conflict, match="already exists"):
            devices.provision(fleet, conn, device_id="pi-1", profile="rpi4", tags=(),
                              actor=ADMIN)
        for device_id, profile, tags in [("Pi_1", "rpi4", ()), ("pi-9", "toaster", ()),
                                         ("pi-9", "rpi4", ("no spaces",))]:
            with pytest.raises(InvalidInput):
                devices.provision(fleet, conn, device_id=device_id, profile=profile,
                                  tags=tags, actor=ADMIN)
        items, total = devices.list_devices(conn, limit=2, offset=0)
        assert total == 3 and [d["id"] for d in items] == ["nuc-1", "pi-1"]
        assert [d["id"] for d in devices.list_devices(conn, limit=10, tag="edge")[0]] == [
            "nuc-1", "pi-1"]
        assert devices.list_devices(conn, limit=10, profile="rpi4")[1] == 2
        assert devices.credential_hash(conn, "pi-1") is not None
    token = provs["pi-1"].provisioning.http_token
    with atomic(fleet.engine) as conn:
        assert auth.authenticate(conn, token).device_id == "pi-1"
        assert devices.revoke(fleet, conn, "pi-1", actor=ADMIN)["revoked"] is True
        with pytest.raises(Conflict, match="already revoked"):
            devices.revoke(fleet, conn, "pi-1", actor=ADMIN)
        with pytest.raises(NotFound):
            devices.revoke(fleet, conn, "ghost", actor=ADMIN)
        assert devices.credential_hash(conn, "pi-1") is None
        with pytest.raises(Unauthenticated, match="revoked"):
            auth.authenticate(conn, token)


def test_model_lookup_names_what_is_missing(fleet: Fleet) -> None:
    _setup(fleet, {}, [("det", "1", "rpi4"), ("det", "1", "x86-generic"), ("cls", "1", "rpi4")])
    with atomic(fleet.engine) as conn:
        with pytest.raises(NotFound, match=r"^model 'nope' not found"):
            models.get_version(conn, "nope", "1")
        with pytest.raises(NotFound, match="version '2' of model 'det'"):
            models.get_version(conn, "det", "2")
        got = models.get_version(conn, "det", "1")
        assert [a["profile"] for a in got["artifacts"]] == ["rpi4", "x86-generic"]
        items, total = models.list_models(conn, limit=10)
    assert total == 2 and {(i["name"], tuple(i["profiles"])) for i in items} == {
        ("cls", ("rpi4",)), ("det", ("rpi4", "x86-generic"))}


# ------------------------------------------------------------------------------ auth, audit
SCOPE_ROWS = [(have, need, ok) for have, needs in {
    "admin": {"admin": True, "publisher": True, "reader": True},
    "publisher": {"admin": False, "publisher": True, "reader": True},
    "reader": {"admin": False, "publisher": False, "reader": True},
    "device": {"admin": False, "publisher": False, "reader": False},
}.items() for need, ok in needs.items()]


@pytest.mark.parametrize(("have", "need", "ok"), SCOPE_ROWS,
                         ids=[f"{h}-needs-{n}" for h, n, _ in SCOPE_ROWS])
def test_scopes_nest(have: str, need: str, ok: bool) -> None:
    principal = Principal("t", "n", have, "pi-1" if have == "device" else None)
    if ok:
        auth.require(principal, need)
    else:
        with pytest.raises(Forbidden, match=f"needs a '{need}' token"):
            auth.require(principal, need)


def test_tokens_are_hashed_audited_and_checked(fleet: Fleet) -> None:
    with atomic(fleet.engine) as conn:
        principal, secret = auth.issue_token(conn, name="ci", scope="publisher", now=T0,
                                             actor=ADMIN)
        stored = conn.execute(select(tables.tokens.c.secret_sha256).where(
            tables.tokens.c.id == principal.token_id)).scalar()
        assert stored == auth.hash_secret(secret) and secret not in str(stored)
        assert secret.startswith("ef_publisher_")
        assert auth.authenticate(conn, secret) == principal
        last = audit.entries(conn, after_id=0, limit=100)[-1]
        assert (last.action, last.actor, last.after) == (
            "token.create", "admin:tester", {"scope": "publisher", "name": "ci"})
        for bad in (None, "", "ef_admin_nope"):
            with pytest.raises(Unauthenticated):
                auth.authenticate(conn, bad)
        with pytest.raises(InvalidInput, match="scope"):
            auth.create_token(conn, name="x", scope="root", now=T0)
        with pytest.raises(InvalidInput, match="device"):
            auth.create_token(conn, name="x", scope="device", now=T0)


def _record(conn: Connection, n: int) -> list[int]:
    for i in range(n):
        audit.record(conn, at=T0 + i, actor="admin:t", action="test.act", target=f"x:{i}",
                     before={"i": i}, after={"i": i + 1})
    return [e.id for e in audit.entries(conn, after_id=0, limit=1000)]


TAMPER_ROWS = [
    ("edit-actor", lambda conn, ids: conn.execute(update(tables.audit).where(
        tables.audit.c.id == ids[2]).values(actor="mallory")), 2),
    ("edit-after", lambda conn, ids: conn.execute(update(tables.audit).where(
        tables.audit.c.id == ids[3]).values(after='{"i":99}')), 3),
    ("delete-row", lambda conn, ids: conn.execute(delete(tables.audit).where(
        tables.audit.c.id == ids[2])), 3),  # the next row no longer chains
    ("rehash-row-but-not-next", lambda conn, ids: conn.execute(update(tables.audit).where(
        tables.audit.c.id == ids[1]).values(hash="f" * 64)), 1),
]


@pytest.mark.parametrize(("tamper", "broken_index"), [r[1:] for r in TAMPER_ROWS],
                         ids=[r[0] for r in TAMPER_ROWS])
def test_audit_chain_names_the_first_broken_row(fleet: Fleet, tamper: Any,
                                                broken_index: int) -> None:
    with atomic(fleet.engine) as conn:
        ids = _record(conn, 5)
        assert audit.verify_chain(conn) is None
        assert [e.id for e in audit.entries(conn, after_id=ids[1], limit=2)] == ids[2:4]
        tamper(conn, ids)
        assert audit.verify_chain(conn) == ids[broken_index]

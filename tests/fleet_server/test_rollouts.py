"""Staged rollouts through the server: library, admin API and CLI (STYLE rules 13, 16, 17).

A real data directory, a recording publisher and an injected clock. Devices are simulated at
the protocol level: each verifies the signed desired state the server published for it, then
"applies" it by sending a real ``Reported`` message (and, for the health gates, real
``metrics.requests`` / ``drift.summary`` records) through :meth:`MqttRuntime.ingest` - the
runtime's own ingest path, which stores it with ``ingest.handle_message`` and queues the
re-plan. Nothing waits on the wall clock.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from sqlalchemy import select

from agent.metrics import RequestMetrics
from agent.protocol.messages import (
    DesiredState,
    DriftBatch,
    Record,
    Reported,
    RunningModel,
    Status,
    TelemetryBatch,
)
from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from agent.protocol.topics import device_topic
from fleet_server import audit
from fleet_server.api import create_app
from fleet_server.auth import Principal
from fleet_server.cli import cli
from fleet_server.db import atomic, tables
from fleet_server.deploy import rollouts, service
from fleet_server.deploy.plan import Selector
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.registry import devices
from fleet_server.rollout import RolloutSpec
from fleet_server.rollout.health import DRIFT_KIND, METRICS_KIND
from fleet_server.rollout.state import STATUSES
from fleet_server.runtime import MqttRuntime
from fleet_server.settings import Settings

START = 1_800_000_000
MODEL = "m"
ADMIN = Principal("t-admin", "test-admin", "admin")


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@dataclass
class Recorder:
    """The Publisher seam: keeps every envelope per device (publishes come from two threads)."""

    desired: dict[str, list[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        with self.lock:
            self.desired.setdefault(device_id, []).append(envelope)

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        pass


@dataclass
class SimDevice:
    id: str
    running: str | None = None  # version of MODEL
    applied: int = 0


class Fleetlet:
    """A server with ``n`` rpi4 devices that run MODEL 1, and artifacts for versions 1-3."""

    def __init__(self, tmp_path: Path, n: int, **settings: Any) -> None:
        self.clock = Clock(START)
        self.recorder = Recorder()
        self.settings = Settings(data_dir=tmp_path / "data", **settings)
        self.admin_token = init_data_dir(self.settings, clock=self.clock)
        self.fleet: Fleet = open_fleet(self.settings, clock=self.clock, publisher=self.recorder)
        self.runtime = MqttRuntime(self.fleet)  # never started: ingest and maintenance only
        self.keys = trusted_keys_from_pem([self.fleet.director_public_pem])
        self.devices = {f"dev-{i}": SimDevice(f"dev-{i}") for i in range(n)}
        self.rollout_id = 0  # the rollout a test follows
        with atomic(self.fleet.engine) as conn:
            for device_id in self.devices:
                devices.provision(self.fleet, conn, device_id=device_id, profile="rpi4",
                                  tags=["lab"], actor=ADMIN)
            for version in ("1", "2", "3"):
                conn.execute(tables.artifacts.insert().values(
                    name=MODEL, version=version, profile="rpi4", runtime="onnxruntime",
                    precision="fp32", sha256="a" * 64, length=10,
                    target_path=f"models/{MODEL}/{version}/rpi4/model.onnx",
                    manifest_target=f"models/{MODEL}/{version}/rpi4/manifest.json",
                    manifest="{}", created_at=START, created_by="t"))
        for device_id in self.devices:
            self.send(Status(device_id=device_id, online=True, at=START))
        self.deploy("1")
        self.settle()

    # ------------------------------------------------------------------ server side
    def deploy(self, version: str, waves: str | None = None, on_failure: str = "pause",
               **gates: Any) -> dict[str, Any]:
        spec = None if waves is None else RolloutSpec.from_dict(
            {"waves": waves, "gates": {"latency_gate": False, **gates},
             "on_failure": on_failure})
        with atomic(self.fleet.engine) as conn:
            out = service.deploy(self.fleet, conn, model=MODEL, version=version,
                                 selector=Selector(all=True), actor=ADMIN, rollout=spec)
        service.publish_pending(self.fleet)
        return out

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        with atomic(self.fleet.engine) as conn:
            return rollouts.get_rollout(conn, rollout_id)

    def maintain(self, advance_s: int = 0) -> dict[str, Any]:
        self.clock.now += advance_s
        return self.runtime.maintain_once()

    # ------------------------------------------------------------------ device side
    def state(self, device_id: str) -> DesiredState:
        """The last desired state published to the device, verified as the agent does."""
        envelope = self.recorder.desired[device_id][-1]
        return verify_desired(envelope, public_keys=self.keys, device_id=device_id,
                              last_sequence=0, now=self.clock.now)

    def wanted(self, device_id: str) -> str | None:
        return next((m.version for m in self.state(device_id).models if m.name == MODEL), None)

    def on(self, version: str) -> list[str]:
        """The devices whose latest desired state says ``version``."""
        return sorted(d for d in self.devices if self.wanted(d) == version)

    def send(self, message: Reported | Status | TelemetryBatch | DriftBatch) -> None:
        kind = {Reported: "reported", Status: "status", TelemetryBatch: "telemetry",
                DriftBatch: "drift"}[type(message)]
        self.runtime.ingest(device_topic(message.device_id, kind), message.to_bytes())
        self.runtime.wait_replans(timeout=30)

    def apply(self, device_id: str, outcome: str = "ok", error: str | None = None) -> None:
        """The device acts on its latest desired state: ``ok`` runs its version; ``rolled_back``
        (health check failed) and ``failed`` keep what it ran."""
        dev = self.devices[device_id]
        state = self.state(device_id)
        if outcome == "ok":
            dev.running = self.wanted(device_id)
        dev.applied = state.sequence
        self.send(Reported(
            device_id=device_id, applied_sequence=dev.applied,
            running=(RunningModel(MODEL, dev.running, "a" * 64),) if dev.running else (),
            state="Committed" if outcome == "ok" else "RolledBack", last_result=outcome,
            last_error=error, agent_version="test", reported_at=self.clock.now))

    def settle(self) -> None:
        """Every device that has not applied its latest desired state applies it, ok (those
        told something new meanwhile included)."""
        while pending := self.pending():
            for device_id in pending:
                self.apply(device_id)

    def pending(self) -> list[str]:
        """The devices whose latest desired state they have not applied yet."""
        return [d for d, dev in self.devices.items()
                if d in self.recorder.desired and self.state(d).sequence > dev.applied]

    def metrics(self, device_id: str, version: str, *, ok: int, errors: int = 0,
                latency_ms: float = 5.0, seq: int = 1) -> None:
        m = RequestMetrics(start=self.clock.now)
        for _ in range(ok):
            m.observe(MODEL, version, latency_ms, True)
        for _ in range(errors):
            m.observe(MODEL, version, 0.0, False, "runtime")
        self.send(TelemetryBatch(device_id=device_id, records=tuple(
            Record(seq=seq + i, kind=METRICS_KIND, at=self.clock.now, body=body)
            for i, body in enumerate(m.flush(self.clock.now + 10)))))

    def drift(self, device_id: str, version: str, *, max_psi: float, predictions: int) -> None:
        body = {"version": 1, "model": MODEL, "model_version": version,
                "window": {"start": 0.0, "end": 1.0, "predictions": predictions},
                "max_psi": max_psi, "alerts": 1}
        self.send(DriftBatch(device_id=device_id, records=(
            Record(seq=1, kind=DRIFT_KIND, at=self.clock.now, body=body),)))


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[[int], Fleetlet]]:
    made: list[Fleetlet] = []

    def make(n: int) -> Fleetlet:
        f = Fleetlet(tmp_path / f"f{len(made)}", n)
        made.append(f)
        return f
    yield make
    for f in made:
        f.fleet.engine.dispose()


def _audit_actions(f: Fleetlet) -> list[dict[str, Any]]:
    with atomic(f.fleet.engine) as conn:
        assert audit.verify_chain(conn) is None
        return [{"action": e.action, "target": e.target, **(e.after or {})}
                for e in audit.entries(conn, limit=10_000)]


# ------------------------------------------------------------------------------ waves advance
WAVE_ROWS = [
    # (id, devices, waves, gates, devices on the new version after each wave committed)
    ("counts-then-all", 5, "1,2,all", {}, [1, 2, 5]),
    ("percentages", 5, "20%,60%,100%", {}, [1, 3, 5]),
    ("one-wave", 3, "all", {}, [3]),
    ("min-committed-lets-a-wave-pass-early", 4, "2,all", {"min_committed": 0.5}, [2, 4]),
]


@pytest.mark.parametrize(("n", "waves", "gates", "sizes"), [r[1:] for r in WAVE_ROWS],
                         ids=[r[0] for r in WAVE_ROWS])
def test_waves_advance_as_devices_commit(make_fleet: Callable[[int], Fleetlet], n: int,
                                         waves: str, gates: dict[str, Any],
                                         sizes: list[int]) -> None:
    f = make_fleet(n)
    out = f.deploy("2", waves, **gates)
    rid = out["rollout"]["id"]
    assert rid == out["id"] == out["rollout_id"]
    for index, size in enumerate(sizes):
        moved = f.on("2")
        assert len(moved) == size, f"wave {index}"
        r = f.rollout(rid)
        assert (r["status"], r["wave"]) == ("running", index)
        assert sum(w["assigned"] for w in r["waves"]) == size
        assert sorted(d["device_id"] for d in r["devices"]) == moved
        assert {d["desired_version"] for d in r["devices"]} == {"2"}
        for device_id in f.pending():  # this wave applies v2 and reports: each report re-plans
            f.apply(device_id)
    f.settle()
    r = f.rollout(rid)
    assert r["status"] == "completed", r["gates"]
    assert sum(w["committed"] for w in r["waves"]) == n
    assert f.on("2") == sorted(f.devices)
    assert all(d.running == "2" for d in f.devices.values())
    steps = [e for e in _audit_actions(f) if e["target"] == f"rollout:{rid}"]
    kinds = [a["action"] for e in steps for a in e["actions"]]
    assert kinds.count("assign") == n and kinds.count("wave") == len(sizes)
    assert kinds[-1] == "completed"


def test_a_bake_time_holds_the_next_wave_until_maintenance_sees_it_over(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(3)
    rid = f.deploy("2", "1,all", bake_s=600)["id"]
    f.settle()
    assert len(f.on("2")) == 1
    bake = next(g for g in f.rollout(rid)["gates"] if g["gate"] == "bake")
    assert bake["ok"] is None and bake["limit"] == 600
    assert f.maintain(599)["rollouts"] == []
    assert len(f.on("2")) == 1
    done = f.maintain(1)
    assert done["rollouts"] == [rid] and len(done["published"]) == 2
    assert {"timestamp_refreshed", "resigned", "published", "rollouts"} <= set(done)
    assert len(f.on("2")) == 3


def test_a_device_provisioned_after_completion_joins_at_once(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(2)
    rid = f.deploy("2", "1,all")["id"]
    f.settle()
    assert f.rollout(rid)["status"] == "completed"
    with atomic(f.fleet.engine) as conn:
        devices.provision(f.fleet, conn, device_id="late", profile="rpi4", tags=[],
                          actor=ADMIN)
    service.publish_pending(f.fleet)
    f.devices["late"] = SimDevice("late")
    assert f.wanted("late") == "2" and f.state("late").sequence == 1  # no detour via v1
    r = f.rollout(rid)
    assert r["waves"][-1]["assigned"] == 2 and r["status"] == "completed"


# ------------------------------------------------------------------------------ a wave fails
def _self_rollback(f: Fleetlet, wave0: list[str]) -> None:
    f.apply(wave0[0])
    f.apply(wave0[1], "rolled_back", "health check: p95 80 ms over the budget of 50 ms")


# health numbers are judged by the maintenance pass (or the runtime's rollout tick); the
# healthy device reports first: a re-plan between the two messages must not let the wave pass
# on it alone (the health gates wait for every committed device of the wave)
def _error_rate(f: Fleetlet, wave0: list[str]) -> None:
    f.settle()
    f.metrics(wave0[0], "2", ok=100)
    f.maintain()
    f.metrics(wave0[1], "2", ok=80, errors=20)
    f.maintain()


def _p95_over_profile_budget(f: Fleetlet, wave0: list[str]) -> None:
    f.settle()
    f.metrics(wave0[0], "2", ok=200, latency_ms=8.0)
    f.maintain()
    f.metrics(wave0[1], "2", ok=200, latency_ms=80.0)  # rpi4's budget is 50 ms
    f.maintain()


def _drift(f: Fleetlet, wave0: list[str]) -> None:
    f.settle()
    f.drift(wave0[0], "2", max_psi=0.05, predictions=500)
    f.maintain()
    f.drift(wave0[1], "2", max_psi=0.6, predictions=500)
    f.maintain()


def _offline(f: Fleetlet, wave0: list[str]) -> None:
    f.apply(wave0[0])
    f.send(Status(device_id=wave0[1], online=False, at=f.clock.now))
    f.maintain(599)
    assert f.rollout(f.rollout_id)["status"] == "running"  # still within the grace
    f.maintain(1)


Trouble = Callable[[Fleetlet, list[str]], None]
FAIL_ROWS: list[tuple[str, dict[str, Any], Trouble, str, int]] = [
    # (id, gates, what goes wrong in wave 0 (two devices), words of the reason, devices that
    #  count as failed (reverted even when the rollout only pauses))
    ("self-rollback", {}, _self_rollback, "wave 0 gate failed: 1 of 2 devices failed", 1),
    ("error-rate", {"max_error_rate": 0.05, "min_samples": 50}, _error_rate,
     "gate error_rate: worst dev-", 0),
    ("p95-over-profile-budget", {"latency_gate": True, "min_samples": 50},
     _p95_over_profile_budget, "gate p95_ms: worst", 0),
    ("drift", {"max_psi": 0.25, "min_samples": 100}, _drift, "gate psi: worst", 0),
    ("offline-past-grace", {"offline_grace_s": 600}, _offline, "1 of 2 devices failed", 1),
]


@pytest.mark.parametrize("on_failure", ["pause", "rollback"])
@pytest.mark.parametrize(("gates", "trouble", "words", "failed"), [r[1:] for r in FAIL_ROWS],
                         ids=[r[0] for r in FAIL_ROWS])
def test_a_failing_wave_pauses_or_rolls_back(make_fleet: Callable[[int], Fleetlet],
                                              on_failure: str, gates: dict[str, Any],
                                              trouble: Trouble, words: str,
                                              failed: int) -> None:
    f = make_fleet(5)
    before = {d: f.state(d).sequence for d in f.devices}
    f.rollout_id = f.deploy("2", "2,all", on_failure, **gates)["id"]
    wave0 = f.on("2")
    assert len(wave0) == 2
    carried = {d: f.state(d).sequence for d in wave0}
    trouble(f, wave0)

    r = f.rollout(f.rollout_id)
    assert r["status"] == ("paused" if on_failure == "pause" else "rolled_back"), r
    assert words in r["reason"]
    untouched = sorted(set(f.devices) - set(wave0))
    for device_id in untouched:  # no more assignments: never signed anything new
        assert f.state(device_id).sequence == before[device_id]
        assert f.wanted(device_id) == "1"
    failing = [d["device_id"] for d in r["devices"] if d["outcome"] == "failed"]
    assert len(failing) == failed, r["devices"]
    reverted = wave0 if on_failure == "rollback" else failing
    for device_id in reverted:  # the previous version again, in a NEW signed state
        assert f.wanted(device_id) == "1"
        assert f.state(device_id).sequence > carried[device_id]
        verify_desired(f.recorder.desired[device_id][-1], public_keys=f.keys,
                       device_id=device_id, last_sequence=carried[device_id], now=f.clock.now)
    for device_id in set(wave0) - set(reverted):
        assert f.wanted(device_id) == "2"
    # it stays so: later passes move nobody
    f.settle()
    f.maintain(3600)
    assert f.on("2") == sorted(set(wave0) - set(reverted))
    assert all(f.devices[d].running == "1" for d in reverted)
    kinds = [a["action"] for e in _audit_actions(f) for a in e.get("actions", ())]
    assert kinds.count("revert") == len(reverted)
    assert ("rolled_back" if on_failure == "rollback" else "paused") in kinds


def test_a_device_that_rolled_back_by_itself_is_failed_with_its_reason(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(3)
    rid = f.deploy("2", "all", max_failed=0.5, min_committed=0.5)["id"]
    victim = f.on("2")[0]
    error = "health check: outputs differ from the golden outputs (max error 0.4)"
    f.apply(victim, "rolled_back", error)
    r = f.rollout(rid)
    row = next(d for d in r["devices"] if d["device_id"] == victim)
    assert (row["outcome"], row["running_version"], row["desired_version"]) == ("failed", "1",
                                                                               "1")
    assert row["last_result"] == "rolled_back" and error in row["reason"]
    assert r["waves"][0]["failed"] == 1
    # the server's desired state follows what the device runs: no divergence
    assert f.wanted(victim) == f.devices[victim].running == "1"
    with atomic(f.fleet.engine) as conn:
        shown = devices.get_device(conn, victim)
    assert shown["reported"]["last_error"] == error
    assert [m["version"] for m in shown["desired"]["models"]] == ["1"]
    [mine] = shown["rollouts"]
    assert (mine["rollout_id"], mine["outcome"]) == (rid, "failed") and error in mine["reason"]
    f.settle()
    assert f.rollout(rid)["status"] == "completed"  # 1 of 3 failed: within the gates


def test_without_a_bake_a_wave_waits_for_the_health_of_every_committed_device(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(4)
    rid = f.deploy("2", "2,all", max_error_rate=0.05, min_samples=50)["id"]
    f.settle()
    wave0 = f.on("2")
    assert len(wave0) == 2
    f.metrics(wave0[0], "2", ok=100)  # one healthy device is not the wave
    f.maintain()

    def error_gate() -> dict[str, Any]:
        r = f.rollout(rid)
        assert (r["status"], r["wave"]) == ("running", 0), r
        return dict(next(g for g in r["gates"] if g["gate"] == "error_rate"))

    gate = error_gate()
    assert gate["ok"] is None and gate["value"] == 0.0
    assert "waiting for 1 more of 2 committed devices to have 50 requests" in gate["detail"]
    assert f"{wave0[1]} (0 requests)" in gate["detail"]
    # it goes offline without ever sending telemetry: the wave holds, and says on what
    f.send(Status(device_id=wave0[1], online=False, at=f.clock.now))
    f.maintain(7 * 24 * 3600)
    assert f"{wave0[1]} (offline, 0 requests)" in error_gate()["detail"]
    assert f.on("2") == wave0
    # back, with its numbers: the wave passes
    f.send(Status(device_id=wave0[1], online=True, at=f.clock.now))
    f.metrics(wave0[1], "2", ok=60)
    f.maintain()
    assert len(f.on("2")) == 4


def test_a_quorum_lets_a_wave_pass_without_a_silent_device(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(6)
    rid = f.deploy("2", "4,all", max_error_rate=0.05, min_samples=50, min_reporting=0.75)["id"]
    f.settle()
    wave0 = f.on("2")
    for device_id in wave0[:2]:
        f.metrics(device_id, "2", ok=100)
    f.maintain()
    assert len(f.on("2")) == 4, "2 of 4 judged: below the quorum of 3"
    f.metrics(wave0[2], "2", ok=100)
    f.maintain()
    assert len(f.on("2")) == 6
    gate = next(e for e in _audit_actions(f) if e["target"] == f"rollout:{rid}"
                and any(a["action"] == "wave" and a["index"] == 1 for a in e["actions"]))
    judged = next(a for a in gate["actions"] if a["action"] == "gate"
                  and a["gate"] == "error_rate")
    assert judged["ok"] is True and "(3 of 4 committed devices judged)" in judged["detail"]


# ------------------------------------------------------------------------------ supersede
def test_a_superseded_rollout_keeps_its_outcomes_when_the_next_version_fails(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(5)
    v2 = f.deploy("2", "all")["id"]
    f.settle()
    assert f.rollout(v2)["status"] == "completed"
    v3 = f.deploy("3", "all")["id"]
    assert f.rollout(v2)["status"] == "superseded"
    victim = f.on("3")[0]
    f.apply(victim, "rolled_back", "health check: outputs differ from the golden outputs")
    f.settle()
    assert f.devices[victim].running == "2"
    assert sorted(d for d, dev in f.devices.items() if dev.running == "3") == \
        sorted(set(f.devices) - {victim})

    old = f.rollout(v2)
    assert old["status"] == "superseded"
    assert old["waves"] == [{"index": 0, "target": "all", "assigned": 5, "committed": 5,
                             "failed": 0, "pending": 0, "reverted": 0}]
    assert {d["outcome"] for d in old["devices"]} == {"committed"}
    new = f.rollout(v3)
    assert (new["waves"][0]["committed"], new["waves"][0]["failed"]) == (4, 1)
    with atomic(f.fleet.engine) as conn:
        mine = {r["rollout_id"]: r for r in devices.get_device(conn, victim)["rollouts"]}
    assert (mine[v2]["outcome"], mine[v2]["reason"]) == ("committed", None)
    assert mine[v3]["outcome"] == "failed" and "outputs differ" in mine[v3]["reason"]


@pytest.mark.parametrize("newer_waves", [None, "1,all"], ids=["plain", "rollout"])
def test_a_newer_deployment_supersedes_a_running_rollout(
        make_fleet: Callable[[int], Fleetlet], newer_waves: str | None) -> None:
    f = make_fleet(4)
    old = f.deploy("2", "2,all")["id"]
    moved_by_old = f.on("2")
    f.apply(moved_by_old[0])  # the other one has not yet: wave 0 is still running
    assert f.rollout(old)["wave"] == 0
    newer = f.deploy("3", newer_waves)
    assert newer["superseded_rollouts"] == [old]
    r = f.rollout(old)
    assert r["status"] == "superseded" and r["reason"] == f"superseded by deployment {newer['id']}"
    if newer_waves is None:
        assert f.on("3") == sorted(f.devices)
        return
    moved_by_new = f.on("3")
    assert len(moved_by_new) == 1
    # the old rollout's devices stay where they are until the newer one moves them
    assert f.on("2") == sorted(set(moved_by_old) - set(moved_by_new))
    assert f.on("1") == sorted(set(f.devices) - set(moved_by_old) - set(moved_by_new))
    f.settle()
    assert f.rollout(newer["id"])["status"] == "completed"
    assert f.on("3") == sorted(f.devices)
    assert f.rollout(old)["status"] == "superseded"  # and it moves nobody any more


def test_cancelling_a_rollout_backed_deployment_cancels_the_rollout(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(3)
    rid = f.deploy("2", "1,all")["id"]
    with atomic(f.fleet.engine) as conn:
        out = service.cancel(f.fleet, conn, rid, actor=ADMIN)
    service.publish_pending(f.fleet)
    assert (out["status"], out["rollout_status"]) == ("cancelled", "cancelled")
    assert f.on("1") == sorted(f.devices)


# ------------------------------------------------------------------------------ the API
@pytest.fixture
def api(make_fleet: Callable[[int], Fleetlet]) -> Iterator[tuple[Fleetlet, TestClient]]:
    f = make_fleet(4)
    app = create_app(f.settings, fleet=f.fleet)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {f.admin_token}"
        yield f, client


def _json(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


BAD_SPECS = [
    ("count-after-percent", {"waves": "5%,2,100%"}, "waves[1]"),
    ("last-wave-not-all", {"waves": ["10%", "50%"]}, "waves[1]"),
    ("bad-wave-text", {"waves": "five,all"}, "waves[0]"),
    ("unknown-gate", {"waves": "all", "gates": {"bake": 60}}, "body.rollout.gates.bake"),
    ("gate-out-of-range", {"waves": "all", "gates": {"max_failed": 2}}, "gates.max_failed"),
    ("bad-on-failure", {"waves": "all", "on_failure": "explode"}, "on_failure"),
    ("unknown-field", {"waves": "all", "canary": 1}, "body.rollout.canary"),
    ("no-waves", {"gates": {}}, "body.rollout.waves"),
    ("report-timeout-negative", {"waves": "all", "gates": {"report_timeout_s": -5}},
     "gates.report_timeout_s"),
    ("report-timeout-a-string", {"waves": "all", "gates": {"report_timeout_s": "10m"}},
     "body.rollout.gates.report_timeout_s"),
    ("report-timeout-a-bool", {"waves": "all", "gates": {"report_timeout_s": True}},
     "body.rollout.gates.report_timeout_s"),
    ("bad-on-report-timeout", {"waves": "all", "gates": {"report_timeout_s": 60,
                                                          "on_report_timeout": "skip"}},
     "gates.on_report_timeout"),
    ("exclude-without-a-deadline", {"waves": "all", "gates": {"on_report_timeout": "exclude"}},
     "gates.on_report_timeout"),
]


@pytest.mark.parametrize(("rollout", "words"), [r[1:] for r in BAD_SPECS],
                         ids=[r[0] for r in BAD_SPECS])
def test_a_bad_rollout_spec_is_422(api: tuple[Fleetlet, TestClient], rollout: dict[str, Any],
                                   words: str) -> None:
    _, client = api
    body = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"all": True}, "rollout": rollout}), 422)
    assert body["error"] == "InvalidInput" and words in body["detail"], body
    assert _json(client.get("/v1/rollouts"))["total"] == 0


def test_pause_resume_cancel_through_the_api(api: tuple[Fleetlet, TestClient]) -> None:
    f, client = api
    dep = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"tags": ["lab"]},
        "rollout": {"waves": "1,2,all", "gates": {"latency_gate": False}}}), 201)
    rid = dep["rollout"]["id"]
    assert dep["rollout"]["status"] == "running" and len(dep["rollout"]["devices"]) == 1
    listed = _json(client.get("/v1/deployments"))["items"][0]
    assert (listed["rollout_id"], listed["rollout_status"]) == (rid, "running")

    paused = _json(client.post(f"/v1/rollouts/{rid}/pause", json={"reason": "lunch"}))
    assert (paused["status"], paused["reason"]) == ("paused", "lunch")
    f.settle()  # wave 0 commits, but a paused rollout assigns nobody
    assert len(f.on("2")) == 1
    assert _json(client.post(f"/v1/rollouts/{rid}/pause"))["status"] == "paused"  # no-op
    assert [r["id"] for r in _json(client.get("/v1/rollouts?status=paused"))["items"]] == [rid]

    resumed = _json(client.post(f"/v1/rollouts/{rid}/resume"))
    assert resumed["status"] == "running" and resumed["wave"] == 1  # judged again at once
    assert len(f.on("2")) == 2

    cancelled = _json(client.post(f"/v1/rollouts/{rid}/cancel"))
    assert cancelled["status"] == "cancelled"
    assert cancelled["reason"] == "cancelled by admin:initial-admin"
    assert f.on("2") == []  # every moved device back on its previous version
    f.settle()
    shown = _json(client.get(f"/v1/rollouts/{rid}"))
    assert shown["waves"][0]["reverted"] + shown["waves"][1]["reverted"] == 2

    for command in ("pause", "resume", "cancel"):  # a finished rollout takes no commands
        body = _json(client.post(f"/v1/rollouts/{rid}/{command}"), 409)
        assert body["error"] == "Conflict" and "is cancelled" in body["detail"]
    assert _json(client.post("/v1/rollouts/999/pause"), 404)["error"] == "NotFound"
    assert _json(client.get("/v1/rollouts/999"), 404)["error"] == "NotFound"

    kinds = [e["action"] for e in _json(client.get("/v1/audit?limit=500"))["items"]]
    assert {"rollout.pause", "rollout.resume", "rollout.cancel", "rollout.advance"} <= set(kinds)

    reader = _json(client.post("/v1/tokens", json={"name": "r", "scope": "reader"}), 201)
    denied = client.post(f"/v1/rollouts/{rid}/pause",
                         headers={"Authorization": f"Bearer {reader['token']}"})
    assert _json(denied, 403)["error"] == "Forbidden"


def test_a_health_quorum_through_the_api(api: tuple[Fleetlet, TestClient]) -> None:
    _, client = api
    gates = {"latency_gate": False, "max_error_rate": 0.1, "min_samples": 10}
    bad = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"all": True},
        "rollout": {"waves": "all", "gates": {**gates, "min_reporting": 0}}}), 422)
    assert "gates.min_reporting" in bad["detail"] and "(0, 1]" in bad["detail"], bad
    dep = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"all": True},
        "rollout": {"waves": "all", "gates": {**gates, "min_reporting": 0.5}}}), 201)
    assert dep["rollout"]["spec"]["gates"]["min_reporting"] == 0.5


def test_a_report_deadline_through_the_api(api: tuple[Fleetlet, TestClient]) -> None:
    f, client = api
    gates = {"latency_gate": False, "max_error_rate": 0.05, "min_samples": 50,
             "report_timeout_s": 600, "on_report_timeout": "exclude"}
    dep = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"all": True},
        "rollout": {"waves": "2,all", "gates": gates}}), 201)
    rid = dep["id"]
    spec = dep["rollout"]["spec"]["gates"]
    assert (spec["report_timeout_s"], spec["on_report_timeout"]) == (600, "exclude")
    f.settle()  # wave 0 commits now
    talker, quiet = f.on("2")
    f.metrics(talker, "2", ok=100)
    f.send(Status(device_id=quiet, online=False, at=f.clock.now))  # gone, no telemetry

    def error_gate() -> dict[str, Any]:
        shown = _json(client.get(f"/v1/rollouts/{rid}"))
        return dict(next(g for g in shown["gates"] if g["gate"] == "error_rate"))

    f.maintain(599)
    waiting = error_gate()
    assert waiting["ok"] is None and waiting["wave"] == 0
    assert f"{quiet} (offline, 0 requests in 599s)" in waiting["detail"]
    assert "each within 600s of committing" in waiting["detail"]
    assert f.on("2") == sorted([talker, quiet])
    f.maintain(1)  # the deadline: excluded, the wave passes on the device that reported
    assert len(f.on("2")) == 4
    audited = next(e for e in _audit_actions(f) if e["target"] == f"rollout:{rid}"
                   and any(a["action"] == "wave" and a["index"] == 1 for a in e["actions"]))
    passed = next(a for a in audited["actions"] if a["action"] == "gate"
                  and a["gate"] == "error_rate")
    assert passed["ok"] is True and passed["detail"] == (
        f"worst {talker}: 0 against 0.05 (1 of 2 committed devices judged, 1 excluded); "
        "excluded, no 50 requests within report_timeout_s 600s of committing: "
        f"{quiet} (offline, 0 requests in 600s)")


def test_a_self_rollback_shows_in_the_api(api: tuple[Fleetlet, TestClient]) -> None:
    f, client = api
    rid = _json(client.post("/v1/deployments", json={
        "model": MODEL, "version": "2", "selector": {"all": True},
        "rollout": {"waves": "all", "gates": {"latency_gate": False, "max_failed": 0.5}}}),
        201)["id"]
    victim = f.on("2")[0]
    f.apply(victim, "rolled_back", "health check: latency p95 90 ms over 50 ms")
    device = _json(client.get(f"/v1/devices/{victim}"))
    assert device["reported"]["running"][0]["version"] == "1"
    assert device["desired"]["models"][0]["version"] == "1"
    assert device["rollouts"][0]["outcome"] == "failed"
    assert "latency p95 90 ms" in device["rollouts"][0]["reason"]
    row = next(d for d in _json(client.get(f"/v1/rollouts/{rid}"))["devices"]
               if d["device_id"] == victim)
    assert row["outcome"] == "failed" and row["last_result"] == "rolled_back"


def test_the_status_query_lists_every_planner_status() -> None:
    from fleet_server.api.routes.rollouts import StatusQuery

    assert set(StatusQuery.__args__) == set(STATUSES)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ the CLI
@dataclass
class Served:
    f: Fleetlet
    url: str

    def run(self, *args: str) -> Any:
        return CliRunner().invoke(cli, list(args), prog_name="fleet_server", env={
            "EDGEFLEET_URL": self.url, "EDGEFLEET_TOKEN": self.f.admin_token,
            "http_proxy": None, "https_proxy": None, "HTTP_PROXY": None, "HTTPS_PROXY": None,
            "all_proxy": None, "ALL_PROXY": None})


@pytest.fixture
def served(make_fleet: Callable[[int], Fleetlet]) -> Iterator[Served]:
    import uvicorn

    f = make_fleet(3)
    app = create_app(f.settings, fleet=f.fleet)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield Served(f, f"http://127.0.0.1:{port}")
    uv.should_exit = True
    thread.join(timeout=10)


def test_rollout_commands_in_the_cli(served: Served) -> None:
    f = served.f
    bad = served.run("deploy", MODEL, "2", "--to", "all", "--waves", "50%,2,all")
    assert bad.exit_code == 2 and "waves[1]" in bad.output
    lonely = served.run("deploy", MODEL, "2", "--to", "all", "--bake", "60")
    assert lonely.exit_code == 2 and "need --waves" in lonely.output
    no_deadline = served.run("deploy", MODEL, "2", "--to", "all", "--waves", "all",
                             "--on-report-timeout", "exclude")
    assert no_deadline.exit_code == 2 and "gates.on_report_timeout" in no_deadline.output

    deployed = served.run("deploy", MODEL, "2", "--to", "tag:lab", "--waves", "1,all",
                          "--no-latency-gate", "--max-failed", "0.5", "--min-committed", "0.5",
                          "--min-reporting", "0.5", "--report-timeout", "900",
                          "--on-report-timeout", "exclude", "--on-failure", "rollback")
    assert deployed.exit_code == 0, deployed.output
    rid = json.loads(served.run("deployment", "list", "--json").stdout)[0]["rollout_id"]
    gates = json.loads(served.run("rollout", "status", str(rid), "--json").stdout)["spec"][
        "gates"]
    assert (gates["report_timeout_s"], gates["on_report_timeout"]) == (900, "exclude")
    assert f"Rollout {rid} running in waves 1,all: wave 0 took 1 device(s)" in deployed.stdout
    assert f"fleet_server rollout status {rid}" in deployed.stdout
    [canary] = f.on("2")
    f.apply(canary)  # wave 0 passes: wave 1 takes the other two
    first = min(set(f.on("2")) - {canary})
    f.apply(first, "rolled_back", "health check failed: outputs differ")

    shown = served.run("rollout", "status", str(rid))
    assert shown.exit_code == 0, shown.output
    text = shown.stdout
    assert f"Rollout {rid}: {MODEL} 2 to tag:lab: running at wave 1 (waves 0-1: 1,all)" in text
    assert "on failure: rollback" in text and "failed <= 50%" in text and "p95 <= off" in text
    assert "min samples 100 on 50% of the committed" in text
    assert "WAVE  TARGET  ASSIGNED  COMMITTED  FAILED  PENDING  REVERTED" in text
    line = next(x for x in text.splitlines() if x.startswith(first))
    assert "failed" in line and "rolled_back" in line and "outputs differ" in line
    assert json.loads(served.run("rollout", "status", str(rid), "--json").stdout)["id"] == rid

    overview = served.run("rollout", "status")
    assert overview.exit_code == 0, overview.output
    assert "Rollouts (details: fleet_server rollout status ID):" in overview.stdout
    assert f"Deployment {rid}: {MODEL} 2 to tag:lab (active; rollout {rid} running" in \
        overview.stdout
    assert "Staged waves do not exist yet" not in overview.stdout
    entry = next(e for e in json.loads(served.run("rollout", "status", "--json").stdout)
                 if e["deployment"]["id"] == rid)
    assert {r["device"]: r["state"] for r in entry["devices"]}[first] == "failed"

    paused = served.run("rollout", "pause", str(rid), "--reason", "look first")
    assert paused.exit_code == 0 and f"Rollout {rid} is paused: look first." in paused.stdout
    assert served.run("rollout", "resume", str(rid)).exit_code == 0
    cancelled = served.run("rollout", "cancel", str(rid))
    assert cancelled.exit_code == 0 and "is cancelled" in cancelled.stdout
    again = served.run("rollout", "cancel", str(rid))
    assert again.exit_code == 1 and "(HTTP 409)" in again.stderr
    missing = served.run("rollout", "status", "999")
    assert missing.exit_code == 1 and "rollout 999 not found" in missing.stderr
    with atomic(f.fleet.engine) as conn:
        rows = conn.execute(select(tables.rollouts.c.status)).scalars().all()
    assert rows == ["cancelled"]

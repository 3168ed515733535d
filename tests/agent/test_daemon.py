"""The daemon's front door: only this device's, fresh, correctly signed desired states pass.

The Agent is built from a real provisioning file written by the real server library; nothing
here touches the network (the link is never started).
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import load_config
from agent.daemon.app import Agent, load_provisioning
from agent.errors import ArtifactError, ConfigError, TransportError
from agent.protocol.messages import Ack, DesiredModel, DesiredState, Reported, RunningModel
from agent.protocol.signed import sign_desired
from agent.transport.mqtt import LinkEvent
from agent.updater.runner import UpdateReport
from fleet_server.auth import Principal
from fleet_server.db import atomic
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.registry import devices
from fleet_server.settings import Settings

NOW = 1_800_000_000


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    settings = Settings(data_dir=tmp_path / "server")
    init_data_dir(settings, clock=lambda: NOW)
    return open_fleet(settings, clock=lambda: NOW)


def make_agent(fleet: Fleet, tmp_path: Path, extra: str = "", **kw: Any) -> Agent:
    with atomic(fleet.engine) as conn:
        out = devices.provision(fleet, conn, device_id="pi-7", profile="rpi4", tags=[],
                                actor=Principal("t", "test", "admin"))
    prov = tmp_path / "dev" / "provisioning.json"
    prov.parent.mkdir()
    prov.write_bytes(out.provisioning.to_bytes())
    prov.chmod(0o600)
    cfg = tmp_path / "dev" / "agent.toml"
    cfg.write_text('provisioning = "provisioning.json"\ndata_dir = "data"\nhttp_port = 0\n'
                   + extra)
    return Agent(load_config(cfg), clock=lambda: NOW, **kw)


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    return make_agent(fleet, tmp_path)


def state(device: str = "pi-7", seq: int = 1, issued: int = NOW - 10,
          expires: int = NOW + 3600) -> DesiredState:
    return DesiredState(device_id=device, sequence=seq, issued_at=issued, expires_at=expires,
                        models=())


def test_a_valid_state_passes(agent: Agent, fleet: Fleet) -> None:
    got = agent._on_desired(sign_desired(state(), fleet.director_key))
    assert got is not None and got.sequence == 1
    assert agent.status.last_result is None


HOSTILE = [
    ("another-devices-state", lambda f: sign_desired(state(device="pi-8"), f.director_key),
     "pi-8"),
    ("signed-by-an-unknown-key", lambda f: sign_desired(state(), Ed25519PrivateKey.generate()),
     "signature"),
    ("expired", lambda f: sign_desired(state(issued=NOW - 7200, expires=NOW - 60),
                                       f.director_key), "expire"),
    ("tampered-after-signing", lambda f: _tamper(sign_desired(state(), f.director_key)),
     "signature"),
    ("not-json", lambda f: b"\xff{", "envelope"),
]


def _tamper(envelope: bytes) -> bytes:
    doc = json.loads(envelope)
    doc["signed"]["sequence"] = 99
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("make", "why"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_states_are_refused_and_reported(agent: Agent, fleet: Fleet, make, why) -> None:
    assert agent._on_desired(make(fleet)) is None
    assert agent.status.last_result == "refused"
    assert why.lower() in (agent.status.last_error or "").lower()


def test_replay_of_an_older_state_is_refused_but_the_same_retained_one_is_ignored(
        agent: Agent, fleet: Fleet) -> None:
    agent.status.applied_sequence = 5
    assert agent._on_desired(sign_desired(state(seq=5), fleet.director_key)) is None
    assert agent.status.last_result is None  # the retained state we applied, seen again
    assert agent._on_desired(sign_desired(state(seq=3), fleet.director_key)) is None
    assert agent.status.last_result == "refused"
    assert "3" in (agent.status.last_error or "")


def test_provisioning_file_readable_by_others_is_refused(agent: Agent) -> None:
    path = agent.config.provisioning
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        load_provisioning(path)


@pytest.mark.parametrize(("rand", "expected"), [(0.0, (1, 30)), (0.5, (2, 45)), (1.0, (2, 60))],
                         ids=["low", "mid", "high"])
def test_reconnect_bounds_are_jittered_per_device(rand: float, expected: tuple[int, int]) -> None:
    from agent.transport.mqtt import reconnect_jitter

    assert reconnect_jitter(1.0, 60.0, lambda: rand) == expected


# ---------------------------------------------------------------------------------------------
# reconcile: one `reported` per update, carrying the applied sequence
# ---------------------------------------------------------------------------------------------
class RecordingLink:
    """The daemon's link seam, connected, recording what is published (worker threads)."""

    connected = True

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()

    def publish(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        with self._lock:
            self.published.append((kind, payload, retain))

    def reported(self) -> list[Reported]:
        with self._lock:
            return [Reported.from_bytes(p) for k, p, _ in self.published if k == "reported"]


class ScriptedRunner:
    """The runner seam: each model's update reports ``ok`` at once, or first fails transiently
    ``transient[name]`` times (as a download from an unreachable server does)."""

    def __init__(self, agent: Agent, transient: dict[str, int] | None = None) -> None:
        self.agent = agent
        self.transient = dict(transient or {})

    def start(self, model: DesiredModel, sequence: int) -> None:
        if self.transient.get(model.name, 0) > 0:
            self.transient[model.name] -= 1
            raise TransportError(f"{model.name}: the server is unreachable")
        self.agent.report(UpdateReport(
            update_id=f"{sequence}/{model.name}", sequence=sequence, name=model.name,
            version=model.version, state="Committed", result="ok", error=None,
            running=RunningModel(model.name, model.version, "0" * 64), at=NOW))

    def resume(self) -> None:
        raise AssertionError("nothing was recorded, so nothing resumes")


def _model(name: str) -> DesiredModel:
    return DesiredModel(name=name, version="2", target_path=f"{name}/2/model.onnx",
                        manifest_target=f"{name}/2/manifest.json", sha256="a" * 64, length=10,
                        profile="rpi4")


class WatchedQueue(asyncio.Queue[DesiredState]):
    """The reconciler's queue; ``idle`` is set when it asks for the next state with none left,
    which it does only once everything for the last one (its final publish too) is done."""

    def __init__(self) -> None:
        super().__init__()
        self.idle = asyncio.Event()
        self.gets = 0

    async def get(self) -> DesiredState:
        self.gets += 1
        if self.gets > 1 and self.empty():
            self.idle.set()
        return await super().get()


async def _reconcile(agent: Agent, desired: DesiredState) -> RecordingLink:
    """Run the daemon's reconciler on ``desired`` until it waits for the next state."""
    loop = asyncio.get_running_loop()
    link = RecordingLink()
    agent.link = link  # type: ignore[assignment]
    agent._loop = loop
    queue = WatchedQueue()
    agent._desired = queue
    await queue.put(desired)
    task = asyncio.create_task(agent._reconciler())
    try:
        await asyncio.wait_for(queue.idle.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return link


def test_an_update_sends_one_reported_with_the_applied_sequence(agent: Agent) -> None:
    agent.runner = ScriptedRunner(agent)  # type: ignore[assignment]
    desired = replace(state(seq=4), models=(_model("digits"),))
    link = asyncio.run(_reconcile(agent, desired))
    (sent,) = link.reported()
    assert [k for k, _, _ in link.published] == ["reported"]
    assert link.published[0][2] is True  # retained: the server's view of the device
    assert (sent.applied_sequence, sent.state, sent.last_result) == (4, "Committed", "ok")
    assert agent.state.applied_sequence() == 4


def test_an_update_that_finished_is_reported_before_a_transient_wait(fleet: Fleet,
                                                                      tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path, rand=lambda: 0.0)  # backoff waits 0 s
    agent.runner = ScriptedRunner(agent, transient={"b": 1})  # type: ignore[assignment]
    desired = replace(state(seq=6), models=(_model("a"), _model("b")))
    link = asyncio.run(_reconcile(agent, desired))
    first, last = link.reported()
    # "a" committed, then "b" failed transiently: the device says so before it waits ...
    assert (first.applied_sequence, first.last_result) == (0, "ok")
    # ... and once "b" is done too, the sequence is applied
    assert (last.applied_sequence, last.last_result) == (6, "ok")


class RefusingRunner(ScriptedRunner):
    """The runner seam refusing the artifact, as a tampered download is refused."""

    def start(self, model: DesiredModel, sequence: int) -> None:
        raise ArtifactError(f"{model.name} {model.version}: sha256 differs from the target's")


def test_a_refused_artifact_sends_one_reported_that_says_why(agent: Agent) -> None:
    agent.runner = RefusingRunner(agent)  # type: ignore[assignment]
    link = asyncio.run(_reconcile(agent, replace(state(seq=5), models=(_model("digits"),))))
    (sent,) = link.reported()
    assert [k for k, _, _ in link.published] == ["reported"]
    assert sent.last_result == "refused"
    assert sent.last_error == ("desired state refused: digits 2: sha256 differs from the "
                               "target's")


# ---------------------------------------------------------------------------------------------
# drift: the monitor is built at the first prediction, not at activation
# ---------------------------------------------------------------------------------------------
def test_drift_monitor_is_built_at_the_first_prediction(fleet: Fleet, tmp_path: Path) -> None:
    from test_health import make_bundle

    from model_tools.baseline import compute_baseline

    agent = make_agent(fleet, tmp_path, extra="drift_window = 8\n")
    b = make_bundle(tmp_path / "bundle", version="1")
    x = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    probs = np.exp(x @ np.ones((4, 3), np.float32))
    manifest = replace(b.manifest, drift_baseline=compute_baseline(
        {"x": x}, {"probs": probs / probs.sum(axis=1, keepdims=True)},
        task="classification", source="eval"))
    agent.models.stage("clf", "1", b.model_file, manifest.to_bytes())
    agent.models.activate("clf", "1")  # the hook: serve it
    assert agent.host.get("clf") is not None
    assert agent._drift == {}  # nothing built yet: no prediction so far

    async def predict(n: int) -> None:
        for row in x[:n]:
            await agent.host.predict("clf", {"x": row[None, :]})

    asyncio.run(predict(8))
    agent.tick()  # builds the monitor, counts the window of 8, closes it
    assert list(agent._drift) == ["clf"]
    rows = agent.outbox.pending("drift", 10)
    assert len(rows) == 1
    agent.host.close()
    agent.outbox.close()
    agent.state.close()


# ---------------------------------------------------------------------------------------------
# the outbox sender sleeps, with no timer, until a tick, an ack or a (re)connect gives it work
# ---------------------------------------------------------------------------------------------
class SignallingLink(RecordingLink):
    """RecordingLink that sets ``sent`` (on the loop) after each publish, and fails the first
    ``fail`` publishes as a missing PUBACK does."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fail: int = 0) -> None:
        super().__init__()
        self._loop = loop
        self.fail = fail
        self.sent = asyncio.Event()

    def publish(self, kind: str, payload: bytes, *, retain: bool = False) -> None:
        if self.fail > 0:
            self.fail -= 1
            raise TransportError(f"no PUBACK for {kind} within 10.0s")
        super().publish(kind, payload, retain=retain)
        self._loop.call_soon_threadsafe(self.sent.set)

    def outbox_sends(self) -> int:
        with self._lock:
            return sum(1 for kind, _, _ in self.published if kind in ("telemetry", "drift"))

    async def wait_sends(self, n: int) -> None:
        while self.outbox_sends() < n:
            self.sent.clear()
            await asyncio.wait_for(self.sent.wait(), 10)


class TimerCountingLoop(asyncio.SelectorEventLoop):
    """asyncio's loop, counting the timers it is asked for: each is a wake-up of an idle
    agent, paid once per device in a fleet."""

    def __init__(self) -> None:
        super().__init__()
        self.timers = 0

    def call_at(self, when: float, callback: Any, *args: Any,  # type: ignore[override]
                context: Any = None) -> asyncio.TimerHandle:
        self.timers += 1
        return super().call_at(when, callback, *args, context=context)


async def _settle() -> None:
    """Let the tasks just woken run up to their next wait (no timer involved)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _start_sender(agent: Agent, fail: int = 0) -> tuple[SignallingLink, list[Any]]:
    """The daemon's sender and link-event tasks on this loop, over a connected link."""
    loop = asyncio.get_running_loop()
    link = SignallingLink(loop, fail=fail)
    agent.link = link  # type: ignore[assignment]
    agent._loop = loop
    agent._sync_wake = asyncio.Event()
    agent._events = asyncio.Queue()
    agent._desired = asyncio.Queue()
    tasks = [asyncio.create_task(agent._syncer()), asyncio.create_task(agent._events_loop())]
    await _settle()
    return link, tasks


async def _stop(tasks: list[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _observe(agent: Agent, models: int = 1) -> None:
    for i in range(models):
        agent.metrics.observe(f"m{i}", "1", 1.0, True)


def test_an_idle_sender_keeps_no_timer_and_an_empty_tick_does_not_wake_it(
        fleet: Fleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path, extra="metrics_interval_s = 0.05\n")

    async def scenario() -> tuple[int, bool, int]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, TimerCountingLoop)
        link, tasks = await _start_sender(agent)
        try:
            agent._tick_and_wake()  # nothing was observed: no rows
            woken = agent._sync_wake.is_set()  # type: ignore[union-attr]
            await _settle()
            return loop.timers, woken, link.outbox_sends()
        finally:
            await _stop(tasks)

    with asyncio.Runner(loop_factory=TimerCountingLoop) as runner:
        timers, woken, sends = runner.run(scenario())
    assert (timers, woken, sends) == (0, False, 0)


def test_a_tick_with_rows_an_ack_and_a_reconnect_each_wake_the_sender(
        fleet: Fleet, tmp_path: Path) -> None:
    # one row per message and 16 unacked rows per stream at most (16 * sync_batch)
    agent = make_agent(fleet, tmp_path, extra="sync_batch = 1\n")

    async def scenario() -> list[int]:
        link, tasks = await _start_sender(agent)
        assert agent._events is not None
        seen = []
        try:
            _observe(agent, models=17)
            agent._tick_and_wake()  # 17 metrics rows: 16 go, then the window is full
            await link.wait_sends(16)
            await _settle()
            seen.append(link.outbox_sends())
            ack = Ack(device_id="pi-7", stream="telemetry", upto_seq=16)
            agent._events.put_nowait(LinkEvent("message", topic_kind="ack",
                                               payload=ack.to_bytes()))
            await link.wait_sends(17)  # the ack reopened the window
            seen.append(link.outbox_sends())
            # a reconnect sends again what the server has not acked (seq 17)
            agent._events.put_nowait(LinkEvent("connected"))
            await link.wait_sends(18)
            seen.append(link.outbox_sends())
        finally:
            await _stop(tasks)
        return seen

    assert asyncio.run(scenario()) == [16, 17, 18]
    assert agent.outbox.pending("telemetry", 100)[0].seq == 17  # held until acked


def test_a_failed_send_is_retried_after_the_interval_with_nothing_else_happening(
        fleet: Fleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path, extra="metrics_interval_s = 0.05\n")

    async def scenario() -> int:
        link, tasks = await _start_sender(agent, fail=1)
        try:
            _observe(agent)
            agent._tick_and_wake()  # the first publish fails: no PUBACK in time
            await link.wait_sends(1)  # retried on the timer alone
            return link.outbox_sends()
        finally:
            await _stop(tasks)

    assert asyncio.run(scenario()) == 1


class AttachRecordingDriver:
    """The LinkDriver seam: records which MQTT clients it was given, connects none."""

    def __init__(self) -> None:
        self.attached: list[str] = []
        self.detached: list[str] = []

    def attach(self, client: Any, reconnect: tuple[float, float]) -> None:
        self.attached.append(client._client_id.decode())

    def detach(self, client: Any, timeout: float = 5.0) -> bool:
        self.detached.append(client._client_id.decode())
        return True


def test_the_agent_hands_its_link_to_the_driver_it_is_given(fleet: Fleet,
                                                             tmp_path: Path) -> None:
    driver = AttachRecordingDriver()
    agent = make_agent(fleet, tmp_path, link_driver=driver)

    async def scenario() -> None:
        stop = asyncio.Event()
        await agent.run(stop, ready=lambda _agent: stop.set())

    asyncio.run(scenario())
    assert (driver.attached, driver.detached) == (["edgefleet-pi-7"], ["edgefleet-pi-7"])

"""DeviceLink on a shared LinkDriver (one thread for many links), against a real Mosquitto.

The driver is what the fleet simulator uses to host hundreds of agents per process: these tests
check that a link behaves the same on it as on its own paho thread (connect, the retained
desired state, a publish from another thread that waits for its PUBACK, a dropped connection
that comes back with backoff, stop and start again) and that no per-link thread is started.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import TransportError
from agent.protocol.messages import Status
from agent.protocol.provisioning import Provisioning
from agent.protocol.topics import device_topic
from agent.transport.mqtt import DeviceLink, LinkDriver, LinkEvent
from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
from fleet_server.mqtt.passwords import hash_password

SERVER, SERVER_PW = "fleet-server", "server-secret"
DEVICES = ("dev-a", "dev-b", "dev-c")
WAIT = 10.0  # seconds: generous for a loaded 2-core host; passing runs take milliseconds


def _prov(device: str, url: str) -> Provisioning:
    return Provisioning(device_id=device, profile="rpi4", mqtt_url=url, mqtt_username=device,
                        mqtt_password=f"{device}-pw", http_url="http://127.0.0.1:1",
                        http_token="unused", tuf_metadata_url="http://127.0.0.1:1/m",
                        tuf_targets_url="http://127.0.0.1:1/t", tuf_root=b"{}",
                        director_keys_pem=())


def _hashes(devices: tuple[str, ...]) -> dict[str, str]:
    return {SERVER: hash_password(SERVER_PW), **{d: hash_password(f"{d}-pw") for d in devices}}


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    (tmp_path / "mosq").mkdir(mode=0o700)
    process = MosquittoProcess(tmp_path / "mosq", _hashes(DEVICES), SERVER)
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def server(broker: MosquittoProcess) -> Iterator[tuple[paho.Client, queue.Queue[paho.MQTTMessage]]]:
    """The fleet side: a plain paho client as the server user, subscribed to every device."""
    got: queue.Queue[paho.MQTTMessage] = queue.Queue()
    ready = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-server",
                         protocol=paho.MQTTv311)
    client.username_pw_set(SERVER, SERVER_PW)
    client.on_message = lambda _c, _u, msg: got.put(msg)
    client.on_subscribe = lambda *_a: ready.set()
    client.on_connect = lambda c, *_a: c.subscribe("edgefleet/v1/devices/+/reported", qos=1)
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert ready.wait(WAIT), "the test's server client did not subscribe"
    try:
        yield client, got
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture
def driver() -> Iterator[LinkDriver]:
    d = LinkDriver(misc_interval_s=0.2)
    d.start()
    try:
        yield d
    finally:
        d.close()


def _next(events: queue.Queue[LinkEvent], kind: str) -> LinkEvent:
    while True:
        ev = events.get(timeout=WAIT)
        if ev.kind == kind:
            return ev


pytestmark = pytest.mark.integration


def test_links_on_one_driver_connect_receive_and_publish(
        broker: MosquittoProcess, server: tuple[paho.Client, queue.Queue[paho.MQTTMessage]],
        driver: LinkDriver) -> None:
    server_client, reported = server
    events = {d: queue.Queue[LinkEvent]() for d in DEVICES}
    links = {d: DeviceLink(_prov(d, broker.url), events[d].put, rand=lambda: 0.0, driver=driver)
             for d in DEVICES}
    threads_before = {t.name for t in threading.enumerate()}
    for link in links.values():
        link.start()
    for d in DEVICES:
        _next(events[d], "connected")
    assert not [n for n in {t.name for t in threading.enumerate()} - threads_before
                if n.startswith("paho-mqtt-client")], "a link started its own network thread"

    for d in DEVICES:  # the server's retained desired state reaches each device, and only it
        server_client.publish(device_topic(d, "desired"), f"state-for-{d}".encode(), qos=1,
                              retain=True).wait_for_publish(WAIT)
    for d in DEVICES:
        ev = _next(events[d], "message")
        assert (ev.topic_kind, ev.payload) == ("desired", f"state-for-{d}".encode())

    # publishes from several threads at once, each waiting for its PUBACK
    errors: list[TransportError] = []

    def report(d: str) -> None:
        try:
            links[d].publish("reported", f"report-{d}".encode(), retain=True, timeout=WAIT)
        except TransportError as exc:  # handed to the test thread below
            errors.append(exc)

    workers = [threading.Thread(target=report, args=(d,)) for d in DEVICES]
    for w in workers:
        w.start()
    for w in workers:
        w.join(WAIT)
    assert errors == []
    got = {reported.get(timeout=WAIT).payload for _ in DEVICES}
    assert got == {f"report-{d}".encode() for d in DEVICES}
    for link in links.values():
        link.stop()
    assert not any(link.connected for link in links.values())


def test_a_dropped_link_reconnects_and_stop_start_works(
        broker: MosquittoProcess, driver: LinkDriver) -> None:
    events: queue.Queue[LinkEvent] = queue.Queue()
    dev = DEVICES[0]
    link = DeviceLink(_prov(dev, broker.url), events.put, driver=driver, rand=lambda: 0.0,
                      reconnect_min_s=0.5, reconnect_max_s=1.0)
    link.start()
    _next(events, "connected")

    hashes = _hashes(DEVICES)
    broker.reload({k: v for k, v in hashes.items() if k != dev})  # revoked: dropped, refused
    _next(events, "disconnected")
    _next(events, "refused")  # the driver kept retrying on its own
    broker.reload(hashes)  # allowed again: the next attempt (1 s later) gets in
    _next(events, "connected")
    assert link.connected

    link.stop()  # the simulator's "offline" knob: retained offline status, then disconnect
    assert not link.connected
    link.start()
    _next(events, "connected")
    link.publish("status", Status(device_id=dev, online=True, at=1).to_bytes(), timeout=WAIT)
    link.stop()


@pytest.mark.parametrize("failing", ["message", "connected"])
def test_one_links_failing_handler_does_not_stop_or_spin_the_others(
        broker: MosquittoProcess, server: tuple[paho.Client, queue.Queue[paho.MQTTMessage]],
        driver: LinkDriver, caplog: pytest.LogCaptureFixture, failing: str) -> None:
    """A handler that raises (e.g. call_soon_threadsafe on an agent's closed loop) must not
    reach paho: paho would re-handle that packet on every later read (the shared driver
    spinning on it, or re-subscribing on a re-handled CONNACK) and a raise out of its loop
    would end the thread every other link runs on. The event is logged and dropped."""
    server_client, _ = server
    good: queue.Queue[LinkEvent] = queue.Queue()
    bad: queue.Queue[LinkEvent] = queue.Queue()

    def handler(ev: LinkEvent) -> None:
        bad.put(ev)
        if ev.kind == failing:
            raise RuntimeError("Event loop is closed")

    a = DeviceLink(_prov(DEVICES[0], broker.url), handler, driver=driver, rand=lambda: 0.0)
    b = DeviceLink(_prov(DEVICES[1], broker.url), good.put, driver=driver, rand=lambda: 0.0)
    a.start()
    b.start()
    _next(bad, "connected")
    _next(good, "connected")
    for dev, payload in ((DEVICES[0], b"x1"), (DEVICES[1], b"y1"), (DEVICES[0], b"x2"),
                         (DEVICES[1], b"y2")):
        server_client.publish(device_topic(dev, "desired"), payload, qos=1).wait_for_publish(WAIT)
    assert _next(good, "message").payload == b"y1"  # the other link gets its own
    assert _next(good, "message").payload == b"y2"
    assert _next(bad, "message").payload == b"x1"
    assert _next(bad, "message").payload == b"x2"  # handled once each: no spin on x1
    a.stop()  # the driver thread survives, and stop() confirms
    b.stop()
    assert driver._thread.is_alive()
    seen = [ev.kind for ev in iter_queue(bad)]
    assert seen.count("connected") == 0 and seen.count("message") == 0  # nothing re-handled
    assert f"the {failing} event was dropped: its handler failed" in caplog.text


def iter_queue(q: queue.Queue[LinkEvent]) -> list[LinkEvent]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_driver_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="misc_interval_s: expected > 0, got 0"):
        LinkDriver(misc_interval_s=0)
    idle = LinkDriver()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="never")
    with pytest.raises(RuntimeError, match="LinkDriver is not running"):
        idle.attach(client, (1.0, 2.0))
    idle.close()

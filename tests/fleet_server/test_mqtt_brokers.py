"""Both brokers enforce edgefleet's MQTT rules: tests against the REAL brokers on loopback.

Each shared case runs against the embedded amqtt broker (in a background event loop) and a
real Mosquitto process, both started on free 127.0.0.1 ports with the same credentials
(``$7$`` hashes from our code). Devices are plain paho clients (or raw sockets where a test
needs an exact packet); the server side is :class:`fleet_server.mqtt.link.ServerLink`.

"Never receives" is proven by ordering, not sleeping: the forbidden thing happens first, then
a legitimate sentinel that must travel the same path; once the sentinel arrives, anything
forbidden would already have arrived before it.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from mqtt_helpers import DictStore, LoopThread
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.messages import MAX_MESSAGE_BYTES
from agent.protocol.topics import (
    ack_topic,
    desired_topic,
    drift_topic,
    reported_topic,
    status_topic,
    subscription_filter,
    telemetry_topic,
)
from fleet_server.mqtt.broker import EmbeddedBroker
from fleet_server.mqtt.link import InboundMessage, LinkConfig, ServerLink
from fleet_server.mqtt.mosquitto import (
    MAX_PACKET_BYTES,
    MosquittoProcess,
    find_mosquitto,
    render_mosquitto_config,
    write_mosquitto_files,
)
from fleet_server.mqtt.passwords import (
    generate_password,
    hash_password,
    is_password_hash,
    verify_password,
)

pytestmark = pytest.mark.integration

WAIT = 5.0  # seconds: the bound on every wait below (they normally end in milliseconds)
SERVER = "fleet-server"
PASSWORDS = {SERVER: generate_password(), "d1": generate_password(), "d2": generate_password()}
HASHES = {user: hash_password(pw) for user, pw in PASSWORDS.items()}
MOSQUITTO = find_mosquitto()
NO_MOSQUITTO = "mosquitto binary not found (apt-get install mosquitto)"


# ---------------------------------------------------------------------------------------------
# brokers under test
# ---------------------------------------------------------------------------------------------
@dataclass
class BrokerUnderTest:
    kind: str
    host: str
    port: int
    #: remove a user's credentials and drop its live connections
    revoke: Callable[[str], None]
    #: wait until the broker has processed a client's lost connection
    wait_gone: Callable[[str], None] = field(default=lambda client_id: None)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


def _embedded(loop_thread: LoopThread) -> Iterator[BrokerUnderTest]:
    store = DictStore(HASHES)
    broker = EmbeddedBroker(store, server_user=SERVER, host="127.0.0.1", port=0)
    loop_thread.run(broker.start())

    def revoke(username: str) -> None:
        store.hashes.pop(username, None)
        loop_thread.run(broker.disconnect(username))

    try:
        yield BrokerUnderTest("embedded", broker.host, broker.port, revoke)
    finally:
        loop_thread.run(broker.stop())


def _mosquitto(directory: Path) -> Iterator[BrokerUnderTest]:
    if MOSQUITTO is None:
        pytest.skip(NO_MOSQUITTO)
    process = MosquittoProcess(directory, HASHES, SERVER)
    process.start()
    credentials = dict(HASHES)

    def revoke(username: str) -> None:
        credentials.pop(username, None)
        process.reload(credentials)  # Mosquitto drops live clients whose user is gone

    def wait_gone(client_id: str) -> None:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            log = process.log_text()
            if f"Client {client_id} closed its connection" in log or \
                    f"Client {client_id} disconnected" in log:
                return
            threading.Event().wait(0.01)  # bounded poll of the broker's log
        pytest.fail(f"mosquitto did not log the disconnection of {client_id}")

    try:
        yield BrokerUnderTest("mosquitto", process.host, process.port, revoke, wait_gone)
    finally:
        process.stop()


@pytest.fixture(params=["embedded", "mosquitto"], ids=["embedded", "mosquitto"])
def broker(request: pytest.FixtureRequest, tmp_path: Path,
           loop_thread: LoopThread) -> Iterator[BrokerUnderTest]:
    if request.param == "embedded":
        yield from _embedded(loop_thread)
    else:
        yield from _mosquitto(tmp_path)


@pytest.fixture
def embedded(loop_thread: LoopThread) -> Iterator[BrokerUnderTest]:
    yield from _embedded(loop_thread)


# ---------------------------------------------------------------------------------------------
# the server (ServerLink) and devices (paho, raw sockets)
# ---------------------------------------------------------------------------------------------
def server_link(b: BrokerUnderTest, filters: list[str], *,
                client_id: str = "fleet-server-test") -> tuple[ServerLink, queue.Queue[Any]]:
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    url = f"mqtt://{SERVER}:{PASSWORDS[SERVER]}@{b.host}:{b.port}"
    link = ServerLink(LinkConfig.from_url(url, client_id=client_id, clean_session=True),
                      inbox=inbox)
    link.connect(WAIT)
    link.subscribe(filters, timeout=WAIT)
    return link, inbox


@pytest.fixture
def server(broker: BrokerUnderTest) -> Iterator[tuple[ServerLink, queue.Queue[Any]]]:
    """The server, subscribed to everything under edgefleet/v1/."""
    link, inbox = server_link(broker, ["edgefleet/v1/#"])
    yield link, inbox
    link.close()


def wait_for(inbox: queue.Queue[Any], match: Callable[[Any], bool]) -> tuple[Any, list[Any]]:
    """Take messages until one matches; return it and everything that came before it."""
    before: list[Any] = []
    deadline = time.monotonic() + WAIT
    while True:
        try:
            message = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no matching message within {WAIT} s; got {before!r}")
        if match(message):
            return message, before
        before.append(message)


def on_topic(topic: str, message: Any) -> bool:
    return bool(message.topic == topic)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Device:
    """A device played by a bare paho client (no reconnects)."""

    def __init__(self, b: BrokerUnderTest, username: str | None, password: str | None, *,
                 client_id: str | None = None, clean_session: bool = True) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2,
                                  client_id=client_id or f"{username}-dev",
                                  clean_session=clean_session,
                                  protocol=MQTTProtocolVersion.MQTTv311,
                                  reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.b = b
        self.connacks: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[Received] = queue.Queue()
        self.disconnected = threading.Event()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._cond = threading.Condition()
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.put(rc)
        self.client.on_disconnect = lambda c, u, f, rc, p: self.disconnected.set()
        self.client.on_message = lambda c, u, m: self.messages.put(
            Received(m.topic, bytes(m.payload), m.qos, bool(m.retain)))
        self.client.on_subscribe = self._on_subscribe

    def _on_subscribe(self, c: paho.Client, u: object, mid: int, codes: list[ReasonCode],
                      p: object) -> None:
        with self._cond:
            self._subacks[mid] = codes
            self._cond.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect(self.b.host, self.b.port, keepalive=30)
        self.client.loop_start()
        return self.connacks.get(timeout=WAIT)

    def subscribe(self, topic_filter: str) -> ReasonCode:
        _, mid = self.client.subscribe(topic_filter, qos=1)
        assert mid is not None
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._subacks, WAIT), "no SUBACK"
            return self._subacks.pop(mid)[0]

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def devices(broker: BrokerUnderTest) -> Iterator[Callable[..., Device]]:
    made: list[Device] = []

    def make(username: str | None, password: str | None = None, **kw: Any) -> Device:
        device = Device(broker, username, password, **kw)
        made.append(device)
        return device

    yield make
    for device in made:
        device.close()


def connected(make: Callable[..., Device], username: str) -> Device:
    device = make(username, PASSWORDS[username])
    assert not device.connect().is_failure
    return device


def _mqtt_string(value: bytes) -> bytes:
    return struct.pack("!H", len(value)) + value


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, byte = divmod(n, 128)
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def raw_connect(b: BrokerUnderTest, username: str, password: str, *, client_id: str,
                keepalive: int, will: tuple[str, bytes] | None = None) -> tuple[socket.socket, int]:
    """CONNECT from a bare socket (MQTT 3.1.1, clean session, QoS 1 retained will).

    Returns the socket and the CONNACK return code; the socket then stays silent.
    """
    flags = 0x02 | 0x80 | 0x40
    payload = _mqtt_string(client_id.encode())
    if will is not None:
        flags |= 0x04 | 0x08 | 0x20
        payload += _mqtt_string(will[0].encode()) + _mqtt_string(will[1])
    payload += _mqtt_string(username.encode()) + _mqtt_string(password.encode())
    body = _mqtt_string(b"MQTT") + bytes((4, flags)) + struct.pack("!H", keepalive) + payload
    sock = socket.create_connection((b.host, b.port), timeout=WAIT)
    sock.sendall(b"\x10" + _remaining_length(len(body)) + body)
    connack = b""
    while len(connack) < 4:
        chunk = sock.recv(4 - len(connack))
        assert chunk, "broker closed the connection before CONNACK"
        connack += chunk
    assert connack[0] == 0x20, connack
    return sock, connack[3]


# ---------------------------------------------------------------------------------------------
# authentication
# ---------------------------------------------------------------------------------------------
def test_device_with_right_password_connects(devices: Callable[..., Device]) -> None:
    device = devices("d1", PASSWORDS["d1"])
    assert device.connect() == 0


@pytest.mark.parametrize(("username", "password"), [
    ("d1", "wrong-password"),
    ("d1", PASSWORDS["d2"]),
    ("d9", PASSWORDS["d1"]),
    (SERVER, "wrong-password"),
    ("d1", None),
    (None, None),
], ids=["wrong-password", "other-devices-password", "unknown-user", "server-wrong-password",
        "no-password", "anonymous"])
def test_bad_credentials_are_refused(devices: Callable[..., Device], username: str | None,
                                     password: str | None) -> None:
    reason = devices(username, password).connect()
    assert reason.is_failure
    assert reason.value in (4, 5, 134, 135)  # bad username or password / not authorised


def test_revoked_device_is_dropped_and_then_refused(broker: BrokerUnderTest,
                                                    devices: Callable[..., Device]) -> None:
    device = connected(devices, "d1")
    broker.revoke("d1")
    assert device.disconnected.wait(WAIT), "the revoked device's live session survived"
    assert devices("d1", PASSWORDS["d1"]).connect().is_failure
    assert not devices("d2", PASSWORDS["d2"]).connect().is_failure  # others unaffected


# ---------------------------------------------------------------------------------------------
# what a device may do
# ---------------------------------------------------------------------------------------------
def test_device_gets_retained_desired_and_reaches_server_on_its_topics(
        server: tuple[ServerLink, queue.Queue[Any]], devices: Callable[..., Device]) -> None:
    link, inbox = server
    link.publish(desired_topic("d1"), b'{"desired": 1}', retain=True)
    device = connected(devices, "d1")
    for topic in (desired_topic("d1"), ack_topic("d1")):
        assert not device.subscribe(topic).is_failure, topic

    # amqtt may also send a QoS 0 copy at CONNECT (its retained-on-connect quirk): wait for
    # the copy the subscription asked for
    got, before = wait_for(device.messages, lambda m: m.qos == 1)
    assert (got.topic, got.payload, got.retain) == (desired_topic("d1"), b'{"desired": 1}', True)
    assert all(m.topic == desired_topic("d1") for m in before)

    link.publish(ack_topic("d1"), b'{"ack": 7}', retain=False)
    got, _ = wait_for(device.messages, lambda m: m.topic == ack_topic("d1"))
    assert got.payload == b'{"ack": 7}'

    own = [reported_topic("d1"), status_topic("d1"), telemetry_topic("d1"), drift_topic("d1")]
    for n, topic in enumerate(own):
        device.publish(topic, f"m{n}".encode(), retain=topic == reported_topic("d1"))
    arrived = []
    for topic in own:
        got, _ = wait_for(inbox, functools.partial(on_topic, topic))
        arrived.append((got.topic, got.payload))
    assert arrived == [(t, f"m{n}".encode()) for n, t in enumerate(own)]


def test_server_publishes_retained_desired_and_subscribes_to_all_reported(
        broker: BrokerUnderTest, devices: Callable[..., Device]) -> None:
    link, inbox = server_link(broker, [subscription_filter("reported")],
                              client_id="fleet-server-reported")
    try:
        link.publish(desired_topic("d2"), b"state-for-d2", retain=True)
        d1, d2 = connected(devices, "d1"), connected(devices, "d2")
        d1.publish(reported_topic("d1"), b"r1", retain=True)
        d2.publish(reported_topic("d2"), b"r2", retain=True)
        got1, _ = wait_for(inbox, lambda m: m.topic == reported_topic("d1"))
        got2, before = wait_for(inbox, lambda m: m.topic == reported_topic("d2"))
        assert (got1.payload, got2.payload) == (b"r1", b"r2")
        assert all(m.topic.endswith("/reported") for m in before)
        d2.subscribe(desired_topic("d2"))
        got, _ = wait_for(d2.messages, lambda m: m.qos == 1)
        assert (got.topic, got.payload, got.retain) == (desired_topic("d2"), b"state-for-d2",
                                                        True)
    finally:
        link.close()


@pytest.mark.parametrize("forged_topic", [
    reported_topic("d2"),
    status_topic("d2"),
    telemetry_topic("d2"),
    desired_topic("d2"),
    desired_topic("d1"),
    ack_topic("d1"),
    "edgefleet/v1/devices/d1/other",
    "edgefleet/v1/fleet",
], ids=["other-reported", "other-status", "other-telemetry", "other-desired", "own-desired",
        "own-ack", "own-unknown-kind", "outside-devices"])
def test_forged_publish_never_arrives(server: tuple[ServerLink, queue.Queue[Any]],
                                      devices: Callable[..., Device], forged_topic: str) -> None:
    _, inbox = server
    victim = connected(devices, "d2")
    victim.subscribe(desired_topic("d2"))
    attacker = connected(devices, "d1")
    attacker.publish(forged_topic, b"forged", retain=True)
    attacker.publish(telemetry_topic("d1"), b"sentinel")
    _, before = wait_for(inbox, lambda m: m.payload == b"sentinel")
    assert [m for m in before if m.payload == b"forged"] == []
    # the victim's own subscription, set up before the forgery, got nothing either
    assert victim.messages.empty()


@pytest.mark.parametrize("forbidden_filter", [
    "#",
    "edgefleet/v1/#",
    subscription_filter("desired"),
    "edgefleet/v1/devices/+/+",
    desired_topic("d2"),
    reported_topic("d2"),
    "edgefleet/v1/devices/d1/+",
    reported_topic("d1"),
], ids=["hash", "root-hash", "plus-desired", "plus-plus", "other-desired", "other-reported",
        "own-plus", "own-reported"])
def test_forbidden_subscription_never_receives(broker: BrokerUnderTest,
                                               server: tuple[ServerLink, queue.Queue[Any]],
                                               devices: Callable[..., Device],
                                               forbidden_filter: str) -> None:
    link, _ = server
    other = connected(devices, "d2")
    other.publish(reported_topic("d2"), b"retained-of-d2", retain=True)
    link.publish(desired_topic("d2"), b"retained-desired-of-d2", retain=True)
    spy = connected(devices, "d1")
    granted = spy.subscribe(forbidden_filter)
    if broker.kind == "embedded":  # Mosquitto grants it and filters delivery by its ACL
        assert granted.is_failure
    assert not spy.subscribe(ack_topic("d1")).is_failure
    link.publish(desired_topic("d2"), b"live-desired-of-d2", retain=False)
    other.publish(reported_topic("d2"), b"live-of-d2")
    link.publish(ack_topic("d1"), b"sentinel", retain=False)
    _, before = wait_for(spy.messages, lambda m: m.payload == b"sentinel")
    assert before == []


def test_retained_messages_of_others_are_not_sent_at_connect(
        server: tuple[ServerLink, queue.Queue[Any]], devices: Callable[..., Device]) -> None:
    """amqtt 0.12.1 sends a connecting client retained messages matching ANY client's
    subscriptions (here the server's edgefleet/v1/#); the embedded broker must filter them."""
    link, _ = server
    link.publish(desired_topic("d2"), b"desired-of-d2", retain=True)
    connected(devices, "d2").publish(reported_topic("d2"), b"reported-of-d2", retain=True)
    spy = connected(devices, "d1")
    spy.subscribe(ack_topic("d1"))
    link.publish(ack_topic("d1"), b"sentinel", retain=False)
    _, before = wait_for(spy.messages, lambda m: m.payload == b"sentinel")
    assert before == []


def test_last_will_on_another_devices_topic_never_arrives(
        broker: BrokerUnderTest, server: tuple[ServerLink, queue.Queue[Any]],
        devices: Callable[..., Device]) -> None:
    _, inbox = server
    sock, code = raw_connect(broker, "d1", PASSWORDS["d1"], client_id="d1-will", keepalive=30,
                             will=(reported_topic("d2"), b"forged-will"))
    with sock:
        if broker.kind == "embedded":
            assert code == 5  # refused at CONNECT
            return
        assert code == 0  # Mosquitto accepts it and checks the ACL when sending the will
    broker.wait_gone("d1-will")
    connected(devices, "d2").publish(telemetry_topic("d2"), b"sentinel")
    _, before = wait_for(inbox, lambda m: m.payload == b"sentinel")
    assert [m for m in before if m.payload == b"forged-will"] == []


def test_embedded_drops_a_silent_device_and_publishes_its_last_will(
        embedded: BrokerUnderTest) -> None:
    """amqtt itself never enforces keep-alive. (Mosquitto does, at 1.5 x keep-alive, but
    checks only every ~5 s, so it is not timed here.)"""
    link, inbox = server_link(embedded, ["edgefleet/v1/#"])
    started = time.monotonic()
    try:
        sock, code = raw_connect(embedded, "d1", PASSWORDS["d1"], client_id="d1-silent",
                                 keepalive=1, will=(status_topic("d1"), b'{"online": false}'))
        with sock:
            assert code == 0
            got, _ = wait_for(inbox, lambda m: m.topic == status_topic("d1"))
    finally:
        link.close()
    assert got.payload == b'{"online": false}'
    assert time.monotonic() - started >= 1.0  # not before the keep-alive ran out


def test_oversized_packet_disconnects_the_device(
        broker: BrokerUnderTest, server: tuple[ServerLink, queue.Queue[Any]],
        devices: Callable[..., Device]) -> None:
    _, inbox = server
    device = connected(devices, "d1")
    largest = b"x" * MAX_MESSAGE_BYTES
    device.publish(telemetry_topic("d1"), largest)
    got, _ = wait_for(inbox, lambda m: m.topic == telemetry_topic("d1"))
    assert got.payload == largest

    device.client.publish(telemetry_topic("d1"), b"y" * (MAX_PACKET_BYTES + 1), qos=1)
    assert device.disconnected.wait(WAIT), "the broker kept a client sending an oversized packet"
    connected(devices, "d2").publish(telemetry_topic("d2"), b"sentinel")
    _, before = wait_for(inbox, lambda m: m.payload == b"sentinel")
    assert [len(m.payload) for m in before] == []


# ---------------------------------------------------------------------------------------------
# embedded broker only
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("password", [PASSWORDS["d1"], "wrong-password"],
                         ids=["right-password", "wrong-password"])
def test_embedded_refuses_another_users_client_id(embedded: BrokerUnderTest,
                                                  password: str) -> None:
    """amqtt resumes or takes over a session by client id before authenticating; the gate
    refuses a client id held by another user's session, so the server keeps its session."""
    link, inbox = server_link(embedded, ["edgefleet/v1/#"], client_id="fleet-server-main")
    try:
        thief = Device(embedded, "d1", password, client_id="fleet-server-main",
                       clean_session=False)
        try:
            assert thief.connect().is_failure
        finally:
            thief.close()
        assert link.connected
        sender = Device(embedded, "d2", PASSWORDS["d2"])
        try:
            assert sender.connect() == 0
            sender.publish(reported_topic("d2"), b"still-here")
        finally:
            sender.close()
        got, _ = wait_for(inbox, lambda m: m.payload == b"still-here")
        assert got.topic == reported_topic("d2")
    finally:
        link.close()


def test_embedded_warns_loudly_without_tls_off_loopback(loop_thread: LoopThread,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    broker = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, host="0.0.0.0", port=0)
    with caplog.at_level(logging.WARNING, logger="fleet_server.mqtt.broker"):
        loop_thread.run(broker.start())
        loop_thread.run(broker.stop())
    assert any("WITHOUT TLS" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_embedded_quiet_on_loopback(loop_thread: LoopThread,
                                    caplog: pytest.LogCaptureFixture) -> None:
    broker = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=0)
    with caplog.at_level(logging.WARNING, logger="fleet_server.mqtt.broker"):
        loop_thread.run(broker.start())
        loop_thread.run(broker.stop())
    assert not [r for r in caplog.records if "WITHOUT TLS" in r.getMessage()]


def test_embedded_port_in_use_is_a_setup_error(embedded: BrokerUnderTest,
                                               loop_thread: LoopThread) -> None:
    from fleet_server.mqtt.errors import BrokerSetupError

    second = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=embedded.port)
    with pytest.raises(BrokerSetupError, match="cannot listen"):
        loop_thread.run(second.start())


# ---------------------------------------------------------------------------------------------
# passwords: our $7$ hashes and Mosquitto's are the same thing
# ---------------------------------------------------------------------------------------------
def test_hash_format_and_round_trip() -> None:
    stored = hash_password("s3cret", salt=b"\x00" * 12)
    assert stored.startswith("$7$101$AAAAAAAAAAAAAAAA$")
    assert is_password_hash(stored)
    assert verify_password("s3cret", stored)
    assert verify_password(b"s3cret", stored)
    assert not verify_password("s3cret ", stored)
    assert not verify_password("", stored)
    assert hash_password("s3cret") != hash_password("s3cret")  # fresh salt each time


@pytest.mark.parametrize("stored", [
    "", "plaintext", "$6$salt$hash", "$7$101$only-two", "$7$x$AAAA$AAAA", "$7$0$AAAA$" + "A" * 88,
    "$7$101$!!!!$" + "A" * 88, "$7$101$AAAAAAAAAAAAAAAA$AAAA",
], ids=["empty", "plain", "sha512-crypt", "missing-part", "iterations-not-a-number",
        "zero-iterations", "salt-not-base64", "short-hash"])
def test_malformed_hash_is_a_value_error(stored: str) -> None:
    assert not is_password_hash(stored)
    with pytest.raises(ValueError, match="password hash"):
        verify_password("whatever", stored)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None,
                    reason="mosquitto_passwd not found (apt-get install mosquitto)")
def test_mosquitto_passwd_hash_verifies_in_our_code(tmp_path: Path) -> None:
    path = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(path), "d1", "pa:ss wörd"], check=True,
                   capture_output=True, timeout=WAIT)
    username, stored = path.read_text(encoding="utf-8").strip().split(":", 1)
    assert username == "d1" and stored.startswith("$7$101$")
    assert verify_password("pa:ss wörd", stored)
    assert not verify_password("pa:ss word", stored)


@pytest.mark.skipif(MOSQUITTO is None, reason=NO_MOSQUITTO)
def test_mosquitto_accepts_our_hashes_whatever_the_iterations(tmp_path: Path) -> None:
    passwords = {"d1": "first-secret", "d2": "second-secret"}
    hashes = {"d1": hash_password("first-secret"),
              "d2": hash_password("second-secret", iterations=5000)}
    with MosquittoProcess(tmp_path, {**hashes, SERVER: HASHES[SERVER]}, SERVER) as process:
        b = BrokerUnderTest("mosquitto", process.host, process.port, lambda u: None)
        for username, password in passwords.items():
            good, bad = Device(b, username, password), Device(b, username, password + "x")
            try:
                assert good.connect() == 0, username
                assert bad.connect().is_failure, username
            finally:
                good.close()
                bad.close()


# ---------------------------------------------------------------------------------------------
# Mosquitto files (pure rendering; the real broker reads them in the cases above)
# ---------------------------------------------------------------------------------------------
def test_write_mosquitto_files_modes_and_content(tmp_path: Path) -> None:
    files = write_mosquitto_files(tmp_path, {"d1": HASHES["d1"], SERVER: HASHES[SERVER]},
                                  SERVER)
    for path in (files.password_file, files.acl_file):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    lines = [line for line in files.password_file.read_text().splitlines()
             if not line.startswith("#")]
    assert lines == [f"d1:{HASHES['d1']}", f"{SERVER}:{HASHES[SERVER]}"]
    acl = files.acl_file.read_text()
    assert f"user {SERVER}\ntopic readwrite edgefleet/v1/#" in acl
    assert "pattern write edgefleet/v1/devices/%u/reported" in acl
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind


def test_write_mosquitto_files_with_group_is_0640(tmp_path: Path) -> None:
    files = write_mosquitto_files(tmp_path, {"d1": HASHES["d1"]}, SERVER, group=os.getgid())
    assert stat.S_IMODE(os.stat(files.password_file).st_mode) == 0o640
    assert os.stat(files.password_file).st_gid == os.getgid()


@pytest.mark.parametrize(("credentials", "message"), [
    ({"d1": "plain-password"}, "not a \\$7\\$ hash"),
    ({"D1": HASHES["d1"]}, "neither the server user nor a valid device id"),
    ({"d1:x": HASHES["d1"]}, "neither the server user nor a valid device id"),
    ({"fleet:server": HASHES["d1"]}, "neither the server user nor a valid device id"),
], ids=["plaintext", "upper-case-id", "colon-in-id", "colon-in-name"])
def test_write_mosquitto_files_refuses_what_would_corrupt_them(
        tmp_path: Path, credentials: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_mosquitto_files(tmp_path, credentials, SERVER)
    assert list(tmp_path.iterdir()) == []


def test_render_config_refuses_line_injection() -> None:
    with pytest.raises(ValueError, match="password_file"):
        render_mosquitto_config("127.0.0.1", 1883, "/p\nallow_anonymous true", "/acl")


def test_render_config_warns_without_tls_off_loopback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fleet_server.mqtt.mosquitto"):
        text = render_mosquitto_config("0.0.0.0", 1883, "/p", "/a", user="root",
                                       persistence_dir="/var/lib/edgefleet/mqtt")
    assert "WITHOUT TLS" in caplog.text
    assert "allow_anonymous false" in text and "listener 1883 0.0.0.0" in text
    assert "persistence_location /var/lib/edgefleet/mqtt/" in text and "user root" in text

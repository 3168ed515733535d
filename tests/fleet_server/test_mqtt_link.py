"""ServerLink: the server's paho adapter. Real embedded broker on loopback, plus two tiny fake
brokers (one that never answers CONNECT, one that never acknowledges) for the timeouts.

Everything paho says must come out as InboundMessage or a fleet_server.mqtt.errors error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import queue
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mqtt_helpers import DictStore, LoopThread
from paho.mqtt.enums import CallbackAPIVersion
from polling import free_port

from agent.protocol.messages import MAX_MESSAGE_BYTES
from agent.protocol.topics import desired_topic, reported_topic, subscription_filter
from fleet_server.mqtt.broker import EmbeddedBroker, server_tls_context
from fleet_server.mqtt.errors import (
    AckTimeoutError,
    BrokerUnavailableError,
    ConnectRefusedError,
    MqttTransientError,
    SubscribeRefusedError,
    TlsError,
)
from fleet_server.mqtt.link import InboundMessage, LinkConfig, ServerLink, redact_url
from fleet_server.mqtt.passwords import hash_password

pytestmark = pytest.mark.integration

WAIT = 5.0  # seconds: the bound on every wait (they normally end in milliseconds)
SERVER = "fleet-server"
SERVER_PW = "server-secret-7Qx"
DEVICE_PW = "device-secret-9Kz"
HASHES = {SERVER: hash_password(SERVER_PW), "d1": hash_password(DEVICE_PW)}


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def broker(loop_thread: LoopThread) -> Iterator[EmbeddedBroker]:
    b = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=0)
    loop_thread.run(b.start())
    yield b
    loop_thread.run(b.stop())


def url_for(b: EmbeddedBroker, password: str = SERVER_PW, scheme: str = "mqtt") -> str:
    return f"{scheme}://{SERVER}:{password}@127.0.0.1:{b.port}"


class Device:
    """A device played by a bare paho client."""

    def __init__(self, port: int, *, tls_ca: Path | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="d1-dev",
                                  reconnect_on_failure=False)
        self.client.username_pw_set("d1", DEVICE_PW)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=str(tls_ca))
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self.client.on_message = lambda c, u, m: self.messages.put(
            (m.topic, bytes(m.payload), bool(m.retain)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(WAIT)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "expected"), [
    ("mqtt://srv:pw@broker.example", ("broker.example", 1883, "srv", "pw", False)),
    ("mqtts://srv:pw@broker.example", ("broker.example", 8883, "srv", "pw", True)),
    ("mqtt://s%40rv:p%3Aw%2F@127.0.0.1:1884/", ("127.0.0.1", 1884, "s@rv", "p:w/", False)),
    ("mqtts://srv:pw@[::1]:8884", ("::1", 8884, "srv", "pw", True)),
], ids=["plain-default-port", "tls-default-port", "percent-encoded", "ipv6"])
def test_url_parsing(url: str, expected: tuple[str, int, str, str, bool]) -> None:
    c = LinkConfig.from_url(url, client_id="srv-1")
    assert (c.host, c.port, c.username, c.password, c.tls) == expected


@pytest.mark.parametrize("url", [
    "http://srv:hunter2@host",
    "mqtt://host:1883",
    "mqtt://srv@host",
    "mqtt://srv:hunter2@host:99999",
    "mqtt://srv:hunter2@host/path",
    "mqtt://srv:hunter2@host?x=1",
    "mqtt://srv:hunter2@:1883",
], ids=["scheme", "no-credentials", "no-password", "bad-port", "path", "query", "no-host"])
def test_bad_url_is_refused_without_echoing_the_password(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as info:
        LinkConfig.from_url(url, client_id="srv-1")
    assert "hunter2" not in str(info.value)


def test_tls_files_need_mqtts(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mqtts"):
        LinkConfig.from_url("mqtt://srv:pw@host", client_id="x", ca_file=tmp_path / "ca.pem")


def test_password_never_in_repr() -> None:
    config = LinkConfig.from_url("mqtt://srv:hunter2@host", client_id="x")
    link = ServerLink(config, inbox=queue.Queue())
    assert "hunter2" not in repr(config) and "hunter2" not in repr(link)
    assert redact_url("mqtts://srv:hunter2@host:8883") == "mqtts://srv:***@host:8883"


def test_delivery_must_be_one_inbox_or_a_loop_callback() -> None:
    config = LinkConfig.from_url("mqtt://srv:pw@host", client_id="x")
    with pytest.raises(ValueError, match="exactly one"):
        ServerLink(config)
    with pytest.raises(ValueError, match="exactly one"):
        ServerLink(config, inbox=queue.Queue(), on_message=print)
    with pytest.raises(ValueError, match="loop="):
        ServerLink(config, on_message=print)


def test_misuse_is_a_programming_error() -> None:
    link = ServerLink(LinkConfig.from_url("mqtt://srv:pw@host", client_id="x"),
                      inbox=queue.Queue())
    with pytest.raises(RuntimeError, match="connect"):
        link.publish(desired_topic("d1"), b"{}", retain=True)
    with pytest.raises(ValueError, match="wildcards"):
        link.publish("edgefleet/v1/devices/+/desired", b"{}", retain=True)
    with pytest.raises(ValueError, match="QoS"):
        link.publish(desired_topic("d1"), b"{}", retain=True, qos=2)
    with pytest.raises(ValueError, match="exceeds"):
        link.publish(desired_topic("d1"), b"x" * (MAX_MESSAGE_BYTES + 1), retain=True)
    link.close()  # closing a link that never connected is fine


# ---------------------------------------------------------------------------------------------
# against the real embedded broker
# ---------------------------------------------------------------------------------------------
def test_publish_retained_subscribe_and_receive(broker: EmbeddedBroker) -> None:
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    with ServerLink(LinkConfig.from_url(url_for(broker), client_id="srv-1"), inbox=inbox) as link:
        link.publish(desired_topic("d1"), b"state-1", retain=True)
        link.subscribe([subscription_filter("reported")])
        device = Device(broker.port)
        try:
            device.client.subscribe(desired_topic("d1"), qos=1)
            topic, payload, retained = device.messages.get(timeout=WAIT)
            assert (topic, payload, retained) == (desired_topic("d1"), b"state-1", True)
            device.publish(reported_topic("d1"), b"report-1")
        finally:
            device.close()
        got = inbox.get(timeout=WAIT)
    assert got == InboundMessage(reported_topic("d1"), b"report-1", qos=1, retain=False)


def test_on_message_runs_on_the_given_event_loop(broker: EmbeddedBroker) -> None:
    async def main() -> tuple[InboundMessage, bool]:
        loop = asyncio.get_running_loop()
        received: asyncio.Queue[tuple[InboundMessage, bool]] = asyncio.Queue()

        def on_message(message: InboundMessage) -> None:  # must run on this loop's thread
            received.put_nowait((message, asyncio.get_running_loop() is loop))

        link = ServerLink(LinkConfig.from_url(url_for(broker), client_id="srv-async"),
                          on_message=on_message, loop=loop)
        await asyncio.to_thread(link.connect)
        try:
            await asyncio.to_thread(link.subscribe, [subscription_filter("reported")])
            device = await asyncio.to_thread(Device, broker.port)
            try:
                await asyncio.to_thread(device.publish, reported_topic("d1"), b"async")
                return await asyncio.wait_for(received.get(), WAIT)
            finally:
                await asyncio.to_thread(device.close)
        finally:
            await asyncio.to_thread(link.close)

    message, on_loop = asyncio.run(main())
    assert message.payload == b"async" and on_loop


def test_wrong_password_is_a_fatal_connect_refusal(broker: EmbeddedBroker) -> None:
    link = ServerLink(LinkConfig.from_url(url_for(broker, "hunter2"), client_id="srv-1"),
                      inbox=queue.Queue())
    with pytest.raises(ConnectRefusedError) as info:
        link.connect(WAIT)
    assert not info.value.transient
    assert info.value.reason == "Not authorized"
    assert "hunter2" not in str(info.value)
    assert not link.connected


def test_nothing_listening_is_transient() -> None:
    link = ServerLink(LinkConfig.from_url(f"mqtt://srv:pw@127.0.0.1:{free_port()}",
                                          client_id="srv-1"), inbox=queue.Queue())
    with pytest.raises(BrokerUnavailableError) as info:
        link.connect(WAIT)
    assert info.value.transient


def test_refused_filters_are_named_and_the_rest_subscribed(broker: EmbeddedBroker) -> None:
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    with ServerLink(LinkConfig.from_url(url_for(broker), client_id="srv-1"), inbox=inbox) as link:
        with pytest.raises(SubscribeRefusedError) as info:
            link.subscribe(["outside/#", subscription_filter("reported")])
        assert info.value.refused == ("outside/#",)
        assert not info.value.transient
        device = Device(broker.port)
        try:
            device.publish(reported_topic("d1"), b"still-subscribed")
        finally:
            device.close()
        assert inbox.get(timeout=WAIT).payload == b"still-subscribed"


def test_reconnects_and_resubscribes_after_the_broker_restarts(loop_thread: LoopThread) -> None:
    first = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=0)
    loop_thread.run(first.start())
    port = first.port
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    config = LinkConfig.from_url(url_for(first), client_id="srv-1", reconnect_min=1,
                                 reconnect_max=2)
    with ServerLink(config, inbox=inbox) as link:
        link.subscribe([subscription_filter("reported")])
        loop_thread.run(first.stop())
        deadline = time.monotonic() + WAIT
        while link.connected and time.monotonic() < deadline:  # bounded poll: link notices
            threading.Event().wait(0.01)
        assert not link.connected
        with pytest.raises(MqttTransientError):
            link.publish(desired_topic("d1"), b"while-down", retain=True, timeout=0.2)

        second = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=port)
        loop_thread.run(second.start())
        try:
            assert link.wait_connected(WAIT), "paho did not reconnect"
            device = Device(port)
            try:
                device.publish(reported_topic("d1"), b"after-restart")
            finally:
                device.close()
            assert inbox.get(timeout=WAIT).payload == b"after-restart"
        finally:
            link.close()
            loop_thread.run(second.stop())


# ---------------------------------------------------------------------------------------------
# timeouts, against brokers that never answer
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def mute_broker() -> Iterator[int]:
    """Accepts TCP connections (backlog) and never reads or answers: no CONNACK."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


@pytest.fixture
def deaf_broker() -> Iterator[int]:
    """Answers CONNECT with CONNACK 0, then reads and ignores everything: no PUBACK/SUBACK."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    conns: list[socket.socket] = []

    def serve() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return  # closed at teardown
        conns.append(conn)
        with conn:
            conn.recv(4096)  # the CONNECT
            conn.sendall(b"\x20\x02\x00\x00")
            while conn.recv(4096):  # until shut down at teardown
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    for conn in conns:
        with contextlib.suppress(OSError):  # already closed if the client left first
            conn.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(WAIT)


def test_no_connack_is_an_ack_timeout(mute_broker: int) -> None:
    link = ServerLink(LinkConfig.from_url(f"mqtt://srv:pw@127.0.0.1:{mute_broker}",
                                          client_id="srv-1"), inbox=queue.Queue())
    with pytest.raises(AckTimeoutError, match="CONNACK"):
        link.connect(timeout=0.3)
    assert not link.connected


def test_no_puback_or_suback_is_an_ack_timeout(deaf_broker: int) -> None:
    link = ServerLink(LinkConfig.from_url(f"mqtt://srv:pw@127.0.0.1:{deaf_broker}",
                                          client_id="srv-1"), inbox=queue.Queue())
    link.connect(WAIT)
    try:
        with pytest.raises(AckTimeoutError, match="PUBACK") as info:
            link.publish(desired_topic("d1"), b"{}", retain=True, timeout=0.3)
        assert info.value.transient
        with pytest.raises(AckTimeoutError, match="SUBACK"):
            link.subscribe([subscription_filter("reported")], timeout=0.3)
    finally:
        link.close()


# ---------------------------------------------------------------------------------------------
# TLS (mqtts://) with the broker's CA pinned
# ---------------------------------------------------------------------------------------------
def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write_pem(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a broker certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("tls")
    ca_key, ca_cert = _make_ca(directory, "ca")
    _make_ca(directory, "other-ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return {
        "ca": directory / "ca.pem",
        "other_ca": directory / "other-ca.pem",
        "cert": _write_pem(directory / "broker.pem",
                           cert.public_bytes(serialization.Encoding.PEM)),
        "key": _write_pem(directory / "broker.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())),
    }


@pytest.fixture
def tls_broker(loop_thread: LoopThread, tls_files: dict[str, Path]) -> Iterator[EmbeddedBroker]:
    context = server_tls_context(str(tls_files["cert"]), str(tls_files["key"]))
    b = EmbeddedBroker(DictStore(HASHES), server_user=SERVER, port=0, tls=context)
    loop_thread.run(b.start())
    yield b
    loop_thread.run(b.stop())


def test_mqtts_with_pinned_ca(tls_broker: EmbeddedBroker, tls_files: dict[str, Path]) -> None:
    assert tls_broker.url.startswith("mqtts://")
    inbox: queue.Queue[InboundMessage] = queue.Queue()
    config = LinkConfig.from_url(url_for(tls_broker, scheme="mqtts"), client_id="srv-tls",
                                 ca_file=tls_files["ca"])
    with ServerLink(config, inbox=inbox) as link:
        link.subscribe([subscription_filter("reported")])
        device = Device(tls_broker.port, tls_ca=tls_files["ca"])
        try:
            device.publish(reported_topic("d1"), b"over-tls")
        finally:
            device.close()
        assert inbox.get(timeout=WAIT).payload == b"over-tls"


@pytest.mark.parametrize("ca", ["other_ca", None], ids=["other-ca", "system-cas"])
def test_mqtts_refuses_a_broker_the_pinned_ca_did_not_sign(
        tls_broker: EmbeddedBroker, tls_files: dict[str, Path], ca: str | None) -> None:
    config = LinkConfig.from_url(url_for(tls_broker, scheme="mqtts"), client_id="srv-tls",
                                 ca_file=tls_files[ca] if ca else None)
    link = ServerLink(config, inbox=queue.Queue())
    with pytest.raises(TlsError, match="does not verify") as info:
        link.connect(WAIT)
    assert not info.value.transient


def test_mqtts_with_a_missing_ca_file(tls_broker: EmbeddedBroker, tmp_path: Path) -> None:
    config = LinkConfig.from_url(url_for(tls_broker, scheme="mqtts"), client_id="srv-tls",
                                 ca_file=tmp_path / "missing.pem")
    with pytest.raises(TlsError, match="cannot load"):
        ServerLink(config, inbox=queue.Queue()).connect(WAIT)

"""The device's MQTT link (adapter around paho-mqtt 2.x; paho stops here).

Connects with the device's own credentials (MQTT 3.1.1, persistent session, a username always:
the embedded broker queues QoS 1 only for named clients), sets a retained ``offline`` status as
its last will, subscribes to its own ``desired`` (retained) and ``ack`` topics, and announces
``online`` on every (re)connect. Everything paho does on its network thread is turned into
:class:`LinkEvent` values handed to ``on_event`` (thread-safe by contract: the daemon wraps it
with ``loop.call_soon_threadsafe``). Reconnects use paho's loop with capped backoff.

paho's network thread wakes once per ``loop_timeout`` even when nothing happens (to send its
keep-alive ping on time). paho's own default is every second, which for a thousand simulated
devices on one host was a measurable share of their CPU while they had nothing to do (about
0.15 ms per device per second); here it is a sixth of the keep-alive. Publishes from other
threads still go out at once (paho wakes its thread through a socket pair), and a ping is at
most ``loop_timeout`` late, well inside the broker's 1.5 x keep-alive grace.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.errors import ConfigError, TransportError
from agent.protocol.messages import Status
from agent.protocol.provisioning import Provisioning
from agent.protocol.topics import device_topic, parse_topic

__all__ = ["DeviceLink", "LinkEvent"]

log = logging.getLogger(__name__)


def set_nodelay(client: paho.Client) -> None:
    """Disable Nagle on the client's socket: a QoS 1 publish is a small write that waits for a
    small PUBACK, and Nagle plus the peer's delayed ACK turns each into a ~20 ms stall."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # paho may also hand back an SSL or websocket wrapper
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # e.g. a socket type without TCP options
            log.debug("TCP_NODELAY not set: %s", exc)


def reconnect_jitter(min_s: float, max_s: float, rand: Callable[[], float]) -> tuple[int, int]:
    """Per-device reconnect bounds in whole seconds (paho's unit): first delay uniform in
    [min, 2*min], cap uniform in [max/2, max], never below 1 s or below each other."""
    lo = max(1, round(min_s * (1.0 + rand())))
    hi = max(lo, round(max_s * (0.5 + 0.5 * rand())))
    return lo, hi


class _Client(paho.Client):
    """paho's client, its network thread waking every ``loop_timeout`` seconds when idle
    (``loop_start`` runs ``loop_forever`` with its default timeout, which is paho's 1 s)."""

    loop_timeout = 1.0

    def loop_forever(self, timeout: float | None = None,
                     retry_first_connection: bool = False) -> MQTTErrorCode:
        return super().loop_forever(self.loop_timeout if timeout is None else timeout,
                                    retry_first_connection)


@dataclass(frozen=True)
class LinkEvent:
    kind: str  # "connected" | "disconnected" | "message" | "refused"
    topic_kind: str | None = None  # for messages: desired | ack
    payload: bytes = b""
    detail: str = ""


class DeviceLink:
    def __init__(self, prov: Provisioning, on_event: Callable[[LinkEvent], object], *,
                 clock: Callable[[], float] = time.time, keepalive: int = 30,
                 reconnect_min_s: float = 1.0, reconnect_max_s: float = 60.0,
                 rand: Callable[[], float] = random.random) -> None:
        parts = urlsplit(prov.mqtt_url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"mqtt url {prov.mqtt_url!r}: expected mqtt://host:port or "
                              "mqtts://host:port")
        self._prov = prov
        self._host = parts.hostname
        self._port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
        self._on_event = on_event
        self._clock = clock
        self._keepalive = keepalive
        self._connected = threading.Event()
        self._client = _Client(callback_api_version=CallbackAPIVersion.VERSION2,
                               client_id=f"edgefleet-{prov.device_id}",
                               protocol=paho.MQTTv311, clean_session=False)
        self._client.loop_timeout = max(1.0, keepalive / 6)
        self._client.username_pw_set(prov.mqtt_username, prov.mqtt_password)
        if parts.scheme == "mqtts":
            ctx = ssl.create_default_context()
            if prov.mqtt_ca_pem:
                with tempfile.NamedTemporaryFile("w", suffix=".pem", delete=False) as fh:
                    fh.write(prov.mqtt_ca_pem)
                ctx = ssl.create_default_context(cafile=fh.name)
            self._client.tls_set_context(ctx)
        offline = Status(device_id=prov.device_id, online=False, at=int(clock()))
        self._client.will_set(device_topic(prov.device_id, "status"), offline.to_bytes(),
                              qos=1, retain=True)
        # paho doubles the delay from min to max; jitter both per device so a fleet that lost
        # its broker at the same moment does not come back in lockstep
        lo, hi = reconnect_jitter(reconnect_min_s, reconnect_max_s, rand)
        self._client.reconnect_delay_set(lo, hi)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: paho.Client, _u: object, _flags: object, reason: object,
                    _props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._on_event(LinkEvent("refused", detail=str(reason)))
            return
        set_nodelay(client)
        dev = self._prov.device_id
        client.subscribe([(device_topic(dev, "desired"), 1), (device_topic(dev, "ack"), 1)])
        online = Status(device_id=dev, online=True, at=int(self._clock()))
        client.publish(device_topic(dev, "status"), online.to_bytes(), qos=1, retain=True)
        self._connected.set()
        self._on_event(LinkEvent("connected"))

    def _on_disconnect(self, _c: paho.Client, _u: object, _flags: object, reason: object,
                       _props: object) -> None:
        self._connected.clear()
        self._on_event(LinkEvent("disconnected", detail=str(reason)))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            device, kind = parse_topic(msg.topic)
        except ValueError:
            return
        if device != self._prov.device_id:
            return  # the broker's ACL should make this impossible; never act on it
        self._on_event(LinkEvent("message", topic_kind=kind, payload=bytes(msg.payload)))

    # -- API -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        """Start connecting in the background (returns at once; events report progress).

        Raises:
            TransportError: the host name cannot be resolved or the socket cannot be made.
        """
        try:
            self._client.connect_async(self._host, self._port, keepalive=self._keepalive)
            self._client.loop_start()
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot start MQTT to {self._host}:{self._port}: {exc}") \
                from exc

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def publish(self, kind: str, payload: bytes, *, retain: bool = False,
                timeout: float = 10.0) -> None:
        """Publish to one of this device's topics (QoS 1) and wait for the broker's PUBACK.

        Raises:
            TransportError: not connected, or no PUBACK within ``timeout``.
        """
        if not self._connected.is_set():
            raise TransportError("MQTT not connected")
        info = self._client.publish(device_topic(self._prov.device_id, kind), payload, qos=1,
                                    retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise TransportError(f"MQTT publish to {kind} failed: {paho.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise TransportError(f"MQTT publish to {kind} failed: {exc}") from exc
        if not info.is_published():
            raise TransportError(f"no PUBACK for {kind} within {timeout}s")

    def stop(self) -> None:
        """Announce offline (retained) and disconnect cleanly."""
        if self._connected.is_set():
            try:
                offline = Status(device_id=self._prov.device_id, online=False,
                                 at=int(self._clock()))
                self.publish("status", offline.to_bytes(), retain=True, timeout=2.0)
            except TransportError as exc:  # the last will says the same thing
                log.debug("offline status not sent before disconnect: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()

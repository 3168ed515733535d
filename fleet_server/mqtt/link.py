"""The fleet server's MQTT client (adapter around paho-mqtt 2.x, MQTT 3.1.1).

:class:`ServerLink` is the one place the server touches paho: it connects with the server
user's credentials (``mqtt://user:pass@host:port`` or ``mqtts://`` with the broker's CA
pinned), publishes and waits for the PUBACK, subscribes and waits for the SUBACK, and hands
incoming messages to either a ``queue.Queue`` or a callback run on an asyncio event loop.
paho's network thread, its callbacks and its ``MQTTErrorCode`` / ``ReasonCode`` values stop
here; callers see :class:`InboundMessage` and :mod:`fleet_server.mqtt.errors`.

Calls block the calling thread (up to their timeout); from asyncio use
``await asyncio.to_thread(link.publish, topic, payload, retain=True)``.

After the first successful :meth:`ServerLink.connect`, paho's loop reconnects on its own with
capped exponential backoff (``reconnect_min`` doubling up to ``reconnect_max`` seconds) and
this class subscribes again to every filter the broker accepted. While the link is down,
:meth:`ServerLink.publish` raises :class:`BrokerUnavailableError` after waiting up to its
timeout for the link to come back; it never queues silently (a QoS 1 message accepted by paho
in the instant the link drops may still go out after the reconnect: desired states are
idempotent, so a duplicate is harmless).

paho gotchas handled here: an exception raised inside a paho callback kills its network thread
unless ``suppress_exceptions`` is set (it is, and our callbacks do not raise anyway);
``MQTTMessage.topic`` raises on a topic that is not UTF-8 (such messages are dropped and
logged); ``wait_for_publish`` returns silently on timeout (we check ``is_published``) and
raises ``RuntimeError`` / ``ValueError`` for a link that is down or a full queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.protocol.messages import MAX_MESSAGE_BYTES
from fleet_server.mqtt.errors import (
    AckTimeoutError,
    BrokerUnavailableError,
    ConnectRefusedError,
    SubscribeRefusedError,
    TlsError,
)

__all__ = [
    "InboundMessage",
    "LinkConfig",
    "ServerLink",
    "redact_url",
]

logger = logging.getLogger(__name__)


class _ShutdownNoise(logging.Filter):
    """paho 2.2's network thread runs one more loop after a clean ``disconnect()`` closed the
    socket and logs "Client is not connected" at ERROR: not an error, drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


_PAHO_LOGGER = logging.getLogger(f"{__name__}.paho")
_PAHO_LOGGER.addFilter(_ShutdownNoise())


@dataclass(frozen=True)
class InboundMessage:
    """One message the broker delivered to the server."""

    topic: str
    payload: bytes
    qos: int
    #: True for a retained message sent because we subscribed (not a live publish)
    retain: bool


@dataclass(frozen=True)
class LinkConfig:
    """How the server reaches its broker. Build it with :meth:`from_url`."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    client_id: str
    tls: bool = False
    #: the broker's CA, pinned (None with TLS: the system's trust store)
    ca_file: Path | None = None
    #: client certificate and key, for a broker that asks for mutual TLS
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive: int = 30  # seconds
    #: False: the broker keeps our subscriptions and queues QoS 1 messages while we are away
    clean_session: bool = False
    reconnect_min: int = 1  # seconds, first reconnect delay
    reconnect_max: int = 30  # seconds, cap of the doubling delay
    connect_timeout: float = 10.0  # seconds, TCP + TLS + CONNACK
    ack_timeout: float = 10.0  # seconds, default wait for PUBACK / SUBACK / a reconnect
    #: QoS 1 publishes awaiting their PUBACK at once (paho's default is 20; the server
    #: publishes a rollout's desired states from several threads, see deploy.service)
    max_inflight: int = 100

    def __post_init__(self) -> None:
        if not self.host or not self.username or not self.password or not self.client_id:
            raise ValueError("LinkConfig: host, username, password and client_id are required")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"LinkConfig: port must be 1..65535, got {self.port}")
        if not self.tls and (self.ca_file or self.client_cert or self.client_key):
            raise ValueError("LinkConfig: CA or client certificate given for a plain mqtt:// "
                             "link; use mqtts://")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("LinkConfig: client_cert and client_key go together")
        if self.max_inflight < 1:
            raise ValueError(f"LinkConfig: max_inflight must be >= 1, got {self.max_inflight}")
        if not 1 <= self.reconnect_min <= self.reconnect_max:
            raise ValueError(f"LinkConfig: need 1 <= reconnect_min <= reconnect_max, got "
                             f"{self.reconnect_min} and {self.reconnect_max}")

    @classmethod
    def from_url(cls, url: str, *, client_id: str, ca_file: Path | str | None = None,
                 client_cert: Path | str | None = None, client_key: Path | str | None = None,
                 **options: Any) -> LinkConfig:
        """Parse ``mqtt://user:password@host[:1883]`` or ``mqtts://...[:8883]``.

        User and password may be percent-encoded. ``options`` are the other fields
        (``keepalive``, ``clean_session``, ``reconnect_min``, ...).

        Raises:
            ValueError: another scheme, no user or password, a path or query, a bad port, or
                TLS files with ``mqtt://``. The message never contains the password.
        """
        shown = redact_url(url)
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"broker URL: expected mqtt:// or mqtts://, got {shown!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"broker URL: expected no path, query or fragment in {shown!r}")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"broker URL: bad port in {shown!r}") from exc
        if not parts.hostname or not parts.username or not parts.password:
            raise ValueError(f"broker URL: expected mqtt[s]://user:password@host[:port], "
                             f"got {shown!r}")
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname, port=port or (8883 if tls else 1883),
            username=unquote(parts.username), password=unquote(parts.password),
            client_id=client_id, tls=tls,
            ca_file=Path(ca_file) if ca_file else None,
            client_cert=Path(client_cert) if client_cert else None,
            client_key=Path(client_key) if client_key else None,
            **options)


def _set_nodelay(client: paho.Client) -> None:
    """Disable Nagle: every QoS 1 publish waits for a small PUBACK, and Nagle plus delayed ACKs
    made each one a ~15-20 ms stall (measured by bench/outbox_drain.py)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):  # paho may also hand back an SSL or websocket wrapper
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            logger.debug("TCP_NODELAY not set: %s", exc)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return parts._replace(netloc=f"{user}:***@{netloc[1]}").geturl()


def _check_topic_name(topic: str) -> None:
    if not isinstance(topic, str) or not topic or any(c in topic for c in "+#\0"):
        raise ValueError(f"publish: expected a topic name without wildcards, got {topic!r}")


class ServerLink:
    """The server's MQTT connection. After a failed :meth:`connect` or :meth:`close`,
    :meth:`connect` may be called again.

    Deliver incoming messages to exactly one of:

    - ``inbox``: a ``queue.Queue`` that paho's thread puts :class:`InboundMessage` into
      (unbounded, or messages that find it full are dropped and logged);
    - ``on_message`` with ``loop``: called on that event loop's thread
      (``loop.call_soon_threadsafe``); never on paho's thread.

    Raises:
        ValueError: both or neither delivery given, or ``on_message`` without ``loop``.
    """

    def __init__(self, config: LinkConfig, *, inbox: queue.Queue[InboundMessage] | None = None,
                 on_message: Callable[[InboundMessage], object] | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if (inbox is None) == (on_message is None):
            raise ValueError("ServerLink: give exactly one of inbox= or on_message=")
        if on_message is not None and loop is None:
            raise ValueError("ServerLink: on_message needs loop= (it must not run on paho's "
                             "network thread)")
        self.config = config
        self._deliver: Callable[[InboundMessage], None]
        if inbox is not None:
            self._deliver = inbox.put_nowait
        else:
            assert on_message is not None and loop is not None  # checked above
            self._deliver = functools.partial(_deliver_on_loop, loop, on_message)
        self._client: paho.Client | None = None
        #: successful CONNACKs so far: a change means the broker may have lost retained state
        self.connect_count = 0
        self._connected = threading.Event()
        self._first_connack = threading.Event()
        self._refusal: str | None = None
        self._lock = threading.Condition()
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._resubscribes: dict[int, list[str]] = {}  # mid -> filters, after a reconnect
        self._filters: dict[str, int] = {}  # accepted filter -> qos, for resubscribing

    def __repr__(self) -> str:
        c = self.config
        return (f"ServerLink({'mqtts' if c.tls else 'mqtt'}://{c.username}@{c.host}:{c.port}, "
                f"client_id={c.client_id!r}, connected={self.connected})")

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """True while the link to the broker is up (CONNACK accepted, not yet lost)."""
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until the link is up or ``timeout`` seconds pass; return :attr:`connected`."""
        return self._connected.wait(timeout)

    def connect(self, timeout: float | None = None) -> None:
        """Connect and wait for the broker's CONNACK; paho keeps reconnecting afterwards.

        Raises:
            BrokerUnavailableError: the broker cannot be reached (transient).
            AckTimeoutError: no CONNACK within ``timeout`` (default ``connect_timeout``).
            ConnectRefusedError: the broker refused the credentials (fatal).
            TlsError: TLS files unusable or the broker's certificate does not verify (fatal).
            RuntimeError: already connected.
        """
        if self._client is not None:
            raise RuntimeError("ServerLink.connect: already connected")
        c = self.config
        timeout = c.connect_timeout if timeout is None else timeout
        self._first_connack.clear()
        self._refusal = None
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=c.client_id,
                             clean_session=c.clean_session,
                             protocol=MQTTProtocolVersion.MQTTv311, reconnect_on_failure=True)
        client.suppress_exceptions = True
        client.enable_logger(_PAHO_LOGGER)
        client.username_pw_set(c.username, c.password)
        client.reconnect_delay_set(c.reconnect_min, c.reconnect_max)
        client.max_inflight_messages_set(c.max_inflight)
        client.connect_timeout = timeout
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_subscribe = self._handle_subscribe
        client.on_message = self._handle_message
        where = f"{c.host}:{c.port}"
        if c.tls:
            try:
                client.tls_set(ca_certs=str(c.ca_file) if c.ca_file else None,
                               certfile=str(c.client_cert) if c.client_cert else None,
                               keyfile=str(c.client_key) if c.client_key else None,
                               cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as exc:
                raise TlsError(f"MQTT link to {where}: cannot load the TLS files: {exc}") from exc
        try:
            client.connect(c.host, c.port, keepalive=c.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(f"MQTT link to {where}: the broker's certificate does not verify "
                           f"against {c.ca_file or 'the system CAs'}: {exc.verify_message}") \
                from exc
        except ssl.SSLError as exc:
            raise TlsError(f"MQTT link to {where}: TLS handshake failed: {exc}") from exc
        except OSError as exc:
            raise BrokerUnavailableError(f"MQTT link to {where}: cannot connect: {exc}") from exc
        self._client = client
        client.loop_start()
        if not self._first_connack.wait(timeout):
            self._shut()
            raise AckTimeoutError(f"MQTT link to {where}: no CONNACK within {timeout} s")
        if self._refusal is not None:
            self._shut()
            raise ConnectRefusedError(f"MQTT link to {where}: the broker refused user "
                                      f"{c.username!r}: {self._refusal} (expected accepted)",
                                      reason=self._refusal)

    def close(self) -> None:
        """Disconnect cleanly and stop paho's thread. Idempotent."""
        self._shut()

    def _shut(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._connected.clear()  # first: the disconnect callback then knows it was on purpose
        client.disconnect()
        client.loop_stop()

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- publish / subscribe --------------------------------------------------------------
    def _require_client(self, what: str) -> paho.Client:
        if self._client is None:
            raise RuntimeError(f"ServerLink.{what}: call connect() first")
        return self._client

    def _wait_link(self, what: str, timeout: float) -> None:
        if not self._connected.wait(timeout):
            raise BrokerUnavailableError(
                f"MQTT {what}: not connected to {self.config.host}:{self.config.port} "
                f"(waited {timeout} s; paho keeps reconnecting)")

    def publish(self, topic: str, payload: bytes, *, retain: bool, qos: int = 1,
                timeout: float | None = None) -> None:
        """Publish and, for QoS 1, wait until the broker's PUBACK.

        A PUBACK means the broker took the message, not that anyone received it.

        Args:
            topic: a topic name (no wildcards).
            payload: at most :data:`MAX_MESSAGE_BYTES`; empty with ``retain`` clears the
                retained message.
            retain: keep it as the topic's retained message (desired states: True).
            qos: 0 or 1.
            timeout: seconds to wait for the link and the PUBACK, in all (default
                ``ack_timeout``).

        Raises:
            BrokerUnavailableError: the link is down (transient).
            AckTimeoutError: no PUBACK within the timeout (transient).
            ValueError: wildcard topic, QoS other than 0/1, payload too large.
            RuntimeError: not connected yet.
        """
        _check_topic_name(topic)
        if qos not in (0, 1):
            raise ValueError(f"publish: expected QoS 0 or 1, got {qos}")
        if len(payload) > MAX_MESSAGE_BYTES:
            raise ValueError(f"publish to {topic!r}: payload of {len(payload)} bytes exceeds "
                             f"{MAX_MESSAGE_BYTES}")
        client = self._require_client("publish")
        timeout = self.config.ack_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._wait_link(f"publish to {topic!r}", timeout)
        info = client.publish(topic, bytes(payload), qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerUnavailableError(f"MQTT publish to {topic!r}: {paho.error_string(info.rc)}")
        try:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
        except (RuntimeError, ValueError) as exc:
            raise BrokerUnavailableError(f"MQTT publish to {topic!r}: {exc}") from exc
        if not info.is_published():
            raise AckTimeoutError(f"MQTT publish to {topic!r}: no PUBACK within {timeout} s")

    def subscribe(self, filters: Iterable[str], *, qos: int = 1,
                  timeout: float | None = None) -> None:
        """Subscribe to topic filters and wait for the SUBACK; resubscribed after reconnects.

        Raises:
            SubscribeRefusedError: the broker refused some filters (fatal); the others are
                subscribed.
            BrokerUnavailableError: the link is down (transient).
            AckTimeoutError: no SUBACK within the timeout (transient).
            ValueError: no filters, or QoS other than 0/1.
            RuntimeError: not connected yet.
        """
        wanted = list(dict.fromkeys(filters))
        if not wanted or not all(isinstance(f, str) and f for f in wanted):
            raise ValueError(f"subscribe: expected non-empty topic filters, got {wanted!r}")
        if qos not in (0, 1):
            raise ValueError(f"subscribe: expected QoS 0 or 1, got {qos}")
        client = self._require_client("subscribe")
        timeout = self.config.ack_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self._wait_link(f"subscribe to {wanted}", timeout)
        result, mid = client.subscribe([(f, qos) for f in wanted])
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnavailableError(f"MQTT subscribe to {wanted}: "
                                         f"{paho.error_string(result)}")
        with self._lock:
            if not self._lock.wait_for(lambda: mid in self._subacks,
                                       max(0.0, deadline - time.monotonic())):
                raise AckTimeoutError(f"MQTT subscribe to {wanted}: no SUBACK within {timeout} s")
            codes = self._subacks.pop(mid)
        refused = tuple(f for f, code in zip(wanted, codes, strict=False) if code.is_failure)
        with self._lock:
            self._filters.update((f, qos) for f in wanted if f not in refused)
        if refused:
            raise SubscribeRefusedError(
                f"MQTT subscribe: the broker refused {list(refused)} for user "
                f"{self.config.username!r} (expected all granted)", refused=refused)

    # -- paho callbacks (paho's network thread; they must not raise) --------------------
    def _handle_connect(self, client: paho.Client, userdata: object, flags: object,
                        reason: ReasonCode, properties: object) -> None:
        if reason.is_failure:
            self._refusal = str(reason)
            self._connected.clear()
            logger.warning("MQTT broker %s:%d refused user %r: %s", self.config.host,
                           self.config.port, self.config.username, reason)
        else:
            self._refusal = None
            _set_nodelay(client)
            self.connect_count += 1
            self._connected.set()
            logger.info("MQTT link up to %s:%d", self.config.host, self.config.port)
            with self._lock:
                filters = list(self._filters.items())
            if filters:  # on this thread: the SUBACK cannot overtake us recording the mid
                result, mid = client.subscribe(filters)
                if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                    with self._lock:
                        self._resubscribes[mid] = [topic for topic, _qos in filters]
                else:
                    logger.warning("MQTT resubscribe failed: %s", paho.error_string(result))
        self._first_connack.set()

    def _handle_disconnect(self, client: paho.Client, userdata: object, flags: object,
                           reason: ReasonCode, properties: object) -> None:
        was_up = self._connected.is_set()
        self._connected.clear()
        if was_up:
            logger.warning("MQTT link to %s:%d lost (%s); paho reconnects with backoff",
                           self.config.host, self.config.port, reason)

    def _handle_subscribe(self, client: paho.Client, userdata: object, mid: int,
                          reasons: list[ReasonCode], properties: object) -> None:
        with self._lock:
            resubscribed = self._resubscribes.pop(mid, None)
            if resubscribed is not None:
                for topic, code in zip(resubscribed, reasons, strict=False):
                    if code.is_failure:
                        logger.error("MQTT resubscribe to %r refused after reconnect", topic)
                return
            self._subacks[mid] = list(reasons)
            self._lock.notify_all()

    def _handle_message(self, client: paho.Client, userdata: object,
                        message: paho.MQTTMessage) -> None:
        try:
            topic = message.topic
        except UnicodeDecodeError:
            logger.warning("MQTT message dropped: its topic is not UTF-8")
            return
        try:
            self._deliver(InboundMessage(topic=topic, payload=bytes(message.payload),
                                         qos=int(message.qos), retain=bool(message.retain)))
        except queue.Full:
            logger.warning("MQTT message on %r dropped: the inbox is full", topic)


def _deliver_on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[InboundMessage], object],
                     message: InboundMessage) -> None:
    try:
        loop.call_soon_threadsafe(callback, message)
    except RuntimeError:
        logger.warning("MQTT message on %r dropped: the event loop is closed", message.topic)

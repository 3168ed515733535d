"""The embedded MQTT broker (adapter around amqtt 0.12.1, MQTT 3.1.1 only).

``fleet_server serve`` runs this broker in its own event loop by default; at scale any MQTT
broker works (Mosquitto is tested: :mod:`fleet_server.mqtt.mosquitto`). Both enforce the same
rules, from :mod:`agent.protocol.topics`:

- every client authenticates with a username and a password checked against the ``$7$`` hash
  a :class:`CredentialStore` returns (:mod:`fleet_server.mqtt.passwords`); anonymous clients,
  unknown and revoked users are refused (CONNACK 5, "not authorised");
- publish, subscribe and delivery go through :func:`agent.protocol.topics.may_access`: a device
  touches only its own topics, never ``#`` or ``+``; the server user anything under
  ``edgefleet/v1/``. A refused publish is acknowledged and dropped (MQTT 3.1.1 has no way to
  say no), a refused subscription gets SUBACK 0x80. A last will on a topic the client may not
  publish is refused at CONNECT;
- packets larger than :data:`MAX_PACKET_BYTES` (a :data:`MAX_MESSAGE_BYTES` payload plus
  room for the topic) close the connection, as Mosquitto's ``max_packet_size`` does; the
  payload never reaches a subscriber. The server's ingest still checks sizes itself
  (``parse_device_message``), since another broker may be configured without a limit;
- a client silent for 1.5 x its keep-alive is disconnected, so its last will (``status``
  offline) is published.

How (amqtt gotchas, each verified in its 0.12.1 source):

- amqtt processes CONNECT *before* authentication: a clean-session CONNECT deletes the
  session holding that client id, and a persistent one takes the live connection over, even
  when the password is wrong. So this broker owns the listening socket (an amqtt ``external``
  listener), reads and checks the CONNECT itself (credentials, client-id ownership, will
  topic) and hands only admitted connections to amqtt. amqtt's own auth and topic plugins run
  the same checks again (:class:`CredentialAuthPlugin`, :class:`DeviceAclPlugin`).
- amqtt never enforces keep-alive (its broker ``handle_read_timeout`` does nothing) and has no
  packet size limit: the reader adapter handed to amqtt does both.
- amqtt publishes a last will without any topic check: hence the CONNECT check above.
- amqtt sends every newly connected client the retained messages matching *any* client's
  subscriptions, unchecked (a device would get all devices' desired and reported states):
  the writer handed to amqtt drops every PUBLISH the client may not read.
- amqtt queues QoS 1 messages for an offline persistent session only for a client with a
  username (anonymous sessions are dropped): we never allow anonymous clients anyway.
  Offline sessions expire after ``session_expiry`` seconds.
- amqtt waits 5 s for a PUBACK from a subscriber and then forgets the message: delivery to
  a slow device is best effort, which is fine because the retained desired state is the truth.

Errors: :class:`fleet_server.mqtt.errors.BrokerSetupError` when the broker cannot start (port
taken, bad address); amqtt's ``BrokerError`` never escapes. A :class:`CredentialStore` that
raises refuses that connection (fail closed) and is logged.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BrokerConfig, ListenerConfig, ListenerType
from amqtt.errors import AMQTTError
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from agent.protocol.messages import MAX_MESSAGE_BYTES
from agent.protocol.topics import may_access
from fleet_server.mqtt.errors import BrokerSetupError
from fleet_server.mqtt.mosquitto import MAX_PACKET_BYTES, is_loopback
from fleet_server.mqtt.passwords import hash_password, verify_password

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_PACKET_BYTES",
    "CredentialAuthPlugin",
    "CredentialStore",
    "DeviceAclPlugin",
    "EmbeddedBroker",
    "server_tls_context",
]

logger = logging.getLogger(__name__)

_LISTENER = "default"
_MQTT_311_LEVEL = 4
_CONNECT = 0x10
_CONNACK_BAD_PROTOCOL = 0x01
_CONNACK_NOT_AUTHORIZED = 0x05
_DUMMY_HASH = hash_password("not-a-password", salt=bytes(12))


class CredentialStore(Protocol):
    """Where the broker looks up MQTT credentials (the server's device registry)."""

    def lookup(self, username: str) -> str | None:
        """The stored ``$7$`` hash for ``username``; None if unknown or revoked.

        Called on every CONNECT, on the broker's event loop: keep it fast (an in-memory map
        or one indexed query).
        """
        ...


def server_tls_context(certfile: str | Path, keyfile: str | Path, *,
                       client_ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A TLS context for :class:`EmbeddedBroker` (TLS 1.2+; mutual TLS with a client CA).

    Raises:
        BrokerSetupError: a file is missing or unreadable, or the key does not match.
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=client_ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise BrokerSetupError(f"broker TLS: cannot load certificate {str(certfile)!r} and key "
                               f"{str(keyfile)!r}: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if client_ca_file else ssl.CERT_NONE
    return context


# ---------------------------------------------------------------------------------------------
# admission: one rule, used by the CONNECT gate and again by amqtt's auth plugin
# ---------------------------------------------------------------------------------------------
@dataclass
class _Gate:
    store: CredentialStore
    server_user: str
    sessions: Callable[[], dict[str, tuple[Session, Any]]] = field(default=dict)

    def admit(self, username: str | None, password: str | bytes | None, *,
              will_topic: str | None, client_id: str | None) -> bool:
        """May this CONNECT go ahead? Never logs the password."""
        if not username or password is None:
            logger.info("MQTT CONNECT refused: no username or no password")
            return False
        try:
            stored = self.store.lookup(username)
        except Exception:  # a failing registry refuses the client: fail closed, and say why
            logger.exception("MQTT CONNECT refused for %r: the credential store failed", username)
            return False
        if stored is None:
            verify_password(password, _DUMMY_HASH)  # same work as for a known user: no oracle
            logger.info("MQTT CONNECT refused for %r: unknown or revoked user", username)
            return False
        try:
            ok = verify_password(password, stored)
        except ValueError as exc:
            logger.warning("MQTT CONNECT refused for %r: stored hash unusable: %s", username, exc)
            return False
        if not ok:
            logger.info("MQTT CONNECT refused for %r: wrong password", username)
            return False
        if will_topic is not None and not may_access(username, will_topic, publish=True,
                                                     server_user=self.server_user):
            logger.info("MQTT CONNECT refused for %r: last will on %r is not its topic",
                        username, will_topic)
            return False
        if client_id:
            held = self.sessions().get(client_id)
            if held is not None and held[0].username not in (None, username):
                logger.warning("MQTT CONNECT refused for %r: client id %r belongs to a session "
                               "of another user", username, client_id)
                return False
        return True


class CredentialAuthPlugin(BaseAuthPlugin):
    """amqtt auth plugin: the same admission rule as the CONNECT gate (defence in depth)."""

    @dataclass
    class Config:
        gate: Any = None

    async def authenticate(self, *, session: Session) -> bool | None:
        gate: _Gate = self.config.gate
        will_topic = session.will_topic if session.will_flag else None
        # the client-id rule was applied by the gate: amqtt has already merged the session
        return gate.admit(session.username, session.password, will_topic=will_topic,
                          client_id=None)


class DeviceAclPlugin(BaseTopicPlugin):
    """amqtt topic plugin: :func:`agent.protocol.topics.may_access` for every action."""

    @dataclass
    class Config:
        server_user: str = ""

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        if session is None or not topic or not session.username:
            return False
        # RECEIVE checks a concrete topic against the subscriber: a subscription the ACL
        # allowed can still never deliver another device's topic (e.g. a hijacked session)
        publish = action == Action.PUBLISH
        allowed = may_access(session.username, topic, publish=publish,
                             server_user=self.config.server_user)
        if not allowed and action != Action.RECEIVE:
            logger.info("MQTT %s refused for %r on %r", action, session.username, topic)
        return allowed


# ---------------------------------------------------------------------------------------------
# the wire: read the CONNECT ourselves, then guard the stream amqtt reads
# ---------------------------------------------------------------------------------------------
class _Refused(Exception):
    """The first packet is not an acceptable CONNECT (internal to this module)."""

    def __init__(self, reason: str, connack: int | None) -> None:
        super().__init__(reason)
        self.connack = connack


@dataclass(frozen=True)
class _Connect:
    raw: bytes
    client_id: str
    keepalive: int
    username: str | None
    password: bytes | None
    will_topic: str | None


async def _read_connect(reader: asyncio.StreamReader, limit: int) -> _Connect:
    first = await reader.readexactly(1)
    if first[0] != _CONNECT:
        raise _Refused(f"first packet type 0x{first[0]:02x} is not CONNECT", None)
    length_bytes = b""
    length, multiplier = 0, 1
    while True:
        byte = await reader.readexactly(1)
        length_bytes += byte
        length += (byte[0] & 0x7F) * multiplier
        if not byte[0] & 0x80:
            break
        multiplier *= 128
        if multiplier > 128**3:
            raise _Refused("malformed remaining length", None)
    if length > limit:
        raise _Refused(f"CONNECT of {length} bytes exceeds {limit}", None)
    body = await reader.readexactly(length)
    return _parse_connect(first + length_bytes + body, body)


def _parse_connect(raw: bytes, body: bytes) -> _Connect:
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(body):
            raise _Refused("CONNECT is truncated", None)
        chunk = body[pos:pos + n]
        pos += n
        return chunk

    def take_field() -> bytes:
        (n,) = struct.unpack("!H", take(2))
        return take(n)

    def text(value: bytes) -> str:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Refused("CONNECT string is not UTF-8", None) from exc

    name = take_field()
    level = take(1)[0]
    if name not in (b"MQTT", b"MQIsdp"):
        raise _Refused(f"protocol name {name!r}", None)
    if level != _MQTT_311_LEVEL:
        raise _Refused(f"protocol level {level}: only MQTT 3.1.1 (4)", _CONNACK_BAD_PROTOCOL)
    flags = take(1)[0]
    if flags & 0x01:
        raise _Refused("reserved CONNECT flag set", None)
    (keepalive,) = struct.unpack("!H", take(2))
    client_id = text(take_field())
    will_topic = None
    if flags & 0x04:
        will_topic = text(take_field())
        take_field()  # will message
    username = text(take_field()) if flags & 0x80 else None
    password = take_field() if flags & 0x40 else None
    return _Connect(raw, client_id, keepalive, username, password, will_topic)


class _FrameGuard:
    """Follows MQTT framing over a byte stream; says no to a packet over the limit."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._state = "type"
        self._length = 0
        self._multiplier = 1
        self._left = 0

    def feed(self, data: bytes) -> str | None:
        """Consume ``data``; return a reason to drop the connection, or None."""
        i = 0
        while i < len(data):
            if self._state == "type":
                self._state, self._length, self._multiplier = "length", 0, 1
                i += 1
            elif self._state == "length":
                byte = data[i]
                i += 1
                self._length += (byte & 0x7F) * self._multiplier
                if byte & 0x80:
                    self._multiplier *= 128
                    if self._multiplier > 128**3:
                        return "malformed remaining length"
                    continue
                if self._length > self._limit:
                    return f"packet of {self._length} bytes exceeds {self._limit}"
                self._left = self._length
                self._state = "body" if self._left else "type"
            else:
                step = min(self._left, len(data) - i)
                self._left -= step
                i += step
                if not self._left:
                    self._state = "type"
        return None


class _GuardedReader(ReaderAdapter):
    """What amqtt reads: the CONNECT we already read, then the socket, with two limits.

    A packet over ``limit`` or silence beyond 1.5 x keep-alive ends the stream (EOF to amqtt,
    which then closes the connection and publishes the last will).
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 connect: _Connect, limit: int, who: str) -> None:
        self._reader = reader
        self._writer = writer
        self._prefix = connect.raw
        self._guard = _FrameGuard(limit)
        self._idle = 1.5 * connect.keepalive if connect.keepalive else None
        self._loop = asyncio.get_running_loop()
        self._last_rx = self._loop.time()
        self._who = who
        self._ended = False

    async def read(self, n: int = -1) -> bytes:
        if self._ended:
            return b""
        if self._prefix:
            cut = len(self._prefix) if n < 0 else n
            data, self._prefix = self._prefix[:cut], self._prefix[cut:]
            if n < 0 or len(data) == n:
                return data
            return data + await self._read_socket(n - len(data))
        return await self._read_socket(n)

    async def _read_socket(self, n: int) -> bytes:
        timeout = None
        if self._idle is not None:
            timeout = self._last_rx + self._idle - self._loop.time()
            if timeout <= 0:
                return self._end(f"silent for more than {self._idle:g} s (1.5 x keep-alive)")
        try:
            read = self._reader.read(n) if n < 0 else self._reader.readexactly(n)
            data = await asyncio.wait_for(read, timeout)
        except TimeoutError:
            return self._end(f"silent for more than {self._idle:g} s (1.5 x keep-alive)")
        self._last_rx = self._loop.time()
        reason = self._guard.feed(data)
        if reason is not None:
            return self._end(reason)
        return data

    def _end(self, reason: str) -> bytes:
        logger.warning("MQTT client %s disconnected: %s", self._who, reason)
        self._ended = True
        return b""

    def abort(self, reason: str) -> None:
        """Cut the connection now: a pending read fails, every later read is EOF."""
        if not self._ended:
            self._end(reason)
        self._writer.transport.abort()

    def feed_eof(self) -> None:
        self._reader.feed_eof()


def _publish_topic(packet: bytes) -> str | None:
    """The topic of one whole PUBLISH packet, or None if it is not exactly one well-formed one."""
    length, multiplier, i = 0, 1, 1
    while True:
        if i >= len(packet) or i > 4:
            return None
        byte = packet[i]
        i += 1
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    if i + length != len(packet) or length < 2:
        return None
    (size,) = struct.unpack_from("!H", packet, i)
    try:
        return packet[i + 2:i + 2 + size].decode("utf-8")
    except UnicodeDecodeError:
        return None


class _GuardedWriter(StreamWriterAdapter):
    """What amqtt writes to a client: every PUBLISH passes :func:`may_access` (read) first.

    amqtt 0.12.1 sends a newly connected client the retained messages matching *any* client's
    subscriptions, without a topic check (``Broker._handle_client_session``): a device would
    get every other device's retained desired and reported state. amqtt writes one whole
    packet per ``write`` call, so the check sees each PUBLISH complete; one that is not
    readable by this client is dropped (amqtt then waits 5 s for a QoS 1 PUBACK and gives up).
    """

    def __init__(self, writer: asyncio.StreamWriter, username: str, server_user: str,
                 who: str) -> None:
        super().__init__(writer)
        self._username = username
        self._server_user = server_user
        self._who = who

    def write(self, data: bytes) -> None:
        if data[:1] and data[0] >> 4 == 3:  # PUBLISH
            topic = _publish_topic(bytes(data))
            if topic is None or not may_access(self._username, topic, publish=False,
                                               server_user=self._server_user):
                logger.info("MQTT PUBLISH on %r to %s dropped: not readable by that user",
                            topic, self._who)
                return
        super().write(data)


# ---------------------------------------------------------------------------------------------
# the broker
# ---------------------------------------------------------------------------------------------
class EmbeddedBroker:
    """amqtt in this process, with edgefleet's authentication and ACL.

    Use as ``async with EmbeddedBroker(store, server_user="fleet-server") as broker:`` or call
    :meth:`start` / :meth:`stop`. Every call must come from the event loop that started it.

    Args:
        store: where credentials are looked up, on every CONNECT.
        server_user: the fleet server's MQTT username (may touch all of ``edgefleet/v1/``).
        host: address to bind; anything but loopback without ``tls`` logs a loud warning.
        port: TCP port; 0 picks a free one (read it from :attr:`port` after :meth:`start`).
        tls: a server TLS context (:func:`server_tls_context`), or None for plain MQTT.
        session_expiry: seconds an offline persistent session (and its queue) is kept.
        connect_timeout: seconds a new connection may take to send its CONNECT.
        max_packet_bytes: largest MQTT packet (remaining length) a client may send.
    """

    def __init__(self, store: CredentialStore, *, server_user: str, host: str = "127.0.0.1",
                 port: int = 1883, tls: ssl.SSLContext | None = None,
                 session_expiry: int | None = 7 * 24 * 3600, connect_timeout: float = 10.0,
                 max_packet_bytes: int = MAX_PACKET_BYTES) -> None:
        if not server_user:
            raise ValueError("EmbeddedBroker: server_user must be a non-empty username")
        if not 0 <= port <= 65535:
            raise ValueError(f"EmbeddedBroker: port must be 0..65535, got {port}")
        self._host = host
        self._requested_port = port
        self._tls = tls
        self._session_expiry = session_expiry
        self._connect_timeout = connect_timeout
        self._limit = max_packet_bytes
        self._server_user = server_user
        self._gate = _Gate(store, server_user)
        self._broker: Broker | None = None
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._pending: set[asyncio.StreamWriter] = set()  # connections not admitted yet
        self._live: dict[str, set[_GuardedReader]] = {}  # username -> admitted connections

    # -- lifecycle ------------------------------------------------------------------------
    @property
    def host(self) -> str:
        """The address the broker binds."""
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port.

        Raises:
            RuntimeError: the broker is not started.
        """
        if self._port is None:
            raise RuntimeError("EmbeddedBroker.port: the broker is not started")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (``mqtts://`` with TLS), without credentials.

        Raises:
            RuntimeError: the broker is not started.
        """
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'mqtts' if self._tls else 'mqtt'}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind the port and start serving.

        Raises:
            BrokerSetupError: the address cannot be bound or amqtt fails to start.
            RuntimeError: already started.
        """
        if self._broker is not None:
            raise RuntimeError("EmbeddedBroker.start: already started")
        if self._tls is None and not is_loopback(self._host):
            logger.warning(
                "EMBEDDED MQTT BROKER ON %s WITHOUT TLS: device passwords and desired states "
                "cross the network in clear text. Bind to 127.0.0.1 or configure TLS.",
                self._host)
        config = BrokerConfig(
            listeners={_LISTENER: ListenerConfig(type=ListenerType.EXTERNAL,
                                                 bind=f"{self._host}:{self._requested_port}")},
            session_expiry_interval=self._session_expiry,
            plugins={
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False},
                f"{__name__}.CredentialAuthPlugin": {"gate": self._gate},
                f"{__name__}.DeviceAclPlugin": {"server_user": self._server_user},
            },
        )
        try:
            broker = Broker(config)
            await broker.start()
        except AMQTTError as exc:
            raise BrokerSetupError(f"embedded broker: amqtt failed to start: {exc}") from exc
        self._gate.sessions = lambda: broker.sessions
        try:
            server = await asyncio.start_server(self._on_client, self._host,
                                                self._requested_port, ssl=self._tls)
        except OSError as exc:
            await broker.shutdown()
            raise BrokerSetupError(f"embedded broker: cannot listen on {self._host}:"
                                   f"{self._requested_port}: {exc}") from exc
        self._broker, self._server = broker, server
        self._port = server.sockets[0].getsockname()[1]
        logger.info("embedded MQTT broker listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening, drop every client, forget sessions and retained messages.

        Idempotent. A stopped broker cannot be started again: make a new one.
        """
        server, broker = self._server, self._broker
        self._server = None
        if server is not None:
            server.close()
            await server.wait_closed()
        for writer in list(self._pending):
            writer.close()
        for readers in list(self._live.values()):
            for reader in list(readers):
                reader.abort("the broker is stopping")
        if broker is not None and broker.transitions.state == "started":
            await broker.shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- revocation -----------------------------------------------------------------------
    async def disconnect(self, username: str) -> int:
        """Drop every live connection of ``username`` (call after revoking it in the store).

        The connection is cut at the socket (not through amqtt's session state, which races
        with a client still connecting). The client gets no DISCONNECT: its last will is
        published, as for any lost connection, and its reconnect is refused because the store
        no longer knows it.

        Returns:
            How many connections were dropped.

        Raises:
            RuntimeError: the broker is not started.
        """
        if self._broker is None:
            raise RuntimeError("EmbeddedBroker.disconnect: the broker is not started")
        readers = list(self._live.get(username, ()))
        for reader in readers:
            reader.abort("its credentials were revoked")
        if readers:
            logger.info("dropped %d MQTT connection(s) of %r", len(readers), username)
        return len(readers)

    # -- connections ----------------------------------------------------------------------
    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        self._pending.add(writer)
        try:
            connect = await asyncio.wait_for(_read_connect(reader, self._limit),
                                             self._connect_timeout)
            admitted = self._gate.admit(connect.username, connect.password,
                                        will_topic=connect.will_topic,
                                        client_id=connect.client_id)
            if not admitted:
                raise _Refused("not authorised", _CONNACK_NOT_AUTHORIZED)
        except _Refused as exc:
            logger.info("MQTT connection from %s refused: %s", peer, exc)
            if exc.connack is not None:
                writer.write(bytes((0x20, 0x02, 0x00, exc.connack)))
            await self._close(writer)
            return
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            logger.info("MQTT connection from %s dropped before CONNECT: %r", peer, exc)
            await self._close(writer)
            return
        finally:
            self._pending.discard(writer)
        broker = self._broker
        if broker is None:  # stopped while this client was connecting
            await self._close(writer)
            return
        username = connect.username
        assert username is not None  # admitted
        who = f"{username!r} ({connect.client_id!r} from {peer})"
        guarded = _GuardedReader(reader, writer, connect, self._limit, who)
        live = self._live.setdefault(username, set())
        live.add(guarded)
        try:  # returns when the client's connection ends
            await broker.external_connected(
                guarded, _GuardedWriter(writer, username, self._server_user, who), _LISTENER)
        finally:
            live.discard(guarded)
            if not live and self._live.get(username) is live:
                del self._live[username]

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            logger.debug("connection already broken while closing it")

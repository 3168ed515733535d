"""The device's MQTT link (adapter around paho-mqtt 2.x; paho stops here).

Connects with the device's own credentials (MQTT 3.1.1, persistent session, a username always:
the embedded broker queues QoS 1 only for named clients), sets a retained ``offline`` status as
its last will, subscribes to its own ``desired`` (retained) and ``ack`` topics, and announces
``online`` on every (re)connect. Everything paho does on its network thread is turned into
:class:`LinkEvent` values handed to ``on_event`` (thread-safe by contract: the daemon wraps it
with ``loop.call_soon_threadsafe``). Reconnects use paho's loop with capped backoff.

Who runs paho's network loop: by default each link starts its own network thread
(``loop_start``), as a device runs one link. A process hosting many links (the fleet simulator)
can hand them all to one :class:`LinkDriver` instead: one thread drives every client through
paho's external loop (``loop_read``/``loop_write``/``loop_misc`` on epoll, so neither paho's
``select()`` limit of descriptors below 1024 nor a thread per link applies), reconnecting with
the same per-link backoff bounds. The link's callbacks, events, publishes and their PUBACK
waits are the same either way; only which thread reads and writes the socket differs. Pass
``driver=`` (the daemon's ``Agent(link_driver=...)``).

paho's network thread wakes once per ``loop_timeout`` even when nothing happens (to send its
keep-alive ping on time). paho's own default is every second, which for a thousand simulated
devices on one host was a measurable share of their CPU while they had nothing to do (about
0.15 ms per device per second); here it is a sixth of the keep-alive. Publishes from other
threads still go out at once (paho wakes its thread through a socket pair), and a ping is at
most ``loop_timeout`` late, well inside the broker's 1.5 x keep-alive grace.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import random
import selectors
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

__all__ = ["DeviceLink", "LinkDriver", "LinkEvent"]

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


def _tls_pending(client: paho.Client) -> bool:
    pending = getattr(client.socket(), "pending", None)  # ssl.SSLSocket only
    return callable(pending) and pending() > 0


@dataclass
class _Driven:
    """A client the driver holds: its reconnect bounds and current delay (s), and the socket
    events it watches."""

    lo: float
    hi: float
    delay: float = 0.0
    events: int = 0


class LinkDriver:
    """One thread that runs the network loop of many paho clients (see the module docstring).

    Thread contract: :meth:`attach` and :meth:`detach` may be called from any thread; paho's
    publishes from other threads reach the driver through ``on_socket_register_write`` and a
    wake-up socket pair; everything else (connect, read, write, keep-alive, reconnect, paho's
    callbacks) happens on the driver's thread. Connecting is a blocking TCP connect on that
    thread, which suits a broker on loopback or a LAN (the simulator), not a slow WAN.
    """

    def __init__(self, *, misc_interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 name: str = "edgefleet-mqtt-driver") -> None:
        if misc_interval_s <= 0:
            raise ValueError(f"misc_interval_s: expected > 0, got {misc_interval_s}")
        self._misc_interval_s = misc_interval_s
        self._clock = clock
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._woken = False
        self._ops: collections.deque[Callable[[], None]] = collections.deque()
        self._dirty: collections.deque[paho.Client] = collections.deque()
        self._clients: dict[paho.Client, _Driven] = {}
        self._waiting: dict[paho.Client, float] = {}  # no socket: when to connect (clock)
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._started = False

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Start the driver's thread (once)."""
        if not self._started:
            self._started = True
            self._thread.start()

    def attach(self, client: paho.Client, reconnect: tuple[float, float]) -> None:
        """Drive ``client`` (``connect_async`` already called): connect now, reconnect after a
        loss with a delay doubling from ``reconnect[0]`` up to ``reconnect[1]`` seconds.

        Raises:
            RuntimeError: the driver is not running.
        """
        lo, hi = reconnect
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write

        def op() -> None:
            self._clients[client] = _Driven(lo, hi)
            self._waiting[client] = self._clock()  # connect now

        self._post(op)

    def detach(self, client: paho.Client, timeout: float = 5.0) -> bool:
        """Disconnect ``client`` (sending what is queued, then DISCONNECT) and stop driving
        it; return whether the driver confirmed within ``timeout`` seconds.

        Raises:
            RuntimeError: the driver is not running.
        """
        done = threading.Event()

        def op() -> None:
            try:
                self._clients.pop(client, None)
                self._waiting.pop(client, None)
                if client.socket() is not None:
                    client.disconnect()
                    client.loop_write()  # DISCONNECT written: paho closes the socket
            finally:
                sock = client.socket()
                if sock is not None:  # could not write it all now: leave the socket to paho
                    with contextlib.suppress(KeyError, ValueError):
                        self._sel.unregister(sock)
                done.set()

        if threading.current_thread() is self._thread:
            op()
            return True
        self._post(op)
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (clients still attached are left as they are) and free its
        selector."""
        self._closing = True
        self._wake()
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _post(self, op: Callable[[], None]) -> None:
        if not self._started or self._closing:
            raise RuntimeError("LinkDriver is not running (start() it, and not after close())")
        self._ops.append(op)
        self._wake()

    def _wake(self) -> None:
        if not self._woken:
            self._woken = True
            with contextlib.suppress(BlockingIOError, OSError):
                self._wake_w.send(b"x")

    # -- paho callbacks --------------------------------------------------------------------
    def _on_register_write(self, client: paho.Client, _u: object, _sock: object) -> None:
        self._dirty.append(client)
        if threading.current_thread() is not self._thread:
            self._wake()

    def _on_socket_open(self, client: paho.Client, _u: object, sock: object) -> None:
        # reconnect() runs on the driver's thread only
        try:
            self._sel.register(sock, selectors.EVENT_READ, client)  # type: ignore[arg-type]
        except KeyError:  # a closed socket's number, reused: forget the stale entry
            self._sel.unregister(self._sel.get_map()[sock.fileno()].fileobj)  # type: ignore[attr-defined]
            self._sel.register(sock, selectors.EVENT_READ, client)  # type: ignore[arg-type]
        entry = self._clients.get(client)
        if entry is not None:
            entry.events = selectors.EVENT_READ

    def _on_socket_close(self, _client: paho.Client, _u: object, sock: object) -> None:
        def op() -> None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)  # type: ignore[arg-type]

        if threading.current_thread() is self._thread:
            op()
        else:  # paho closes it right after this returns; epoll forgets it then
            self._ops.append(op)
            self._wake()

    # -- the driver's thread ---------------------------------------------------------------
    def _run(self) -> None:
        misc_at = self._clock() + self._misc_interval_s
        while not self._closing:
            now = self._clock()
            wait = min([misc_at, *self._waiting.values()]) - now
            for key, mask in self._sel.select(max(0.0, wait)):
                client = key.data
                if client is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    continue
                self._guarded(client, self._ready, client, mask)
                self._settle(client)  # even after an error: a closed socket is reconnected
            # before draining: whatever is queued after this is either drained below or wakes
            # the next select (a queued item seen as "already woken" is always drained below)
            self._woken = False
            while self._ops:
                op = self._ops.popleft()
                self._guarded(None, op)
            while self._dirty:
                client = self._dirty.popleft()
                if client in self._clients:
                    self._guarded(client, client.loop_write)
                    self._settle(client)
            now = self._clock()
            if now >= misc_at:
                misc_at = now + self._misc_interval_s
                for client in list(self._clients):
                    if client.socket() is not None:
                        # keep-alive ping, or drop a dead connection
                        self._guarded(client, client.loop_misc)
                        self._settle(client)
            for client in [c for c, at in self._waiting.items() if at <= now]:
                self._connect(client, now)

    def _ready(self, client: paho.Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            client.loop_read()
            while _tls_pending(client):  # decrypted bytes epoll cannot see
                client.loop_read()
        if mask & selectors.EVENT_WRITE:
            client.loop_write()

    def _guarded(self, client: paho.Client | None, fn: Callable[..., object],
                 *args: object) -> None:
        """Run one client's I/O (or a queued step: ``client`` None); an exception is logged,
        not allowed to end the thread every other link's I/O runs on. ``DeviceLink`` keeps
        its handlers' exceptions out of paho (``_emit``): paho re-handles a packet whose
        callback raised on every later read, which here would spin."""
        try:
            fn(*args)
        except Exception:
            log.exception("MQTT link %s: error in its I/O or a queued step; the driver goes on",
                          getattr(client, "_client_id", b"?") if client is not None else "-")

    def _connect(self, client: paho.Client, now: float) -> None:
        del self._waiting[client]
        try:
            client.reconnect()  # on_socket_open registers the socket; CONNECT is queued
        except (OSError, ValueError) as exc:
            log.debug("MQTT connect failed, retrying: %s", exc)
            self._schedule(client, now)
            return
        self._settle(client)

    def _schedule(self, client: paho.Client, now: float) -> None:
        entry = self._clients[client]
        entry.delay = entry.lo if entry.delay == 0 else min(2 * entry.delay, entry.hi)
        self._waiting[client] = now + entry.delay

    def _settle(self, client: paho.Client) -> None:
        """After I/O: reconnect later if the socket is gone, else watch what it needs."""
        entry = self._clients.get(client)
        if entry is None:
            return
        sock = client.socket()
        if sock is None:
            if client not in self._waiting:
                self._schedule(client, self._clock())
            return
        if client.is_connected():
            entry.delay = 0.0  # a CONNACK came: the next loss starts from the minimum again
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        if want != entry.events:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.modify(sock, want, client)
                entry.events = want


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
                 rand: Callable[[], float] = random.random,
                 driver: LinkDriver | None = None) -> None:
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
        # None: this link's own network thread (loop_start), as on a device
        self._driver = driver
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
        self._reconnect_bounds = (float(lo), float(hi))
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread) ---------------------------------------------------
    def _on_connect(self, client: paho.Client, _u: object, _flags: object, reason: object,
                    _props: object) -> None:
        if getattr(reason, "is_failure", False):
            self._emit(LinkEvent("refused", detail=str(reason)))
            return
        set_nodelay(client)
        dev = self._prov.device_id
        client.subscribe([(device_topic(dev, "desired"), 1), (device_topic(dev, "ack"), 1)])
        online = Status(device_id=dev, online=True, at=int(self._clock()))
        client.publish(device_topic(dev, "status"), online.to_bytes(), qos=1, retain=True)
        self._connected.set()
        self._emit(LinkEvent("connected"))

    def _on_disconnect(self, _c: paho.Client, _u: object, _flags: object, reason: object,
                       _props: object) -> None:
        self._connected.clear()
        self._emit(LinkEvent("disconnected", detail=str(reason)))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        try:
            device, kind = parse_topic(msg.topic)
        except ValueError:
            return
        if device != self._prov.device_id:
            return  # the broker's ACL should make this impossible; never act on it
        self._emit(LinkEvent("message", topic_kind=kind, payload=bytes(msg.payload)))

    def _emit(self, ev: LinkEvent) -> None:
        """Hand ``ev`` to ``on_event``; never let its exception into paho, which would keep
        the packet being handled and handle it again on every later read (a spin on a
        LinkDriver), or run on_disconnect before closing the socket (a dead driver thread)."""
        try:
            self._on_event(ev)
        except Exception:
            log.exception("MQTT link %s: the %s event was dropped: its handler failed",
                          self._prov.device_id, ev.kind)

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
            if self._driver is None:
                self._client.loop_start()
            else:
                self._driver.attach(self._client, self._reconnect_bounds)
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
        if self._driver is not None:
            if not self._driver.detach(self._client):
                log.warning("MQTT driver did not confirm the disconnect of %s",
                            self._prov.device_id)
            self._connected.clear()
            return
        self._client.disconnect()
        self._client.loop_stop()

"""The server's MQTT side, attached to the app by ``serve``: broker, link, ingest, publishing.

- With ``mqtt_url = "embedded"`` an amqtt broker starts in this process (no root, no external
  service), checking every CONNECT against the device table (revoked devices are refused) and
  every publish/subscribe against the per-device ACL. Otherwise the server connects to the
  broker named by ``mqtt_url`` (Mosquitto is the tested one; see ``mosquitto-config``).
- The server's own MQTT password lives in ``<data_dir>/mqtt/server.secret`` (0600).
- Incoming ``reported``/``status``/``telemetry``/``drift`` messages are stored by
  :func:`fleet_server.ingest.store_checked` on ONE worker thread (in arrival order, one
  SQLite writer). The worker takes what queued up while it was busy, up to
  :data:`INGEST_GROUP` messages, and stores it in one transaction (group commit: the
  transaction's fixed cost was most of a small batch's); their acks are queued only after the
  commit. If a group's transaction fails, its messages are stored one at a time, so one
  message the database refuses holds back no other device.
- Parsing and checking a group (:func:`fleet_server.ingest_parse.check_message`, half of
  ingest's CPU with orjson, two thirds without) runs in a
  :class:`fleet_server.ingest_parse.ParsePool` of ``parse_workers`` processes once there is a
  backlog, off the GIL: the worker hands group k+1 to the pool, stores group k meanwhile, then
  collects k+1 (in order; see the pool for what happens when a parse process dies). A lone
  message on an idle server, or every message with ``parse_workers=0``, is parsed on the
  worker thread itself, as before.
- Acks are published back from a second thread, so ingest never waits for a PUBACK: when
  several acks for one (device, stream) are waiting, only the newest (highest) is sent, since
  it covers the others.
- Desired states go out through :class:`LinkPublisher` (retained, QoS 1, PUBACK awaited).
- A maintenance loop re-signs the TUF timestamp before it expires, re-plans the rollouts (a
  bake time over, an offline device's grace run out), re-signs desired states near expiry,
  publishes anything still pending (after a broker outage, say), and evaluates the alert
  rules (:func:`fleet_server.monitoring.evaluate_alerts`). Alert webhooks go out from their
  own thread (:class:`fleet_server.monitoring.WebhookSender`): the pass only queues them.
- :attr:`MqttRuntime.counters` counts what ingest did, and the acks sent, for ``/metrics``.
- A stored ``reported`` message from a device that a rollout holds triggers a re-plan, on a
  separate worker so telemetry ingest never waits for it: the reports that arrive while one
  is queued share it (:func:`fleet_server.deploy.service.replan_after_reports`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from fleet_server.db import atomic
from fleet_server.deploy.service import advance_rollouts, publish_pending, replan_after_reports
from fleet_server.errors import BrokerError, FleetError
from fleet_server.fleet import Fleet, server_mqtt_secret
from fleet_server.ingest import IngestCounters, IngestResult, store_checked
from fleet_server.ingest_parse import (
    Checked,
    ParsePool,
    Submitted,
    check_messages,
    default_workers,
)
from fleet_server.monitoring import RecordRetention, WebhookSender, evaluate_alerts
from fleet_server.settings import SERVER_MQTT_USER

__all__ = ["LinkPublisher", "MqttRuntime", "attach_mqtt"]

log = logging.getLogger(__name__)
#: messages stored per transaction at most (group commit): enough to spread a transaction's
#: fixed cost, few enough that a group's acks are not held back long
INGEST_GROUP = 64
#: groups handed to the parse pool and not yet stored, at most: the one being stored and the
#: one being parsed meanwhile
PARSE_AHEAD = 2


class LinkPublisher:
    """The :class:`fleet_server.fleet.Publisher` over the server's MQTT link."""

    def __init__(self, link: Any) -> None:
        self._link = link

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        from agent.protocol.topics import desired_topic

        self._publish(desired_topic(device_id), envelope, retain=True)

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        from agent.protocol.topics import ack_topic

        self._publish(ack_topic(device_id), payload, retain=False)

    def _publish(self, topic: str, payload: bytes, *, retain: bool) -> None:
        try:
            self._link.publish(topic, payload, retain=retain)
        except FleetError as exc:
            raise BrokerError(f"publish to {topic} failed: {exc}") from exc


class _DbCredentials:
    """CredentialStore for the embedded broker: the server user, then live devices."""

    def __init__(self, fleet: Fleet, server_hash: str) -> None:
        self._fleet = fleet
        self._server_hash = server_hash

    def lookup(self, username: str) -> str | None:
        if username == SERVER_MQTT_USER:
            return self._server_hash
        from fleet_server.registry.devices import credential_hash

        with atomic(self._fleet.engine) as conn:
            return credential_hash(conn, username)


class MqttRuntime:
    """The server's MQTT side and maintenance loop (module docstring).

    Args:
        fleet: the open Fleet.
        maintenance_interval_s: seconds between maintenance passes.
        rollout_tick_s: while a rollout is running, seconds between re-plans that need no
            device report (a bake time ending); 0 leaves that to the maintenance pass.
        clock: unix seconds of ingest (default: the fleet's clock).
        webhooks: the alert webhook sender (default: one over the fleet's database and
            clock; its thread runs between :meth:`start` and :meth:`stop`).
        parse_workers: parse processes (default :func:`~fleet_server.ingest_parse.default_workers`:
            ``min(2, cpu_count - 1)``); 0 parses on the ingest thread. Started on the first
            backlog, not before.
        parse_timeout_s: seconds a parse process may take over a chunk before it is replaced.

    Raises:
        ValueError: ``parse_workers`` < 0.
    """

    def __init__(self, fleet: Fleet, *, maintenance_interval_s: float = 30.0,
                 rollout_tick_s: float = 1.0,
                 clock: Callable[[], float] | None = None,
                 webhooks: WebhookSender | None = None,
                 parse_workers: int | None = None,
                 parse_timeout_s: float = 30.0) -> None:
        workers = default_workers() if parse_workers is None else parse_workers
        if workers < 0:
            raise ValueError(f"MqttRuntime: expected parse_workers >= 0, got {workers}")
        self.fleet = fleet
        self.broker: Any = None
        self.link: Any = None
        self._interval = maintenance_interval_s
        self._rollout_tick = rollout_tick_s
        self._tick_task: asyncio.Task[None] | None = None
        self._clock = clock or fleet.clock
        self._task: asyncio.Task[None] | None = None
        self._ingest_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgefleet-ingest")
        # messages waiting for the ingest worker, and whether a drain is submitted
        self._inbox: deque[tuple[str, bytes]] = deque()
        self._inbox_lock = threading.Lock()
        self._draining = False
        #: the parse processes (None: parse on the ingest thread)
        self.parse_pool = (ParsePool(workers, reply_timeout=parse_timeout_s) if workers
                           else None)
        # groups taken from the inbox and not yet stored (ingest thread only), oldest first:
        # (arrival time, checked messages or the pool's ticket for them)
        self._inflight: deque[tuple[int, list[Checked] | Submitted]] = deque()
        self.ingested = 0
        self._seen_connects: int | None = None  # link.connect_count at the last pass
        # acks: one sender thread; per (device, stream) only the newest waiting ack is sent
        self._ack_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgefleet-ack")
        self._ack_lock = threading.Lock()
        self._acks: dict[tuple[str, str], bytes] = {}
        self._ack_future: concurrent.futures.Future[None] | None = None
        # re-plans after reports: one worker, one queued pass at a time (see _replan_soon)
        self._replan_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edgefleet-replan")
        self._replan_lock = threading.Lock()
        self._reported: set[str] = set()
        self._running_due = False  # the next pass also re-plans running rollouts
        self._replan_queued = False  # a pass is submitted and has not taken _reported yet
        self._replan_future: concurrent.futures.Future[None] | None = None
        self.replans = 0
        self.counters = IngestCounters()
        self.counters.parse_pool = self.parse_pool
        self.webhooks = webhooks or WebhookSender(fleet.engine, clock=fleet.clock,
                                                  allow=fleet.settings.webhook_allow_list)
        #: deletes device records older than ``record_retention_days``, from the pass
        self.retention = RecordRetention.for_days(fleet.engine,
                                                  fleet.settings.record_retention_days)

    async def start(self) -> None:
        """Start the broker (embedded) and the link; subscribe; publish what is pending.

        Raises:
            BrokerError: the broker cannot be started or reached, or refused us.
        """
        from agent.protocol.topics import server_subscriptions
        from fleet_server.mqtt.link import LinkConfig, ServerLink
        from fleet_server.mqtt.passwords import hash_password

        settings = self.fleet.settings
        secret = server_mqtt_secret(settings.data_dir)
        loop = asyncio.get_running_loop()
        if settings.mqtt_url == "embedded":
            from fleet_server.mqtt.broker import EmbeddedBroker

            self.broker = EmbeddedBroker(_DbCredentials(self.fleet, hash_password(secret)),
                                         server_user=SERVER_MQTT_USER, host=settings.mqtt_host,
                                         port=settings.mqtt_port)
            try:
                await self.broker.start()
            except (OSError, FleetError) as exc:
                raise BrokerError(f"embedded MQTT broker cannot start on "
                                  f"{settings.mqtt_host}:{settings.mqtt_port}: {exc}") from exc
            self.fleet.extra["mqtt_port"] = self.broker.port
            url = (f"mqtt://{quote(SERVER_MQTT_USER)}:{quote(secret, safe='')}@"
                   f"{settings.mqtt_host}:{self.broker.port}")
            log.info("embedded MQTT broker on %s:%d", settings.mqtt_host, self.broker.port)
        else:
            url = settings.mqtt_url
            parts = urlsplit(url)
            if parts.password is None:  # the URL names the broker; the secret file the password
                url = (f"{parts.scheme}://{quote(SERVER_MQTT_USER)}:{quote(secret, safe='')}@"
                       f"{parts.hostname}:{parts.port or 1883}")
        try:
            config = LinkConfig.from_url(url, client_id="edgefleet-server")
        except ValueError as exc:
            raise BrokerError(str(exc)) from exc
        self.link = ServerLink(config, on_message=self._on_message, loop=loop)
        try:
            await loop.run_in_executor(None, self.link.connect)
            await loop.run_in_executor(None, self.link.subscribe, server_subscriptions())
        except FleetError as exc:
            await self.stop()
            raise BrokerError(f"cannot use the MQTT broker: {exc}") from exc
        self.fleet.publisher = LinkPublisher(self.link)
        self.fleet.extra["kick"] = self._kick_threadsafe(loop)
        await loop.run_in_executor(None, publish_pending, self.fleet)
        self.webhooks.start()
        self.fleet.extra["webhooks"] = self.webhooks
        self._task = asyncio.create_task(self._maintenance(), name="edgefleet-maintenance")
        if self._rollout_tick > 0:
            self._tick_task = asyncio.create_task(self._rollout_ticker(),
                                                  name="edgefleet-rollout-tick")

    def _kick_threadsafe(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """Drop a (revoked) device's live session on the embedded broker, from any thread."""
        def kick(username: str) -> None:
            if self.broker is not None:
                asyncio.run_coroutine_threadsafe(self.broker.disconnect(username), loop)
        return kick

    def _on_message(self, msg: Any) -> None:
        """On the event loop thread: queue the message for the single ingest worker (no I/O),
        and wake it unless it is already draining the queue."""
        with self._inbox_lock:
            self._inbox.append((msg.topic, msg.payload))
            if self._draining:
                return
            self._draining = True
        self._ingest_pool.submit(self._drain)

    def _drain(self) -> None:
        """On the ingest worker: store what is queued, up to :data:`INGEST_GROUP` messages per
        transaction, until the queue is empty. Under load a group holds what arrived during
        the previous one, and is parsed by the pool while the previous one is stored; when
        idle, a message is parsed and stored alone at once."""
        inflight = self._inflight
        while True:
            with self._inbox_lock:
                if not self._inbox and not inflight:
                    self._draining = False
                    return
                group = [self._inbox.popleft()
                         for _ in range(min(len(self._inbox), INGEST_GROUP))]
            if group:
                now = int(self._clock())
                try:
                    inflight.append((now, self._parse(group, now)))
                except Exception:  # a bug (device input is refused, not raised): the drain
                    # must go on, or _draining stays set and ingest stops for every device
                    log.exception("parsing a group of %d messages failed: parsing it here",
                                  len(group))
                    inflight.append((now, check_messages(group, now)))
            # store the oldest group once the next is being parsed, or when nothing follows
            while inflight and (len(inflight) >= PARSE_AHEAD or not group
                                or not isinstance(inflight[-1][1], Submitted)):
                now, work = inflight.popleft()
                try:
                    if isinstance(work, Submitted):
                        assert self.parse_pool is not None  # only the pool hands out tickets
                        work = self.parse_pool.collect(work)
                    self._store_group(work, now)
                except Exception:  # a bug, not device input (that is refused): store the rest
                    log.exception("ingest of a group of messages failed")

    def _parse(self, group: list[tuple[str, bytes]], now: int) -> list[Checked] | Submitted:
        """Check a group on this thread, or hand it to the parse pool when there is a backlog
        (more than one message, or groups in flight) and a parse process is ready."""
        pool = self.parse_pool
        if pool is not None and (len(group) > 1 or self._inflight):
            submitted = pool.submit(group, now)
            if submitted is not None:
                return submitted
        return check_messages(group, now)

    def ingest(self, topic: str, payload: bytes) -> None:
        """Store one device message on the calling thread, as the ingest worker does: publish
        its ack (waiting until it is sent), and queue a re-plan when it is a device's reported
        state."""
        self._ingest_group([(topic, payload)])
        self.wait_acks()

    def _ingest_group(self, messages: list[tuple[str, bytes]]) -> None:
        """Check and store messages on the calling thread, in one transaction."""
        now = int(self._clock())
        self._store_group(check_messages(messages, now), now)

    def _store_group(self, checked: list[Checked], now: int) -> None:
        """Store checked messages in one transaction, then count them and queue their acks
        (only now: an ack must never cover a record that is not committed)."""
        results: list[IngestResult]
        try:
            results = store_checked(self.fleet, checked, now=now)
        except FleetError as exc:  # the database failed: the devices will resend, unacked
            if len(checked) == 1:
                log.error("ingest failed for %s: %s", checked[0].topic[:200], exc)
                return
            # one message's failure must not hold back the others: store each alone
            log.warning("ingest of %d messages in one transaction failed (%s): storing them "
                        "one at a time", len(checked), exc)
            results = []
            for one in checked:
                try:
                    results += store_checked(self.fleet, [one], now=now)
                except FleetError as error:
                    log.error("ingest failed for %s: %s", one.topic[:200], error)
        for result in results:
            self.ingested += 1
            self.counters.count(result)
            # a report moves a device's outcome at once; health numbers (telemetry, drift)
            # are judged by the next tick of the running rollouts: re-planning per telemetry
            # message cost the ingest benchmark 7-15 % of the server's CPU
            if result.kind == "reported" and result.device_id:
                self._replan_soon(result.device_id)
            if result.ack_payload is not None and result.device_id and self.fleet.publisher:
                self._ack_soon(result.device_id, result.kind, result.ack_payload)

    def _ack_soon(self, device_id: str, stream: str, payload: bytes) -> None:
        """Queue an ack (called on the ingest thread, no I/O). Acks of one stream come in
        ingest order with a growing ``upto_seq``: a newer one replaces one still waiting."""
        key = (device_id, stream)
        with self._ack_lock:
            queued = key in self._acks
            self._acks[key] = payload
            if not queued:
                self._ack_future = self._ack_pool.submit(self._send_ack, key)

    def _send_ack(self, key: tuple[str, str]) -> None:
        with self._ack_lock:
            payload = self._acks.pop(key, None)
        publisher = self.fleet.publisher
        if payload is None or publisher is None:
            return
        try:
            publisher.publish_ack(key[0], payload)
        except BrokerError as exc:  # the next batch's ack covers this one
            log.warning("ack to %s not sent: %s", key[0], exc)
            return
        self.counters.ack_sent()

    def wait_acks(self, timeout: float | None = None) -> None:
        """Block until the acks queued so far have been sent (for tests and shutdown)."""
        with self._ack_lock:
            future = self._ack_future
        if future is not None:
            future.result(timeout)

    def _replan_soon(self, device_id: str | None = None) -> None:
        """Queue a re-plan for a device's new report or health numbers (called on the ingest
        thread, no I/O), or, with no device, for the running rollouts (a bake time may have
        ended).

        Whatever arrives before the queued pass starts joins it: a burst of reports costs one
        pass, not one each.
        """
        with self._replan_lock:
            if device_id is None:
                self._running_due = True
            else:
                self._reported.add(device_id)
            if not self._replan_queued:
                self._replan_queued = True
                self._replan_future = self._replan_pool.submit(self._replan)

    def _replan(self) -> None:
        with self._replan_lock:
            devices, self._reported = self._reported, set()
            running, self._running_due = self._running_due, False
            self._replan_queued = False
        try:
            if running and _has_running_rollout(self.fleet):
                with atomic(self.fleet.engine) as conn:  # plans every rollout, reports or not
                    advance_rollouts(self.fleet, conn)
                publish_pending(self.fleet)
                self.replans += 1
            elif replan_after_reports(self.fleet, devices):
                self.replans += 1
        except FleetError as exc:  # the maintenance pass re-plans anyway
            log.error("re-plan after reports from %d device(s) failed: %s", len(devices), exc)

    def tick_rollouts(self) -> None:
        """Queue a re-plan of the running rollouts (no I/O here; :meth:`wait_replans`)."""
        self._replan_soon()

    async def _rollout_ticker(self) -> None:
        """Re-judge running rollouts every ``rollout_tick_s``: a wave's bake time ends, and
        health numbers arrive, with no report to trigger a re-plan, and waiting for the
        maintenance pass (30 s) would hold every wave that long."""
        while True:
            await asyncio.sleep(self._rollout_tick)
            self.tick_rollouts()

    def wait_replans(self, timeout: float | None = None) -> None:
        """Block until the queued re-plan, if any, has run (for tests and shutdown)."""
        with self._replan_lock:
            future = self._replan_future
        if future is not None:
            future.result(timeout)

    def _republish_after_reconnect(self) -> bool:
        """After the link reconnected, mark every desired state unpublished so the pass below
        sends it again, retained, with the same envelope: a broker restarted without
        persistence has lost every retained message, and a device that missed its state while
        offline would otherwise wait for the next change."""
        count = getattr(self.link, "connect_count", None)
        if count is None or count == self._seen_connects:
            return False
        first = self._seen_connects is None
        self._seen_connects = count
        if first:
            return False  # start() already published what was pending
        from sqlalchemy import update

        from fleet_server.db import tables

        with atomic(self.fleet.engine) as conn:
            conn.execute(update(tables.desired_states).values(published=False))
        return True

    def maintain_once(self) -> dict[str, Any]:
        """One maintenance pass (also callable from tests with an injected clock).

        Returns ``timestamp_refreshed``, ``resigned`` (devices given a newly signed desired
        state: near expiry, or moved by a rollout), ``published``, ``rollouts`` (the
        rollouts whose step did something), ``alerts`` (each alert that changed state, as
        ``"<id>:<state>"``) and ``pruned`` (device records deleted by the retention, which
        runs at most hourly).
        """
        self._republish_after_reconnect()
        fleet = self.fleet
        refreshed = fleet.repo.refresh_timestamp(fleet.now_dt())
        with atomic(fleet.engine) as conn:
            advanced = advance_rollouts(fleet, conn)
        sent = publish_pending(fleet)
        transitions = evaluate_alerts(fleet, now=fleet.now())
        if any(t.webhook for t in transitions):
            self.webhooks.notify()
        pruned = self.retention.maybe_run(fleet.now())
        return {"timestamp_refreshed": refreshed, "resigned": list(advanced.desired_changed),
                "published": sent, "rollouts": advanced.rollout_ids,
                "alerts": [f"{t.alert_id}:{t.after}" for t in transitions],
                "pruned": pruned.deleted if pruned is not None else 0}

    async def _maintenance(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._interval)
            try:
                await loop.run_in_executor(None, self.maintain_once)
            except FleetError as exc:
                log.error("maintenance pass failed (retrying in %.0fs): %s", self._interval, exc)

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # cancelled on purpose
                await self._tick_task
            self._tick_task = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):  # cancelled on purpose
                await self._task
            self._task = None
        self.fleet.publisher = None
        self.fleet.extra.pop("kick", None)
        self.fleet.extra.pop("webhooks", None)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._ingest_pool.shutdown, True)
        if self.parse_pool is not None:  # after the drain: nothing is left in flight
            await loop.run_in_executor(None, self.parse_pool.close)
        await loop.run_in_executor(None, self._ack_pool.shutdown, True)
        await loop.run_in_executor(None, self._replan_pool.shutdown, True)
        await loop.run_in_executor(None, self.webhooks.stop)
        if self.link is not None:
            await loop.run_in_executor(None, self.link.close)
            self.link = None
        if self.broker is not None:
            await self.broker.stop()
            self.broker = None


def _has_running_rollout(fleet: Fleet) -> bool:
    """Whether a rollout is running (a cheap read: most ticks find none)."""
    from sqlalchemy import select

    from fleet_server.db import tables
    from fleet_server.db.engine import reading

    with reading(fleet.engine) as conn:
        c = tables.rollouts.c
        return conn.execute(select(c.id).where(c.status == "running").limit(1)).first() \
            is not None


def attach_mqtt(app: Any, **options: Any) -> None:
    """Run an :class:`MqttRuntime` with the app's lifespan (``app.state.fleet`` must be open
    when the start-up hook runs)."""
    holder: dict[str, MqttRuntime] = {}

    async def start(app_: Any) -> None:
        runtime = MqttRuntime(app_.state.fleet, **options)
        await runtime.start()
        holder["runtime"] = runtime
        app_.state.mqtt = runtime

    async def stop(app_: Any) -> None:
        runtime = holder.pop("runtime", None)
        if runtime is not None:
            await runtime.stop()

    app.state.on_startup_extra.append(start)
    app.state.on_shutdown_extra.append(stop)


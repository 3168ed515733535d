"""The agent daemon: the ONLY place adapters are constructed and wired (composition root).

What runs, on one asyncio loop:

- the local inference API (:class:`InferenceServer` over a :class:`ModelHost`);
- the MQTT link (paho's thread hands :class:`LinkEvent` values to the loop);
- reconcile: each verified desired state becomes updates run one at a time by the
  :class:`UpdateRunner` in a worker thread (it blocks on downloads and health checks), with
  transient failures retried on a capped, jittered backoff;
- a tick every ``metrics_interval_s``: per-request metrics and finished drift windows go into the
  outbox; when connected, outbox batches go out and the server's acks delete them (the sender
  sleeps until there is something to send: see :meth:`Agent._syncer`);
- ``GET /metrics`` on the local API (:mod:`agent.serving.prom`, a registry per Agent): the
  running totals of the per-request metrics, the outbox, the link and the served models, all
  read when scraped.

Serving and buffering go on while the broker or the server is unreachable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tuf.ngclient.fetcher import FetcherInterface

from agent.buffer.store import Outbox
from agent.config import AgentConfig
from agent.drift.summary import DRIFT_SUMMARY_KIND, DriftMonitor
from agent.errors import AgentError, ArtifactError, ConfigError, StoreError, TransportError
from agent.metrics import METRICS_KIND, RequestMetrics
from agent.protocol.messages import Ack, DesiredState, Reported, RunningModel
from agent.protocol.profiles import DeviceProfile, load_profiles
from agent.protocol.provisioning import Provisioning, ProvisioningError
from agent.protocol.signed import (
    DesiredStateRejected,
    ReplayedSequence,
    trusted_keys_from_pem,
    verify_desired,
)
from agent.serving.host import ModelHost
from agent.serving.prom import AgentMetrics, AgentState, ServedModel
from agent.serving.runtime import installed_runtimes, runtime_for
from agent.serving.server import InferenceServer
from agent.transport.artifacts import ArtifactFetcher
from agent.transport.backoff import backoff_delay
from agent.transport.mqtt import DeviceLink, LinkDriver, LinkEvent
from agent.updater.health import RuntimeHealthChecker
from agent.updater.records import StateStore, UpdateRecord
from agent.updater.runner import TargetsFetcher, UpdateReport, UpdateRunner
from agent.updater.slots import ModelStore
from agent.updater.verify import ArtifactVerifier

__all__ = ["AGENT_VERSION", "Agent", "device_profile", "load_provisioning"]

log = logging.getLogger(__name__)

#: the host's error kind -> the error bucket of agent.metrics (4xx refused, 5xx our fault)
_METRICS_ERRORS = {"input": "4xx", "runtime": "runtime", "internal": "5xx"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "0+unknown"


AGENT_VERSION = _version()


def load_provisioning(path: Path) -> Provisioning:
    """Read the provisioning file; refuse one that others can read (it holds secrets).

    Raises:
        ConfigError: missing, unreadable, readable by others, or malformed.
    """
    try:
        mode = path.stat().st_mode & 0o777
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"provisioning file {path}: {exc}") from exc
    if mode & 0o077:
        raise ConfigError(f"provisioning file {path} is readable by others (mode {mode:o}); "
                          "expected 0600: it holds the device's secrets")
    try:
        return Provisioning.from_bytes(raw)
    except ProvisioningError as exc:
        raise ConfigError(f"provisioning file {path}: {exc}") from exc


def device_profile(name: str, directory: Path | None = None) -> DeviceProfile:
    """The profile this device was provisioned with (shipped ``device_profiles/``).

    Raises:
        ConfigError: unknown profile, or malformed profile files.
    """
    from device_profiles import PROFILE_DIR

    try:
        profiles = load_profiles(directory or PROFILE_DIR)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if name not in profiles:
        raise ConfigError(f"profile {name!r} from the provisioning file is not known to this "
                          f"agent; known: {', '.join(sorted(profiles))}")
    return profiles[name]


@dataclass
class _Status:
    applied_sequence: int = 0
    state: str = "Idle"
    last_result: str | None = None
    last_error: str | None = None
    refused: dict[int, str] = field(default_factory=dict)


class Agent:
    """One device's daemon. Build with a config, then ``await agent.run(stop_event)``."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 profiles_dir: Path | None = None,
                 tuf_fetcher: FetcherInterface | None = None,
                 link_driver: LinkDriver | None = None) -> None:
        # tuf_fetcher: the HTTP fetcher under tuf.ngclient (default: the device token over
        # kept-alive http.client connections); fleet_server.simulate wraps it to inject slow
        # or broken links. link_driver: the thread that runs the MQTT link's network loop
        # (default: the link's own paho thread, as on a device); the simulator passes one
        # shared by every agent of a process
        self.config = config
        self.clock = clock
        self._rand = rand
        self.prov = load_provisioning(config.provisioning)
        self.profile = device_profile(self.prov.profile, profiles_dir)
        self._keys = trusted_keys_from_pem(self.prov.director_keys_pem)
        config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # bounded: binary request inputs are views into their request bodies, so every entry
        # keeps a body alive until the next tick bins it
        self._observed: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=2_048)
        self.metrics = RequestMetrics(start=clock())
        self.prom = AgentMetrics(self._prom_state, self.metrics, info={
            "agent_version": AGENT_VERSION, "device_id": self.prov.device_id,
            "profile": self.prov.profile})
        self.host = ModelHost(workers=2, on_request=self._observe)
        self.server = InferenceServer(self.host, bind_host=config.http_host,
                                      port=config.http_port,
                                      max_body_bytes=config.max_body_bytes,
                                      metrics=self.prom.render)
        self.models = ModelStore(config.data_dir, on_activate=self._on_activate)
        self.state = StateStore.in_dir(config.data_dir)
        self.outbox = Outbox.open(config.data_dir / "outbox.db", device_id=self.prov.device_id,
                                  max_rows=config.outbox_max_rows, now=clock())
        # drift monitors are built at the first prediction a model serves, not at activation:
        # building one costs ~1.2 ms of a ~25 ms update, and most devices of a rollout serve
        # nothing during it. `_drift` holds the built ones, `_drift_pending` the (version,
        # baseline) of what serves and has not been asked yet; one lock for both, because
        # activation runs in the update worker thread and the tick in the loop thread
        self._drift: dict[str, DriftMonitor] = {}
        self._drift_pending: dict[str, tuple[str, Mapping[str, Any]]] = {}
        self._drift_lock = threading.Lock()
        # only the engine this device's profile uses is imported (a TFLite device never loads
        # onnxruntime); a missing one is logged and every artifact for it is refused
        installed = installed_runtimes([self.profile.runtime])
        # the checker hands the model that passed to the activation (_on_activate), so serving
        # runs the very session it checked and the file is not loaded twice
        self.checker = RuntimeHealthChecker(self.profile, hand_over=True)
        self.runner = UpdateRunner(
            store=self.state, installer=self.models,
            fetcher=TargetsFetcher(ArtifactFetcher(self.prov, config.data_dir,
                                                   max_bytes=config.max_download_bytes,
                                                   fetcher=tuf_fetcher)),
            verifier=ArtifactVerifier(
                self.profile, runtimes=tuple(installed),
                runtime_versions={k: v for k, v in installed.items() if v is not None}),
            checker=self.checker,
            reporter=self, clock=clock, loop_limit=config.boot_loop_limit)
        self.status = _Status(applied_sequence=self.state.applied_sequence())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[LinkEvent] | None = None
        self.link: DeviceLink | None = None
        self._desired: asyncio.Queue[DesiredState] | None = None
        self._sent = {"telemetry": 0, "drift": 0}  # highest seq published on this connection
        self._acked = {"telemetry": 0, "drift": 0}  # highest seq the server acked
        self._acked_at: dict[str, float] = {}  # stream -> clock() of its last ack (this run)
        self._window_rows = 16 * config.sync_batch  # unacked rows in flight per stream
        self._sync_wake: asyncio.Event | None = None
        self._link_driver = link_driver

    # -- serving side -------------------------------------------------------------------
    def _observe(self, name: str, version: str, latency_ms: float, ok: bool,
                 error_kind: str | None, inputs: Mapping[str, np.ndarray] | None,
                 outputs: Mapping[str, np.ndarray] | None) -> None:
        """Per request, in the thread that ran it (often the loop's): cheap and thread-safe
        (one counter update and a deque append); aggregated on the tick and at scrape time."""
        self.metrics.observe(name, version, latency_ms, ok,
                             None if ok else _METRICS_ERRORS.get(error_kind or "", "5xx"))
        if ok and inputs is not None and outputs is not None and (
                name in self._drift or name in self._drift_pending):
            self._observed.append((name, version, inputs, outputs))

    def _prom_state(self) -> AgentState:
        """What ``GET /metrics`` reads at scrape time (a worker thread; may block on SQLite)."""
        try:
            outbox = self.outbox.stats()
        except StoreError as exc:  # failed or closing: serve the rest of the metrics
            log.warning("metrics scrape without the outbox: %s", exc)
            outbox = None
        return AgentState(
            now=self.clock(),
            models=[ServedModel(i.name, i.version, self.host.runs_inline(i.name))
                    for i in self.host.list()],
            connected=self.link is not None and self.link.connected,
            last_ack=dict(self._acked_at), outbox=outbox)

    def _on_activate(self, name: str, version: str | None, path: Path | None) -> None:
        """ModelStore hook: serve what ``current`` now points to (idempotent)."""
        if version is None or path is None:
            self.host.remove(name)
            self._forget_drift(name)
            return
        manifest = self.models.manifest(name, version)
        model_path = self.models.model_path(name, version)
        loaded = self.checker.take(model_path)  # the session the health check just ran
        if loaded is None:  # start-up, rollback, or a check in another process (a crash)
            loaded = runtime_for(manifest.runtime).load(
                model_path, threads=self.profile.threads,
                providers=self.profile.execution_providers)
        self.host.swap(name, version, loaded, manifest=manifest)
        with self._drift_lock:
            self._drift.pop(name, None)
            self._drift_pending[name] = (version, manifest.drift_baseline)

    def _forget_drift(self, name: str) -> None:
        with self._drift_lock:
            self._drift.pop(name, None)
            self._drift_pending.pop(name, None)

    def _monitor(self, name: str) -> DriftMonitor | None:
        """``name``'s drift monitor, built now if this is its first prediction (loop thread)."""
        with self._drift_lock:
            monitor = self._drift.get(name)
            if monitor is not None or name not in self._drift_pending:
                return monitor
            version, baseline = self._drift_pending.pop(name)
            try:
                monitor = DriftMonitor(baseline, window=self.config.drift_window,
                                       window_s=self.config.drift_window_s, model=name,
                                       version=version)
            except ValueError as exc:  # a bundle without a usable baseline still serves
                log.warning("no drift monitoring for %s %s: %s", name, version, exc)
                return None
            self._drift[name] = monitor
            return monitor

    def load_current(self) -> None:
        """Serve every model whose ``current`` pointer is set (start-up)."""
        root = self.config.data_dir / "models"
        for entry in sorted(root.iterdir()) if root.is_dir() else []:
            version = self.models.current(entry.name)
            if version and self.models.is_complete(entry.name, version):
                try:
                    self._on_activate(entry.name, version,
                                      self.models.model_path(entry.name, version).parent)
                except AgentError as exc:
                    log.error("cannot serve %s %s: %s", entry.name, version, exc)

    # -- reporting ------------------------------------------------------------------------
    def report(self, report: UpdateReport) -> None:
        """Reporter seam of the runner (worker thread): remember it for ``reported``.

        Not published here: the reconciler publishes ``reported`` once the desired state is
        applied (and before each backoff wait when it is not), so an update costs the server one
        message, not two, and that one already carries the new ``applied_sequence``: the first
        of two said "Committed, sequence not yet applied", which no server decision uses. At
        start-up (the unfinished update) nothing is connected yet; the connect publishes it.
        """
        self.status.state = report.state
        self.status.last_result = report.result
        self.status.last_error = report.error

    def running(self) -> tuple[RunningModel, ...]:
        out = []
        for info in self.host.list():
            sha = info.manifest.file.sha256 if info.manifest is not None else "0" * 64
            out.append(RunningModel(name=info.name, version=info.version, sha256=sha))
        return tuple(sorted(out, key=lambda r: r.name))

    def reported(self) -> Reported:
        return Reported(device_id=self.prov.device_id,
                        applied_sequence=self.status.applied_sequence, running=self.running(),
                        state=self.status.state, last_result=self.status.last_result,
                        last_error=self.status.last_error, agent_version=AGENT_VERSION,
                        reported_at=int(self.clock()))

    def _publish_reported(self) -> None:
        if self.link is None or not self.link.connected:
            return
        try:
            self.link.publish("reported", self.reported().to_bytes(), retain=True)
        except TransportError as exc:  # level-triggered: the next (re)connect reports again
            log.info("reported state not sent now: %s", exc)

    def _publish_reported_threadsafe(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(
                lambda: self._loop.run_in_executor(None, self._publish_reported))  # type: ignore[union-attr]

    # -- reconcile ------------------------------------------------------------------------
    def _on_desired(self, payload: bytes) -> DesiredState | None:
        try:
            return verify_desired(payload, public_keys=self._keys,
                                  device_id=self.prov.device_id,
                                  last_sequence=self.status.applied_sequence,
                                  now=int(self.clock()))
        except ReplayedSequence as exc:
            if getattr(exc, "same_as_last", False):
                return None  # the retained state we already applied, seen again on reconnect
            self._refuse(exc)
        except DesiredStateRejected as exc:
            self._refuse(exc)
        return None

    def _refuse(self, exc: Exception, *, publish: bool = True) -> None:
        """Record a refusal in the reported state; ``publish=False`` when the caller (the
        reconciler) publishes once anyway, so a refusal costs one ``reported``, not two."""
        log.warning("desired state refused: %s", exc)
        self.status.last_result = "refused"
        self.status.last_error = f"desired state refused: {exc}"
        if publish:
            self._publish_reported_threadsafe()

    def reconcile(self, state: DesiredState) -> None:
        """Worker thread: run every update this state asks for, one at a time.

        Raises:
            TransportError: a download failed transiently (the caller retries with backoff).
        """
        wanted = {m.name for m in state.models}
        for model in state.models:
            if self.models.current(model.name) == model.version:
                if self.host.get(model.name) is None:
                    self._on_activate(model.name, model.version,
                                      self.models.model_path(model.name, model.version).parent)
                continue
            record = self.state.get(UpdateRecord.make_id(state.sequence, model.name))
            if record is not None and record.finished:
                continue  # this update already ended (e.g. rolled back): don't loop on it
            if record is not None:
                self.runner.resume()
            else:
                self.runner.start(model, state.sequence)
        for info in self.host.list():
            if info.name not in wanted:  # no longer desired: stop serving it
                self.host.remove(info.name)
                self._forget_drift(info.name)
        self.state.set_applied_sequence(state.sequence)
        self.status.applied_sequence = state.sequence

    async def _reconciler(self) -> None:
        assert self._desired is not None
        loop = asyncio.get_running_loop()
        while True:
            state = await self._desired.get()
            attempt = 0
            while True:
                # a newer state supersedes this one before we retry
                while not self._desired.empty():
                    state = self._desired.get_nowait()
                try:
                    await loop.run_in_executor(None, self.reconcile, state)
                    break
                except TransportError as exc:
                    delay = backoff_delay(attempt, base=self.config.reconnect_min_s,
                                          cap=self.config.reconnect_max_s, rand=self._rand)
                    log.info("update waits %.1fs after a transient error: %s", delay, exc)
                    attempt += 1
                    # what finished before the error (another model's update) is reported now
                    await loop.run_in_executor(None, self._publish_reported)
                    await asyncio.sleep(delay)
                except ArtifactError as exc:
                    self._refuse(exc, publish=False)  # published below, once
                    break
                except AgentError as exc:
                    log.error("update of sequence %d failed: %s", state.sequence, exc)
                    break
            await loop.run_in_executor(None, self._publish_reported)

    # -- outbox ---------------------------------------------------------------------------
    def tick(self) -> int:
        """Move metrics and finished drift windows into the outbox (loop thread); return how
        many rows that appended."""
        now = self.clock()
        appended = 0
        while self._observed:
            name, _version, inputs, outputs = self._observed.popleft()
            monitor = self._monitor(name)
            if monitor is None:
                continue
            try:
                summary = monitor.observe(inputs, outputs, now)
            except ValueError as exc:
                log.warning("drift monitor for %s: %s", name, exc)
                continue
            if summary is not None:
                self.outbox.append("drift", DRIFT_SUMMARY_KIND, summary.to_body(),
                                   at=summary.end, priority="summary")
                appended += 1
        with self._drift_lock:
            monitors = list(self._drift.values())
        for monitor in monitors:  # windows that ran out of time, not of samples
            if monitor.due(now):
                summary = monitor.flush()
                if summary is not None:
                    self.outbox.append("drift", DRIFT_SUMMARY_KIND, summary.to_body(),
                                       at=summary.end, priority="summary")
                    appended += 1
        bodies = self.metrics.flush(now)
        if bodies:
            self.outbox.append_many("telemetry", [(METRICS_KIND, b, now) for b in bodies],
                                    priority="metrics")
        return appended + len(bodies)

    def batches(self) -> list[tuple[str, bytes, int]]:
        """Held records not yet sent on this connection, as (stream, payload, last seq).

        What was sent but not acked is sent again after a reconnect (``_sent`` resets); the
        server de-duplicates on sequence, so nothing is counted twice.
        """
        out = []
        for stream in ("telemetry", "drift"):
            if self._sent[stream] - self._acked[stream] >= self._window_rows:
                continue  # enough in flight: wait for the server's ack
            for payload, last in self.outbox.build_payloads(stream, self.config.sync_batch,
                                                            after=self._sent[stream]):
                out.append((stream, payload, last))
        return out

    def send(self, payloads: list[tuple[str, bytes, int]]) -> int:
        """Publish payloads, awaiting each PUBACK (worker thread). Returns how many went.

        Raises:
            TransportError: the link dropped; what was not acked stays in the outbox.
        """
        if self.link is None or not self.link.connected:
            return 0
        for stream, payload, last in payloads:
            self.link.publish(stream, payload)
            self._sent[stream] = max(self._sent[stream], last)
        return len(payloads)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.metrics_interval_s)
            self._tick_and_wake()

    def _tick_and_wake(self) -> None:
        """One tick; the syncer wakes only when the tick gave it rows to send."""
        if self.tick():
            self._wake_sync()

    def _wake_sync(self) -> None:
        if self._sync_wake is not None:
            self._sync_wake.set()

    async def _syncer(self) -> None:
        """Drain the outbox continuously while connected, at most ``_window_rows`` unacked per
        stream; then sleep, with no timer, until something gives it work.

        What :meth:`batches` returns changes only when rows are appended, acked or the link
        comes up, and each of those wakes it (``_wake_sync``):

        - rows appended: only the tick writes the outbox (:meth:`_tick_and_wake`; an eviction's
          event row comes with an append, a corrupt file's reset row is written at open,
          before any connect; ``reported`` is published directly, not through the outbox);
        - an ack: it deletes rows and reopens a stream's window (``_events_loop``);
        - a (re)connect: what was sent but not acked goes again (``_events_loop``);
        - a link going down gives it nothing to do (``batches`` needs a connected link).

        Only a failed send sleeps with a timeout (``metrics_interval_s``): a PUBACK that did not
        come in time leaves rows to send while still connected, and nothing else would say so.
        """
        assert self._sync_wake is not None
        loop = asyncio.get_running_loop()
        while True:
            # cleared before looking: a wake that comes during a send is not lost
            self._sync_wake.clear()
            retry_in: float | None = None
            payloads = (self.batches()
                        if self.link is not None and self.link.connected else [])
            if payloads:
                try:
                    await loop.run_in_executor(None, self.send, payloads)
                    continue
                except TransportError as exc:
                    log.info("sync paused: %s", exc)
                    retry_in = self.config.metrics_interval_s
            if retry_in is None:
                await self._sync_wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sync_wake.wait(), retry_in)

    # -- link events ----------------------------------------------------------------------
    async def _events_loop(self) -> None:
        assert self._events is not None and self._desired is not None
        loop = asyncio.get_running_loop()
        while True:
            ev = await self._events.get()
            if ev.kind == "connected":
                log.info("connected to the fleet")
                self._sent = {"telemetry": 0, "drift": 0}  # resend whatever was not acked
                self._wake_sync()
                await loop.run_in_executor(None, self._publish_reported)
            elif ev.kind == "refused":
                log.error("broker refused this device: %s", ev.detail)
            elif ev.kind == "message" and ev.topic_kind == "desired":
                state = self._on_desired(ev.payload)
                if state is not None:
                    await self._desired.put(state)
            elif ev.kind == "message" and ev.topic_kind == "ack":
                try:
                    ack = Ack.from_bytes(ev.payload)
                except ValueError as exc:
                    log.warning("malformed ack ignored: %s", exc)
                    continue
                if ack.device_id == self.prov.device_id:
                    self.outbox.ack(ack.stream, ack.upto_seq)
                    self._acked[ack.stream] = max(self._acked[ack.stream], ack.upto_seq)
                    self._acked_at[ack.stream] = self.clock()
                    self._wake_sync()

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, *, ready: Callable[[Agent], None] | None = None
                  ) -> None:
        """Run until ``stop`` is set.

        Raises:
            ConfigError: the configuration cannot work (e.g. the port is taken).
        """
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self._desired = asyncio.Queue()
        self._sync_wake = asyncio.Event()
        loop = self._loop
        try:  # an update the last run died in: finish it before serving `current`
            await loop.run_in_executor(None, self.runner.resume)
        except TransportError as exc:
            log.info("unfinished update waits for the network: %s", exc)
        except AgentError as exc:
            log.error("resuming the unfinished update failed: %s", exc)
        await loop.run_in_executor(None, self.load_current)
        try:
            await self.server.start()
        except OSError as exc:
            raise ConfigError(f"local inference API cannot listen on "
                              f"{self.config.http_host}:{self.config.http_port}: {exc}") from exc
        events = self._events
        self.link = DeviceLink(self.prov, lambda ev: loop.call_soon_threadsafe(
            events.put_nowait, ev), clock=self.clock,
            reconnect_min_s=self.config.reconnect_min_s,
            reconnect_max_s=self.config.reconnect_max_s, driver=self._link_driver)
        self.link.start()
        tasks = [asyncio.create_task(c) for c in (self._events_loop(), self._reconciler(),
                                                  self._ticker(), self._syncer())]
        if ready is not None:
            ready(self)
        try:
            await stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.tick()
            await loop.run_in_executor(None, self.link.stop)
            await self.server.stop()
            self.checker.release()
            self.host.close()
            self.outbox.close()
            self.state.close()

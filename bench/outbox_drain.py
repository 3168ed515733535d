"""Benchmark: a device outbox backlog drained over a real MQTT broker into the fleet server.

The issue's goal: "Outbox: a 1M-row backlog drained to a real broker and acked in <= 60 s".

Usage::

    .venv/bin/python bench/outbox_drain.py --rows 200000            # ~1 minute
    .venv/bin/python bench/outbox_drain.py                          # 1,000,000 rows, Mosquitto
    .venv/bin/python bench/outbox_drain.py --broker embedded        # amqtt in this process
    .venv/bin/python bench/outbox_drain.py --batch 2000 --window 32
    .venv/bin/python bench/outbox_drain.py --device-process         # device without our GIL

Everything is real and in this process, except Mosquitto (a child process on a free loopback
port, :class:`fleet_server.mqtt.mosquitto.MosquittoProcess`) and, with ``--device-process``,
the device side (a spawned process; as on a real deployment, device and server then do not
share a GIL):

1. **server**: a fresh data directory (``init_data_dir``), one device provisioned through the
   library (``registry.devices.provision``), the broker (Mosquitto with the server's and the
   device's password hashes, or with ``--broker embedded`` the amqtt broker on the server's
   loop), and the server's :class:`fleet_server.runtime.MqttRuntime` on its own asyncio loop
   thread: link, single ingest worker, acks.
2. **fill**: ``--rows`` metrics rows appended to a real outbox file with ``append_many`` in
   transactions of ``--chunk`` rows (append rate timed; building the bodies is not).
3. **drain**: the device side is played with the agent's own parts: ``Outbox.build_payloads``
   (``after=`` the last seq sent, so several batches can be in flight), ``DeviceLink.publish``
   (QoS 1, waits for the broker's PUBACK), and ``Outbox.ack`` on every ack the server sends.
   At most ``--window`` messages are published and not yet acked by the server. It stops when
   the outbox is empty, then checks that the server stored exactly ``--rows`` records for the
   device (distinct seqs 1..rows) and that the last ack was ``rows``.

Reported (Markdown on stdout, progress on stderr): append rows/s; drain wall time, rows/s and
messages/s; the server's ingest rate (records over the time from its first telemetry message
to its last); CPU seconds over the drain (``getrusage(RUSAGE_SELF)`` of the Python process,
plus the device process's with ``--device-process``), split per thread from
``/proc/self/task``, Mosquitto's, and what other processes on the machine used meanwhile (a
shared machine slows the wall times, not the CPU seconds); where the device's drain loop and
the server's ingest worker spent their wall time; PASS/MISS against the goal (for fewer rows,
on the time projected to 1M at the measured rate).

To measure, this script wraps two things it owns at run time (no library code changes): the
outbox instance's ``sync`` (the WAL checkpoint inside ``build_payloads``) and the runtime
instance's ``_store_group`` (the messages of one transaction) plus the fleet's ``publisher``
(the ack publish, PUBACK awaited).

Files go to ``--dir`` (default ``bench/out/outbox_drain``, gitignored), emptied first.
Exit codes: 0 done (goals are reported, never asserted), 1 error or failed check, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the sys.path line above
from procstat import log, machine_cpu, process_cpu, stat_cpu, thread_cpu  # noqa: E402

from agent.buffer import Outbox  # noqa: E402
from agent.protocol.messages import Ack  # noqa: E402
from agent.transport.mqtt import DeviceLink, LinkEvent  # noqa: E402

DEVICE = "bench-drain-01"
GOAL_ROWS = 1_000_000
GOAL_S = 60.0
ACK_TIMEOUT_S = 60.0  # no ack for this long while messages are in flight: the run failed
T = TypeVar("T")




# ---------------------------------------------------------------------------------------------
# CPU accounting: per thread from /proc, the broker's from its /proc entry
# ---------------------------------------------------------------------------------------------






def child_cpu(comm: str) -> float | None:
    """CPU seconds of this process's children named ``comm`` (None: none found)."""
    pids: set[str] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as fh:
                pids.update(fh.read().split())
        except OSError:
            continue
    total = None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii") as fh:
                if fh.read().strip() != comm:
                    continue
        except OSError:
            continue
        cpu = stat_cpu(f"/proc/{pid}/stat")
        if cpu is not None:
            total = (total or 0.0) + cpu
    return total






@dataclass(frozen=True)
class Snapshot:
    """CPU counters at one instant."""

    process: float  # this process
    threads: dict[str, float]  # this process's threads, by name
    machine: float  # every CPU of the machine, busy
    broker: float | None  # the Mosquitto child, if any


def snapshot() -> Snapshot:
    return Snapshot(process_cpu(), thread_cpu(), machine_cpu(), child_cpu("mosquitto"))


def thread_group(name: str, *, device_main: bool = True) -> str:
    """Which side a thread belongs to, for the CPU table (``device_main``: the main thread
    runs the drain loop)."""
    if name == "MainThread":
        return ("device: drain loop (build_payloads, publish, ack)" if device_main
                else "bench: main thread (waits for the device process)")
    if name == f"paho-mqtt-client-edgefleet-{DEVICE}":
        return "device: paho network thread"
    if name == "paho-mqtt-client-edgefleet-server":
        return "server: paho network thread (link)"
    if name.startswith("edgefleet-ingest"):
        return "server: ingest worker (parse, SQL)"
    if name.startswith("edgefleet-parse-send"):
        return "server: parse pool senders (work to the parse processes)"
    if name.startswith("edgefleet-ack"):
        return "server: ack thread (ack publish)"
    if name == "bench-server-loop":
        return "server: asyncio loop (runtime; embedded broker)"
    return f"other: {name}"


# ---------------------------------------------------------------------------------------------
# the server
# ---------------------------------------------------------------------------------------------
@dataclass
class IngestTimings:
    """Filled on the ingest worker thread (``ack_publish_s``: the ack thread)."""

    messages: int = 0
    busy_s: float = 0.0  # wall time inside the runtime's _store_group, telemetry
    ack_publish_s: float = 0.0  # publishing acks, PUBACK awaited (on the runtime's ack thread)
    first_start: float | None = None
    last_end: float | None = None


class _TimedPublisher:
    """The fleet's publisher, with the ack publish timed."""

    def __init__(self, inner: Any, timings: IngestTimings) -> None:
        self._inner = inner
        self._timings = timings

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        self._inner.publish_desired(device_id, envelope)

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            self._inner.publish_ack(device_id, payload)
        finally:
            self._timings.ack_publish_s += time.perf_counter() - started


@dataclass
class Server:
    """Fleet server (runtime on its own loop thread), broker, and the provisioned device."""

    broker_kind: str
    directory: Path
    fleet: Any = None
    runtime: Any = None
    mosquitto: Any = None
    prov: Any = None
    timings: IngestTimings = field(default_factory=IngestTimings)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        from fleet_server.auth import Principal
        from fleet_server.db import atomic
        from fleet_server.fleet import init_data_dir, open_fleet, server_mqtt_secret
        from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
        from fleet_server.mqtt.passwords import hash_password
        from fleet_server.registry.devices import mqtt_credentials, provision
        from fleet_server.runtime import MqttRuntime
        from fleet_server.settings import SERVER_MQTT_USER, Settings

        data = self.directory / "server"
        init_data_dir(Settings(data_dir=data))
        server_hash = hash_password(server_mqtt_secret(data))
        if self.broker_kind == "mosquitto":
            if find_mosquitto() is None:
                raise RuntimeError("mosquitto not found on PATH or in /usr/sbin "
                                   "(apt-get install -y mosquitto), or use --broker embedded")
            (self.directory / "mosquitto").mkdir()
            self.mosquitto = MosquittoProcess(self.directory / "mosquitto",
                                              {SERVER_MQTT_USER: server_hash}, SERVER_MQTT_USER)
            self.mosquitto.start()
            settings = Settings(data_dir=data, mqtt_url=self.mosquitto.url)
        else:
            settings = Settings(data_dir=data, mqtt_port=0)
        self.fleet = open_fleet(settings)

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-server-loop",
                                        daemon=True)
        self._thread.start()
        self.runtime = MqttRuntime(self.fleet, maintenance_interval_s=3600)
        self._run(self.runtime.start())

        # the device, provisioned as `fleet_server device add` does (after the broker is up,
        # so an embedded broker's port is in its provisioning file)
        with atomic(self.fleet.engine) as conn:
            done = provision(self.fleet, conn, device_id=DEVICE, profile="rpi4", tags=["bench"],
                             actor=Principal("bench", "outbox_drain", "admin"))
            creds = mqtt_credentials(conn)
        self.prov = done.provisioning
        if self.mosquitto is not None:  # what `mosquitto-config` + a reload do in production
            creds[SERVER_MQTT_USER] = server_hash
            self.mosquitto.reload(creds)

        # measurement only: time the storing of telemetry messages and the ack publish
        timings = self.timings
        store = self.runtime._store_group

        def timed_store(checked: list[Any], now: int) -> None:
            started = time.perf_counter()
            store(checked, now)
            telemetry = sum(1 for c in checked if c.topic.endswith("/telemetry")
                            and getattr(c, "rows", None) is not None)
            if telemetry:
                end = time.perf_counter()
                timings.messages += telemetry
                timings.busy_s += end - started
                if timings.first_start is None:
                    timings.first_start = started
                timings.last_end = end

        self.runtime._store_group = timed_store
        self.fleet.publisher = _TimedPublisher(self.fleet.publisher, timings)

    def parse_cpu(self) -> float:
        """CPU s of the runtime's parse processes so far (they start with the first backlog)."""
        pool = None if self.runtime is None else self.runtime.parse_pool
        if pool is None:
            return 0.0
        return sum(stat_cpu(f"/proc/{pid}/stat") or 0.0 for pid in pool.pids if pid)

    def stored(self) -> dict[str, int | None]:
        """What the server holds for the device's telemetry stream."""
        from sqlalchemy import distinct, func, select

        from fleet_server.db import atomic, tables

        r = tables.device_records.c
        a = tables.stream_acks.c
        with atomic(self.fleet.engine) as conn:
            count, distinct_seqs, low, high = conn.execute(
                select(func.count(), func.count(distinct(r.seq)), func.min(r.seq),
                       func.max(r.seq)).where(r.device_id == DEVICE,
                                              r.stream == "telemetry")).one()
            upto = conn.execute(select(a.upto_seq).where(
                a.device_id == DEVICE, a.stream == "telemetry")).scalar()
        return {"count": count, "distinct": distinct_seqs, "min": low, "max": high,
                "ack_upto": upto}

    def stop(self) -> None:
        if self.runtime is not None and self._loop is not None:
            try:
                self._run(self.runtime.stop())
            except Exception as exc:  # noqa: BLE001 - shutting down; say it and go on
                log(f"runtime stop failed: {exc!r}")
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        if self.fleet is not None:
            self.fleet.engine.dispose()
        if self.mosquitto is not None:
            self.mosquitto.stop()


# ---------------------------------------------------------------------------------------------
# the device
# ---------------------------------------------------------------------------------------------
def metrics_body(i: int, at: int) -> dict[str, Any]:
    """One interval's metrics, shaped like the agent's (``agent.serving.metrics``)."""
    count = 100 + i % 41
    errors = i % 7 == 0
    return {
        "version": 1, "model": "digits-mlp", "model_version": "3",
        "interval": {"start": float(at - 10), "end": float(at)},
        "count": count, "ok": count - (2 if errors else 0),
        "errors": {"4xx": 1 if errors else 0, "5xx": 0, "runtime": 1 if errors else 0},
        "latency_ms": {"p50": round(1.2 + (i % 53) / 100, 3),
                       "p95": round(3.9 + (i % 89) / 50, 3),
                       "p99": round(7.5 + (i % 97) / 25, 3),
                       "max": round(9.0 + (i % 101) / 10, 3),
                       "sum": round(count * 1.7 + (i % 13), 3)},
    }


def fill(outbox: Outbox, rows: int, chunk: int) -> float:
    """Append ``rows`` metrics rows; returns the seconds spent inside ``append_many``."""
    spent = 0.0
    base = 1_700_000_000
    last_report = time.monotonic()
    for start in range(0, rows, chunk):
        items = [("metrics", metrics_body(i, base + 10 * i), base + 10 * i)
                 for i in range(start, min(rows, start + chunk))]
        t = time.perf_counter()
        outbox.append_many("telemetry", items, priority="metrics")
        spent += time.perf_counter() - t
        if time.monotonic() - last_report > 5:
            log(f"  appended {start + len(items):,} rows")
            last_report = time.monotonic()
    return spent


@dataclass
class DrainResult:
    seconds: float
    rows: int
    messages: int
    payload_bytes: int
    last_ack: int
    spent: dict[str, float]  # where the drain loop's wall time went


def drain(outbox: Outbox, link: DeviceLink, events: queue.Queue[LinkEvent], *, last_seq: int,
          batch: int, window: int) -> DrainResult:
    """Send everything held, at most ``window`` messages unacked; return when the outbox is empty.

    Raises:
        RuntimeError: the link dropped, or no ack came for ACK_TIMEOUT_S.
    """
    spent = dict.fromkeys(("build_payloads", "checkpoint", "publish (PUBACK)",
                           "outbox.ack", "waiting for server acks"), 0.0)
    real_sync = outbox.sync

    def timed_sync() -> None:
        t = time.perf_counter()
        real_sync()
        spent["checkpoint"] += time.perf_counter() - t

    outbox.sync = timed_sync  # type: ignore[method-assign]
    in_flight: deque[int] = deque()  # last seq of each message sent and not yet acked
    sent_upto = acked = 0
    messages = payload_bytes = rows = 0

    def take(ev: LinkEvent) -> None:
        nonlocal acked
        if ev.kind in ("disconnected", "refused"):
            raise RuntimeError(f"device link {ev.kind}: {ev.detail}")
        if ev.kind != "message" or ev.topic_kind != "ack":
            return
        ack = Ack.from_bytes(ev.payload)
        if ack.device_id != DEVICE or ack.stream != "telemetry":
            return
        t = time.perf_counter()
        outbox.ack(ack.stream, ack.upto_seq)
        spent["outbox.ack"] += time.perf_counter() - t
        acked = max(acked, ack.upto_seq)
        while in_flight and in_flight[0] <= acked:
            in_flight.popleft()

    started = time.perf_counter()
    last_report = time.monotonic()
    while True:
        while True:  # every ack already here
            try:
                take(events.get_nowait())
            except queue.Empty:
                break
        if len(in_flight) < window and sent_upto < last_seq:
            t0 = time.perf_counter()
            batches = outbox.build_payloads("telemetry", batch, after=sent_upto)
            spent["build_payloads"] += time.perf_counter() - t0
            for payload, last in batches:
                t2 = time.perf_counter()
                link.publish("telemetry", payload)
                spent["publish (PUBACK)"] += time.perf_counter() - t2
                in_flight.append(last)
                rows += last - sent_upto  # the bench outbox has no gaps (no eviction)
                sent_upto = last
                messages += 1
                payload_bytes += len(payload)
            if not batches:  # nothing above sent_upto: everything is out
                sent_upto = last_seq
            if time.monotonic() - last_report > 5:
                log(f"  sent up to seq {sent_upto:,}, acked {acked:,}, {messages:,} messages, "
                    f"{time.perf_counter() - started:.0f} s")
                last_report = time.monotonic()
            continue
        if acked >= last_seq and outbox.depth() == 0:
            break
        t = time.perf_counter()
        try:
            ev = events.get(timeout=ACK_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(f"no ack for {ACK_TIMEOUT_S:.0f} s: sent up to {sent_upto}, "
                               f"acked {acked}, {len(in_flight)} in flight") from None
        spent["waiting for server acks"] += time.perf_counter() - t
        take(ev)
    seconds = time.perf_counter() - started
    outbox.sync = real_sync  # type: ignore[method-assign]
    spent["build_payloads"] -= spent["checkpoint"]  # shown separately
    spent["other (loop, events)"] = seconds - sum(spent.values())
    return DrainResult(seconds, rows, messages, payload_bytes, acked, spent)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
@dataclass
class DeviceSide:
    """What the device side measured over the drain."""

    result: DrainResult
    cpu: float | None = None  # its process's CPU seconds, when it ran in a process of its own
    threads: dict[str, float] = field(default_factory=dict)  # CPU s per thread group, ditto


def _connect(prov: Any) -> tuple[DeviceLink, queue.Queue[LinkEvent]]:
    events: queue.Queue[LinkEvent] = queue.Queue()
    link = DeviceLink(prov, events.put)
    link.start()
    if not link.wait_connected(20):
        link.stop()
        raise RuntimeError(f"device did not connect to {prov.mqtt_url} within 20 s")
    return link, events


def _open_outbox(path: Path, rows: int) -> Outbox:
    return Outbox.open(path, device_id=DEVICE, max_rows=rows + rows // 50 + 100,
                       now=time.time())


def device_process(conn: Any, outbox_path: str, prov: dict[str, Any], rows: int,
                   last_seq: int, batch: int, window: int) -> None:
    """``--device-process``: the device side in a process of its own (spawned), over a Pipe:
    send "ready" once connected, wait for "go", drain, send the result as plain data."""
    from agent.protocol.provisioning import Provisioning

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s (device): %(message)s")
    outbox = _open_outbox(Path(outbox_path), rows)
    link = None
    try:
        link, events = _connect(Provisioning.from_dict(prov))
        conn.send("ready")
        conn.recv()
        cpu0, threads0 = process_cpu(), thread_cpu()
        result = drain(outbox, link, events, last_seq=last_seq, batch=batch, window=window)
        cpu = process_cpu() - cpu0
        threads = {name: value - threads0.get(name, 0.0)
                   for name, value in thread_cpu().items()}
        conn.send(("ok", asdict(result), cpu, threads))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if link is not None:
            link.stop()
        outbox.close()


def _recv(conn: Any, timeout: float, what: str) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"device process: no {what} within {timeout:.0f} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg[0] == "error":
        raise RuntimeError(f"device process failed: {msg[1]}")
    return msg


def run(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    server = Server(args.broker, directory)
    log(f"starting the server with the {args.broker} broker")
    server.start()
    try:
        (directory / "device").mkdir()
        outbox_path = directory / "device" / "outbox.db"
        with _open_outbox(outbox_path, args.rows) as outbox:
            log(f"filling the outbox with {args.rows:,} rows (transactions of {args.chunk})")
            append_s = fill(outbox, args.rows, args.chunk)
            outbox.sync()
            if outbox.depth() != args.rows:
                raise RuntimeError(f"outbox holds {outbox.depth()} rows, expected {args.rows}")
            last_seq = outbox.stats().streams["telemetry"].next_seq - 1
        db_mb = outbox_path.stat().st_size / 1e6
        log(f"  {args.rows / append_s:,.0f} rows/s; outbox.db {db_mb:,.0f} MB")

        where = "in its own process" if args.device_process else "in this process"
        log(f"draining: batches of {args.batch}, window {args.window}, device {where}")
        if args.device_process:
            device, before, after = _drain_in_child(args, server, outbox_path, last_seq)
        else:
            with _open_outbox(outbox_path, args.rows) as outbox:
                link, events = _connect(server.prov)
                try:
                    before = snapshot()
                    device = DeviceSide(drain(outbox, link, events, last_seq=last_seq,
                                              batch=args.batch, window=args.window))
                    after = snapshot()
                finally:
                    link.stop()
        stored = server.stored()
        parse_cpu = server.parse_cpu()
    finally:
        server.stop()

    # CPU: this process's threads (the server's, and the device's when it ran here), then the
    # device process's, the broker's, and everyone else's
    per_thread: dict[str, float] = {}
    for name, value in after.threads.items():
        group = thread_group(name, device_main=not args.device_process)
        per_thread[group] = per_thread.get(group, 0.0) + value - before.threads.get(name, 0.0)
    for name, value in device.threads.items():
        group = thread_group(name) + " [device process]"
        per_thread[group] = per_thread.get(group, 0.0) + value
    if parse_cpu:
        per_thread["server: parse processes (check_message)"] = parse_cpu
    cpu = after.process - before.process + (device.cpu or 0.0) + parse_cpu
    broker_cpu = (after.broker - before.broker
                  if after.broker is not None and before.broker is not None else None)
    others = max(0.0, after.machine - before.machine - cpu - (broker_cpu or 0.0))

    result = device.result
    checks = {
        f"server stored {args.rows:,} records": stored["count"] == args.rows,
        "no duplicate seqs": stored["distinct"] == stored["count"],
        f"seqs 1..{last_seq:,}": (stored["min"], stored["max"]) == (1, last_seq),
        f"last ack received = {args.rows:,}": result.last_ack == args.rows,
        f"server ack state = {args.rows:,}": stored["ack_upto"] == args.rows,
        f"device sent {args.rows:,} rows": result.rows == args.rows,
    }
    report(args, append_s, result, server.timings, cpu, broker_cpu, others, per_thread, db_mb,
           checks, stored)
    return 0 if all(checks.values()) else 1


def _drain_in_child(args: argparse.Namespace, server: Server, outbox_path: Path,
                    last_seq: int) -> tuple[DeviceSide, Snapshot, Snapshot]:
    """Run :func:`device_process` and take the server side's CPU snapshots around its drain."""
    ctx = multiprocessing.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=device_process, name="edgefleet-bench-device", args=(
        child_conn, str(outbox_path), server.prov.to_dict(), args.rows, last_seq, args.batch,
        args.window))
    child.start()
    try:
        _recv(conn, 60, "connection")
        before = snapshot()
        conn.send("go")
        _, result, device_cpu, device_threads = _recv(conn, 3600, "result")
        after = snapshot()
    finally:
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
    return DeviceSide(DrainResult(**result), device_cpu, device_threads), before, after


def report(args: argparse.Namespace, append_s: float, r: DrainResult, ingest: IngestTimings,
           cpu: float, broker_cpu: float | None, others: float, per_thread: dict[str, float],
           db_mb: float,
           checks: dict[str, bool], stored: dict[str, int | None]) -> None:
    rate = r.rows / r.seconds
    if ingest.first_start is not None and ingest.last_end is not None:
        ingest_rate = r.rows / (ingest.last_end - ingest.first_start)
    else:
        ingest_rate = float("nan")
    projected = GOAL_ROWS / rate
    if args.rows >= GOAL_ROWS:
        goal = f"{'PASS' if r.seconds <= GOAL_S else 'MISS'} ({r.seconds:.1f} s)"
    else:
        goal = (f"{'PASS' if projected <= GOAL_S else 'MISS'} (projected 1M: "
                f"{projected:.0f} s)")
    broker = f"{broker_cpu:.1f}" if broker_cpu is not None else "in process"
    device = "own process" if args.device_process else "server's process"
    where = "its own process" if args.device_process else "the server's process"
    print(f"### Outbox drain: {args.rows:,} rows over {args.broker}, device in {where} "
          f"({os.cpu_count()} CPUs, Python {sys.version.split()[0]})\n")
    print("| broker | device | rows | batch | window | append rows/s | drain s | drain rows/s "
          "| messages/s | server ingest rows/s | Python CPU s | broker CPU s "
          "| 1M in <= 60 s |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    print(f"| {args.broker} | {device} | {args.rows:,} | {args.batch} | {args.window} "
          f"| {args.rows / append_s:,.0f} | {r.seconds:.1f} | {rate:,.0f} "
          f"| {r.messages / r.seconds:,.1f} | {ingest_rate:,.0f} | {cpu:.1f} | {broker} "
          f"| {goal} |")
    print(f"\n{r.messages:,} messages, {r.payload_bytes / r.messages / 1024:.0f} KiB each on "
          f"average ({r.payload_bytes / r.rows:.0f} B/row); outbox.db {db_mb:,.0f} MB when "
          f"full.\n")

    print("**Where the drain loop's wall time went** (device, main thread):\n")
    print("| step | s | % of drain | us/row |")
    print("|---|--:|--:|--:|")
    for name, value in r.spent.items():
        print(f"| {name} | {value:.1f} | {100 * value / r.seconds:.0f} % "
              f"| {value / r.rows * 1e6:.1f} |")

    print("\n**Server ingest worker** (one thread, messages in arrival order):\n")
    print("| what | s | per message ms | us/row |")
    print("|---|--:|--:|--:|")
    n = max(ingest.messages, 1)
    # the runtime publishes acks on a thread of its own: the worker only queues them
    for name, value in (("storing (store_checked, acks queued)", ingest.busy_s),
                        ("ack publish (PUBACK awaited, ack thread)", ingest.ack_publish_s)):
        print(f"| {name} | {value:.1f} | {1000 * value / n:.2f} | {value / r.rows * 1e6:.1f} |")
    print(f"| idle over the drain | {r.seconds - ingest.busy_s:.1f} | | |")

    print("\n**CPU seconds over the drain, per thread** (Python processes' total "
          f"{cpu:.1f} s in {r.seconds:.1f} s of wall time):\n")
    print("| thread | CPU s | % of wall |")
    print("|---|--:|--:|")
    for name, value in sorted(per_thread.items(), key=lambda kv: -kv[1]):
        if value >= 0.05:
            print(f"| {name} | {value:.1f} | {100 * value / r.seconds:.0f} % |")
    if broker_cpu is not None:
        print(f"| mosquitto (child process) | {broker_cpu:.1f} "
              f"| {100 * broker_cpu / r.seconds:.0f} % |")
    print(f"| other processes on the machine | {others:.1f} | {100 * others / r.seconds:.0f} % |")
    cpus = os.cpu_count() or 1
    print(f"\n{cpus} CPUs = {100 * cpus} % of wall.", end=" ")
    if args.device_process:
        print("Device and server run in separate processes: on an idle machine with a CPU "
              "for each, the drain takes at least the busier side's CPU time.")
    else:
        print("Device and server share one process and its GIL, so their Python work is "
              "serialised: on an idle machine the drain takes at least about the process's "
              "CPU time (run with --device-process to separate them).")

    print("\n**Checks:** " + ", ".join(f"{name}: {'ok' if ok else 'FAILED'}"
                                       for name, ok in checks.items()))
    if not all(checks.values()):
        print(f"\nserver holds: {stored}; last ack received: {r.last_ack}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rows", type=int, default=GOAL_ROWS, help="backlog size (rows)")
    parser.add_argument("--batch", type=int, default=500,
                        help="records per build_payloads call (the agent's sync_batch)")
    parser.add_argument("--window", type=int, default=8,
                        help="messages published and not yet acked by the server, at most")
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto")
    parser.add_argument("--chunk", type=int, default=1000, help="rows per append_many")
    parser.add_argument("--device-process", action="store_true",
                        help="run the device side in a process of its own (as on a real "
                             "deployment: device and server do not share a GIL)")
    parser.add_argument("--dir", default=str(REPO / "bench" / "out" / "outbox_drain"),
                        help="work directory (emptied first)")
    args = parser.parse_args(argv)
    for name in ("rows", "batch", "window", "chunk"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an integer >= 1, got {getattr(args, name)}")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

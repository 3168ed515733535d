"""Benchmark: telemetry from many devices stored by the fleet server, against the broker's ceiling.

The issue's goal (issue 7): "Ingest must keep up: telemetry rows/s stored by the server from many
devices on real Mosquitto, against the ceiling of Mosquitto + paho measured alone in the same
run: goal >= 50% of that ceiling with nothing lost (every sequence number stored once)."

Usage::

    .venv/bin/python bench/ingest.py                  # 200 devices, 200,000 rows, 3 pairs of runs
    .venv/bin/python bench/ingest.py --batch 10       # small messages: per-message costs show
    .venv/bin/python bench/ingest.py --devices 1000 --rows 1000000 --workers 4
    .venv/bin/python bench/ingest.py --json           # JSON on stdout instead of Markdown
    .venv/bin/python bench/ingest.py --parse-workers 0,1   # server runs without and with
    .venv/bin/python bench/ingest.py --isolated --parse-workers 0,1 --rows 40000  # CPU/row

Everything is real, on loopback:

- **broker**: Mosquitto (:class:`fleet_server.mqtt.mosquitto.MosquittoProcess`: the config,
  password file and ``%u`` ACL that ``fleet_server mosquitto-config`` writes) on a free port;
- **server data**: a fresh data directory (``init_data_dir``), ``--devices`` devices
  provisioned through the registry (``registry.devices.provision``), Mosquitto reloaded with
  their password hashes, as ``mosquitto-config`` and a reload do in production;
- **devices**: ``--workers`` spawned processes, each holding its share of the devices as paho
  clients with the devices' own credentials, subscribed to their own ``ack`` topic, publishing
  QoS 1 ``TelemetryBatch`` messages of ``--batch`` records (``metrics.requests`` bodies made by
  :class:`agent.metrics.RequestMetrics`, ``floor`` and ``from_seq`` set as the agent sets them)
  on their own ``telemetry`` topic. One thread per process drives all its clients through paho's
  external loop (``loop_read``/``loop_write`` on epoll), so paho's ``select()``, which cannot
  watch descriptors numbered 1024 or more, is never used and a process is not limited to ~80
  clients. Each device sends ``--rows / --devices`` rows per run, interleaved with the others;
  the payloads are built before the clock starts.

Two kinds of run, alternated ``--repeat`` times (ceiling, server, ceiling, server, ...), each
sending the same ``--rows`` rows (the ceiling run of a pair sends exactly the bytes its server
run sends):

- **ceiling**: one bare paho subscriber (the server's MQTT user, the telemetry wildcard, QoS 1)
  that decodes each payload's JSON to count its rows and does nothing else;
- **server**: the real :class:`fleet_server.runtime.MqttRuntime` (its ``ServerLink``, the single
  ingest worker storing into SQLite, the ack thread publishing acks back to the devices), one
  fresh runtime per run over the same data directory, so each server run adds ``--rows`` rows
  to the rows of the runs before it (sequence numbers continue from run to run).

Each rate is rows over the time from the start signal to the last row counted (ceiling) or
stored (server). Flow control is the same for both: at most ``--in-flight`` messages are
published and not yet counted or stored, fleet-wide (a semaphore shared with the publisher
processes). Without it a consumer slower than the publishers would see Mosquitto drop messages:
it queues at most 1,000 (``max_queued_messages``) per client, connected or not. The server's
run is gated on rows *stored*, as devices are gated on the acks of their window in production.

After each server run it checks, from the database, that every device's telemetry seqs are
exactly ``1..n`` (count, distinct count and max all ``n``), that ``stream_acks.upto_seq`` is
``n`` for every device, and that every device received an ack for ``n``. Between runs the
server's persistent MQTT session is cleared (a clean-session connect with its client id), so
the broker does not queue a ceiling run's messages for the next server run.

Reported (Markdown on stdout, progress on stderr), with the JSON library the server reads
telemetry with (orjson when installed, :data:`fleet_server.ingest_parse.ORJSON`): per run,
rows/s, messages/s and CPU seconds of this process (the subscriber, or the whole server: link,
asyncio loop, ingest worker, ack thread), of Mosquitto, of the publisher processes and of
everything else on the machine; the median of each kind, their ratio, PASS/MISS against the
goal, the integrity checks, and where the server's CPU went per thread (its parse processes
included). To measure, this script wraps the runtime instance's ``_store_group`` (one
transaction's messages) at run time (no library change): it counts stored rows there, to stop
the clock and release the flow-control credit.

Files go to ``--dir`` (default ``bench/out/ingest``, gitignored), emptied first.
Exit codes: 0 done and every check passed (the goal is reported, never asserted), 1 error or a
failed check, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import random
import selectors
import shutil
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# after the sys.path line above
import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402
from procstat import log, machine_cpu, process_cpu, stat_cpu, thread_cpu  # noqa: E402

from agent.metrics import METRICS_KIND, RequestMetrics  # noqa: E402
from agent.protocol.messages import Ack, Record, TelemetryBatch  # noqa: E402
from agent.protocol.topics import ack_topic, subscription_filter, telemetry_topic  # noqa: E402

GOAL_RATIO = 0.5  # server rows/s against the ceiling's
MOSQUITTO_MAX_QUEUED = 1000  # Mosquitto's default max_queued_messages, per client
STALL_S = 60.0  # no row counted or stored for this long: the run failed
REPLY_S = 120.0  # the longest a publisher process may take to answer a command
BASE_AT = 1_700_000_000  # records' `at`: fixed, so every run sends the same bytes
INTERVAL_S = 10  # the agent's default metrics interval
T = TypeVar("T")


def child_pid(comm: str) -> int | None:
    """The pid of this process's child named ``comm`` (None: none)."""
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children", encoding="ascii") as fh:
                pids = fh.read().split()
        except OSError:
            continue
        for pid in pids:
            try:
                with open(f"/proc/{pid}/comm", encoding="ascii") as fh:
                    if fh.read().strip() == comm:
                        return int(pid)
            except OSError:
                continue
    return None


def thread_group(name: str) -> str:
    """What a thread of this process does, for the CPU table."""
    if name.startswith("edgefleet-ingest"):
        return "ingest worker (parse, SQL)"
    if name.startswith("edgefleet-ack"):
        return "ack thread (ack publish, PUBACK awaited)"
    if name.startswith("edgefleet-parse-send"):
        return "parse pool senders (work to the parse processes)"
    if name.startswith("paho-mqtt-client-edgefleet"):
        return "paho network thread (ServerLink)"
    if name.startswith("edgefleet-replan"):
        return "re-plan worker (rollouts after reports and health numbers)"
    if name == "bench-server-loop":
        return "asyncio loop (message hand-off to the ingest worker)"
    if name.startswith("paho-mqtt-client-bench-ceiling"):
        return "paho network thread (ceiling subscriber)"
    if name == "MainThread":
        return "bench main thread (waits)"
    return f"other: {name}"


@dataclass(frozen=True)
class Snapshot:
    """CPU counters at one instant."""

    at: float  # perf_counter
    process: float  # this process
    threads: dict[str, float]
    broker: float | None  # Mosquitto
    machine: float  # every CPU of the machine, busy


# ---------------------------------------------------------------------------------------------
# the devices (publisher processes)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    password: str
    rows: int  # rows this device sends per run


def metrics_bodies(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` distinct ``metrics.requests`` bodies from the agent's own aggregator: 40-400
    requests an interval, lognormal latencies around 1.6 ms, now and then an error."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        metrics = RequestMetrics(start=float(BASE_AT))
        for _ in range(rng.randrange(40, 400)):
            if rng.random() < 0.01:
                metrics.observe("digits-mlp", "3", 0.0, False, rng.choice(("4xx", "runtime")))
            else:
                metrics.observe("digits-mlp", "3", rng.lognormvariate(0.5, 0.6 + i % 5 / 10),
                                True)
        bodies.extend(metrics.flush(float(BASE_AT + INTERVAL_S)))
    return bodies


def device_payloads(device_id: str, first_seq: int, rows: int, batch: int,
                    bodies: Sequence[dict[str, Any]]) -> list[bytes]:
    """Seqs ``first_seq .. first_seq + rows - 1`` as TelemetryBatch payloads of ``batch`` rows,
    each record's body one of ``bodies`` (picked at random, seeded by device and first seq).

    ``floor`` is ``first_seq`` (what earlier runs sent was acked and deleted, as on a device)
    and ``from_seq`` the batch's first seq (nothing evicted), as ``Outbox.build_payloads`` sets
    them.

    Raises:
        MessageError: a batch is over MAX_MESSAGE_BYTES (use a smaller ``--batch``).
    """
    rng = random.Random(f"{device_id}:{first_seq}")
    payloads = []
    for start in range(first_seq, first_seq + rows, batch):
        records = []
        for seq in range(start, min(first_seq + rows, start + batch)):
            end = BASE_AT + INTERVAL_S * seq
            body = dict(rng.choice(bodies))
            body["interval"] = {"start": float(end - INTERVAL_S), "end": float(end)}
            records.append(Record(seq=seq, kind=METRICS_KIND, at=end, body=body))
        msg = TelemetryBatch(device_id=device_id, records=tuple(records),
                             unrecognized={"floor": first_seq, "from_seq": start})
        payloads.append(msg.to_bytes())
    return payloads


class DeviceClients:
    """One publisher process's devices: a paho client each, all driven by the calling thread
    through paho's external loop on an epoll selector."""

    def __init__(self, devices: Sequence[DeviceSpec], host: str, port: int) -> None:
        from agent.transport.mqtt import set_nodelay

        self._sel = selectors.DefaultSelector()
        self._clients: dict[str, paho.Client] = {}
        self._events: dict[str, int] = {}
        self.errors: list[str] = []
        self._closing = False
        self.subscribed: set[str] = set()
        self.pubacks = 0
        self.ack_upto: dict[str, int] = {}
        self._misc_at = time.monotonic()
        for spec in devices:
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=spec.device_id,
                                 clean_session=True, protocol=paho.MQTTv311)
            client.user_data_set(spec.device_id)
            client.username_pw_set(spec.device_id, spec.password)
            client.on_connect = self._on_connect
            client.on_subscribe = self._on_subscribe
            client.on_publish = self._on_publish
            client.on_message = self._on_message
            client.on_disconnect = self._on_disconnect
            client.connect(host, port, keepalive=300)
            set_nodelay(client)
            sock = client.socket()
            assert sock is not None  # connect() succeeded
            self._sel.register(sock, selectors.EVENT_READ, (spec.device_id, client))
            self._events[spec.device_id] = selectors.EVENT_READ
            self._clients[spec.device_id] = client
            self._interest(spec.device_id, client)

    # paho callbacks, on this thread (inside loop_read/loop_write)
    def _on_connect(self, client: paho.Client, device_id: str, _flags: Any, reason: Any,
                    _props: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"device {device_id}: CONNECT refused: {reason}")
            return
        client.subscribe(ack_topic(device_id), qos=1)

    def _on_subscribe(self, _client: paho.Client, device_id: str, _mid: int, reasons: Any,
                      _props: Any) -> None:
        if any(r.is_failure for r in reasons):
            self.errors.append(f"device {device_id}: SUBSCRIBE to its ack topic refused: "
                               f"{[str(r) for r in reasons]}")
            return
        self.subscribed.add(device_id)

    def _on_publish(self, *_args: Any) -> None:
        self.pubacks += 1

    def _on_message(self, _client: paho.Client, device_id: str, msg: paho.MQTTMessage) -> None:
        # as the agent reads it; a bad one raises out of loop_read and ends the worker
        ack = Ack.from_bytes(bytes(msg.payload))
        if ack.device_id == device_id and ack.stream == "telemetry":
            self.ack_upto[device_id] = max(self.ack_upto.get(device_id, 0), ack.upto_seq)

    def _on_disconnect(self, _client: paho.Client, device_id: str, _flags: Any, reason: Any,
                       _props: Any) -> None:
        if not self._closing:
            self.errors.append(f"device {device_id}: disconnected by the broker: {reason}")

    def _interest(self, device_id: str, client: paho.Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.want_write() else 0)
        if want != self._events[device_id]:
            self._sel.modify(sock, want, (device_id, client))
            self._events[device_id] = want

    def poll(self, timeout: float) -> None:
        """Read and write what the sockets allow, waiting up to ``timeout`` seconds.

        Raises:
            RuntimeError: a device was refused or disconnected.
        """
        for key, mask in self._sel.select(timeout):
            device_id, client = key.data
            if mask & selectors.EVENT_READ:
                rc = client.loop_read()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not self.errors:
                    self.errors.append(f"device {device_id}: read failed: {rc}")
            if mask & selectors.EVENT_WRITE:
                client.loop_write()
            self._interest(device_id, client)
        now = time.monotonic()
        if now - self._misc_at > 1.0:  # keepalive pings
            self._misc_at = now
            for client in self._clients.values():
                client.loop_misc()
        if self.errors:
            raise RuntimeError("; ".join(self.errors[:5]))

    def wait(self, what: str, done: Callable[[], bool], timeout: float) -> None:
        """Poll until ``done()``.

        Raises:
            RuntimeError: not done within ``timeout`` seconds, or a device failed.
        """
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            self.poll(0.05)

    def publish(self, messages: Sequence[tuple[str, str, bytes]], credit: Any) -> int:
        """Publish ``(device_id, topic, payload)`` in order, each after taking one credit;
        return once every PUBACK is in.

        Raises:
            RuntimeError: paho refused a publish, a device failed, or PUBACKs stopped coming.
        """
        start = self.pubacks
        for device_id, topic, payload in messages:
            while not credit.acquire(True, 0.002):
                self.poll(0)
            client = self._clients[device_id]
            info = client.publish(topic, payload, qos=1)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise RuntimeError(f"device {device_id}: publish refused by paho: {info.rc}")
            self._interest(device_id, client)
            self.poll(0)
        self.wait(f"{len(messages)} PUBACKs", lambda: self.pubacks - start >= len(messages),
                  STALL_S)
        return len(messages)

    def close(self) -> None:
        self._closing = True
        for client in self._clients.values():
            client.disconnect()
            client.loop_write()
        self._sel.close()


def publisher_worker(conn: Any, devices: list[tuple[str, str, int]], host: str, port: int,
                     batch: int, credit: Any) -> None:
    """A publisher process (spawned). Commands on ``conn``, each answered ``("ok", result)``
    or ``("error", text)``: ``("build", run)`` builds the payloads of server run ``run``,
    ``("go",)`` publishes them, ``("acks", run, timeout)`` waits until every device holds the
    ack for its last row, ``("stop",)`` disconnects and ends the process."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s (publisher): %(message)s")
    specs = [DeviceSpec(*d) for d in devices]
    clients: DeviceClients | None = None
    messages: list[tuple[str, str, bytes]] = []
    bodies = metrics_bodies(48, seed=len(specs))
    try:
        clients = DeviceClients(specs, host, port)
        live = clients
        live.wait("CONNACKs and SUBACKs", lambda: len(live.subscribed) == len(specs), 60)
        conn.send(("ok", len(specs)))
        while True:
            while not conn.poll(0.2):  # idle: keep the connections alive, take acks
                clients.poll(0)
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "build":
                run = command[1]
                try:
                    per_device = [device_payloads(s.device_id, run * s.rows + 1, s.rows, batch,
                                                  bodies) for s in specs]
                except ValueError as exc:  # MessageError: a batch over MAX_MESSAGE_BYTES
                    raise RuntimeError(f"--batch {batch}: {exc}; use a smaller --batch") \
                        from exc
                messages = []
                for i in range(max(len(p) for p in per_device)):  # devices interleaved
                    messages.extend((s.device_id, telemetry_topic(s.device_id), p[i])
                                    for s, p in zip(specs, per_device, strict=True)
                                    if i < len(p))
                conn.send(("ok", {"messages": len(messages),
                                  "bytes": sum(len(m[2]) for m in messages)}))
            elif command[0] == "go":
                cpu0 = process_cpu()
                sent = clients.publish(messages, credit)
                conn.send(("ok", {"messages": sent, "cpu_s": process_cpu() - cpu0}))
            elif command[0] == "acks":
                run, timeout = command[1], command[2]
                want = {s.device_id: (run + 1) * s.rows for s in specs}
                have = clients.ack_upto
                deadline = time.monotonic() + timeout
                while (any(have.get(d, 0) < n for d, n in want.items())
                       and time.monotonic() < deadline):
                    clients.poll(0.05)
                conn.send(("ok", {d: have.get(d, 0) for d in want}))
            else:
                raise ValueError(f"publisher: unknown command {command[0]!r}")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        if clients is not None:
            clients.close()


class Publishers:
    """The publisher processes, seen from the bench."""

    def __init__(self, shards: Sequence[Sequence[DeviceSpec]], host: str, port: int,
                 batch: int, credit: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns: list[Any] = []
        self._procs: list[Any] = []
        for i, shard in enumerate(shards):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=publisher_worker, name=f"bench-publisher-{i}", args=(
                child, [(s.device_id, s.password, s.rows) for s in shard], host, port, batch,
                credit), daemon=True)
            proc.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(proc)

    def send(self, *command: Any) -> None:
        for conn in self._conns:
            conn.send(command)

    def poll_replies(self, pending: dict[int, Any], timeout: float = 0.0) -> None:
        """Move the replies that arrive within ``timeout`` seconds into ``pending`` (publisher
        index -> result).

        Raises:
            RuntimeError: a publisher reported an error or died.
        """
        waiting = {conn: i for i, conn in enumerate(self._conns) if i not in pending}
        sentinels = {self._procs[i].sentinel: i for i in waiting.values()}
        for ready in multiprocessing.connection.wait([*waiting, *sentinels], timeout):
            i = waiting[ready] if ready in waiting else sentinels[ready]
            try:
                status, result = self._conns[i].recv()
            except EOFError:
                raise RuntimeError(f"publisher {i} died (exit code "
                                   f"{self._procs[i].exitcode})") from None
            if status != "ok":
                raise RuntimeError(f"publisher {i} failed: {result}")
            pending[i] = result

    def replies(self, what: str, pending: dict[int, Any] | None = None,
                timeout: float = REPLY_S) -> list[Any]:
        """Every publisher's answer to the last command (``pending``: those already taken by
        :meth:`poll_replies`).

        Raises:
            RuntimeError: one failed, died, or did not answer within ``timeout`` seconds.
        """
        pending = {} if pending is None else pending
        deadline = time.monotonic() + timeout
        while len(pending) < len(self._conns):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"publishers: no answer to {what!r} within {timeout:.0f} s")
            self.poll_replies(pending, min(left, 1.0))
        return [pending[i] for i in range(len(self._conns))]

    def close(self) -> None:
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError):  # it is gone: join() below says so
                    conn.send(("stop",))
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """What the consumer of a run has counted (written on its thread, read by the bench)."""

    target: int  # rows
    rows: int = 0
    messages: int = 0
    busy_s: float = 0.0  # server: wall time inside the ingest worker's _store_group
    end: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass
class RunResult:
    kind: str  # "ceiling" | "server"
    pair: int  # 1-based
    rows: int
    messages: int
    seconds: float
    cpu_s: float  # this process: the subscriber, or the whole server
    broker_cpu_s: float | None
    publishers_cpu_s: float
    others_cpu_s: float  # the rest of the machine
    threads: dict[str, float]  # CPU s of this process by thread group
    ingest_busy_s: float | None = None
    duplicates: int | None = None  # server: records it found already stored
    parse_workers: int | None = None  # server: parse processes (None: the runtime's default)
    parse_cpu_s: float = 0.0  # server: CPU s of its parse processes (counted in cpu_s)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


@dataclass
class Integrity:
    """What the database holds after a server run, against what the devices sent."""

    pair: int
    devices: int
    expected_rows: int
    stored_rows: int
    devices_exact: int  # seqs exactly 1..n: count == distinct == max == n, min == 1
    lost: int  # seqs in 1..n not stored
    duplicated: int  # rows stored twice (count - distinct; the unique index should forbid it)
    stray: int  # rows no device sent (unknown device or stream, or seq beyond n)
    acks_stored: int  # devices with stream_acks.upto_seq == n
    acks_received: int  # devices that received an ack for n
    examples: list[str]

    @property
    def passed(self) -> bool:
        return (self.devices_exact == self.acks_stored == self.acks_received == self.devices
                and self.lost == self.duplicated == self.stray == 0)


# ---------------------------------------------------------------------------------------------
# the bench: broker, server data, publishers; ceiling and server runs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    devices: int
    rows: int
    batch: int
    repeat: int
    workers: int
    in_flight: int
    directory: Path
    #: one server run per entry in each pair (None: the runtime's default)
    parse_workers: tuple[int | None, ...] = (None,)


class Bench:
    """Mosquitto, the server's data directory and Fleet, the publishers, and the runs."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.mosquitto: Any = None
        self.fleet: Any = None
        self.publishers: Publishers | None = None
        self.specs: list[DeviceSpec] = []
        self.secret = ""
        self.payload_bytes = 0
        self.messages = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._credit: Any = None
        self._broker_pid: int | None = None

    # -- set-up -------------------------------------------------------------------------------
    def start(self) -> None:
        from fleet_server.auth import Principal
        from fleet_server.db import atomic
        from fleet_server.fleet import init_data_dir, open_fleet, server_mqtt_secret
        from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
        from fleet_server.mqtt.passwords import hash_password
        from fleet_server.registry.devices import mqtt_credentials, provision
        from fleet_server.settings import SERVER_MQTT_USER, Settings

        cfg = self.config
        if find_mosquitto() is None:
            raise RuntimeError("mosquitto not found on PATH or in /usr/sbin "
                               "(apt-get install -y mosquitto)")
        data = cfg.directory / "server"
        init_data_dir(Settings.model_validate({"data_dir": data}))
        self.secret = server_mqtt_secret(data)
        server_hash = hash_password(self.secret)
        (cfg.directory / "mosquitto").mkdir(mode=0o700)
        self.mosquitto = MosquittoProcess(cfg.directory / "mosquitto",
                                          {SERVER_MQTT_USER: server_hash}, SERVER_MQTT_USER)
        self.mosquitto.start()
        self._broker_pid = child_pid("mosquitto")
        self.fleet = open_fleet(Settings.model_validate({"data_dir": data,
                                                          "mqtt_url": self.mosquitto.url}))

        t = time.perf_counter()
        actor = Principal("bench", "ingest", "admin")
        with atomic(self.fleet.engine) as conn:
            for i in range(cfg.devices):
                rows = cfg.rows // cfg.devices + (1 if i < cfg.rows % cfg.devices else 0)
                done = provision(self.fleet, conn, device_id=f"ingest-{i:05d}", profile="rpi4",
                                 tags=["bench"], actor=actor)
                self.specs.append(DeviceSpec(done.provisioning.device_id,
                                             done.provisioning.mqtt_password, rows))
            creds = mqtt_credentials(conn)
        creds[SERVER_MQTT_USER] = server_hash
        self.mosquitto.reload(creds)  # what `mosquitto-config` + a reload do in production
        log(f"  {cfg.devices} devices provisioned in {time.perf_counter() - t:.1f} s; "
            f"Mosquitto on {self.mosquitto.url}")

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-server-loop",
                                        daemon=True)
        self._thread.start()

        self._credit = multiprocessing.get_context("spawn").Semaphore(cfg.in_flight)
        shards = [self.specs[i::cfg.workers] for i in range(cfg.workers)]
        t = time.perf_counter()
        self.publishers = Publishers(shards, self.mosquitto.host, self.mosquitto.port,
                                     cfg.batch, self._credit)
        self.publishers.replies("connect")
        log(f"  {cfg.workers} publisher processes connected their devices in "
            f"{time.perf_counter() - t:.1f} s")

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        if self.publishers is not None:
            self.publishers.close()
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
        if self.fleet is not None:
            self.fleet.engine.dispose()
        if self.mosquitto is not None:
            self.mosquitto.stop()

    # -- helpers ------------------------------------------------------------------------------
    def _client(self, client_id: str) -> paho.Client:
        """A paho client of the server's MQTT user, connected (clean session), loop started.

        Raises:
            RuntimeError: no CONNACK, or the broker refused.
        """
        from fleet_server.settings import SERVER_MQTT_USER

        connected = threading.Event()
        refused: list[str] = []

        def on_connect(_c: paho.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            connected.set()

        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=True, protocol=paho.MQTTv311)
        client.username_pw_set(SERVER_MQTT_USER, self.secret)
        client.on_connect = on_connect
        client.connect(self.mosquitto.host, self.mosquitto.port, keepalive=300)
        client.loop_start()
        if not connected.wait(20) or refused:
            client.loop_stop()
            raise RuntimeError(f"MQTT client {client_id!r}: no CONNACK within 20 s or refused: "
                               f"{refused}")
        return client

    def _clear_session(self, client_id: str) -> None:
        """Drop the broker's persistent session of ``client_id`` (and what it queued)."""
        client = self._client(client_id)
        client.disconnect()
        client.loop_stop()

    def _broker_cpu(self) -> float | None:
        return None if self._broker_pid is None else stat_cpu(f"/proc/{self._broker_pid}/stat")

    def _snapshot(self) -> Snapshot:
        return Snapshot(time.perf_counter(), process_cpu(), thread_cpu(), self._broker_cpu(),
                        machine_cpu())

    def _measure(self, kind: str, pair: int, progress: Progress,
                 children_cpu: Callable[[], float] = lambda: 0.0) -> RunResult:
        """Start the publishers, wait until the consumer has every row, and measure
        (``children_cpu``: CPU s so far of the server's parse processes, started in the run).

        Raises:
            RuntimeError: a publisher failed, or no row arrived for STALL_S seconds.
        """
        assert self.publishers is not None
        pending: dict[int, Any] = {}
        before = self._snapshot()
        self.publishers.send("go")
        last_rows, last_change, last_report = 0, time.monotonic(), time.monotonic()
        while not progress.done.wait(0.2):
            self.publishers.poll_replies(pending)
            now = time.monotonic()
            if progress.rows != last_rows:
                last_rows, last_change = progress.rows, now
            elif now - last_change > STALL_S:
                raise RuntimeError(f"{kind} run {pair}: stalled at {progress.rows:,} of "
                                   f"{progress.target:,} rows ({progress.messages:,} messages) "
                                   f"for {STALL_S:.0f} s")
            if now - last_report > 5:
                log(f"    {progress.rows:,} of {progress.target:,} rows, "
                    f"{now - last_change:.0f} s since the last")
                last_report = now
        after = self._snapshot()
        children = children_cpu()
        assert progress.end is not None
        publishers_cpu = sum(r["cpu_s"] for r in self.publishers.replies("go", pending))
        cpu = after.process - before.process + children
        broker = (after.broker - before.broker
                  if after.broker is not None and before.broker is not None else None)
        others = max(0.0, after.machine - before.machine - cpu - (broker or 0.0)
                     - publishers_cpu)
        threads: dict[str, float] = {}
        for name, value in after.threads.items():
            group = thread_group(name)
            threads[group] = threads.get(group, 0.0) + value - before.threads.get(name, 0.0)
        if children:
            threads["parse processes (check_message)"] = children
        return RunResult(kind, pair, progress.rows, progress.messages,
                         progress.end - before.at, cpu, broker, publishers_cpu, others, threads,
                         parse_cpu_s=children)

    # -- the runs -----------------------------------------------------------------------------
    def build(self, run: int) -> None:
        """Have the publishers build server run ``run``'s payloads (0-based: seqs continue)."""
        assert self.publishers is not None
        self.publishers.send("build", run)
        built = self.publishers.replies("build")
        self.messages = sum(b["messages"] for b in built)
        self.payload_bytes = sum(b["bytes"] for b in built)

    def ceiling_run(self, pair: int) -> RunResult:
        """Mosquitto + paho alone: a bare subscriber that decodes and counts.

        Raises:
            RuntimeError: see :meth:`_measure`; or the subscription was refused.
        """
        progress = Progress(self.config.rows)
        credit = self._credit

        def on_message(_c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
            progress.rows += len(json.loads(msg.payload)["records"])
            progress.messages += 1
            credit.release()
            if progress.rows >= progress.target and progress.end is None:
                progress.end = time.perf_counter()
                progress.done.set()

        subscribed = threading.Event()
        client = self._client("bench-ceiling")
        try:
            client.on_message = on_message
            client.on_subscribe = lambda *_args: subscribed.set()
            client.subscribe(subscription_filter("telemetry"), qos=1)
            if not subscribed.wait(20):
                raise RuntimeError("ceiling subscriber: no SUBACK within 20 s")
            return self._measure("ceiling", pair + 1, progress)
        finally:
            client.disconnect()
            client.loop_stop()

    def server_run(self, pair: int, run: int, parse_workers: int | None
                   ) -> tuple[RunResult, dict[str, int]]:
        """The real MqttRuntime ingesting and acking (server run ``run``, 0-based, of pair
        ``pair``); returns the run and the acks the devices received.

        Raises:
            RuntimeError: see :meth:`_measure`.
        """
        from fleet_server.ingest_parse import Checked, RecordBatch
        from fleet_server.runtime import MqttRuntime

        assert self.publishers is not None
        progress = Progress(self.config.rows)
        credit = self._credit
        runtime = MqttRuntime(self.fleet, maintenance_interval_s=3600,
                              parse_workers=parse_workers)
        self._call(runtime.start())
        client_id = runtime.link.config.client_id
        if runtime.parse_pool is not None:  # steady state: a server starts them once
            wait_ready(runtime.parse_pool)
        store = runtime._store_group  # measurement only (module docstring)

        def measured_store(checked: list[Checked], now: int) -> None:
            started = time.perf_counter()
            store(checked, now)
            telemetry = sum(1 for c in checked
                            if isinstance(c, RecordBatch) and c.stream == "telemetry")
            if not telemetry:
                return
            progress.busy_s += time.perf_counter() - started
            progress.messages += telemetry
            for _ in range(telemetry):  # a multiprocessing semaphore releases one at a time
                credit.release()
            progress.rows = runtime.counters.snapshot()["stored"].get("telemetry", 0)
            if progress.rows >= progress.target and progress.end is None:
                progress.end = time.perf_counter()
                progress.done.set()

        def parse_cpu() -> float:
            pool = runtime.parse_pool
            if pool is None:
                return 0.0
            return sum(stat_cpu(f"/proc/{pid}/stat") or 0.0 for pid in pool.pids if pid)

        runtime._store_group = measured_store  # type: ignore[method-assign]
        try:
            result = self._measure("server", pair + 1, progress, parse_cpu)
            result.ingest_busy_s = progress.busy_s
            result.parse_workers = (runtime.parse_pool.size if runtime.parse_pool is not None
                                    else 0)
            runtime.wait_acks(60)
            self.publishers.send("acks", run, 60)
            acks: dict[str, int] = {}
            for reply in self.publishers.replies("acks"):
                acks.update(reply)
            result.duplicates = runtime.counters.snapshot()["duplicates"].get("telemetry", 0)
        finally:
            self._call(runtime.stop())
            self._clear_session(client_id)  # or the broker queues the next ceiling run for it
        return result, acks

    def check(self, run: int, acks_received: dict[str, int]) -> Integrity:
        """Every device's telemetry seqs are exactly 1..n after ``run + 1`` server runs."""
        from sqlalchemy import distinct, func, select

        from fleet_server.db import atomic, tables

        r, a = tables.device_records.c, tables.stream_acks.c
        want = {s.device_id: (run + 1) * s.rows for s in self.specs}
        with atomic(self.fleet.engine) as conn:
            groups = conn.execute(select(
                r.device_id, r.stream, func.count(), func.count(distinct(r.seq)), func.min(r.seq),
                func.max(r.seq)).group_by(r.device_id, r.stream)).all()
            acks = {(row.device_id, row.stream): row.upto_seq
                    for row in conn.execute(select(a.device_id, a.stream, a.upto_seq))}
            found: dict[str, tuple[int, int, int, int]] = {}
            lost = duplicated = stray = stored = 0
            examples: list[str] = []
            for device_id, stream, count, unique, low, high in groups:
                stored += count
                n = want.get(device_id)
                if n is None or stream != "telemetry":
                    stray += count
                    examples.append(f"{count} rows of {device_id}/{stream}: not sent")
                    continue
                found[device_id] = (count, unique, low, high)
                duplicated += count - unique
                if (count, unique, low, high) == (n, n, 1, n):
                    continue
                in_range = conn.execute(select(func.count(distinct(r.seq))).where(
                    r.device_id == device_id, r.stream == "telemetry", r.seq.between(1, n))
                ).scalar_one()
                lost += n - in_range
                stray += unique - in_range
                examples.append(f"{device_id}: {count} rows, {unique} distinct seqs, "
                                f"{low}..{high}, expected 1..{n}")
        for device_id, n in want.items():
            if device_id not in found:
                lost += n
                examples.append(f"{device_id}: nothing stored, expected 1..{n}")
        exact = sum(1 for d, n in want.items() if found.get(d) == (n, n, 1, n))
        acks_stored = sum(1 for d, n in want.items() if acks.get((d, "telemetry")) == n)
        acks_got = sum(1 for d, n in want.items() if acks_received.get(d) == n)
        for d, n in want.items():
            if acks.get((d, "telemetry")) != n or acks_received.get(d) != n:
                examples.append(f"{d}: stream_acks.upto_seq {acks.get((d, 'telemetry'))}, "
                                f"received ack {acks_received.get(d)}, expected {n}")
        return Integrity(run + 1, len(want), sum(want.values()), stored, exact, lost,
                         duplicated, stray, acks_stored, acks_got, examples[:5])


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------
def summary(config: Config, runs: Sequence[RunResult], checks: Sequence[Integrity],
            bench: Bench) -> dict[str, Any]:
    ceiling = [r for r in runs if r.kind == "ceiling"]
    server = [r for r in runs if r.kind == "server"]
    c_rate = statistics.median(r.rows_per_s for r in ceiling)
    intact = all(c.passed for c in checks)
    settings: list[dict[str, Any]] = []  # per parse-process setting, in the order run
    for workers in dict.fromkeys(r.parse_workers for r in server):
        mine = [r for r in server if r.parse_workers == workers]
        rate = statistics.median(r.rows_per_s for r in mine)
        settings.append({
            "parse_workers": workers, "server_rows_per_s": rate, "ratio": rate / c_rate,
            "server_cpu_s": statistics.median(r.cpu_s for r in mine),
            "parse_cpu_s": statistics.median(r.parse_cpu_s for r in mine),
            "server_busy_ingest": statistics.median((r.ingest_busy_s or 0.0) / r.seconds
                                                    for r in mine),
            "goal": "PASS" if rate / c_rate >= GOAL_RATIO and intact else "MISS"})
    threads: dict[str, float] = {}
    for r in server:
        for name, value in r.threads.items():
            threads[name] = threads.get(name, 0.0) + value / len(server)
    return {
        "devices": config.devices, "rows": config.rows, "batch": config.batch,
        "repeat": config.repeat, "workers": config.workers, "in_flight": config.in_flight,
        "messages": bench.messages,
        "bytes_per_message": bench.payload_bytes / max(1, bench.messages),
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "codec": codec_name(),
        "load_1m": os.getloadavg()[0],
        "ceiling_rows_per_s": c_rate, "servers": settings,
        # the first --parse-workers setting's, at the top level as before
        "server_rows_per_s": settings[0]["server_rows_per_s"], "ratio": settings[0]["ratio"],
        "server_cpu_s": settings[0]["server_cpu_s"],
        "server_busy_ingest": settings[0]["server_busy_ingest"],
        "ceiling_cpu_s": statistics.median(r.cpu_s for r in ceiling),
        "server_threads_cpu_s": threads,
        "lost": sum(c.lost for c in checks), "duplicated": sum(c.duplicated for c in checks),
        "stray": sum(c.stray for c in checks),
        "duplicates_seen_by_server": sum(r.duplicates or 0 for r in server),
        "integrity": intact,
        "goal": "PASS" if any(x["goal"] == "PASS" for x in settings) else "MISS",
        "runs": [asdict(r) | {"rows_per_s": r.rows_per_s} for r in runs],
        "checks": [asdict(c) | {"passed": c.passed} for c in checks],
    }


def codec_name() -> str:
    """The JSON library the server's one-pass telemetry read uses (orjson when installed)."""
    from fleet_server.ingest_parse import ORJSON

    return ORJSON.name if ORJSON is not None else "the standard library's json"


def markdown(s: dict[str, Any]) -> str:
    def f(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    out = [(f"### Telemetry ingest: {s['devices']} devices, {s['rows']:,} rows per run, "
            f"batches of {s['batch']} ({s['cpus']} CPUs, Python {s['python']}, "
            f"telemetry read with {s['codec']}, load {s['load_1m']:.1f} at the end)\n")]
    out.append("| devices | rows | batch | parse processes | ceiling rows/s | server rows/s "
               "| ratio | server CPU s (of it parse processes) | lost / duplicated "
               "| >= 50% of ceiling, nothing lost |")
    out.append("|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
    for x in s["servers"]:
        out.append(f"| {s['devices']} | {s['rows']:,} | {s['batch']} | {x['parse_workers']} "
                   f"| {s['ceiling_rows_per_s']:,.0f} | {x['server_rows_per_s']:,.0f} "
                   f"| {100 * x['ratio']:.0f} % | {x['server_cpu_s']:.1f} "
                   f"({x['parse_cpu_s']:.1f}) | {s['lost']} / {s['duplicated']} "
                   f"| {x['goal']} |")
    out.append(f"\nMedians of {s['repeat']} pairs of runs. {s['messages']:,} messages per run, "
               f"{s['bytes_per_message'] / 1024:.1f} KiB each on average; at most "
               f"{s['in_flight']} messages in flight; {s['workers']} publisher processes. "
               "Server CPU s: this process over a server run (link, asyncio loop, ingest "
               "worker, ack thread) plus its parse processes.\n")
    out.append("**Every run** (in the order run):\n")
    out.append("| pair | run | s | rows/s | messages/s | server CPU s | Mosquitto CPU s "
               "| publishers CPU s | others CPU s | ingest worker storing |")
    out.append("|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in s["runs"]:
        busy = ("-" if r["ingest_busy_s"] is None
                else f"{100 * r['ingest_busy_s'] / r['seconds']:.0f} %")
        kind = (r["kind"] if r["parse_workers"] is None
                 else f"{r['kind']} ({r['parse_workers']} parse processes)")
        out.append(f"| {r['pair']} | {kind} | {r['seconds']:.2f} | {r['rows_per_s']:,.0f} "
                   f"| {r['messages'] / r['seconds']:,.0f} | {r['cpu_s']:.1f} "
                   f"| {f(r['broker_cpu_s'])} | {r['publishers_cpu_s']:.1f} "
                   f"| {r['others_cpu_s']:.1f} | {busy} |")
    out += ["", "**Checks after each server run** (from the database, and the devices' acks):\n"]
    for c in s["checks"]:
        verdict = "PASS" if c["passed"] else "FAIL"
        out.append(f"- server run {c['pair']}: {verdict}: {c['devices_exact']}/{c['devices']} "
                   f"devices hold exactly seqs 1..n ({c['stored_rows']:,} rows stored, "
                   f"{c['expected_rows']:,} expected; lost {c['lost']}, duplicated "
                   f"{c['duplicated']}, stray {c['stray']}); stream_acks.upto_seq = n for "
                   f"{c['acks_stored']}/{c['devices']}; ack for n received by "
                   f"{c['acks_received']}/{c['devices']} devices")
        out.extend(f"  - {e}" for e in c["examples"])
    out.append(f"\nRecords the server found already stored (re-sent): "
               f"{s['duplicates_seen_by_server']}.\n")
    out += ["**Where the server's CPU went** (this process, mean of the server runs):\n",
            "| thread | CPU s | % of the run |", "|---|--:|--:|"]
    server_s = statistics.mean(r["seconds"] for r in s["runs"] if r["kind"] == "server")
    for name, value in sorted(s["server_threads_cpu_s"].items(), key=lambda kv: -kv[1]):
        if value >= 0.05:
            out.append(f"| {name} | {value:.1f} | {100 * value / server_s:.0f} % |")
    return "\n".join(out)


def wait_ready(pool: Any) -> None:
    """Start a runtime's parse processes and wait until all are ready (a long-running server
    starts them once, at its first backlog; a run measures the steady state after that).

    Raises:
        RuntimeError: not ready within 60 s.
    """
    deadline = time.monotonic() + 60
    while pool.ready() < pool.size:
        if time.monotonic() > deadline:
            raise RuntimeError("parse processes not ready within 60 s")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# --isolated: the ingest path alone, CPU per row
# ---------------------------------------------------------------------------------------------
def isolated(config: Config) -> dict[str, Any]:
    """CPU per row of the server's ingest alone: no broker, no devices, no acks sent.

    The same payloads as the MQTT runs (``device_payloads``, devices interleaved) are queued
    on a real :class:`~fleet_server.runtime.MqttRuntime` (never started) while its ingest
    worker is held busy, then released: the worker drains them as it does under load (groups
    of up to ``INGEST_GROUP``, the parse pool when ``parse_workers`` > 0, warmed up first).
    Measured from /proc: the ingest thread's CPU and the parse processes' CPU, per row; and
    the wall time of the drain. Thread CPU time barely moves with other sessions' load, so
    this is the steady figure to compare changes by.

    Raises:
        RuntimeError: the parse processes did not start.
    """
    from types import SimpleNamespace

    from fleet_server.auth import Principal
    from fleet_server.db import atomic
    from fleet_server.fleet import init_data_dir, open_fleet
    from fleet_server.registry.devices import provision
    from fleet_server.runtime import MqttRuntime
    from fleet_server.settings import Settings

    if config.directory.exists():
        shutil.rmtree(config.directory)
    config.directory.mkdir(parents=True)
    data = config.directory / "server"
    init_data_dir(Settings.model_validate({"data_dir": data}))
    fleet = open_fleet(Settings.model_validate({"data_dir": data}))
    ids = [f"ingest-{i:05d}" for i in range(config.devices)]
    with atomic(fleet.engine) as conn:
        for device_id in ids:
            provision(fleet, conn, device_id=device_id, profile="rpi4", tags=["bench"],
                      actor=Principal("bench", "ingest", "admin"))
    bodies = metrics_bodies(48, seed=config.devices)
    per_device = config.rows // config.devices
    runs: list[dict[str, Any]] = []
    run = 0
    try:
        for pair in range(config.repeat):
            for workers in config.parse_workers:
                per = [device_payloads(d, run * per_device + 1, per_device, config.batch,
                                       bodies) for d in ids]
                messages = [(telemetry_topic(d), p[i]) for i in range(len(per[0]))
                            for d, p in zip(ids, per, strict=True)]
                runtime = MqttRuntime(fleet, maintenance_interval_s=3600,
                                      parse_workers=workers)
                pool = runtime.parse_pool
                try:
                    if pool is not None:
                        wait_ready(pool)
                    busy = threading.Event()
                    runtime._ingest_pool.submit(busy.wait)
                    for topic, payload in messages:
                        runtime._on_message(SimpleNamespace(topic=topic, payload=payload))

                    def parse_cpu(pool: Any = pool) -> float:
                        return 0.0 if pool is None else sum(
                            stat_cpu(f"/proc/{pid}/stat") or 0.0 for pid in pool.pids if pid)

                    threads0, parse0, start = thread_cpu(), parse_cpu(), time.perf_counter()
                    busy.set()
                    runtime._ingest_pool.submit(lambda: None).result()  # after the drain
                    wall = time.perf_counter() - start
                    threads1, parse1 = thread_cpu(), parse_cpu()
                finally:
                    runtime._ingest_pool.shutdown(wait=True)
                    if pool is not None:
                        pool.close()
                    runtime._ack_pool.shutdown(wait=True)
                    runtime._replan_pool.shutdown(wait=True)
                rows = runtime.counters.snapshot()["stored"].get("telemetry", 0)
                if rows != per_device * len(ids):
                    raise RuntimeError(f"isolated run: stored {rows} rows, expected "
                                       f"{per_device * len(ids)}")
                ingest = sum(v - threads0.get(k, 0.0) for k, v in threads1.items()
                             if k.startswith("edgefleet-ingest"))
                runs.append({"pair": pair + 1, "parse_workers": workers or 0, "rows": rows,
                             "ingest_thread_us_per_row": 1e6 * ingest / rows,
                             "parse_processes_us_per_row": 1e6 * (parse1 - parse0) / rows,
                             "wall_rows_per_s": rows / wall})
                log(f"  isolated, {workers or 0} parse processes: "
                    f"{runs[-1]['ingest_thread_us_per_row']:.1f} us/row on the ingest thread, "
                    f"{runs[-1]['parse_processes_us_per_row']:.1f} in parse processes, "
                    f"{runs[-1]['wall_rows_per_s']:,.0f} rows/s")
                run += 1
    finally:
        fleet.engine.dispose()
    return {"isolated": True, "devices": config.devices, "rows": config.rows,
            "batch": config.batch, "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0],
            "codec": codec_name(), "runs": runs}


def isolated_markdown(s: dict[str, Any]) -> str:
    out = [(f"### Ingest alone (--isolated): {s['devices']} devices, {s['rows']:,} rows per "
            f"run, batches of {s['batch']} ({s['cpus']} CPUs, telemetry read with "
            f"{s['codec']}, load {s['load_1m']:.1f} at the end)\n"),
           ("| pair | parse processes | ingest thread us CPU/row | parse processes us CPU/row "
            "| total us CPU/row | drain rows/s (wall) |"),
           "|--:|--:|--:|--:|--:|--:|"]
    for r in s["runs"]:
        out.append(f"| {r['pair']} | {r['parse_workers']} | {r['ingest_thread_us_per_row']:.1f} "
                   f"| {r['parse_processes_us_per_row']:.1f} "
                   f"| {r['ingest_thread_us_per_row'] + r['parse_processes_us_per_row']:.1f} "
                   f"| {r['wall_rows_per_s']:,.0f} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def run(config: Config) -> dict[str, Any]:
    """Set up, alternate ceiling and server runs ``repeat`` times, check, summarise.

    Raises:
        RuntimeError: a part failed to start, a run stalled, or a publisher failed.
    """
    if config.directory.exists():
        shutil.rmtree(config.directory)
    config.directory.mkdir(parents=True)
    bench = Bench(config)
    runs: list[RunResult] = []
    checks: list[Integrity] = []
    log(f"setting up: Mosquitto, a server data dir, {config.devices} devices")
    try:
        bench.start()
        run = 0
        for pair in range(config.repeat):
            bench.build(run)
            log(f"pair {pair + 1}/{config.repeat}: {bench.messages:,} messages, "
                f"{bench.payload_bytes / 1e6:.0f} MB")
            ceiling = bench.ceiling_run(pair)
            runs.append(ceiling)
            log(f"  ceiling: {ceiling.rows_per_s:,.0f} rows/s ({ceiling.seconds:.1f} s)")
            for n, workers in enumerate(config.parse_workers):
                if n:
                    bench.build(run)
                server, acks = bench.server_run(pair, run, workers)
                runs.append(server)
                log(f"  server ({server.parse_workers} parse processes): "
                    f"{server.rows_per_s:,.0f} rows/s ({server.seconds:.1f} s)")
                checks.append(bench.check(run, acks))
                log(f"  check:   {'PASS' if checks[-1].passed else 'FAIL'}")
                run += 1
        return summary(config, runs, checks, bench)
    finally:
        bench.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n", 1)[0])
    parser.add_argument("--devices", type=int, default=200, help="devices (default 200)")
    parser.add_argument("--rows", type=int, default=200_000,
                        help="telemetry rows per run, spread over the devices (default 200,000)")
    parser.add_argument("--batch", type=int, default=100,
                        help="records per TelemetryBatch message (default 100)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="pairs of runs (ceiling, server), medians reported (default 3)")
    parser.add_argument("--workers", type=int, default=3,
                        help="publisher processes (default 3)")
    parser.add_argument("--in-flight", type=int, default=500,
                        help="messages published and not yet counted or stored, fleet-wide "
                             f"(default 500; at most {MOSQUITTO_MAX_QUEUED}, Mosquitto's queue "
                             "per client)")
    parser.add_argument("--dir", default=str(REPO / "bench" / "out" / "ingest"),
                        help="work directory (emptied first)")
    parser.add_argument("--parse-workers", default="default",
                        help="the server's parse processes: a comma-separated list runs one "
                             "server run per entry in each pair, e.g. 0,1 (default: the "
                             "runtime's default, min(2, CPUs - 1))")
    parser.add_argument("--isolated", action="store_true",
                        help="the ingest path alone (no broker, no devices): CPU per row of "
                             "the ingest thread and the parse processes")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of Markdown")
    args = parser.parse_args(argv)
    try:
        parse_workers = tuple(None if w.strip() == "default" else int(w)
                              for w in args.parse_workers.split(","))
    except ValueError:
        parse_workers = (-1,)
    if any(w is not None and w < 0 for w in parse_workers):
        parser.error(f"--parse-workers: expected integers >= 0 or 'default', comma-separated, "
                     f"got {args.parse_workers!r}")
    for name in ("devices", "rows", "batch", "repeat", "workers", "in_flight"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected an integer >= 1, got "
                         f"{getattr(args, name)}")
    if args.rows < args.devices:
        parser.error(f"--rows: expected at least one row per device (>= {args.devices}), "
                     f"got {args.rows}")
    if args.in_flight > MOSQUITTO_MAX_QUEUED:
        parser.error(f"--in-flight: expected at most {MOSQUITTO_MAX_QUEUED} (Mosquitto drops "
                     f"what it queues for one client past that), got {args.in_flight}")
    config = Config(args.devices, args.rows, args.batch, args.repeat,
                    min(args.workers, args.devices), args.in_flight, Path(args.dir),
                    parse_workers)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        result = isolated(config) if args.isolated else run(config)
    except RuntimeError as exc:
        log(f"error: {exc}")
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(isolated_markdown(result) if args.isolated else markdown(result))
    return 0 if args.isolated or result["integrity"] else 1


if __name__ == "__main__":
    sys.exit(main())

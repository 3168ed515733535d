"""Fleet simulator: N real agents against a real server and broker, with failure injection.

``python -m fleet_server.simulate --devices N`` (or :class:`FleetSimulation` from code) runs:

- **the server** in this process: ``create_app`` + ``attach_mqtt`` under uvicorn on a thread
  (admin API, TUF repository, MQTT runtime and ingest), on the embedded amqtt broker or on a
  real Mosquitto (``--broker mosquitto``; its password file is written from the database after
  provisioning and Mosquitto reloaded, as ``mosquitto-config`` does in production);
- **N real** :class:`agent.daemon.app.Agent` **instances**, each with its own data directory,
  provisioning file (0600), MQTT connection and TUF client: all on one asyncio loop thread in
  this process (``--workers 0``), or sharded over K worker processes (``--workers K``), each
  running N/K agents on one loop;
- **a real model**: the digits MLP (``model_tools.examples``) converted once per profile with
  ``model_tools.pipeline.convert`` and cached under ``<work-dir>/bundles``.

It pushes ``digits 1.0.0``, deploys it and measures the time from the deploy request to every
device reporting its expected outcome (polled from the server's database), the messages the
server ingested, and CPU (server, broker, agents) per device.

Failure knobs (what a device experiences, nothing is mocked inside the agent):

- ``--fail-fraction F``: those devices are tagged ``sim-fail`` and get ``digits 1.0.1``, a copy
  of 1.0.0 whose golden outputs the model cannot reproduce (``1 - p``), so the real on-device
  health check fails and the agent rolls back. They converge when they report
  ``rolled_back``; the others get 1.0.0 (tag ``sim-ok``) and converge on ``ok``.
- ``--offline-fraction F --offline-after S --offline-for S``: S seconds after the deploy those
  devices lose their network: the MQTT link is stopped (``DeviceLink.stop``; the retained
  ``offline`` status goes out) and every TUF request fails as a transient download error. After
  ``--offline-for`` seconds both come back; the agents must converge on their own (the retained
  desired state, reconcile retries with backoff).
- ``--slow-link-ms M``: every TUF request (metadata and targets: six per update, one metadata
  refresh of four requests, then the model file and its manifest) waits M ms first. The delay
  is on the download path only; MQTT publishes are not delayed.

The last two act through the agent's one injectable seam for this, ``Agent(tuf_fetcher=...)``.

Simulated devices share the host's cores, so each gets a copy of its profile
(``Agent(profiles_dir=...)``) with ``--device-threads`` onnxruntime threads (default 1: a
4-thread pool per device makes no sense when a thousand devices share two cores) and a p95
latency budget of ``--latency-budget-ms`` (default 10 s: a latency measured on a host shared by
N agents is the host's contention, not a device's speed, and at the profiles' 50 ms some healthy
devices roll back at 100 devices). ``0`` keeps the profile's value. The golden-output check is
unchanged, and that is what ``--fail-fraction`` trips.

Processes and threads (``--mqtt-loop``): a device runs one MQTT link on paho's own network
thread. ``thread`` hosts the agents that way, a paho thread each; paho waits with ``select()``,
which cannot watch descriptors numbered 1024 or more, so one process then holds at most
:data:`MAX_AGENTS_PER_PROCESS` agents and ``--workers`` is raised to match (1,000 devices: 13
workers). ``shared`` (the default) hands every link of a worker process to one
:class:`agent.transport.mqtt.LinkDriver`, a thread that runs all their paho clients on epoll,
so a process holds up to :data:`MAX_AGENTS_PER_SHARED_PROCESS`. What differs from a device is
only who reads and writes the socket: the agent's code (reconcile, TUF fetch, install, health
check, report) and the link's callbacks, events, publishes and PUBACK waits are the same, and
each device keeps its own connection, credentials and session. The driver connects with a
blocking TCP connect (fine on loopback) and checks keep-alives once a second for all links.
Either way the agents of a process share one asyncio loop and one ``--executor-threads`` pool
for their blocking work, where a device has its own; ``--executor-order newest-first`` (the
default) runs a device's report right after its update, as on a device, instead of behind every
other device's queued update. The hosting lives in :mod:`fleet_server.simulate_devices`.
``--worker-nice`` lowers the workers' priority so the server's CPU is not taken by the devices,
as on real hardware (default 0: all share equally).

Measurements and their caveats: server CPU is ``getrusage(RUSAGE_SELF)`` of this process minus
the CPU of the thread that drives the simulation (deploy request, polling); with
``--workers 0`` it includes the agents too, and with the embedded broker it includes the
broker. Mosquitto's and the workers' CPU and RSS come from ``/proc``, the workers' CPU and
context switches by thread kind (loop, executor, MQTT driver or paho threads) from
``/proc/self/task`` (``schedstat``: nanoseconds, where ``stat`` counts whole ticks), and the
machine's busy CPU (every process on the host) from ``/proc/stat``. "Messages" are what the
server ingested (device -> server: status, reported, telemetry) plus the desired states it
published.

Exit codes: 0 every device converged, 1 some did not within ``--timeout`` (or an error),
2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import random
import re
import resource
import shutil
import socket
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from fleet_server.simulate_devices import (
    EXECUTOR_ORDERS,
    MAX_AGENTS_IN_SERVER_PROCESS,
    MAX_AGENTS_PER_PROCESS,
    MAX_AGENTS_PER_SHARED_PROCESS,
    MQTT_LOOPS,
    AgentShard,
    DeviceSpec,
    NewestFirstExecutor,
    ProcessShard,
    Shard,
    ShardOptions,
    SimFetcher,
    SimLink,
    ThreadShard,
    machine_busy_s,
    proc_cpu_s,
    raise_nofile_limit,
    thread_deltas,
)

__all__ = [
    "BAD_VERSION",
    "EXECUTOR_ORDERS",
    "MAX_AGENTS_IN_SERVER_PROCESS",
    "MAX_AGENTS_PER_PROCESS",
    "MAX_AGENTS_PER_SHARED_PROCESS",
    "MODEL",
    "MQTT_LOOPS",
    "VERSION",
    "AgentShard",
    "DeviceSpec",
    "FleetSimulation",
    "NewestFirstExecutor",
    "ShardOptions",
    "SimConfig",
    "SimFetcher",
    "SimLink",
    "SimResult",
    "build_bundles",
    "bundle_tar",
    "config_from_args",
    "main",
    "raise_nofile_limit",
    "workers_for",
    "write_sim_profiles",
]

log = logging.getLogger(__name__)

MODEL = "digits"
VERSION = "1.0.0"
BAD_VERSION = "1.0.1"  # VERSION with golden outputs the model cannot reproduce
@dataclass(frozen=True)
class SimConfig:
    """One simulation run."""

    devices: int = 20
    workers: int = 0  # 0: agents on one loop thread in this process; K: K worker processes
    broker: str = "embedded"  # "embedded" (amqtt in the server) or "mosquitto"
    profiles: tuple[str, ...] = ("rpi4", "rpi-zero2w")  # assigned round-robin
    fail_fraction: float = 0.0  # devices whose update fails the on-device health check
    offline_fraction: float = 0.0  # devices that lose their network during the rollout
    offline_after_s: float = 0.0  # ... this long after the deploy request
    offline_for_s: float = 5.0  # ... for this long
    slow_link_ms: float = 0.0  # added before every TUF request of every device
    timeout_s: float = 120.0  # deploy -> every device converged, or the run fails
    seed: int = 0  # which devices fail / go offline
    device_threads: int = 1  # onnxruntime threads per simulated device; 0 = the profile's
    latency_budget_ms: float = 10_000.0  # simulated devices' p95 budget; 0 = the profile's
    executor_threads: int = 16  # default executor of each agent loop (blocking agent work)
    mqtt_loop: str = "shared"  # "shared": one MQTT driver thread per process; "thread": each
    #                            agent's own paho network thread, as on a device
    executor_order: str = "newest-first"  # or "fifo": see NewestFirstExecutor
    worker_nice: int = 0  # niceness added to worker processes (the server keeps priority)
    metrics_interval_s: float = 10.0  # agents' tick (a real agent's default)
    poll_interval_s: float = 0.1  # convergence polling of the server's database
    work_dir: Path | None = None  # default: a new temporary directory, removed on close
    cache_dir: Path | None = None  # converted bundles; default: <work_dir>/bundles
    keep: bool = False  # keep a temporary work_dir

    def __post_init__(self) -> None:
        problems = []
        if self.devices < 1:
            problems.append(f"devices: expected >= 1, got {self.devices}")
        if self.workers < 0:
            problems.append(f"workers: expected >= 0, got {self.workers}")
        if self.executor_order not in EXECUTOR_ORDERS:
            problems.append(f"executor_order: expected one of {', '.join(EXECUTOR_ORDERS)}, "
                            f"got {self.executor_order!r}")
        if self.mqtt_loop not in MQTT_LOOPS:
            problems.append(f"mqtt_loop: expected one of {', '.join(MQTT_LOOPS)}, got "
                            f"{self.mqtt_loop!r}")
        if self.broker not in ("embedded", "mosquitto"):
            problems.append(f"broker: expected 'embedded' or 'mosquitto', got {self.broker!r}")
        for name in ("fail_fraction", "offline_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                problems.append(f"{name}: expected 0..1, got {value}")
        for name in ("offline_after_s", "offline_for_s", "slow_link_ms", "device_threads",
                     "latency_budget_ms"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.timeout_s <= 0 or self.executor_threads < 1 or not self.profiles:
            problems.append("timeout_s > 0, executor_threads >= 1 and a profile are required")
        if self.workers == 0 and self.devices > MAX_AGENTS_IN_SERVER_PROCESS:
            problems.append(f"workers=0 runs at most {MAX_AGENTS_IN_SERVER_PROCESS} agents in "
                            f"the server's process, got {self.devices}: use workers >= 1")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class SimResult:
    """What a run measured (times in seconds, from the deploy request)."""

    config: dict[str, Any]
    converged: bool
    outcomes: dict[str, str]  # device -> "ok" | "rolled_back" | "pending"
    running: dict[str, str | None]  # device -> digits version it reports running
    converged_at: dict[str, float]  # device -> when it was first seen converged
    deploy_to_all_s: float | None  # None when not all converged
    elapsed_s: float
    first_s: float | None
    p50_s: float | None
    p95_s: float | None
    deploy_request_s: float  # the deploy API call(s): sign + publish every desired state
    ingest_messages: int
    desired_published: int
    msgs_per_s: float
    server_cpu_s: float
    server_cpu_note: str
    broker_cpu_s: float | None
    agents_cpu_s: float | None
    agent_rss_mb_per_device: float | None
    agent_threads: int | None
    setup_s: dict[str, float] = field(default_factory=dict)
    #: worker threads by kind (loop, executor, paho, ...) -> threads, cpu_s and context
    #: switches (voluntary, nonvoluntary) during the run, summed over the worker processes
    agents_by_thread: dict[str, dict[str, float]] | None = None
    #: CPU seconds the whole machine was busy during the run (/proc/stat; others' work too):
    #: against 2 x elapsed it says whether the cores were full
    machine_busy_s: float | None = None

    @property
    def devices(self) -> int:
        return len(self.outcomes)

    @property
    def workers(self) -> int:
        """Worker processes actually used (0: in-process)."""
        return int(self.config["workers_used"])

    def count(self, outcome: str) -> int:
        return sum(1 for v in self.outcomes.values() if v == outcome)

    @property
    def server_cpu_ms_per_device(self) -> float:
        return 1e3 * self.server_cpu_s / max(1, self.devices)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["devices"] = self.devices
        out["counts"] = {k: self.count(k) for k in ("ok", "rolled_back", "pending")}
        out["server_cpu_ms_per_device"] = self.server_cpu_ms_per_device
        return out

    def table(self) -> str:
        def s(v: float | None, unit: str = " s") -> str:
            return "-" if v is None else f"{v:.2f}{unit}"

        cfg = self.config
        rows = [
            ("devices", (f"{self.devices} ({', '.join(cfg['profiles'])}), broker "
                         f"{cfg['broker']}, workers {self.workers}")),
            ("deploy -> converged", (f"{s(self.deploy_to_all_s)} (first {s(self.first_s)}, p50 "
                                     f"{s(self.p50_s)}, p95 {s(self.p95_s)}; deploy request "
                                     f"{s(self.deploy_request_s)})")),
            ("outcomes", (f"ok {self.count('ok')}, rolled_back {self.count('rolled_back')}, "
                          f"pending {self.count('pending')}")),
            ("messages", (f"{self.ingest_messages} ingested + {self.desired_published} "
                          f"desired = {self.msgs_per_s:.0f} msg/s")),
            ("server CPU", (f"{self.server_cpu_s:.2f} s = {self.server_cpu_ms_per_device:.2f} "
                            f"ms/device ({self.server_cpu_note})")),
            ("broker CPU", s(self.broker_cpu_s)),
            ("agents CPU", s(self.agents_cpu_s)),
            ("agent RSS", s(self.agent_rss_mb_per_device, " MB/device")),
            ("agent threads", "-" if self.agent_threads is None else str(self.agent_threads)),
            ("machine busy", "-" if self.machine_busy_s is None else
             f"{self.machine_busy_s:.1f} CPU s in {self.elapsed_s:.1f} s ({os.cpu_count()} "
             "cores; every process on the host)"),
            ("agents by thread", "-" if not self.agents_by_thread else "; ".join(
                f"{k} x{v['threads']:.0f} {v['cpu_s']:.2f} s cpu, ctx {v['voluntary']:.0f}"
                f"+{v['nonvoluntary']:.0f}" for k, v in sorted(self.agents_by_thread.items()))),
            ("setup", ", ".join(f"{k} {v:.1f} s" for k, v in self.setup_s.items())),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


# ---------------------------------------------------------------------------------------------
# bundles: the digits MLP converted per profile, cached; the bad version derived from it
# ---------------------------------------------------------------------------------------------
def build_bundles(cache_dir: Path, profiles: Sequence[str]) -> dict[str, Path]:
    """profile -> bundle directory of ``digits 1.0.0`` (trained and converted once, then
    cached in ``cache_dir``; a bundle appears there whole or not at all).

    Raises:
        ModelToolsError: training or conversion failed (e.g. an unknown profile).
        OSError: ``cache_dir`` cannot be written.
    """
    from model_tools.examples import train_digits_mlp
    from model_tools.pipeline import ConvertRequest, convert
    from model_tools.profiles import get_profile

    out = {p: cache_dir / f"{MODEL}-{VERSION}-{p}" for p in profiles}
    missing = [p for p, d in out.items() if not (d / "manifest.json").is_file()]
    if not missing:
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as scratch:
        source = train_digits_mlp(Path(scratch) / "source")
        for p in missing:
            built = Path(scratch) / p
            convert(ConvertRequest(model=source.onnx_path, profile=get_profile(p), out=built,
                                   calibration=source.calibration_path,
                                   eval=source.eval_path, name=MODEL, version=VERSION,
                                   latency_runs=30))
            if not (out[p] / "manifest.json").is_file():  # a stale partial one: replace it
                shutil.rmtree(out[p], ignore_errors=True)
            with contextlib.suppress(OSError):  # another run cached it first: keep theirs
                built.rename(out[p])
    return out


def bundle_tar(directory: Path, *, bad: bool = False, version: str | None = None) -> bytes:
    """The bundle as a tar; ``bad``: version :data:`BAD_VERSION` with golden outputs ``1 - p``
    (float outputs), which the model cannot reproduce on the device; ``version``: the
    manifest says that version instead (ignored with ``bad``)."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    if version is not None:
        manifest["model"]["version"] = version
    if bad:
        import base64

        import numpy as np

        manifest["model"]["version"] = BAD_VERSION
        for tensor in manifest["golden"]["outputs"].values():
            if tensor["dtype"] == "float32":
                raw = np.frombuffer(base64.b64decode(tensor["b64"]), np.float32)
                tensor["b64"] = base64.b64encode((1.0 - raw).tobytes()).decode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(directory / "model.onnx", arcname="model.onnx")
    return buf.getvalue()


def write_sim_profiles(directory: Path, *, threads: int = 0,
                       latency_budget_ms: float = 0.0) -> Path:
    """Copies of ``device_profiles/*.toml`` for simulated devices, which share the host's
    cores: ``threads`` and ``latency_budget_ms`` replaced where non-zero."""
    from device_profiles import PROFILE_DIR

    directory.mkdir(parents=True, exist_ok=True)
    for src in sorted(Path(PROFILE_DIR).glob("*.toml")):
        text = src.read_text(encoding="utf-8")
        if threads:
            text = re.sub(r"(?m)^threads\s*=\s*\d+", f"threads = {threads}", text)
        if latency_budget_ms:
            text = re.sub(r"(?m)^latency_budget_ms\s*=\s*[0-9.]+",
                          f"latency_budget_ms = {float(latency_budget_ms)!r}", text)
        (directory / src.name).write_text(text, encoding="utf-8")
    return directory


def workers_for(config: SimConfig) -> int:
    """Worker processes a run uses: ``config.workers``, raised so that none holds more agents
    than its MQTT loop allows, and at most one per device (0 stays 0: in-process)."""
    if not config.workers:
        return 0
    per = (MAX_AGENTS_PER_SHARED_PROCESS if config.mqtt_loop == "shared"
           else MAX_AGENTS_PER_PROCESS)
    return min(config.devices, max(config.workers, -(-config.devices // per)))


# ---------------------------------------------------------------------------------------------
# the simulation: server + broker here, agents in shards, deploy, measure
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(what: str, check: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(step)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _child_pid(name: str) -> int | None:
    """A direct child of this process whose command name is ``name`` (e.g. mosquitto)."""
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        if comm == name and stat.rsplit(")", 1)[1].split()[1] == me:
            return int(entry)
    return None


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class FleetSimulation:
    """Server, broker and N agents; :meth:`run` deploys and measures. A context manager::

        with FleetSimulation(SimConfig(devices=20, fail_fraction=0.25)) as sim:
            result = sim.run()
    """

    def __init__(self, config: SimConfig, *, log_level: int = logging.WARNING) -> None:
        self.config = config
        self._log_level = log_level
        self._tmp: Path | None = None
        if config.work_dir is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="edgefleet-sim-"))
        self.work_dir = config.work_dir or self._tmp or Path()
        self.cache_dir = config.cache_dir or self.work_dir / "bundles"
        self.run_dir = self.work_dir / "run"
        self.devices: list[DeviceSpec] = []
        self.setup_s: dict[str, float] = {}
        self._broker: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._app: Any = None
        self._client: Any = None
        self._shards: list[Shard] = []
        self._shard_devices: list[list[DeviceSpec]] = []
        self.workers_used = config.workers
        self._ran = False

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        out = fn()
        self.setup_s[name] = time.perf_counter() - t0
        return out

    def start(self) -> None:
        """Bundles, broker and server, models pushed, devices provisioned, agents connected.

        Raises:
            TimeoutError: the server or the agents did not come up in time.
            FleetError, BrokerSetupError, AgentError: a part failed to start.
        """
        cfg = self.config
        raise_nofile_limit()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        bundles = self._timed("bundles", lambda: build_bundles(self.cache_dir, cfg.profiles))
        self._timed("server", self._start_server)
        self._timed("push", lambda: self._push(bundles))
        self._timed("provision", self._provision)
        self._timed("agents", self._start_agents)

    def close(self) -> None:
        """Stop agents, server and broker; remove a temporary work dir (unless ``keep``)."""
        for shard in self._shards:
            try:
                shard.close()
            except (OSError, RuntimeError) as exc:  # keep closing the rest
                log.warning("closing a shard failed: %s", exc)
        self._shards = []
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
            self._server = self._thread = None
        if self._broker is not None:
            self._broker.stop()
            self._broker = None
        if self._tmp is not None and not self.config.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    # -- server side --------------------------------------------------------------------------
    def _start_server(self) -> None:
        import httpx
        import uvicorn

        from fleet_server.api.app import create_app
        from fleet_server.fleet import init_data_dir, server_mqtt_secret
        from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
        from fleet_server.mqtt.passwords import hash_password
        from fleet_server.runtime import attach_mqtt
        from fleet_server.settings import SERVER_MQTT_USER, Settings

        data = self.run_dir / "server"
        port = _free_port()
        values: dict[str, Any] = {"data_dir": data, "port": port}
        token = init_data_dir(Settings(**values))
        if self.config.broker == "mosquitto":
            if find_mosquitto() is None:
                raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
            (self.run_dir / "mosquitto").mkdir(mode=0o700)
            self._broker = MosquittoProcess(
                self.run_dir / "mosquitto",
                {SERVER_MQTT_USER: hash_password(server_mqtt_secret(data))}, SERVER_MQTT_USER)
            self._broker.start()
            values.update(mqtt_url=self._broker.url, mqtt_public_url=self._broker.url)
        else:
            values.update(mqtt_port=0)
        self._app = create_app(Settings(**values))
        attach_mqtt(self._app, maintenance_interval_s=3600)
        self._server = uvicorn.Server(uvicorn.Config(
            self._app, host="127.0.0.1", port=port, log_level="warning", backlog=4096))
        thread = self._thread = threading.Thread(target=self._server.run, name="sim-server",
                                                 daemon=True)
        thread.start()
        _wait("the server to start", lambda: bool(self._server.started)
              or not thread.is_alive(), 60)
        if not self._server.started:
            raise RuntimeError("the server did not start (see its log above)")
        self._client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600,
                                    headers={"Authorization": f"Bearer {token}"})

    @property
    def fleet(self) -> Any:
        """The server's open :class:`fleet_server.fleet.Fleet`."""
        return self._app.state.fleet

    @property
    def mqtt(self) -> Any:
        """The server's :class:`fleet_server.runtime.MqttRuntime`."""
        return self._app.state.mqtt

    def _post(self, path: str, **kwargs: Any) -> dict[str, Any]:
        r = self._client.post(path, **kwargs)
        if r.status_code >= 300:
            raise RuntimeError(f"POST {path}: HTTP {r.status_code}: {r.text[:500]}")
        out: dict[str, Any] = r.json()
        return out

    def _push(self, bundles: Mapping[str, Path]) -> None:
        for directory in bundles.values():
            for bad in (False, True) if self.config.fail_fraction > 0 else (False,):
                self._post("/v1/models", content=bundle_tar(directory, bad=bad),
                           headers={"Content-Type": "application/x-tar"})

    def _provision(self) -> None:
        """All devices in one transaction (library calls), files written 0600; Mosquitto's
        password file rewritten from the database and reloaded."""
        from fleet_server.auth import Principal
        from fleet_server.db import atomic
        from fleet_server.fleet import server_mqtt_secret
        from fleet_server.mqtt.passwords import hash_password
        from fleet_server.registry.devices import mqtt_credentials, provision
        from fleet_server.settings import SERVER_MQTT_USER

        cfg = self.config
        n = cfg.devices
        ids = [f"sim-{i:05d}" for i in range(n)]
        rng = random.Random(cfg.seed)
        failing = set(rng.sample(ids, round(cfg.fail_fraction * n)))
        offline = set(rng.sample(ids, round(cfg.offline_fraction * n)))
        actor = Principal("simulator", "fleet-simulator", "admin")
        provs = []
        with atomic(self.fleet.engine) as conn:
            for i, dev in enumerate(ids):
                profile = cfg.profiles[i % len(cfg.profiles)]
                tags = ["sim", "sim-fail" if dev in failing else "sim-ok"]
                provs.append(provision(self.fleet, conn, device_id=dev, profile=profile,
                                       tags=tags, actor=actor).provisioning)
                self.devices.append(DeviceSpec(dev, profile, str(self.run_dir / "devices" / dev),
                                               fails=dev in failing, offline=dev in offline))
        for spec, prov in zip(self.devices, provs, strict=True):
            _write_private(Path(spec.home) / "provisioning.json", prov.to_bytes())
        if self._broker is not None:
            with atomic(self.fleet.engine) as conn:
                creds = mqtt_credentials(conn)
            creds[SERVER_MQTT_USER] = hash_password(server_mqtt_secret(
                self.fleet.settings.data_dir))
            self._broker.reload(creds)

    # -- device side --------------------------------------------------------------------------
    def _start_agents(self) -> None:
        cfg = self.config
        profiles_dir = None
        if cfg.device_threads or cfg.latency_budget_ms:
            profiles_dir = str(write_sim_profiles(
                self.run_dir / "profiles", threads=cfg.device_threads,
                latency_budget_ms=cfg.latency_budget_ms))
        timeout = 60.0 + 0.2 * cfg.devices
        options = ShardOptions(slow_link_ms=cfg.slow_link_ms, profiles_dir=profiles_dir,
                               executor_threads=cfg.executor_threads, mqtt_loop=cfg.mqtt_loop,
                               executor_order=cfg.executor_order,
                               metrics_interval_s=cfg.metrics_interval_s,
                               connect_timeout_s=timeout, nice=cfg.worker_nice)
        self.workers_used = workers_for(cfg)
        k = max(1, self.workers_used)
        self._shard_devices = [self.devices[i::k] for i in range(k)]
        if cfg.workers == 0:
            self._shards = [ThreadShard(self.devices, options)]
        else:
            self._shards = [ProcessShard(devices, options, self._log_level)
                            for devices in self._shard_devices]
        for shard in self._shards:
            shard.wait_ready(timeout + 30)
        # the server has seen every device come online and ingested its first reports
        _wait("every device online at the server", lambda: self._online_count() == cfg.devices,
              timeout)
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 0.5:
            now_count = self.mqtt.ingested
            if now_count != last:
                last, since = now_count, time.monotonic()
            time.sleep(0.05)

    def _online_count(self) -> int:
        from sqlalchemy import func, select

        from fleet_server.db import tables
        from fleet_server.db.engine import reading

        with reading(self.fleet.engine) as conn:  # a snapshot: ingest never waits for it
            return int(conn.execute(select(func.count()).select_from(tables.devices).where(
                tables.devices.c.online.is_(True))).scalar_one())

    def reported(self, since: int = 0, only: Collection[str] | None = None
                 ) -> dict[str, dict[str, Any] | None]:
        """device -> its last reported state as the server stored it (only devices that
        reported at or after unix second ``since``, and only those in ``only`` if given)."""
        from sqlalchemy import select

        from fleet_server.db import tables
        from fleet_server.db.engine import reading

        c = tables.devices.c
        query = select(c.id, c.reported)
        if since:
            query = query.where(c.reported_at >= since)
        if only is not None:
            query = query.where(c.id.in_(sorted(only)))
        with reading(self.fleet.engine) as conn:
            rows = conn.execute(query).all()
        return {r.id: json.loads(r.reported) if r.reported else None for r in rows}

    @staticmethod
    def _running_version(rep: Mapping[str, Any] | None) -> str | None:
        for m in (rep or {}).get("running") or ():
            if m.get("name") == MODEL:
                return str(m.get("version"))
        return None

    def _outcome(self, spec: DeviceSpec, rep: Mapping[str, Any] | None) -> str:
        if rep is None or int(rep.get("applied_sequence") or 0) < 1:
            return "pending"
        running = self._running_version(rep)
        if spec.fails:
            ok = rep.get("last_result") == "rolled_back" and running != BAD_VERSION
            return "rolled_back" if ok else "pending"
        return "ok" if rep.get("last_result") == "ok" and running == VERSION else "pending"

    # -- the measured part -------------------------------------------------------------------
    def run(self) -> SimResult:
        """Deploy, inject the configured failures, wait for every device to converge.

        Raises:
            RuntimeError: not started, or a deploy request or a shard command failed.
        """
        if self._app is None or not self._shards:
            raise RuntimeError("FleetSimulation.run: call start() (or use `with`) first")
        if self._ran:
            raise RuntimeError("FleetSimulation.run: runs once per simulation (the devices "
                               "already hold the deployment); start a new one")
        self._ran = True
        cfg = self.config
        offline = [d.device_id for d in self.devices if d.offline]
        specs = {d.device_id: d for d in self.devices}
        broker_pid = _child_pid("mosquitto") if self._broker is not None else None
        pids = [s.pid for s in self._shards if s.pid is not None]

        def cpu_now() -> tuple[float, float, float | None, float | None]:
            ru = resource.getrusage(resource.RUSAGE_SELF)
            workers = [proc_cpu_s(p) for p in pids]
            broker = proc_cpu_s(broker_pid) if broker_pid else None
            return (ru.ru_utime + ru.ru_stime, time.thread_time(),
                    sum(w for w in workers if w is not None) if pids else None, broker)

        went_offline = bool(offline) and cfg.offline_after_s == 0
        if went_offline:  # "at the deploy": before it, so it is not part of the measured time
            self._command_all("offline", offline)
        threads0 = [s.command("stats")["by_thread"] for s in self._shards] if pids else []
        busy0 = machine_busy_s()
        ingested0 = self.mqtt.ingested
        since = int(time.time()) - 1  # reported_at is whole unix seconds, the server's clock
        cpu0 = cpu_now()
        t0 = time.perf_counter()
        desired = 0
        groups = [("sim-ok", VERSION), ("sim-fail", BAD_VERSION)]
        for tag, version in groups:
            if any(d.fails == (tag == "sim-fail") for d in self.devices):
                out = self._post("/v1/deployments", json={
                    "model": MODEL, "version": version, "selector": {"tags": [tag]}})
                desired += len(out.get("desired_changed") or ())
        deploy_request_s = time.perf_counter() - t0
        restored = not offline
        done_at: dict[str, float] = {}
        outcomes: dict[str, str] = {d: "pending" for d in specs}
        reps: dict[str, dict[str, Any] | None] = {}
        while True:
            elapsed = time.perf_counter() - t0
            if offline and not went_offline and elapsed >= cfg.offline_after_s:
                self._command_all("offline", offline)
                went_offline = True
            if went_offline and not restored and elapsed >= cfg.offline_after_s + cfg.offline_for_s:
                self._command_all("online", offline)
                restored = True
            # only devices still pending: a poll costs what is left, not the whole fleet
            reps.update(self.reported(since, only=specs.keys() - done_at.keys()))
            now = time.perf_counter() - t0
            for dev, spec in specs.items():
                if dev in done_at or (spec.offline and not restored):
                    continue
                outcome = self._outcome(spec, reps.get(dev))
                if outcome != "pending":
                    outcomes[dev], done_at[dev] = outcome, now
            if len(done_at) == len(specs) or now > cfg.timeout_s:
                break
            time.sleep(cfg.poll_interval_s)
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_now()
        busy1 = machine_busy_s()
        ingested = self.mqtt.ingested - ingested0
        converged = len(done_at) == len(specs)
        if not restored:
            self._command_all("online", offline)
        stats = [s.command("stats") for s in self._shards]
        agents_rss = sum(s["rss_mb"] for s in stats) / len(specs) if pids else None
        times = list(done_at.values())
        server_note = "this process minus the driver thread"
        if cfg.workers == 0:
            server_note += "; INCLUDES the in-process agents"
        if cfg.broker == "embedded":
            server_note += "; includes the embedded broker"
        return SimResult(
            config={**asdict(cfg), "work_dir": str(self.work_dir),
                    "cache_dir": str(self.cache_dir), "workers_used": self.workers_used},
            converged=converged, outcomes=outcomes, converged_at=dict(done_at),
            running={d: self._running_version(reps.get(d)) for d in specs},
            deploy_to_all_s=max(times) if converged and times else None, elapsed_s=elapsed,
            first_s=min(times) if times else None, p50_s=_percentile(times, 50),
            p95_s=_percentile(times, 95), deploy_request_s=deploy_request_s,
            ingest_messages=ingested, desired_published=desired,
            msgs_per_s=(ingested + desired) / elapsed if elapsed > 0 else 0.0,
            server_cpu_s=(cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), server_cpu_note=server_note,
            broker_cpu_s=(cpu1[3] - cpu0[3]) if cpu1[3] is not None and cpu0[3] is not None
            else None,
            agents_cpu_s=(cpu1[2] - cpu0[2]) if cpu1[2] is not None and cpu0[2] is not None
            else None,
            agent_rss_mb_per_device=agents_rss,
            agent_threads=sum(int(s["threads"]) for s in stats) if pids else None,
            setup_s=dict(self.setup_s),
            agents_by_thread=thread_deltas(threads0, [s["by_thread"] for s in stats])
            if pids else None,
            machine_busy_s=busy1 - busy0 if busy0 is not None and busy1 is not None else None)

    def _command_all(self, name: str, device_ids: Sequence[str]) -> None:
        wanted = set(device_ids)
        for shard, devices in zip(self._shards, self._shard_devices, strict=True):
            mine = [d.device_id for d in devices if d.device_id in wanted]
            if mine:
                shard.command(name, mine)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fleet_server.simulate",
        description="Run N real edgefleet agents against a real server and broker, deploy "
                    "digits 1.0.0 and measure deploy -> every device converged.",
        epilog="example: python -m fleet_server.simulate --devices 300 --workers 2 --broker "
               "mosquitto --fail-fraction 0.1 --json\n"
               "exit codes: 0 every device converged, 1 not within --timeout or an error, "
               "2 usage",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = SimConfig()
    p.add_argument("--devices", type=int, default=d.devices, help="agents to run (%(default)s)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="worker processes for the agents, raised to devices/"
                        f"{MAX_AGENTS_PER_SHARED_PROCESS} (--mqtt-loop shared) or devices/"
                        f"{MAX_AGENTS_PER_PROCESS} (thread); about 80 agents a process cost "
                        "the least CPU per device; 0 = one loop thread in the server's process "
                        f"(at most {MAX_AGENTS_IN_SERVER_PROCESS} devices) (%(default)s)")
    p.add_argument("--broker", choices=("embedded", "mosquitto"), default=d.broker)
    p.add_argument("--profiles", default=",".join(d.profiles),
                   help="comma-separated device profiles, assigned round-robin (%(default)s)")
    p.add_argument("--fail-fraction", type=float, default=d.fail_fraction,
                   help="devices whose update fails the on-device health check")
    p.add_argument("--offline-fraction", type=float, default=d.offline_fraction,
                   help="devices that lose their network during the rollout")
    p.add_argument("--offline-after", type=float, default=d.offline_after_s, metavar="S",
                   help="seconds after the deploy request they go offline (%(default)s)")
    p.add_argument("--offline-for", type=float, default=d.offline_for_s, metavar="S",
                   help="seconds they stay offline (%(default)s)")
    p.add_argument("--slow-link-ms", type=float, default=d.slow_link_ms, metavar="M",
                   help="delay before every TUF request of every device (%(default)s)")
    p.add_argument("--timeout", type=float, default=d.timeout_s, metavar="S",
                   help="deploy -> all converged, else exit 1 (%(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device-threads", type=int, default=d.device_threads,
                   help="onnxruntime threads per device; 0 = the profile's (%(default)s)")
    p.add_argument("--latency-budget-ms", type=float, default=d.latency_budget_ms,
                   help="p95 budget of the on-device health check; 0 = the profile's "
                        "(%(default)s: latency on a host shared by N agents is the host's "
                        "contention, not a device's speed)")
    p.add_argument("--executor-threads", type=int, default=d.executor_threads,
                   help="threads per agent loop for blocking agent work (%(default)s)")
    p.add_argument("--executor-order", choices=EXECUTOR_ORDERS, default=d.executor_order,
                   help="which queued blocking job of a worker's agents runs next: the newest "
                        "(a device's report right after its update, as on a device) or the "
                        "oldest (%(default)s)")
    p.add_argument("--mqtt-loop", choices=MQTT_LOOPS, default=d.mqtt_loop,
                   help="who runs the agents' MQTT network loop: 'shared', one driver thread "
                        "per process on epoll (up to "
                        f"{MAX_AGENTS_PER_SHARED_PROCESS} agents a process), or 'thread', each "
                        "agent's own paho thread as on a device (up to "
                        f"{MAX_AGENTS_PER_PROCESS}: paho's select()) (%(default)s)")
    p.add_argument("--worker-nice", type=int, default=d.worker_nice, metavar="N",
                   help="niceness of the worker processes: real devices do not take the "
                        "server's CPU; N > 0 keeps it the server's on a shared host "
                        "(%(default)s)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where server, devices and the bundle cache go (default: a temporary "
                        "directory, removed afterwards)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="converted bundles (default: <work-dir>/bundles with --work-dir, else "
                        "$XDG_CACHE_HOME/edgefleet/simulate, i.e. ~/.cache/...)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work dir")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log the agents' INFO lines")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """The :class:`SimConfig` the parsed options describe.

    Raises:
        ValueError: an option is out of range.
    """
    cache = args.cache_dir
    if cache is None and args.work_dir is None:  # a temporary work dir: cache elsewhere
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache = Path(xdg) / "edgefleet" / "simulate"
    return SimConfig(
        devices=args.devices, workers=args.workers, broker=args.broker,
        profiles=tuple(p.strip() for p in args.profiles.split(",") if p.strip()),
        fail_fraction=args.fail_fraction, offline_fraction=args.offline_fraction,
        offline_after_s=args.offline_after, offline_for_s=args.offline_for,
        slow_link_ms=args.slow_link_ms, timeout_s=args.timeout, seed=args.seed,
        device_threads=args.device_threads, latency_budget_ms=args.latency_budget_ms,
        executor_threads=args.executor_threads, mqtt_loop=args.mqtt_loop,
        executor_order=args.executor_order,
        worker_nice=args.worker_nice,
        work_dir=args.work_dir, cache_dir=cache, keep=args.keep)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: run one simulation, print the summary (or JSON), exit 0 if all converged."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    from agent.errors import AgentError
    from fleet_server.errors import FleetError

    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        with FleetSimulation(config, log_level=level) as sim:
            print(f"{config.devices} devices up (setup: "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in sim.setup_s.items())
                  + "); deploying", file=sys.stderr, flush=True)
            result = sim.run()
    except (RuntimeError, TimeoutError, OSError, AgentError, FleetError) as exc:
        print(f"simulation failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(result.table())
    if not result.converged:
        pending = [d for d, o in result.outcomes.items() if o == "pending"]
        print(f"NOT CONVERGED within {config.timeout_s:.0f} s: {len(pending)} device(s) "
              f"pending, e.g. {', '.join(pending[:5])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from fleet_server.simulate import main as _main  # the real module, not __main__

    sys.exit(_main())

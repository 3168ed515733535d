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

Processes: paho-mqtt waits with ``select()``, which cannot watch descriptors numbered 1024 or
more, so one process holds at most :data:`MAX_AGENTS_PER_PROCESS` agents; ``--workers`` is
raised to match (1,000 devices: 13 workers). ``--worker-nice`` lowers their priority so the
server's CPU is not taken by the devices, as on real hardware (default 0: all share equally).

Measurements and their caveats: server CPU is ``getrusage(RUSAGE_SELF)`` of this process minus
the CPU of the thread that drives the simulation (deploy request, polling); with
``--workers 0`` it includes the agents too, and with the embedded broker it includes the
broker. Mosquitto's and the workers' CPU and RSS come from ``/proc``. "Messages" are what the
server ingested (device -> server: status, reported, telemetry) plus the desired states it
published.

Exit codes: 0 every device converged, 1 some did not within ``--timeout`` (or an error),
2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import io
import json
import logging
import multiprocessing
import multiprocessing.connection
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
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

if TYPE_CHECKING:
    from agent.daemon.app import Agent

__all__ = [
    "BAD_VERSION",
    "MAX_AGENTS_IN_SERVER_PROCESS",
    "MAX_AGENTS_PER_PROCESS",
    "MODEL",
    "VERSION",
    "AgentShard",
    "DeviceSpec",
    "FleetSimulation",
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
    "write_sim_profiles",
]

log = logging.getLogger(__name__)

MODEL = "digits"
VERSION = "1.0.0"
BAD_VERSION = "1.0.1"  # VERSION with golden outputs the model cannot reproduce
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: agents one process can hold. paho-mqtt 2.2 waits on its socket with select(), which cannot
#: watch a descriptor numbered 1024 or above (and paho swallows that ValueError: the link just
#: never connects; eclipse-paho/paho.mqtt.python#183). An agent holds about 11 descriptors
#: (two SQLite files with WAL and SHM, the MQTT socket and paho's socket pair, the local API's
#: listener, a keep-alive HTTP connection), so about 90 fit; keep a margin for reconnects.
MAX_AGENTS_PER_PROCESS = 80
MAX_AGENTS_IN_SERVER_PROCESS = 60  # the server's own sockets and files share the range


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


def bundle_tar(directory: Path, *, bad: bool = False) -> bytes:
    """The bundle as a tar; ``bad``: version :data:`BAD_VERSION` with golden outputs ``1 - p``
    (float outputs), which the model cannot reproduce on the device."""
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
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


# ---------------------------------------------------------------------------------------------
# the device side: agents on one loop, with a simulated link
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    profile: str
    home: str  # holds provisioning.json (0600) and data/
    fails: bool = False
    offline: bool = False


@dataclass(frozen=True)
class ShardOptions:
    slow_link_ms: float = 0.0
    profiles_dir: str | None = None
    executor_threads: int = 16
    metrics_interval_s: float = 10.0
    connect_timeout_s: float = 120.0
    nice: int = 0  # added to a worker process's niceness


class SimLink:
    """A device's simulated network: up or down, and a per-request delay."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.offline = False


class SimFetcher(FetcherInterface):
    """The ``tuf.ngclient`` fetcher of a simulated device: waits ``link.delay_s`` before each
    request and fails while the link is down, also mid-download (a ``DownloadError``, which the
    agent treats as transient and retries with backoff). The request itself goes to ``inner``
    (the agent's own ``AuthFetcher``)."""

    def __init__(self, inner: FetcherInterface, link: SimLink,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._inner = inner
        self._link = link
        self._sleep = sleep

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self._link.offline:
            raise tuf_exc.DownloadError(f"simulated link down: {url}")
        if self._link.delay_s:
            self._sleep(self._link.delay_s)
        return self._guard(self._inner.fetch(url))

    def _guard(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._link.offline:
                raise tuf_exc.DownloadError("simulated link down mid-download")
            yield chunk


def _proc_status(pid: int | str = "self") -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a process (seconds), from /proc; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _process_stats() -> dict[str, Any]:
    st = _proc_status()
    rss_kb = int(st.get("VmRSS", "0 kB").split()[0])
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "rss_mb": rss_kb / 1024, "threads": int(st.get("Threads", "0")),
            "fds": fds, "cpu_s": ru.ru_utime + ru.ru_stime}


class AgentShard:
    """Real agents on the running asyncio loop (one per process or loop thread)."""

    def __init__(self, devices: Sequence[DeviceSpec], options: ShardOptions) -> None:
        self.devices = list(devices)
        self.options = options
        self.agents: dict[str, Agent] = {}
        self.links: dict[str, SimLink] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> dict[str, Any]:
        """Build and run every agent; return once all are connected to the broker.

        Raises:
            TimeoutError: some agent did not connect within ``connect_timeout_s``.
            agent errors: an agent could not be built (bad provisioning file, ...).
        """
        from agent.config import AgentConfig
        from agent.daemon.app import Agent, load_provisioning
        from agent.transport.artifacts import AuthFetcher

        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(
            self.options.executor_threads, thread_name_prefix="sim-agents"))
        profiles = Path(self.options.profiles_dir) if self.options.profiles_dir else None
        for spec in self.devices:
            home = Path(spec.home)
            cfg = AgentConfig(provisioning=home / "provisioning.json", data_dir=home / "data",
                              http_port=0, metrics_interval_s=self.options.metrics_interval_s,
                              reconnect_min_s=0.5, reconnect_max_s=5.0)
            link = SimLink(self.options.slow_link_ms / 1e3)
            prov = load_provisioning(cfg.provisioning)
            agent = Agent(cfg, profiles_dir=profiles,
                          tuf_fetcher=SimFetcher(AuthFetcher(prov.http_token), link))
            stop = asyncio.Event()
            self.agents[spec.device_id], self.links[spec.device_id] = agent, link
            self._stops[spec.device_id] = stop
            self._tasks[spec.device_id] = asyncio.create_task(agent.run(stop))
            await asyncio.sleep(0)  # let it start while the next one is built
        deadline = time.monotonic() + self.options.connect_timeout_s
        while not all(a.link is not None and a.link.connected for a in self.agents.values()):
            for dev, task in self._tasks.items():
                if task.done() and task.exception() is not None:
                    raise RuntimeError(f"agent {dev} died: {task.exception()!r}")
            if time.monotonic() > deadline:
                down = [d for d, a in self.agents.items()
                        if a.link is None or not a.link.connected]
                raise TimeoutError(f"{len(down)} of {len(self.agents)} agents not connected "
                                   f"after {self.options.connect_timeout_s:.0f} s: {down[:5]}")
            await asyncio.sleep(0.05)
        return self.stats()

    async def set_offline(self, device_ids: Sequence[str], offline: bool) -> int:
        """Take these devices' network down (or bring it back); return how many changed."""
        loop = asyncio.get_running_loop()
        jobs = []
        for dev in device_ids:
            agent, link = self.agents.get(dev), self.links.get(dev)
            if agent is None or link is None or agent.link is None or link.offline == offline:
                continue
            link.offline = offline
            mqtt = agent.link
            jobs.append(loop.run_in_executor(None, mqtt.stop if offline else mqtt.start))
        await asyncio.gather(*jobs)
        return len(jobs)

    def stats(self) -> dict[str, Any]:
        out = _process_stats()
        out["agents"] = len(self.agents)
        out["connected"] = sum(1 for a in self.agents.values()
                               if a.link is not None and a.link.connected)
        return out

    async def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        stats = self.stats()
        for stop in self._stops.values():
            stop.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()), timeout=timeout)
        return stats


# -- shard handles: the same commands in a loop thread or in a worker process ---------------
class _Shard(Protocol):
    @property
    def pid(self) -> int | None: ...

    def wait_ready(self, timeout: float) -> dict[str, Any]: ...

    def command(self, name: str, arg: Any = None, timeout: float = 60.0) -> Any: ...

    def close(self) -> dict[str, Any] | None: ...


async def _dispatch(shard: AgentShard, name: str, arg: Any) -> Any:
    if name == "offline":
        return await shard.set_offline(arg, True)
    if name == "online":
        return await shard.set_offline(arg, False)
    if name == "stats":
        return shard.stats()
    if name == "stop":
        return await shard.stop()
    raise ValueError(f"unknown shard command {name!r}")


class _ThreadShard:
    """Agents on a loop thread of this process (``--workers 0``)."""

    pid: int | None = None

    def __init__(self, devices: Sequence[DeviceSpec], options: ShardOptions) -> None:
        self.shard = AgentShard(devices, options)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-agents-loop",
                                        daemon=True)
        self._thread.start()
        self._ready = asyncio.run_coroutine_threadsafe(self.shard.start(), self._loop)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        return self._ready.result(timeout)

    def command(self, name: str, arg: Any = None, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(_dispatch(self.shard, name, arg),
                                                self._loop).result(timeout)

    def close(self) -> dict[str, Any] | None:
        stats: dict[str, Any] | None = None
        if self._ready.done() and self._ready.exception() is None:
            stats = self.command("stop", timeout=60)
        else:
            self._ready.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()
        return stats


def _worker_entry(conn: multiprocessing.connection.Connection, devices: list[dict[str, Any]],
                  options: dict[str, Any], log_level: int) -> None:
    """A worker process: run its agents on one loop and obey the parent's commands."""
    logging.basicConfig(level=log_level, format="%(asctime)s worker %(process)d %(name)s "
                        "%(levelname)s %(message)s")
    raise_nofile_limit()
    if options.get("nice"):
        os.nice(int(options["nice"]))
    asyncio.run(_worker_main(conn, [DeviceSpec(**d) for d in devices], ShardOptions(**options)))


async def _worker_main(conn: multiprocessing.connection.Connection,
                       devices: list[DeviceSpec], options: ShardOptions) -> None:
    from agent.errors import AgentError

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def reader() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop
                msg = ("stop", None)
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg[0] == "stop":
                return

    shard = AgentShard(devices, options)
    try:
        conn.send(("ready", await shard.start()))
    except (AgentError, OSError, RuntimeError, ValueError):  # the parent raises it
        conn.send(("error", traceback.format_exc()))
        await shard.stop()
        return
    threading.Thread(target=reader, name="sim-worker-commands", daemon=True).start()
    while True:
        name, arg = await inbox.get()
        try:
            reply = ("ok", await _dispatch(shard, name, arg))
        except (AgentError, OSError, RuntimeError, ValueError):  # the parent raises it
            reply = ("error", traceback.format_exc())
        with contextlib.suppress(OSError):
            conn.send(reply)
        if name == "stop":
            return


class _ProcessShard:
    """Agents in a worker process (``--workers K``); commands over a pipe."""

    def __init__(self, devices: Sequence[DeviceSpec], options: ShardOptions,
                 log_level: int) -> None:
        # by its real name, also under ``python -m`` (where this module is ``__main__``)
        this = importlib.import_module("fleet_server.simulate")
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=this._worker_entry, name="edgefleet-sim-worker",
                                    args=(child, [asdict(d) for d in devices], asdict(options),
                                          log_level), daemon=True)
        self._process.start()
        child.close()
        self.pid: int | None = self._process.pid
        self._lock = threading.Lock()

    def _recv(self, timeout: float, what: str) -> tuple[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"worker {self.pid}: no answer to {what} within {timeout:.0f} s")
        try:
            reply: tuple[str, Any] = self._conn.recv()
        except EOFError as exc:
            raise RuntimeError(f"worker {self.pid} exited "
                               f"(code {self._process.exitcode})") from exc
        return reply

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        kind, value = self._recv(timeout, "start-up")
        if kind != "ready":
            raise RuntimeError(f"worker {self.pid} failed to start its agents:\n{value}")
        return dict(value)

    def command(self, name: str, arg: Any = None, timeout: float = 60.0) -> Any:
        with self._lock:
            self._conn.send((name, arg))
            kind, value = self._recv(timeout, name)
        if kind != "ok":
            raise RuntimeError(f"worker {self.pid}: {name} failed:\n{value}")
        return value

    def close(self) -> dict[str, Any] | None:
        stats = None
        if self._process.is_alive():
            with contextlib.suppress(OSError, RuntimeError, TimeoutError):
                stats = self.command("stop", timeout=60)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(10)
        self._conn.close()
        return stats


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft open-files limit to the hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


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
        self._shards: list[_Shard] = []
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
                               executor_threads=cfg.executor_threads,
                               metrics_interval_s=cfg.metrics_interval_s,
                               connect_timeout_s=timeout, nice=cfg.worker_nice)
        k = 1
        if cfg.workers:
            k = min(len(self.devices), max(cfg.workers, -(-len(self.devices)
                                                       // MAX_AGENTS_PER_PROCESS)))
        self.workers_used = k if cfg.workers else 0
        self._shard_devices = [self.devices[i::k] for i in range(k)]
        if cfg.workers == 0:
            self._shards = [_ThreadShard(self.devices, options)]
        else:
            self._shards = [_ProcessShard(devices, options, self._log_level)
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
            workers = [_proc_cpu_s(p) for p in pids]
            broker = _proc_cpu_s(broker_pid) if broker_pid else None
            return (ru.ru_utime + ru.ru_stime, time.thread_time(),
                    sum(w for w in workers if w is not None) if pids else None, broker)

        went_offline = bool(offline) and cfg.offline_after_s == 0
        if went_offline:  # "at the deploy": before it, so it is not part of the measured time
            self._command_all("offline", offline)
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
            setup_s=dict(self.setup_s))

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
                        f"{MAX_AGENTS_PER_PROCESS}; 0 = one loop thread in the server's process "
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
        executor_threads=args.executor_threads, worker_nice=args.worker_nice,
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

"""The fleet simulator's device side: real agents hosted many to a process.

:mod:`fleet_server.simulate` runs the server and the broker and measures; this module hosts the
agents. An :class:`AgentShard` runs real :class:`agent.daemon.app.Agent` instances on one
asyncio loop, each with its own data directory, provisioning file, MQTT connection and TUF
client, behind a :class:`SimLink` (down, or slow) that acts through the agent's fetcher seam
(:class:`SimFetcher`). A shard lives on a loop thread of the caller (:class:`ThreadShard`) or
in a spawned worker process (:class:`ProcessShard`); both answer the same commands (offline,
online, stats, stop).

How a shard hosts its agents, and how that differs from a device:

- MQTT (``ShardOptions.mqtt_loop``): ``"shared"`` hands every agent's link to one
  :class:`agent.transport.mqtt.LinkDriver`, a thread that runs all their paho clients on epoll
  (up to :data:`MAX_AGENTS_PER_SHARED_PROCESS` a process); ``"thread"`` gives each link its own
  paho network thread, as on a device (paho's ``select()`` then limits a process to
  :data:`MAX_AGENTS_PER_PROCESS`). Each device keeps its own connection, credentials and
  session either way; only the thread that reads and writes the sockets differs.
- blocking agent work (updates, publishes) goes to one pool per shard of
  ``executor_threads``, where a device has its own threads; :class:`NewestFirstExecutor` runs
  the newest queued job first, so that a device's report follows its update at once, as on a
  device (``executor_order="fifo"`` queues it behind the other devices' updates);
- the agents of a shard share one asyncio loop, one process and its imported modules.

``stats`` reports the process's CPU and context switches by thread kind
(:func:`thread_kind`), which is how the simulator splits the agents' CPU by what it did.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import resource
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

if TYPE_CHECKING:
    from agent.daemon.app import Agent
    from agent.transport.mqtt import LinkDriver

__all__ = [
    "EXECUTOR_ORDERS",
    "MAX_AGENTS_IN_SERVER_PROCESS",
    "MAX_AGENTS_PER_PROCESS",
    "MAX_AGENTS_PER_SHARED_PROCESS",
    "MQTT_LOOPS",
    "AgentShard",
    "DeviceSpec",
    "NewestFirstExecutor",
    "ProcessShard",
    "Shard",
    "ShardOptions",
    "SimFetcher",
    "SimLink",
    "ThreadShard",
    "machine_busy_s",
    "proc_cpu_s",
    "raise_nofile_limit",
    "thread_deltas",
    "thread_kind",
]

log = logging.getLogger(__name__)

_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: agents one process can hold. paho-mqtt 2.2 waits on its socket with select(), which cannot
#: watch a descriptor numbered 1024 or above (and paho swallows that ValueError: the link just
#: never connects; eclipse-paho/paho.mqtt.python#183). An agent holds about 11 descriptors
#: (two SQLite files with WAL and SHM, the MQTT socket and paho's socket pair, the local API's
#: listener, a keep-alive HTTP connection), so about 90 fit; keep a margin for reconnects.
MAX_AGENTS_PER_PROCESS = 80
MAX_AGENTS_IN_SERVER_PROCESS = 60  # the server's own sockets and files share the range
#: agents one process holds when one :class:`agent.transport.mqtt.LinkDriver` drives their MQTT
#: clients on epoll (no select() limit): about 11 descriptors each, far below RLIMIT_NOFILE
MAX_AGENTS_PER_SHARED_PROCESS = 500
MQTT_LOOPS = ("shared", "thread")
EXECUTOR_ORDERS = ("newest-first", "fifo")



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
    mqtt_loop: str = "shared"  # see SimConfig.mqtt_loop
    executor_order: str = "newest-first"  # see SimConfig.executor_order
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


def proc_cpu_s(pid: int | str) -> float | None:
    """utime + stime of a process (seconds), from /proc; None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_busy_s() -> float | None:
    """CPU seconds all of the machine's CPUs spent busy since boot (/proc/stat: everything but
    idle and iowait); None where there is no /proc."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            ticks = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _CLK_TCK


def thread_kind(name: str) -> str:
    """What a worker thread does, from its name (threads Python did not start: ``native``)."""
    for prefix, kind in (("paho-mqtt-client", "paho"), ("sim-agents", "executor"),
                         ("edgefleet-mqtt-driver", "mqtt-driver"), ("MainThread", "loop"),
                         ("edgefleet-infer", "serving")):
        if name.startswith(prefix):
            return kind
    return "other" if name else "native"


def _thread_stats() -> dict[str, dict[str, float]]:
    """This process's CPU seconds and context switches, summed by :func:`thread_kind`:
    ``{kind: {"threads", "cpu_s", "voluntary", "nonvoluntary"}}``."""
    names = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    out: dict[str, dict[str, float]] = {}
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return out
    for tid in tids:
        try:  # nanoseconds on a CPU: /proc's stat counts whole ticks, and an idle agent's
            # thread spends less than one tick in a run (a thousand zeros)
            cpu: float | None = int(Path(f"/proc/self/task/{tid}/schedstat").read_text()
                                    .split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            cpu = proc_cpu_s(f"self/task/{tid}")
        st = _proc_status(f"self/task/{tid}")
        if cpu is None or not st:
            continue  # ended meanwhile
        row = out.setdefault(thread_kind(names.get(int(tid), "")),
                             {"threads": 0, "cpu_s": 0.0, "voluntary": 0, "nonvoluntary": 0})
        row["threads"] += 1
        row["cpu_s"] += cpu
        row["voluntary"] += int(st.get("voluntary_ctxt_switches", "0"))
        row["nonvoluntary"] += int(st.get("nonvoluntary_ctxt_switches", "0"))
    return out


def _process_stats() -> dict[str, Any]:
    st = _proc_status()
    rss_kb = int(st.get("VmRSS", "0 kB").split()[0])
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = -1
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return {"pid": os.getpid(), "rss_mb": rss_kb / 1024, "threads": int(st.get("Threads", "0")),
            "fds": fds, "cpu_s": ru.ru_utime + ru.ru_stime, "by_thread": _thread_stats()}


class NewestFirstExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that runs the newest queued job first (the agents' default executor).

    The agents of a process share it (a device has its own). First in, first out, a device's
    ``reported`` publish, submitted when its update ends, waits behind every update still
    queued for the other devices, and a process's reports leave in one burst at the end; on a
    device it leaves at once, and newest first keeps that. asyncio accepts only a
    ``ThreadPoolExecutor`` as the default, so this swaps the queue its threads read (they are
    started on the first submit and take the queue then).
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "") -> None:
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._work_queue = _NewestFirstQueue()  # type: ignore[assignment]


class _NewestFirstQueue(queue.LifoQueue[Any]):
    """Last in, first out, except the pool's stop signal (``None``), which goes under the
    queued work so that ``shutdown(wait=True)`` still runs it all, as a FIFO pool does."""

    def _put(self, item: Any) -> None:
        if item is None:
            self.queue.insert(0, item)
        else:
            self.queue.append(item)


class AgentShard:
    """Real agents on the running asyncio loop (one per process or loop thread)."""

    def __init__(self, devices: Sequence[DeviceSpec], options: ShardOptions) -> None:
        self.devices = list(devices)
        self.options = options
        self.agents: dict[str, Agent] = {}
        self.links: dict[str, SimLink] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._driver: LinkDriver | None = None

    async def start(self) -> dict[str, Any]:
        """Build and run every agent; return once all are connected to the broker.

        Raises:
            TimeoutError: some agent did not connect within ``connect_timeout_s``.
            agent errors: an agent could not be built (bad provisioning file, ...).
        """
        from agent.config import AgentConfig
        from agent.daemon.app import Agent, load_provisioning
        from agent.transport.artifacts import AuthFetcher
        from agent.transport.mqtt import LinkDriver

        loop = asyncio.get_running_loop()
        pool = (NewestFirstExecutor if self.options.executor_order == "newest-first"
                else concurrent.futures.ThreadPoolExecutor)
        loop.set_default_executor(pool(self.options.executor_threads,
                                       thread_name_prefix="sim-agents"))
        profiles = Path(self.options.profiles_dir) if self.options.profiles_dir else None
        if self.options.mqtt_loop == "shared":
            self._driver = LinkDriver()
            self._driver.start()
        for spec in self.devices:
            home = Path(spec.home)
            cfg = AgentConfig(provisioning=home / "provisioning.json", data_dir=home / "data",
                              http_port=0, metrics_interval_s=self.options.metrics_interval_s,
                              reconnect_min_s=0.5, reconnect_max_s=5.0)
            link = SimLink(self.options.slow_link_ms / 1e3)
            prov = load_provisioning(cfg.provisioning)
            agent = Agent(cfg, profiles_dir=profiles,
                          tuf_fetcher=SimFetcher(AuthFetcher(prov.http_token), link),
                          link_driver=self._driver)
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
        if self._driver is not None:
            self._driver.close()
            self._driver = None
        return stats


# -- shard handles: the same commands in a loop thread or in a worker process ---------------
class Shard(Protocol):
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


class ThreadShard:
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


class ProcessShard:
    """Agents in a worker process (``--workers K``); commands over a pipe."""

    def __init__(self, devices: Sequence[DeviceSpec], options: ShardOptions,
                 log_level: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_worker_entry, name="edgefleet-sim-worker",
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


def thread_deltas(before: Sequence[Mapping[str, Mapping[str, float]]],
                   after: Sequence[Mapping[str, Mapping[str, float]]]
                   ) -> dict[str, dict[str, float]]:
    """Per-kind thread counters of several processes: ``after - before``, summed (the thread
    count is the one after)."""
    out: dict[str, dict[str, float]] = {}
    for b, a in zip(before, after, strict=True):
        for kind, row in a.items():
            base = b.get(kind, {})
            acc = out.setdefault(kind, {"threads": 0, "cpu_s": 0.0, "voluntary": 0,
                                        "nonvoluntary": 0})
            acc["threads"] += row["threads"]
            for key in ("cpu_s", "voluntary", "nonvoluntary"):
                acc[key] += row[key] - base.get(key, 0)
    return out

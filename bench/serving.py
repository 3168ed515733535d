"""Benchmark the agent's local inference API against raw onnxruntime and a FastAPI peer.

Usage::

    .venv/bin/python bench/serving.py                  # plain-text table
    .venv/bin/python bench/serving.py --markdown       # Markdown table
    .venv/bin/python bench/serving.py --runs 5000 --duration 10 --out /tmp/bench-serving
    .venv/bin/python bench/serving.py --keep-awake      # also latency with the cores kept awake

Model: the digits MLP from :func:`model_tools.examples.train_digits_mlp` (input ``input``
float32 ``[N, 64]``), one eval sample per request. The agent runs in its own process (as the
daemon would), started by this script in ``--serve-agent`` mode: ``ModelHost`` (default 2
inference threads, default placement rule: a model measured under 200 us runs inline on the
event loop) + ``InferenceServer`` on 127.0.0.1, with the daemon's per-request accounting
attached (``agent.metrics.RequestMetrics``, which ``GET /metrics`` also reads), on the event
loop the daemon picks (:mod:`agent.serving.eventloop`: uvloop when installed), so what is
measured is what a request costs in the daemon. Unless ``--no-fallback-agent``, a second agent
process runs on asyncio's own loop, what a device without uvloop runs (32-bit Raspberry Pi
OS has no wheel), measured as info rows in (a) and (b).

(a) Latency, one keep-alive client in this process, interleaved in ``--rounds`` blocks so
    machine noise hits every method alike: raw ``InferenceSession.run`` in this process (same
    model, same input, same thread options) against a predict over loopback, arrays in and
    arrays out (the client encodes the request and decodes the answer inside the timed call).
    Two clients: ``lean`` (a raw keep-alive socket; what the server adds, the client costing
    as little as possible; the target is judged on this one) and ``AgentClient``
    (``agent.serving.client``: http.client, what ``edgefleet-agent predict`` uses). The lean
    client's JSON goes through ``agent.serving.wire`` (orjson when installed, as the agent's
    own client); an info row times the same client with stdlib ``json`` both ways, what a
    user writes without orjson. ``--json stdlib`` runs the agents with the standard
    library's json (``EDGEFLEET_JSON=stdlib``). Goal:
    p50 overhead <= 0.3 ms. For comparison (info), the same lean client against an agent
    process with inline running turned off (``inline_max_s=0``: every request crosses to the
    pool and back), unless ``--no-pool-peer``, and against the asyncio-loop agent.
    ``--keep-awake`` (info) then runs the raw and lean rows again while one busy-spinning
    process per core runs at SCHED_IDLE (nice 19 where SCHED_IDLE is refused). They get a core
    only when nothing else wants it, so they take no CPU from the measured processes, but they
    keep every core out of its idle state: on a VM, where waking an idle vCPU costs tens of
    microseconds per hop, this separates the host's wake-up latency from the software's cost.
    The verdict stays on the plain run.
(b) Throughput: ``wrk -t2 -c8 -d<duration>s`` posting the same JSON body to the agent and to
    the hand-written peer (``bench/peers/fastapi_peer.py``: FastAPI + uvicorn, 1 worker, no
    access log), alternating agent/peer for ``--wrk-rounds`` rounds after a warm-up each.
    Goal: agent >= 1.5x the peer's requests/s, judged against the fastest peer run. The peer
    runs on both stacks users get, picked with uvicorn's explicit options: ``--http h11
    --loop asyncio`` (``pip install uvicorn``) and ``--http httptools --loop uvloop``
    (``uvicorn[standard]``, which ``fastapi[standard]`` installs); the table names the stack.
    A stack whose modules are not importable is skipped and said so. When orjson is
    installed, an info row runs the faster stack with FastAPI's ``ORJSONResponse`` and
    ``orjson.loads`` of the body; the verdict stays against the peers written the usual way.
    Each row also gives the server process's CPU time per request (utime + stime over the
    timed run, every thread), steadier than requests/s on a shared machine. Skipped, and
    said so, without ``wrk``.
(c) Memory: VmRSS of the agent process (model loaded, after warm-up requests) against a bare
    ``python -c`` process that imports onnxruntime and holds an ``InferenceSession`` of the
    same model with the same thread options (after as many warm-up runs). Goal: <= +25 MB.

Goals are reported, never asserted: exit code 0 means the run finished (1 error, 2 usage).
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
PEER_DIR = Path(__file__).resolve().parent / "peers"
MODEL_NAME = "digits-mlp"

GOAL_OVERHEAD_MS = 0.3  # (a) p50 predict over loopback minus p50 raw session.run
GOAL_THROUGHPUT_RATIO = 1.5  # (b) agent requests/s over the peer's, 8 connections
GOAL_RSS_DELTA_MB = 25.0  # (c) agent RSS minus bare python + onnxruntime RSS
WARMUP = 300


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- child modes: the agent server, the bare session ------------------------------------------


def serve_agent(model: Path, port_file: Path, threads: int, workers: int,
                inline_max_s: float, loop_kind: str) -> int:
    """Run the agent's server on 127.0.0.1:0 with ``model`` loaded until SIGTERM."""
    import asyncio
    from collections.abc import Mapping

    import numpy as np

    from agent.metrics import RequestMetrics
    from agent.serving.eventloop import loop_factory
    from agent.serving.host import ModelHost
    from agent.serving.prom import AgentMetrics, AgentState
    from agent.serving.runtime import OnnxRuntime
    from agent.serving.server import InferenceServer

    metrics = RequestMetrics(start=time.time())
    prom = AgentMetrics(lambda: AgentState(now=time.time(), models=(), connected=False),
                        metrics, info={"device_id": "bench"})

    def observe(name: str, version: str, latency_ms: float, ok: bool, error_kind: str | None,
                inputs: Mapping[str, np.ndarray] | None,
                outputs: Mapping[str, np.ndarray] | None) -> None:
        # what agent.daemon.app.Agent._observe does per request (its drift deque aside)
        metrics.observe(name, version, latency_ms, ok, None if ok else "4xx")

    async def run() -> None:
        host = ModelHost(workers=workers, on_request=observe, inline_max_s=inline_max_s)
        host.swap(MODEL_NAME, "1", OnnxRuntime().load(model, threads=threads))
        server = InferenceServer(host, bind_host="127.0.0.1", port=0, metrics=prom.render)
        await server.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(server.port))
        os.replace(tmp, port_file)
        await stop.wait()
        await server.stop()
        host.close()

    with asyncio.Runner(loop_factory=loop_factory(loop_kind)[1]) as runner:
        runner.run(run())
    return 0


BARE_SESSION = """
import sys, numpy as np, onnxruntime as ort
o = ort.SessionOptions(); o.intra_op_num_threads = {threads}; o.inter_op_num_threads = 1
s = ort.InferenceSession({model!r}, sess_options=o, providers=["CPUExecutionProvider"])
x = np.load({sample!r})
for _ in range({warmup}): s.run(None, {{"input": x}})
print("ready", flush=True)
sys.stdin.read()
"""

SPINNER = """
import os
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except OSError:
    os.nice(19)
while True:
    pass
"""


def keep_awake() -> list[subprocess.Popen[bytes]]:
    """One SCHED_IDLE busy-spinner per usable core (see (a) in the module docstring)."""
    return [subprocess.Popen([sys.executable, "-c", SPINNER])
            for _ in range(len(os.sched_getaffinity(0)))]


# --- measuring ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_port(port_file: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text())
        if proc.poll() is not None:
            raise RuntimeError(f"agent server exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError("agent server did not start")


def wait_http(port: int, path: str, body: bytes, timeout: float = 60.0) -> None:
    """Poll until ``POST path`` answers 200 (the peer takes a while to import)."""
    import http.client

    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            status = conn.getresponse().status
            conn.close()
            if status == 200:
                return
            raise RuntimeError(f"POST {path} on port {port}: HTTP {status}")
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class LeanClient:
    """A keep-alive HTTP/1.1 client on a raw socket: the least a client can cost."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._heads: dict[tuple[str, str, str], bytes] = {}  # the constant part, built once

    def post(self, path: str, ctype: str, body: bytes, accept: str = "") -> bytes:
        prefix = self._heads.get((path, ctype, accept))
        if prefix is None:
            prefix = self._heads[(path, ctype, accept)] = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n"
                f"{'Accept: ' + accept + chr(13) + chr(10) if accept else ''}"
                "Content-Length: ").encode()
        self.sock.sendall(b"%s%d\r\n\r\n%s" % (prefix, len(body), body))
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self.sock.recv(65536)
        if not buf.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("lean client: " + buf[:end].decode("latin-1").splitlines()[0])
        # the agent spells the header so; another spelling takes the regex
        at = buf.find(b"\r\nContent-Length: ", 0, end) + 18
        if at < 18:
            match = re.search(rb"(?im)^content-length:\s*(\d+)", buf[:end])
            assert match is not None, buf[:end]
            at = match.start(1)
        total = end + 4 + int(buf[at:buf.find(b"\r\n", at)])
        while len(buf) < total:
            buf += self.sock.recv(65536)
        self.buf = buf[total:]
        return buf[end + 4:total]

    def close(self) -> None:
        self.sock.close()


def measure_latency(port: int, others: dict[str, int], model: Path, sample: Any, threads: int,
                    runs: int, rounds: int, *, lean_only: bool = False
                    ) -> dict[str, tuple[float, float]]:
    """Interleaved p50/p95 in ms per method (see (a) in the module docstring).

    ``others`` maps a label to the port of another agent process, measured with the lean
    client as "<method>, <label>"; ``lean_only`` leaves out ``AgentClient``.
    """
    import numpy as np
    import onnxruntime as ort

    from agent.serving import wire
    from agent.serving.client import AgentClient

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    feeds = {"input": sample}
    path = f"/v1/models/{MODEL_NAME}/predict"
    lean = LeanClient(port)
    agent = AgentClient("127.0.0.1", port)
    expected = session.run(None, feeds)

    def binary(client: LeanClient) -> Callable[[], Any]:
        def call() -> Any:
            body = client.post(path, wire.TENSORS_CONTENT_TYPE, wire.encode_tensors(feeds),
                               accept=wire.TENSORS_CONTENT_TYPE)
            return wire.decode_tensors(body).tensors
        return call

    def json_form(client: LeanClient) -> Callable[[], Any]:
        def call() -> Any:
            body = client.post(path, wire.JSON_CONTENT_TYPE, wire.encode_json_inputs(feeds))
            return wire.decode_json_prediction(body).outputs
        return call

    def json_stdlib(client: LeanClient) -> Callable[[], Any]:
        """What a user writes without orjson: json.dumps of lists, json.loads, np.asarray."""
        def call() -> Any:
            request = json.dumps({"inputs": {k: v.tolist() for k, v in feeds.items()}},
                                 separators=(",", ":")).encode()
            body = client.post(path, wire.JSON_CONTENT_TYPE, request)
            return {k: np.asarray(v) for k, v in json.loads(body)["outputs"].items()}
        return call

    methods: dict[str, Callable[[], Any]] = {
        "raw session.run (in process)": lambda: session.run(None, feeds),
        "predict, binary, lean client": binary(lean),
        "predict, JSON, lean client": json_form(lean),
        "predict, JSON, lean client with stdlib json": json_stdlib(lean),
    }
    if not lean_only:
        methods["predict, binary, AgentClient"] = lambda: agent.predict(MODEL_NAME, feeds,
                                                                        binary=True)
        methods["predict, JSON, AgentClient"] = lambda: agent.predict(MODEL_NAME, feeds,
                                                                      binary=False)
    clients = [lean]
    for label, other_port in others.items():
        other = LeanClient(other_port)
        clients.append(other)
        methods[f"predict, binary, lean client, {label}"] = binary(other)
        methods[f"predict, JSON, lean client, {label}"] = json_form(other)
    for name, fn in methods.items():
        if "lean" in name and not np.array_equal(fn()["probabilities"], expected[1]):
            raise RuntimeError(f"{name}: the agent's answer differs from onnxruntime's")
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for fn in methods.values():
        for _ in range(WARMUP):
            fn()
    per_round = max(1, runs // rounds)
    clock = time.perf_counter
    for r in range(rounds):
        order = list(methods.items())
        if r % 2:
            order.reverse()
        for name, fn in order:
            out = samples[name]
            for _ in range(per_round):
                t0 = clock()
                fn()
                out.append(clock() - t0)
    for client in clients:
        client.close()
    agent.close()
    return {name: (percentile(v, 50) * 1e3, percentile(v, 95) * 1e3)
            for name, v in samples.items()}


def proc_cpu_s(pid: int) -> float:
    """utime + stime of process ``pid`` (every thread), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, script: Path, duration: float, connections: int, pid: int | None = None
            ) -> tuple[float, int, str, float | None]:
    """requests/s, non-2xx count, latency line, and the server's CPU per request (seconds;
    ``None`` without ``pid``)."""
    url = f"http://127.0.0.1:{port}/v1/models/{MODEL_NAME}/predict"
    cpu0 = proc_cpu_s(pid) if pid is not None else 0.0
    proc = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration:g}s", "-s",
                           str(script), url], capture_output=True, text=True, check=True)
    cpu = proc_cpu_s(pid) - cpu0 if pid is not None else None
    rps = re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", proc.stdout)
    errors = re.search(r"Socket errors:.*", proc.stdout)
    lat = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", proc.stdout)
    if rps is None:
        raise RuntimeError(f"cannot read wrk's output:\n{proc.stdout}\n{proc.stderr}")
    detail = f"avg {lat.group(1)}" if lat else ""
    if errors:
        detail += f"; {errors.group(0)}"
    done = re.search(r"(\d+) requests in", proc.stdout)
    per_request = cpu / int(done.group(1)) if cpu is not None and done and int(done.group(1)) \
        else None
    return float(rps.group(1)), int(bad.group(1)) if bad else 0, detail, per_request


def wrk_script(out: Path, name: str, body: bytes, ctype: str, accept: str = "") -> Path:
    body_file = out / f"{name}.body"
    body_file.write_bytes(body)
    script = out / f"{name}.lua"
    accept_line = f'wrk.headers["Accept"] = "{accept}"\n' if accept else ""
    script.write_text(f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "{ctype}"\n'
                      f"{accept_line}"
                      f'local f = assert(io.open("{body_file}", "rb"))\n'
                      "wrk.body = f:read(\"*a\")\nf:close()\n")
    return script


#: the FastAPI peer's stacks: (uvicorn --http, --loop), as ``pip install uvicorn`` and as
#: ``uvicorn[standard]`` (``fastapi[standard]``) run it
PEER_STACKS = (("h11", "asyncio"), ("httptools", "uvloop"))
#: the info peer: the faster stack with orjson both ways (``EDGEFLEET_PEER_ORJSON=1``)
ORJSON_PEER_STACK = ("httptools", "uvloop")


def stack_available(http: str, loop: str) -> bool:
    """Whether uvicorn can run with these options here (their modules import)."""
    modules = [m for m in (http, loop) if m != "asyncio"]
    return all(importlib.util.find_spec(m) is not None for m in modules)


# --- reporting ----------------------------------------------------------------------------------


def latency_rows(rows: list[list[str]], lat: dict[str, tuple[float, float]], label: str, *,
                 judged: bool) -> None:
    """Table rows for one latency run; the plain run's lean rows carry the verdict."""
    lat = dict(lat)
    raw50, raw95 = lat.pop("raw session.run (in process)")
    rows.append([f"(a) latency ({label}): raw session.run, in process",
                 f"p50 {raw50:.3f} ms, p95 {raw95:.3f} ms", "baseline", "", ""])
    for name, (p50, p95) in lat.items():
        goal = judged and name.endswith("lean client")
        rows.append([f"(a) latency ({label}): {name}", f"p50 {p50:.3f} ms, p95 {p95:.3f} ms",
                     f"overhead p50 +{p50 - raw50:.3f} ms, p95 +{p95 - raw95:.3f} ms",
                     f"<= +{GOAL_OVERHEAD_MS} ms" if goal else "(info)",
                     verdict(p50 - raw50 <= GOAL_OVERHEAD_MS) if goal else ""])


def render(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def machine_info() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    info = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpu": cpu,
            "cores": f"{os.cpu_count()} logical, {len(os.sched_getaffinity(0))} usable",
            "python": platform.python_version(),
            "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    for dist in ("onnxruntime", "numpy", "fastapi", "uvicorn", "uvloop", "httptools", "orjson"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = "not installed"
    return info


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--markdown", action="store_true", help="print Markdown tables")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="scratch dir (bench/out)")
    p.add_argument("--runs", type=int, default=4000, help="timed calls per latency method")
    p.add_argument("--rounds", type=int, default=20, help="interleaved latency blocks")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--workers", type=int, default=2, help="agent inference threads")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--connections", type=int, default=8, help="wrk connections")
    p.add_argument("--wrk-rounds", type=int, default=2, help="agent/peer wrk alternations")
    p.add_argument("--skip-wrk", action="store_true", help="skip (b)")
    p.add_argument("--no-pool-peer", action="store_true",
                   help="skip the pool-only agent in (a)")
    p.add_argument("--no-fallback-agent", action="store_true",
                   help="skip the agent on asyncio's loop (info rows in (a) and (b))")
    p.add_argument("--keep-awake", action="store_true",
                   help="also measure (a) with a SCHED_IDLE spinner per core (info)")
    p.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                   help="the main agent's event loop (auto: the daemon's choice)")
    p.add_argument("--json", choices=("auto", "stdlib"), default="auto",
                   help="the agents' JSON codec: auto (orjson when installed, as the daemon "
                   "does) or stdlib (EDGEFLEET_JSON=stdlib)")
    p.add_argument("--inline-max-us", type=float, default=None,
                   help="the agent's inline limit in us (default: ModelHost's); 0: pool only")
    p.add_argument("--serve-agent", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.rounds < 1 or args.threads < 1 or args.duration <= 0:
        p.error("--runs, --rounds, --threads must be >= 1 and --duration > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from importlib.metadata import version

    args = parse_args(argv)
    if args.serve_agent is not None:
        from agent.serving.host import INLINE_MAX_S

        limit = INLINE_MAX_S if args.inline_max_us is None else args.inline_max_us / 1e6
        return serve_agent(args.serve_agent, args.port_file, args.threads, args.workers, limit,
                           args.loop)
    import numpy as np

    from agent.serving import wire
    from agent.serving.eventloop import loop_factory
    from model_tools.examples import train_digits_mlp

    md: bool = args.markdown
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="serving-", dir=out))
    log(f"training the digits MLP into {out / 'models'}")
    example = train_digits_mlp(out / "models")
    model = example.onnx_path
    sample = np.asarray(np.load(example.eval_path)[example.input_name][:1], dtype=np.float32)
    np.save(scratch / "sample.npy", sample)
    json_body = wire.encode_json_inputs({"input": sample})
    path = f"/v1/models/{MODEL_NAME}/predict"
    info = machine_info()
    rows: list[list[str]] = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        def start_agent(name: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
            log(f"starting the agent's server ({name})")
            port_file = scratch / f"{name}.port"
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve-agent", str(model), "--port-file",
                 str(port_file), "--threads", str(args.threads), "--workers",
                 str(args.workers), *extra], cwd=ROOT,
                env=dict(os.environ, EDGEFLEET_JSON=args.json))
            procs.append(proc)
            proc_port = wait_port(port_file, proc)
            wait_http(proc_port, path, json_body)
            return proc, proc_port

        inline = [] if args.inline_max_us is None else ["--inline-max-us",
                                                        str(args.inline_max_us)]
        agent, port = start_agent("agent", [*inline, "--loop", args.loop])
        loop_name = loop_factory(args.loop)[0]
        json_label = ", stdlib json" if args.json == "stdlib" else ""
        others: dict[str, int] = {}
        pool_agent = fallback_agent = None
        if not args.no_pool_peer:
            pool_agent, others["pool only"] = start_agent(
                "pool-only agent", ["--inline-max-us", "0", "--loop", args.loop])
        if not args.no_fallback_agent and loop_name != "asyncio":
            fallback_agent, others["asyncio loop"] = start_agent(
                "agent on asyncio's loop", [*inline, "--loop", "asyncio"])

        # (a) latency
        log(f"(a) latency: {args.runs} calls per method in {args.rounds} interleaved rounds")
        lat = measure_latency(port, others, model, sample, args.threads, args.runs,
                              args.rounds)
        if pool_agent is not None:  # its RSS would count against the machine, not the agent
            pool_agent.terminate()
            pool_agent.wait(10)
        latency_rows(rows, lat, f"agent on {loop_name}", judged=True)
        if args.keep_awake:
            log("(a) latency again, a SCHED_IDLE spinner per core keeping the cores awake")
            spinners = keep_awake()
            procs.extend(spinners)
            try:
                awake = measure_latency(port, {}, model, sample, args.threads, args.runs,
                                        args.rounds, lean_only=True)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait(10)
            latency_rows(rows, awake, "cores kept awake", judged=False)

        # (c) memory, before wrk so the agent's RSS is not inflated by 8 connections' buffers
        log("(c) memory: bare python + onnxruntime holding the same model")
        bare = subprocess.Popen(
            [sys.executable, "-c", BARE_SESSION.format(threads=args.threads, model=str(model),
                                                        sample=str(scratch / "sample.npy"),
                                                        warmup=WARMUP)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        procs.append(bare)
        assert bare.stdout is not None
        if bare.stdout.readline().strip() != b"ready":
            raise RuntimeError("the bare onnxruntime process did not start")
        agent_rss, bare_rss = rss_mb(agent.pid), rss_mb(bare.pid)
        rows.append(["(c) RSS, model loaded, after warm-up",
                     f"agent {agent_rss:.1f} MB, bare python+onnxruntime {bare_rss:.1f} MB",
                     f"+{agent_rss - bare_rss:.1f} MB", f"<= +{GOAL_RSS_DELTA_MB:g} MB",
                     verdict(agent_rss - bare_rss <= GOAL_RSS_DELTA_MB)])

        # (b) throughput
        if args.skip_wrk:
            rows.append(["(b) throughput", "skipped (--skip-wrk)", "", "", ""])
        elif shutil.which("wrk") is None:
            log("(b) throughput: wrk is not installed (apt-get install -y wrk); skipped")
            rows.append(["(b) throughput", "skipped: wrk not installed", "", "", ""])
        else:
            env = dict(os.environ, EDGEFLEET_PEER_MODEL=str(model),
                       EDGEFLEET_PEER_THREADS=str(args.threads))
            json_script = wrk_script(scratch, "json", json_body, wire.JSON_CONTENT_TYPE)
            bin_script = wrk_script(scratch, "binary", wire.encode_tensors({"input": sample}),
                                    wire.TENSORS_CONTENT_TYPE, wire.TENSORS_CONTENT_TYPE)
            targets: dict[str, tuple[int, Path, int]] = {
                f"agent JSON ({loop_name}{json_label})": (port, json_script, agent.pid),
                f"agent binary ({loop_name})": (port, bin_script, agent.pid)}
            if fallback_agent is not None:
                targets[f"agent JSON (asyncio{json_label})"] = (
                    others["asyncio loop"], json_script, fallback_agent.pid)
            peer_rss: dict[str, float] = {}
            peer_stacks = [(http, loop, False) for http, loop in PEER_STACKS]
            if importlib.util.find_spec("orjson") is not None:
                peer_stacks.append((*ORJSON_PEER_STACK, True))
            for http, loop, fast_json in peer_stacks:
                stack = (f"uvicorn {version('uvicorn')}, {http} + {loop}"
                         + (f", ORJSONResponse + orjson.loads, orjson {version('orjson')}"
                            if fast_json else ""))
                if not stack_available(http, loop):
                    log(f"(b) throughput: peer on {http} + {loop} skipped: not installed")
                    rows.append([f"(b) throughput: peer JSON ({stack})",
                                 f"skipped: {http} or {loop} not installed", "", "", ""])
                    continue
                peer_port = free_port()
                log(f"(b) throughput: starting the FastAPI peer ({stack})")
                peer = subprocess.Popen(
                    [sys.executable, "-m", "uvicorn", "fastapi_peer:app", "--app-dir",
                     str(PEER_DIR), "--host", "127.0.0.1", "--port", str(peer_port),
                     "--workers", "1", "--no-access-log", "--log-level", "warning",
                     "--http", http, "--loop", loop],
                    env=dict(env, EDGEFLEET_PEER_ORJSON="1" if fast_json else "0"))
                procs.append(peer)
                wait_http(peer_port, path, json_body)
                name = f"peer JSON ({stack})"
                targets[name] = (peer_port, json_script, peer.pid)
                peer_rss[name] = rss_mb(peer.pid)
            results: dict[str, list[tuple[float, int, str, float | None]]] = {
                name: [] for name in targets}
            for r in range(args.wrk_rounds):
                names = list(targets) if r % 2 == 0 else list(reversed(targets))
                for name in names:
                    p, script, pid = targets[name]
                    log(f"  round {r + 1}: {name} (warm-up 2 s, then {args.duration:g} s)")
                    run_wrk(p, script, 2.0, args.connections)
                    results[name].append(run_wrk(p, script, args.duration, args.connections,
                                                 pid))

            def mean_rps(name: str) -> float:
                return sum(x[0] for x in results[name]) / len(results[name])

            # the verdict is against the peers users write by hand (stdlib json in FastAPI)
            best_peer = max((n for n in targets if n.startswith("peer") and "orjson" not in n),
                            key=mean_rps)
            peer_rps = mean_rps(best_peer)
            for name in targets:
                rps = mean_rps(name)
                bad = sum(x[1] for x in results[name])
                detail = "; ".join(x[2] for x in results[name])
                cpus = [x[3] for x in results[name] if x[3] is not None]
                cpu = (f"; server CPU {sum(cpus) / len(cpus) * 1e6:.0f} us/request"
                       if cpus else "")
                judged = name == f"agent JSON ({loop_name}{json_label})"
                rows.append([f"(b) throughput, wrk -t2 -c{args.connections}: {name}",
                             f"{rps:,.0f} req/s (non-2xx {bad}; {detail}{cpu})",
                             f"{rps / peer_rps:.2f}x the fastest peer"
                             + (" (not orjson's)" if "orjson" in name else ""),
                             f">= {GOAL_THROUGHPUT_RATIO}x" if judged else "(info)",
                             verdict(rps / peer_rps >= GOAL_THROUGHPUT_RATIO) if judged else ""])
            for name, mb in peer_rss.items():
                rows.append([f"(c) RSS of the {name.replace(' JSON', '')} after start (info)",
                             f"{mb:.1f} MB", f"{mb - bare_rss:+.1f} MB vs bare", "", ""])
            if fallback_agent is not None:
                rows.append(["(c) RSS of the asyncio-loop agent after wrk (info)",
                             f"{rss_mb(fallback_agent.pid):.1f} MB",
                             f"{rss_mb(fallback_agent.pid) - bare_rss:+.1f} MB vs bare", "", ""])
            agent_after = rss_mb(agent.pid)
            rows.append(["(c) RSS of the agent after wrk (info)", f"{agent_after:.1f} MB",
                         f"{agent_after - bare_rss:+.1f} MB vs bare", "", ""])
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(scratch, ignore_errors=True)

    heading = "### " if md else "== "
    print(f"{heading}Machine\n")
    print("\n".join(f"- {k}: {v}" for k, v in info.items()))
    print(f"- model: {MODEL_NAME} (input float32 [1, 64]); onnxruntime intra-op threads "
          f"{args.threads}; agent inference threads {args.workers}")
    print(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n{heading}Serving\n")
    print(render(["measure", "result", "vs baseline", "goal", "verdict"], rows, md))
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())

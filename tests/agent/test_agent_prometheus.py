"""``GET /metrics`` on a running Agent: the numbers are what was done, scraped over HTTP.

Real parts: the Agent built from a provisioning file written by the server library and run on
its own event loop thread, its HTTP server on an ephemeral port, a real onnxruntime model, the
outbox's SQLite file read back with a second sqlite3 connection, and prometheus-client's own
parser on the scraped text. The first tests run without a broker (the provisioning points at a
port nobody listens on); the last runs the fleet server with its embedded broker, so the link
comes up and the server's acks drain the outbox. The agent's clock is injected and frozen, so
"seconds since the last ack" is exact.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
import uvicorn
from onnx import TensorProto, helper, numpy_helper
from polling import free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from agent.config import load_config
from agent.daemon.app import Agent
from agent.errors import InputRejected
from agent.metrics import METRICS_KIND, RequestMetrics
from agent.serving.client import AgentClient
from agent.serving.host import UnknownModel
from agent.serving.prom import AgentMetrics, AgentState
from agent.serving.runtime import OnnxRuntime
from fleet_server.auth import Principal
from fleet_server.db import atomic
from fleet_server.fleet import init_data_dir, open_fleet
from fleet_server.registry import devices
from fleet_server.settings import Settings

X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]], dtype=np.float32)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FrozenClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """x float32 [N, 4] -> MatMul -> Softmax: probs float32 [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(
            np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = tmp_path_factory.mktemp("prom") / "tiny.onnx"
    onnx.save(model, str(path))
    return path


def write_agent_config(directory: Path, provisioning: bytes, extra: str = "") -> Path:
    directory.mkdir(parents=True)
    prov = directory / "provisioning.json"
    prov.write_bytes(provisioning)
    prov.chmod(0o600)
    cfg = directory / "agent.toml"
    cfg.write_text('provisioning = "provisioning.json"\ndata_dir = "data"\nhttp_port = 0\n'
                   + extra)
    return cfg


@contextmanager
def running(agent: Agent) -> Iterator[asyncio.AbstractEventLoop]:
    """``agent.run`` on its own loop thread until the block ends."""
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        agent.run(stop, ready=lambda _a: ready.set())), daemon=True)
    thread.start()
    try:
        assert ready.wait(30), "agent did not start"
        yield loop
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


def on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """Run ``fn`` on the agent's loop thread (where the daemon calls it) and wait."""
    async def call() -> None:
        fn()

    asyncio.run_coroutine_threadsafe(call(), loop).result(10)


def scrape(port: int, accept: str = "") -> tuple[str, Samples]:
    """GET /metrics: its content type and every sample as {(name, labels): value}."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Accept": accept} if accept else {})
        response = conn.getresponse()
        text = response.read().decode()
        assert response.status == 200, text
        ctype = response.getheader("Content-Type") or ""
    finally:
        conn.close()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return ctype, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def named(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def sqlite_rows(agent: Agent) -> dict[str, int]:
    """Rows per stream, read from the outbox file with a connection of our own."""
    conn = sqlite3.connect(f"file:{agent.config.data_dir / 'outbox.db'}?mode=ro", uri=True)
    try:
        rows = dict(conn.execute("SELECT stream, count(*) FROM outbox_records GROUP BY stream"))
        evicted = dict(conn.execute("SELECT priority, total FROM outbox_evicted"))
    finally:
        conn.close()
    return {**{s: rows.get(s, 0) for s in ("telemetry", "drift")},
            **{f"evicted:{p}": n for p, n in evicted.items()}}


# --- no broker ----------------------------------------------------------------------------------


@pytest.fixture
def offline_agent(tmp_path: Path) -> Agent:
    """pi-7, provisioned for a broker port nobody listens on; a 25-row outbox."""
    settings = Settings(data_dir=tmp_path / "server", mqtt_port=free_port())
    now = time.time()
    init_data_dir(settings, clock=lambda: now)
    fleet = open_fleet(settings, clock=lambda: now)
    with atomic(fleet.engine) as conn:
        out = devices.provision(fleet, conn, device_id="pi-7", profile="rpi4", tags=[],
                                actor=Principal("t", "test", "admin"))
    cfg = write_agent_config(tmp_path / "dev", out.provisioning.to_bytes(),
                             "metrics_interval_s = 3600\noutbox_max_rows = 25\n")
    return Agent(load_config(cfg), clock=FrozenClock(now))


def test_request_counters_and_latency_histogram_match_the_requests_made(
        offline_agent: Agent, model_file: Path) -> None:
    agent = offline_agent
    with running(agent):
        agent.host.swap("tiny", "1", OnnxRuntime().load(model_file, threads=1))
        with AgentClient("127.0.0.1", agent.server.port) as client:
            for i in range(7):
                assert client.predict("tiny", {"x": X}, binary=i % 2 == 0).version == "1"
            for _ in range(2):
                with pytest.raises(InputRejected):
                    client.predict("tiny", {"x": X.astype(np.float64)})
            with pytest.raises(UnknownModel):
                client.predict("nope", {"x": X})
        ctype, samples = scrape(agent.server.port)
        inline = agent.host.runs_inline("tiny")

    assert ctype.startswith("text/plain; version=0.0.4")
    assert named(samples, "edgefleet_agent_requests_total") == {
        frozenset({"model": "tiny", "version": "1", "outcome": outcome}.items()): n
        for outcome, n in (("ok", 7), ("bad_request", 2), ("runtime_error", 0),
                           ("internal", 0))}
    assert value(samples, "edgefleet_agent_request_duration_seconds_count", model="tiny") == 7
    assert value(samples, "edgefleet_agent_request_duration_seconds_bucket", model="tiny",
                 le="+Inf") == 7
    assert 0 < (value(samples, "edgefleet_agent_request_duration_seconds_sum",
                      model="tiny") or 0) < 7 * 10.0
    assert value(samples, "edgefleet_agent_model_info", model="tiny", version="1") == 1
    assert value(samples, "edgefleet_agent_model_inline", model="tiny") == float(inline)
    assert value(samples, "edgefleet_agent_broker_connected") == 0
    assert named(samples, "edgefleet_agent_last_ack_timestamp_seconds") == {}
    (info_labels,) = named(samples, "edgefleet_agent_info")
    assert dict(info_labels)["device_id"] == "pi-7" and dict(info_labels)["profile"] == "rpi4"


def test_outbox_depth_and_evictions_match_the_sqlite_file(offline_agent: Agent,
                                                          model_file: Path) -> None:
    agent = offline_agent
    with running(agent) as loop:
        agent.host.swap("tiny", "1", OnnxRuntime().load(model_file, threads=1))
        with AgentClient("127.0.0.1", agent.server.port) as client:
            for _ in range(3):
                client.predict("tiny", {"x": X})
            with pytest.raises(InputRejected):
                client.predict("tiny", {"x": X[:, :3]})
        on_loop(loop, agent.tick)  # the interval's metrics become one outbox row
        _, first = scrape(agent.server.port)
        first_rows = sqlite_rows(agent)
        for i in range(40):  # past the 25-row cap: the oldest metrics rows are evicted
            agent.outbox.append("telemetry", "test.filler", {"i": i}, at=agent.clock(),
                                priority="metrics")
        _, second = scrape(agent.server.port)
        second_rows = sqlite_rows(agent)

    assert first_rows["telemetry"] >= 1  # the metrics row (and any start-up event)
    for samples, rows in ((first, first_rows), (second, second_rows)):
        for stream in ("telemetry", "drift"):
            assert value(samples, "edgefleet_agent_outbox_rows", stream=stream) == rows[stream]
        for priority in ("metrics", "summary", "event"):
            assert value(samples, "edgefleet_agent_outbox_evicted_rows_total",
                         priority=priority) == rows[f"evicted:{priority}"]
    assert value(second, "edgefleet_agent_outbox_max_rows") == 25
    assert second_rows["evicted:metrics"] > 0 and second_rows["telemetry"] <= 25


def test_the_failed_requests_reach_the_interval_metrics_as_4xx(offline_agent: Agent,
                                                               model_file: Path) -> None:
    """The host's error kinds are mapped onto agent.metrics' buckets (they used to be refused
    by RequestMetrics.observe, so refused requests were never counted in telemetry)."""
    agent = offline_agent
    with running(agent) as loop:
        agent.host.swap("tiny", "1", OnnxRuntime().load(model_file, threads=1))
        with AgentClient("127.0.0.1", agent.server.port) as client:
            client.predict("tiny", {"x": X})
            for _ in range(2):
                with pytest.raises(InputRejected):
                    client.predict("tiny", {"y": X})
        on_loop(loop, agent.tick)
        conn = sqlite3.connect(f"file:{agent.config.data_dir / 'outbox.db'}?mode=ro", uri=True)
        try:
            (body,) = [json.loads(b) for (b,) in conn.execute(
                "SELECT body FROM outbox_records WHERE kind = ?", (METRICS_KIND,))]
        finally:
            conn.close()
    assert (body["count"], body["ok"]) == (3, 1)
    assert body["errors"] == {"4xx": 2, "5xx": 0, "runtime": 0}


def test_openmetrics_is_served_when_asked_for(offline_agent: Agent) -> None:
    with running(offline_agent):
        ctype, samples = scrape(offline_agent.server.port,
                                accept="application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert value(samples, "edgefleet_agent_broker_connected") == 0


def test_two_agents_in_one_process_keep_separate_registries() -> None:
    def state() -> AgentState:
        return AgentState(now=0.0, models=(), connected=False)

    requests = [RequestMetrics(start=0.0), RequestMetrics(start=0.0)]
    one, two = (AgentMetrics(state, r, info={"device_id": d}) for r, d in zip(
        requests, "ab", strict=True))
    requests[0].observe("m", "1", 2.0, True)
    requests[0].observe("m", "1", 2.0, False, "runtime")
    requests[1].observe("m", "2", 0.7, True)
    requests[1].flush(10.0)  # flushed intervals stay in the running totals
    texts = [m.render()[1].decode() for m in (one, two)]
    assert 'edgefleet_agent_requests_total{model="m",outcome="ok",version="1"} 1.0' in texts[0]
    assert ('edgefleet_agent_requests_total{model="m",outcome="runtime_error",version="1"} 1.0'
            in texts[0])
    assert 'version="2"' not in texts[0] and 'version="1"' not in texts[1]
    assert 'edgefleet_agent_info{device_id="b"} 1.0' in texts[1]
    assert 'edgefleet_agent_request_duration_seconds_bucket{le="0.001",model="m"} 1.0' \
        in texts[1]
    assert 'edgefleet_agent_request_duration_seconds_bucket{le="0.0005",model="m"} 0.0' \
        in texts[1]


# --- with the fleet server and its embedded broker ------------------------------------------------


@pytest.mark.slow
@pytest.mark.integration
def test_connected_gauge_last_ack_and_a_drained_outbox_with_a_real_server(
        tmp_path: Path, model_file: Path) -> None:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "server", port=port, mqtt_port=0)
    token = init_data_dir(settings)
    from fleet_server.api.app import create_app
    from fleet_server.runtime import attach_mqtt

    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for("uvicorn to start", lambda: server.started, 20)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {token}"}) as api:
            r = api.post("/v1/devices", json={"id": "pi-1", "profile": "rpi4", "tags": []})
            assert r.status_code == 201, r.text
        cfg = write_agent_config(tmp_path / "dev", json.dumps(
            r.json()["provisioning"]).encode(), "metrics_interval_s = 0.2\n"
            "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n")
        clock = FrozenClock(time.time())
        agent = Agent(load_config(cfg), clock=clock)
        with running(agent):
            http_port = agent.server.port
            wait_for("the link", lambda: value(scrape(http_port)[1],
                                               "edgefleet_agent_broker_connected") == 1)
            agent.host.swap("tiny", "1", OnnxRuntime().load(model_file, threads=1))
            with AgentClient("127.0.0.1", http_port) as client:
                for _ in range(3):
                    client.predict("tiny", {"x": X})
            wait_for("an ack", lambda: value(scrape(http_port)[1],
                                             "edgefleet_agent_last_ack_timestamp_seconds",
                                             stream="telemetry") is not None)
            wait_for("the outbox drained by the server's acks",
                     lambda: sqlite_rows(agent)["telemetry"] == 0)
            _, acked = scrape(http_port)
            clock.now += 42.5
            _, later = scrape(http_port)
    finally:
        server.should_exit = True
        thread.join(20)

    start = clock.now - 42.5
    assert value(acked, "edgefleet_agent_last_ack_timestamp_seconds", stream="telemetry") == start
    assert value(acked, "edgefleet_agent_seconds_since_last_ack", stream="telemetry") == 0
    assert value(later, "edgefleet_agent_seconds_since_last_ack", stream="telemetry") == 42.5
    assert value(acked, "edgefleet_agent_last_ack_timestamp_seconds", stream="drift") is None
    assert value(acked, "edgefleet_agent_outbox_rows", stream="telemetry") == 0
    assert value(acked, "edgefleet_agent_requests_total", model="tiny", version="1",
                 outcome="ok") == 3


def test_running_totals_are_the_sum_of_every_interval_flushed_and_running() -> None:
    metrics = RequestMetrics(start=0.0, edges_ms=(1.0, 5.0))
    bodies = []
    for interval, latencies in enumerate(([0.5, 3.0], [7.0], [0.9, 0.9, 2.0])):
        for ms in latencies:
            metrics.observe("m", "1", ms, True)
        metrics.observe("m", "1", 1.0, False, "4xx")
        if interval < 2:  # the last interval is still running when totals() is read
            bodies += metrics.flush(10.0 * (interval + 1))
    (total,) = metrics.totals()
    assert (total.model, total.version, total.count, total.ok) == ("m", "1", 9, 6)
    assert total.errors == {"4xx": 3, "5xx": 0, "runtime": 0}
    assert total.latency_counts == (3, 2, 1)  # (0, 1], (1, 5], (5, inf)
    assert total.latency_sum_ms == pytest.approx(0.5 + 3.0 + 7.0 + 0.9 + 0.9 + 2.0)
    assert sum(b["count"] for b in bodies) == 5  # the bodies themselves are unchanged

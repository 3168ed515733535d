"""The local inference API against a real server on 127.0.0.1 and a real small ONNX model.

One real-service test module for the HTTP adapter (STYLE 17): a MatMul -> Softmax/ArgMax model
built with onnx.helper, loaded by the real onnxruntime adapter, served on an ephemeral port on
both event loops (asyncio's and uvloop), called over real sockets (the package's client,
http.client and raw sockets for what clients normally refuse to send). Fakes stand in for the
engine only where a real one cannot fail on demand (the 500 case).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import InputRejected, RuntimeLoadError
from agent.protocol.manifest import TensorSpec
from agent.serving import wire
from agent.serving.client import AgentClient
from agent.serving.eventloop import loop_factory
from agent.serving.host import WINDOW, ModelHost, UnknownModel
from agent.serving.runtime import LoadedModel, OnnxRuntime
from agent.serving.server import InferenceServer

MAX_BODY = 4096
X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0], [0, 0, 0, 0]], dtype=np.float32)
W1 = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def build_model(path: Path, weights: np.ndarray) -> Path:
    """x float32 [N, 4] -> MatMul W -> probs = Softmax [N, 3], label = ArgMax int64 [N]."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3]),
         helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def direct(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """onnxruntime's own answer, no agent code involved."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(["probs", "label"], session.run(["probs", "label"], {"x": x}), strict=True))


class ServerThread:
    """An event loop in a thread running :class:`InferenceServer`; sync tests call it.

    ``loop_kind`` is :func:`agent.serving.eventloop.loop_factory`'s: asyncio's own loop by
    default, ``uvloop`` for the loop the daemon runs on when it is installed.
    """

    def __init__(self, host: ModelHost, loop_kind: str = "asyncio", **kwargs: Any) -> None:
        self.loop = loop_factory(loop_kind)[1]()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = InferenceServer(host, bind_host=kwargs.pop("bind_host", "127.0.0.1"),
                                      port=0, **kwargs)

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def __enter__(self) -> Self:
        self.thread.start()
        self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class RaisingModel:
    """A LoadedModel whose engine always fails (for the 500 path)."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (None, 4)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (None, 3)),)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeLoadError("onnxruntime failed: injected engine fault")

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def model_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("serving") / "v1.onnx", W1)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def served(model_v1: Path, request: pytest.FixtureRequest
           ) -> Iterator[tuple[ServerThread, list[tuple[Any, ...]]]]:
    """A host serving ``tiny`` v1 and ``broken``, an observer log, and the running server:
    every test that takes it runs on both event loops the daemon may run on."""
    seen: list[tuple[Any, ...]] = []
    host = ModelHost(on_request=lambda *a: seen.append(a))
    host.swap("tiny", "1", OnnxRuntime().load(model_v1, threads=1))
    loaded: LoadedModel = RaisingModel()
    host.swap("broken", "7", loaded)
    with ServerThread(host, request.param, max_body_bytes=MAX_BODY) as st:
        yield st, seen
    host.close()


@pytest.fixture
def port(served: tuple[ServerThread, list[tuple[Any, ...]]]) -> int:
    return served[0].server.port


@pytest.fixture(params=["orjson", "stdlib"])
def json_codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The JSON form with orjson (when installed) and with the standard library's json: the
    server and the client answer the same either way (tests/agent/test_serving_json.py)."""
    if request.param == "orjson":
        monkeypatch.setattr(wire, "_orjson", pytest.importorskip("orjson"))
    else:
        monkeypatch.setattr(wire, "_orjson", None)
    return str(request.param)


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: Mapping[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def raw_exchange(port: int, data: bytes, *, shut: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or 2 s of silence)."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


# --- happy paths ------------------------------------------------------------------------------


def test_healthz_and_models(port: int) -> None:
    with AgentClient("127.0.0.1", port) as client:
        assert client.health() == {"status": "ok", "models": 2}
        models = {m["name"]: m for m in client.models()}
    assert models["tiny"] == {
        "name": "tiny", "version": "1",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
        "outputs": [{"name": "probs", "dtype": "float32", "shape": [None, 3]},
                    {"name": "label", "dtype": "int64", "shape": [None]}]}
    assert models["broken"]["version"] == "7"


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_predict_round_trip_equals_onnxruntime(port: int, model_v1: Path, binary: bool,
                                               json_codec: str) -> None:
    want = direct(model_v1, X)
    with AgentClient("127.0.0.1", port) as client:
        got = client.predict("tiny", {"x": X}, binary=binary)
    assert (got.model, got.version) == ("tiny", "1")
    assert set(got.outputs) == {"probs", "label"}
    # JSON carries float32 values as exact decimals: cast back, they are bit-identical
    np.testing.assert_array_equal(got.outputs["probs"].astype(np.float32), want["probs"])
    np.testing.assert_array_equal(got.outputs["label"], want["label"])
    if binary:
        assert got.outputs["probs"].dtype == np.float32
        assert got.outputs["label"].dtype == np.int64


def test_json_lists_are_cast_to_the_input_dtype(port: int, model_v1: Path) -> None:
    body = json.dumps({"inputs": {"x": [[1, 2, 3, 4]]}}).encode()  # ints for a float32 input
    status, headers, data = request(port, "POST", "/v1/models/tiny/predict", body,
                                    {"Content-Type": "application/json"})
    assert status == 200, data
    assert headers["content-type"] == "application/json"
    doc = json.loads(data)
    want = direct(model_v1, np.array([[1, 2, 3, 4]], dtype=np.float32))
    np.testing.assert_array_equal(np.asarray(doc["outputs"]["probs"], np.float32),
                                  want["probs"])


def test_binary_request_answers_json_without_accept(port: int) -> None:
    status, headers, data = request(port, "POST", "/v1/models/tiny/predict",
                                    wire.encode_tensors({"x": X}),
                                    {"Content-Type": wire.TENSORS_CONTENT_TYPE})
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(data)["version"] == "1"


def test_keep_alive_and_pipelining(port: int) -> None:
    """Three requests written at once on one connection are answered in order on it."""
    body = json.dumps({"inputs": {"x": X[:1].tolist()}}).encode()
    predict = (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    health = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    data = raw_exchange(port, predict + health + predict)
    assert data.count(b"HTTP/1.1 200 OK") == 3
    first, second = data.index(b'"outputs"'), data.index(b'"status"')
    assert first < second < data.rindex(b'"outputs"')


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_big_bodies_from_concurrent_clients_each_get_their_own_answer(model_v1: Path,
                                                                      loop_kind: str) -> None:
    """Bodies many times the server's receive buffer (shared by every connection), from 4
    clients at once: each arrives in many reads interleaved with the others' reads, and each
    answer is onnxruntime's answer for that client's own input."""
    host = ModelHost()
    host.swap("tiny", "1", OnnxRuntime().load(model_v1, threads=1))
    rng = np.random.default_rng(7)
    inputs = [rng.standard_normal((20_000, 4)).astype(np.float32) for _ in range(4)]  # 320 KB
    results: dict[int, list[np.ndarray]] = {}

    def client(i: int, port: int) -> None:
        with AgentClient("127.0.0.1", port) as c:
            results[i] = [c.predict("tiny", {"x": inputs[i]}, binary=binary).outputs["label"]
                          for binary in (True, False, True)]

    try:
        with ServerThread(host, loop_kind) as st:
            threads = [threading.Thread(target=client, args=(i, st.server.port))
                       for i in range(len(inputs))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        host.close()
    assert sorted(results) == [0, 1, 2, 3]
    for i, answers in results.items():
        want = direct(model_v1, inputs[i])["label"]
        for got in answers:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("inline_max_s", [0.0, 60.0], ids=["pool", "inline"])
def test_pipelined_predicts_answer_in_order_in_either_placement(model_v1: Path,
                                                                inline_max_s: float) -> None:
    """An inline model answers inside the parse loop: the next pipelined request still waits
    its turn, and every answer is the one for its own request."""
    host = ModelHost(inline_max_s=inline_max_s)
    host.swap("tiny", "1", OnnxRuntime().load(model_v1, threads=1))
    rows = [X[i:i + 1] for i in range(3)]
    want = [direct(model_v1, r)["label"].tolist() for r in rows]
    bodies = [json.dumps({"inputs": {"x": r.tolist()}}).encode() for r in rows]
    pipelined = b"".join(
        b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json"
        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b) for b in bodies)
    pipelined += b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" + pipelined
    try:
        with ServerThread(host) as st:
            with AgentClient("127.0.0.1", st.server.port) as client:
                for _ in range(WINDOW):  # one window of measured requests: placement decided
                    client.predict("tiny", {"x": X})
            assert host.runs_inline("tiny") == (inline_max_s > 0)
            data = raw_exchange(st.server.port, pipelined)
    finally:
        host.close()
    answers = [json.loads(part.partition(b"\r\n\r\n")[2])
               for part in data.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert len(answers) == 7
    labels = [a["outputs"]["label"] for a in answers if "outputs" in a]
    assert labels == want + want
    assert answers[3] == {"status": "ok", "models": 1}


def test_repeated_request_heads_are_each_answered_as_sent(port: int) -> None:
    """The server keeps the parse of request heads by their bytes: a repeated head answers
    like the first, a head differing in one header is its own (``Connection: close`` closes),
    and more distinct heads than it keeps are still all answered."""
    body = json.dumps({"inputs": {"x": X[:1].tolist()}}).encode()

    def head(extra: bytes) -> bytes:
        return (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\n" + extra
                + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(body), body))

    distinct = b"".join(head(b"X-Trace: %d\r\n" % i) for i in range(100))
    data = raw_exchange(port, head(b"") + distinct + head(b"") + head(b"Connection: close\r\n")
                        + head(b""))
    answers = data.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(answers) == 103  # the request after "Connection: close" is not read
    assert [b"Connection: close" in a for a in answers] == [False] * 102 + [True]
    labels = {json.loads(a.partition(b"\r\n\r\n")[2])["outputs"]["label"][0] for a in answers}
    assert labels == {int(np.argmax(X[0] @ W1))}


class WhereItRan:
    """Wraps a LoadedModel; records whether each run was on the event loop's thread."""

    def __init__(self, inner: LoadedModel) -> None:
        self.inner = inner
        self.inputs, self.outputs = inner.inputs, inner.outputs
        self.pooled: list[bool] = []

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.pooled.append(threading.current_thread().name.startswith("edgefleet-infer"))
        return self.inner.run(feeds)

    def close(self) -> None:
        self.inner.close()


def test_requests_one_at_a_time_run_inline_and_requests_together_use_the_pool(
        model_v1: Path) -> None:
    model = WhereItRan(OnnxRuntime().load(model_v1, threads=1))
    host = ModelHost(inline_max_s=60.0)  # any measured time is "fast": placement is the rule
    host.swap("tiny", "1", model)
    body = json.dumps({"inputs": {"x": X[:1].tolist()}}).encode()
    predict = (b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\nContent-Type: "
               b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        with (ServerThread(host) as st, AgentClient("127.0.0.1", st.server.port) as one,
              AgentClient("127.0.0.1", st.server.port) as two):
            for _ in range(WINDOW):
                one.predict("tiny", {"x": X})
            assert host.runs_inline("tiny")
            for _ in range(10):  # two clients, but never two requests at once
                one.predict("tiny", {"x": X})
                two.predict("tiny", {"x": X})
            by_turns = model.pooled[WINDOW:]
            answers = raw_exchange(st.server.port, predict * 3)  # three in one segment
            together = model.pooled[WINDOW + 20:]
    finally:
        host.close()
    assert by_turns == [False] * 20
    assert answers.count(b"HTTP/1.1 200 OK") == 3
    # the first is alone in its loop iteration; the second arrived with it: the pool
    assert together[:2] == [False, True], together


def test_expect_100_continue(port: int) -> None:
    body = json.dumps({"inputs": {"x": X[:1].tolist()}}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\nContent-Type: "
                     b"application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
                     % len(body))
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")


def test_observer_sees_every_request_that_reached_a_model(
        served: tuple[ServerThread, list[tuple[Any, ...]]]) -> None:
    st, seen = served
    seen.clear()
    with AgentClient("127.0.0.1", st.server.port) as client:
        client.predict("tiny", {"x": X})
        with pytest.raises(InputRejected):
            client.predict("tiny", {"x": X.astype(np.float64)})
        with pytest.raises(UnknownModel):
            client.predict("nope", {"x": X})
    assert len(seen) == 2  # the unknown model never reached one
    (name, version, latency_ms, ok, kind, inputs, outputs), bad = seen
    assert (name, version, ok, kind) == ("tiny", "1", True, None)
    assert latency_ms > 0
    np.testing.assert_array_equal(inputs["x"], X)
    assert set(outputs) == {"probs", "label"}
    assert bad[3:5] == (False, "input") and bad[6] is None


def test_a_failing_observer_never_fails_a_request(model_v1: Path) -> None:
    def observer(name: str, version: str, latency_ms: float, ok: bool, error_kind: str | None,
                 inputs: Mapping[str, np.ndarray] | None,
                 outputs: Mapping[str, np.ndarray] | None) -> None:
        raise ValueError("observer bug")

    host = ModelHost(on_request=observer)
    host.swap("tiny", "1", OnnxRuntime().load(model_v1, threads=1))
    try:
        with ServerThread(host) as st, AgentClient("127.0.0.1", st.server.port) as client:
            for _ in range(3):
                assert client.predict("tiny", {"x": X}).version == "1"
    finally:
        host.close()


class Scrapes:
    """A metrics renderer that records the Accept header and the thread it was called in."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail

    def __call__(self, accept: str) -> tuple[bytes, bytes]:
        self.calls.append((accept, threading.current_thread().name))
        if self.fail:
            raise RuntimeError("renderer bug")
        return b"text/plain; version=0.0.4; charset=utf-8", b"edgefleet_test 1.0\n"


def test_metrics_route_renders_off_the_loop_thread() -> None:
    scrapes = Scrapes()
    host = ModelHost(workers=1)
    try:
        with ServerThread(host, metrics=scrapes) as st:
            status, headers, data = request(st.server.port, "GET", "/metrics", None,
                                            {"Accept": "text/plain"})
            head = raw_exchange(st.server.port, b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n"
                                                b"Connection: close\r\n\r\n")
            wrong = request(st.server.port, "POST", "/metrics", b"", JSON_CT)
            loop_thread = st.thread.name
    finally:
        host.close()
    assert (status, data) == (200, b"edgefleet_test 1.0\n")
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
    assert wrong[0] == 405 and wrong[1]["allow"] == "GET, HEAD"
    assert scrapes.calls[0][0] == "text/plain"
    assert all(thread != loop_thread for _, thread in scrapes.calls)


def test_a_failing_metrics_renderer_is_a_500_and_the_connection_stays_usable() -> None:
    host = ModelHost(workers=1)
    try:
        with ServerThread(host, metrics=Scrapes(fail=True)) as st:
            conn = http.client.HTTPConnection("127.0.0.1", st.server.port, timeout=10)
            try:
                conn.request("GET", "/metrics")
                failed = conn.getresponse()
                doc = json.loads(failed.read())
                conn.request("GET", "/healthz")  # same connection
                health = conn.getresponse()
                assert (health.status, json.loads(health.read())) == (
                    200, {"status": "ok", "models": 0})
            finally:
                conn.close()
    finally:
        host.close()
    assert failed.status == 500
    assert doc == {"error": "internal", "detail": "RuntimeError: renderer bug"}


def test_without_a_renderer_there_is_no_metrics_route(port: int) -> None:
    status, _, data = request(port, "GET", "/metrics")
    assert status == 404
    assert json.loads(data)["detail"].endswith("routes: GET /healthz, GET /v1/models, POST "
                                               "/v1/models/{name}/predict")


def test_non_loopback_bind_warns_loudly(caplog: pytest.LogCaptureFixture) -> None:
    host = ModelHost(workers=1)
    try:
        with (caplog.at_level(logging.WARNING, logger="agent.serving.server"),
              ServerThread(host, bind_host="0.0.0.0")):
            pass
    finally:
        host.close()
    assert any("NOT ON LOOPBACK" in r.getMessage() and r.levelno == logging.WARNING
               for r in caplog.records)


def test_loopback_bind_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    host = ModelHost(workers=1)
    try:
        with caplog.at_level(logging.WARNING, logger="agent.serving.server"), ServerThread(host):
            pass
    finally:
        host.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_the_idle_sweeper_runs_only_while_a_connection_is_open(loop_kind: str) -> None:
    """No timer for an agent nobody calls; a kept-alive connection arms it, and closing the
    last idle one (after idle_timeout_s, plus at most one sweep interval) disarms it."""
    host = ModelHost(workers=1)

    async def armed(server: InferenceServer) -> bool:
        return server._sweeper is not None

    try:
        with ServerThread(host, loop_kind, idle_timeout_s=0.2) as st:
            before = st.call(armed(st.server))
            with socket.create_connection(("127.0.0.1", st.server.port), timeout=10) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
                answer = sock.recv(65536)
                while_open = st.call(armed(st.server))
                rest = sock.recv(65536)  # b"": the sweeper closed the idle connection
            after = st.call(armed(st.server))
    finally:
        host.close()
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in answer
    assert (before, while_open, rest, after) == (False, True, b"", False)


# --- errors -----------------------------------------------------------------------------------

JSON_CT = {"Content-Type": "application/json"}
BIN_CT = {"Content-Type": wire.TENSORS_CONTENT_TYPE}
PREDICT = "/v1/models/tiny/predict"


def _frame_with(header: dict[str, Any], payload: bytes) -> bytes:
    return json.dumps(header).encode() + b"\n" + payload


ERROR_CASES = [
    # id, method, path, body, headers, status, error kind, words the detail must contain
    ("unknown-model", "POST", "/v1/models/nope/predict",
     json.dumps({"inputs": {"x": [[0, 0, 0, 0]]}}).encode(), JSON_CT, 404, "unknown_model",
     ["'nope'", "'tiny'"]),
    ("unknown-route", "GET", "/v2/whatever", None, {}, 404, "not_found", ["/v2/whatever"]),
    ("wrong-input-name", "POST", PREDICT, json.dumps({"inputs": {"y": [[0, 0, 0, 0]]}}).encode(),
     JSON_CT, 400, "bad_request", ["'y'", "['x']"]),
    ("missing-input", "POST", PREDICT, json.dumps({"inputs": {}}).encode(), JSON_CT, 400,
     "bad_request", ["missing input 'x'"]),
    ("wrong-dtype-strings", "POST", PREDICT,
     json.dumps({"inputs": {"x": [["a", "b", "c", "d"]]}}).encode(), JSON_CT, 400,
     "bad_request", ["'x'", "float32", "strings"]),
    ("wrong-dtype-binary", "POST", PREDICT, wire.encode_tensors({"x": X.astype(np.float64)}),
     BIN_CT, 400, "bad_request", ["'x'", "expected dtype float32", "got float64"]),
    ("wrong-shape", "POST", PREDICT, json.dumps({"inputs": {"x": [[1, 2, 3]]}}).encode(),
     JSON_CT, 400, "bad_request", ["'x'", "[?, 4]", "[1, 3]"]),
    ("wrong-rank-binary", "POST", PREDICT, wire.encode_tensors({"x": X[0]}), BIN_CT, 400,
     "bad_request", ["'x'", "[?, 4]", "[4]"]),
    ("ragged-list", "POST", PREDICT, json.dumps({"inputs": {"x": [[1, 2, 3, 4], [1]]}}).encode(),
     JSON_CT, 400, "bad_request", ["'x'", "ragged"]),
    ("malformed-json", "POST", PREDICT, b'{"inputs": {"x": [[1, 2', JSON_CT, 400,
     "bad_request", ["not JSON"]),
    ("json-nested-too-deeply", "POST", PREDICT, b'{"inputs":{"x":' + b"[" * 2000 + b"]" * 2000
     + b"}}", JSON_CT, 400, "bad_request", ["not JSON", "nested too deeply"]),
    ("json-not-an-object", "POST", PREDICT, b"[1, 2, 3]", JSON_CT, 400, "bad_request",
     ['{"inputs"']),
    ("oversized", "POST", PREDICT, b"x" * (MAX_BODY + 1), JSON_CT, 413, "payload_too_large",
     [str(MAX_BODY + 1), str(MAX_BODY)]),
    ("framing-no-header-line", "POST", PREDICT, b"\x00\x01\x02\x03", BIN_CT, 400,
     "bad_request", ["framing", "header line"]),
    ("framing-short-payload", "POST", PREDICT,
     _frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 4],
                                       "nbytes": 16}]}, b"\x00" * 8),
     BIN_CT, 400, "bad_request", ["framing", "body of", "bytes"]),
    ("framing-nbytes-mismatch", "POST", PREDICT,
     _frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "float32", "shape": [1, 4],
                                       "nbytes": 12}]}, b"\x00" * 12),
     BIN_CT, 400, "bad_request", ["'x'", "needs 16 bytes", "nbytes 12"]),
    ("framing-unknown-version", "POST", PREDICT, _frame_with({"v": 2, "tensors": []}, b""),
     BIN_CT, 400, "bad_request", ["expected framing version 1", "got 2"]),
    ("wrong-method-predict", "GET", PREDICT, None, {}, 405, "method_not_allowed", ["POST"]),
    ("wrong-method-healthz", "POST", "/healthz", b"", JSON_CT, 405, "method_not_allowed",
     ["GET"]),
    ("unsupported-content-type", "POST", PREDICT, b"x=1",
     {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type",
     ["application/json", wire.TENSORS_CONTENT_TYPE]),
    ("engine-failure", "POST", "/v1/models/broken/predict",
     json.dumps({"inputs": {"x": [[0, 0, 0, 0]]}}).encode(), JSON_CT, 500, "runtime_error",
     ["injected engine fault"]),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "kind", "words"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_error_cases(port: int, method: str, path: str, body: bytes | None,
                     headers: dict[str, str], status: int, kind: str, words: list[str],
                     json_codec: str) -> None:
    got, got_headers, data = request(port, method, path, body, headers)
    assert got == status, data
    assert got_headers["content-type"] == "application/json"
    doc = json.loads(data)
    assert doc["error"] == kind
    for word in words:
        assert word in doc["detail"]
    if status == 405:
        assert "allow" in got_headers


def test_missing_length_is_411(port: int) -> None:
    data = raw_exchange(port, b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\n"
                              b"Content-Type: application/json\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 411 ")
    assert b"length_required" in data


def test_chunked_body_is_refused_with_411_and_close(port: int) -> None:
    data = raw_exchange(port, b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 411 ")
    assert b"Connection: close" in data


def test_oversized_body_is_refused_from_the_header_before_it_is_sent(port: int) -> None:
    """A client announcing 1 GB gets 413 at once; the server never waits for the body."""
    data = raw_exchange(port, b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: t\r\n"
                              b"Content-Type: application/json\r\nContent-Length: 1000000000"
                              b"\r\n\r\n", shut=False)
    assert data.startswith(b"HTTP/1.1 413 ")
    assert b"payload_too_large" in data


def test_oversized_head_is_431(port: int) -> None:
    data = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 431 ")


def test_head_healthz_has_headers_and_no_body(port: int) -> None:
    data = raw_exchange(port, b"HEAD /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head
    assert body == b""


def test_http10_closes_unless_keep_alive(port: int) -> None:
    data = raw_exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n", shut=False)
    assert data.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in data


def test_malformed_request_line_is_400_and_close(port: int) -> None:
    data = raw_exchange(port, b"NONSENSE\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 ")
    assert b"Connection: close" in data


def test_a_bad_request_keeps_the_connection_usable(port: int) -> None:
    with AgentClient("127.0.0.1", port) as client:
        with pytest.raises(InputRejected):
            client.predict("tiny", {"x": [["a", "b", "c", "d"]]})
        assert client.predict("tiny", {"x": X}).version == "1"


def test_client_maps_statuses_to_the_error_tree(port: int) -> None:
    with AgentClient("127.0.0.1", port) as client:
        with pytest.raises(UnknownModel, match="'nope'"):
            client.predict("nope", {"x": X})
        with pytest.raises(RuntimeLoadError, match="injected engine fault"):
            client.predict("broken", {"x": X})
        with pytest.raises(InputRejected, match="over the limit"):
            client.predict("tiny", {"x": np.zeros((400, 4), np.float32)})


def test_client_reports_an_unreachable_agent_as_transport_error() -> None:
    from agent.errors import TransportError

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with AgentClient("127.0.0.1", free, timeout=2) as client, pytest.raises(TransportError):
        client.health()


# --- the framing, pure ------------------------------------------------------------------------


def test_framing_round_trip_keeps_dtypes_shapes_and_meta() -> None:
    tensors: dict[str, np.ndarray] = {"f": np.arange(6, dtype=np.float32).reshape(2, 3),
               "i": np.array([[-1, 2**40]], dtype=np.int64),
               "b": np.array([True, False, True]),
               "h": np.ones((2, 2), dtype=np.float16),
               "empty": np.zeros((0, 4), dtype=np.uint8),
               "scalar": np.array(3.5, dtype=np.float64),
               "big_endian": np.array([1, 2], dtype=">i4")}
    frame = wire.decode_tensors(wire.encode_tensors(tensors, {"model": "m", "extra": [1]}))
    assert list(frame.tensors) == list(tensors)
    for name, arr in tensors.items():
        got = frame.tensors[name]
        assert got.shape == arr.shape
        assert got.dtype == arr.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, arr)
    assert frame.meta == {"model": "m", "extra": [1]}


@pytest.mark.parametrize(("body", "words"), [
    (b"", "no header line"),
    (b"not json\n", "not JSON"),
    (b"[]\n", "expected a JSON object"),
    (_frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "complex64", "shape": [1],
                                       "nbytes": 8}]}, b"\x00" * 8), "expected dtype"),
    (_frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "uint8", "shape": [-1],
                                       "nbytes": 0}]}, b""), "expected shape"),
    (_frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "uint8", "shape": [1],
                                       "nbytes": 1}] * 2}, b"\x00\x00"), "appears twice"),
    (_frame_with({"v": 1, "tensors": [{"name": "x", "dtype": "bool", "shape": [1],
                                       "nbytes": 1}]}, b"\x07"), "0 or 1"),
    (_frame_with({"v": 1, "tensors": []}, b"trailing"), "body of"),
], ids=["empty", "header-not-json", "header-not-object", "unknown-dtype", "negative-dim",
        "duplicate-name", "bool-not-0-or-1", "trailing-bytes"])
def test_framing_refuses(body: bytes, words: str) -> None:
    with pytest.raises(InputRejected, match=words):
        wire.decode_tensors(body)

"""Model swaps under load drop no request, and an old model is closed only when it is idle.

Three parts: a deterministic check of the lease rule with a fake LoadedModel that blocks inside
``run`` until released (no sleeps, no timing); the host's placement rule (inline on the event
loop or in the pool), driven by an injected clock that the fake model advances, so "measured
service time" is exact; and a real-server test where 8 keep-alive clients (half binary, half
JSON) hammer predict while the main thread swaps v1 -> v2 -> v1 ... (real onnxruntime models
wrapped in a recording fake that sees every run and close; each swap is made while a request
is held inside the old model, so every swap has one in flight), once per placement on
asyncio's loop and once more on uvloop (the daemon's loop when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import AgentError, InputRejected
from agent.protocol.manifest import TensorSpec
from agent.serving.client import AgentClient
from agent.serving.eventloop import loop_factory
from agent.serving.host import INLINE_MAX_S, WINDOW, ModelHost
from agent.serving.runtime import LoadedModel, OnnxRuntime
from agent.serving.server import InferenceServer

X = np.array([[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]], dtype=np.float32)
WEIGHTS = {"1": np.arange(12, dtype=np.float32).reshape(4, 3) / 10,
           "2": -np.arange(12, dtype=np.float32).reshape(3, 4).T / 7}
CLIENTS = 8
SWAPS = 6
REQUESTS_BETWEEN_SWAPS = 40
REQUESTS_AFTER_LAST_SWAP = 20  # per client


def build_model(path: Path, weights: np.ndarray) -> Path:
    """x float32 [N, 4] -> MatMul W -> Softmax: probs float32 [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


class Recording:
    """Wraps a LoadedModel; records runs in flight and whether close came too early.

    ``hold()`` makes the next runs wait inside ``run`` until ``let_go()``, so a swap can be
    made while a request is certainly in flight on this model.
    """

    def __init__(self, inner: LoadedModel, version: str) -> None:
        self.inner = inner
        self.version = version
        self.inputs = inner.inputs
        self.outputs = inner.outputs
        self._lock = threading.Lock()
        self.inflight = 0
        self.runs = 0
        self.closed = False
        self.violations: list[str] = []
        self._gate: threading.Event | None = None
        self.held = threading.Event()  # a run is waiting at the gate

    def hold(self) -> None:
        self._gate = threading.Event()

    def let_go(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            if self.closed:
                self.violations.append("run after close")
            self.inflight += 1
            gate = self._gate
        try:
            if gate is not None:
                self.held.set()
                assert gate.wait(10)
            return self.inner.run(feeds)
        finally:
            with self._lock:
                self.inflight -= 1
                self.runs += 1

    def close(self) -> None:
        with self._lock:
            if self.closed:
                self.violations.append("closed twice")
            if self.inflight:
                self.violations.append(f"closed with {self.inflight} runs in flight")
            self.closed = True
        self.inner.close()


class Gate:
    """A fake LoadedModel whose ``run`` waits for ``release`` (deterministic in-flight)."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (None, 4)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (None, 4)),)

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        assert self.release.wait(10)
        return {"y": np.asarray(feeds["x"]) * 2}

    def close(self) -> None:
        self.closed.set()


class Instant(Gate):
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": np.asarray(feeds["x"]) * 3}


# --- the lease rule, deterministic ------------------------------------------------------------


def test_swap_closes_the_old_model_only_after_its_running_request_finished() -> None:
    async def scenario() -> None:
        host = ModelHost(workers=2)
        old, new = Gate(), Instant()
        host.swap("m", "1", old)
        running = asyncio.ensure_future(host.predict("m", {"x": X}))
        assert await asyncio.to_thread(old.entered.wait, 10)
        previous = host.swap("m", "2", new)  # while v1 is inside run()
        assert previous is not None and previous.version == "1"
        assert not old.closed.is_set()
        info, out = await host.predict("m", {"x": X})  # new requests see v2 at once
        assert info.version == "2"
        np.testing.assert_array_equal(out["y"], X * 3)
        assert not old.closed.is_set()
        old.release.set()
        info, out = await running  # the running request finished on v1
        assert info.version == "1"
        np.testing.assert_array_equal(out["y"], X * 2)
        assert await asyncio.to_thread(old.closed.wait, 10)
        assert not new.closed.is_set()
        host.close()
        assert new.closed.is_set()

    asyncio.run(scenario())


def test_swap_closes_an_idle_model_at_once_and_remove_unserves() -> None:
    host = ModelHost(workers=1)
    first, second = Instant(), Instant()
    assert host.swap("m", "1", first) is None
    host.swap("m", "2", second)
    assert first.closed.is_set()
    assert [(i.name, i.version) for i in host.list()] == [("m", "2")]
    removed = host.remove("m")
    assert removed is not None and removed.version == "2"
    assert second.closed.is_set()
    assert host.get("m") is None and len(host) == 0
    host.close()


def test_swap_refuses_empty_name_or_version() -> None:
    host = ModelHost(workers=1)
    with pytest.raises(ValueError, match="name and a version"):
        host.swap("", "1", Instant())
    host.close()


def test_stop_lets_a_running_predict_answer() -> None:
    """``InferenceServer.stop`` waits for the predict in flight, answers it, then closes."""
    host = ModelHost(workers=1)
    gate = Gate()
    host.swap("m", "1", gate)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = InferenceServer(host, bind_host="127.0.0.1", port=0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    answers: list[object] = []

    def call() -> None:
        with AgentClient("127.0.0.1", server.port) as client:
            answers.append(client.predict("m", {"x": X}))

    caller = threading.Thread(target=call)
    caller.start()
    try:
        assert gate.entered.wait(10)
        stopping = asyncio.run_coroutine_threadsafe(server.stop(grace_s=10), loop)
        assert not stopping.done()
        gate.release.set()
        stopping.result(10)
        caller.join(10)
    finally:
        gate.release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        host.close()
    assert len(answers) == 1
    assert getattr(answers[0], "version", None) == "1"


# --- placement: inline on the loop or in the pool -----------------------------------------------


class FakeClock:
    """The host's clock; a :class:`Timed` model advances it by its service time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Timed:
    """A LoadedModel that "takes" ``cost_s`` on the fake clock and records where it ran."""

    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", "float32", (None, 4)),)
    outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (None, 4)),)

    def __init__(self, clock: FakeClock, cost_s: float) -> None:
        self.clock = clock
        self.cost_s = cost_s
        self.threads: list[str] = []
        self.refuse = False

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        self.clock.now += self.cost_s
        if self.refuse:
            raise InputRejected("input 'x': refused on purpose")
        return {"y": np.asarray(feeds["x"])}

    def close(self) -> None:
        pass


def placements(host: ModelHost, model: Timed, n: int, *, feeds: Mapping[str, np.ndarray]
               | None = None) -> list[str]:
    """Run ``n`` predicts one after another; where each ran: "loop" or "pool"."""
    async def scenario() -> list[str]:
        loop_thread = threading.current_thread().name
        start = len(model.threads)
        for _ in range(n):
            with contextlib.suppress(InputRejected):  # refused on purpose: still placed
                await host.predict("m", feeds if feeds is not None else {"x": X})
        return ["loop" if t == loop_thread else "pool" for t in model.threads[start:]]

    return asyncio.run(scenario())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_fast_model_runs_in_the_pool_for_one_window_then_inline(clock: FakeClock) -> None:
    host = ModelHost(workers=2, clock=clock)
    model = Timed(clock, INLINE_MAX_S / 4)
    host.swap("m", "1", model)
    assert not host.runs_inline("m")
    assert placements(host, model, WINDOW + 5) == ["pool"] * WINDOW + ["loop"] * 5
    assert host.runs_inline("m")
    host.swap("m", "2", new := Timed(clock, INLINE_MAX_S / 4))  # a new version starts over
    assert not host.runs_inline("m")
    assert placements(host, new, 1) == ["pool"]
    host.close()


def test_a_slow_model_stays_in_the_pool(clock: FakeClock) -> None:
    host = ModelHost(workers=2, clock=clock)
    model = Timed(clock, INLINE_MAX_S * 1.5)
    host.swap("m", "1", model)
    assert set(placements(host, model, 3 * WINDOW)) == {"pool"}
    assert not host.runs_inline("m")
    host.close()


def test_an_inline_model_goes_back_to_the_pool_past_twice_the_limit(clock: FakeClock) -> None:
    host = ModelHost(workers=1, clock=clock)
    model = Timed(clock, INLINE_MAX_S / 2)
    host.swap("m", "1", model)
    placements(host, model, WINDOW)
    model.cost_s = INLINE_MAX_S * 1.5  # over the limit, under twice it: hysteresis keeps it
    assert set(placements(host, model, 2 * WINDOW)) == {"loop"}
    model.cost_s = INLINE_MAX_S * 2.5
    assert placements(host, model, WINDOW + 2) == ["loop"] * WINDOW + ["pool"] * 2
    host.close()


def test_a_big_body_runs_in_the_pool_even_for_an_inline_model(clock: FakeClock) -> None:
    host = ModelHost(workers=1, clock=clock, inline_max_bytes=1024)
    model = Timed(clock, INLINE_MAX_S / 4)
    host.swap("m", "1", model)
    placements(host, model, WINDOW)
    assert host.runs_inline("m")
    big = {"x": np.zeros((65, 4), np.float32)}  # 1040 bytes
    assert placements(host, model, 2, feeds=big) == ["pool", "pool"]
    assert placements(host, model, 1) == ["loop"]
    host.close()


def test_refused_requests_do_not_make_a_slow_model_inline(clock: FakeClock) -> None:
    host = ModelHost(workers=1, clock=clock)
    model = Timed(clock, INLINE_MAX_S * 10)
    host.swap("m", "1", model)
    model.refuse = True
    model.cost_s = 0.0  # a flood of malformed requests answers at once
    assert set(placements(host, model, 3 * WINDOW)) == {"pool"}
    assert not host.runs_inline("m")
    host.close()


def test_inline_max_s_zero_never_runs_inline(clock: FakeClock) -> None:
    host = ModelHost(workers=1, clock=clock, inline_max_s=0)
    model = Timed(clock, 0.0)
    host.swap("m", "1", model)
    assert set(placements(host, model, 2 * WINDOW)) == {"pool"}
    host.close()


@pytest.mark.parametrize(("inline_max_s", "max_bytes"), [(-1.0, 0), (float("nan"), 0),
                                                          (1e-4, -1)])
def test_host_refuses_bad_inline_limits(inline_max_s: float, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="inline_max_s"):
        ModelHost(inline_max_s=inline_max_s, inline_max_bytes=max_bytes)


# --- 8 clients across swaps, real server ------------------------------------------------------


@pytest.mark.parametrize(("placement", "loop_kind"), [
    ("pool", "asyncio"), ("inline", "asyncio"), ("adaptive", "asyncio"), ("adaptive", "uvloop")])
def test_swaps_under_load_drop_no_request(tmp_path: Path, placement: str, loop_kind: str) -> None:
    paths = {v: build_model(tmp_path / f"v{v}.onnx", w) for v, w in WEIGHTS.items()}
    runtime = OnnxRuntime()
    expected = {}
    for version, path in paths.items():
        probe = runtime.load(path, threads=1)
        expected[version] = probe.run({"x": X})["probs"]
        probe.close()
    assert not np.array_equal(expected["1"], expected["2"])

    # pool: never inline; inline: every model inline after its first window (a held run
    # then blocks the loop, and the swap still happens from this thread); adaptive: the default
    host = ModelHost(workers=2, inline_max_s={"pool": 0.0, "inline": 60.0,
                                              "adaptive": INLINE_MAX_S}[placement])
    models: list[Recording] = []

    def load(version: str) -> Recording:
        model = Recording(runtime.load(paths[version], threads=1), version)
        models.append(model)
        return model

    host.swap("tiny", "1", load("1"))
    loop = loop_factory(loop_kind)[1]()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = InferenceServer(host, bind_host="127.0.0.1", port=0)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)

    done = threading.Condition()
    completed = 0
    final: dict[str, str] = {}  # set once the last swap returned: {"version": ...}
    stop = threading.Event()
    failures: list[str] = []
    versions_seen: set[str] = set()

    def hammer(index: int) -> None:
        nonlocal completed
        after_final = 0
        with AgentClient("127.0.0.1", server.port, timeout=10) as client:
            binary = index % 2 == 0  # half the clients binary, half JSON
            while not stop.is_set():
                final_version = final.get("version")  # read BEFORE sending
                try:
                    got = client.predict("tiny", {"x": X}, binary=binary)
                except AgentError as exc:
                    failures.append(f"client {index}: {type(exc).__name__}: {exc}")
                    return
                probs = got.outputs["probs"].astype(np.float32)
                if got.version not in expected:
                    failures.append(f"client {index}: unknown version {got.version!r}")
                elif not np.array_equal(probs, expected[got.version]):
                    failures.append(f"client {index}: output differs from v{got.version}")
                if final_version is not None:
                    if got.version != final_version:
                        failures.append(f"client {index}: request sent after the last swap "
                                        f"answered by v{got.version}, not v{final_version}")
                    after_final += 1
                    if after_final >= REQUESTS_AFTER_LAST_SWAP:
                        return
                versions_seen.add(got.version)
                with done:
                    completed += 1
                    done.notify_all()

    def wait_for(count: int) -> None:
        with done:
            assert done.wait_for(lambda: completed >= count or bool(failures), 30), (
                f"only {completed} of {count} requests completed")

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(CLIENTS)]
    try:
        for t in threads:
            t.start()
        wait_for(REQUESTS_BETWEEN_SWAPS)
        version = "1"
        for _ in range(SWAPS):
            old = models[-1]
            old.hold()  # make sure a request is in flight on the old model during the swap
            assert old.held.wait(10)
            version = "2" if version == "1" else "1"
            host.swap("tiny", version, load(version))
            assert not old.closed, "closed while a request was running on it"
            old.let_go()
            wait_for(completed + REQUESTS_BETWEEN_SWAPS)
        final["version"] = version
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a client never finished"
        host_inline = host.runs_inline("tiny")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        host.close()

    assert failures == []
    assert versions_seen == {"1", "2"}
    assert len(models) == SWAPS + 1
    for model in models:
        assert model.violations == [], f"v{model.version}: {model.violations}"
        assert model.closed  # every replaced model, and the last one at host.close()
    assert sum(m.runs for m in models) >= completed
    assert all(m.runs for m in models)
    if placement != "adaptive":  # the last model saw 8 * 20 requests: a window at least
        assert host_inline == (placement == "inline")

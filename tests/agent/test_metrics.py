"""agent.metrics: per-interval request metrics (pure, thread-safe), table-driven."""

from __future__ import annotations

import json
import math
import threading
from typing import Any

import pytest

from agent.buffer import Outbox
from agent.metrics import (
    DEFAULT_BUCKETS_MS,
    ERROR_KINDS,
    METRICS_KIND,
    METRICS_VERSION,
    RequestMetrics,
    estimate_percentile,
)

T0 = 1_700_000_000.0
EDGES = (1.0, 2.0, 5.0, 10.0)

PERCENTILE_CASES = [
    # (name, latencies, q, expected estimate, tolerance); edges 1, 2, 5, 10 ms. The estimate
    # interpolates linearly inside the bucket holding the rank, that bucket's bounds clamped
    # to the observed min and max
    ("single-value-is-exact", [3.0], 0.5, 3.0, 0.0),
    ("all-equal-is-exact", [7.0] * 50, 0.99, 7.0, 0.0),
    # 6 values in (2, 5] seen as [2.5, 5]: rank 3 of 6 -> 2.5 + 2.5 * 3/6
    ("uniform-in-one-bucket-interpolates", [2.5, 3.0, 3.5, 4.0, 4.5, 5.0], 0.5, 3.75, 1e-9),
    # rank 50 is the last of bucket [0.5, 1]: its top, though every value there is 0.5
    ("median-at-the-top-of-its-bucket", [0.5] * 50 + [4.0] * 50, 0.5, 1.0, 1e-9),
    # rank 95: 5th of 10 in (5, 10] seen as (5, 8] -> 5 + 3 * 5/10
    ("p95-lands-in-the-upper-bucket", [0.5] * 90 + [8.0] * 10, 0.95, 6.5, 1e-9),
    # rank 99: 1st of 2 in the overflow bucket (10, inf) seen as (10, 60] -> 10 + 50 * 1/2
    ("overflow-bucket-bounded-by-max", [1.0] * 98 + [40.0, 60.0], 0.99, 35.0, 1e-9),
    ("equal-to-an-edge-goes-to-the-lower-bucket", [2.0] * 10, 0.5, 2.0, 0.0),
    # rank 1 of 5 in [0, 1] seen as [0.2, 1] -> 0.2 + 0.8 * 1/5
    ("first-bucket-starts-at-the-min", [0.2, 0.4, 0.6, 0.8, 1.0], 0.2, 0.36, 1e-9),
]


@pytest.mark.parametrize(("name", "values", "q", "expected", "tol"), PERCENTILE_CASES,
                         ids=[c[0] for c in PERCENTILE_CASES])
def test_percentiles_are_estimated_from_the_buckets(name: str, values: list[float], q: float,
                                                    expected: float, tol: float) -> None:
    metrics = RequestMetrics(start=T0, edges_ms=EDGES)
    for v in values:
        metrics.observe("m", "1", v, True)
    [body] = metrics.flush(T0 + 10)
    hist = body["latency_ms"]
    got = estimate_percentile(EDGES, hist["counts"], q, low=min(values), high=max(values))
    assert got == pytest.approx(expected, abs=tol)
    # an estimate never leaves the observed range, nor the bucket holding the true value
    assert min(values) <= got <= max(values)
    true = sorted(values)[max(0, math.ceil(q * len(values)) - 1)]
    edges = (0.0, *EDGES, math.inf)
    bucket = next(i for i in range(len(edges) - 1) if edges[i] < true <= edges[i + 1]
                  or (i == 0 and true <= edges[1]))
    assert edges[bucket] <= got <= min(edges[bucket + 1], max(values))


def test_every_body_carries_p50_p95_p99_consistent_with_the_estimator() -> None:
    metrics = RequestMetrics(start=T0, edges_ms=EDGES)
    values = [0.5, 1.5, 1.7, 3.0, 4.0, 6.0, 9.0, 12.0]
    for v in values:
        metrics.observe("m", "1", v, True)
    [body] = metrics.flush(T0 + 10)
    hist = body["latency_ms"]
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        est = estimate_percentile(EDGES, hist["counts"], q, low=0.5, high=12.0)
        assert hist[name] == pytest.approx(est, abs=1e-3)
    assert hist["p50"] <= hist["p95"] <= hist["p99"] <= hist["max"] == 12.0
    assert hist["counts"] == [1, 2, 2, 2, 1] and hist["count"] == 8
    assert hist["sum"] == pytest.approx(sum(values)) and hist["min"] == 0.5


ESTIMATOR_MISUSE = [
    ("q-zero", {"q": 0.0}, "q"),
    ("q-above-one", {"q": 1.5}, "q"),
    ("counts-wrong-length", {"counts": [1, 2]}, "buckets"),
]


@pytest.mark.parametrize(("name", "change", "match"), ESTIMATOR_MISUSE,
                         ids=[c[0] for c in ESTIMATOR_MISUSE])
def test_estimator_misuse(name: str, change: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"edges": EDGES, "counts": [0, 1, 0, 0, 0], "q": 0.5}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        estimate_percentile(args["edges"], args["counts"], args["q"], low=1.0, high=1.0)


def test_nothing_counted_gives_no_estimate() -> None:
    assert estimate_percentile(EDGES, [0] * 5, 0.5, low=math.inf, high=0.0) is None


# ---------------------------------------------------------------------------------------------
# aggregation per model and interval
# ---------------------------------------------------------------------------------------------
REQUESTS = [
    # (model, version, latency_ms, ok, error_kind)
    ("digits-mlp", "3", 1.2, True, None),
    ("digits-mlp", "3", 2.8, True, None),
    ("digits-mlp", "3", 0.1, False, "4xx"),
    ("digits-mlp", "3", 30.0, False, "runtime"),
    ("digits-mlp", "2", 4.0, True, None),
    ("digits-cnn", "1", 9.0, False, "5xx"),
]


def test_flush_gives_one_body_per_model_and_version() -> None:
    metrics = RequestMetrics(start=T0)
    for request in REQUESTS:
        metrics.observe(*request)
    bodies = metrics.flush(T0 + 10)
    assert [(b["model"], b["model_version"]) for b in bodies] == [
        ("digits-cnn", "1"), ("digits-mlp", "2"), ("digits-mlp", "3")]
    cnn, mlp2, mlp3 = bodies
    assert mlp3["count"] == 4 and mlp3["ok"] == 2
    assert mlp3["errors"] == {"4xx": 1, "5xx": 0, "runtime": 1}
    assert mlp3["latency_ms"]["count"] == 2 and mlp3["latency_ms"]["max"] == 2.8
    assert mlp2["count"] == 1 and mlp2["errors"] == dict.fromkeys(ERROR_KINDS, 0)
    assert cnn["ok"] == 0 and cnn["errors"]["5xx"] == 1
    assert cnn["latency_ms"]["p50"] is None and cnn["latency_ms"]["min"] is None
    for body in bodies:
        assert body["version"] == METRICS_VERSION
        assert body["interval"] == {"start": T0, "end": T0 + 10}
        assert body["latency_ms"]["edges"] == list(DEFAULT_BUCKETS_MS)
        assert json.loads(json.dumps(body, allow_nan=False)) == body


def test_each_flush_starts_the_next_interval() -> None:
    metrics = RequestMetrics(start=T0)
    metrics.observe("m", "1", 1.0, True)
    [first] = metrics.flush(T0 + 10)
    assert metrics.flush(T0 + 20) == []  # a quiet interval writes no row
    metrics.observe("m", "1", 2.0, True)
    [third] = metrics.flush(T0 + 30)
    assert first["interval"] == {"start": T0, "end": T0 + 10}
    assert third["interval"] == {"start": T0 + 20, "end": T0 + 30}
    assert third["count"] == 1 and third["latency_ms"]["sum"] == 2.0


def test_bodies_go_to_the_outbox_as_metrics_rows() -> None:
    metrics = RequestMetrics(start=T0)
    for request in REQUESTS:
        metrics.observe(*request)
    box = Outbox.in_memory(device_id="pi-01", max_rows=100)
    now = T0 + 10
    seqs = box.append_many("telemetry", [(METRICS_KIND, b, now) for b in metrics.flush(now)],
                           priority="metrics")
    assert len(seqs) == 3
    [batch] = box.build_batches("telemetry", 10)
    assert [r.kind for r in batch.records] == [METRICS_KIND] * 3
    assert len(batch.to_bytes()) < 4096


BAD_OBSERVATIONS = [
    ("empty-model", ("", "1", 1.0, True, None), "model and version"),
    ("empty-version", ("m", "", 1.0, True, None), "model and version"),
    ("negative-latency", ("m", "1", -0.1, True, None), "latency_ms"),
    ("nan-latency", ("m", "1", math.nan, True, None), "latency_ms"),
    ("infinite-latency", ("m", "1", math.inf, True, None), "latency_ms"),
    ("bool-latency", ("m", "1", True, True, None), "latency_ms"),
    ("error-kind-on-success", ("m", "1", 1.0, True, "5xx"), "expected None"),
    ("failure-without-kind", ("m", "1", 1.0, False, None), "expected one of"),
    ("unknown-error-kind", ("m", "1", 1.0, False, "timeout"), "expected one of"),
]


@pytest.mark.parametrize(("name", "args", "match"), BAD_OBSERVATIONS,
                         ids=[c[0] for c in BAD_OBSERVATIONS])
def test_bad_observations_are_refused_and_count_nothing(name: str, args: tuple[Any, ...],
                                                        match: str) -> None:
    metrics = RequestMetrics(start=T0)
    with pytest.raises(ValueError, match=match):
        metrics.observe(*args)
    assert metrics.flush(T0 + 1) == []


@pytest.mark.parametrize("edges", [(), (1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (1.0, math.inf)],
                         ids=["none", "repeated", "decreasing", "zero", "infinite"])
def test_bad_bucket_edges_are_refused(edges: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="latency bucket edges"):
        RequestMetrics(start=T0, edges_ms=edges)


def test_observe_is_thread_safe_against_concurrent_flushes() -> None:
    metrics = RequestMetrics(start=T0)
    per_thread, threads_n = 2000, 4
    bodies: list[dict[str, Any]] = []
    done = threading.Event()

    def serve(k: int) -> None:
        for i in range(per_thread):
            ok = i % 10 != 0
            metrics.observe("m", "1", float(i % 50), ok, None if ok else "5xx")

    def flusher() -> None:
        t = T0
        while not done.is_set():
            t += 1
            bodies.extend(metrics.flush(t))

    workers = [threading.Thread(target=serve, args=(k,)) for k in range(threads_n)]
    flushing = threading.Thread(target=flusher)
    flushing.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    flushing.join()
    bodies.extend(metrics.flush(T0 + 10**6))
    assert sum(b["count"] for b in bodies) == per_thread * threads_n
    assert sum(b["errors"]["5xx"] for b in bodies) == per_thread * threads_n // 10
    assert sum(b["latency_ms"]["count"] for b in bodies) == per_thread * threads_n * 9 // 10

"""Fleet monitoring views over real records: metrics intervals from ``agent.metrics``, drift
windows of a real digits MLP's traffic from ``agent.drift``, stored by the real ingest in a
real SQLite file, read back by ``fleet_server.monitoring`` and through the admin API.

Expected numbers are worked out by hand in the comments (latency percentiles interpolate in
``agent.metrics``' buckets: ..., (2, 5], (5, 10], (10, 20], (20, 50], (50, 100], (100, 200],
...), or recomputed from the traffic with the device's own numpy statistics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import (
    ADMIN,
    MODEL,
    START,
    Digits,
    Fleetlet,
    manifest,
    metrics_body,
    trained_digits,
)

from agent.drift import bin_counts, js_divergence, psi
from agent.protocol.messages import Status
from agent.protocol.topics import device_topic
from fleet_server import auth
from fleet_server.api import create_app
from fleet_server.db import atomic, tables
from fleet_server.errors import InvalidInput, NotFound
from fleet_server.monitoring import (
    TimeRange,
    device_view,
    distance,
    distribution_view,
    drift_view,
    fleet_view,
    model_view,
)
from fleet_server.registry import devices
from model_tools.examples.digits import shifted

HOUR = TimeRange(START, START + 3600, 600)
DEAD_BLOCK = {r * 8 + c for r in range(2, 6) for c in range(2, 6)}  # shifted(..., "dead")


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits()


# ------------------------------------------------------------------------------- metrics
@pytest.fixture
def served(tmp_path: Path, digits: Digits) -> Iterator[Fleetlet]:
    """Five devices; four intervals of traffic and two malformed bodies (see the test)."""
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4", "pi-3": "rpi4",
                            "zero-1": "rpi-zero2w", "old-1": "rpi4"}, digits.baseline)
    for device, version in (("pi-1", "1.0.0"), ("pi-2", "1.0.0"), ("pi-3", "1.0.0"),
                            ("zero-1", "2.0.0"), ("old-1", "1.0.0")):
        f.running(device, version, at=START)
    for device in ("pi-1", "pi-2"):
        f.receive(device_topic(device, "status"),
                  Status(device_id=device, online=True, at=START).to_bytes(), START)
    with atomic(f.fleet.engine) as conn:
        devices.revoke(f.fleet, conn, "old-1", actor=ADMIN)
    f.metrics("pi-1", [metrics_body([5.0] * 95 + [40.0] * 5)], at=START + 100)
    f.metrics("pi-1", [metrics_body([40.0] * 50, {"runtime": 10})], at=START + 700)
    f.metrics("pi-2", [metrics_body([5.0] * 50, {"4xx": 2}),
                       metrics_body([7.0] * 9, model="other")], at=START + 200)
    f.metrics("zero-1", [metrics_body([150.0] * 20, version="2.0.0")], at=START + 300)
    # device input the views must skip: more ok than requests; a PSI that is not a number
    f.metrics("pi-2", [{**metrics_body([5.0]), "count": 1, "ok": 3}], at=START + 400)
    f.drift("pi-2", [{"version": 1, "model": MODEL, "model_version": "1.0.0",
                      "window": {"start": 0.0, "end": 1.0, "predictions": 500},
                      "max_psi": "high"}], at=START + 400)
    f.metrics("pi-1", [metrics_body([9.0] * 7)], at=START + 3601)  # after the range
    yield f
    f.close()


def test_model_view_per_version_device_and_bucket(served: Fleetlet) -> None:
    view = model_view(served.fleet, MODEL, HOUR)
    t = view["totals"]
    assert (t["requests"], t["errors"], t["errors_by_kind"]) == (
        232, 12, {"4xx": 2, "runtime": 10})
    assert t["error_rate"] == pytest.approx(12 / 232, rel=1e-6)
    # 220 ok: 145 at 5 ms, 55 at 40 ms, 20 at 150 ms; rank 0.95 * 220 = 209 lies in
    # (100, 200] clamped to the largest seen: 100 + (150 - 100) * (209 - 200) / 20
    assert t["p95_ms"] == 122.5
    assert t["p50_ms"] == 5.0 and t["p99_ms"] == 144.5  # rank 217.8: 100 + 50 * 17.8 / 20
    assert (t["max_psi"], t["drift_windows"]) == (None, 0)

    versions = {v["version"]: v for v in view["versions"]}
    assert sorted(versions) == ["1.0.0", "2.0.0"]
    one, two = versions["1.0.0"], versions["2.0.0"]
    assert (one["requests"], one["errors"], one["running_devices"],
            one["reporting_devices"]) == (212, 12, 3, 2)
    # 200 ok: rank 190 in (20, 50], clamped to 5..40: 20 + 20 * (190 - 145) / 55
    assert one["p95_ms"] == round(20 + 20 * 45 / 55, 3)
    assert (two["requests"], two["p95_ms"], two["running_devices"]) == (20, 150.0, 1)

    rows = {(d["device"], d["version"]): d for d in view["devices"]}
    assert sorted(rows) == [("pi-1", "1.0.0"), ("pi-2", "1.0.0"), ("pi-3", "1.0.0"),
                            ("zero-1", "2.0.0")]  # old-1 is revoked; pi-3 sent nothing
    pi1 = rows[("pi-1", "1.0.0")]
    # 150 ok: rank 142.5 in (20, 50]: 20 + 20 * (142.5 - 95) / 55
    assert (pi1["requests"], pi1["errors"], pi1["error_rate"]) == (160, 10, 0.0625)
    assert pi1["p95_ms"] == round(20 + 20 * 47.5 / 55, 3) and pi1["last_at"] == START + 700
    assert (pi1["online"], pi1["running"], pi1["latency_budget_ms"]) == (True, True, 50.0)
    assert (rows[("pi-2", "1.0.0")]["p95_ms"], rows[("pi-2", "1.0.0")]["errors_by_kind"]) == (
        5.0, {"4xx": 2})
    silent = rows[("pi-3", "1.0.0")]
    assert (silent["requests"], silent["last_at"], silent["running"]) == (0, None, True)
    assert rows[("zero-1", "2.0.0")]["latency_budget_ms"] == 200.0

    # buckets of 600 s from START (the range (START, START + 3600] touches 7 of them)
    series = view["series"]
    assert [p["start"] for p in series] == [START + 600 * i for i in range(7)]
    assert [(p["requests"], p["errors"], p["devices"]) for p in series] == [
        (172, 2, 3), (60, 10, 1), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]
    assert series[1]["p95_ms"] == 40.0 and series[2]["p95_ms"] is None
    assert [p["requests"] for p in versions["2.0.0"]["series"]][:2] == [20, 0]


def test_fleet_view_counts_devices_models_and_alerts(served: Fleetlet) -> None:
    view = fleet_view(served.fleet, HOUR)
    assert view["devices"] == {"total": 5, "online": 2, "offline": 2, "revoked": 1}
    assert (view["totals"]["requests"], view["totals"]["errors"]) == (241, 12)
    models = {m["model"]: m for m in view["models"]}
    assert sorted(models) == [MODEL, "other"]
    assert (models[MODEL]["requests"], models[MODEL]["running_devices"],
            models[MODEL]["reporting_devices"]) == (232, 4, 3)
    assert [(v["version"], v["running_devices"]) for v in models[MODEL]["versions"]] == [
        ("1.0.0", 3), ("2.0.0", 1)]
    other = models["other"]
    assert (other["requests"], other["p95_ms"], other["running_devices"]) == (9, 7.0, 0)
    assert view["series"][0]["requests"] == 181 and view["alerts"] == {"pending": 0,
                                                                        "firing": 0}
    assert (view["since"], view["until"], view["bucket_s"]) == (START, START + 3600, 600)


def test_device_view(served: Fleetlet) -> None:
    view = device_view(served.fleet, "pi-2", HOUR)
    assert (view["profile"], view["online"], view["latency_budget_ms"]) == ("rpi4", True, 50.0)
    assert view["running"] == [{"model": MODEL, "version": "1.0.0"}]
    got = [(m["model"], m["version"], m["requests"], m["running"]) for m in view["models"]]
    assert got == [(MODEL, "1.0.0", 52, True), ("other", "1.0.0", 9, False)]
    assert view["totals"]["requests"] == 61
    with pytest.raises(NotFound, match="device 'pi-9' not found"):
        device_view(served.fleet, "pi-9", HOUR)
    with pytest.raises(NotFound, match="model 'nope' not found"):
        model_view(served.fleet, "nope", HOUR)


def test_model_names_with_like_wildcards_are_matched_exactly(tmp_path: Path,
                                                              digits: Digits) -> None:
    """The SQL prefilter on the body text escapes "%", "_" and its escape character."""
    f = Fleetlet(tmp_path, {"pi-1": "rpi4"}, digits.baseline)
    try:
        f.metrics("pi-1", [metrics_body([5.0] * 3, model="we/ird_%"),
                           metrics_body([5.0] * 5, model="weXirdY%"),
                           metrics_body([5.0] * 7, model="we/ird_%x")], at=START + 1)
        view = model_view(f.fleet, "we/ird_%", HOUR)
        assert view["totals"]["requests"] == 3
        assert [m["model"] for m in fleet_view(f.fleet, HOUR)["models"]] == [
            "we/ird_%", "we/ird_%x", "weXirdY%"]
    finally:
        f.close()


# ------------------------------------------------------------------------------- drift
@pytest.fixture
def drifting(tmp_path: Path, digits: Digits) -> Iterator[tuple[Fleetlet, dict[str, Any]]]:
    """pi-1 and zero-1 serve the eval split as it is; pi-2 too, then 20 minutes later a
    shifted copy (its centre block dead). Windows of 180 predictions: 3 per pass."""
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4", "zero-1": "rpi-zero2w",
                            "jet-1": "jetson-orin-nano"}, digits.baseline)
    calm = digits.windows(digits.x_eval, window=180)
    dead = digits.windows(shifted(digits.x_eval, "dead"), window=180)
    # jet-1's artifact was built from other calibration data: other bin edges for feature 18
    other = json.loads(manifest(digits.baseline))
    other["drift_baseline"]["inputs"]["input"]["features"][18]["edges"][0] += 0.01
    with atomic(f.fleet.engine) as conn:
        conn.execute(tables.artifacts.update().where(
            tables.artifacts.c.profile == "jetson-orin-nano").values(
            manifest=json.dumps(other)))
    f.drift("pi-1", calm, at=START + 100)
    f.drift("pi-2", calm, at=START + 100)
    f.drift("zero-1", calm, at=START + 150)
    f.drift("jet-1", calm, at=START + 150)
    # an agent from before bin counts: PSI and JS but no counts
    old = json.loads(json.dumps(calm[0]))
    for feat in old["inputs"]["input"]["features"]:
        del feat["counts"]
    f.drift("pi-1", [old], at=START + 200)
    f.drift("pi-2", dead, at=START + 1300)
    yield f, {"calm": calm, "dead": dead, "old": old}
    f.close()


def _max(bodies: list[dict[str, Any]]) -> float:
    return max(b["max_psi"] for b in bodies)


def _feature(body: dict[str, Any], index: int) -> dict[str, Any]:
    return body["inputs"]["input"]["features"][index]


def test_drift_view_per_bucket_and_device(drifting: tuple[Fleetlet, dict[str, Any]]) -> None:
    f, w = drifting
    calm, dead = w["calm"], w["dead"]
    assert _max(calm) < 0.25 < min(b["max_psi"] for b in dead)  # the traffic is as described
    view = drift_view(f.fleet, MODEL, HOUR)
    b0, b2 = view["buckets"][0], view["buckets"][2]
    assert [d["device"] for d in b0["devices"]] == ["jet-1", "pi-1", "pi-2", "zero-1"]
    assert b0["max_psi"] == _max(calm) and b0["mean_psi"] == pytest.approx(_max(calm))
    assert (b0["windows"], b0["predictions"]) == (13, 13 * 180)  # 4 devices x 3, and old
    assert [d["device"] for d in b2["devices"]] == ["pi-2"]
    assert b2["max_psi"] == b2["mean_psi"] == _max(dead) and b2["windows"] == 3
    assert view["buckets"][1]["max_psi"] is None and view["buckets"][1]["devices"] == []

    f18 = {x["feature"]: x for x in b2["features"]}[18]
    assert f18["psi_max"] == max(_feature(b, 18)["psi"] for b in dead)
    assert f18["js_max"] == max(_feature(b, 18)["js"] for b in dead)
    assert (f18["samples"], f18["devices"]) == (540, 1)
    b0_18 = {x["feature"]: x for x in b0["features"]}[18]
    per_device = max(_feature(b, 18)["psi"] for b in calm)  # every device saw the same
    assert b0_18["psi_max"] == per_device and b0_18["psi_mean"] == pytest.approx(per_device)

    rows = {d["device"]: d for d in view["devices"]}
    pi2 = rows["pi-2"]
    assert (pi2["windows"], pi2["predictions"], pi2["trend"]) == (6, 1080, "rising")
    assert (pi2["first_max_psi"], pi2["latest_max_psi"], pi2["peak_max_psi"]) == (
        calm[0]["max_psi"], dead[-1]["max_psi"], _max(dead))
    assert pi2["series"] == [_max(calm), None, _max(dead), None, None, None, None]
    assert {t["feature"] for t in pi2["top_features"]} <= DEAD_BLOCK
    assert len(pi2["top_features"]) == 3 and pi2["latest_at"] == START + 1300
    assert rows["pi-1"]["trend"] == "steady" and rows["pi-1"]["windows"] == 4


def test_drift_view_filters(drifting: tuple[Fleetlet, dict[str, Any]]) -> None:
    f, w = drifting
    one = drift_view(f.fleet, MODEL, HOUR, device="pi-2", input_name="input", feature=26)
    assert [d["device"] for d in one["devices"]] == ["pi-2"]
    assert all(x["feature"] == 26 for b in one["buckets"] for x in b["features"])
    assert one["buckets"][2]["features"][0]["psi_max"] == max(
        _feature(b, 26)["psi"] for b in w["dead"])
    assert [t["feature"] for t in one["devices"][0]["top_features"]] == [26]
    assert drift_view(f.fleet, MODEL, HOUR, version="2.0.0")["devices"] == []
    with pytest.raises(NotFound, match="device 'pi-9'"):
        drift_view(f.fleet, MODEL, HOUR, device="pi-9")


def test_distribution_pools_live_counts_against_the_reference(
        drifting: tuple[Fleetlet, dict[str, Any]], digits: Digits) -> None:
    f, _ = drifting
    view = distribution_view(f.fleet, MODEL, HOUR, version="1.0.0", feature=18)
    ref = digits.baseline["inputs"]["input"]["features"][18]
    # jet-1's artifact bins feature 18 differently: its windows are not pooled; the reference
    # is that of the profiles most windows share
    assert (view["input"], view["kind"], view["profile"]) == ("input", "tabular", "rpi-zero2w")
    assert view["profiles"] == ["rpi-zero2w", "rpi4"]
    assert (view["edges"], view["reference"]) == (ref["edges"], ref["ref"])
    # pi-1, zero-1 and pi-2 each served the eval split once as it is, pi-2 once shifted
    edges = ref["edges"]
    live = (3 * bin_counts(digits.x_eval[:, 18], edges)
            + bin_counts(shifted(digits.x_eval, "dead")[:, 18], edges))
    assert view["live_counts"] == live.tolist() and view["samples"] == 4 * 540
    assert view["live"] == pytest.approx((live / live.sum()).tolist())
    assert (view["windows"], view["windows_without_counts"], view["devices"]) == (13, 1, 3)
    assert view["psi"] == pytest.approx(psi(ref["ref"], live), rel=1e-5)
    assert view["js"] == pytest.approx(js_divergence(ref["ref"], live), rel=1e-5)

    jet = distribution_view(f.fleet, MODEL, HOUR, version="1.0.0", feature=18,
                            profile="jetson-orin-nano")
    assert jet["profiles"] == ["jetson-orin-nano"] and jet["devices"] == 1
    assert jet["live_counts"] == bin_counts(digits.x_eval[:, 18], jet["edges"]).tolist()
    assert jet["psi"] == pytest.approx(psi(jet["reference"], jet["live_counts"]), rel=1e-5)
    # nothing arrived for 2.0.0: the reference alone
    empty = distribution_view(f.fleet, MODEL, HOUR, version="2.0.0", feature=0)
    assert (empty["live_counts"], empty["psi"], empty["samples"]) == (None, None, 0)


BAD_DISTRIBUTIONS = [
    ("unknown-version", {"version": "9.9.9"}, NotFound, "version '9.9.9' not found"),
    ("unknown-profile", {"profile": "rpi5"}, NotFound, "no artifact for profile 'rpi5'"),
    ("unknown-input", {"input_name": "pixels"}, InvalidInput,
     r"input: expected one of \['input'\], got 'pixels'"),
    ("unknown-feature", {"feature": 64}, InvalidInput,
     r"feature: expected a feature index of input 'input' \(0..63\), got 64"),
]


@pytest.mark.parametrize(("name", "args", "error", "match"), BAD_DISTRIBUTIONS,
                         ids=[r[0] for r in BAD_DISTRIBUTIONS])
def test_bad_distribution_queries(drifting: tuple[Fleetlet, dict[str, Any]], name: str,
                                  args: dict[str, Any], error: type[Exception],
                                  match: str) -> None:
    f, _ = drifting
    with pytest.raises(error, match=match):
        distribution_view(f.fleet, MODEL, HOUR, **{"version": "1.0.0", **args})


# ------------------------------------------------------------------------------- pure parts
RANGES = [
    ("defaults", {}, (START - 3600, START, 60)),
    ("a day picks 30 min", {"since": START - 86400}, (START - 86400, START, 1800)),
    ("explicit", {"since": START - 100, "until": START - 50, "bucket_s": 7},
     (START - 100, START - 50, 7)),
]


@pytest.mark.parametrize(("name", "args", "expected"), RANGES, ids=[r[0] for r in RANGES])
def test_time_ranges(name: str, args: dict[str, Any], expected: tuple[int, int, int]) -> None:
    rng = TimeRange.make(START, **args)
    assert (rng.since, rng.until, rng.bucket_s) == expected
    assert rng.count == len(rng.starts()) <= 61


BAD_RANGES = [
    ("since-after-until", {"since": START, "until": START - 1},
     "since: expected a time before until"),
    ("too-many-buckets", {"since": START - 86400, "bucket_s": 60},
     "at most 1000 buckets over 86400 s, got 1441 of 60 s .use a bucket of at least 87 s."),
    ("zero-bucket", {"bucket_s": 0}, "bucket: expected seconds >= 1, got 0"),
]


@pytest.mark.parametrize(("name", "args", "match"), BAD_RANGES, ids=[r[0] for r in BAD_RANGES])
def test_bad_time_ranges(name: str, args: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        TimeRange.make(START, **args)


def test_the_servers_psi_and_js_are_the_devices() -> None:
    rng = np.random.default_rng(11)
    for bins in (2, 5, 10):
        for _ in range(20):
            ref = rng.dirichlet(np.ones(bins))
            live = rng.integers(0, 50, bins)
            live[rng.integers(0, bins)] += 1  # never all zero
            assert distance.psi(ref.tolist(), live.tolist()) == pytest.approx(
                psi(ref, live), rel=1e-12, abs=1e-15)
            assert distance.js_divergence(ref.tolist(), live.tolist()) == pytest.approx(
                js_divergence(ref, live), rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="expected 3 bins like the reference, got 2"):
        distance.psi([1, 1, 1], [1, 1])
    with pytest.raises(ValueError, match="expected a positive total"):
        distance.js_divergence([1, 1], [0, 0])


# ------------------------------------------------------------------------------- the API
@pytest.fixture
def api(served: Fleetlet) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with atomic(served.fleet.engine) as conn:
        _, reader = auth.create_token(conn, name="grafana", scope="reader", now=START)
    app = create_app(served.settings, clock=served.clock, fleet=served.fleet)
    with TestClient(app) as client:
        yield client, {"Authorization": f"Bearer {reader}"}


def test_the_api_serves_the_same_views(served: Fleetlet,
                                       api: tuple[TestClient, dict[str, str]]) -> None:
    client, reader = api
    served.clock.now = START + 3600  # the default range is the last hour
    span = {"since": START, "until": START + 3600, "bucket": 600}
    got = client.get(f"/v1/monitoring/models/{MODEL}", params=span, headers=reader)
    assert got.status_code == 200, got.text
    assert got.json() == json.loads(json.dumps(model_view(served.fleet, MODEL, HOUR)))
    fleet = client.get("/v1/monitoring/fleet", params={"bucket": 600}, headers=reader).json()
    assert fleet == json.loads(json.dumps(fleet_view(served.fleet, HOUR)))
    device = client.get("/v1/monitoring/devices/pi-1", params=span, headers=reader).json()
    assert device["totals"]["requests"] == 160
    drift = client.get(f"/v1/monitoring/models/{MODEL}/drift", headers=reader,
                       params={**span, "device": "pi-2"}).json()
    assert [d["device"] for d in drift["devices"]] == []  # pi-2's one summary is malformed
    dist = client.get(f"/v1/monitoring/models/{MODEL}/distribution", headers=reader,
                      params={"version": "1.0.0", "feature": 3}).json()
    assert dist["feature"] == 3 and dist["samples"] == 0

    for path, params, status, words in [
            (f"/v1/monitoring/models/{MODEL}", {"bucket": 1}, 422, "at most 1000 buckets"),
            ("/v1/monitoring/models/nope", {}, 404, "model 'nope' not found"),
            ("/v1/monitoring/devices/pi-9", {}, 404, "device 'pi-9' not found"),
            (f"/v1/monitoring/models/{MODEL}/distribution", {}, 422, "query.version"),
            (f"/v1/monitoring/models/{MODEL}/drift", {"feature": -1}, 422, "query.feature"),
            ("/v1/monitoring/fleet", {"window": 5}, 422, "query.window: expected no such")]:
        r = client.get(path, params=params, headers=reader)
        assert (r.status_code, words in r.json()["detail"]) == (status, True), r.text
    assert client.get("/v1/monitoring/fleet").status_code == 401

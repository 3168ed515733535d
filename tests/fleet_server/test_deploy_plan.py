"""Pure cores of the rollout shell, as named tables (STYLE rules 1, 16):

* :func:`fleet_server.deploy.plan.compute_desired` with rollout-backed deployments: a rollout's
  per-device map decides only for the devices it names; the rest keep what older deployments
  say;
* :func:`fleet_server.rollout.health.aggregate`: metrics and drift bodies -> one device's
  health on one model version.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from agent.drift.summary import DRIFT_SUMMARY_KIND
from agent.metrics import METRICS_KIND, RequestMetrics
from fleet_server.deploy.plan import (
    ArtifactView,
    DeploymentView,
    DeviceView,
    Selector,
    compute_desired,
)
from fleet_server.rollout.health import DRIFT_KIND, Health, aggregate

DEVICES = (DeviceView("a", "rpi4", frozenset({"lab"})), DeviceView("b", "rpi4"),
           DeviceView("c", "x86-generic"))
ALL = Selector(all=True)


def _artifacts(*keys: tuple[str, str, str]) -> dict[tuple[str, str, str], ArtifactView]:
    return {k: ArtifactView(k[0], k[1], k[2], "0" * 64, 1, f"models/{'/'.join(k)}/model.onnx",
                            f"models/{'/'.join(k)}/manifest.json") for k in keys}


ARTIFACTS = _artifacts(*[("m", v, p) for v in ("1", "2", "3") for p in ("rpi4", "x86-generic")],
                       ("n", "1", "rpi4"), ("m", "0", "rpi4"))


def dep(id_: int, version: str, selector: Selector = ALL, model: str = "m",
        rollout: Mapping[str, str | None] | None = None) -> DeploymentView:
    return DeploymentView(id_, model, version, selector, rollout=rollout)


DESIRED_ROWS: list[tuple[str, list[DeploymentView], dict[str, dict[str, str]]]] = [
    # (id, deployments, expected device -> {model: version})
    ("plain-newest-wins", [dep(1, "1"), dep(2, "2", Selector(tags=("lab",)))],
     {"a": {"m": "2"}, "b": {"m": "1"}, "c": {"m": "1"}}),
    ("rollout-moves-only-its-devices", [dep(1, "1"), dep(2, "2", rollout={"a": "2"})],
     {"a": {"m": "2"}, "b": {"m": "1"}, "c": {"m": "1"}}),
    ("rollout-not-started-changes-nothing", [dep(1, "1"), dep(2, "2", rollout={})],
     {"a": {"m": "1"}, "b": {"m": "1"}, "c": {"m": "1"}}),
    ("rollout-ignores-its-selector", [dep(1, "1"), dep(2, "2", Selector(devices=("a",)),
                                                      rollout={"b": "2"})],
     {"a": {"m": "1"}, "b": {"m": "2"}, "c": {"m": "1"}}),
    ("reverted-device-gets-its-previous-version", [dep(1, "1"),
                                                   dep(2, "2", rollout={"a": "0", "b": "2"})],
     {"a": {"m": "0"}, "b": {"m": "2"}, "c": {"m": "1"}}),
    ("reverted-to-nothing-falls-through", [dep(1, "1"), dep(2, "2", rollout={"a": None})],
     {"a": {"m": "1"}, "b": {"m": "1"}, "c": {"m": "1"}}),
    ("reverted-to-nothing-without-older", [dep(2, "2", rollout={"a": None, "b": "2"})],
     {"a": {}, "b": {"m": "2"}, "c": {}}),
    ("missing-artifact-falls-through", [dep(1, "1"), dep(2, "2", rollout={"c": "0"})],
     {"a": {"m": "1"}, "b": {"m": "1"}, "c": {"m": "1"}}),
    ("superseded-rollout-holds-until-newer-moves",
     [dep(1, "1"), dep(2, "2", rollout={"a": "2", "b": "2"}), dep(3, "3", rollout={"b": "3"})],
     {"a": {"m": "2"}, "b": {"m": "3"}, "c": {"m": "1"}}),
    ("plain-newer-overrides-rollout", [dep(2, "2", rollout={"a": "2"}), dep(3, "3")],
     {"a": {"m": "3"}, "b": {"m": "3"}, "c": {"m": "3"}}),
    ("other-models-untouched", [dep(1, "1", Selector(profiles=("rpi4",)), model="n"),
                                dep(2, "2", rollout={"a": "2"})],
     {"a": {"m": "2", "n": "1"}, "b": {"n": "1"}, "c": {}}),
]


@pytest.mark.parametrize(("deployments", "expected"), [r[1:] for r in DESIRED_ROWS],
                         ids=[r[0] for r in DESIRED_ROWS])
def test_compute_desired_with_rollouts(deployments: list[DeploymentView],
                                       expected: dict[str, dict[str, str]]) -> None:
    out = compute_desired(DEVICES, deployments, ARTIFACTS)
    got = {d: {m.name: m.version for m in models} for d, models in out.items()}
    assert got == expected
    for device in DEVICES:  # each device gets its own profile's artifact
        assert all(m.profile == device.profile for m in out[device.id])


# ------------------------------------------------------------------------------ health
def _metrics(latencies: list[float], errors: int = 0, version: str = "2",
             model: str = "m") -> tuple[str, dict[str, Any]]:
    metrics = RequestMetrics(start=0.0)
    for ms in latencies:
        metrics.observe(model, version, ms, True)
    for _ in range(errors):
        metrics.observe(model, version, 0.0, False, "runtime")
    [body] = metrics.flush(10.0)
    return METRICS_KIND, body


def _drift(max_psi: float, predictions: int, version: str = "2") -> tuple[str, dict[str, Any]]:
    return DRIFT_KIND, {"version": 1, "model": "m", "model_version": version,
                        "window": {"start": 0.0, "end": 1.0, "predictions": predictions},
                        "max_psi": max_psi, "alerts": 0}


HEALTH_ROWS: list[tuple[str, list[tuple[str, Any]], Health]] = [
    ("nothing", [], Health()),
    ("one-interval", [_metrics([5.0] * 95 + [40.0] * 5)],
     Health(requests=100, errors=0, p95_ms=5.0)),
    # rank 95 of 100 lands in the (20, 50] bucket, clamped to the largest seen (40):
    # 20 + (40 - 20) * 45 / 50
    ("intervals-merge-their-histograms", [_metrics([5.0] * 50), _metrics([40.0] * 50, 10)],
     Health(requests=110, errors=10, p95_ms=38.0)),
    ("other-version-and-model-skipped", [_metrics([5.0] * 10), _metrics([90.0] * 10, 3, "1"),
                                         _metrics([90.0] * 10, model="n")],
     Health(requests=10, errors=0, p95_ms=5.0)),
    ("drift-takes-the-worst-window", [_drift(0.1, 300), _drift(0.4, 200), _drift(0.9, 50, "1")],
     Health(max_psi=0.4, samples=500)),
    ("malformed-bodies-skipped", [(METRICS_KIND, {"model": "m", "model_version": "2",
                                                  "count": -1, "ok": 0}),
                                  (METRICS_KIND, {"model": "m", "model_version": "2",
                                                  "count": 3, "ok": 5}),
                                  (DRIFT_KIND, {"model": "m", "model_version": "2",
                                                "max_psi": "high"}),
                                  ("metrics", {"model": "m", "model_version": "2", "count": 9,
                                               "ok": 9})],
     Health()),
    ("unmergeable-edges-keep-the-worst-p95", [
        _metrics([5.0] * 20),
        (METRICS_KIND, {"model": "m", "model_version": "2", "count": 10, "ok": 10,
                        "latency_ms": {"edges": [1.0, 100.0], "counts": [0, 10, 0],
                                       "min": 70.0, "max": 80.0, "p95": 79.5}})],
     Health(requests=30, errors=0, p95_ms=79.5)),
]


@pytest.mark.parametrize(("bodies", "expected"), [r[1:] for r in HEALTH_ROWS],
                         ids=[r[0] for r in HEALTH_ROWS])
def test_health_aggregate(bodies: list[tuple[str, Any]], expected: Health) -> None:
    assert aggregate("m", "2", bodies) == expected


def test_the_record_kinds_are_the_agents() -> None:
    assert DRIFT_KIND == DRIFT_SUMMARY_KIND

"""``scripts/demo_lib.py``: the lines the demo prints, from real planner states and real drift
summaries, and the failing build it makes.

The demo itself runs minutes of real processes (``make demo``) and is not run here; what it
prints about rollouts and drift comes from the pure helpers below, fed by the same code that
produces those answers on the server and the devices:

- :func:`rollout_line` over :func:`fleet_server.rollout.summary` of states the real planner
  reaches (a canary wave baking, health gates waiting then passing, completion, a rollback);
- :func:`show_server_drift` over a real fleet database holding drift summaries made by the
  agent's :class:`~agent.drift.summary.DriftMonitor` and stored by the server's ingest;
- :func:`failing_copy` against the agent's own health check.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from demo_lib import (
    DriftWindow,
    drift_line,
    failing_copy,
    parse_drift_body,
    rollout_line,
    show_server_drift,
)

from agent.drift.summary import DRIFT_SUMMARY_KIND, DriftMonitor
from agent.errors import HealthCheckFailed
from agent.protocol.manifest import Manifest
from agent.protocol.messages import DriftBatch, Record
from agent.protocol.topics import device_topic
from agent.updater.health import RuntimeHealthChecker
from fleet_server import auth
from fleet_server.db import atomic
from fleet_server.fleet import init_data_dir, open_fleet
from fleet_server.ingest import handle_message
from fleet_server.registry import devices
from fleet_server.rollout import (
    DeviceReport,
    Gates,
    RolloutSpec,
    RolloutState,
    plan,
    summary,
)
from fleet_server.settings import Settings
from model_tools.baseline import compute_baseline
from model_tools.examples import ExampleModel
from model_tools.examples.digits import shifted

NOW = 1_800_000_000
OLD, NEW = "1.0.0", "2.0.0"
FLEET = ["pi-1", "pi-2", "pi-3", "zero-1", "zero-2"]


# ------------------------------------------------------------------------------ rollout_line
def body(spec: RolloutSpec, state: RolloutState, reports: Sequence[DeviceReport]
         ) -> dict[str, Any]:
    """What ``GET /v1/rollouts/{id}`` answers: the planner's summary plus the wave count and
    each wave's target (``fleet_server.deploy.rollouts._view``), through JSON."""
    out = summary(state, reports)
    for wave in out["waves"]:
        wave["target"] = spec.waves[wave["index"]].to_text()
    out["wave_count"] = len(spec.waves)
    parsed: dict[str, Any] = json.loads(json.dumps(out))
    return parsed


def reports(state: RolloutState, how: dict[str, dict[str, Any]]) -> list[DeviceReport]:
    """Every device's report: the assigned ones as ``how[device]`` says (default: updating),
    the others still on OLD."""
    out = []
    for device_id in FLEET:
        fields: dict[str, Any] = {"profile": "rpi4", "latency_budget_ms": 50.0, "online": True,
                                  "running_version": OLD, "applied_sequence": 1,
                                  "last_result": "ok"}
        if state.assignment(device_id) is not None:
            fields.update(desired_sequence=2, **how.get(device_id, {}))
        out.append(DeviceReport(device_id, **fields))
    return out


COMMITTED = {"running_version": NEW, "applied_sequence": 2}
HEALTHY = {**COMMITTED, "requests": 25, "errors": 0, "p95_ms": 2.5}
ROLLED_BACK = {"applied_sequence": 2, "last_result": "rolled_back",
               "last_error": "HealthCheckFailed: health check of digits 2.0.0: ..."}


def test_rollout_line_follows_a_staged_rollout_to_completion() -> None:
    spec = RolloutSpec.parse("20%,100%", Gates(min_committed=1.0, max_failed=0.0, bake_s=3,
                                               max_error_rate=0.01, min_samples=20), "pause")
    state = RolloutState("2", "digits", NEW)
    lines = []

    def step(at: int, how: dict[str, dict[str, Any]]) -> None:
        nonlocal state
        now = reports(state, how)
        state, _ = plan(spec, state, FLEET, now, NOW + at)
        lines.append(rollout_line(body(spec, state, reports(state, how))))

    step(0, {})
    canary = state.assignments[0].device_id
    step(1, {canary: COMMITTED})
    step(3, {canary: COMMITTED})
    step(4, {canary: HEALTHY})
    step(5, dict.fromkeys(FLEET, HEALTHY))
    step(8, dict.fromkeys(FLEET, HEALTHY))
    assert lines == [
        ("wave 1/2 (20%): 1 moved, 1 pending | baking 0s of 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        ("wave 1/2 (20%): 1 moved, 1 committed | baking 1s of 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        ("wave 1/2 (20%): 1 moved, 1 committed | baked 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        # the canary's health passed its gates: the next wave takes everyone else
        ("wave 2/2 (all): 5 moved, 1 committed, 4 pending | baking 0s of 3s, error rate waits "
         "for samples, p95 ms waits for samples"),
        ("wave 2/2 (all): 5 moved, 5 committed | baking 1s of 3s, error rate 0 "
         "(limit 0.01) judged after the bake, p95 ms 2.5 (limit 50) judged after the bake"),
        ("completed: 5 moved, 5 committed | baked 3s, error rate 0 (limit 0.01) ok, p95 ms 2.5 "
         "(limit 50) ok"),
    ]


def test_rollout_line_says_why_a_rollout_rolled_back() -> None:
    spec = RolloutSpec.parse("20%,100%", Gates(min_committed=1.0, max_failed=0.0, bake_s=3),
                             "rollback")
    state, _ = plan(spec, RolloutState("3", "digits", NEW), FLEET,
                    reports(RolloutState("3", "digits", NEW), {}), NOW)
    canary = state.assignments[0].device_id
    state, _ = plan(spec, state, FLEET, reports(state, {canary: ROLLED_BACK}), NOW + 1)
    assert state.status == "rolled_back"
    line = rollout_line(body(spec, state, reports(state, {canary: ROLLED_BACK})))
    assert line == "rolled_back: 1 moved, 1 failed | wave 0 gate failed: 1 of 1 devices failed"


def test_rollout_line_shows_a_failing_gate_of_a_running_wave() -> None:
    rollout = {"status": "running", "wave": 0, "wave_count": 2,
               "waves": [{"index": 0, "target": "20%", "assigned": 1, "committed": 1}],
               "gates": [{"wave": 0, "gate": "p95_ms", "value": 80.0, "limit": 50.0,
                          "ok": False, "detail": "worst pi-3: 80 against 50"}]}
    assert rollout_line(rollout) == ("wave 1/2 (20%): 1 moved, 1 committed | p95 ms 80 "
                                     "(limit 50) FAILED")


# ------------------------------------------------------------------------------ drift
@pytest.fixture
def drift_windows(digits_mlp: ExampleModel) -> dict[str, list[dict[str, Any]]]:
    """Real drift summaries of the digits MLP: two windows per device, normal digits on pi-1,
    digits whose central pixels are dead on pi-2 (the demo's drift)."""
    session = ort.InferenceSession(str(digits_mlp.onnx_path),
                                   providers=["CPUExecutionProvider"])

    def outputs(x: np.ndarray) -> dict[str, np.ndarray]:
        label, probabilities = session.run(["label", "probabilities"], {"input": x})
        return {"label": label, "probabilities": probabilities}

    with np.load(digits_mlp.calibration_path) as cal, np.load(digits_mlp.eval_path) as ev:
        x_cal = cal["input"].astype(np.float32)
        x_eval = ev["input"].astype(np.float32)
    baseline = compute_baseline({"input": x_cal}, outputs(x_cal), task="classification",
                                source="calibration")
    out: dict[str, list[dict[str, Any]]] = {}
    for device_id, x in (("pi-1", x_eval), ("pi-2", shifted(x_eval, "dead"))):
        monitor = DriftMonitor(baseline, window=250, window_s=3600.0, model="digits",
                               version=NEW)
        bodies = []
        for start in range(0, 500, 50):
            part = x[start:start + 50]
            closed = monitor.observe({"input": part}, outputs(part), NOW + start)
            if closed is not None:
                bodies.append(closed.to_body())
        out[device_id] = bodies
    return out


@pytest.mark.slow
def test_show_server_drift_prints_what_the_devices_sent(
        tmp_path: Path, drift_windows: dict[str, list[dict[str, Any]]],
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=tmp_path / "server")
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    admin = auth.Principal("t", "test", "admin")
    with atomic(fleet.engine) as conn:
        for device_id in ("pi-1", "pi-2", "pi-3"):
            devices.provision(fleet, conn, device_id=device_id, profile="rpi4", tags=[],
                              actor=admin)
    other = {**drift_windows["pi-2"][0], "model": "another-model"}
    stale = {**drift_windows["pi-2"][0], "model_version": OLD}
    sent = {"pi-1": drift_windows["pi-1"],
            "pi-2": [other, stale, {"window": "not an object"}, *drift_windows["pi-2"]]}
    for device_id, bodies in sent.items():
        batch = DriftBatch(device_id=device_id, records=tuple(
            Record(seq=i, kind=DRIFT_SUMMARY_KIND, at=NOW, body=b)
            for i, b in enumerate(bodies, 1)))
        result = handle_message(fleet, device_topic(device_id, "drift"), batch.to_bytes(),
                                now=NOW)
        assert result.stored == len(bodies)
    fleet.engine.dispose()

    found = show_server_drift(settings.data_dir, "digits", NEW, ["pi-1", "pi-2", "pi-3"])

    # only this model and version, oldest first, exactly the numbers the devices computed
    assert {d: [w.max_psi for w in ws] for d, ws in found.items()} == {
        "pi-1": [b["max_psi"] for b in drift_windows["pi-1"]],
        "pi-2": [b["max_psi"] for b in drift_windows["pi-2"]],
        "pi-3": []}
    assert all(w.max_psi <= w.threshold for w in found["pi-1"])
    assert all(w.max_psi > w.threshold for w in found["pi-2"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-3:] == [f"  -> {drift_line(d, found[d])}" for d in ("pi-1", "pi-2", "pi-3")]
    assert "ALERT" in printed[-2] and "ok: " in printed[-3]
    assert printed[-1] == "  -> pi-3: no drift window yet"


def test_drift_line_marks_windows_since_and_judges_the_latest() -> None:
    def window(psi: float, end: float, alerts: int = 0) -> DriftWindow:
        return DriftWindow(device_id="pi-2", version=NEW, end=end, predictions=400,
                           max_psi=psi, alerts=alerts, threshold=0.25)

    windows = [window(0.1191, 10.0), window(8.0961, 20.0, 16), window(8.1, 30.0, 16)]
    assert drift_line("pi-2", windows, since=15.0) == (
        "pi-2: 3 window(s) of 2.0.0, max PSI each: 0.119, 8.1*, 8.1* -> ALERT: 8.1 > 0.25 on "
        "16 input feature(s)")
    assert drift_line("pi-1", windows[:1]) == (
        "pi-1: 1 window(s) of 2.0.0, max PSI each: 0.119 -> ok: 0.119 <= 0.25")


@pytest.mark.parametrize("raw", [
    "not json", "[]", json.dumps({"model": "digits"}),
    json.dumps({"model": "digits", "model_version": NEW, "window": {"end": 1},
                "max_psi": 0.1, "threshold": 0.25}),  # no predictions
    json.dumps({"model": "digits", "model_version": NEW,
                "window": {"end": 1, "predictions": 4}, "max_psi": "high", "threshold": 0.25}),
])
def test_parse_drift_body_skips_malformed_bodies(raw: str) -> None:
    assert parse_drift_body("pi-1", raw, "digits") is None


# ------------------------------------------------------------------------------ failing_copy
@pytest.mark.slow
def test_failing_copy_fails_the_device_health_check_and_leaves_the_source(
        tmp_path: Path) -> None:
    from fleet_server.simulate import build_bundles
    from model_tools.profiles import get_profile

    src = build_bundles(tmp_path / "bundles", ("rpi4",))["rpi4"]
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dst = tmp_path / "digits-3.0.0-rpi4"
    assert failing_copy(src, dst, "3.0.0") == ["probabilities"]

    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (dst / "model.onnx").read_bytes() == before["model.onnx"]
    checker = RuntimeHealthChecker(get_profile("rpi4"), latency_runs=1, warmup=0)
    good = Manifest.from_bytes(before["manifest.json"])
    assert checker.check(good, src / "model.onnx").max_abs_error <= good.golden.atol
    bad = Manifest.from_bytes((dst / "manifest.json").read_bytes())
    assert (bad.name, bad.version, bad.file) == (good.name, "3.0.0", good.file)
    with pytest.raises(HealthCheckFailed, match=r"digits 3\.0\.0: output 'probabilities'"):
        checker.check(bad, dst / "model.onnx")


def test_failing_copy_refuses_a_bundle_without_float_golden_outputs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "manifest.json").write_text(json.dumps({
        "model": {"name": "digits", "version": OLD},
        "golden": {"outputs": {"label": {"dtype": "int64", "shape": [1], "b64": "AAAAAAAAAAA="}}},
    }), encoding="utf-8")
    with pytest.raises(ValueError, match=r"expected a float32 golden output, got \['label'\]"):
        failing_copy(src, tmp_path / "dst", "3.0.0")
    assert not (tmp_path / "dst").exists()

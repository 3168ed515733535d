"""``scripts/demo_lib.py``: the lines the demo prints, from real planner states and real drift
summaries, and the failing build it makes.

The demo itself runs minutes of real processes (``make demo``) and is not run here; what it
prints about rollouts and drift comes from the pure helpers below, fed by the same code that
produces those answers on the server and the devices:

- :func:`rollout_line` over :func:`fleet_server.rollout.summary` of states the real planner
  reaches (a canary wave baking, health gates waiting then passing, completion, a rollback);
- :func:`drift_windows` and :func:`alert_devices` over the admin API's answers (the drift view
  with 1 s buckets, the alert list) about drift summaries made by the agent's
  :class:`~agent.drift.summary.DriftMonitor`, stored by the server's ingest and judged by the
  server's alert evaluation;
- :func:`http_answer` against a loopback HTTP server that redirects as the dashboard does;
- :func:`failing_copy` against the agent's own health check.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from demo_lib import (
    alert_devices,
    drift_line,
    drift_windows,
    failing_copy,
    http_answer,
    rollout_line,
)

from agent.drift.summary import DRIFT_SUMMARY_KIND, DriftMonitor
from agent.errors import HealthCheckFailed
from agent.protocol.manifest import Manifest
from agent.protocol.messages import DriftBatch, Record
from agent.protocol.topics import device_topic
from agent.updater.health import RuntimeHealthChecker
from fleet_server import auth
from fleet_server.api import create_app
from fleet_server.db import atomic
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.ingest import handle_message
from fleet_server.monitoring import AlertRule, create_rule, evaluate_alerts
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
    step(2, {canary: COMMITTED})
    step(4, {canary: COMMITTED})
    step(5, {canary: HEALTHY})
    step(6, dict.fromkeys(FLEET, HEALTHY))
    step(7, dict.fromkeys(FLEET, HEALTHY))
    step(9, dict.fromkeys(FLEET, HEALTHY))
    assert lines == [
        ("wave 1/2 (20%): 1 moved, 1 pending | baking 0s of 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        # committed now: the bake counts from the wave's last commit
        ("wave 1/2 (20%): 1 moved, 1 committed | baking 0s of 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        ("wave 1/2 (20%): 1 moved, 1 committed | baking 1s of 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        ("wave 1/2 (20%): 1 moved, 1 committed | baked 3s, error rate waits for samples, "
         "p95 ms waits for samples"),
        # the canary's health passed its gates: the next wave takes everyone else
        ("wave 2/2 (all): 5 moved, 1 committed, 4 pending | baking 0s of 3s, error rate waits "
         "for samples, p95 ms waits for samples"),
        ("wave 2/2 (all): 5 moved, 5 committed | baking 0s of 3s, error rate 0 "
         "(limit 0.01) judged after the bake, p95 ms 2.5 (limit 50) judged after the bake"),
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
def drift_bodies(digits_mlp: ExampleModel) -> dict[str, list[dict[str, Any]]]:
    """Real drift summaries of the digits MLP: two windows per device, normal digits on pi-1,
    normal then digits whose central pixels are dead on pi-2 (the demo's drift)."""
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
    x_drifted = np.concatenate([x_eval[:250], shifted(x_eval[250:], "dead")])
    out: dict[str, list[dict[str, Any]]] = {}
    for device_id, x in (("pi-1", x_eval), ("pi-2", x_drifted)):
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


#: an admin API client, its headers, and the fleet behind it
Served = tuple[TestClient, dict[str, str], Fleet]


@pytest.fixture
def served_drift(tmp_path: Path, drift_bodies: dict[str, list[dict[str, Any]]]
                 ) -> Iterator[Served]:
    """A real fleet whose ingest received ``drift_bodies``: pi-1's and pi-2's first windows at
    NOW + 10, their second at NOW + 11 (one second apart, as the demo feeds them), and
    another model's and another version's windows from pi-2 in between; an admin API on it."""
    settings = Settings(data_dir=tmp_path / "server")
    clock = lambda: NOW + 30  # noqa: E731
    init_data_dir(settings, clock=clock)
    fleet = open_fleet(settings, clock=clock)
    admin = auth.Principal("t", "test", "admin")
    with atomic(fleet.engine) as conn:
        for device_id in ("pi-1", "pi-2", "pi-3"):
            devices.provision(fleet, conn, device_id=device_id, profile="rpi4", tags=[],
                              actor=admin)
        _, token = auth.create_token(conn, name="demo", scope="admin", now=NOW)
    dead = drift_bodies["pi-2"][1]
    sent = [(10, "pi-1", [drift_bodies["pi-1"][0]]), (10, "pi-2", [drift_bodies["pi-2"][0]]),
            (11, "pi-2", [{**dead, "model": "another-model"}, {**dead, "model_version": OLD},
                          {"window": "not an object"}]),
            (11, "pi-1", [drift_bodies["pi-1"][1]]), (11, "pi-2", [dead])]
    seqs = dict.fromkeys(FLEET, 0)
    for at, device_id, bodies in sent:
        records = []
        for b in bodies:
            seqs[device_id] += 1
            records.append(Record(seq=seqs[device_id], kind=DRIFT_SUMMARY_KIND, at=NOW, body=b))
        batch = DriftBatch(device_id=device_id, records=tuple(records))
        result = handle_message(fleet, device_topic(device_id, "drift"), batch.to_bytes(),
                                now=NOW + at)
        assert result.stored == len(bodies)
    with TestClient(create_app(settings, clock=clock, fleet=fleet)) as client:
        yield client, {"Authorization": f"Bearer {token}"}, fleet
    fleet.engine.dispose()


def _drift_view(client: TestClient, headers: dict[str, str], **params: int) -> dict[str, Any]:
    """What ``FleetClient.monitor_drift("digits", version=NEW, **params)`` returns."""
    got = client.get("/v1/monitoring/models/digits/drift", headers=headers,
                     params={"version": NEW, **params})
    assert got.status_code == 200, got.text
    view: dict[str, Any] = got.json()
    return view


@pytest.mark.slow
def test_drift_windows_reads_each_window_from_the_servers_view(
        served_drift: Served, drift_bodies: dict[str, list[dict[str, Any]]]) -> None:
    client, headers, _ = served_drift
    view = _drift_view(client, headers, since=NOW, bucket=1)

    # exactly the numbers the devices computed, oldest first; only this model and version
    found = {d: drift_windows(view, d) for d in ("pi-1", "pi-2", "pi-3")}
    assert found == {d: [b["max_psi"] for b in drift_bodies.get(d, [])]
                     for d in ("pi-1", "pi-2", "pi-3")}
    assert all(v <= 0.25 for v in found["pi-1"])
    assert found["pi-2"][0] <= 0.25 < found["pi-2"][1]
    rows = {d["device"]: d for d in view["devices"]}
    assert (rows["pi-2"]["first_max_psi"], rows["pi-2"]["latest_max_psi"]) == (
        pytest.approx(found["pi-2"][0]), pytest.approx(found["pi-2"][1]))

    # since is exclusive: what the server received in that very second is left out (the demo
    # waits for the next second before feeding what it wants to see apart)
    later = _drift_view(client, headers, since=NOW + 10, bucket=1)
    assert {d: drift_windows(later, d) for d in ("pi-1", "pi-2")} == {
        d: [found[d][1]] for d in ("pi-1", "pi-2")}

    # a bucket folding two windows shows only the larger: refused, not passed off as both
    coarse = _drift_view(client, headers, since=NOW, bucket=60)
    with pytest.raises(ValueError, match=r"expected at most one window of pi-2, got 2"):
        drift_windows(coarse, "pi-2")


@pytest.mark.slow
def test_alert_devices_names_who_a_real_drift_alert_is_about(
        served_drift: Served) -> None:
    client, headers, fleet = served_drift
    # the demo's rule (its model is not pushed here, which the API's route would require)
    with atomic(fleet.engine) as conn:
        create_rule(conn, AlertRule(id=0, model="digits", kind="drift_psi", threshold=0.25,
                                    min_devices=1, window_s=300, min_samples=250),
                    actor=auth.Principal("t", "test", "admin"), now=NOW + 30)
    transitions = evaluate_alerts(fleet, now=NOW + 30)
    assert [t.after for t in transitions] == ["firing"]
    alerts = client.get("/v1/alerts", headers=headers, params={"state": "firing"}).json()
    assert [alert_devices(a) for a in alerts["items"]] == [["pi-2"]]
    assert "pi-2" in alerts["items"][0]["summary"]


def test_drift_line_marks_windows_after_the_shift_and_judges_the_latest() -> None:
    assert drift_line("pi-2", [0.1191, 8.0961, 8.1], 0.25, shifted_from=1) == (
        "pi-2: 3 window(s), max PSI each: 0.119, 8.1*, 8.1* -> OVER the alert threshold: "
        "8.1 > 0.25")
    assert drift_line("pi-1", [0.1191], 0.25) == (
        "pi-1: 1 window(s), max PSI each: 0.119 -> ok: 0.119 <= 0.25")
    assert drift_line("pi-3", [], 0.25) == "pi-3: no drift window yet"


def test_drift_windows_of_a_device_that_sent_none() -> None:
    view = {"bucket_s": 1, "buckets": [
        {"start": 10, "devices": [{"device": "pi-1", "max_psi": 0.1, "windows": 1}]},
        {"start": 11, "devices": []}]}
    assert drift_windows(view, "pi-2") == []
    assert drift_windows(view, "pi-1") == [0.1]


# ------------------------------------------------------------------------------ dashboard
class _Pages(BaseHTTPRequestHandler):
    """/ui/ redirects to the sign-in page, as the server's dashboard does without a session."""

    def do_GET(self) -> None:
        if self.path == "/ui/":
            self.send_response(303)
            self.send_header("Location", "/ui/login?next=%2Fui%2F")
        else:
            self.send_response(200 if self.path.startswith("/ui/login") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_http_answer_reports_a_redirect_without_following_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Pages)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01},
                              daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert http_answer(f"{url}/ui/") == (303, "/ui/login?next=%2Fui%2F")
        assert http_answer(f"{url}/ui/login") == (200, "")
        assert http_answer(f"{url}/nothing") == (404, "")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert http_answer(f"{url}/ui/") is None  # nothing listens any more


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

"""Alert rules and alerts: real drift windows and metrics intervals through the real ingest,
evaluated by the maintenance pass on an injected clock; webhooks POSTed by the sender's own
thread to a real HTTP server on loopback that fails the first attempts; the rollout drift
gate and a drift alert reading the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import (
    ADMIN,
    MODEL,
    PUBLISHER,
    START,
    Digits,
    Fleetlet,
    Receiver,
    metrics_body,
    trained_digits,
)
from sqlalchemy import select

from agent.protocol.messages import Status
from agent.protocol.topics import device_topic
from fleet_server import audit, auth
from fleet_server.api import create_app
from fleet_server.db import atomic, tables
from fleet_server.deploy import rollouts, service
from fleet_server.deploy.plan import Selector
from fleet_server.errors import InvalidInput, NotFound
from fleet_server.monitoring import (
    AlertRule,
    WebhookSender,
    create_rule,
    delete_rule,
    evaluate_alerts,
    list_alerts,
)
from fleet_server.monitoring.rules import TRANSITIONS, Event, event_for, next_state
from fleet_server.monitoring.webhooks import backoff_s, is_fatal
from fleet_server.rollout import RolloutSpec
from fleet_server.runtime import MqttRuntime
from model_tools.examples.digits import shifted


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits()


@pytest.fixture(scope="module")
def windows(digits: Digits) -> dict[str, list[dict[str, Any]]]:
    """Drift windows of 180 predictions of the eval split: as it is, and its centre dead."""
    return {"calm": digits.windows(digits.x_eval, window=180),
            "dead": digits.windows(shifted(digits.x_eval, "dead"), window=180)}


@pytest.fixture
def fleetlet(tmp_path: Path, digits: Digits) -> Iterator[Fleetlet]:
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4", "zero-1": "rpi-zero2w"},
                 digits.baseline)
    yield f
    f.close()


def add_rule(f: Fleetlet, **fields: Any) -> AlertRule:
    args: dict[str, Any] = {"id": 0, "model": MODEL, "kind": "drift_psi", "threshold": 0.25}
    args.update(fields)
    with atomic(f.fleet.engine) as conn:
        stored = create_rule(conn, AlertRule(**args), actor=PUBLISHER, now=f.clock.now)
    return AlertRule(**{k: v for k, v in stored.items() if k not in ("created_at",
                                                                       "created_by")})


def evaluate(f: Fleetlet, at: int) -> list[tuple[str | None, str]]:
    f.clock.now = at
    return [(t.before, t.after) for t in evaluate_alerts(f.fleet, now=at)]


def alerts(f: Fleetlet, state: str | None = None) -> list[dict[str, Any]]:
    with atomic(f.fleet.engine) as conn:
        return list_alerts(conn, state=state, limit=100)[0]


def actions(f: Fleetlet) -> list[tuple[str, str]]:
    with atomic(f.fleet.engine) as conn:
        assert audit.verify_chain(conn) is None
        return [(e.action, e.target) for e in audit.entries(conn, limit=1000)
                if e.action.startswith("alert")]


# ------------------------------------------------------------------------------- pure parts
BAD_RULES = [
    ("unknown-kind", {"kind": "latency"}, "kind: expected drift_psi | error_rate | p95_latency"),
    ("psi-needs-threshold", {"threshold": None}, "threshold: expected a PSI > 0"),
    ("psi-not-finite", {"threshold": float("inf")}, "threshold: expected a PSI > 0"),
    ("error-rate-over-1", {"kind": "error_rate", "threshold": 1.5},
     r"threshold: expected an error rate in \[0, 1\)"),
    ("p95-negative", {"kind": "p95_latency", "threshold": -3.0},
     "threshold: expected milliseconds > 0, or null"),
    ("no-devices", {"min_devices": 0}, r"min_devices: expected an integer in 1..1000000, got 0"),
    ("short-window", {"window_s": 5}, r"window_s: expected an integer in 10..604800, got 5"),
    ("bool-for", {"for_s": True}, "for_s: expected an integer"),
    ("webhook-scheme", {"webhook_url": "file:///etc/passwd"},
     "webhook_url: expected an http:// or https:// URL"),
    ("empty-model", {"model": ""}, "model: expected a name of 1..200 characters"),
]


@pytest.mark.parametrize(("name", "change", "match"), BAD_RULES, ids=[r[0] for r in BAD_RULES])
def test_bad_rules_are_refused(name: str, change: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"id": 0, "model": MODEL, "kind": "drift_psi", "threshold": 0.25}
    args.update(change)
    with pytest.raises(InvalidInput, match=match):
        AlertRule(**args).check()


STEPS = [
    # (state of the open alert, holds, started_at, now, for_s, next state)
    ("nothing-holds", None, False, None, 100, 60, None),
    ("starts-pending", None, True, None, 100, 60, "pending"),
    ("fires-at-once-without-for", None, True, None, 100, 0, "firing"),
    ("still-pending", "pending", True, 50, 100, 60, "pending"),
    ("held-long-enough", "pending", True, 40, 100, 60, "firing"),
    ("pending-clears", "pending", False, 40, 100, 60, "resolved"),
    ("keeps-firing", "firing", True, 0, 100, 60, "firing"),
    ("firing-clears", "firing", False, 0, 100, 60, "resolved"),
]


@pytest.mark.parametrize(("name", "state", "holds", "started", "now", "for_s", "expected"),
                         STEPS, ids=[r[0] for r in STEPS])
def test_the_transition_table(name: str, state: str | None, holds: bool, started: int | None,
                              now: int, for_s: int, expected: str | None) -> None:
    assert next_state(state, event_for(holds, started, now, for_s)) == expected


def test_every_open_state_has_a_row_for_every_event_and_resolved_is_final() -> None:
    assert {(s, e) for s in (None, "pending", "firing") for e in Event} == set(TRANSITIONS)
    with pytest.raises(ValueError, match="expected one of pending, firing or None, got "
                                         "'resolved'"):
        next_state("resolved", Event.HOLDS)


def test_backoff_doubles_to_a_cap_and_which_statuses_are_fatal() -> None:
    assert [backoff_s(n) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert [s for s in (400, 404, 408, 410, 422, 429, 500, 503) if is_fatal(s)] == [
        400, 404, 410, 422]


# ------------------------------------------------------------------------------- evaluation
def test_a_drift_alert_is_pending_for_t_fires_and_clears(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    rule = add_rule(f, for_s=600, window_s=1800, min_samples=100)
    assert evaluate(f, START + 50) == []  # no data: nothing holds
    f.drift("pi-1", windows["calm"], at=START + 90)
    f.drift("pi-2", windows["dead"], at=START + 100)
    assert evaluate(f, START + 100) == [(None, "pending")]
    [pending] = alerts(f)
    dead = max(w["max_psi"] for w in windows["dead"])
    assert (pending["state"], pending["started_at"], pending["fired_at"]) == (
        "pending", START + 100, None)
    assert pending["devices"] == [{"device": "pi-2", "value": dead, "limit": 0.25,
                                   "samples": 540}]
    assert pending["summary"] == ("1 device(s) with input PSI over 0.25 (at least 1 needed) "
                                  f"in the last 1800 s: pi-2 {dead:.3g}")
    assert evaluate(f, START + 699) == []  # 599 s: still pending
    assert evaluate(f, START + 700) == [("pending", "firing")]
    [firing] = alerts(f, "firing")
    assert (firing["id"], firing["fired_at"], firing["value"]) == (pending["id"], START + 700,
                                                                    dead)
    assert firing["rule"] == {**rule.to_dict()}
    f.drift("pi-2", windows["calm"], at=START + 1000)
    # the window is (now - 1800, now]: the shifted windows (received at START + 100) are in
    # it until START + 1899, then only the calm ones are
    assert evaluate(f, START + 1899) == []
    assert evaluate(f, START + 1900) == [("firing", "resolved")]
    [resolved] = alerts(f)
    assert (resolved["state"], resolved["resolved_at"]) == ("resolved", START + 1900)
    assert resolved["devices"][0]["device"] == "pi-2"  # what triggered it is kept
    target = f"alert:{resolved['id']}"
    assert actions(f) == [("alert_rule.create", f"alert_rule:{rule.id}"),
                          ("alert.pending", target), ("alert.firing", target),
                          ("alert.resolved", target)]
    # the next episode is a new alert
    f.drift("pi-1", windows["dead"], at=START + 2000)
    assert evaluate(f, START + 2000) == [(None, "pending")]
    assert [a["state"] for a in alerts(f)] == ["pending", "resolved"]


def test_a_pending_alert_that_clears_never_fires(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    add_rule(f, for_s=600, window_s=300)
    f.drift("pi-2", windows["dead"], at=START)
    assert evaluate(f, START) == [(None, "pending")]
    assert evaluate(f, START + 301) == [("pending", "resolved")]
    [alert] = alerts(f)
    assert (alert["fired_at"], alert["resolved_at"]) == (None, START + 301)


def test_min_devices_must_be_over_together(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    add_rule(f, min_devices=2, window_s=600)
    f.drift("pi-2", windows["dead"], at=START)
    f.drift("pi-1", windows["calm"], at=START)
    assert evaluate(f, START + 10) == []
    f.drift("zero-1", windows["dead"][:2], at=START + 20)  # 360 predictions: enough
    assert evaluate(f, START + 20) == [(None, "firing")]  # for_s 0: fires at once
    [alert] = alerts(f)
    assert [d["device"] for d in alert["devices"]] == ["pi-2", "zero-1"]
    assert [d["samples"] for d in alert["devices"]] == [540, 360]
    assert alert["summary"].startswith("2 device(s) with input PSI over 0.25 (at least 2")


def test_min_samples_and_version(fleetlet: Fleetlet,
                                 windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    every = add_rule(f, min_samples=400)  # every version
    two = add_rule(f, version="2.0.0")
    dead = windows["dead"]
    f.drift("pi-2", dead[:2], at=START)  # 360 predictions of 1.0.0
    assert evaluate(f, START) == []
    f.drift("pi-2", dead[2:], at=START + 1)  # 540
    assert evaluate(f, START + 1) == [(None, "firing")]
    assert [a["rule_id"] for a in alerts(f)] == [every.id]
    f.drift("pi-1", [{**w, "model_version": "2.0.0"} for w in dead], at=START + 2)
    assert evaluate(f, START + 2) == [(None, "firing")]
    [newest, _] = alerts(f)
    assert newest["rule_id"] == two.id and newest["devices"][0]["device"] == "pi-1"
    # the rule on every version now sees both devices
    assert [d["device"] for d in alerts(f, "firing")[1]["devices"]] == ["pi-1", "pi-2"]


METRIC_RULES = [
    # (rule fields, devices over: pi-1 serves 100 requests, 10 failing, at 80 ms; pi-2 100
    #  at 8 ms; zero-1 (budget 200 ms) 100 at 150 ms)
    ("error-rate", {"kind": "error_rate", "threshold": 0.05}, ["pi-1"]),
    ("error-rate-needs-samples", {"kind": "error_rate", "threshold": 0.05,
                                  "min_samples": 101}, []),
    ("p95-over-the-profile-budget", {"kind": "p95_latency", "threshold": None}, ["pi-1"]),
    ("p95-over-100-ms", {"kind": "p95_latency", "threshold": 100.0}, ["zero-1"]),
    ("p95-over-5-ms", {"kind": "p95_latency", "threshold": 5.0}, ["zero-1", "pi-1", "pi-2"]),
]


@pytest.mark.parametrize(("name", "fields", "over"), METRIC_RULES,
                         ids=[r[0] for r in METRIC_RULES])
def test_metric_rules(fleetlet: Fleetlet, name: str, fields: dict[str, Any],
                      over: list[str]) -> None:
    f = fleetlet
    add_rule(f, **fields)
    f.metrics("pi-1", [metrics_body([80.0] * 90, {"5xx": 10})], at=START)
    f.metrics("pi-2", [metrics_body([8.0] * 100)], at=START)
    f.metrics("zero-1", [metrics_body([150.0] * 100)], at=START)
    assert evaluate(f, START + 1) == ([(None, "firing")] if over else [])
    got = alerts(f)
    assert [d["device"] for a in got for d in a["devices"]] == over
    if name == "p95-over-the-profile-budget":
        assert got[0]["devices"][0] == {"device": "pi-1", "value": 80.0, "limit": 50.0,
                                        "samples": 100}
    if name == "error-rate":
        assert got[0]["value"] == 0.1 and "error rate over 5.00%" in got[0]["summary"]


def test_deleting_a_rule_resolves_its_alert(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    rule = add_rule(f)
    f.drift("pi-2", windows["dead"], at=START)
    evaluate(f, START)
    with atomic(f.fleet.engine) as conn:
        gone = delete_rule(conn, rule.id, actor=ADMIN, now=START + 5)
        with pytest.raises(NotFound, match=f"alert rule {rule.id} not found"):
            delete_rule(conn, rule.id, actor=ADMIN, now=START + 5)
    assert gone["id"] == rule.id
    [alert] = alerts(f)
    assert (alert["state"], alert["resolved_at"]) == ("resolved", START + 5)
    assert evaluate(f, START + 10) == []  # no rule, no alert
    assert actions(f)[-2:] == [("alert.resolved", f"alert:{alert['id']}"),
                               ("alert_rule.delete", f"alert_rule:{rule.id}")]


def test_the_maintenance_pass_evaluates_the_rules(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    add_rule(f)
    runtime = MqttRuntime(f.fleet)  # never started: maintenance only
    f.drift("pi-2", windows["dead"], at=START)
    f.clock.now = START + 1
    [alert_id] = [a for a in runtime.maintain_once()["alerts"]]
    assert alert_id == f"{alerts(f)[0]['id']}:firing"
    assert runtime.maintain_once()["alerts"] == []  # still firing: no transition


# ------------------------------------------------------------------------------- webhooks
@pytest.fixture
def receiver(request: pytest.FixtureRequest) -> Iterator[Receiver]:
    r = Receiver(list(request.param))
    yield r
    r.close()


def attempts(f: Fleetlet) -> list[tuple[int, int, int | None]]:
    t = tables.webhook_attempts.c
    with atomic(f.fleet.engine) as conn:
        return [tuple(r) for r in conn.execute(select(t.webhook_id, t.attempt,
                                                      t.status_code).order_by(t.id))]


def deliveries(f: Fleetlet) -> list[tuple[str, str, int]]:
    w = tables.alert_webhooks.c
    with atomic(f.fleet.engine) as conn:
        return [tuple(r) for r in conn.execute(select(w.event, w.status, w.attempts)
                                                .order_by(w.id))]


@pytest.mark.parametrize("receiver", [[503, 503]], indirect=True)
def test_webhooks_are_retried_with_backoff_from_their_own_thread(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]],
        receiver: Receiver) -> None:
    f = fleetlet
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the injected sleeper: time passes on the fake clock
        slept.append(seconds)
        f.clock.now += int(seconds)

    sender = WebhookSender(f.fleet.engine, clock=f.clock, sleep=sleep)
    sender.start()
    try:
        rule = add_rule(f, webhook_url=receiver.url, window_s=600)
        f.drift("pi-2", windows["dead"], at=START)
        [fired] = evaluate_alerts(f.fleet, now=START)
        assert fired.webhook and deliveries(f) == [("firing", "pending", 0)]
        sender.notify()
        receiver.wait(3)  # 503, 503, then 200
        f.drift("pi-2", windows["calm"], at=START + 700)
        f.clock.now = START + 700  # the dead windows are out of the 600 s window
        [resolved] = evaluate_alerts(f.fleet, now=START + 700)
        assert (resolved.after, resolved.webhook) == ("resolved", True)
        sender.notify()
        receiver.wait(1)
    finally:
        sender.stop()
    assert slept == [5.0, 10.0]
    assert [r[0] for r in receiver.received] == [503, 503, 200, 200]
    first, resolve = receiver.received[2][1], receiver.received[3][1]
    assert receiver.received[0][1] == first  # every attempt sends the same payload
    assert (first["version"], first["event"], first["alert"]["state"]) == (1, "firing",
                                                                           "firing")
    assert first["alert"]["devices"][0]["device"] == "pi-2"
    assert first["rule"]["webhook_url"] == receiver.url and first["rule"]["id"] == rule.id
    assert (resolve["event"], resolve["alert"]["state"], resolve["alert"]["resolved_at"]) == (
        "resolved", "resolved", START + 700)
    assert receiver.received[0][2]["Content-Type"] == "application/json"
    assert deliveries(f) == [("firing", "delivered", 3), ("resolved", "delivered", 1)]
    assert attempts(f) == [(1, 1, 503), (1, 2, 503), (1, 3, 200), (2, 1, 200)]


@pytest.mark.parametrize("receiver", [[410]], indirect=True)
def test_a_refused_webhook_fails_at_once_and_the_next_one_still_goes(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]],
        receiver: Receiver) -> None:
    f = fleetlet
    add_rule(f, webhook_url=receiver.url, window_s=600)
    sender = WebhookSender(f.fleet.engine, clock=f.clock, sleep=lambda s: None)
    try:
        f.drift("pi-2", windows["dead"], at=START)
        evaluate_alerts(f.fleet, now=START)
        assert sender.deliver_due() == 0
        f.clock.now = START + 601
        evaluate_alerts(f.fleet, now=START + 601)
        assert sender.deliver_due() == 1
    finally:
        sender.stop()
    assert deliveries(f) == [("firing", "failed", 1), ("resolved", "delivered", 1)]


@pytest.mark.parametrize("receiver", [[]], indirect=True)
def test_an_unreachable_webhook_gives_up_after_max_attempts(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]],
        receiver: Receiver) -> None:
    f = fleetlet
    receiver.close()  # nothing listens there any more
    add_rule(f, webhook_url=receiver.url)
    sender = WebhookSender(f.fleet.engine, clock=f.clock, max_attempts=3)
    try:
        f.drift("pi-2", windows["dead"], at=START)
        evaluate_alerts(f.fleet, now=START)
        for wait in (0, 5, 10):
            f.clock.now += wait
            assert sender.deliver_due() == 0
        f.clock.now += 1000
        assert sender.deliver_due() == 0  # given up: nothing is tried again
    finally:
        sender.stop()
    assert deliveries(f) == [("firing", "failed", 3)]
    assert [a[2] for a in attempts(f)] == [None, None, None]


# ------------------------------------------------------------------------------- rollouts
def test_a_drift_alert_and_the_rollout_drift_gate_read_the_same_numbers(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    """The device the first wave moves drifts: the rollout's psi gate pauses it, and a
    drift alert on the new version fires, both with the device's largest PSI."""
    f = fleetlet
    runtime = MqttRuntime(f.fleet)
    for device in ("pi-1", "pi-2", "zero-1"):
        f.receive(device_topic(device, "status"),
                  Status(device_id=device, online=True, at=START).to_bytes(), START)

    def apply_desired() -> None:
        with atomic(f.fleet.engine) as conn:
            states = conn.execute(select(tables.desired_states)).all()
        for st in states:
            [m] = json.loads(st.models)
            f.running(st.device_id, m["version"], at=f.clock.now, applied=st.sequence)

    def deploy(version: str, spec: RolloutSpec | None = None) -> dict[str, Any]:
        with atomic(f.fleet.engine) as conn:
            return service.deploy(f.fleet, conn, model=MODEL, version=version,
                                  selector=Selector(all=True), actor=ADMIN, rollout=spec)

    deploy("1.0.0")
    apply_desired()
    add_rule(f, version="2.0.0")
    out = deploy("2.0.0", RolloutSpec.from_dict({
        "waves": "1,all", "on_failure": "pause",
        "gates": {"latency_gate": False, "max_psi": 0.25, "min_samples": 100}}))
    rollout_id = out["rollout_id"]
    f.clock.now += 10
    apply_desired()
    with atomic(f.fleet.engine) as conn:
        [moved] = [d["device_id"] for d in rollouts.get_rollout(conn, rollout_id)["devices"]]
    f.drift(moved, [{**w, "model_version": "2.0.0"} for w in windows["dead"]],
            at=f.clock.now)
    f.clock.now += 10
    done = runtime.maintain_once()
    with atomic(f.fleet.engine) as conn:
        rollout = rollouts.get_rollout(conn, rollout_id)
    [gate] = [g for g in rollout["gates"] if g["gate"] == "psi"]
    [alert] = alerts(f, "firing")
    dead = max(w["max_psi"] for w in windows["dead"])
    assert rollout["status"] == "paused" and gate["ok"] is False
    assert gate["value"] == alert["value"] == alert["devices"][0]["value"] == dead
    assert alert["devices"][0]["device"] == moved
    assert done["alerts"] == [f"{alert['id']}:firing"] and done["rollouts"] == [rollout_id]


# ------------------------------------------------------------------------------- the API
def test_rules_and_alerts_through_the_api(
        fleetlet: Fleetlet, windows: dict[str, list[dict[str, Any]]]) -> None:
    f = fleetlet
    with atomic(f.fleet.engine) as conn:
        _, reader = auth.create_token(conn, name="viewer", scope="reader", now=START)
        _, publisher = auth.create_token(conn, name="ci", scope="publisher", now=START)
    as_reader = {"Authorization": f"Bearer {reader}"}
    as_publisher = {"Authorization": f"Bearer {publisher}"}
    app = create_app(f.settings, clock=f.clock, fleet=f.fleet)
    body = {"model": MODEL, "kind": "drift_psi", "threshold": 0.3, "for_s": 0,
            "window_s": 600, "min_samples": 100}
    with TestClient(app) as client:
        assert client.post("/v1/alert-rules", json=body, headers=as_reader).status_code == 403
        made = client.post("/v1/alert-rules", json=body, headers=as_publisher)
        assert made.status_code == 201, made.text
        rule = made.json()
        assert (rule["kind"], rule["threshold"], rule["min_devices"], rule["created_by"]) == (
            "drift_psi", 0.3, 1, "publisher:ci")
        for change, status, words in [
                ({"model": "digitz"}, 404, "model 'digitz' not found"),
                ({"version": "9"}, 404, "model 'digits' version '9' not found"),
                ({"threshold": None}, 422, "threshold: expected a PSI > 0"),
                ({"kind": "latency"}, 422, "body.kind"),
                ({"webhook_url": "ftp://x"}, 422, "webhook_url: expected an http://"),
                ({"colour": "red"}, 422, "body.colour")]:
            r = client.post("/v1/alert-rules", json={**body, **change}, headers=as_publisher)
            assert (r.status_code, words in r.json()["detail"]) == (status, True), r.text
        listed = client.get("/v1/alert-rules", headers=as_reader).json()
        assert [r["id"] for r in listed["items"]] == [rule["id"]] and listed["total"] == 1

        f.drift("pi-2", windows["dead"], at=START)
        evaluate_alerts(f.fleet, now=START)
        firing = client.get("/v1/alerts", params={"state": "firing"}, headers=as_reader)
        assert [a["rule_id"] for a in firing.json()["items"]] == [rule["id"]]
        assert client.get("/v1/alerts", params={"state": "resolved"},
                          headers=as_reader).json()["total"] == 0
        assert client.get("/v1/alerts", params={"state": "open"},
                          headers=as_reader).status_code == 422

        gone = client.delete(f"/v1/alert-rules/{rule['id']}", headers=as_publisher)
        assert gone.status_code == 200 and gone.json()["id"] == rule["id"]
        assert client.delete(f"/v1/alert-rules/{rule['id']}",
                             headers=as_publisher).status_code == 404
        [alert] = client.get("/v1/alerts", headers=as_reader).json()["items"]
        assert alert["state"] == "resolved"

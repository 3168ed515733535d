"""``GET /metrics``: the server as ``serve`` runs it (app lifespan, embedded MQTT broker on a
free loopback port), a device played by a paho client over real MQTT, scraped with a reader
token and parsed with prometheus-client's own parser.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from agent.drift import DRIFT_SUMMARY_KIND
from agent.metrics import METRICS_KIND
from agent.protocol.messages import (
    Ack,
    DriftBatch,
    Record,
    Reported,
    RunningModel,
    Status,
    TelemetryBatch,
)
from agent.protocol.provisioning import Provisioning
from agent.protocol.topics import device_topic
from fleet_server import auth
from fleet_server.api.app import create_app
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.fleet import init_data_dir
from fleet_server.ingest import handle_message
from fleet_server.registry import devices
from fleet_server.runtime import attach_mqtt
from fleet_server.settings import Settings

WAIT = 10.0
DAY = 86400


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[dict[str, Any]]:
    settings = Settings(data_dir=tmp_path / "data", mqtt_port=0)
    admin = init_data_dir(settings)
    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {admin}"
        fleet = app.state.fleet
        with atomic(fleet.engine) as conn:
            _, reader = auth.create_token(conn, name="prometheus", scope="reader",
                                          now=fleet.now())
            conn.execute(tables.artifacts.insert().values(
                name="digits", version="1.0.0", profile="rpi4", runtime="onnxruntime",
                precision="fp32", sha256="a" * 64, length=10,
                target_path="models/digits/1.0.0/rpi4/model.onnx",
                manifest_target="models/digits/1.0.0/rpi4/manifest.json", manifest="{}",
                created_at=fleet.now(), created_by="t"))
        yield {"client": client, "app": app, "reader": reader}


def scrape(client: TestClient, token: str) -> dict[tuple[str, frozenset[tuple[str, str]]],
                                                     float]:
    r = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def sample(got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
           **labels: str) -> float:
    return got[(name, frozenset(labels.items()))]


@pytest.mark.slow
def test_metrics_count_what_the_server_did(served: dict[str, Any]) -> None:
    client, app = served["client"], served["app"]
    provs = {}
    for device_id in ("dev-a", "dev-b", "dev-c"):
        r = client.post("/v1/devices", json={"id": device_id, "profile": "rpi4",
                                              "tags": ["lab"]})
        assert r.status_code == 201, r.text
        provs[device_id] = Provisioning.from_dict(r.json()["provisioning"])
    assert client.post("/v1/devices/dev-c/revoke").status_code == 200
    r = client.post("/v1/deployments", json={
        "model": "digits", "version": "1.0.0", "selector": {"tags": ["lab"]},
        "rollout": {"waves": "1,all", "gates": {"latency_gate": False}}})
    assert r.status_code == 201, r.text
    assert client.post("/v1/alert-rules", json={
        "model": "digits", "kind": "drift_psi", "threshold": 0.25}).status_code == 201

    prov = provs["dev-a"]
    acks: queue.Queue[bytes] = queue.Queue()
    device = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                         client_id="test-dev-a", protocol=paho.MQTTv311)
    device.username_pw_set(prov.mqtt_username, prov.mqtt_password)
    device.on_message = lambda c, u, m: acks.put(bytes(m.payload))
    host, port = prov.mqtt_url.split("//", 1)[1].rsplit(":", 1)
    device.connect(host, int(port))
    device.loop_start()
    try:
        device.subscribe(device_topic("dev-a", "ack"), qos=1)

        def send(kind: str, payload: bytes) -> None:
            device.publish(device_topic("dev-a", kind), payload, qos=1).wait_for_publish(WAIT)

        now = int(time.time())
        send("status", Status(device_id="dev-a", online=True, at=now).to_bytes())
        send("reported", Reported(
            device_id="dev-a", applied_sequence=1, running=(RunningModel("digits", "1.0.0",
                                                                          "a" * 64),),
            state="Committed", last_result="ok", last_error=None, agent_version="test",
            reported_at=now).to_bytes())
        send("telemetry", b"{not json")  # dropped: malformed
        batch = TelemetryBatch(device_id="dev-a", records=tuple(
            Record(seq=s, kind=METRICS_KIND, at=now, body={"n": s}) for s in (1, 2, 3)))
        for _ in range(2):  # the second time: a redelivery, three duplicates
            send("telemetry", batch.to_bytes())
            assert Ack.from_bytes(acks.get(timeout=WAIT)).upto_seq == 3
        drift = DriftBatch(device_id="dev-a", records=(Record(
            seq=1, kind=DRIFT_SUMMARY_KIND, at=now, body={
                "version": 1, "model": "digits", "model_version": "1.0.0",
                "window": {"start": now - 60, "end": now, "predictions": 500},
                "max_psi": 0.9}),))
        send("drift", drift.to_bytes())
        assert Ack.from_bytes(acks.get(timeout=WAIT)).stream == "drift"
        app.state.mqtt.wait_acks(timeout=WAIT)
    finally:
        device.disconnect()
        device.loop_stop()
    assert app.state.mqtt.maintain_once()["alerts"] == ["1:firing"]

    got = scrape(client, served["reader"])
    assert {state: sample(got, "edgefleet_devices", state=state)
            for state in ("online", "offline", "revoked")} == {"online": 1, "offline": 1,
                                                                "revoked": 1}
    assert sample(got, "edgefleet_model_version_devices", model="digits",
                  version="1.0.0") == 1
    assert sample(got, "edgefleet_rollouts", status="running") == 1
    assert sample(got, "edgefleet_rollouts", status="paused") == 0
    assert sample(got, "edgefleet_alerts", state="firing") == 1
    assert sample(got, "edgefleet_alerts", state="pending") == 0
    assert sample(got, "edgefleet_alert_firing", rule_id="1", model="digits",
                  kind="drift_psi") == 1
    assert sample(got, "edgefleet_alert_webhooks", status="pending") == 0
    assert {kind: sample(got, "edgefleet_ingest_messages_total", kind=kind)
            for kind in ("reported", "status", "telemetry", "drift", "rejected")} == {
        "reported": 1, "status": 1, "telemetry": 2, "drift": 1, "rejected": 1}
    assert sample(got, "edgefleet_ingest_records_total", stream="telemetry",
                  outcome="stored") == 3
    assert sample(got, "edgefleet_ingest_records_total", stream="telemetry",
                  outcome="duplicate") == 3
    assert sample(got, "edgefleet_ingest_records_total", stream="drift", outcome="stored") == 1
    assert sample(got, "edgefleet_ingest_rejected_total", reason="malformed") == 1
    assert sample(got, "edgefleet_ingest_rejected_total", reason="forged") == 0
    assert sample(got, "edgefleet_acks_sent_total") == 3
    assert sample(got, "edgefleet_ingest_parse_restarts_total") == 0
    assert sample(got, "edgefleet_ingest_parse_reparsed_messages_total") == 0


def test_metrics_need_a_reader_token(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings)
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer ef_reader_nope"}
                          ).status_code == 401
        fleet = app.state.fleet
        with atomic(fleet.engine) as conn:
            _, reader = auth.create_token(conn, name="p", scope="reader", now=fleet.now())
        got = scrape(client, reader)
    # an app without the MQTT runtime has the fleet gauges but no ingest counters
    assert sample(got, "edgefleet_devices", state="online") == 0
    assert not [name for name, _ in got if name.startswith("edgefleet_ingest")]


def test_two_apps_in_one_process_keep_their_own_numbers(tmp_path: Path) -> None:
    seen = []
    for name, n in (("one", 1), ("two", 2)):
        settings = Settings(data_dir=tmp_path / name)
        admin = init_data_dir(settings)
        with TestClient(create_app(settings)) as client:
            for i in range(n):
                assert client.post("/v1/devices", json={"id": f"d{i}", "profile": "rpi4"},
                                   headers={"Authorization": f"Bearer {admin}"}
                                   ).status_code == 201
            got = scrape(client, admin)
        seen.append(sample(got, "edgefleet_devices", state="offline"))
    assert seen == [1, 2]


def test_pruned_records_are_counted_per_stream_with_the_time_of_the_last_prune(
        tmp_path: Path) -> None:
    """The serve runtime's retention, run by its maintenance pass on an injected clock."""
    clock = Clock(int(time.time()))
    start = clock.now
    settings = Settings(data_dir=tmp_path / "data", mqtt_port=0, record_retention_days=30)
    init_data_dir(settings, clock=clock)
    app = create_app(settings, clock=clock)
    attach_mqtt(app, maintenance_interval_s=3600)
    with TestClient(app) as client:
        fleet, runtime = app.state.fleet, app.state.mqtt
        with atomic(fleet.engine) as conn:
            devices.provision(fleet, conn, device_id="pi", profile="rpi4", tags=[],
                              actor=Principal("t", "test", "admin"))
            _, reader = auth.create_token(conn, name="p", scope="reader", now=clock.now)

        def receive(stream: str, seqs: range, at: int) -> None:
            cls = TelemetryBatch if stream == "telemetry" else DriftBatch
            batch = cls(device_id="pi", records=tuple(
                Record(seq=s, kind=METRICS_KIND, at=at, body={"s": s}) for s in seqs))
            assert handle_message(fleet, device_topic("pi", stream), batch.to_bytes(),
                                  now=at).stored == len(seqs)

        receive("telemetry", range(1, 6), start)
        receive("drift", range(1, 3), start)
        receive("telemetry", range(6, 8), start + 20 * DAY)
        before = scrape(client, reader)
        assert sample(before, "edgefleet_records_pruned_total", stream="telemetry") == 0
        assert sample(before, "edgefleet_records_pruned_total", stream="drift") == 0
        assert sample(before, "edgefleet_retention_runs_total") == 0
        assert not [n for n, _ in before if n.startswith("edgefleet_retention_last_")]

        clock.now = start + 31 * DAY
        assert runtime.maintain_once()["pruned"] == 7
        clock.now += 2 * 3600  # the next run is due an hour later; it finds nothing
        assert runtime.maintain_once()["pruned"] == 0
        got = scrape(client, reader)
    assert sample(got, "edgefleet_records_pruned_total", stream="telemetry") == 5
    assert sample(got, "edgefleet_records_pruned_total", stream="drift") == 2
    assert sample(got, "edgefleet_retention_runs_total") == 2
    assert sample(got, "edgefleet_retention_last_prune_timestamp_seconds") == start + 31 * DAY
    assert sample(got, "edgefleet_retention_last_run_timestamp_seconds") == clock.now


def test_retention_metrics_are_absent_while_retention_is_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", mqtt_port=0, record_retention_days=0)
    admin = init_data_dir(settings)
    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    with TestClient(app) as client:
        runtime = app.state.mqtt
        assert runtime.maintain_once()["pruned"] == 0
        got = scrape(client, admin)
    assert sample(got, "edgefleet_acks_sent_total") == 0  # the runtime's counters are there
    assert not [n for n, _ in got if "retention" in n or "pruned" in n]

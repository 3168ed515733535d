"""The server end to end over a REAL broker: embedded amqtt and Mosquitto.

The app runs with its lifespan (TestClient), the MQTT runtime attached as `serve` does; devices
are played by paho clients holding the credentials from their provisioning files.
"""

from __future__ import annotations

import io
import queue
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import paho.mqtt.client as paho
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.messages import Ack, Record, TelemetryBatch
from agent.protocol.provisioning import Provisioning
from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from agent.protocol.topics import device_topic
from fleet_server.api.app import create_app
from fleet_server.db import atomic
from fleet_server.fleet import init_data_dir, server_mqtt_secret
from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
from fleet_server.mqtt.passwords import hash_password
from fleet_server.registry.devices import mqtt_credentials
from fleet_server.runtime import attach_mqtt
from fleet_server.settings import SERVER_MQTT_USER, Settings
from model_tools.pipeline import ConvertRequest, convert
from model_tools.profiles import get_profile

pytestmark = pytest.mark.integration
WAIT = 10.0


@pytest.fixture(scope="module")
def bundle_tar(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("tiny")
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3],
                           np.random.default_rng(0).normal(size=12).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"],
                                                                         axis=1)],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, d / "tiny.onnx")
    out = d / "bundle"
    convert(ConvertRequest(model=d / "tiny.onnx", profile=get_profile("rpi4"), out=out,
                           name="tiny", version="1.0.0", precision="fp32", latency_runs=10))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(out.iterdir()):
            tar.add(f, arcname=f.name)
    return buf.getvalue()


class Device:
    """A paho client playing one device with its provisioning file's credentials."""

    def __init__(self, prov: Provisioning) -> None:
        self.prov = prov
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.connack: queue.Queue[Any] = queue.Queue()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{prov.device_id}", protocol=paho.MQTTv311)
        self.client.username_pw_set(prov.mqtt_username, prov.mqtt_password)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_message = lambda c, u, m: self.inbox.put((m.topic, bytes(m.payload)))

    def connect(self) -> Any:
        host, port = self.prov.mqtt_url.split("//", 1)[1].rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        return self.connack.get(timeout=WAIT)

    def subscribe(self, kind: str, device: str | None = None) -> None:
        self.client.subscribe(device_topic(device or self.prov.device_id, kind), qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def next(self, kind: str) -> bytes:
        while True:
            topic, payload = self.inbox.get(timeout=WAIT)
            if topic.endswith("/" + kind):
                return payload

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(params=["embedded", "mosquitto"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    broker: MosquittoProcess | None = None
    data = tmp_path / "data"
    token = init_data_dir(Settings(data_dir=data))
    if request.param == "mosquitto":
        if find_mosquitto() is None:
            pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
        secret = server_mqtt_secret(data)
        (tmp_path / "mosq").mkdir()
        broker = MosquittoProcess(tmp_path / "mosq", {SERVER_MQTT_USER: hash_password(secret)},
                                  SERVER_MQTT_USER)
        broker.start()
        settings = Settings(data_dir=data, mqtt_url=f"mqtt://127.0.0.1:{broker.port}",
                            mqtt_public_url=f"mqtt://127.0.0.1:{broker.port}")
    else:
        settings = Settings(data_dir=data, mqtt_port=0)
    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield {"client": client, "app": app, "broker": broker, "kind": request.param}
    if broker is not None:
        broker.stop()


def provision(srv: dict[str, Any], device_id: str) -> Provisioning:
    r = srv["client"].post("/v1/devices", json={"id": device_id, "profile": "rpi4",
                                                 "tags": ["lab"]})
    assert r.status_code == 201, r.text
    prov = Provisioning.from_dict(r.json()["provisioning"])
    if srv["broker"] is not None:  # what `mosquitto-config` + a reload do in production
        fleet = srv["app"].state.fleet
        with atomic(fleet.engine) as conn:
            creds = mqtt_credentials(conn)
        creds[SERVER_MQTT_USER] = hash_password(server_mqtt_secret(fleet.settings.data_dir))
        srv["broker"].reload(creds)
    return prov


def test_desired_state_telemetry_ack_and_isolation(server: dict[str, Any],
                                                   bundle_tar: bytes) -> None:
    client = server["client"]
    a, b = provision(server, "dev-a"), provision(server, "dev-b")
    dev_a, dev_b = Device(a), Device(b)
    assert dev_a.connect() == 0 and dev_b.connect() == 0
    for d in (dev_a, dev_b):
        d.subscribe("desired")
        d.subscribe("ack")
    # dev-a also tries to read dev-b's desired state and everything: must never get them
    dev_a.client.subscribe(device_topic("dev-b", "desired"), qos=1)
    dev_a.client.subscribe("#", qos=1)

    r = client.post("/v1/models", content=bundle_tar,
                    headers={"Content-Type": "application/x-tar"})
    assert r.status_code == 201, r.text
    r = client.post("/v1/deployments", json={"model": "tiny", "version": "1.0.0",
                                              "selector": {"devices": ["dev-a", "dev-b"]}})
    assert r.status_code == 201, r.text

    keys = trusted_keys_from_pem(a.director_keys_pem)
    state = verify_desired(dev_a.next("desired"), public_keys=keys, device_id="dev-a",
                           last_sequence=0, now=int(__import__("time").time()))
    assert state.sequence == 1 and state.models[0].name == "tiny"
    assert state.models[0].profile == "rpi4"

    # telemetry from dev-a is stored and acked
    batch = TelemetryBatch(device_id="dev-a", records=tuple(
        Record(seq=s, kind="metrics", at=1, body={"n": s}) for s in (1, 2, 3)))
    dev_a.publish(device_topic("dev-a", "telemetry"), batch.to_bytes())
    ack = Ack.from_bytes(dev_a.next("ack"))
    assert (ack.stream, ack.upto_seq) == ("telemetry", 3)

    # dev-a forging dev-b's telemetry: dropped by the broker's ACL; dev-b's own gets acked
    forged = TelemetryBatch(device_id="dev-b", records=(Record(seq=1, kind="x", at=1, body={}),))
    dev_a.publish(device_topic("dev-b", "telemetry"), forged.to_bytes())
    own = TelemetryBatch(device_id="dev-b", records=(Record(seq=7, kind="y", at=1, body={}),))
    dev_b.publish(device_topic("dev-b", "telemetry"), own.to_bytes())
    assert Ack.from_bytes(dev_b.next("ack")).upto_seq == 0  # 7 is not contiguous with 0
    fleet = server["app"].state.fleet
    from sqlalchemy import select

    from fleet_server.db import tables
    with atomic(fleet.engine) as conn:
        b_rows = conn.execute(select(tables.device_records.c.seq, tables.device_records.c.kind)
                              .where(tables.device_records.c.device_id == "dev-b")).all()
    assert [(r.seq, r.kind) for r in b_rows] == [(7, "y")]  # the forged seq 1 never landed

    # dev-a never saw anything addressed to dev-b
    seen = []
    while not dev_a.inbox.empty():
        seen.append(dev_a.inbox.get_nowait()[0])
    assert not [t for t in seen if "/dev-b/" in t], seen
    dev_a.close()
    dev_b.close()


def test_revoked_device_is_refused_by_the_broker(server: dict[str, Any]) -> None:
    prov = provision(server, "dev-r")
    dev = Device(prov)
    assert dev.connect() == 0
    dev.close()
    r = server["client"].post("/v1/devices/dev-r/revoke")
    assert r.status_code == 200, r.text
    if server["broker"] is not None:
        fleet = server["app"].state.fleet
        with atomic(fleet.engine) as conn:
            creds = mqtt_credentials(conn)
        creds[SERVER_MQTT_USER] = hash_password(server_mqtt_secret(fleet.settings.data_dir))
        server["broker"].reload(creds)
    again = Device(prov)
    assert again.connect() != 0  # not authorised
    again.client.loop_stop()

"""Server and agent together: deploy, install, serve, report, telemetry; a bad v2 rolls back.

Everything real: uvicorn serving the admin API and TUF repository, the embedded MQTT broker, a
converted digits MLP, TUF downloads, onnxruntime, SQLite files. The agent runs in-process on its
own event loop thread; waits are bounded polls on observable state.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from polling import free_port, wait_for

from agent.config import load_config
from agent.daemon.app import Agent
from agent.metrics import METRICS_KIND
from agent.serving.client import AgentClient
from fleet_server.api.app import create_app
from fleet_server.fleet import init_data_dir
from fleet_server.runtime import attach_mqtt
from fleet_server.settings import Settings
from model_tools.examples import ExampleModel
from model_tools.pipeline import ConvertRequest, convert
from model_tools.profiles import get_profile

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def tar_bundle(directory: Path, *, corrupt_golden: bool = False) -> bytes:
    manifest = json.loads((directory / "manifest.json").read_text())
    if corrupt_golden:  # a v2 whose golden outputs the model cannot reproduce on the device
        for tensor in manifest["golden"]["outputs"].values():
            if tensor["dtype"] == "float32":
                raw = np.frombuffer(base64.b64decode(tensor["b64"]), np.float32).copy()
                tensor["b64"] = base64.b64encode((1.0 - raw).tobytes()).decode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(directory / "model.onnx", arcname="model.onnx")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundles(digits_mlp: ExampleModel, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, bytes]:
    out = {}
    for version in ("1.0.0", "2.0.0"):
        d = tmp_path_factory.mktemp(f"bundle-{version}") / "b"
        convert(ConvertRequest(model=digits_mlp.onnx_path, profile=get_profile("rpi4"), out=d,
                               calibration=digits_mlp.calibration_path,
                               eval=digits_mlp.eval_path, name="digits", version=version,
                               latency_runs=50))
        out[version] = tar_bundle(d, corrupt_golden=version == "2.0.0")
    return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[dict[str, Any]]:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "server", port=port, mqtt_port=0)
    token = init_data_dir(settings)
    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for("uvicorn to start", lambda: srv.started, 20)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}",
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    yield {"client": client, "app": app}
    client.close()
    srv.should_exit = True
    thread.join(20)


@pytest.fixture
def agent(server: dict[str, Any], tmp_path: Path) -> Iterator[Agent]:
    r = server["client"].post("/v1/devices", json={"id": "pi-1", "profile": "rpi4",
                                                    "tags": ["lab"]})
    assert r.status_code == 201, r.text
    prov = tmp_path / "device" / "provisioning.json"
    prov.parent.mkdir()
    prov.write_text(json.dumps(r.json()["provisioning"]))
    prov.chmod(0o600)
    cfg_file = tmp_path / "device" / "agent.toml"
    cfg_file.write_text('provisioning = "provisioning.json"\ndata_dir = "data"\n'
                        "http_port = 0\nmetrics_interval_s = 0.2\ndrift_window = 50\n"
                        "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n")
    the_agent = Agent(load_config(cfg_file))
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Event()
    thread = threading.Thread(target=lambda: loop.run_until_complete(
        the_agent.run(stop, ready=lambda _a: ready.set())), daemon=True)
    thread.start()
    assert ready.wait(30), "agent did not start"
    yield the_agent
    loop.call_soon_threadsafe(stop.set)
    thread.join(30)


def reported(server: dict[str, Any]) -> dict[str, Any] | None:
    r = server["client"].get("/v1/devices/pi-1")
    return r.json().get("reported") if r.status_code == 200 else None


def test_deploy_serve_report_then_bad_update_rolls_back(
        server: dict[str, Any], agent: Agent, bundles: dict[str, bytes],
        digits_mlp: ExampleModel) -> None:
    c = server["client"]
    for version in ("1.0.0", "2.0.0"):
        r = c.post("/v1/models", content=bundles[version],
                   headers={"Content-Type": "application/x-tar"})
        assert r.status_code == 201, r.text
    r = c.post("/v1/deployments", json={"model": "digits", "version": "1.0.0",
                                         "selector": {"tags": ["lab"]}})
    assert r.status_code == 201, r.text

    wait_for("v1 served", lambda: (agent.host.get("digits") or None) and
             agent.host.get("digits").version == "1.0.0")
    with np.load(digits_mlp.eval_path) as npz:
        x, labels = npz["input"][:64], npz["labels"][:64]
    api = AgentClient("127.0.0.1", agent.server.port)
    try:
        pred = api.predict("digits", {"input": x})
    finally:
        api.close()
    assert pred.version == "1.0.0"
    accuracy = float((pred.outputs["probabilities"].argmax(axis=1) == labels).mean())
    assert accuracy >= 0.9
    rep = wait_for("v1 reported", lambda: (r := reported(server)) and r["running"] and r)
    assert rep["running"][0]["version"] == "1.0.0" and rep["last_result"] == "ok"

    # metrics from those predictions reach the server, which acks them: the outbox drains
    from sqlalchemy import select

    from fleet_server.db import atomic, tables

    fleet = server["app"].state.fleet

    def stored_metrics() -> list[dict[str, Any]]:
        with atomic(fleet.engine) as conn:
            rows = conn.execute(select(tables.device_records.c.body).where(
                tables.device_records.c.device_id == "pi-1",
                tables.device_records.c.kind == METRICS_KIND)).scalars().all()
        return [json.loads(b) for b in rows]

    bodies = wait_for("metrics stored on the server", stored_metrics)
    assert any("digits" in json.dumps(b) for b in bodies), bodies
    wait_for("outbox drained by the server's ack", lambda: agent.outbox.depth() == 0)

    # v2's golden outputs cannot be reproduced: the device refuses to activate it
    r = c.post("/v1/deployments", json={"model": "digits", "version": "2.0.0",
                                         "selector": {"tags": ["lab"]}})
    assert r.status_code == 201, r.text
    rep = wait_for("v2 rolled back", lambda: (r := reported(server)) and
                   r["applied_sequence"] >= 2 and r["last_result"] != "ok" and r)
    assert rep["last_result"] == "rolled_back", rep
    assert rep["running"][0]["version"] == "1.0.0"
    assert agent.host.get("digits").version == "1.0.0"  # never stopped serving v1

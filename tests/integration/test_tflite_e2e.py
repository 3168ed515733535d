"""TFLite through the real system (issue 6): convert, push, provision, deploy, serve, roll back.

The unit tests prove each TFLite piece alone (the converter, the profile, the agent's runtime
adapter, the agent refusing runtimes it lacks); this proves they fit. Everything is real: the
digits MLP converted by ``python -m model_tools convert --profile rpi4-tflite`` in the converter
environment (onnx2tf + TFLiteConverter in their own venv, the one
``tests/model_tools/test_tflite_convert.py`` finds), pushed, provisioned and deployed with the
``python -m fleet_server`` CLI against uvicorn serving the admin API and the TUF repository
with the embedded MQTT broker, and installed by an in-process :class:`Agent` whose device
profile is ``rpi4-tflite``: TUF download, sha256 check, health check with ai-edge-litert on the
golden I/O, commit, serving on loopback.

What the device serves is checked against ground truth computed here, not read from a report:
the predictions (JSON and binary framing) equal a fresh ai-edge-litert interpreter on the
bundle's ``.tflite``, and their top-1 agrees with onnxruntime on the ONNX source over the whole
eval split. Two bad versions: one whose ``.tflite`` no longer matches its manifest's sha256 (the
server refuses it at push), and one whose golden outputs the model cannot reproduce (built as
the demo builds its failing version, ``scripts/demo_lib.failing_copy``; the server accepts it,
the device's health check refuses it and rolls back) while the first keeps serving.

The conversion is fp32 only (~45 s on a busy 2-core VM, most of it TensorFlow starting):
choosing among precisions is the converter tests' job. Waits are bounded polls on observable
state.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import uvicorn
from ai_edge_litert.interpreter import Interpreter
from polling import free_port, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from demo_lib import failing_copy  # the demo's own failing build

from agent.config import load_config
from agent.daemon.app import Agent
from agent.protocol.manifest import Manifest
from agent.serving.client import AgentClient
from fleet_server.api.app import create_app
from fleet_server.fleet import init_data_dir
from fleet_server.runtime import attach_mqtt
from fleet_server.settings import Settings
from model_tools.examples import ExampleModel
from model_tools.profiles import get_profile
from model_tools.tflite.env import ConverterEnv, create_env, resolve_location

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILE = "rpi4-tflite"
DEVICE = "pi-tfl-1"
MODEL = "digits"


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m <args>`` from the repository root, as a user runs it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, check=False, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def converter_env() -> ConverterEnv:
    """The environment ``model_tools setup tflite`` makes (built here only if CI did not)."""
    return create_env(resolve_location(), progress=lambda m: print(m, file=sys.stderr))


@pytest.fixture(scope="module")
def bundle(digits_mlp: ExampleModel, converter_env: ConverterEnv,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tflite") / f"{MODEL}-1.0.0"
    run = cli("model_tools", "convert", str(digits_mlp.onnx_path), "--profile", PROFILE,
              "--out", str(out), "--calibration", str(digits_mlp.calibration_path),
              "--eval", str(digits_mlp.eval_path), "--name", MODEL, "--version", "1.0.0",
              "--precision", "fp32", "--latency-runs", "20",
              "--tflite-env", str(converter_env.root), "--json", timeout=600)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert (report["status"], report["runtime"], report["chosen"]) == (
        "accepted", "tflite", "fp32"), report
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.tflite"]
    return out


@dataclass
class Server:
    client: httpx.Client  # the admin API, with the first admin token
    env: dict[str, str]  # EDGEFLEET_URL and EDGEFLEET_TOKEN for the CLI


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    settings = Settings(data_dir=tmp_path / "server", port=port, mqtt_port=0)
    token = init_data_dir(settings)
    app = create_app(settings)
    attach_mqtt(app, maintenance_interval_s=3600)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for("uvicorn to start", lambda: srv.started, 20)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                          timeout=30)
    yield Server(client, {"EDGEFLEET_URL": url, "EDGEFLEET_TOKEN": token})
    client.close()
    srv.should_exit = True
    thread.join(20)


@pytest.fixture
def agent(server: Server, tmp_path: Path) -> Iterator[Agent]:
    device = tmp_path / "device"
    device.mkdir()
    run = cli("fleet_server", "device", "provision", DEVICE, "--profile", PROFILE,
              "--tag", "lab", "--out", str(device / "provisioning.json"), env=server.env)
    assert run.returncode == 0, run.stderr
    (device / "agent.toml").write_text(
        'provisioning = "provisioning.json"\ndata_dir = "data"\nhttp_port = 0\n'
        "reconnect_min_s = 0.2\nreconnect_max_s = 1.0\n")
    the_agent = Agent(load_config(device / "agent.toml"))
    assert the_agent.profile.name == PROFILE and the_agent.profile.runtime == "tflite"
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


def reported(server: Server) -> dict[str, Any] | None:
    r = server.client.get(f"/v1/devices/{DEVICE}")
    rep = r.json().get("reported") if r.status_code == 200 else None
    return rep if isinstance(rep, dict) else None


def push_and_deploy(server: Server, bundle: Path, version: str) -> None:
    push = cli("fleet_server", "model", "push", str(bundle), "--json", env=server.env)
    assert push.returncode == 0, push.stderr
    artifacts = json.loads(push.stdout)["artifacts"]
    assert [(a["profile"], a["runtime"]) for a in artifacts] == [(PROFILE, "tflite")]
    deploy = cli("fleet_server", "deploy", MODEL, version, "--to", f"device:{DEVICE}",
                 env=server.env)
    assert deploy.returncode == 0, deploy.stderr


def tflite_outputs(path: Path, x: np.ndarray, threads: int) -> np.ndarray:
    """The ground truth: a fresh ai-edge-litert interpreter on the bundle's file."""
    runner = Interpreter(model_path=str(path), num_threads=threads).get_signature_runner(
        "serving_default")
    out: np.ndarray = runner(input=x)["probabilities"]
    return out


def test_tflite_bundle_deploys_serves_and_a_bad_update_rolls_back(
        server: Server, agent: Agent, bundle: Path, digits_mlp: ExampleModel,
        tmp_path: Path) -> None:
    manifest = Manifest.from_bytes((bundle / "manifest.json").read_bytes())
    profile = get_profile(PROFILE)

    # a .tflite that no longer matches its manifest's sha256 is refused, and takes nothing:
    # the genuine 1.0.0 is accepted right after it
    tampered = tmp_path / "tampered"
    shutil.copytree(bundle, tampered)
    data = bytearray((tampered / "model.tflite").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "model.tflite").write_bytes(bytes(data))
    push = cli("fleet_server", "model", "push", str(tampered), env=server.env)
    assert push.returncode == 1, push.stdout
    assert "sha256" in push.stderr, push.stderr
    assert server.client.get(f"/v1/models/{MODEL}/versions/1.0.0").status_code == 404

    push_and_deploy(server, bundle, "1.0.0")
    rep = wait_for("v1 committed and reported", lambda: (r := reported(server)) and
                   r["last_result"] == "ok" and r["running"] and r, timeout=60)
    assert rep["running"] == [{"name": MODEL, "version": "1.0.0",
                               "sha256": manifest.file.sha256}], rep
    served = agent.host.get(MODEL)
    assert served is not None and served.version == "1.0.0"
    assert served.manifest is not None and served.manifest.runtime == "tflite"
    installed = agent.models.model_path(MODEL, "1.0.0")
    assert installed.name == "model.tflite"
    assert installed.read_bytes() == (bundle / "model.tflite").read_bytes()

    with np.load(digits_mlp.eval_path) as npz:
        x, labels = npz["input"].astype(np.float32), npz["labels"]
    want = tflite_outputs(bundle / "model.tflite", x, profile.threads)
    with AgentClient("127.0.0.1", agent.server.port) as api:
        [spec] = api.models()
        assert (spec["name"], spec["version"]) == (MODEL, "1.0.0")
        assert [(s["name"], s["shape"]) for s in spec["inputs"]] == [("input", [None, 64])]
        binary = api.predict(MODEL, {"input": x}, binary=True)
        as_json = api.predict(MODEL, {"input": x.tolist()}, binary=False)
    for pred in (binary, as_json):
        assert (pred.model, pred.version) == (MODEL, "1.0.0")
    assert binary.outputs["probabilities"].dtype == np.float32
    np.testing.assert_array_equal(binary.outputs["probabilities"], want)
    # JSON carries float32 values as exact decimals: cast back, they are the same numbers
    np.testing.assert_array_equal(as_json.outputs["probabilities"].astype(np.float32), want)

    # and the device's answers are the ONNX source's, within the profile's tolerances
    session = ort.InferenceSession(str(digits_mlp.onnx_path),
                                   providers=["CPUExecutionProvider"])
    source = session.run(["probabilities"], {"input": x})[0]
    got = binary.outputs["probabilities"]
    agreement = float((got.argmax(axis=1) == source.argmax(axis=1)).mean())
    assert agreement >= profile.tolerances.min_top1_agreement, agreement
    assert float(np.abs(got - source).max()) <= profile.tolerances.max_abs_error
    accuracy = float((got.argmax(axis=1) == labels).mean())
    assert digits_mlp.source_accuracy - accuracy <= profile.tolerances.max_accuracy_drop

    # v2 passes every server check; only the device can tell its golden outputs are wrong
    bad = tmp_path / f"{MODEL}-2.0.0"
    assert failing_copy(bundle, bad, "2.0.0") == ["probabilities"]
    push_and_deploy(server, bad, "2.0.0")
    first = rep["applied_sequence"]
    rep = wait_for("v2 refused", lambda: (r := reported(server)) and
                   r["applied_sequence"] > first and r["last_result"] != "ok" and r,
                   timeout=60)
    assert rep["last_result"] == "rolled_back", rep
    assert "golden" in (rep["last_error"] or ""), rep
    assert [m["version"] for m in rep["running"]] == ["1.0.0"], rep
    assert agent.models.current(MODEL) == "1.0.0"
    served = agent.host.get(MODEL)
    assert served is not None and served.version == "1.0.0"
    with AgentClient("127.0.0.1", agent.server.port) as api:
        after = api.predict(MODEL, {"input": x}, binary=True)
    assert after.version == "1.0.0"
    np.testing.assert_array_equal(after.outputs["probabilities"], want)

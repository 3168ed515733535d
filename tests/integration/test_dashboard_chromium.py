"""The dashboard in a real headless Chromium, against the real server.

The server runs as ``fleet_server serve`` builds it (``create_app`` + ``attach_mqtt`` with the
embedded broker) plus :func:`fleet_server.dashboard.mount`, under uvicorn on a free loopback
port. The data is made through the real API: real bundles converted by ``model_tools`` (with
calibration data, so their manifests carry a drift baseline), provisioned devices (three of
them played by paho clients that verify each signed desired state and report it applied, one
that never connects, one revoked), a plain deployment of 1.0.0 and a rollout of 2.0.0 in waves
``1,100%`` left baking, and alert rules added through the API.

Then an hour of traffic, on the server's injected clock (moved in 5-minute steps, never
waited for): each device serves inputs through the real model (onnxruntime) into a real
:class:`agent.drift.DriftMonitor` and :class:`agent.metrics.RequestMetrics`, and publishes the
drift summaries and metrics over MQTT as the agent does. pi-2's inputs drift further every
step, so its PSI rises and the drift rule fires; pi-3 has an error burst whose alert fires and
resolves. The server's own alert evaluation runs after each step, as its maintenance pass
would.

Debian's ``/usr/bin/chromium`` is driven through ``/usr/bin/chromedriver`` with selenium, in
one browser session: sign in by typing the token, open every page, read the figures from the
DOM and compare them with the JSON API's answers, check the wave, PSI, latency and
distribution charts are drawn (their marks and a non-zero bounding box), and take a
full-page PNG of each page: into ``docs/screenshots/`` with ``EDGEFLEET_SAVE_SCREENSHOTS=1``,
else into the test's temporary directory.
"""

from __future__ import annotations

import io
import json
import os
import queue
import socket
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import paho.mqtt.client as paho
import pytest
from onnx import TensorProto, helper
from paho.mqtt.enums import CallbackAPIVersion

from agent.drift import DRIFT_SUMMARY_KIND, DriftMonitor
from agent.metrics import METRICS_KIND, RequestMetrics
from agent.protocol.messages import (
    DriftBatch,
    Record,
    Reported,
    RunningModel,
    Status,
    TelemetryBatch,
)
from agent.protocol.provisioning import Provisioning
from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from agent.protocol.topics import device_topic
from fleet_server.api import create_app
from fleet_server.dashboard import mount
from fleet_server.dashboard.render import ago
from fleet_server.fleet import Fleet, init_data_dir
from fleet_server.monitoring import evaluate_alerts
from fleet_server.runtime import attach_mqtt
from fleet_server.settings import Settings
from model_tools.pipeline import ConvertRequest, convert
from model_tools.profiles import get_profile

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-proxy-server",
         "--window-size=1280,900", "--hide-scrollbars", "--force-device-scale-factor=1")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
WAIT = 20.0  # seconds: the bound on every wait for the server (they end in milliseconds)
MODEL = "tiny"
STEP_S = 300  # the story's time step on the server's clock
STEPS = 11
T = TypeVar("T")


def until(what: str, check: Callable[[], T | None], timeout: float = WAIT) -> T:
    """Poll the real server until ``check`` returns something (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@dataclass(frozen=True)
class Bundle:
    tar: bytes
    model: bytes  # model.onnx
    baseline: dict[str, Any]  # the manifest's drift baseline


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    """version -> a real bundle (a tiny softmax classifier converted for rpi4, fp32, its drift
    baseline from standard-normal calibration inputs)."""
    d = tmp_path_factory.mktemp("tiny")
    calibration = d / "calibration.npz"
    np.savez(calibration, x=np.random.default_rng(7).normal(size=(600, 4)).astype(np.float32))
    out: dict[str, Bundle] = {}
    for seed, version in enumerate(("1.0.0", "2.0.0")):
        w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3],
                               np.random.default_rng(seed).normal(size=12).astype(np.float32))
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["z"]),
             helper.make_node("Softmax", ["z"], ["p"], axis=1)],
            "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 3])], [w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                  ir_version=10)
        onnx.save(model, d / f"tiny-{version}.onnx")
        bundle = d / f"bundle-{version}"
        convert(ConvertRequest(model=d / f"tiny-{version}.onnx", profile=get_profile("rpi4"),
                               out=bundle, name=MODEL, version=version, precision="fp32",
                               calibration=calibration, latency_runs=10))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for f in sorted(bundle.iterdir()):
                tar.add(f, arcname=f.name)
        manifest = json.loads((bundle / "manifest.json").read_text())
        out[version] = Bundle(buf.getvalue(), (bundle / "model.onnx").read_bytes(),
                              manifest["drift_baseline"])
    return out


class Clock:
    """The server's clock: fixed, moved by the test."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@dataclass
class Server:
    base: str
    admin: str
    http: httpx.Client
    clock: Clock
    fleet: Fleet

    def api(self, method: str, url: str, status: int = 200, **kw: Any) -> Any:
        r = self.http.request(method, url, **kw)
        assert r.status_code == status, r.text
        return r.json()


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """The server with the dashboard, under uvicorn on 127.0.0.1 (port chosen by the OS), its
    clock fixed an hour before the real time (the devices check desired-state expiry against
    theirs); the story moves it to the real time."""
    import uvicorn

    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)  # selenium talks to chromedriver on loopback
        monkeypatch.delenv(name.upper(), raising=False)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections queue until uvicorn accepts: no readiness polling needed
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(data_dir=tmp_path / "data", public_url=base, mqtt_port=0)
    clock = Clock(int(time.time()) - STEPS * STEP_S)
    admin = init_data_dir(settings, clock=clock)
    app = create_app(settings, clock=clock)
    attach_mqtt(app, maintenance_interval_s=3600)
    mount(app)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {admin}"},
                          trust_env=False, timeout=30) as http:
            until("the server to start", lambda: http.get("/healthz").status_code == 200)
            yield Server(base, admin, http, clock, app.state.fleet)
    finally:
        uv.should_exit = True
        thread.join(timeout=15)
        sock.close()


class Device:
    """A paho client playing a device: verifies each signed desired state, reports it."""

    def __init__(self, prov: Provisioning) -> None:
        self.prov = prov
        self.keys = trusted_keys_from_pem(prov.director_keys_pem)
        self.sequence = 0
        self.inbox: queue.Queue[bytes] = queue.Queue()
        self.client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"test-{prov.device_id}", protocol=paho.MQTTv311)
        self.client.username_pw_set(prov.mqtt_username, prov.mqtt_password)
        self.client.on_message = lambda c, u, m: self.inbox.put(bytes(m.payload))
        self.seq = {"telemetry": 0, "drift": 0}
        self.version = ""

    def connect(self) -> None:
        host, port = self.prov.mqtt_url.split("//", 1)[1].rsplit(":", 1)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe(device_topic(self.prov.device_id, "desired"), qos=1)
        self.publish("status", Status(device_id=self.prov.device_id, online=True,
                                      at=int(time.time())).to_bytes())

    def publish(self, kind: str, payload: bytes) -> None:
        topic = device_topic(self.prov.device_id, kind)
        self.client.publish(topic, payload, qos=1, retain=kind == "status"
                            ).wait_for_publish(WAIT)

    def apply_next(self) -> str:
        """Take the next desired state (verified as the agent does), report it applied ok;
        return the version it runs now."""
        envelope = self.inbox.get(timeout=WAIT)
        state = verify_desired(envelope, public_keys=self.keys, device_id=self.prov.device_id,
                               last_sequence=self.sequence, now=int(time.time()))
        self.sequence = state.sequence
        version = self.version = next(m.version for m in state.models if m.name == MODEL)
        self.publish("reported", Reported(
            device_id=self.prov.device_id, applied_sequence=state.sequence,
            running=(RunningModel(MODEL, version, "0" * 64),), state="Committed",
            last_result="ok", last_error=None, agent_version="test",
            reported_at=int(time.time())).to_bytes())
        return version

    def send(self, kind: str, body: dict[str, Any], at: int) -> None:
        """One record on the telemetry or drift stream, as the agent's outbox sends it."""
        stream = "drift" if kind == DRIFT_SUMMARY_KIND else "telemetry"
        self.seq[stream] += 1
        records = (Record(seq=self.seq[stream], kind=kind, at=at, body=body),)
        batch = DriftBatch if stream == "drift" else TelemetryBatch
        self.publish(stream, batch(device_id=self.prov.device_id, records=records).to_bytes())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def running(srv: Server, device_id: str) -> str | None:
    reported = srv.api("GET", f"/v1/devices/{device_id}")["reported"] or {}
    return next((m["version"] for m in reported.get("running", ())), None)


def make_fleet(srv: Server, bundles: dict[str, Bundle]) -> list[Device]:
    """pi-1, pi-2, pi-3 online (paho), pi-4 never connected (tagged spare, so no deployment
    selects it), pi-5 revoked; 1.0.0 on the lab devices, then 2.0.0 rolling out in waves
    1,100% with a two-hour bake."""
    for bundle in bundles.values():
        srv.api("POST", "/v1/models", 201, content=bundle.tar,
                headers={"Content-Type": "application/x-tar"})
    provs = {d: Provisioning.from_dict(srv.api("POST", "/v1/devices", 201, json={
        "id": d, "profile": "rpi4", "tags": ["spare" if d == "pi-4" else "lab"]}
    )["provisioning"]) for d in ("pi-1", "pi-2", "pi-3", "pi-4", "pi-5")}
    srv.api("POST", "/v1/devices/pi-5/revoke")
    online = [Device(provs[d]) for d in ("pi-1", "pi-2", "pi-3")]
    for dev in online:
        dev.connect()
    until("three devices online", lambda: sum(
        d["online"] for d in srv.api("GET", "/v1/devices")["items"]) == 3)
    srv.api("POST", "/v1/deployments", 201,
            json={"model": MODEL, "version": "1.0.0", "selector": {"tags": ["lab"]}})
    for dev in online:
        assert dev.apply_next() == "1.0.0"
    until("1.0.0 reported", lambda: all(
        running(srv, d.prov.device_id) == "1.0.0" for d in online))
    rollout = srv.api("POST", "/v1/deployments", 201, json={
        "model": MODEL, "version": "2.0.0", "selector": {"tags": ["lab"]},
        "rollout": {"waves": "1,100%", "gates": {"bake_s": 7200, "latency_gate": False}}}
    )["rollout"]
    first = [d["device_id"] for d in rollout["devices"]]
    assert len(first) == 1
    for dev in online:
        if dev.prov.device_id in first:
            assert dev.apply_next() == "2.0.0"
            until("the first wave's device committed", lambda: srv.api(
                "GET", f"/v1/rollouts/{rollout['id']}")["waves"][0]["committed"] == 1)
    return online


def stored(srv: Server, device_id: str, since: int) -> tuple[int, int]:
    """(drift windows, requests) the server has of the device since ``since``."""
    totals = srv.api("GET", f"/v1/monitoring/devices/{device_id}",
                     params={"since": since})["totals"]
    return totals["drift_windows"], totals["requests"]


def serve_an_hour(srv: Server, online: list[Device], bundles: dict[str, Bundle]) -> None:
    """STEPS steps of STEP_S on the server's clock. Per step and device: 300 predictions of
    the real model on standard-normal inputs (the calibration distribution), one drift window
    and one metrics interval, sent over MQTT; pi-2's feature 2 drifts further every step from
    the fourth on, pi-3 fails 12% of its requests in steps 3 and 4. The alert rules are
    judged after each step."""
    srv.api("POST", "/v1/alert-rules", 201, json={
        "model": MODEL, "kind": "drift_psi", "threshold": 0.25, "for_s": 600,
        "window_s": 900, "min_samples": 200})
    srv.api("POST", "/v1/alert-rules", 201, json={
        "model": MODEL, "kind": "error_rate", "threshold": 0.05, "window_s": 600,
        "min_samples": 100})
    sessions = {v: ort.InferenceSession(b.model, providers=["CPUExecutionProvider"])
                for v, b in bundles.items()}
    monitors = {d.prov.device_id: DriftMonitor(bundles[d.version].baseline, window=300,
                                               window_s=1e9, model=MODEL, version=d.version)
                for d in online}
    rng = np.random.default_rng(3)
    base = srv.clock.now
    for step in range(1, STEPS + 1):
        srv.clock.now = now = base + step * STEP_S
        for dev in online:
            name = dev.prov.device_id
            x = rng.normal(size=(300, 4)).astype(np.float32)
            if name == "pi-2" and step >= 4:
                x[:, 2] += 0.3 * (step - 3)
            metrics = RequestMetrics(start=float(now - STEP_S))
            summary = None
            for part in np.split(x, 6):  # six requests' batches of 50 rows
                started = time.perf_counter()
                [p] = sessions[dev.version].run(None, {"x": part})
                row_ms = (time.perf_counter() - started) * 1000 / len(part)
                summary = monitors[name].observe({"x": part}, {"p": p}, float(now)) or summary
                for i in range(len(part)):  # one row per request, plus a device's overhead
                    ok = not (name == "pi-3" and step in (3, 4) and i % 8 == 0)
                    metrics.observe(MODEL, dev.version, row_ms + float(rng.gamma(4.0, 1.5)),
                                    ok, None if ok else "runtime")
            assert summary is not None  # 300 predictions close one window of 300
            dev.send(DRIFT_SUMMARY_KIND, summary.to_body(), now)
            for body in metrics.flush(float(now)):
                dev.send(METRICS_KIND, body, now)
        for dev in online:
            until(f"{dev.prov.device_id}'s step {step} stored",
                  lambda d=dev, n=step: stored(srv, d.prov.device_id, base) == (n, 300 * n))
        evaluate_alerts(srv.fleet, now=now)


# ------------------------------------------------------------------------------ the browser
def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not CHROMIUM.is_file() or not CHROMEDRIVER.is_file():
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install -y chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


class Pages:
    """The browser on the dashboard: open a page, read it, keep a full-page screenshot."""

    def __init__(self, driver: Any, base: str, out: Path) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.base, self.out, self.by = driver, base, out, By
        self.shots: list[Path] = []

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def click(self, element: Any, lands: str) -> None:
        """Click a link or button and wait until the browser shows ``lands`` (a path)."""
        from selenium.webdriver.support.wait import WebDriverWait

        element.click()
        WebDriverWait(self.driver, WAIT).until(
            lambda d: d.current_url == self.base + lands
            and d.execute_script("return document.readyState") == "complete")

    def one(self, css: str, within: Any = None) -> Any:
        found = (within or self.driver).find_elements(self.by.CSS_SELECTOR, css)
        assert len(found) == 1, f"{css}: expected one element, found {len(found)}"
        return found[0]

    def all(self, css: str, within: Any = None) -> list[Any]:
        return list((within or self.driver).find_elements(self.by.CSS_SELECTOR, css))

    def text(self, css: str, within: Any = None) -> str:
        return str(self.one(css, within).text).strip()

    def shot(self, name: str) -> None:
        height = int(self.driver.execute_script(
            "return document.documentElement.scrollHeight"))
        self.driver.set_window_size(1280, max(700, min(height + 120, 4000)))
        path = self.out / f"{name}.png"
        assert self.driver.save_screenshot(str(path)), path
        self.shots.append(path)
        self.driver.set_window_size(1280, 900)


def test_every_page_in_chromium_shows_what_the_api_says(
        browser: Any, server: Server, bundles: dict[str, Bundle], tmp_path: Path) -> None:
    online = make_fleet(server, bundles)
    serve_an_hour(server, online, bundles)
    out = SCREENSHOTS if os.environ.get("EDGEFLEET_SAVE_SCREENSHOTS") == "1" \
        else tmp_path / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    ui = Pages(browser, server.base, out)
    api = server.api

    # ---- sign in by typing the token (the redirect brings us back to the page asked for)
    ui.open("/ui/devices")
    assert browser.current_url.startswith(f"{server.base}/ui/login?next=%2Fui%2Fdevices")
    ui.shot("login")
    ui.one("#token").send_keys(server.admin)
    ui.click(ui.one("#signin"), "/ui/devices")
    cookies = browser.get_cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == \
        [("edgefleet_session", True, "Strict")]
    assert server.admin not in cookies[0]["value"]

    # ---- overview
    ui.open("/ui/")
    devices = api("GET", "/v1/devices")["items"]
    live = [d for d in devices if not d["revoked"]]
    rollouts = api("GET", "/v1/rollouts")["items"]

    def count(name: str) -> int:
        return int(ui.text(f"[data-count='{name}']"))
    assert count("devices-online") == sum(d["online"] for d in live) == 3
    assert count("devices-offline") == sum(not d["online"] for d in live) == 1
    assert count("devices-revoked") == sum(d["revoked"] for d in devices) == 1
    assert count("devices-total") == len(devices) == 5
    alerts = {s: api("GET", "/v1/alerts", params={"state": s})["items"]
              for s in ("firing", "pending", "resolved")}
    assert count("alerts-firing") == len(alerts["firing"]) == 1
    assert count("model-versions") == api("GET", "/v1/models")["total"] == 2
    assert count("rollouts-running") == sum(r["status"] == "running" for r in rollouts) == 1
    ui.shot("overview")

    # ---- devices
    ui.open("/ui/devices")
    rows = ui.all("tr[data-device]")
    assert [r.get_attribute("data-device") for r in rows] == [d["id"] for d in devices]
    for row, d in zip(rows, devices, strict=True):
        status = "revoked" if d["revoked"] else "online" if d["online"] else "offline"
        assert ui.text("[data-field='online']", row) == status
        assert ui.text("[data-field='profile']", row) == d["profile"]
        versions = [f"{m['name']} {m['version']}" for m in (d["reported"] or {}).get(
            "running", [])]
        assert ui.text("[data-field='running']", row) == (", ".join(versions) or "—")
        assert ui.text("[data-field='last-seen']", row) == \
            ago(d["last_seen_at"], server.clock.now)
    ui.shot("devices")

    # ---- one device
    moved = next(d for d in online if running(server, d.prov.device_id) == "2.0.0")
    detail = api("GET", f"/v1/devices/{moved.prov.device_id}")
    ui.click(ui.one(f"tr[data-device='{moved.prov.device_id}'] a"),
             f"/ui/devices/{moved.prov.device_id}")
    assert ui.text("[data-field='running']") == f"{MODEL} 2.0.0"
    assert ui.text("[data-field='desired-sequence']") == str(detail["desired"]["sequence"])
    assert [ui.text("[data-field='outcome']", r) for r in ui.all("tr[data-rollout]")] == \
        [r["outcome"] for r in detail["rollouts"]] == ["committed"]
    ui.shot("device")

    # ---- rollouts, with the wave chart
    ui.open("/ui/rollouts")
    r = rollouts[0]
    section = ui.one(f"section[data-rollout='{r['id']}']")
    shown = [{k: int(ui.text(f"[data-field='{k}']", row)) for k in
              ("assigned", "committed", "failed", "pending", "reverted")}
             for row in ui.all("table.waves tbody tr", section)]
    counts = [{k: w[k] for k in ("assigned", "committed", "failed", "pending", "reverted")}
              for w in r["waves"]]
    assert shown[:len(counts)] == counts
    assert shown == [{"assigned": 1, "committed": 1, "failed": 0, "pending": 0, "reverted": 0},
                     {"assigned": 0, "committed": 0, "failed": 0, "pending": 0, "reverted": 0}]
    statuses = {(int(g.get_attribute("data-gate-wave")), g.get_attribute("data-gate")):
                ui.text("[data-field='gate-status']", g) for g in ui.all("tr[data-gate]",
                                                                         section)}
    assert statuses == {(g["wave"], g["gate"]): {True: "passed", False: "failed",
                                                 None: "waiting"}[g["ok"]] for g in r["gates"]}
    assert "waiting for bake" in ui.text("[data-field='why']", section)
    svg = ui.one("svg.chart", section)
    assert svg.rect["width"] > 300 and svg.rect["height"] > 150
    bars = ui.all("rect.bar", section)
    assert len(bars) == 2 * 4  # waves x (target, committed, failed, pending)
    values = {(b.get_attribute("data-category"), b.get_attribute("data-series")):
              float(b.get_attribute("data-value")) for b in bars}
    assert values[("wave 1", "committed")] == 1 and values[("wave 2", "target")] == 3
    drawn = {k: b.rect["height"] for k, b in zip(values, bars, strict=True)}
    assert drawn[("wave 2", "target")] == pytest.approx(3 * drawn[("wave 1", "target")],
                                                        abs=1.5)
    assert drawn[("wave 1", "failed")] == 0
    ui.shot("rollouts")

    # ---- one rollout
    ui.click(ui.one("h3 a", section), f"/ui/rollouts/{r['id']}")
    full = api("GET", f"/v1/rollouts/{r['id']}")
    assert [row.get_attribute("data-device") for row in ui.all("tr[data-device]")] == \
        [d["device_id"] for d in full["devices"]]
    ui.shot("rollout")

    # ---- models: every version's figures as GET /v1/monitoring/fleet says (last hour)
    hour = {"since": server.clock.now - 3600}
    ui.open("/ui/models")
    fleet = api("GET", "/v1/monitoring/fleet", params=hour)
    [model] = fleet["models"]
    for version in [None, *model["versions"]]:
        want = model if version is None else version
        row = ui.one(f"tr[data-model='{MODEL}'][data-version='"
                     f"{'' if version is None else version['version']}']")
        for key in ("requests", "errors", "running_devices"):
            assert int(ui.text(f"[data-field='{key}']", row)) == want[key]
        for key in ("error_rate", "p95_ms", "max_psi"):
            cell = ui.one(f"[data-field='{key}']", row).get_attribute("data-value")
            assert float(cell) == want[key]
    assert model["requests"] == 3 * STEPS * 300 and model["max_psi"] > 0.25
    ui.shot("models")

    # ---- one model: PSI over time (pi-2 rising over the threshold), health, distribution
    ui.click(ui.one(f"tr[data-model='{MODEL}'][data-version=''] [data-field='model'] a"),
             f"/ui/models/{MODEL}?since=1h")
    drift = api("GET", f"/v1/monitoring/models/{MODEL}/drift", params=hour)
    with_data = [b for b in drift["buckets"] if b["max_psi"] is not None]
    assert len(with_data) == STEPS
    psi = ui.one("[data-chart='psi'] svg.chart")
    assert psi.rect["width"] > 300 and psi.rect["height"] > 150
    points = [(p.get_attribute("data-series"), float(p.get_attribute("data-y")))
              for p in ui.all("circle.point", psi)]
    assert points == [("max over devices", b["max_psi"]) for b in with_data] + \
        [("mean over devices", b["mean_psi"]) for b in with_data]
    assert float(ui.one("line.threshold", psi).get_attribute("data-value")) == 0.25
    trends = {d["device"]: d["trend"] for d in drift["devices"]}
    assert trends["pi-2"] == "rising" and trends["pi-1"] == trends["pi-3"] == "steady"
    for chart in ("requests", "p95", "distribution"):
        svg = ui.one(f"[data-chart='{chart}'] svg.chart")
        assert svg.rect["width"] > 300 and svg.rect["height"] > 150, chart
    note = ui.one("[data-field='distribution']")
    dist = api("GET", f"/v1/monitoring/models/{MODEL}/distribution", params={
        **hour, "version": note.get_attribute("data-version"),
        "input": note.get_attribute("data-input"),
        "feature": note.get_attribute("data-feature")})
    assert (dist["input"], dist["feature"]) == ("x", 2)  # the drifting feature, by default
    live = [float(b.get_attribute("data-value")) for b in ui.all(
        "[data-chart='distribution'] rect.bar[data-series='live']")]
    assert live == dist["live"]
    ui.shot("model")
    ui.click(ui.one("[data-field='device-picker'] a[data-device='pi-2']"),
             f"/ui/models/{MODEL}?since=1h&device=pi-2&version={dist['version']}")
    mine = api("GET", f"/v1/monitoring/models/{MODEL}/drift", params={**hour, "device": "pi-2"})
    ys = [float(p.get_attribute("data-y")) for p in ui.all("[data-chart='psi'] circle.point")]
    assert ys == [b["max_psi"] for b in mine["buckets"] if b["max_psi"] is not None]
    assert ys[-1] > 0.25 > ys[0]
    ui.shot("model-device")

    # ---- alerts: pi-2's drift firing, pi-3's error burst resolved
    ui.open("/ui/alerts")
    for state, items in alerts.items():
        assert [int(r.get_attribute("data-alert")) for r in
                ui.all(f"tr[data-state='{state}']")] == [a["id"] for a in items]
    firing = ui.one("tr[data-state='firing']")
    assert [(b.get_attribute("data-device"), float(b.get_attribute("data-value")))
            for b in ui.all(".breach", firing)] == \
        [(d["device"], d["value"]) for d in alerts["firing"][0]["devices"]]
    assert alerts["firing"][0]["kind"] == "drift_psi"
    assert [a["kind"] for a in alerts["resolved"]] == ["error_rate"]
    ui.shot("alerts")

    # ---- pi-2's health on its device page
    ui.open("/ui/devices/pi-2")
    seen = api("GET", "/v1/monitoring/devices/pi-2", params=hour)
    assert int(ui.text("[data-field='health-requests']")) == seen["totals"]["requests"]
    assert float(ui.one("tr[data-model] [data-field='latest_max_psi']").get_attribute(
        "data-value")) > 0.25
    ui.shot("device-health")

    # ---- audit log
    ui.open("/ui/audit")
    audit = api("GET", "/v1/audit", params={"limit": 500})
    assert ui.one("[data-field='chain']").get_attribute("data-intact") == "true"
    assert audit["chain_intact"] is True
    assert int(ui.text("[data-field='total']")) == len(audit["items"])
    first = ui.all("tr[data-entry]")[0]
    newest = audit["items"][-1]
    assert ui.text("[data-field='id']", first) == str(newest["id"])
    assert ui.text("[data-field='action']", first) == newest["action"]
    ui.shot("audit")

    # ---- sign out; a hostile token name is shown as text, never run
    ui.click(ui.one("form.signout button"), "/ui/login?reason=signedout")
    assert browser.get_cookies() == []
    hostile = "<script>document.title='pwned'</script>"
    token = api("POST", "/v1/tokens", 201, json={"name": hostile, "scope": "reader"})["token"]
    ui.one("#token").send_keys(token)
    ui.click(ui.one("#signin"), "/ui/")
    assert ui.text("[data-field='signed-in-as']") == f"reader:{hostile}"
    assert browser.title == "Overview · edgefleet"
    assert ui.all("a[href='/ui/audit']") == []  # a reader is not offered the audit log

    for dev in online:
        dev.close()
    for path in ui.shots:
        width, height = _png_size(path)
        assert width == 1280 and height >= 700, (path, width, height)

"""The dashboard through TestClient over a real fleet: sign-in, sessions, every page, escaping,
and the SVG charts (STYLE rules 13, 16, 17).

The fleet is real: a data directory from ``init_data_dir``, SQLite, devices provisioned and
deployments made through the admin API, and device messages (status, reported state with a
hostile error text) stored through the MQTT runtime's own ingest path. Only the artifacts are
rows inserted directly (their files are never fetched here). The clock is injected: session
expiry is tested by moving it, never by waiting.

Pages are parsed as XML (the templates emit well-formed XHTML-compatible markup, so a page that
is not well-formed fails here), and every figure is compared with the JSON API's answer for the
same thing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import math
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import (
    PUBLISHER,
    Digits,
    Fleetlet,
    metrics_body,
    trained_digits,
)
from sqlalchemy import update

from agent.protocol.messages import Reported, RunningModel, Status
from agent.protocol.provisioning import Provisioning
from agent.protocol.topics import device_topic
from fleet_server import audit, auth
from fleet_server.api import create_app
from fleet_server.dashboard import COOKIE, mount
from fleet_server.dashboard.charts import (
    BarSeries,
    LineSeries,
    bar_chart,
    line_chart,
    nice_ticks,
    time_ticks,
)
from fleet_server.dashboard.sessions import SessionStore
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.monitoring import AlertRule, create_rule, evaluate_alerts
from fleet_server.runtime import MqttRuntime
from fleet_server.settings import Settings
from model_tools.examples.digits import shifted

START = 1_800_000_000  # monitoring_helpers' START too
MODEL = "m"
SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert('x')</script>"
PAGES = ("/ui/", "/ui/devices", "/ui/devices/dev-0", "/ui/rollouts", "/ui/rollouts/2",
         "/ui/audit", "/ui/models", "/ui/models/m", "/ui/alerts")
DEAD_BLOCK = {r * 8 + c for r in range(2, 6) for c in range(2, 6)}  # shifted(..., "dead")


class Clock:
    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> float:
        return float(self.now)


@dataclass
class Recorder:
    """The Publisher seam (nothing here talks MQTT)."""

    desired: list[tuple[str, bytes]] = field(default_factory=list)

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        self.desired.append((device_id, envelope))

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        pass


@dataclass
class World:
    client: TestClient
    fleet: Fleet
    runtime: MqttRuntime
    clock: Clock
    admin: str
    reader: str
    applied: dict[str, int] = field(default_factory=dict)

    def api(self, method: str, url: str, status: int = 200, **kw: Any) -> Any:
        r = self.client.request(method, url, headers={"Authorization": f"Bearer {self.admin}"},
                                **kw)
        assert r.status_code == status, r.text
        return r.json()

    def send(self, message: Reported | Status) -> None:
        kind = "reported" if isinstance(message, Reported) else "status"
        self.runtime.ingest(device_topic(message.device_id, kind), message.to_bytes())
        self.runtime.wait_replans(timeout=30)

    def report(self, device_id: str, error: str | None = None) -> None:
        """The device applies its signed desired state (ok) and reports it."""
        desired = self.api("GET", f"/v1/devices/{device_id}")["desired"]
        version = next(m["version"] for m in desired["models"] if m["name"] == MODEL)
        self.applied[device_id] = desired["sequence"]
        self.send(Reported(
            device_id=device_id, applied_sequence=desired["sequence"],
            running=(RunningModel(MODEL, version, "a" * 64),), state="Committed",
            last_result="ok", last_error=error, agent_version="test",
            reported_at=self.clock.now))

    def settle(self, devices: list[str]) -> None:
        """Each device applies every new desired state it was given (those given one by the
        re-plan its report triggered included)."""
        while pending := [d for d in devices if self.new_state(d)]:
            for device_id in pending:
                self.report(device_id)

    def new_state(self, device_id: str) -> bool:
        desired = self.api("GET", f"/v1/devices/{device_id}")["desired"]
        return desired is not None and desired["sequence"] > self.applied.get(device_id, 0)

    def login(self, token: str) -> httpx.Response:
        return self.client.post("/ui/login", data={"token": token, "next": "/ui/"},
                                follow_redirects=False)

    def page(self, path: str, status: int = 200) -> ET.Element:
        r = self.client.get(path, follow_redirects=False)
        assert r.status_code == status, r.text[:2000]
        return dom(r)


def dom(r: httpx.Response) -> ET.Element:
    """The page as an element tree (it must be well-formed)."""
    assert r.headers["content-type"].startswith("text/html"), r.headers
    return ET.fromstring(r.text.removeprefix("<!doctype html>"))


def text(el: ET.Element | None) -> str:
    assert el is not None
    return " ".join("".join(el.itertext()).split())


def one(root: ET.Element, path: str) -> ET.Element:
    found = root.findall(path)
    assert len(found) == 1, f"{path}: expected one element, found {len(found)}"
    return found[0]


@contextmanager
def serve(data_dir: Path, clock: Clock, admin: str, reader: str = "",
          applied: dict[str, int] | None = None) -> Iterator[World]:
    """The app with the dashboard mounted (3 rows a page) over an initialised data dir."""
    settings = Settings(data_dir=data_dir)
    fleet = open_fleet(settings, clock=clock, publisher=Recorder())
    app = create_app(settings, fleet=fleet)
    mount(app, page_size=3)
    runtime = MqttRuntime(fleet)  # never started: its ingest path only
    try:
        with TestClient(app) as client:
            yield World(client, fleet, runtime, clock, admin, reader, dict(applied or {}))
    finally:
        asyncio.run(runtime.stop())  # its worker threads (no broker or link was started)
        fleet.engine.dispose()


@dataclass(frozen=True)
class Template:
    data_dir: Path
    now: int
    admin: str
    reader: str
    applied: dict[str, int]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """Five rpi4 devices tagged lab (dev-4 revoked; dev-0..2 online, dev-3 never connected),
    model m 1 deployed to all and applied, then m 2 rolling out in waves ``1,100%`` with a
    600 s bake: its first device committed, the wave baking. Built once; each test gets a
    copy (:func:`world`)."""
    data_dir = tmp_path_factory.mktemp("dashboard") / "data"
    clock = Clock(START)
    admin = init_data_dir(Settings(data_dir=data_dir), clock=clock)
    with serve(data_dir, clock, admin) as w:
        w.reader = w.api("POST", "/v1/tokens", 201,
                         json={"name": "viewer", "scope": "reader"})["token"]
        for i in range(5):
            w.api("POST", "/v1/devices", 201,
                  json={"id": f"dev-{i}", "profile": "rpi4", "tags": ["lab"]})
        w.api("POST", "/v1/devices/dev-4/revoke")
        with atomic(w.fleet.engine) as conn:
            for version in ("1", "2"):
                conn.execute(tables.artifacts.insert().values(
                    name=MODEL, version=version, profile="rpi4", runtime="onnxruntime",
                    precision="fp32", sha256="a" * 64, length=10,
                    target_path=f"models/{MODEL}/{version}/rpi4/model.onnx",
                    manifest_target=f"models/{MODEL}/{version}/rpi4/manifest.json",
                    manifest="{}", created_at=START, created_by="t"))
        for i in range(3):
            w.send(Status(device_id=f"dev-{i}", online=True, at=START))
        live = [f"dev-{i}" for i in range(4)]
        w.api("POST", "/v1/deployments", 201,
              json={"model": MODEL, "version": "1", "selector": {"tags": ["lab"]}})
        w.settle(live)
        w.clock.now += 60
        w.api("POST", "/v1/deployments", 201, json={
            "model": MODEL, "version": "2", "selector": {"tags": ["lab"]},
            "rollout": {"waves": "1,100%", "gates": {"bake_s": 600, "latency_gate": False}}})
        w.settle(live)
        w.clock.now += 30
        return Template(data_dir, w.clock.now, w.admin, w.reader, w.applied)


@pytest.fixture
def world(template: Template, tmp_path: Path) -> Iterator[World]:
    """A fresh copy of the template fleet, served (nothing a test does leaks into another)."""
    data_dir = tmp_path / "data"
    shutil.copytree(template.data_dir, data_dir)
    with serve(data_dir, Clock(template.now), template.admin, template.reader,
               template.applied) as w:
        yield w


@pytest.fixture
def signed_in(world: World) -> World:
    r = world.login(world.admin)
    assert r.status_code == 303, r.text
    return world


# ------------------------------------------------------------------------------ sign-in
@pytest.mark.parametrize("path", PAGES)
def test_pages_without_a_session_redirect_to_sign_in(world: World, path: str) -> None:
    r = world.client.get(path, follow_redirects=False)
    assert r.status_code == 303
    where = urlsplit(r.headers["location"])
    assert where.path == "/ui/login"
    assert parse_qs(where.query) == {"next": [path], "reason": ["signin"]}


def test_root_redirects_to_the_dashboard(world: World) -> None:
    r = world.client.get("/", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/")


@pytest.mark.parametrize(("who", "status", "error"), [
    ("admin", 303, None),
    ("reader", 303, None),
    ("unknown", 401, "Sign-in refused: invalid token."),
    ("empty", 401, "Sign-in refused: missing token"),
    ("revoked", 401, "Sign-in refused: token revoked."),
    ("device", 403, "Sign-in refused: this needs a 'reader' token; yours is 'device'."),
], ids=["admin", "reader", "unknown token", "empty", "revoked token", "device token"])
def test_sign_in_checks_the_token_as_the_api_does(world: World, who: str, status: int,
                                                  error: str | None) -> None:
    if who == "revoked":
        token = world.api("POST", "/v1/tokens", 201,
                          json={"name": "gone", "scope": "reader"})
        with atomic(world.fleet.engine) as conn:
            auth.revoke_token(conn, token["id"], world.clock.now)
        secret = token["token"]
    elif who == "device":
        prov = world.api("POST", "/v1/devices", 201, json={"id": "dev-9", "profile": "rpi4"})
        secret = Provisioning.from_dict(prov["provisioning"]).http_token
    else:
        secret = {"admin": world.admin, "reader": world.reader, "unknown": "ef_admin_nope",
                  "empty": "  "}[who]
    r = world.login(secret)
    assert r.status_code == status, r.text
    if error is None:
        assert r.headers["location"] == "/ui/"
        cookie = r.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
        assert "Max-Age=28800" in cookie
        assert secret not in cookie  # the bearer secret never reaches the browser
        assert world.page("/ui/").find(".//*[@data-field='signed-in-as']") is not None
    else:
        assert "set-cookie" not in r.headers
        assert text(one(dom(r), ".//*[@data-field='error']")).startswith(error)
        assert world.client.get("/ui/", follow_redirects=False).status_code == 303


def test_revoking_the_token_ends_its_sessions_at_once(world: World) -> None:
    token = world.api("POST", "/v1/tokens", 201, json={"name": "short", "scope": "reader"})
    assert world.login(token["token"]).status_code == 303
    world.page("/ui/devices")
    with atomic(world.fleet.engine) as conn:
        auth.revoke_token(conn, token["id"], world.clock.now)
    r = world.client.get("/ui/devices", follow_redirects=False)
    assert r.status_code == 303
    assert parse_qs(urlsplit(r.headers["location"]).query)["reason"] == ["revoked"]
    assert len(world.client.app.state.dashboard.sessions) == 0


def test_session_expires_on_the_injected_clock(world: World) -> None:
    assert world.login(world.reader).status_code == 303
    world.clock.now += 8 * 3600 - 1
    world.page("/ui/")
    world.clock.now += 1
    r = world.client.get("/ui/", follow_redirects=False)
    assert r.status_code == 303
    assert parse_qs(urlsplit(r.headers["location"]).query)["reason"] == ["expired"]
    login = world.page(r.headers["location"])
    assert text(one(login, ".//*[@data-field='message']")) == \
        "Your session expired. Sign in again."


def test_sign_out_ends_the_session_even_for_a_copied_cookie(world: World) -> None:
    assert world.login(world.reader).status_code == 303
    copied = world.client.cookies[COOKIE]
    r = world.client.post("/ui/logout", follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/login?reason=signedout")
    assert f'{COOKIE}=""' in r.headers["set-cookie"]
    world.client.cookies.set(COOKIE, copied, path="/ui")
    assert world.client.get("/ui/", follow_redirects=False).status_code == 303


@pytest.mark.parametrize(("headers", "status"), [
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Sec-Fetch-Site": "cross-site"}, 403),
    ({"Origin": "http://testserver"}, 303),
    ({}, 303),
], ids=["other origin", "opaque origin", "cross-site fetch", "own origin", "no origin"])
def test_sign_in_from_another_site_is_refused(world: World, headers: dict[str, str],
                                              status: int) -> None:
    r = world.client.post("/ui/login", data={"token": world.admin}, headers=headers,
                          follow_redirects=False)
    assert r.status_code == status, r.text
    assert ("set-cookie" in r.headers) == (status == 303)


@pytest.mark.parametrize(("given", "lands"), [
    ("/ui/devices?page=2", "/ui/devices?page=2"),
    ("/ui", "/ui"),
    ("https://evil.example/ui/", "/ui/"),
    ("//evil.example/ui/", "/ui/"),
    ("/v1/devices", "/ui/"),
    ("/ui\\..\\x", "/ui/"),
    ("", "/ui/"),
], ids=["dashboard page", "dashboard root", "other site", "scheme-relative", "api route",
        "backslashes", "none"])
def test_sign_in_returns_only_to_dashboard_pages(world: World, given: str, lands: str) -> None:
    r = world.client.post("/ui/login", data={"token": world.reader, "next": given},
                          follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, lands)


def test_reader_cannot_open_the_audit_log(world: World) -> None:
    assert world.login(world.reader).status_code == 303
    page = world.page("/ui/audit", 403)
    assert "needs a 'admin' token" in text(one(page, ".//*[@data-field='error']"))
    assert world.page("/ui/").find(".//a[@href='/ui/audit']") is None  # not offered either


# ------------------------------------------------------------------------------ pages
def test_overview_counts_match_the_fleet(signed_in: World) -> None:
    w = signed_in
    page = w.page("/ui/")

    def count(name: str) -> int:
        return int(text(one(page, f".//*[@data-count='{name}']")))

    devices = w.api("GET", "/v1/devices")["items"]
    live = [d for d in devices if not d["revoked"]]
    assert count("devices-online") == sum(d["online"] for d in live) == 3
    assert count("devices-offline") == sum(not d["online"] for d in live) == 1
    assert count("devices-revoked") == 1
    assert count("devices-total") == len(devices) == 5
    models = w.api("GET", "/v1/models")
    assert count("model-versions") == models["total"] == 2
    assert count("models") == len({m["name"] for m in models["items"]}) == 1
    deployments = w.api("GET", "/v1/deployments")["items"]
    # the plain deployment of 1 stays active under the rollout of 2 (the newest one wins)
    assert count("deployments-active") == sum(d["status"] == "active" for d in deployments) == 2
    rollouts = w.api("GET", "/v1/rollouts")["items"]
    assert count("rollouts-running") == sum(r["status"] == "running" for r in rollouts) == 1
    assert count("rollouts-paused") == 0
    assert [s.get("data-rollout") for s in page.iter("section")] == ["2"]


def test_devices_page_matches_the_api_page_by_page(signed_in: World) -> None:
    w = signed_in
    api = w.api("GET", "/v1/devices")["items"]
    shown: list[ET.Element] = []
    for n in (1, 2):
        page = w.page(f"/ui/devices?page={n}")
        assert text(one(page, ".//*[@data-field='total']")) == "5"
        shown += page.findall(".//tr[@data-device]")
    assert [r.get("data-device") for r in shown] == [d["id"] for d in api]
    for row, d in zip(shown, api, strict=True):
        def cell(name: str, r: ET.Element = row) -> str:
            return text(one(r, f"td[@data-field='{name}']"))
        status = "revoked" if d["revoked"] else "online" if d["online"] else "offline"
        assert cell("online") == status
        assert cell("profile") == d["profile"]
        assert cell("tags") == ", ".join(d["tags"])
        running = [f"{m['name']} {m['version']}" for m in (d["reported"] or {}).get(
            "running", [])]
        assert cell("running") == (", ".join(running) or "—")
        assert cell("last-result") == ((d["reported"] or {}).get("last_result") or "—")
        when = one(row, "td[@data-field='last-seen']").get("data-time")
        assert when == ("" if d["last_seen_at"] is None else str(d["last_seen_at"]))
    seen = {row.get("data-device"): text(one(row, "td[@data-field='last-seen']"))
            for row in shown}
    for d in api:  # dev-4 never reported; one device reported 2 30 s ago, the others 1 earlier
        assert seen[d["id"]] == ("never" if d["last_seen_at"] is None else
                                 "30 s ago" if w.clock.now - d["last_seen_at"] == 30 else
                                 "1 min ago")
    assert sorted(seen.values()) == ["1 min ago", "1 min ago", "1 min ago", "30 s ago", "never"]
    assert w.page("/ui/devices?page=3").findall(".//tr[@data-device]") == []


def test_device_page_and_unknown_device(signed_in: World) -> None:
    w = signed_in
    d = w.api("GET", "/v1/devices/dev-0")
    page = w.page("/ui/devices/dev-0")
    assert text(one(page, ".//*[@data-field='running']")) == \
        f"{MODEL} {d['reported']['running'][0]['version']}"
    assert text(one(page, ".//*[@data-field='desired-sequence']")) == \
        str(d["desired"]["sequence"])
    assert text(one(page, ".//*[@data-field='applied-sequence']")) == \
        str(d["reported"]["applied_sequence"])
    outcomes = [text(one(r, "td[@data-field='outcome']"))
                for r in page.findall(".//tr[@data-rollout]")]
    assert outcomes == [r["outcome"] for r in d["rollouts"]]
    missing = w.page("/ui/devices/nope", 404)
    assert text(one(missing, ".//*[@data-field='error']")) == "device 'nope' not found"


def _waves(section: ET.Element) -> list[dict[str, int]]:
    return [{name: int(text(one(row, f"td[@data-field='{name}']")).split()[0])
             for name in ("target", "assigned", "committed", "failed", "pending", "reverted")}
            for row in section.findall(".//table[@class='waves']/tbody/tr")]


def test_rollouts_page_matches_the_api(signed_in: World) -> None:
    w = signed_in
    api = w.api("GET", "/v1/rollouts")["items"]
    assert [r["id"] for r in api] == [2]
    r = api[0]
    page = w.page("/ui/rollouts")
    section = one(page, ".//section[@data-rollout='2']")
    waves = _waves(section)
    assert len(waves) == r["wave_count"] == 2
    counts = ("assigned", "committed", "failed", "pending", "reverted")
    for shown, counted in zip(waves, r["waves"], strict=False):
        assert {k: shown[k] for k in counts} == {k: counted[k] for k in counts}
    targets = [text(one(row, "td[@data-field='target']")) for row in section.findall(
        ".//table[@class='waves']/tbody/tr")]
    # the target's text is the spec's; the count is of the 4 live devices the rollout selects
    assert targets == [f"{n} ({t})" for n, t in zip([1, 4], r["waves_text"].split(","),
                                                    strict=True)] == ["1 (1)", "4 (all)"]
    # the API lists waves reached so far; the page shows the later ones empty, and each
    # wave's cumulative target of the 4 selected live devices
    assert waves == [
        {"target": 1, "assigned": 1, "committed": 1, "failed": 0, "pending": 0, "reverted": 0},
        {"target": 4, "assigned": 0, "committed": 0, "failed": 0, "pending": 0, "reverted": 0}]
    gates = {(int(g.get("data-gate-wave", "")), g.get("data-gate")):
             text(one(g, "td[@data-field='gate-status']"))
             for g in section.findall(".//tr[@data-gate]")}
    expected = {(g["wave"], g["gate"]): {True: "passed", False: "failed", None: "waiting"}[
        g["ok"]] for g in r["gates"]}
    assert gates == expected == {(0, "failed"): "passed", (0, "committed"): "passed",
                                 (0, "bake"): "waiting"}
    # why it waits: the latest evaluation, from when the device's report re-planned it
    bake = next(g for g in r["gates"] if g["gate"] == "bake")
    assert text(one(section, ".//*[@data-field='why']")) == f"waiting for bake: {bake['detail']}" \
        == "waiting for bake: 0s of 600s since the wave's last assignment"
    # the wave chart: 2 waves x (target, committed, failed, pending)
    bars = section.findall(f".//{SVG}rect[@class='bar']")
    got = {(b.get("data-category"), b.get("data-series")): float(b.get("data-value", "nan"))
           for b in bars}
    assert len(bars) == 8
    assert got == {("wave 1", "target"): 1, ("wave 1", "committed"): 1,
                   ("wave 1", "failed"): 0, ("wave 1", "pending"): 0,
                   ("wave 2", "target"): 4, ("wave 2", "committed"): 0,
                   ("wave 2", "failed"): 0, ("wave 2", "pending"): 0}
    heights = {k: float(b.get("height", "nan")) for k, b in zip(got, bars, strict=True)}
    assert heights[("wave 2", "target")] == pytest.approx(4 * heights[("wave 1", "target")])


def test_a_paused_rollout_says_why(signed_in: World) -> None:
    w = signed_in
    w.api("POST", "/v1/rollouts/2/pause", json={"reason": "checking <the> canary"})
    page = w.page("/ui/")
    assert text(one(page, ".//*[@data-count='rollouts-paused']")) == "1"
    assert text(one(page, ".//*[@data-count='rollouts-running']")) == "0"
    section = one(page, ".//section[@data-rollout='2']")  # paused is still in progress
    assert text(one(section, ".//*[@data-field='why']")) == \
        f"paused: {w.api('GET', '/v1/rollouts/2')['reason']}" == "paused: checking <the> canary"


def test_rollout_page_lists_its_devices(signed_in: World) -> None:
    w = signed_in
    api = w.api("GET", "/v1/rollouts/2")
    page = w.page("/ui/rollouts/2")
    rows = page.findall(".//tr[@data-device]")
    assert [r.get("data-device") for r in rows] == [d["device_id"] for d in api["devices"]]
    assert [text(one(r, "td[@data-field='outcome']")) for r in rows] == ["committed"]
    assert text(one(rows[0], "td[@data-field='running']")) == "2"
    assert len(page.findall(f".//{SVG}svg")) == 1
    missing = w.page("/ui/rollouts/99", 404)
    assert "rollout 99 not found" in text(one(missing, ".//*[@data-field='error']"))


def test_audit_log_newest_first_paged_with_chain_status(signed_in: World) -> None:
    w = signed_in
    api = w.api("GET", "/v1/audit", params={"limit": 500})
    ids = [e["id"] for e in api["items"]]
    assert len(ids) > 6
    shown: list[str] = []
    for n in range(1, math.ceil(len(ids) / 3) + 1):
        page = w.page(f"/ui/audit?page={n}")
        assert one(page, ".//*[@data-field='chain']").get("data-intact") == "true"
        shown += [text(one(r, "td[@data-field='id']")) for r in page.findall(".//tr[@data-entry]")]
    assert shown == [str(i) for i in reversed(ids)]
    newest = api["items"][-1]
    first = w.page("/ui/audit").find(".//tr[@data-entry]")
    assert first is not None
    assert text(one(first, "td[@data-field='action']")) == newest["action"]
    assert text(one(first, "td[@data-field='actor']")) == newest["actor"]
    # an edited row breaks the chain, and the page says where
    with atomic(w.fleet.engine) as conn:
        conn.execute(update(tables.audit).where(tables.audit.c.id == ids[2])
                     .values(actor="someone else"))
    broken = w.api("GET", "/v1/audit")
    page = w.page("/ui/audit")
    assert one(page, ".//*[@data-field='chain']").get("data-intact") == "false"
    assert text(one(page, ".//*[@data-field='first-broken']")) == \
        str(broken["first_broken_id"]) == str(ids[2])


def test_hostile_values_are_escaped_everywhere(signed_in: World) -> None:
    w = signed_in
    # a device is untrusted: its error text comes straight from its reported state
    w.report("dev-1", error=HOSTILE)
    w.api("POST", "/v1/tokens", 201, json={"name": '"><img src=x onerror=alert(1)>',
                                           "scope": "reader"})
    # a tag and an audit target that the API would refuse, stored by some older version
    with atomic(w.fleet.engine) as conn:
        conn.execute(update(tables.devices).where(tables.devices.c.id == "dev-0")
                     .values(tags=json.dumps([HOSTILE])))
        audit.record(conn, at=w.clock.now, actor="test", action="probe", target=HOSTILE,
                     after={"note": HOSTILE})
    for path, where in (("/ui/devices", ".//tr[@data-device='dev-0']/td[@data-field='tags']"),
                        ("/ui/devices/dev-1", ".//*[@data-field='last-error']"),
                        ("/ui/devices/dev-0", ".//*[@data-field='tags']"),
                        ("/ui/audit", ".//tr[@data-entry]/td[@data-field='target']")):
        r = w.client.get(path)
        assert r.status_code == 200
        assert not re.search(r"<(script|img)\b", r.text, re.IGNORECASE), path
        assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in r.text
        assert text(dom(r).find(where)) == HOSTILE  # shown as text, exactly
    audit_page = w.client.get("/ui/audit").text
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in audit_page


def test_pages_forbid_scripts_and_pin_their_stylesheet(signed_in: World) -> None:
    for path in (*PAGES, "/ui/login"):
        if path == "/ui/login":
            signed_in.client.cookies.clear()
        r = signed_in.client.get(path, follow_redirects=False)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp
        css = one(dom(r), ".//style").text or ""
        digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
        assert f"style-src 'sha256-{digest}'" in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["cache-control"] == "no-store"
        assert "read-only" in text(one(dom(r), ".//footer")).lower()


def test_mounting_again_replaces_the_settings_and_adds_no_route(world: World) -> None:
    app = world.client.app
    routes = len(app.router.routes)
    mount(app, page_size=2)
    assert len(app.router.routes) == routes
    world.login(world.admin)
    assert len(world.page("/ui/devices").findall(".//tr[@data-device]")) == 2


def test_pages_are_not_in_the_api_schema(world: World) -> None:
    paths = world.client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p == "/" or p.startswith("/ui")]


# ------------------------------------------------------------------------------ sessions
def test_session_store_keeps_at_most_max_sessions_dropping_expired_then_oldest() -> None:
    store = SessionStore(ttl_s=60, max_sessions=3)
    ids = [store.create(token_id=f"t{i}", name="n", scope="reader", now=START + i)[0]
           for i in range(3)]
    # full: the fourth drops the oldest (none has expired yet)
    ids.append(store.create(token_id="t3", name="n", scope="reader", now=START + 10)[0])
    assert [store.get(i, START + 10) is not None for i in ids] == [False, True, True, True]
    # expired ones go first: t1 and t2 expire at START + 61 and 62, t3 lives to START + 70
    ids.append(store.create(token_id="t4", name="n", scope="reader", now=START + 65)[0])
    assert len(store) == 2
    assert [store.get(i, START + 65) is not None for i in ids] == \
        [False, False, False, True, True]
    assert store.end_token("t3") == 1 and store.get(ids[3], START + 65) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ttl_s": 59}, "session ttl_s: expected >= 60 seconds, got 59"),
    ({"ttl_s": 60, "max_sessions": 0}, "max_sessions: expected >= 1, got 0"),
], ids=["short ttl", "no room"])
def test_session_store_refuses_bad_settings(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        SessionStore(**kwargs)
    assert str(exc.value) == message


# ------------------------------------------------------------------------------ charts
def test_bar_chart_draws_one_bar_per_category_and_series() -> None:
    svg = ET.fromstring(bar_chart(
        ["[0, 1)", "[1, 2)", "[2, 3)"],
        [BarSeries("reference", [0.2, 0.5, 0.3]), BarSeries("live", [0.1, 0.3, 0.6])],
        title="x <distribution>"))
    bars = svg.findall(f".//{SVG}rect[@class='bar']")
    assert [(b.get("data-series"), b.get("data-category"), float(b.get("data-value", "")))
            for b in bars] == [
        ("reference", "[0, 1)", 0.2), ("reference", "[1, 2)", 0.5), ("reference", "[2, 3)", 0.3),
        ("live", "[0, 1)", 0.1), ("live", "[1, 2)", 0.3), ("live", "[2, 3)", 0.6)]
    heights = [float(b.get("height", "")) for b in bars]
    assert heights[5] == pytest.approx(2 * heights[4]) == pytest.approx(3 * heights[0])
    bottoms = {round(float(b.get("y", "")) + h, 6) for b, h in zip(bars, heights, strict=True)}
    assert len(bottoms) == 1  # every bar stands on the axis
    assert svg.findtext(f"{SVG}title") == "x <distribution>"
    assert [t.text for t in svg.findall(f".//{SVG}g[@class='legend']/{SVG}text")] == \
        ["reference", "live"]


def test_line_chart_draws_points_and_the_threshold() -> None:
    t0 = 1_800_000_000
    svg = ET.fromstring(line_chart(
        [LineSeries("pi-1", [(t0 + 600, 0.05), (t0, 0.01), (t0 + 1200, 0.31)]),
         LineSeries("pi-2", [(t0, 0.02)])],
        title="PSI of x0", threshold=0.2, y_label="PSI"))
    points = svg.findall(f".//{SVG}circle[@class='point']")
    assert [(p.get("data-series"), int(float(p.get("data-x", ""))), float(p.get("data-y", "")))
            for p in points] == [("pi-1", t0, 0.01), ("pi-1", t0 + 600, 0.05),
                                 ("pi-1", t0 + 1200, 0.31), ("pi-2", t0, 0.02)]
    lines = svg.findall(f".//{SVG}polyline[@class='line']")
    assert [ln.get("data-series") for ln in lines] == ["pi-1"]  # one point draws no line
    assert len((lines[0].get("points") or "").split()) == 3
    threshold = one(svg, f".//{SVG}line[@class='threshold']")
    assert float(threshold.get("data-value", "")) == 0.2
    # pixels: higher values are higher up, and the threshold sits between 0.05 and 0.31
    ys = [float(p.get("cy", "")) for p in points[:3]]
    assert ys[0] > ys[1] > float(threshold.get("y1", "")) > ys[2]
    assert one(svg, f".//{SVG}text[@class='threshold-label']").text == "threshold 0.2"


def test_charts_without_data_say_so() -> None:
    for svg in (line_chart([], title="PSI"), bar_chart([], [], title="bins"),
                line_chart([LineSeries("a", [])], title="PSI")):
        root = ET.fromstring(svg)
        assert one(root, f".//{SVG}text[@class='no-data']").text == "no data yet"
        assert root.findall(f".//{SVG}rect[@class='bar']") == []


@pytest.mark.parametrize(("call", "message"), [
    (lambda: bar_chart(["a", "b"], [BarSeries("s", [1.0])], title="t"),
     "series 's': expected 2 values (one per category), got 1"),
    (lambda: bar_chart(["a"], [BarSeries("s", [-1.0])], title="t"),
     "series 's' value 0 ('a'): expected >= 0, got -1.0"),
    (lambda: bar_chart(["a"], [BarSeries("s", [math.nan])], title="t"),
     "series 's' value 0: expected a finite number, got nan"),
    (lambda: bar_chart(["a"], [BarSeries("s", [1.0], '#fff" onload="x')], title="t"),
     "series 's' colour: expected #rrggbb, got '#fff\" onload=\"x'"),
    (lambda: line_chart([LineSeries("s", [(0.0, math.inf)])], title="t"),
     "series 's' point 0 y: expected a finite number, got inf"),
    (lambda: line_chart([LineSeries("s", [(0.0, 1.0)])], title="t", threshold=math.nan),
     "threshold: expected a finite number, got nan"),
    (lambda: bar_chart(["a"], [BarSeries("s", [1.0])], title="t", width=10),
     "chart size: expected at least 200x120 px, got 10x260"),
], ids=["length mismatch", "negative", "nan", "colour injection", "infinite point",
        "nan threshold", "too small"])
def test_charts_refuse_bad_input(call: Any, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        call()
    assert str(exc.value) == message


@pytest.mark.parametrize(("lo", "hi", "ticks"), [
    (0.0, 1.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (0.0, 0.31, [0.0, 0.1, 0.2, 0.3, 0.4]),
    (0.0, 4.0, [0.0, 1.0, 2.0, 3.0, 4.0]),
    (0.0, 0.0, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]),
    (3.0, 3.0, [2.6, 2.8, 3.0, 3.2, 3.4]),
], ids=["unit", "psi", "counts", "all zero", "constant"])
def test_nice_ticks_cover_the_range_in_round_steps(lo: float, hi: float,
                                                   ticks: list[float]) -> None:
    assert nice_ticks(lo, hi) == pytest.approx(ticks)


def test_time_ticks_fall_on_round_utc_times() -> None:
    t0 = 1_800_000_000  # 2027-01-15 08:00:00 UTC
    ticks = time_ticks(t0 + 17, t0 + 3 * 3600 - 5)
    assert ticks[0] <= t0 + 17 and ticks[-1] >= t0 + 3 * 3600 - 5
    steps = {b - a for a, b in itertools.pairwise(ticks)}
    assert steps == {1800.0}
    assert all(t % 1800 == 0 for t in ticks)


# ------------------------------------------------------------------------------ model health
@dataclass
class Health:
    """A fleet with real monitoring records (``monitoring_helpers``) served with the dashboard,
    signed in as admin; its clock at ``START + 3600`` (the default range is the last hour)."""

    f: Fleetlet
    client: TestClient
    admin: dict[str, str]

    def api(self, url: str, **params: Any) -> Any:
        r = self.client.get(url, params=params, headers=self.admin)
        assert r.status_code == 200, r.text
        return r.json()

    def page(self, path: str, status: int = 200) -> ET.Element:
        r = self.client.get(path, follow_redirects=False)
        assert r.status_code == status, r.text[:2000]
        return dom(r)


HOUR_AGO = {"since": START + 3600 - 3600}  # the API's query for a page's default ?since=1h


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits()


@pytest.fixture(scope="module")
def health(tmp_path_factory: pytest.TempPathFactory, digits: Digits) -> Iterator[Health]:
    """Built once for the read-only tests (:func:`_health`)."""
    with _health(tmp_path_factory.mktemp("health"), digits) as h:
        yield h


@pytest.fixture
def fresh_health(tmp_path: Path, digits: Digits) -> Iterator[Health]:
    """A fleet of its own, for a test that adds records (:func:`_health`)."""
    with _health(tmp_path, digits) as h:
        yield h


@contextmanager
def _health(tmp_path: Path, digits: Digits) -> Iterator[Health]:
    """pi-1, pi-2, pi-3 (rpi4) and zero-1 (rpi-zero2w) run digits; pi-3 on 2.0.0. Everyone
    serves calm digits; from 20 minutes in pi-2 serves digits with a dead centre block, and
    a drift rule (PSI > 0.25) fires on it. pi-1 had an error burst; its error-rate alert
    resolved. A p95 rule is pending on zero-1."""
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4", "pi-3": "rpi4",
                            "zero-1": "rpi-zero2w"}, digits.baseline)
    for device, version in (("pi-1", "1.0.0"), ("pi-2", "1.0.0"), ("pi-3", "2.0.0"),
                            ("zero-1", "1.0.0")):
        f.running(device, version, at=START)
    calm = digits.windows(digits.x_eval, window=180)
    dead = digits.windows(shifted(digits.x_eval, "dead"), window=180)
    calm2 = digits.windows(digits.x_eval, window=180, version="2.0.0")
    with atomic(f.fleet.engine) as conn:
        for rule in (AlertRule(0, "digits", "drift_psi", 0.25, window_s=600, min_samples=100),
                     AlertRule(0, "digits", "error_rate", 0.05, window_s=600, min_samples=20),
                     AlertRule(0, "digits", "p95_latency", 100.0, version="1.0.0",
                               window_s=600, for_s=900, min_samples=10)):
            create_rule(conn, rule, actor=PUBLISHER, now=START)
    f.metrics("pi-1", [metrics_body([5.0] * 90, {"runtime": 10})], at=START + 300)
    evaluate_alerts(f.fleet, now=START + 300)  # error rate fires on pi-1
    for device in ("pi-1", "pi-2"):
        f.drift(device, calm, at=START + 400)
        f.metrics(device, [metrics_body([5.0] * 95 + [40.0] * 5)], at=START + 400)
    f.drift("pi-3", calm2, at=START + 400)
    f.metrics("pi-3", [metrics_body([8.0] * 60, version="2.0.0")], at=START + 400)
    evaluate_alerts(f.fleet, now=START + 1000)  # pi-1's burst left the window: resolved
    f.drift("pi-2", dead, at=START + 1300)
    f.drift("pi-2", dead, at=START + 2500)
    f.drift("pi-1", calm, at=START + 2500)
    f.metrics("zero-1", [metrics_body([150.0] * 20)], at=START + 2500)
    evaluate_alerts(f.fleet, now=START + 2600)  # drift fires on pi-2; p95 pending on zero-1
    f.clock.now = START + 3600
    app = create_app(f.settings, clock=f.clock, fleet=f.fleet)
    mount(app, page_size=3)
    with TestClient(app) as client:
        r = client.post("/ui/login", data={"token": f.admin_token}, follow_redirects=False)
        assert r.status_code == 303, r.text
        yield Health(f, client, {"Authorization": f"Bearer {f.admin_token}"})
    f.close()


def _value(cell: ET.Element) -> float | None:
    raw = cell.get("data-value")
    assert raw is not None
    return None if raw == "" else float(raw)


FIGURES = ("requests", "errors", "running_devices", "reporting_devices")
EXACT = ("error_rate", "p95_ms", "max_psi")


def _row_figures(row: ET.Element, names: tuple[str, ...] = FIGURES,
                 exact: tuple[str, ...] = EXACT) -> dict[str, Any]:
    out: dict[str, Any] = {n: int(text(one(row, f"td[@data-field='{n}']"))) for n in names}
    out.update({n: _value(one(row, f"td[@data-field='{n}']")) for n in exact})
    return out


def test_models_page_matches_the_api(health: Health) -> None:
    api = health.api("/v1/monitoring/fleet", **HOUR_AGO)
    firing = health.api("/v1/alerts", state="firing")["items"]
    page = health.page("/ui/models")
    rows = page.findall(".//table[@class='models-health']/tbody/tr")
    expected = []
    for m in api["models"]:
        expected.append((m["model"], "", {k: m[k] for k in (*FIGURES, *EXACT)},
                         sum(a["model"] == m["model"] for a in firing)))
        for v in m["versions"]:
            expected.append((m["model"], v["version"], {k: v[k] for k in (*FIGURES, *EXACT)},
                             sum(a["model"] == m["model"] and a["rule"]["version"] in (
                                 None, v["version"]) for a in firing)))
    got = [(r.get("data-model"), r.get("data-version"), _row_figures(r),
            int(text(one(r, "td[@data-field='firing']")))) for r in rows]
    assert got == expected
    # the story, as the API tells it: 1.0.0 on three devices, pi-2's drift firing
    assert [(m, v, fig["running_devices"], n) for m, v, fig, n in got] == [
        ("digits", "", 4, 1), ("digits", "1.0.0", 3, 1), ("digits", "2.0.0", 1, 1)]
    assert got[1][2]["max_psi"] is not None and got[1][2]["max_psi"] > 0.25
    assert [s.get("data-span") for s in page.findall(".//*[@data-span]")] == \
        ["15m", "1h", "6h", "24h", "7d"]


def test_model_page_health_tables_match_the_api(health: Health) -> None:
    api = health.api("/v1/monitoring/models/digits", **HOUR_AGO)
    page = health.page("/ui/models/digits")
    assert text(one(page, ".//*[@data-field='total-requests']")) == \
        str(api["totals"]["requests"])
    assert _value(one(page, ".//*[@data-field='total-max-psi']")) == api["totals"]["max_psi"]
    versions = page.findall(".//table[@class='versions-health']/tbody/tr")
    assert [(r.get("data-version"), _row_figures(r)) for r in versions] == [
        (v["version"], {k: v[k] for k in (*FIGURES, *EXACT)}) for v in api["versions"]]
    devices = page.findall(".//table[@class='devices-health']/tbody/tr")
    assert [(r.get("data-device"), r.get("data-version"),
             _row_figures(r, ("requests", "errors"))) for r in devices] == [
        (d["device"], d["version"], {k: d[k] for k in ("requests", "errors", *EXACT)})
        for d in api["devices"]]
    # requests and p95 charts: one point per bucket per version (p95 where it has requests)
    for chart, key in (("requests", "requests"), ("p95", "p95_ms")):
        svg = one(page, f".//*[@data-chart='{chart}']/{SVG}svg")
        points = [(p.get("data-series"), int(p.get("data-x", "")), float(p.get("data-y", "")))
                  for p in svg.findall(f".//{SVG}circle[@class='point']")]
        assert points == [(v["version"], p["start"], p[key]) for v in api["versions"]
                          for p in v["series"] if p[key] is not None]
        assert len(points) >= (120 if key == "requests" else 3)  # 60 buckets x 2 versions


def test_model_page_psi_chart_has_one_point_per_bucket(health: Health) -> None:
    drift = health.api("/v1/monitoring/models/digits/drift", **HOUR_AGO)
    rule = next(r for r in health.api("/v1/alert-rules")["items"] if r["kind"] == "drift_psi")
    page = health.page("/ui/models/digits")
    svg = one(page, f".//*[@data-chart='psi']/{SVG}svg")
    points = [(p.get("data-series"), int(p.get("data-x", "")), float(p.get("data-y", "")))
              for p in svg.findall(f".//{SVG}circle[@class='point']")]
    with_data = [b for b in drift["buckets"] if b["max_psi"] is not None]
    assert len(with_data) == 3  # calm at +400, dead at +1300, dead and calm at +2500
    assert points == [("max over devices", b["start"], b["max_psi"]) for b in with_data] + \
        [("mean over devices", b["start"], b["mean_psi"]) for b in with_data]
    assert float(one(svg, f".//{SVG}line[@class='threshold']").get("data-value", "")) == \
        rule["threshold"] == 0.25
    rows = {r.get("data-device"): r for r in page.findall(
        ".//table[@class='drift-devices']/tbody/tr")}
    for d in drift["devices"]:
        assert _value(one(rows[d["device"]], "td[@data-field='latest_max_psi']")) == \
            d["latest_max_psi"]
        assert text(one(rows[d["device"]], "td[@data-field='trend']")) == d["trend"]
    assert text(one(rows["pi-2"], "td[@data-field='trend']")) == "rising"
    # one device: its own line only
    mine = health.api("/v1/monitoring/models/digits/drift", device="pi-2", **HOUR_AGO)
    page = health.page("/ui/models/digits?device=pi-2")
    svg = one(page, f".//*[@data-chart='psi']/{SVG}svg")
    assert [(p.get("data-series"), int(p.get("data-x", "")), float(p.get("data-y", "")))
            for p in svg.findall(f".//{SVG}circle[@class='point']")] == [
        ("pi-2", b["start"], b["max_psi"]) for b in mine["buckets"] if b["max_psi"] is not None]
    assert text(one(page, ".//*[@data-field='device-picker']/strong")) == "pi-2"
    assert health.page("/ui/models/digits?device=pi-9", 404) is not None


def test_model_page_distribution_defaults_to_the_most_drifted_feature(health: Health) -> None:
    drift = health.api("/v1/monitoring/models/digits/drift", version="1.0.0", **HOUR_AGO)
    latest = next(b["features"] for b in reversed(drift["buckets"]) if b["features"])
    top = max(latest, key=lambda f: (f["psi_max"], -f["feature"]))
    assert top["feature"] in DEAD_BLOCK
    dist = health.api("/v1/monitoring/models/digits/distribution", version="1.0.0",
                      input="input", feature=top["feature"], **HOUR_AGO)
    page = health.page("/ui/models/digits")  # 1.0.0 has the most drift windows
    note = one(page, ".//*[@data-field='distribution']")
    assert (note.get("data-version"), note.get("data-input"), note.get("data-feature")) == \
        ("1.0.0", "input", str(top["feature"]))
    assert float(text(one(note, ".//*[@data-field='distribution-psi']"))) == \
        pytest.approx(dist["psi"], rel=1e-3)
    bars = one(page, f".//*[@data-chart='distribution']/{SVG}svg").findall(
        f".//{SVG}rect[@class='bar']")
    assert [float(b.get("data-value", "")) for b in bars
            if b.get("data-series") == "reference"] == dist["reference"]
    assert [float(b.get("data-value", "")) for b in bars
            if b.get("data-series") == "live"] == dist["live"]
    assert len(bars) == 2 * (len(dist["edges"]) + 1)
    chosen = one(page, ".//*[@data-field='feature-picker']/*[@class='chosen']")
    assert chosen.get("data-feature") == str(top["feature"])
    # another feature through the picker's query, another version's distribution
    other = health.api("/v1/monitoring/models/digits/distribution", version="2.0.0",
                       input="input", feature=3, **HOUR_AGO)
    page = health.page("/ui/models/digits?version=2.0.0&input=input&feature=3")
    bars = one(page, f".//*[@data-chart='distribution']/{SVG}svg").findall(
        f".//{SVG}rect[@class='bar'][@data-series='live']")
    assert [float(b.get("data-value", "")) for b in bars] == other["live"]
    missing = health.page("/ui/models/digits?input=input&feature=999")
    assert "feature: expected a feature index of input 'input'" in text(
        one(missing, ".//*[@data-field='no-distribution']"))


def test_alerts_page_matches_the_api(health: Health) -> None:
    page = health.page("/ui/alerts")
    for state in ("firing", "pending", "resolved"):
        api = health.api("/v1/alerts", state=state)["items"]
        rows = page.findall(f".//tr[@data-state='{state}']")
        assert [int(r.get("data-alert", "")) for r in rows] == [a["id"] for a in api]
        assert text(one(page, f".//*[@data-count='alerts-{state}']")) == str(len(api)) == "1"
        for row, a in zip(rows, api, strict=True):
            assert [(b.get("data-device"), float(b.get("data-value", ""))) for b in
                    row.findall(".//*[@class='breach']")] == [
                (d["device"], d["value"]) for d in a["devices"]]
            assert text(one(row, "td[@data-field='summary']")) == a["summary"]
            for field_name, key in (("started", "started_at"), ("fired", "fired_at"),
                                    ("resolved", "resolved_at")):
                shown = one(row, f"td[@data-field='{field_name}']").get("data-time")
                assert shown == ("" if a[key] is None else str(a[key]))
    firing = one(page, ".//tr[@data-state='firing']")
    assert [b.get("data-device") for b in firing.findall(".//*[@class='breach']")] == ["pi-2"]
    rules = health.api("/v1/alert-rules")["items"]
    assert [r.get("data-rule") for r in page.findall(".//tr[@data-rule]")] == \
        [str(r["id"]) for r in rules]
    assert "fleet_server alert rule add" in text(one(page, ".//*[@data-field='add-rule']"))
    overview = health.page("/ui/")
    assert text(one(overview, ".//*[@data-count='alerts-firing']")) == "1"
    assert text(one(overview, ".//*[@data-count='alerts-pending']")) == "1"


def test_device_page_shows_its_health(health: Health) -> None:
    api = health.api("/v1/monitoring/devices/pi-2", **HOUR_AGO)
    page = health.page("/ui/devices/pi-2")
    assert text(one(page, ".//*[@data-field='health-requests']")) == \
        str(api["totals"]["requests"]) == "100"
    assert text(one(page, ".//*[@data-field='health-errors']")) == str(api["totals"]["errors"])
    [row] = page.findall(".//table[@class='device-health']/tbody/tr")
    [m] = api["models"]
    assert _value(one(row, "td[@data-field='p95_ms']")) == m["p95_ms"]
    assert _value(one(row, "td[@data-field='max_psi']")) == m["max_psi"]
    latest = [p["max_psi"] for p in m["series"] if p["max_psi"] is not None][-1]
    assert _value(one(row, "td[@data-field='latest_max_psi']")) == latest > 0.25
    # a narrower range: what the API says for the last 15 minutes (pi-2 sent nothing then)
    short = health.api("/v1/monitoring/devices/pi-2", since=START + 3600 - 900)
    page = health.page("/ui/devices/pi-2?since=15m")
    assert short["models"] == []
    assert one(page, ".//*[@data-field='no-health']") is not None


@pytest.mark.parametrize(("path", "status", "words"), [
    ("/ui/models?since=forever", 422, "since: expected a duration such as 15m, 6h or 7d"),
    ("/ui/models?since=400d", 422, "since: expected at most 90d, got '400d'"),
    ("/ui/models/nope", 404, "model 'nope' not found"),
    ("/ui/devices/pi-1?since=0h", 422, "since: expected a duration"),
], ids=["not a duration", "too long", "unknown model", "zero"])
def test_bad_health_queries_are_error_pages(health: Health, path: str, status: int,
                                            words: str) -> None:
    assert words in text(one(health.page(path, status), ".//*[@data-field='error']"))


def test_hostile_model_and_feature_names_are_escaped(fresh_health: Health,
                                                     digits: Digits) -> None:
    health = fresh_health
    f = health.f
    f.metrics("pi-1", [metrics_body([5.0] * 10, model=HOSTILE)], at=START + 3500)
    body = json.loads(json.dumps(digits.windows(shifted(digits.x_eval, "dead"),
                                                window=180)[0]))
    body["inputs"] = {HOSTILE: body["inputs"]["input"]}  # a device names any input it likes
    f.drift("pi-1", [body], at=START + 3500)
    models = health.client.get("/ui/models")
    link = one(dom(models), f".//tr[@data-model=\"{HOSTILE}\"]/td[@data-field='model']/a")
    assert text(link) == HOSTILE
    assert link.get("href") == f"/ui/models/{quote(HOSTILE, safe='')}?since=1h"
    model = health.client.get(link.get("href", ""))
    digits_page = health.client.get("/ui/models/digits")
    for r in (models, model, digits_page):
        assert r.status_code == 200
        assert not re.search(r"<(script|img)\b", r.text, re.IGNORECASE)
    assert text(one(dom(model), ".//*[@data-field='model']")) == HOSTILE
    picker = one(dom(digits_page), ".//*[@data-field='feature-picker']")
    hostile = [a for a in picker.findall("a") if a.get("data-input") == HOSTILE]
    assert hostile and parse_qs(urlsplit(hostile[0].get("href", "")).query)["input"] == \
        [HOSTILE]
    # its PSI is the largest now, so it is the default feature: the baseline has no such
    # input, and the page says so (escaped) instead of failing
    assert "input: expected one of ['input']" in text(
        one(dom(digits_page), ".//*[@data-field='no-distribution']"))


def test_health_pages_without_data_say_so(signed_in: World) -> None:
    page = signed_in.page("/ui/models/m")  # deployed, but no device sent a record
    psi = one(page, f".//*[@data-chart='psi']/{SVG}svg")
    assert text(one(psi, f".//{SVG}text[@class='no-data']")) == \
        "no drift summaries in this range yet"
    # the devices run version 2 and sent nothing: zero requests in every bucket, no p95
    requests = one(page, f".//*[@data-chart='requests']/{SVG}svg")
    ys = {p.get("data-y") for p in requests.findall(f".//{SVG}circle[@class='point']")}
    assert ys == {"0"}
    p95 = one(page, f".//*[@data-chart='p95']/{SVG}svg")
    assert text(one(p95, f".//{SVG}text[@class='no-data']")) == "no data yet"
    assert text(one(page, ".//*[@data-field='no-distribution']")).endswith(
        "has no drift baseline")
    alerts = signed_in.page("/ui/alerts")
    for field_name in ("no-firing", "no-pending", "no-rules"):
        assert one(alerts, f".//*[@data-field='{field_name}']") is not None
    assert one(signed_in.page("/ui/devices/dev-0"), ".//*[@data-field='no-health']") is not None
    overview = signed_in.page("/ui/")
    assert text(one(overview, ".//*[@data-count='alerts-firing']")) == "0"

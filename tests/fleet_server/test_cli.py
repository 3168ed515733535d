"""``fleet_server`` CLI: local commands on a real data directory, API commands against the real
app served by uvicorn on a loopback port, and its documentation (STYLE rule 19).

* ``init`` prints the first admin token once, and that token drives the API; a second ``init``
  on the same directory is refused;
* ``device provision`` writes a 0600 file the agent parses, never prints its secrets, and
  refuses to overwrite a file (checked before a device is registered);
* errors from the server exit 1 with the server's detail; usage errors exit 2;
* ``keys rotate`` publishes a new root; ``mosquitto-config`` writes what Mosquitto needs;
* every command has ``-h``/``--help``/``--version``, an example and the exit codes, and
  docs/fleet-server-cli.md is what bench/gen_fleet_cli_docs.py generates now.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import ModuleType
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from agent.protocol.manifest import SCHEMA_VERSION, Tensor
from agent.protocol.provisioning import Provisioning
from fleet_server.cli import cli

ROOT = Path(__file__).resolve().parents[2]
GENERATOR = ROOT / "bench" / "gen_fleet_cli_docs.py"
DOCS = ROOT / "docs" / "fleet-server-cli.md"
REGENERATE = "run .venv/bin/python bench/gen_fleet_cli_docs.py"
TOKEN_RE = re.compile(r"ef_admin_[A-Za-z0-9_-]+")


_UNSET: dict[str, str | None] = {name: None for name in (
    "EDGEFLEET_URL", "EDGEFLEET_TOKEN", "EDGEFLEET_DATA_DIR", "http_proxy", "https_proxy",
    "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}


def run(*args: str | Path, env: dict[str, str] | None = None) -> Result:
    """The CLI in-process, with only the environment given here (no proxies)."""
    return CliRunner().invoke(cli, [str(a) for a in args], prog_name="fleet_server",
                              env={**_UNSET, **(env or {})})


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_fleet_cli_docs", GENERATOR)
    assert spec is not None and spec.loader is not None, f"cannot import {GENERATOR}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- the server

@dataclass(frozen=True)
class Server:
    url: str
    token: str
    data_dir: Path

    def run(self, *args: str | Path, token: str | None = None) -> Result:
        return run(*args, env={"EDGEFLEET_URL": self.url,
                               "EDGEFLEET_TOKEN": token or self.token})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`fleet_server init` through the CLI, then the real app on a free loopback port."""
    import uvicorn

    from fleet_server.api.app import create_app
    from fleet_server.settings import Settings

    data_dir = tmp_path_factory.mktemp("fleet") / "data"
    result = run("init", "--data-dir", data_dir, "--json")
    assert result.exit_code == 0, result.output
    token = json.loads(result.stdout)["token"]
    app = create_app(Settings(data_dir=data_dir))
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                       lifespan="on"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = uv.servers[0].sockets[0].getsockname()[1]
    yield Server(f"http://127.0.0.1:{port}", token, data_dir)
    uv.should_exit = True
    thread.join(timeout=10)


def _bundle(directory: Path, name: str = "digits", model_version: str = "1.0.0",
            profile: str = "rpi4") -> Path:
    """A small but valid ONNX-runtime bundle directory (the server checks hashes, not math)."""
    model = b"\x08\x07" + hashlib.sha256(model_version.encode()).digest() * 4
    golden = Tensor("float32", (1, 4), bytes(16)).to_dict()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": name, "version": model_version},
        "profile": profile, "runtime": "onnxruntime", "precision": "fp32",
        "task": "classification",
        "file": {"path": "model.onnx", "sha256": hashlib.sha256(model).hexdigest(),
                 "length": len(model)},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["N", 4]}],
        "golden": {"inputs": {"x": golden}, "outputs": {"y": golden}, "atol": 0.1,
                   "rtol": 0.0, "min_agreement": 0.97},
        "validation": {"top1_agreement": 1.0},
        "candidates": [{"precision": "fp32", "chosen": True}],
        "drift_baseline": {"version": 1},
        "lineage": {"source_sha256": "b" * 64},
    }
    directory.mkdir(parents=True)
    (directory / "model.onnx").write_bytes(model)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    (directory / "notes.txt").write_text("not part of the bundle: the CLI leaves it out\n")
    return directory


# --------------------------------------------------------------------------------- init

def test_init_prints_the_token_once_and_refuses_a_second_init(tmp_path: Path) -> None:
    data_dir = tmp_path / "fleet"
    first = run("init", "--data-dir", data_dir)
    assert first.exit_code == 0, first.output
    tokens = TOKEN_RE.findall(first.output)
    assert len(tokens) == 1, first.output
    assert "shown only once" in first.stdout
    assert f"export EDGEFLEET_TOKEN={tokens[0]}" in first.stdout
    assert (data_dir / "datadir.json").is_file()

    second = run("init", "--data-dir", data_dir)
    assert second.exit_code == 1, second.output
    assert "already holds a fleet" in second.stderr
    assert not TOKEN_RE.search(second.output)


# --------------------------------------------------------------------------------- API commands

def test_provision_writes_a_private_file_the_agent_parses(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "dev-a.json"
    result = server.run("device", "provision", "dev-a", "--profile", "rpi4", "--tag", "lab",
                        "--out", out)
    assert result.exit_code == 0, result.output
    assert out.stat().st_mode & 0o777 == 0o600
    prov = Provisioning.from_bytes(out.read_bytes())
    assert (prov.device_id, prov.profile, prov.mqtt_username) == ("dev-a", "rpi4", "dev-a")
    assert prov.tuf_metadata_url.startswith(prov.http_url)
    for secret in (prov.mqtt_password, prov.http_token):
        assert secret not in result.output
    assert str(out) in result.stdout and "dev-a" in result.stdout
    assert not [p.name for p in tmp_path.iterdir() if p.name != out.name]  # no temp left


def test_provision_refuses_to_overwrite_before_registering(server: Server,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "taken.json"
    out.write_text("keep me")
    refused = server.run("device", "provision", "dev-b", "--profile", "rpi4", "--out", out)
    assert refused.exit_code == 1, refused.output
    assert "refusing to overwrite" in refused.stderr
    assert out.read_text() == "keep me"
    unknown = server.run("device", "show", "dev-b")  # never registered: the id is still free
    assert unknown.exit_code == 1 and "not found" in unknown.stderr

    forced = server.run("device", "provision", "dev-b", "--profile", "rpi4", "--out", out,
                        "--force")
    assert forced.exit_code == 0, forced.output
    assert Provisioning.from_bytes(out.read_bytes()).device_id == "dev-b"
    assert out.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("args", "token", "code", "says"), [
    (["device", "list"], "ef_admin_not-a-real-token", 1, "invalid token (HTTP 401)"),
    (["device", "show", "no-such-device"], None, 1, "device 'no-such-device' not found"),
    (["device", "provision", "dev-x", "--profile", "vax-11", "--out", "{tmp}/x.json"], None,
     1, "unknown profile 'vax-11'"),
    (["deploy", "nothing", "1.0", "--to", "all"], None, 1, "not found (push it first)"),
    (["deploy", "digits", "1.0", "--to", "rack:7"], None, 2, "expected device:ID, tag:TAG"),
    (["deploy", "digits", "1.0", "--to", "all", "--to", "tag:x"], None, 2,
     "'all' cannot be combined"),
], ids=["bad token", "unknown device", "unknown profile", "unknown model", "bad selector",
        "all and more"])
def test_errors_exit_with_the_servers_detail(server: Server, tmp_path: Path, args: list[str],
                                             token: str | None, code: int, says: str) -> None:
    result = server.run(*[a.replace("{tmp}", str(tmp_path)) for a in args], token=token)
    assert result.exit_code == code, result.output
    assert says in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_no_token_is_a_usage_error_and_no_server_is_an_error() -> None:
    missing = run("device", "list", env={"EDGEFLEET_URL": "http://127.0.0.1:9"})
    assert missing.exit_code == 2 and "no API token" in missing.stderr
    unreachable = run("device", "list", "--url", "http://127.0.0.1:9", "--token", "ef_x")
    assert unreachable.exit_code == 1 and "cannot reach the fleet server" in unreachable.stderr


def test_scopes_are_enforced_for_tokens_the_cli_creates(server: Server, tmp_path: Path) -> None:
    created = server.run("token", "create", "--name", "dashboard", "--scope", "reader",
                         "--json")
    assert created.exit_code == 0, created.output
    reader = json.loads(created.stdout)["token"]
    assert server.run("device", "list", token=reader).exit_code == 0
    denied = server.run("device", "provision", "dev-r", "--profile", "rpi4", "--out",
                        tmp_path / "r.json", token=reader)
    assert denied.exit_code == 1 and "(HTTP 403)" in denied.stderr


def test_push_deploy_rollout_cancel_audit(server: Server, tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert server.run("device", "provision", "dev-c", "--profile", "rpi4", "--tag", "line-3",
                      "--out", out).exit_code == 0
    pushed = server.run("model", "push", _bundle(tmp_path / "b1"))
    assert pushed.exit_code == 0, pushed.output
    assert "models/digits/1.0.0/rpi4/" in pushed.stdout
    again = server.run("model", "push", tmp_path / "b1")
    assert again.exit_code == 1 and "already pushed" in again.stderr

    archive = tmp_path / "b2.tar.gz"  # a tar.gz goes up as it is
    _bundle(tmp_path / "b2", model_version="1.1.0")
    with tarfile.open(archive, "w:gz") as tar:
        for name in ("manifest.json", "model.onnx"):
            tar.add(tmp_path / "b2" / name, arcname=name)
    assert server.run("model", "push", archive).exit_code == 0

    shown = server.run("model", "show", "digits", "1.1.0", "--json")
    assert shown.exit_code == 0, shown.output
    assert [a["profile"] for a in json.loads(shown.stdout)["artifacts"]] == ["rpi4"]

    deployed = server.run("deploy", "digits", "1.1.0", "--to", "tag:line-3", "--json")
    assert deployed.exit_code == 0, deployed.output
    dep = json.loads(deployed.stdout)
    assert dep["devices"] == ["dev-c"] and dep["desired_changed"] == ["dev-c"]

    status = server.run("rollout", "status", "--json")
    assert status.exit_code == 0, status.output
    mine = next(e for e in json.loads(status.stdout) if e["deployment"]["id"] == dep["id"])
    assert [(r["device"], r["state"], r["desired_sequence"]) for r in mine["devices"]] == [
        ("dev-c", "pending", 1)]
    overview = server.run("rollout", "status").stdout
    assert f"Deployment {dep['id']}: digits 1.1.0 to tag:line-3 (active; all at once)" in overview

    cancelled = server.run("deployment", "cancel", str(dep["id"]))
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.stdout
    listed = json.loads(server.run("deployment", "list", "--json").stdout)
    assert {d["id"]: d["status"] for d in listed}[dep["id"]] == "cancelled"

    audit = server.run("audit", "--json")
    assert audit.exit_code == 0, audit.output
    log = json.loads(audit.stdout)
    assert log["chain_intact"] is True
    assert {"device.provision", "model.push", "deployment.create", "deployment.cancel"} <= {
        e["action"] for e in log["items"]}
    assert "hash chain: intact" in server.run("audit").stdout


def test_revoke(server: Server, tmp_path: Path) -> None:
    assert server.run("device", "provision", "dev-d", "--profile", "rpi4", "--out",
                      tmp_path / "d.json").exit_code == 0
    assert server.run("device", "revoke", "dev-d").exit_code == 0
    shown = json.loads(server.run("device", "show", "dev-d", "--json").stdout)
    assert shown["revoked"] is True
    again = server.run("device", "revoke", "dev-d")
    assert again.exit_code == 1 and "already revoked" in again.stderr


# --------------------------------------------------------------------------------- monitoring

def _drift_body(psi: float, model: str = "mon") -> dict[str, Any]:
    return {"version": 1, "model": model, "model_version": "1.0.0",
            "window": {"start": 0.0, "end": 1.0, "predictions": 500}, "max_psi": psi,
            "inputs": {"x": {"kind": "tabular", "features": [
                {"feature": 0, "psi": psi, "js": psi / 10, "samples": 500},
                {"feature": 1, "psi": psi / 2, "js": 0.01, "samples": 500}]}}}


def test_monitor_and_alert_commands(server: Server, tmp_path: Path) -> None:
    from agent.drift import DRIFT_SUMMARY_KIND
    from agent.metrics import METRICS_KIND, RequestMetrics
    from agent.protocol.messages import DriftBatch, Record, TelemetryBatch
    from agent.protocol.topics import device_topic
    from fleet_server.fleet import open_fleet
    from fleet_server.ingest import handle_message
    from fleet_server.monitoring import evaluate_alerts
    from fleet_server.settings import Settings

    for device in ("mon-1", "mon-2"):
        assert server.run("device", "provision", device, "--profile", "rpi4", "--out",
                          tmp_path / f"{device}.json").exit_code == 0
    assert server.run("model", "push", _bundle(tmp_path / "b", name="mon")).exit_code == 0
    # the devices' records, through the real ingest of a second process-local Fleet
    fleet = open_fleet(Settings(data_dir=server.data_dir))
    now = int(time.time())
    try:
        for device, psis in (("mon-1", (0.05, 0.04, 0.05)), ("mon-2", (0.05, 0.6, 1.3))):
            for i, (ago, psi) in enumerate(zip((1500, 900, 60), psis, strict=True)):
                batch = DriftBatch(device_id=device, records=(Record(
                    seq=i + 1, kind=DRIFT_SUMMARY_KIND, at=now, body=_drift_body(psi)),))
                handle_message(fleet, device_topic(device, "drift"), batch.to_bytes(),
                               now=now - ago)
        metrics = RequestMetrics(start=now)
        for _ in range(90):
            metrics.observe("mon", "1.0.0", 4.0, True)
        for _ in range(10):
            metrics.observe("mon", "1.0.0", 0.0, False, "runtime")
        batch = TelemetryBatch(device_id="mon-1", records=tuple(
            Record(seq=1, kind=METRICS_KIND, at=now, body=b) for b in metrics.flush(now)))
        handle_message(fleet, device_topic("mon-1", "telemetry"), batch.to_bytes(), now=now)

        drift = server.run("monitor", "drift", "mon", "--device", "mon-2", "--since", "30m",
                           "--bucket", "5m")
        assert drift.exit_code == 0, drift.output
        [row] = [line for line in drift.stdout.splitlines() if line.startswith("mon-2 ")]
        assert row.split()[:6] == ["mon-2", "1.0.0", "3", "1.3", "rising", "(+1.25)"]
        assert "x[0] 1.3, x[1] 0.65" in row
        assert "Input drift of mon (every version) on mon-2 from" in drift.stdout
        buckets = drift.stdout.split("PREDICTIONS", 1)[1].split()
        assert buckets.count("500") == 3  # one window per listed bucket
        as_json = json.loads(server.run("monitor", "drift", "mon", "--json").stdout)
        assert {d["device"]: d["trend"] for d in as_json["devices"]} == {"mon-1": "steady",
                                                                          "mon-2": "rising"}
        model = server.run("monitor", "model", "mon")
        assert model.exit_code == 0, model.output
        assert "All versions: 100 requests, 10 errors (10.00%); latency p50 4 ms" in model.stdout
        # the devices never reported running it (no agent here): the table says so
        assert re.search(r"^mon-1 \(not running it\)\s+1\.0\.0\s+no\s+100\s+10\s+10\.00%\s+"
                         r"4\s+50\s+0\.05", model.stdout, re.MULTILINE), model.stdout
        fleet_out = server.run("monitor", "fleet")
        assert fleet_out.exit_code == 0, fleet_out.output
        assert re.search(r"^mon\s+1\.0\.0\s+0\s+2\s+100\s+10", fleet_out.stdout,
                         re.MULTILINE), fleet_out.stdout

        added = server.run("alert", "rule", "add", "mon", "--kind", "drift_psi", "--threshold",
                           "0.5", "--window", "10m", "--for", "0s", "--json")
        assert added.exit_code == 0, added.output  # --for 0: at once, as the default
        rule = json.loads(added.stdout)
        assert (rule["threshold"], rule["window_s"], rule["for_s"]) == (0.5, 600, 0)
        assert "10m" in server.run("alert", "rule", "list").stdout
        assert server.run("alert", "list").stdout.strip() == "No alerts."
        evaluate_alerts(fleet, now=now)
        firing = server.run("alert", "list", "--state", "firing")
        assert firing.exit_code == 0 and "FIRING" in firing.stdout
        assert "1 device(s) with input PSI over 0.5" in firing.stdout
        assert "mon-2 1.3" in firing.stdout
        removed = server.run("alert", "rule", "rm", str(rule["id"]))
        assert removed.stdout.strip() == f"Removed alert rule {rule['id']} (drift_psi on mon)."
        [alert] = json.loads(server.run("alert", "list", "--json").stdout)
        assert alert["state"] == "resolved"
    finally:
        fleet.engine.dispose()

    for args, code, words in [
            (["monitor", "drift", "mon", "--since", "soon"], 2, "expected a duration"),
            (["monitor", "drift", "mon", "--since", "0s"], 2, "such as 90s"),
            (["monitor", "model", "nope"], 1, "model 'nope' not found"),
            (["alert", "rule", "add", "mon", "--kind", "drift_psi"], 1,
             "threshold: expected a PSI > 0"),
            (["alert", "rule", "rm", "999"], 1, "alert rule 999 not found")]:
        result = server.run(*args)
        assert (result.exit_code, words in result.output) == (code, True), result.output


# --------------------------------------------------------------------------------- local commands

@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    from fleet_server.fleet import init_data_dir
    from fleet_server.settings import Settings

    d = tmp_path / "fleet"
    init_data_dir(Settings(data_dir=d))
    return d


def test_keys_rotate_timestamp_publishes_a_new_root(data_dir: Path) -> None:
    from fleet_server.tuf_repo import TufRepository

    result = run("keys", "rotate", "timestamp", "--data-dir", data_dir, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert (out["root_version_before"], out["root_version"]) == (1, 2)
    repo = TufRepository.open(data_dir / "tuf")
    assert repo.versions()["root"] == 2
    assert [k["keyid"] for k in repo.public_keys()["timestamp"]] == [out["keyid"]]


def test_keys_rotate_director_is_not_supported_yet(data_dir: Path) -> None:
    result = run("keys", "rotate", "director", "--data-dir", data_dir)
    assert result.exit_code == 2 and "not supported yet" in result.stderr


def test_keys_rotate_needs_a_fleet(tmp_path: Path) -> None:
    result = run("keys", "rotate", "root", "--data-dir", tmp_path)
    assert result.exit_code == 1 and "no TUF repository" in result.stderr


def test_mosquitto_config_lists_the_server_and_live_devices(data_dir: Path,
                                                            tmp_path: Path) -> None:
    from fleet_server import auth
    from fleet_server.db import atomic
    from fleet_server.fleet import open_fleet
    from fleet_server.mqtt.passwords import verify_password
    from fleet_server.registry import devices
    from fleet_server.settings import SERVER_MQTT_USER, Settings

    fleet = open_fleet(Settings(data_dir=data_dir))
    actor = auth.Principal("t", "test", "admin")
    with atomic(fleet.engine) as conn:
        for device_id in ("dev-1", "dev-2"):
            devices.provision(fleet, conn, device_id=device_id, profile="rpi4", tags=(),
                              actor=actor)
        devices.revoke(fleet, conn, "dev-2", actor=actor)
        stored = devices.credential_hash(conn, "dev-1")
    fleet.engine.dispose()

    out = tmp_path / "mosquitto"
    result = run("mosquitto-config", "--data-dir", data_dir, "--out", out, "--port", "18883")
    assert result.exit_code == 0, result.output
    users = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines()
                 if line and not line.startswith("#"))
    assert set(users) == {SERVER_MQTT_USER, "dev-1"}  # dev-2 is revoked
    assert users["dev-1"] == stored
    secret_file = data_dir / "mqtt" / "server.secret"
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    assert verify_password(secret, users[SERVER_MQTT_USER])
    assert secret not in result.output

    acl = (out / "acl").read_text()
    assert "pattern write edgefleet/v1/devices/%u/reported" in acl
    assert f"user {SERVER_MQTT_USER}\ntopic readwrite edgefleet/v1/#" in acl
    conf = (out / "mosquitto.conf").read_text().splitlines()
    for line in ("allow_anonymous false", f"password_file {(out / 'passwd').resolve()}",
                 f"acl_file {(out / 'acl').resolve()}", "listener 18883 127.0.0.1"):
        assert line in conf

    # a second run keeps the server's password
    assert run("mosquitto-config", "--data-dir", data_dir, "--out", out).exit_code == 0
    assert secret_file.read_text().strip() == secret


def test_serve_refuses_insecure_settings_in_production(tmp_path: Path) -> None:
    result = run("serve", "--data-dir", tmp_path, "--host", "0.0.0.0",
                 "--environment", "production")
    assert result.exit_code == 1, result.output
    assert "INSECURE: admin API on 0.0.0.0" in result.stderr
    assert "refusing to serve in production" in result.stderr


def test_serve_warns_off_loopback_and_runs_the_app(data_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fleet_server.api.app", reason="fleet_server.api is not written yet")
    import uvicorn

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    result = run("serve", "--data-dir", data_dir, "--host", "0.0.0.0", "--port", "18080")
    assert result.exit_code == 0, result.output
    assert "INSECURE: admin API on 0.0.0.0" in result.stderr
    [call] = calls
    assert (call["host"], call["port"]) == ("0.0.0.0", 18080)
    assert call["app"].state.settings.data_dir == data_dir


def test_a_directory_bundle_is_tarred_with_only_its_two_files(tmp_path: Path) -> None:
    from fleet_server.cli import _bundle_body

    with _bundle_body(_bundle(tmp_path / "b")) as (body, length):
        data = body.read()
    assert len(data) == length
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert sorted(tar.getnames()) == ["manifest.json", "model.onnx"]


# --------------------------------------------------------------------------------- docs

def _targets() -> list[Any]:
    return [pytest.param(path.split()[1:], id=path.partition(" ")[2] or "group")
            for path, _, _ in _load_generator().commands()]


TARGETS = _targets()


def test_the_commands_the_design_names_exist() -> None:
    paths = {" ".join(p.values[0]) for p in TARGETS}
    assert {"init", "serve", "token create", "device provision", "model push", "deploy",
            "rollout status"} <= paths


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("prefix", TARGETS)
def test_help_flags_work(prefix: list[str], flag: str) -> None:
    result = run(*prefix, flag)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(" ".join(["Usage: fleet_server", *prefix]))


@pytest.mark.parametrize("prefix", TARGETS)
def test_help_has_an_example_and_the_exit_codes(prefix: list[str]) -> None:
    text = run(*prefix, "--help").output
    assert "Example" in text, f"`fleet_server {' '.join(prefix)} --help` shows no example"
    assert " ".join(["fleet_server", *prefix]) in text.split("Example", 1)[1]
    flat = " ".join(text.split())
    assert "Exit codes:" in flat
    for code in ("0 ok", "1 error", "2 usage error"):
        assert code in flat, f"exit code {code!r} is not documented"


@pytest.mark.parametrize("prefix", TARGETS)
def test_version_everywhere(prefix: list[str]) -> None:
    result = run(*prefix, "--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"fleet_server, version {version('edgefleet')}"


def test_reference_is_generated_from_help() -> None:
    expected = _load_generator().generate()
    current = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "<missing>"
    assert current == expected, f"{DOCS.relative_to(ROOT)} is out of date: {REGENERATE}"


def test_reference_documents_every_command() -> None:
    text = DOCS.read_text(encoding="utf-8")
    for path, _, _ in _load_generator().commands():
        assert f"## `{path}`" in text, f"{path} is not documented: {REGENERATE}"


def test_generated_help_matches_what_users_see() -> None:
    generator = _load_generator()
    for path, command, parent in generator.commands():
        if isinstance(command, click.Group):
            continue  # a group's command list is cut to the terminal's width
        shown = run(*path.split()[1:], "--help").output
        documented = generator.help_text(command, parent)
        assert " ".join(shown.split()) == " ".join(documented.split()), path


def test_python_dash_m_runs_the_same_cli() -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "fleet_server", "--help"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: fleet_server")

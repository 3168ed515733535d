"""`make demo`: the main job end to end, as real processes driven through the real CLIs.

1. train two digits MLPs (v1, and a wider v2 that does better on the same held-out digits);
   convert each for rpi4 and rpi-zero2w; build a v3 from v2 that fails the on-device health
   check (its golden outputs are ones the model cannot reproduce);
2. create a fleet and start its server (admin API, embedded MQTT broker, TUF repository);
3. provision five devices of two profiles and start an agent for each;
4. push the bundles, deploy 1.0.0 to all, ask each device for a prediction;
5. roll out 2.0.0 in waves (20%, then 100%) with a bake and health gates, while traffic flows
   to every device; print the rollout's progress as it changes;
6. add a drift alert rule on the model, then feed shifted digits to pi-2 and normal ones to
   pi-1 (the control), a drift window at a time: the devices' drift summaries reach the server,
   whose drift view shows pi-2's PSI rising over the rule's threshold and pi-1's staying low
   (checked window by window through the API, shown with `fleet_server monitor drift`), and
   the alert fires on pi-2 only (`fleet_server alert list`);
7. roll out 3.0.0 in waves with --on-failure rollback: the first wave's devices fail their
   health check and roll back by themselves, the rollout fails its gate and rolls back, every
   device still serves 2.0.0;
8. check that the dashboard (/ui/) sends a visitor to its sign-in page, then stop everything
   (or leave it running with --keep).

Each step prints the command it runs, so the output doubles as a tutorial. Everything lands in
./demo-out (replaced on every run). Exit 0 on success; on any failure the tail of the relevant
log is printed, every child process is stopped and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_lib import (
    Children,
    DemoError,
    Shell,
    alert_devices,
    banner,
    drift_line,
    drift_windows,
    failing_copy,
    free_port,
    http_answer,
    http_ok,
    note,
    rollout_line,
    stop_stale,
    tail,
    wait_for,
)

if TYPE_CHECKING:
    import numpy as np

MODEL = "digits"
V1, V2, V3 = "1.0.0", "2.0.0", "3.0.0"
#: hidden layer sizes of the MLP trained as each version (same data split, same seed)
HIDDEN = {V1: (128, 64), V2: (256, 128)}
PROFILES = ("rpi4", "rpi-zero2w")
TAG = "lab"
#: id, profile
DEVICES = (("pi-1", "rpi4"), ("pi-2", "rpi4"), ("pi-3", "rpi4"),
           ("zero-1", "rpi-zero2w"), ("zero-2", "rpi-zero2w"))
DRIFTED, CONTROL = "pi-2", "pi-1"
PY = sys.executable
FLEET = [PY, "-m", "fleet_server"]
AGENT = [PY, "-m", "agent"]
TOOL = [PY, "-m", "model_tools"]

#: staged rollouts: the first wave is one device of five, then the rest
WAVES = "20%,100%"
BAKE_S = 3
#: requests a committed device serves before its error rate and p95 count
MIN_SAMPLES = 20
ROLLOUT_GATES = ["--waves", WAVES, "--bake", str(BAKE_S), "--max-failed", "0",
                 "--max-error-rate", "0.01", "--min-samples", str(MIN_SAMPLES)]
#: predictions per drift window on the devices (agent.toml): with the 200-sample baseline,
#: sampling noise alone gives a max PSI of ~0.1 at 400 and up to ~0.3 at 100 (the alert
#: threshold is 0.25), so a window must not be small
DRIFT_WINDOW = 400
DRIFT_BATCH = 50  # predictions per request when feeding drift (DRIFT_WINDOW is a multiple)
#: windows of shifted (and, to the control, normal) digits fed after the shift
SHIFTED_WINDOWS = 3
#: the drift alert rule: a device's largest input-feature PSI over this (a significant shift),
#: judged over this much of its history once it sent one full window
PSI_ALERT = 0.25
ALERT_WINDOW = "5m"
#: model_tools.examples.digits.shifted kind: the central 4x4 pixels read 0 (a dead sensor
#: region); the model gets ~30% of such digits right against ~98% of normal ones
SHIFT = "dead"
TRAFFIC_PAUSE_S = 0.1  # between rounds of one request to each device

#: seconds between the server's maintenance passes, where alert rules are evaluated (30 by
#: default; short here so the drift alert fires within seconds)
MAINTENANCE_S = 2

HEALTH_TIMEOUT_S = 30.0
ONLINE_TIMEOUT_S = 30.0
ROLLOUT_TIMEOUT_S = 60.0
DRIFT_TIMEOUT_S = 30.0
ALERT_TIMEOUT_S = 30.0


def rel(path: Path) -> str:
    return os.path.relpath(path)


@dataclass
class TrafficReport:
    requests: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    versions: dict[str, list[str]] = field(default_factory=dict)  # in the order first seen


class Traffic:
    """Single-sample predictions to every device in turn, from one thread, as users would send
    them: the rollout's health gates judge devices on real requests, and every answer's model
    version is recorded, so a request dropped during a model swap would show."""

    def __init__(self, ports: Mapping[str, int], x: np.ndarray) -> None:
        self.ports, self.x = ports, x
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.report = TrafficReport()

    def start(self) -> None:
        self._stop.clear()
        self.report = TrafficReport(requests=dict.fromkeys(self.ports, 0),
                                    versions={d: [] for d in self.ports})
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> TrafficReport:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        return self.report

    def _run(self) -> None:
        from agent.errors import AgentError
        from agent.serving.client import AgentClient

        clients = {d: AgentClient("127.0.0.1", port, timeout=10) for d, port in self.ports.items()}
        i = 0
        try:
            while not self._stop.is_set():
                for device_id, client in clients.items():
                    row = self.x[i % len(self.x)][None, :]
                    i += 1
                    self.report.requests[device_id] += 1
                    try:
                        answer = client.predict(MODEL, {"input": row})
                    except (AgentError, OSError) as exc:
                        self.report.failures.append(f"{device_id}: {exc}")
                        continue
                    seen = self.report.versions[device_id]
                    if answer.version not in seen:
                        seen.append(answer.version)
                self._stop.wait(TRAFFIC_PAUSE_S)
        finally:
            for client in clients.values():
                client.close()


def traffic_summary(report: TrafficReport) -> str:
    total = sum(report.requests.values())
    versions = "; ".join(f"{d} {' then '.join(v) or 'nothing'}"
                         for d, v in report.versions.items())
    return (f"{total:,} requests to {len(report.requests)} devices, {len(report.failures)} "
            f"failed; answered by: {versions}")


class Demo:
    def __init__(self, out: Path, shell: Shell, children: Children) -> None:
        self.out, self.sh, self.children = out, shell, children
        self.url = ""
        self.token_file = out / "admin-token"
        self.server_log = out / "server.log"
        self.server_dir = out / "server"
        self.ports: dict[str, int] = {}
        self.agents: dict[str, Any] = {}
        self.bundles: dict[tuple[str, str], Path] = {}  # (version, profile) -> bundle dir
        self.accuracy: dict[str, float] = {}
        self.summary: list[str] = []

    # ----------------------------------------------------------------------------- steps

    def build(self) -> None:
        banner("1/8 train two real models: scikit-learn MLPs on the bundled digits data set")
        import numpy as np

        from model_tools.examples import train_digits_mlp

        examples = {}
        for version, hidden in HIDDEN.items():
            where = self.out / "model" / version
            note(f">>> model_tools.examples.train_digits_mlp({rel(where)!r}, hidden={hidden})")
            ex = train_digits_mlp(where, hidden=hidden)
            examples[version] = ex
            self.accuracy[version] = ex.source_accuracy
            note(f"  -> {version}: hidden layers {hidden}, trained in {ex.train_seconds:.1f}s, "
                 f"held-out accuracy {ex.source_accuracy:.4f}; {rel(ex.onnx_path)} "
                 f"({ex.onnx_path.stat().st_size:,} bytes)")
        note("  (same data split: the same held-out digits judge both; calibration and eval "
             "sets beside each model)")
        with np.load(examples[V1].eval_path) as npz:
            self.x = np.asarray(npz[examples[V1].input_name], np.float32)
            self.labels = np.asarray(npz["labels"])

        banner(f"2/8 convert both for {', '.join(PROFILES)}; build {V3}, made to fail on "
               "the devices")
        for version, ex in examples.items():
            for profile in PROFILES:
                bundle = self.out / "bundles" / f"{MODEL}-{version}-{profile}"
                done = self.sh.run([
                    *TOOL, "convert", rel(ex.onnx_path), "--profile", profile,
                    "--out", rel(bundle), "--calibration", rel(ex.calibration_path),
                    "--eval", rel(ex.eval_path), "--name", MODEL, "--version", version,
                    "--json"], show_output=False)
                report = json.loads(done.stdout)
                chosen = next(c for c in report["candidates"] if c.get("chosen"))
                note(f"  -> {rel(bundle)}: {report['chosen']}, {chosen['size_bytes']:,} bytes, "
                     f"top-1 agreement {chosen['top1_agreement']:.4f} with the source on "
                     f"{report['validation']['samples']} eval samples")
                self.bundles[(version, profile)] = bundle
        note("")
        note(f"{V3} is {V2}'s bundle with golden outputs 1 - p, which the model cannot "
             "reproduce: a bad build.\nThe model file, its sha256 and length are untouched, "
             "so it passes every check before the device's own health check.")
        for profile in PROFILES:
            bundle = self.out / "bundles" / f"{MODEL}-{V3}-{profile}"
            note(f">>> failing_copy({rel(self.bundles[V2, profile])!r}, {rel(bundle)!r}, "
                 f"{V3!r})")
            changed = failing_copy(self.bundles[V2, profile], bundle, V3)
            self.bundles[(V3, profile)] = bundle
            note(f"  -> {rel(bundle)}: golden output(s) {', '.join(changed)} replaced")
        done = self.sh.run([*TOOL, "inspect", rel(self.bundles[V3, "rpi4"])],
                           show_output=False)
        for line in done.stdout.splitlines():
            if line.startswith(("model ", "file", "golden")):
                note(f"  {line}")

    def start_server(self) -> None:
        banner("3/8 create a fleet and start its server (admin API, embedded MQTT broker, "
               "TUF repository)")
        done = self.sh.run([*FLEET, "init", "--data-dir", rel(self.server_dir), "--json"],
                           show_output=False)
        token = json.loads(done.stdout)["token"]
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        note(f"  created {rel(self.server_dir)}: database, TUF repository and keys, director "
             f"key; the first admin token (printed once) saved in {rel(self.token_file)} "
             "(0600)")

        api_port, mqtt_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{api_port}"
        started = time.monotonic()
        server = self.children.start("server", [
            *FLEET, "serve", "--data-dir", rel(self.server_dir), "--port", str(api_port),
            "--mqtt-port", str(mqtt_port), "--maintenance-interval", str(MAINTENANCE_S)],
            self.server_log)
        self.server = server
        wait_for("the server's /healthz", lambda: http_ok(f"{self.url}/healthz"),
                 timeout=HEALTH_TIMEOUT_S, alive=lambda: self.children.check_alive(server),
                 log=self.server_log)
        note(f"  server up in {time.monotonic() - started:.1f}s (pid {server.proc.pid}): "
             f"admin API {self.url}, MQTT broker mqtt://127.0.0.1:{mqtt_port}; alert rules "
             f"evaluated every {MAINTENANCE_S}s")
        print(f"$ export EDGEFLEET_URL={self.url} "
              f"EDGEFLEET_TOKEN=$(cat {rel(self.token_file)})", flush=True)
        self.sh.env["EDGEFLEET_URL"] = self.url
        self.sh.env["EDGEFLEET_TOKEN"] = token

    def start_devices(self) -> None:
        banner(f"4/8 provision {len(DEVICES)} devices and start an agent for each")
        for device_id, profile in DEVICES:
            ddir = self.out / "devices" / device_id
            ddir.mkdir(parents=True)
            prov = ddir / "provisioning.json"
            self.sh.run([*FLEET, "device", "provision", device_id, "--profile", profile,
                         "--tag", TAG, "--out", rel(prov)], show_output=False)
            mode = prov.stat().st_mode & 0o777
            if mode != 0o600:
                raise DemoError(f"{prov} has mode {mode:o}, expected 600")
            port = free_port()
            self.ports[device_id] = port
            (ddir / "agent.toml").write_text(
                'provisioning = "provisioning.json"\n'
                'data_dir = "data"\n'
                f"http_port = {port}\n"
                "metrics_interval_s = 1\n"
                f"drift_window = {DRIFT_WINDOW}\n"
                "drift_window_s = 600\n", encoding="utf-8")
            note(f"  -> {rel(prov)} (0600, the device's secrets); local API on port {port}")
        first = self.out / "devices" / DEVICES[0][0] / "agent.toml"
        print(f"$ cat {rel(first)}", flush=True)
        Shell.echo(first.read_text(encoding="utf-8"), 10)

        started = time.monotonic()
        for device_id, _profile in DEVICES:
            ddir = self.out / "devices" / device_id
            self.agents[device_id] = self.children.start(
                device_id, [*AGENT, "run", "--config", rel(ddir / "agent.toml")],
                ddir / "agent.log")
        for device_id, _profile in DEVICES:
            child = self.agents[device_id]
            health = f"http://127.0.0.1:{self.ports[device_id]}/healthz"
            wait_for(f"{device_id}'s local API", partial(http_ok, health),
                     timeout=ONLINE_TIMEOUT_S, alive=partial(self.children.check_alive, child),
                     log=child.log)
        wait_for("every device online at the server", self._all_online,
                 timeout=ONLINE_TIMEOUT_S, alive=self.children.check_all_alive,
                 log=self.server_log)
        note(f"  {len(DEVICES)} agents up and connected in {time.monotonic() - started:.1f}s")
        self.sh.run([*FLEET, "device", "list"])

    def deploy_v1(self) -> None:
        banner(f"5/8 push the bundles, deploy {MODEL} {V1} to every device, ask each for a "
               "prediction")
        for (_version, profile), bundle in self.bundles.items():
            done = self.sh.run([*FLEET, "model", "push", rel(bundle), "--json"],
                               show_output=False)
            pushed = json.loads(done.stdout)
            art = next(a for a in pushed["artifacts"] if a["profile"] == profile)
            note(f"  -> {pushed['name']} {pushed['version']} for {profile}: "
                 f"TUF target {art['target_path']} ({art['length']:,} bytes)")
        started = time.monotonic()
        self.sh.run([*FLEET, "deploy", MODEL, V1, "--to", f"tag:{TAG}"])
        self._wait_plain_deploy(V1)
        note(f"  (every device runs {MODEL} {V1} after {time.monotonic() - started:.1f}s)")
        self.sh.run([*FLEET, "rollout", "status"])
        self._predict_all(V1)
        self.summary.append(f"{MODEL} {V1} deployed to {len(DEVICES)} devices, each served a "
                            "prediction")

    def roll_out_v2(self, traffic: Traffic) -> None:
        banner(f"6/8 roll out {MODEL} {V2} in waves ({WAVES}), {BAKE_S}s bake, health gates, "
               "traffic flowing")
        note(f"  v2's held-out accuracy {self.accuracy[V2]:.4f} against v1's "
             f"{self.accuracy[V1]:.4f}. Traffic from here on: one digit to each device every "
             f"{TRAFFIC_PAUSE_S:g}s\n  (the error-rate and p95 gates judge a committed device "
             f"once it served {MIN_SAMPLES} requests on the new version)")
        traffic.start()
        rollout_id = self._deploy_rollout(V2)
        final = self._follow_rollout(rollout_id, V2, until=("completed",))
        report = traffic.stop()
        self.sh.run([*FLEET, "rollout", "status", str(rollout_id)], show_output=30)
        note(f"  traffic during the rollout: {traffic_summary(report)}")
        wrong = [d for d, v in report.versions.items() if not v or v[-1] != V2]
        if report.failures or wrong:
            raise DemoError(f"during the {V2} rollout: {len(report.failures)} request(s) "
                            f"failed ({'; '.join(report.failures[:3])}), devices not answering "
                            f"with {V2}: {', '.join(wrong) or 'none'}", self.server_log)
        committed = sum(int(w["committed"]) for w in final["waves"])
        self.summary.append(f"{V2} rolled out in {final['wave_count']} waves ({WAVES}), "
                            f"{committed} devices committed; "
                            f"{sum(report.requests.values()):,} requests meanwhile, "
                            f"{len(report.failures)} failed")

    def drift(self) -> None:
        banner(f"7/8 drift: shifted digits to {DRIFTED}, normal ones to {CONTROL} (the "
               "control); the server sees it and alerts")
        from agent.errors import AgentError
        from agent.serving.client import AgentClient
        from model_tools.examples.digits import shifted

        note(f"  Each agent bins its live inputs against the bundle's baseline and, every "
             f"{DRIFT_WINDOW} predictions\n  (drift_window in agent.toml), sends a summary: "
             "PSI and JS per input feature. Never an input value.")
        self.sh.run([*FLEET, "alert", "rule", "add", MODEL, "--kind", "drift_psi",
                     "--threshold", f"{PSI_ALERT:g}", "--min-devices", "1",
                     "--window", ALERT_WINDOW, "--min-samples", str(DRIFT_WINDOW)])
        with self._client() as api:
            rule_id = max(int(r["id"]) for r in api.list_alert_rules() if r["model"] == MODEL)
        note(f"  (it fires at once, no --for; a device is judged once it sent one full window "
             f"of {DRIFT_WINDOW} predictions;\n  the server evaluates rules every "
             f"{MAINTENANCE_S}s)")
        order = self._normal_order()

        def feed(device_id: str, x: np.ndarray, labels: np.ndarray, what: str, *,
                 show: bool) -> int:
            port = self.ports[device_id]
            if show:
                note(f">>> AgentClient('127.0.0.1', {port}).predict({MODEL!r}, {{'input': x}})"
                     f"  # {device_id}: {len(x)} {what}, {DRIFT_BATCH} per request")
            right = 0
            with AgentClient("127.0.0.1", port) as client:
                for i in range(0, len(x), DRIFT_BATCH):
                    try:
                        answer = client.predict(MODEL, {"input": x[i:i + DRIFT_BATCH]})
                    except (AgentError, OSError) as exc:
                        raise DemoError(f"{device_id} refused a prediction: {exc}",
                                        self.agents[device_id].log) from exc
                    probs = answer.outputs["probabilities"]
                    right += int((probs.argmax(axis=1) == labels[i:i + DRIFT_BATCH]).sum())
            return right

        # one window per device, then a second boundary: every window lands in its own 1 s
        # bucket of the server's drift view, whose value is then that window's (drift_windows)
        since = _next_second()
        for device_id in (CONTROL, DRIFTED):
            idx = next(order)[:DRIFT_WINDOW]
            feed(device_id, self.x[idx], self.labels[idx], "normal digits", show=True)
        before = self._server_windows(since, 1)
        note("  the server's view, before the shift (GET /v1/monitoring/models/"
             f"{MODEL}/drift?version={V2}&bucket=1):")
        for device_id in (CONTROL, DRIFTED):
            note(f"  -> {drift_line(device_id, before[device_id], PSI_ALERT)}")

        right = dict.fromkeys((CONTROL, DRIFTED), 0)
        for k in range(1, SHIFTED_WINDOWS + 1):
            _next_second()
            idx = _take(order, DRIFT_WINDOW)
            right[CONTROL] += feed(CONTROL, self.x[idx], self.labels[idx], "normal digits",
                                   show=k == 1)
            idx = _take(order, DRIFT_WINDOW)
            right[DRIFTED] += feed(DRIFTED, shifted(self.x[idx], SHIFT), self.labels[idx],
                                   f"digits with dead central 4x4 pixels (shifted(x, "
                                   f"{SHIFT!r}))", show=k == 1)
            self._server_windows(since, 1 + k)
            if k == 1:
                note(f"  ... {SHIFTED_WINDOWS} windows' worth to each, a window at a time")
        fed = SHIFTED_WINDOWS * DRIFT_WINDOW
        note(f"  {DRIFTED} got {right[DRIFTED] / fed:.0%} of these digits right, {CONTROL} "
             f"{right[CONTROL] / fed:.0%} of the normal ones; in the field no label says so, "
             "the drift does:")
        note("  the server's view, after (* = a window sent after the shift):")
        found = self._server_windows(since, 1 + SHIFTED_WINDOWS)
        for device_id in (CONTROL, DRIFTED):
            note(f"  -> {drift_line(device_id, found[device_id], PSI_ALERT, shifted_from=1)}")
        drifted, control = found[DRIFTED][1:], found[CONTROL][1:]
        # the first shifted window may still hold normal digits sent with the v2 rollout's
        # traffic (a window closes every DRIFT_WINDOW predictions, counted from the install)
        if not all(v > PSI_ALERT for v in drifted[1:]) or any(v > PSI_ALERT for v in control):
            raise DemoError(f"expected {DRIFTED}'s max PSI over {PSI_ALERT:g} from its second "
                            f"shifted window on and {CONTROL}'s at or under it; got "
                            f"{DRIFTED} {drifted}, {CONTROL} {control}", self.server_log)

        self.sh.run([*FLEET, "monitor", "drift", MODEL, "--model-version", V2,
                     "--since", "5m"], show_output=20)
        with self._client() as api:
            view = api.monitor_drift(MODEL, version=V2, since=int(time.time()) - 300)
        trends = {d["device"]: d for d in view["devices"]}
        if trends.get(DRIFTED, {}).get("trend") != "rising":
            raise DemoError(f"expected `monitor drift` to show {DRIFTED}'s drift rising, got "
                            f"{trends.get(DRIFTED)}", self.server_log)

        alert = self._wait_alert(rule_id)
        self.sh.run([*FLEET, "alert", "list"], width=300)  # its summary names the devices
        self.summary.append(
            f"drift: {DRIFTED}'s max PSI went from {found[DRIFTED][0]:.2g} to "
            f"{found[DRIFTED][-1]:.3g} (alert threshold {PSI_ALERT:g}), the control {CONTROL} "
            f"stayed at {max(found[CONTROL]):.2g} or less")
        self.summary.append(
            f"`fleet_server monitor drift {MODEL} --model-version {V2} --since 5m`: "
            + "; ".join(f"{d} {trends[d]['trend']}, latest max PSI "
                        f"{trends[d]['latest_max_psi']:.3g}" for d in (DRIFTED, CONTROL)
                        if d in trends))
        self.summary.append(f"`fleet_server alert list`: alert {alert['id']} "
                            f"{alert['state']} on {', '.join(alert_devices(alert))} only: "
                            f"{alert['summary']}")

    def roll_out_v3(self, traffic: Traffic) -> None:
        banner(f"8/8 roll out {MODEL} {V3} (fails its health check) in waves, "
               "--on-failure rollback")
        traffic.start()
        rollout_id = self._deploy_rollout(V3, "--on-failure", "rollback")
        final = self._follow_rollout(rollout_id, V3, until=("rolled_back",))
        report = traffic.stop()
        self.sh.run([*FLEET, "rollout", "status", str(rollout_id)], show_output=30)
        failed = [r for r in final["devices"] if r["outcome"] == "failed"]
        if not failed:
            raise DemoError(f"expected the first wave of {V3} to fail its health check; "
                            f"rollout {rollout_id}: {rollout_line(final)}", self.server_log)
        for row in failed:
            device_id = row["device_id"]
            done = self.sh.run([*FLEET, "device", "show", device_id, "--json"],
                               show_output=False)
            rep = json.loads(done.stdout).get("reported") or {}
            running = ", ".join(f"{m['name']} {m['version']}" for m in rep.get("running") or ())
            note(f"  -> {device_id}: running {running or '-'}; last_result "
                 f"{rep.get('last_result')}; last_error:\n     {rep.get('last_error') or '-'}")
        first = failed[0]["device_id"]
        config = self.out / "devices" / first / "agent.toml"
        self.sh.run([*AGENT, "status", "--config", rel(config)])
        note(f"  traffic during the rollout: {traffic_summary(report)}")
        wrong = [d for d, v in report.versions.items() if v != [V2]]
        if report.failures or wrong:
            raise DemoError(f"during the {V3} rollout: {len(report.failures)} request(s) "
                            f"failed ({'; '.join(report.failures[:3])}), devices that did not "
                            f"answer with {V2} only: {', '.join(wrong) or 'none'}",
                            self.server_log)
        note(f"  every device still serves {MODEL} {V2}")
        names = ", ".join(r["device_id"] for r in failed)
        self.summary.append(f"{V3} failed its health check on {names} (rolled back by the "
                            f"device itself); rollout {rollout_id} "
                            f"{final['status']}, every device still serves {V2}")

    # ----------------------------------------------------------------------------- helpers

    def _client(self) -> Any:
        from fleet_server.client import FleetClient

        return FleetClient(self.url, self.sh.env["EDGEFLEET_TOKEN"])

    def _all_online(self) -> bool:
        with self._client() as api:
            devices = api.list_devices()
        online = {d["id"] for d in devices if d.get("online")}
        return all(d[0] in online for d in DEVICES)

    def _wait_plain_deploy(self, version: str) -> None:
        """Poll the deployments' progress (what `rollout status --json` prints) until every
        device of the deployment of ``version`` is done."""
        last: list[dict[str, Any]] = []

        def check() -> bool:
            with self._client() as api:
                status = api.rollout()
            for entry in status:
                dep = entry["deployment"]
                if dep.get("model") == MODEL and dep.get("version") == version:
                    last[:] = entry["devices"]
            return len(last) == len(DEVICES) and all(r["state"] == "done" for r in last)

        try:
            wait_for(f"every device to run {version}", check, timeout=ROLLOUT_TIMEOUT_S,
                     interval=0.5, alive=self.children.check_all_alive, log=self.server_log)
        except DemoError as exc:
            late = [r for r in last if r["state"] != "done"]
            states = "; ".join(f"{r['device']}: {r['state']} (running {r['running_version']})"
                               for r in last) or "no rows"
            log = self.agents[late[0]["device"]].log if late else exc.log
            raise DemoError(f"{exc}; last seen: {states}", log) from exc

    def _deploy_rollout(self, version: str, *extra: str) -> int:
        self.sh.run([*FLEET, "deploy", MODEL, version, "--to", f"tag:{TAG}", *ROLLOUT_GATES,
                     *extra])
        with self._client() as api:  # a failing rollout may have ended already: any status
            ids = [int(r["id"]) for r in api.list_rollouts()
                   if r["model"] == MODEL and r["version"] == version]
        if not ids:
            raise DemoError(f"no rollout of {MODEL} {version} after the deploy",
                            self.server_log)
        return max(ids)

    def _follow_rollout(self, rollout_id: int, version: str, *, until: tuple[str, ...]
                        ) -> dict[str, Any]:
        """Poll ``GET /v1/rollouts/ID`` (what ``rollout status ID --json`` prints) and print a
        line whenever the progress changes, until the rollout's status is in ``until`` with
        nothing pending; another final status is an error.

        Only reads: the server moves the rollout by itself, re-planning it when a device
        reports, when telemetry arrives from a device it holds, and every second while it
        runs (a bake ending).
        """
        print(f"$ {self.sh.display([*FLEET, 'rollout', 'status', str(rollout_id), '--json'])}"
              "   (polled: one line per change)", flush=True)
        started = time.monotonic()
        shown: list[str] = []

        def check() -> dict[str, Any] | None:
            with self._client() as api:
                rollout: dict[str, Any] = api.get_rollout(rollout_id)
            line = rollout_line(rollout)
            if not shown or line != shown[-1]:
                shown.append(line)
                note(f"  {time.monotonic() - started:5.1f}s  {line}")
            status = rollout["status"]
            pending = sum(int(w.get("pending") or 0) for w in rollout["waves"])
            if status in until and not pending:
                return rollout
            if status not in ("running", *until):
                raise DemoError(f"rollout {rollout_id} of {version} ended {status}, expected "
                                f"{' or '.join(until)}: {rollout.get('reason')}",
                                self.server_log)
            return None

        result: dict[str, Any] = wait_for(
            f"rollout {rollout_id} of {version} to end {' or '.join(until)}", check,
            timeout=ROLLOUT_TIMEOUT_S, interval=0.25, alive=self.children.check_all_alive,
            log=self.server_log)
        return result

    def _server_windows(self, since: int, count: int) -> dict[str, list[float]]:
        """Wait until the server holds ``count`` drift windows of :data:`V2` from each of
        CONTROL and DRIFTED received after ``since``; return their max PSI, oldest first.

        Read through the API's drift view (``FleetClient.monitor_drift``) with 1 s buckets:
        the demo feeds a window at a time and lets a second pass before the next, so each
        bucket holds one window and its value is that window's (:func:`drift_windows` refuses
        a bucket holding more).
        """
        last: dict[str, list[float]] = {}

        def check() -> dict[str, list[float]] | None:
            with self._client() as api:
                view = api.monitor_drift(MODEL, version=V2, since=since, bucket=1)
            try:
                last.update({d: drift_windows(view, d) for d in (CONTROL, DRIFTED)})
            except ValueError as exc:
                raise DemoError(str(exc), self.server_log) from exc
            return dict(last) if all(len(v) >= count for v in last.values()) else None

        try:
            found: dict[str, list[float]] = wait_for(
                f"the server to hold {count} drift window(s) of {CONTROL} and {DRIFTED}",
                check, timeout=DRIFT_TIMEOUT_S, interval=0.25,
                alive=self.children.check_all_alive, log=self.server_log)
        except DemoError as exc:
            raise DemoError(f"{exc}; it holds {last}", exc.log) from exc
        if any(len(v) != count for v in found.values()):
            raise DemoError(f"expected {count} drift window(s) of each device since the step "
                            f"began, got {found}", self.server_log)
        return found

    def _wait_alert(self, rule_id: int) -> dict[str, Any]:
        """Wait until alert rule ``rule_id`` has an alert firing; it must name DRIFTED only."""
        def check() -> dict[str, Any] | None:
            with self._client() as api:
                alerts = api.list_alerts(state="firing", model=MODEL)
            return next((a for a in alerts if a["rule_id"] == rule_id), None)

        alert: dict[str, Any] = wait_for(
            f"alert rule {rule_id} to fire", check, timeout=ALERT_TIMEOUT_S, interval=0.5,
            alive=self.children.check_all_alive, log=self.server_log)
        if alert_devices(alert) != [DRIFTED]:
            raise DemoError(f"expected the drift alert on {DRIFTED} only, got "
                            f"{alert_devices(alert)}: {alert['summary']}", self.server_log)
        return alert

    def check_dashboard(self) -> None:
        """``GET /ui/`` must send a visitor without a session to the sign-in page, which must
        answer."""
        answer = http_answer(f"{self.url}/ui/")
        note(f">>> GET {self.url}/ui/  -> {answer[0] if answer else 'no answer'}"
             + (f", Location: {answer[1]}" if answer and answer[1] else ""))
        if answer is None or answer[0] not in (302, 303, 307) \
                or not answer[1].startswith("/ui/login") \
                or not http_ok(f"{self.url}{answer[1]}"):
            raise DemoError(f"expected GET {self.url}/ui/ to redirect to a sign-in page at "
                            f"/ui/login that answers 200, got {answer}", self.server_log)

    def _predict_all(self, expect_version: str) -> None:
        """One held-out digit per device, each a different one: the first through the CLI,
        the others through the same client library the CLI uses (faster than a process
        each)."""
        from agent.serving.client import AgentClient

        seen: set[int] = set()
        picks = []
        for i, label in enumerate(self.labels):
            if int(label) not in seen:
                seen.add(int(label))
                picks.append(i)
            if len(picks) == len(DEVICES):
                break
        for n, ((device_id, profile), index) in enumerate(zip(DEVICES, picks, strict=True)):
            pixels = [float(v) for v in self.x[index]]
            port = self.ports[device_id]
            if n == 0:
                body = json.dumps({"inputs": {"input": [pixels]}})
                head = ", ".join(f"{v:g}" for v in pixels[:6])
                shown = f"'{{\"inputs\": {{\"input\": [[{head}, ...]]}}}}'"
                args = [*AGENT, "predict", MODEL, "--port", str(port), "--json", body]
                done = self.sh.run(args, show_output=False, shown={len(args) - 1: shown})
                answer = json.loads(done.stdout)
                model, version = answer["model"], answer["version"]
                probs = answer["outputs"]["probabilities"][0]
                note("  (the --json body is abridged: it holds all 64 pixel values of one "
                     "8x8 digit)")
            else:
                note(f">>> AgentClient('127.0.0.1', {port}).predict({MODEL!r}, "
                     f"{{'input': eval_x[{index}:{index + 1}]}})")
                with AgentClient("127.0.0.1", port) as client:
                    out = client.predict(MODEL, {"input": self.x[index:index + 1]})
                model, version = out.model, out.version
                probs = [float(p) for p in out.outputs["probabilities"][0]]
            predicted = max(range(len(probs)), key=probs.__getitem__)
            label = int(self.labels[index])
            verdict = "correct" if predicted == label else "WRONG"
            note(f"  -> {device_id} ({profile}) served by {model} {version}: eval sample "
                 f"#{index} predicted {predicted} (p={probs[predicted]:.2f}), true label "
                 f"{label}: {verdict}")
            if version != expect_version:
                raise DemoError(f"{device_id} answered with {version}, expected "
                                f"{expect_version}", self.agents[device_id].log)

    def _normal_order(self) -> Iterator[np.ndarray]:
        """Endless shuffles of the held-out digits: windows of in-distribution inputs without
        repeats (repeats would add sampling noise to the drift figures)."""
        import numpy as np

        rng = np.random.default_rng(0)
        while True:
            yield rng.permutation(len(self.x))


def _take(order: Iterator[np.ndarray], n: int) -> np.ndarray:
    import numpy as np

    parts: list[np.ndarray] = []
    while sum(len(p) for p in parts) < n:
        parts.append(next(order))
    return np.concatenate(parts)[:n]


def _next_second() -> int:
    """Wait for the next whole second of the clock the server stamps records with; return the
    one before it: what the server received until now has ``received_at`` at most that, what
    it receives from here on more (a drift view ``since`` it holds only the latter)."""
    now = time.time()
    current = math.floor(now)
    time.sleep(current + 1 - now)
    return current


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--out", type=Path, default=Path("demo-out"),
                        help="output directory, replaced on every run (default demo-out)")
    parser.add_argument("--keep", action="store_true",
                        help="leave the server and the agents running at the end "
                             "(PIDs in OUT/pids)")
    opts = parser.parse_args(argv)
    out: Path = opts.out
    started = time.monotonic()
    # SIGTERM to the demo unwinds like Ctrl-C: the finally below stops every child
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    for line in stop_stale(out / "pids", out):
        note(line)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # the embedded defaults: no EDGEFLEET_* from the caller's shell leaks into the children
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env["PYTHONUNBUFFERED"] = "1"
    shell = Shell(Path.cwd(), env)
    children = Children(shell, out / "pids")
    demo = Demo(out, shell, children)
    traffic: Traffic | None = None
    ok = False
    try:
        demo.build()
        demo.start_server()
        demo.start_devices()
        demo.deploy_v1()
        traffic = Traffic(demo.ports, demo.x)
        demo.roll_out_v2(traffic)
        demo.drift()
        demo.roll_out_v3(traffic)
        demo.check_dashboard()
        ok = True
    except DemoError as exc:
        print(f"\ndemo FAILED: {exc}", file=sys.stderr, flush=True)
        if exc.output:
            print("\n".join(exc.output.splitlines()[-25:]), file=sys.stderr)
        if exc.log is not None:
            print(f"--- last lines of {rel(exc.log)}:", file=sys.stderr)
            print(tail(exc.log), file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        if traffic is not None:
            traffic.stop()
        if not (ok and opts.keep):
            stopped = children.stop_all()
            if stopped:
                note(("\n" if ok else "") + "stopping the agents, then the server "
                     "(SIGTERM, up to 10s, then kill):")
                for line in stopped:
                    note(f"  {line}")
    if not ok:
        return 1

    banner(f"done in {time.monotonic() - started:.0f}s")
    for i, line in enumerate(demo.summary, 1):
        note(f"{i}. {line}")
    note("")
    devices = ", ".join(f"{d} :{demo.ports[d]}" for d, _p in DEVICES)
    note(f"admin API   {demo.url}  (token in {rel(demo.token_file)}; "
         f"export EDGEFLEET_URL={demo.url} EDGEFLEET_TOKEN=$(cat {rel(demo.token_file)}))")
    note(f"dashboard   {demo.url}/ui/  (sign in with the admin token)")
    note(f"devices     local inference APIs: {devices}")
    note(f"logs        {rel(demo.server_log)}, {rel(out / 'devices')}/<id>/agent.log")
    if opts.keep:
        children.keep()
        note(f"running     server pid {demo.server.proc.pid}; agents "
             + ", ".join(f"{d} pid {c.proc.pid}" for d, c in demo.agents.items())
             + f" (listed in {rel(out / 'pids')})")
        note(f"stop with   kill $(cut -d' ' -f2 {rel(out / 'pids')})   "
             "(or just run the demo again)")
    else:
        note("(everything above is stopped now; `make demo DEMO_ARGS=--keep` leaves it "
             "running)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`make demo`: the main job end to end, as real processes driven through the real CLIs.

1. train a digits MLP; convert it for rpi4 and rpi-zero2w as 1.0.0 and 2.0.0 (v2 is built to
   fail its on-device health check);
2. create a fleet and start its server (admin API, embedded MQTT broker, TUF repository);
3. provision three devices and start an agent for each;
4. push the bundles, deploy 1.0.0, wait until every device runs it, ask each for a prediction;
5. deploy 2.0.0, watch every device refuse it and roll back to 1.0.0, still serving;
6. stop everything (or leave it running with --keep).

Each step prints the command it runs, so the output doubles as a tutorial. Everything lands in
./demo-out (replaced on every run). Exit 0 on success; on any failure the tail of the relevant
log is printed, every child process is stopped and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo_lib import (
    Children,
    DemoError,
    Shell,
    banner,
    corrupt_golden_outputs,
    free_port,
    http_ok,
    note,
    stop_stale,
    tail,
    wait_for,
)

MODEL = "digits"
V1, V2 = "1.0.0", "2.0.0"
PROFILES = ("rpi4", "rpi-zero2w")
#: id, profile, tags
DEVICES = (("pi-1", "rpi4", ("lab",)), ("pi-2", "rpi4", ("lab",)),
           ("zero-1", "rpi-zero2w", ("lab",)))
PY = sys.executable
FLEET = [PY, "-m", "fleet_server"]
AGENT = [PY, "-m", "agent"]
TOOL = [PY, "-m", "model_tools"]

HEALTH_TIMEOUT_S = 30.0
ONLINE_TIMEOUT_S = 30.0
ROLLOUT_TIMEOUT_S = 60.0


def rel(path: Path) -> str:
    return os.path.relpath(path)


class Demo:
    def __init__(self, out: Path, shell: Shell, children: Children) -> None:
        self.out, self.sh, self.children = out, shell, children
        self.url = ""
        self.token_file = out / "admin-token"
        self.server_log = out / "server.log"
        self.ports: dict[str, int] = {}
        self.agents: dict[str, Any] = {}
        self.samples: list[tuple[int, list[float], int]] = []
        self.predicted_once = False
        self.bundles: dict[tuple[str, str], Path] = {}  # (version, profile) -> bundle dir

    # ----------------------------------------------------------------------------- steps

    def build(self) -> None:
        banner("1/6 train a real model: scikit-learn MLP on the bundled digits data set")
        import numpy as np

        from model_tools.examples import train_digits_mlp

        note(f">>> model_tools.examples.train_digits_mlp({rel(self.out / 'model')!r})")
        example = train_digits_mlp(self.out / "model")
        note(f"trained {example.name} in {example.train_seconds:.1f}s: eval accuracy "
             f"{example.source_accuracy:.4f}; {rel(example.onnx_path)} "
             f"({example.onnx_path.stat().st_size:,} bytes), calibration and held-out eval "
             "sets beside it")
        with np.load(example.eval_path) as npz:
            x, labels = npz[example.input_name], npz["labels"]
        # one real held-out sample per device, each a different digit
        seen: set[int] = set()
        for i, label in enumerate(labels):
            if int(label) not in seen:
                seen.add(int(label))
                self.samples.append((i, [float(v) for v in x[i]], int(label)))
            if len(self.samples) == len(DEVICES):
                break

        banner(f"2/6 convert it for {', '.join(PROFILES)} as {V1} and {V2} "
               "(candidates timed and validated)")
        for version in (V1, V2):
            for profile in PROFILES:
                bundle = self.out / "bundles" / f"{MODEL}-{version}-{profile}"
                done = self.sh.run([
                    *TOOL, "convert", rel(example.onnx_path), "--profile", profile,
                    "--out", rel(bundle), "--calibration", rel(example.calibration_path),
                    "--eval", rel(example.eval_path), "--name", MODEL, "--version", version,
                    "--json"], show_output=False)
                report = json.loads(done.stdout)
                chosen = next(c for c in report["candidates"] if c.get("chosen"))
                note(f"  -> {rel(bundle)}: {report['chosen']}, {chosen['size_bytes']:,} bytes, "
                     f"top-1 agreement {chosen['top1_agreement']:.4f} with the source on "
                     f"{report['validation']['samples']} eval samples")
                self.bundles[(version, profile)] = bundle
        note("")
        note("v2 is built to fail its on-device health check, to show the automatic rollback:")
        note("its manifest's golden outputs become 1 - p, which the model cannot reproduce. The "
             "model file,\nits sha256 and length are untouched, so v2 passes every check "
             "before the device's own.")
        for profile in PROFILES:
            bundle = self.bundles[(V2, profile)]
            changed = corrupt_golden_outputs(bundle / "manifest.json")
            note(f"  corrupted golden output(s) {', '.join(changed)} in "
                 f"{rel(bundle / 'manifest.json')}")
        done = self.sh.run([*TOOL, "inspect", rel(self.bundles[V2, "rpi4"])],
                           show_output=False)
        for line in done.stdout.splitlines():
            if line.startswith(("file", "golden")):
                note(f"  {line}")

    def start_server(self) -> None:
        banner("3/6 create a fleet and start its server (admin API, embedded MQTT broker, "
               "TUF repository)")
        data_dir = self.out / "server"
        done = self.sh.run([*FLEET, "init", "--data-dir", rel(data_dir), "--json"],
                           show_output=False)
        token = json.loads(done.stdout)["token"]
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
        note(f"  created {rel(data_dir)}: database, TUF repository and keys, director key; "
             f"the first admin token (printed once) saved in {rel(self.token_file)} (0600)")

        api_port, mqtt_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{api_port}"
        started = time.monotonic()
        server = self.children.start("server", [
            *FLEET, "serve", "--data-dir", rel(data_dir), "--port", str(api_port),
            "--mqtt-port", str(mqtt_port)], self.server_log)
        self.server = server
        wait_for("the server's /healthz", lambda: http_ok(f"{self.url}/healthz"),
                 timeout=HEALTH_TIMEOUT_S, alive=lambda: self.children.check_alive(server),
                 log=self.server_log)
        note(f"  server up in {time.monotonic() - started:.1f}s (pid {server.proc.pid}): "
             f"admin API {self.url}, MQTT broker mqtt://127.0.0.1:{mqtt_port}, "
             f"GET {self.url}/healthz answers")
        print(f"$ export EDGEFLEET_URL={self.url} "
              f"EDGEFLEET_TOKEN=$(cat {rel(self.token_file)})", flush=True)
        self.sh.env["EDGEFLEET_URL"] = self.url
        self.sh.env["EDGEFLEET_TOKEN"] = token

    def start_devices(self) -> None:
        banner(f"4/6 provision {len(DEVICES)} devices and start an agent for each")
        for device_id, profile, tags in DEVICES:
            ddir = self.out / "devices" / device_id
            ddir.mkdir(parents=True)
            prov = ddir / "provisioning.json"
            self.sh.run([*FLEET, "device", "provision", device_id, "--profile", profile,
                         *[a for t in tags for a in ("--tag", t)], "--out", rel(prov)],
                        show_output=False)
            mode = prov.stat().st_mode & 0o777
            if mode != 0o600:
                raise DemoError(f"{prov} has mode {mode:o}, expected 600")
            port = free_port()
            self.ports[device_id] = port
            (ddir / "agent.toml").write_text(
                'provisioning = "provisioning.json"\n'
                'data_dir = "data"\n'
                f"http_port = {port}\n"
                "metrics_interval_s = 1\n", encoding="utf-8")
            note(f"  -> {rel(prov)} (mode 0600, holds the device's secrets); "
                 f"{rel(ddir / 'agent.toml')}: local API on port {port}")
        first = self.out / "devices" / DEVICES[0][0] / "agent.toml"
        print(f"$ cat {rel(first)}", flush=True)
        Shell.echo(first.read_text(encoding="utf-8"), 10)

        started = time.monotonic()
        for device_id, _profile, _tags in DEVICES:
            ddir = self.out / "devices" / device_id
            self.agents[device_id] = self.children.start(
                device_id, [*AGENT, "run", "--config", rel(ddir / "agent.toml")],
                ddir / "agent.log")
        for device_id, _profile, _tags in DEVICES:
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
        banner(f"5/6 push the bundles, deploy {MODEL} {V1}, ask each device for a prediction")
        for (_version, profile), bundle in self.bundles.items():
            done = self.sh.run([*FLEET, "model", "push", rel(bundle), "--json"],
                               show_output=False)
            pushed = json.loads(done.stdout)
            art = next(a for a in pushed["artifacts"] if a["profile"] == profile)
            note(f"  -> {pushed['name']} {pushed['version']} for {profile}: "
                 f"TUF target {art['target_path']} ({art['length']:,} bytes)")
        self.sh.run([*FLEET, "model", "list"])
        started = time.monotonic()
        self.sh.run([*FLEET, "deploy", MODEL, V1, "--to", "tag:lab"])
        rows = self._wait_rollout(V1, {"done"})
        note(f"  (polled the rollout until every device runs {MODEL} {V1}: "
             f"{len(rows)} done after {time.monotonic() - started:.1f}s)")
        self.sh.run([*FLEET, "rollout", "status"])
        self._predict_all(V1)

    def deploy_v2(self) -> None:
        banner(f"6/6 deploy {MODEL} {V2} (built to fail its health check): every device rolls "
               f"back to {V1}")
        started = time.monotonic()
        self.sh.run([*FLEET, "deploy", MODEL, V2, "--to", "all"])
        rows = self._wait_rollout(V2, {"done", "failed"})
        note(f"  (polled the rollout until every device finished its {V2} attempt: "
             f"{len(rows)} after {time.monotonic() - started:.1f}s)")
        done = self.sh.run([*FLEET, "rollout", "status"], show_output=False)
        lines = done.stdout.rstrip("\n").splitlines()
        heads = [i for i, line in enumerate(lines) if line.startswith("Deployment ")]
        Shell.echo("\n".join(lines[:heads[1] - 1] if len(heads) > 1 else lines), 12)
        if len(heads) > 1:
            note(f"  {lines[heads[1]]}  [its table abridged]")
        problems = []
        for device_id, _profile, _tags in DEVICES:
            done = self.sh.run([*FLEET, "device", "show", device_id, "--json"],
                               show_output=False)
            rep = json.loads(done.stdout).get("reported") or {}
            running = ", ".join(f"{m['name']} {m['version']}" for m in rep.get("running") or ())
            note(f"  -> {device_id}: running {running or '-'}; last_result "
                 f"{rep.get('last_result')}; last_error:\n"
                 f"     {rep.get('last_error') or '-'}")
            if rep.get("last_result") != "rolled_back" or running != f"{MODEL} {V1}":
                problems.append(device_id)
        if problems or any(r["state"] != "failed" for r in rows):
            raise DemoError(f"expected every device to roll {V2} back and run {V1}; not so "
                            f"for: {', '.join(problems) or 'see rollout status above'}",
                            self.agents[problems[0]].log if problems else self.server_log)
        zero = self.out / "devices" / DEVICES[-1][0] / "agent.toml"
        self.sh.run([*AGENT, "status", "--config", rel(zero)])
        self._predict_all(V1)

    # ----------------------------------------------------------------------------- helpers

    def _client(self) -> Any:
        from fleet_server.client import FleetClient

        return FleetClient(self.url, self.sh.env["EDGEFLEET_TOKEN"])

    def _all_online(self) -> bool:
        with self._client() as api:
            devices = api.list_devices()
        online = {d["id"] for d in devices if d.get("online")}
        return all(d[0] in online for d in DEVICES)

    def _wait_rollout(self, version: str, final: set[str]) -> list[dict[str, Any]]:
        """Poll the rollout (the data `rollout status --json` prints) until every device of
        the active deployment of ``version`` is in a ``final`` state."""

        last: list[dict[str, Any]] = []

        def check() -> list[dict[str, Any]] | None:
            with self._client() as api:
                status = api.rollout()
            for entry in status:
                dep = entry["deployment"]
                if dep.get("model") == MODEL and dep.get("version") == version:
                    last[:] = entry["devices"]
                    if len(last) == len(DEVICES) and all(r["state"] in final for r in last):
                        return list(last)
            return None

        try:
            return wait_for(f"every device to reach {'/'.join(sorted(final))} for {version}",
                            check, timeout=ROLLOUT_TIMEOUT_S, interval=0.5,
                            alive=self.children.check_all_alive, log=self.server_log)
        except DemoError as exc:
            late = [r for r in last if r["state"] not in final]
            states = "; ".join(f"{r['device']}: {r['state']} (applied sequence "
                               f"{r['applied_sequence']} of {r['desired_sequence']}, running "
                               f"{r['running_version']})" for r in last) or "no rollout rows"
            log = self.agents[late[0]["device"]].log if late else exc.log
            raise DemoError(f"{exc}; last seen: {states}", log) from exc

    def _predict_all(self, expect_version: str) -> None:
        for (device_id, profile, _tags), (index, pixels, label) in zip(
                DEVICES, self.samples, strict=True):
            body = json.dumps({"inputs": {"input": [pixels]}})
            head = ", ".join(f"{v:g}" for v in pixels[:6])
            shown = f"'{{\"inputs\": {{\"input\": [[{head}, ...]]}}}}'"
            args = [*AGENT, "predict", MODEL, "--port", str(self.ports[device_id]),
                    "--json", body]
            done = self.sh.run(args, show_output=False, shown={len(args) - 1: shown})
            answer = json.loads(done.stdout)
            probs = answer["outputs"]["probabilities"][0]
            predicted = max(range(len(probs)), key=probs.__getitem__)
            verdict = "correct" if predicted == label else "WRONG"
            note(f"  -> {device_id} ({profile}) served by {answer['model']} "
                 f"{answer['version']}: eval sample #{index} predicted {predicted} "
                 f"(p={probs[predicted]:.2f}), true label {label}: {verdict}")
            if answer["version"] != expect_version:
                raise DemoError(f"{device_id} answered with {answer['version']}, expected "
                                f"{expect_version}", self.agents[device_id].log)
        if expect_version == V1 and not self.predicted_once:
            note("  (the --json body is abridged above: each request sends all 64 pixel values "
                 "of one 8x8 digit)")
        self.predicted_once = True


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
    ok = False
    try:
        demo.build()
        demo.start_server()
        demo.start_devices()
        demo.deploy_v1()
        demo.deploy_v2()
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
    devices = ", ".join(f"{d} :{demo.ports[d]}" for d, _p, _t in DEVICES)
    note(f"admin API   {demo.url}  (token in {rel(demo.token_file)}; "
         f"export EDGEFLEET_URL={demo.url} EDGEFLEET_TOKEN=$(cat {rel(demo.token_file)}))")
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

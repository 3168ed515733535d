"""Staged rollouts end to end: real server, real broker, real agents (issue 5).

Each test starts a :class:`fleet_server.simulate.FleetSimulation` (uvicorn serving the admin API
and the TUF repository, the embedded amqtt broker or a real Mosquitto, real
:class:`agent.daemon.app.Agent` instances on one loop thread) and drives rollouts through the
admin API only: ``POST /v1/deployments`` with a ``rollout`` object, ``GET /v1/rollouts/{id}``,
pause and resume. Every wait is a bounded poll on state the server exposes.

Scenarios: three waves advancing to completion; health-check failures rolling the rollout back
by itself; a tampered artifact refused by the device; Mosquitto restarted on the same port
between waves; a device offline during its wave that converges when it comes back.
"""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fleet_server.mqtt.mosquitto import MosquittoProcess, find_mosquitto
from fleet_server.rollout import assignment_order
from fleet_server.simulate import MODEL, VERSION, FleetSimulation, SimConfig, build_bundles

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROFILES = ("rpi4", "rpi-zero2w")
NEW = "2.0.0"
WAIT = 45.0
#: gates that judge commits and failures only: simulated devices serve no traffic
GATES = {"bake_s": 0, "latency_gate": False, "min_committed": 1.0, "max_failed": 0.0}


# ------------------------------------------------------------------------------- helpers
def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def version_tar(directory: Path, version: str, *, corrupt_golden: bool = False) -> bytes:
    """The cached bundle as a tar, relabelled ``version``; ``corrupt_golden``: golden outputs
    ``1 - p``, which the model cannot reproduce, so the on-device health check fails."""
    import base64

    import numpy as np

    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    manifest["model"]["version"] = version
    if corrupt_golden:
        for tensor in manifest["golden"]["outputs"].values():
            if tensor["dtype"] == "float32":
                raw = np.frombuffer(base64.b64decode(tensor["b64"]), np.float32)
                tensor["b64"] = base64.b64encode((1.0 - raw).tobytes()).decode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        tar.add(directory / "model.onnx", arcname="model.onnx")
    return buf.getvalue()


def api(sim: FleetSimulation, method: str, path: str, expect: int = 200,
        **kwargs: Any) -> Any:
    r = sim._client.request(method, path, **kwargs)
    assert r.status_code == expect, f"{method} {path}: HTTP {r.status_code}: {r.text[:800]}"
    return r.json()


def push(sim: FleetSimulation, bundle_cache: Path, version: str,
         corrupt: tuple[str, ...] = ()) -> None:
    """Push ``version`` for every profile; golden outputs corrupted for ``corrupt`` profiles."""
    for profile in PROFILES:
        tar = version_tar(bundle_cache / f"{MODEL}-{VERSION}-{profile}", version,
                          corrupt_golden=profile in corrupt)
        api(sim, "POST", "/v1/models", 201, content=tar,
            headers={"Content-Type": "application/x-tar"})


def running(sim: FleetSimulation) -> dict[str, str | None]:
    """device -> the version of MODEL it last reported running."""
    return {d: sim._running_version(rep) for d, rep in sim.reported().items()}


def device_ids(sim: FleetSimulation) -> list[str]:
    return [d.device_id for d in sim.devices]


def baseline(sim: FleetSimulation) -> None:
    """Every device on VERSION (a plain deployment), committed and reported."""
    api(sim, "POST", "/v1/deployments", 201,
        json={"model": MODEL, "version": VERSION, "selector": {"tags": ["sim"]}})
    wait_for(f"every device on {VERSION}", lambda: all(
        v == VERSION for v in running(sim).values()))


def start_rollout(sim: FleetSimulation, waves: str, on_failure: str = "pause",
                  selector: dict[str, Any] | None = None, **gates: Any) -> int:
    out = api(sim, "POST", "/v1/deployments", 201, json={
        "model": MODEL, "version": NEW, "selector": selector or {"tags": ["sim"]},
        "rollout": {"waves": waves, "gates": {**GATES, **gates}, "on_failure": on_failure}})
    assert out["rollout_id"] == out["id"], out
    return int(out["rollout_id"])


def rollout(sim: FleetSimulation, rollout_id: int) -> dict[str, Any]:
    out: dict[str, Any] = api(sim, "GET", f"/v1/rollouts/{rollout_id}")
    return out


def wait_status(sim: FleetSimulation, rollout_id: int, status: str,
                timeout: float = WAIT) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def check() -> dict[str, Any] | None:
        r = rollout(sim, rollout_id)
        seen[:] = [r]
        return r if r["status"] == status else None

    try:
        out: dict[str, Any] = wait_for(f"rollout {rollout_id} {status}", check, timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {json.dumps(seen, indent=1)[:4000]}") from exc
    return out


def sim_config(tmp_path: Path, bundle_cache: Path, devices: int,
               broker: str = "embedded") -> SimConfig:
    return SimConfig(devices=devices, broker=broker, profiles=PROFILES, timeout_s=WAIT,
                     work_dir=tmp_path / "sim", cache_dir=bundle_cache, metrics_interval_s=1.0)


def restart_on_same_port(broker: MosquittoProcess) -> None:
    """Stop Mosquitto and start it again on the same port with the same files.

    ``MosquittoProcess.start`` always probes a new free port (devices and server would then
    look for the broker in the wrong place), so this reruns the config it wrote, which names
    the old port.
    """
    port = broker.port
    broker.stop()
    binary = find_mosquitto()
    assert binary is not None
    config = broker.log_file.parent / "mosquitto.conf"
    assert f"listener {port} " in config.read_text(encoding="utf-8")
    with broker.log_file.open("ab") as log:
        process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
    assert broker._wait_accepting(process, port), broker.log_text()[-2000:]
    broker._process = process  # so that the simulation's close() stops it


@pytest.fixture(scope="module")
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 1.0.0 converted once for both profiles, shared by every scenario."""
    cache = tmp_path_factory.mktemp("rollout-bundles")
    build_bundles(cache, PROFILES)
    return cache


@pytest.fixture
def mosquitto_sim(tmp_path: Path, bundle_cache: Path) -> Iterator[FleetSimulation]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    with FleetSimulation(sim_config(tmp_path, bundle_cache, 6, "mosquitto")) as sim:
        yield sim


# ------------------------------------------------------------------------------- scenarios
def test_three_waves_advance_to_completion(tmp_path: Path, bundle_cache: Path) -> None:
    with FleetSimulation(sim_config(tmp_path, bundle_cache, 6)) as sim:
        ids = device_ids(sim)
        baseline(sim)
        push(sim, bundle_cache, NEW)
        rid = start_rollout(sim, "1,3,all")
        waves_seen = []

        def completed() -> dict[str, Any] | None:
            r = rollout(sim, rid)
            if not waves_seen or waves_seen[-1] != r["wave"]:
                waves_seen.append(r["wave"])
            return r if r["status"] == "completed" else None

        final = wait_for("rollout completed", completed)
        assert waves_seen == sorted(waves_seen) and waves_seen[-1] == 2, waves_seen
        assert final["waves_text"] == "1,3,all" and final["wave_count"] == 3
        assert [(w["index"], w["target"], w["assigned"], w["committed"], w["failed"])
                for w in final["waves"]] == [(0, "1", 1, 1, 0), (1, "3", 2, 2, 0),
                                             (2, "all", 3, 3, 0)]
        # devices are taken in the rollout's documented hash order: 1, then 2 more, then 3
        order = assignment_order(str(rid), ids)
        by_device = {row["device_id"]: row for row in final["devices"]}
        assert sorted(by_device) == sorted(ids)
        assert [by_device[d]["wave"] for d in order] == [0, 1, 1, 2, 2, 2]
        for row in final["devices"]:
            assert row["outcome"] == "committed", row
            assert (row["desired_version"], row["running_version"],
                    row["previous_version"]) == (NEW, NEW, VERSION), row
            assert row["applied_sequence"] >= row["desired_sequence"] >= 1, row
        # each device's sequence 1 was the baseline: the rollout's version came in a new one
        seq = {d: by_device[d]["desired_sequence"] for d in ids}
        assert all(s >= 2 for s in seq.values()), seq
        assert running(sim) == dict.fromkeys(ids, NEW)


def test_health_failures_roll_back_by_themselves(tmp_path: Path, bundle_cache: Path) -> None:
    # 2.0.0 for rpi4 carries golden outputs the model cannot reproduce: rpi4 devices fail their
    # health check; rpi-zero2w devices would commit. Wave 0 holds 3 of the 4 devices (2 of each
    # profile), so it moves at least one device of each kind.
    with FleetSimulation(sim_config(tmp_path, bundle_cache, 4)) as sim:
        ids = device_ids(sim)
        profiles = {d.device_id: d.profile for d in sim.devices}
        baseline(sim)
        before = {d: int(rep["applied_sequence"]) for d, rep in sim.reported().items()
                  if rep}
        push(sim, bundle_cache, NEW, corrupt=("rpi4",))
        rid = start_rollout(sim, "3,all", on_failure="rollback")
        final = wait_status(sim, rid, "rolled_back")
        moved = assignment_order(str(rid), ids)[:3]
        assert [w["assigned"] for w in final["waves"]] == [3], final["waves"]
        rows = {row["device_id"]: row for row in final["devices"]}
        assert sorted(rows) == sorted(moved)
        failed = {d for d, row in rows.items() if row["outcome"] == "failed"}
        assert failed, final
        assert failed <= {d for d in moved if profiles[d] == "rpi4"}, (failed, profiles)
        for d in failed:  # the device's own health check refused 2.0.0: the reason says so
            assert rows[d]["reason"].startswith("rolled_back"), rows[d]
            assert rows[d]["last_result"] == "rolled_back", rows[d]
        assert final["waves"][0]["failed"] == len(failed)
        gate = next(g for g in final["gates"] if g["gate"] == "failed")
        assert gate["ok"] is False and gate["detail"] == f"{len(failed)} of 3 devices failed"
        assert final["reason"] == f"wave 0 gate failed: {len(failed)} of 3 devices failed"
        # every moved device is told its previous version again, in a new desired state, and
        # reports it; the device never moved stays where it was
        after = wait_for("every moved device reverted", lambda: (
            r := rollout(sim, rid)) and all(
            row["outcome"] in ("failed", "reverted") for row in r["devices"]) and r)
        for row in after["devices"]:
            assert row["desired_version"] == VERSION, row
            assert row["running_version"] == VERSION, row
        assert after["waves"][0]["reverted"] == 3 - len(failed), after["waves"]

        def reverted_applied() -> bool:
            reps = sim.reported()
            return all(int(reps[d]["applied_sequence"]) > before[d] + 1
                       for d in moved if d not in failed)

        wait_for("committed devices applied a new desired state", reverted_applied)
        assert running(sim) == dict.fromkeys(ids, VERSION)


def test_tampered_artifact_is_refused(tmp_path: Path, bundle_cache: Path) -> None:
    with FleetSimulation(sim_config(tmp_path, bundle_cache, 2)) as sim:
        ids = device_ids(sim)
        victim = ids[0]
        profile = sim.devices[0].profile
        baseline(sim)
        push(sim, bundle_cache, NEW)
        targets = sim.fleet.settings.data_dir / "tuf" / "public" / "targets"
        models = [p for p in targets.rglob("*model.onnx") if f"/{NEW}/" in p.as_posix()
                  and f"/{profile}/" in p.as_posix()]
        assert len(models) == 1, sorted(p.relative_to(targets) for p in targets.rglob("*"))
        data = bytearray(models[0].read_bytes())
        mid = len(data) // 2
        data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])  # same length
        models[0].write_bytes(bytes(data))

        rid = start_rollout(sim, "all", selector={"devices": [victim]})
        final = wait_status(sim, rid, "paused")
        (row,) = final["devices"]
        assert row["device_id"] == victim and row["outcome"] == "failed", row
        assert row["running_version"] == VERSION, row  # still serving the previous version
        assert row["last_result"] in ("refused", "failed"), row
        reason = f"{row['reason']} {row['last_error']}".lower()
        assert "hash" in reason or "digest" in reason or "sha256" in reason, row
        # the refusal is on the device's own record too, and it keeps its previous version
        dev = api(sim, "GET", f"/v1/devices/{victim}")
        assert dev["reported"]["last_result"] == row["last_result"], dev["reported"]
        assert running(sim) == dict.fromkeys(ids, VERSION)


def test_broker_restart_between_waves(mosquitto_sim: FleetSimulation,
                                      bundle_cache: Path) -> None:
    sim = mosquitto_sim
    ids = device_ids(sim)
    broker = sim._broker
    port = broker.port
    baseline(sim)
    push(sim, bundle_cache, NEW)
    rid = start_rollout(sim, "1,3,all")
    api(sim, "POST", f"/v1/rollouts/{rid}/pause")  # hold it after wave 0
    wait_for("wave 0 committed", lambda: rollout(sim, rid)["waves"][0]["committed"] == 1)
    assert rollout(sim, rid)["wave"] == 0

    restart_on_same_port(broker)
    assert broker.port == port
    api(sim, "POST", f"/v1/rollouts/{rid}/resume")
    final = wait_status(sim, rid, "completed", timeout=60)
    assert [(w["assigned"], w["committed"]) for w in final["waves"]] == [(1, 1), (2, 2),
                                                                          (3, 3)]
    wait_for(f"every device on {NEW}", lambda: running(sim) == dict.fromkeys(ids, NEW))
    # agents and the server's link came back by themselves
    wait_for("every device online again", lambda: sim._online_count() == len(ids))
    assert sim.mqtt.link.connected


def test_device_offline_during_its_wave_converges(tmp_path: Path, bundle_cache: Path) -> None:
    with FleetSimulation(sim_config(tmp_path, bundle_cache, 6)) as sim:
        ids = device_ids(sim)
        baseline(sim)
        push(sim, bundle_cache, NEW)
        rid = start_rollout(sim, "1,3,all")
        late = assignment_order(str(rid), ids)[-1]  # in the last wave
        sim._command_all("offline", [late])
        wait_for(f"{late} offline at the server",
                 lambda: sim._online_count() == len(ids) - 1)

        def others_committed() -> dict[str, Any] | None:
            r = rollout(sim, rid)
            return r if r["wave"] == 2 and r["waves"][2]["committed"] == 2 else None

        during = wait_for("the other devices of the last wave committed", others_committed)
        assert during["status"] == "running", during
        row = next(r for r in during["devices"] if r["device_id"] == late)
        assert (row["wave"], row["outcome"], row["online"]) == (2, "pending", False), row
        assert running(sim)[late] == VERSION

        sim._command_all("online", [late])
        final = wait_status(sim, rid, "completed")
        assert all(r["outcome"] == "committed" for r in final["devices"]), final["devices"]
        assert running(sim) == dict.fromkeys(ids, NEW)

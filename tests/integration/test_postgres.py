"""The same server code on a real PostgreSQL, started from the machine's initdb/pg_ctl.

Skipped, with the reason, where those binaries are absent. As root (CI), the cluster runs as
the ``postgres`` user, since initdb refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.protocol.messages import Record, TelemetryBatch
from agent.protocol.topics import device_topic
from fleet_server import audit
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.deploy.plan import Selector
from fleet_server.deploy.service import deploy
from fleet_server.fleet import init_data_dir, open_fleet
from fleet_server.ingest import handle_message
from fleet_server.registry import devices
from fleet_server.settings import Settings

pytestmark = pytest.mark.integration
NOW = 1_800_000_000
ADMIN = Principal("t", "test", "admin")


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) not found on this machine")
    root = os.geteuid() == 0
    # not under pytest's tmp dir: that is 0700 root-owned, and postgres must reach its files
    base = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    prefix: list[str] = []
    if root:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as postgres")
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    port = _free_port()

    def run(*args: str) -> None:
        done = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr.strip()}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "edgefleet", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "60",
        "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "edgefleet",
            "fleet")
        yield f"postgresql+psycopg://edgefleet@127.0.0.1:{port}/fleet"
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w",
                        "stop"], check=False, capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def test_registry_deploy_ingest_and_audit_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", database_url=postgres_url)
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    with atomic(fleet.engine) as conn:
        devices.provision(fleet, conn, device_id="pg-dev", profile="rpi4", tags=["lab"],
                          actor=ADMIN)
        # an artifact row as a push would write it (the TUF side is tested elsewhere)
        conn.execute(tables.artifacts.insert().values(
            name="m", version="1", profile="rpi4", runtime="onnxruntime", precision="fp32",
            sha256="a" * 64, length=10, target_path="models/m/1/rpi4/model.onnx",
            manifest_target="models/m/1/rpi4/manifest.json", manifest="{}", created_at=NOW,
            created_by="t"))
        out = deploy(fleet, conn, model="m", version="1", selector=Selector(tags=("lab",)),
                     actor=ADMIN)
    assert out["devices"] == ["pg-dev"] and out["desired_changed"] == ["pg-dev"]

    batch = TelemetryBatch(device_id="pg-dev", records=tuple(
        Record(seq=s, kind="metrics", at=NOW, body={"s": s}) for s in (1, 2, 2 + 1)))
    topic = device_topic("pg-dev", "telemetry")
    first = handle_message(fleet, topic, batch.to_bytes(), now=NOW)
    again = handle_message(fleet, topic, batch.to_bytes(), now=NOW)
    assert (first.stored, again.stored, again.duplicates) == (3, 0, 3)

    with atomic(fleet.engine) as conn:
        assert audit.verify_chain(conn) is None
        actions = [e.action for e in audit.entries(conn)]
        seq = conn.execute(select(tables.desired_states.c.sequence)).scalar()
    assert actions[:1] == ["token.create"] and "deployment.create" in actions
    assert seq == 1
    fleet.engine.dispose()


def _fresh_database(url: str, name: str) -> str:
    """A new, empty database on the same cluster (the module's ``fleet`` one is shared)."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"),
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return url.rsplit("/", 1)[0] + "/" + name


def test_monitoring_and_alerts_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    """Migration 0003, the views (the body prefilter escapes LIKE's wildcards), an alert and
    its webhook delivery attempt, on PostgreSQL."""
    import json

    from agent.drift import DRIFT_SUMMARY_KIND
    from agent.metrics import METRICS_KIND, RequestMetrics
    from agent.protocol.messages import DriftBatch
    from fleet_server.monitoring import (
        AlertRule,
        TimeRange,
        WebhookSender,
        create_rule,
        distribution_view,
        drift_view,
        evaluate_alerts,
        list_alerts,
        model_view,
    )

    model = "pg/m_1%"  # "/" is the prefilter's escape character, "_" and "%" LIKE's wildcards
    url = _fresh_database(postgres_url, "monitoring")
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    baseline = {"version": 1, "inputs": {"x": {"kind": "tabular", "features": [
        {"index": 0, "edges": [0.5], "ref": [0.5, 0.5], "mean": 0.5, "std": 0.5}]}}}
    with atomic(fleet.engine) as conn:
        names = [row.name for row in conn.execute(select(tables.schema_migrations.c.name)
                                                  .order_by(tables.schema_migrations.c.name))]
        for device in ("pg-a", "pg-b"):
            devices.provision(fleet, conn, device_id=device, profile="rpi4", tags=[],
                              actor=ADMIN)
        conn.execute(tables.artifacts.insert().values(
            name=model, version="1", profile="rpi4", runtime="onnxruntime", precision="fp32",
            sha256="a" * 64, length=10, target_path="t", manifest_target="m",
            manifest=json.dumps({"drift_baseline": baseline}), created_at=NOW,
            created_by="t"))
        rule = create_rule(conn, AlertRule(0, model, "drift_psi", 0.25,
                                           webhook_url="http://127.0.0.1:9/hook"),
                           actor=ADMIN, now=NOW)
    assert names == ["0001_initial", "0002_rollouts", "0003_monitoring"]
    metrics = RequestMetrics(start=NOW)
    for ms in (3.0, 3.0, 30.0):
        metrics.observe(model, "1", ms, True)
    metrics.observe(model, "1", 0.0, False, "5xx")
    batch = TelemetryBatch(device_id="pg-a", records=tuple(
        Record(seq=1, kind=METRICS_KIND, at=NOW, body=b) for b in metrics.flush(NOW + 10)))
    handle_message(fleet, device_topic("pg-a", "telemetry"), batch.to_bytes(), now=NOW + 10)
    for device, counts in (("pg-a", [50, 50]), ("pg-b", [90, 10])):
        body = {"version": 1, "model": model, "model_version": "1",
                "window": {"start": 0.0, "end": 1.0, "predictions": 100},
                "max_psi": 0.0 if counts[0] == 50 else 0.5,
                "inputs": {"x": {"kind": "tabular", "features": [
                    {"feature": 0, "psi": 0.0 if counts[0] == 50 else 0.5, "js": 0.1,
                     "samples": 100, "counts": counts}]}}}
        drift = DriftBatch(device_id=device, records=(
            Record(seq=1, kind=DRIFT_SUMMARY_KIND, at=NOW, body=body),))
        handle_message(fleet, device_topic(device, "drift"), drift.to_bytes(), now=NOW + 20)
    rng = TimeRange.make(NOW + 60, bucket_s=60)

    view = model_view(fleet, model, rng)
    assert (view["totals"]["requests"], view["totals"]["errors"]) == (4, 1)
    # p50: rank 1.5 of 3 in the (2, 5] bucket holding two, from the smallest seen (3): 4.5
    assert view["totals"]["p50_ms"] == 4.5 and view["totals"]["max_psi"] == 0.5
    drift_out = drift_view(fleet, model, rng)
    assert {d["device"]: d["latest_max_psi"] for d in drift_out["devices"]} == {
        "pg-a": 0.0, "pg-b": 0.5}
    dist = distribution_view(fleet, model, rng, version="1")
    assert (dist["live_counts"], dist["reference"]) == ([140, 60], [0.5, 0.5])

    [fired] = evaluate_alerts(fleet, now=NOW + 60)
    assert (fired.after, fired.webhook) == ("firing", True)
    sender = WebhookSender(fleet.engine, clock=lambda: NOW + 60, max_attempts=1)
    try:
        assert sender.deliver_due() == 0  # nothing listens on port 9: failed, recorded
    finally:
        sender.stop()
    with atomic(fleet.engine) as conn:
        [alert], _ = list_alerts(conn, limit=10)
        hook = conn.execute(select(tables.alert_webhooks)).one()
        tried = conn.execute(select(tables.webhook_attempts)).all()
    assert (alert["rule_id"], alert["state"], alert["devices"][0]["device"]) == (
        rule["id"], "firing", "pg-b")
    assert (hook.status, hook.attempts, len(tried)) == ("failed", 1, 1)
    assert tried[0].status_code is None and tried[0].error
    fleet.engine.dispose()


def test_retention_on_postgres(postgres_url: str, tmp_path: Path) -> None:
    """Chunked deletes, only at or below the ack position, audited, and a pruned sequence
    sent again counted as a duplicate, on PostgreSQL."""
    from agent.protocol.messages import Ack, DriftBatch
    from fleet_server.monitoring.retention import ACTOR, RecordRetention

    day = 86400
    url = _fresh_database(postgres_url, "retention")
    settings = Settings(data_dir=tmp_path / "data", database_url=url)
    init_data_dir(settings, clock=lambda: NOW)
    fleet = open_fleet(settings, clock=lambda: NOW)
    with atomic(fleet.engine) as conn:
        for device in ("pg-a", "pg-b"):
            devices.provision(fleet, conn, device_id=device, profile="rpi4", tags=[],
                              actor=ADMIN)

    def send(device: str, stream: str, seqs: list[int], at: int) -> tuple[int, int, int]:
        cls = TelemetryBatch if stream == "telemetry" else DriftBatch
        batch = cls(device_id=device, records=tuple(
            Record(seq=s, kind="metrics", at=at, body={"s": s}) for s in seqs))
        got = handle_message(fleet, device_topic(device, stream), batch.to_bytes(), now=at)
        assert got.ack_payload is not None
        return got.stored, got.duplicates, Ack.from_bytes(got.ack_payload).upto_seq

    def stored(device: str, stream: str) -> list[int]:
        c = tables.device_records.c
        with atomic(fleet.engine) as conn:
            return list(conn.execute(select(c.seq).where(
                c.device_id == device, c.stream == stream).order_by(c.seq)).scalars())

    assert send("pg-a", "telemetry", list(range(1, 13)), NOW)[2] == 12
    assert send("pg-a", "telemetry", [14, 15], NOW)[2] == 12  # 13 is missing: past a gap
    assert send("pg-a", "drift", [1, 2, 3], NOW)[2] == 3
    assert send("pg-b", "telemetry", [1, 2], NOW + 10 * day)[2] == 2
    retention = RecordRetention(fleet.engine, keep_s=30 * day, chunk_rows=5)
    report = retention.run(NOW + 31 * day)
    # pg-a: 12 telemetry and 3 drift at or below their ack; 14 and 15 stay; pg-b is recent
    assert (report.cutoff, report.deleted, report.chunks, report.complete) == (
        NOW + day, 15, 3, True)
    assert dict(report.by_stream) == {"telemetry": 12, "drift": 3}
    assert stored("pg-a", "telemetry") == [14, 15] and stored("pg-a", "drift") == []
    assert stored("pg-b", "telemetry") == [1, 2]

    # the ack was lost and the device comes back: the pruned 11 and 12 are duplicates
    assert send("pg-a", "telemetry", [11, 12], NOW + 31 * day) == (0, 2, 12)
    # the gap fills: the walk finds 14 and 15 and the ack covers them
    assert send("pg-a", "telemetry", [13], NOW + 31 * day) == (1, 0, 15)
    assert retention.run(NOW + 70 * day).deleted == 5  # 13-15 of pg-a, 1-2 of pg-b
    with atomic(fleet.engine) as conn:
        assert audit.verify_chain(conn) is None
        prunes = [e for e in audit.entries(conn, limit=1000)
                  if e.action == "device_records.prune"]
        left = conn.execute(select(tables.device_records.c.seq)).all()
    assert [(e.actor, e.after["deleted"], e.after["by_stream"]) for e in prunes] == [
        (ACTOR, 15, {"drift": 3, "telemetry": 12}), (ACTOR, 5, {"telemetry": 5})]
    assert left == []
    fleet.engine.dispose()

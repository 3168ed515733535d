"""The maintenance pass: the TUF timestamp and desired states are re-signed before they expire.

The clock is injected; nothing waits on the wall clock.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select

from agent.protocol.signed import trusted_keys_from_pem, verify_desired
from fleet_server.auth import Principal
from fleet_server.db import atomic, tables
from fleet_server.deploy.plan import Selector
from fleet_server.deploy.service import deploy
from fleet_server.fleet import init_data_dir, open_fleet
from fleet_server.registry import devices
from fleet_server.runtime import MqttRuntime
from fleet_server.settings import Settings

DAY = 24 * 3600
ADMIN = Principal("t", "test", "admin")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recorder:
    def __init__(self) -> None:
        self.desired: list[tuple[str, bytes]] = []

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        self.desired.append((device_id, envelope))

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        raise AssertionError("no acks expected here")


def test_timestamp_and_desired_states_are_resigned_before_expiry(tmp_path: Path) -> None:
    clock = Clock(1_800_000_000)
    settings = Settings(data_dir=tmp_path / "d", desired_ttl_s=7 * DAY,
                        desired_refresh_margin_s=DAY)
    init_data_dir(settings, clock=clock)
    fleet = open_fleet(settings, clock=clock, publisher=Recorder())
    with atomic(fleet.engine) as conn:
        devices.provision(fleet, conn, device_id="d1", profile="rpi4", tags=[], actor=ADMIN)
        conn.execute(tables.artifacts.insert().values(
            name="m", version="1", profile="rpi4", runtime="onnxruntime", precision="fp32",
            sha256="a" * 64, length=10, target_path="models/m/1/rpi4/model.onnx",
            manifest_target="models/m/1/rpi4/manifest.json", manifest="{}",
            created_at=int(clock.now), created_by="t"))
        deploy(fleet, conn, model="m", version="1", selector=Selector(devices=("d1",)),
               actor=ADMIN)
    runtime = MqttRuntime(fleet)  # never started: maintain_once needs only the fleet

    first = runtime.maintain_once()
    assert first["published"] == ["d1"] and first["resigned"] == []
    ts_version = fleet.repo.versions()["timestamp"]

    clock.now += 3600  # an hour later: nothing is near expiry
    quiet = runtime.maintain_once()
    assert quiet == {"timestamp_refreshed": False, "resigned": [], "published": [],
                     "rollouts": [], "alerts": [], "pruned": 0}

    clock.now += 6 * DAY  # desired state within its one-day margin; TUF timestamp (1 day) past
    busy = runtime.maintain_once()
    assert busy["timestamp_refreshed"] is True
    assert fleet.repo.versions()["timestamp"] > ts_version
    assert busy["resigned"] == ["d1"] and busy["published"] == ["d1"]
    with atomic(fleet.engine) as conn:
        row = conn.execute(select(tables.desired_states)).one()
    assert row.sequence == 2 and row.expires_at == int(clock.now) + 7 * DAY
    # what went out verifies on the device with the provisioning file's key, at the new time
    keys = trusted_keys_from_pem([fleet.director_public_pem])
    state = verify_desired(fleet.publisher.desired[-1][1], public_keys=keys, device_id="d1",
                           last_sequence=1, now=int(clock.now))
    assert [m.name for m in state.models] == ["m"]
    assert json.loads(row.models)[0]["version"] == "1"


def test_a_reconnected_link_republishes_every_retained_state_unchanged(tmp_path: Path) -> None:
    """A broker restarted without persistence lost its retained messages: after the link
    reconnects, the next pass sends every device's current state again (same envelope)."""
    from types import SimpleNamespace

    clock = Clock(1_800_000_000)
    settings = Settings(data_dir=tmp_path / "d")
    init_data_dir(settings, clock=clock)
    recorder = Recorder()
    fleet = open_fleet(settings, clock=clock, publisher=recorder)
    with atomic(fleet.engine) as conn:
        devices.provision(fleet, conn, device_id="d1", profile="rpi4", tags=[], actor=ADMIN)
        conn.execute(tables.artifacts.insert().values(
            name="m", version="1", profile="rpi4", runtime="onnxruntime", precision="fp32",
            sha256="a" * 64, length=10, target_path="models/m/1/rpi4/model.onnx",
            manifest_target="models/m/1/rpi4/manifest.json", manifest="{}",
            created_at=int(clock.now), created_by="t"))
        deploy(fleet, conn, model="m", version="1", selector=Selector(devices=("d1",)),
               actor=ADMIN)
    runtime = MqttRuntime(fleet)
    runtime.link = SimpleNamespace(connect_count=1)
    assert runtime.maintain_once()["published"] == ["d1"]  # first pass: what was pending
    assert runtime.maintain_once()["published"] == []  # same connection: nothing to resend
    runtime.link.connect_count = 2  # the broker went away and came back
    again = runtime.maintain_once()
    assert again["published"] == ["d1"] and again["resigned"] == []
    assert recorder.desired[-1] == recorder.desired[0]  # the same signed envelope


def test_the_pass_prunes_records_past_the_retention(tmp_path: Path) -> None:
    """``record_retention_days`` through the pass, on the injected clock: the old records
    go, the recent ones stay, and the next run waits an hour."""
    from agent.protocol.messages import Record, TelemetryBatch
    from agent.protocol.topics import device_topic
    from fleet_server.ingest import handle_message

    clock = Clock(1_800_000_000)
    settings = Settings(data_dir=tmp_path / "d", record_retention_days=7)
    init_data_dir(settings, clock=clock)
    fleet = open_fleet(settings, clock=clock, publisher=Recorder())
    with atomic(fleet.engine) as conn:
        devices.provision(fleet, conn, device_id="d1", profile="rpi4", tags=[], actor=ADMIN)

    def send(seqs: list[int]) -> None:
        batch = TelemetryBatch(device_id="d1", records=tuple(
            Record(seq=s, kind="event", at=int(clock.now), body={"n": s}) for s in seqs))
        handle_message(fleet, device_topic("d1", "telemetry"), batch.to_bytes(),
                       now=int(clock.now))

    send([1, 2, 3])
    clock.now += 6 * DAY
    send([4])
    runtime = MqttRuntime(fleet)  # never started: maintain_once needs only the fleet
    clock.now += DAY - 10
    assert runtime.maintain_once()["pruned"] == 0  # nothing is 7 days old yet
    clock.now += 20  # 1..3 are due, but the last run was 20 s ago: the next is in an hour
    assert runtime.maintain_once()["pruned"] == 0
    clock.now += 3600
    assert runtime.maintain_once()["pruned"] == 3
    with atomic(fleet.engine) as conn:
        left = conn.execute(select(tables.device_records.c.seq)).scalars().all()
    assert left == [4]

"""Acks leave on the runtime's own sender thread: ingest never waits for a PUBACK, and of the
acks waiting for one (device, stream) only the newest is sent (it covers the others). The
ingest worker stores what queued up in one transaction and acks only what is committed."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import func, select

from agent.protocol.messages import Ack, Record, TelemetryBatch
from agent.protocol.topics import device_topic
from fleet_server import auth
from fleet_server.db import atomic, tables
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.ingest_parse import Checked
from fleet_server.registry import devices
from fleet_server.runtime import INGEST_GROUP, MqttRuntime
from fleet_server.settings import Settings

NOW = 1_800_000_000


class BlockingPublisher:
    """Records acks; the first one blocks until released (a slow PUBACK)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        raise AssertionError("no desired states here")

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        if not self.sent:
            self.entered.set()
            assert self.release.wait(30)
        self.sent.append((device_id, payload))


def test_waiting_acks_of_one_stream_collapse_to_the_newest(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    publisher = BlockingPublisher()
    fleet = open_fleet(settings, clock=lambda: NOW, publisher=publisher)
    runtime = MqttRuntime(fleet)
    try:
        runtime._ack_soon("dev-a", "telemetry", b"a1")
        assert publisher.entered.wait(30)  # a1 is being sent; the rest wait behind it
        for payload in (b"a2", b"a3", b"a4"):
            runtime._ack_soon("dev-a", "telemetry", payload)
        runtime._ack_soon("dev-a", "drift", b"d1")
        runtime._ack_soon("dev-b", "telemetry", b"b1")
        publisher.release.set()
        runtime.wait_acks(timeout=30)
        assert publisher.sent == [("dev-a", b"a1"), ("dev-a", b"a4"), ("dev-a", b"d1"),
                                  ("dev-b", b"b1")]
    finally:
        publisher.release.set()
        runtime._ack_pool.shutdown(wait=True)
        runtime._ingest_pool.shutdown(wait=True)
        runtime._replan_pool.shutdown(wait=True)
        fleet.engine.dispose()


class CheckingPublisher:
    """Records acks, and checks on its own connection that each covers only committed rows."""

    def __init__(self) -> None:
        self.fleet: Fleet | None = None
        self.acks: list[tuple[str, int]] = []

    def publish_desired(self, device_id: str, envelope: bytes) -> None:
        raise AssertionError("no desired states here")

    def publish_ack(self, device_id: str, payload: bytes) -> None:
        ack = Ack.from_bytes(payload)
        assert self.fleet is not None
        with self.fleet.engine.connect() as conn:
            have = conn.execute(select(func.count()).select_from(tables.device_records).where(
                tables.device_records.c.device_id == device_id,
                tables.device_records.c.seq <= ack.upto_seq)).scalar_one()
        assert have == ack.upto_seq, f"ack {ack.upto_seq} for {device_id} covers {have} rows"
        self.acks.append((device_id, ack.upto_seq))


def _runtime(tmp_path: Path, device_ids: list[str], parse_workers: int = 0
             ) -> tuple[MqttRuntime, CheckingPublisher]:
    settings = Settings(data_dir=tmp_path / "data")
    init_data_dir(settings, clock=lambda: NOW)
    publisher = CheckingPublisher()
    fleet = open_fleet(settings, clock=lambda: NOW, publisher=publisher)
    publisher.fleet = fleet
    with atomic(fleet.engine) as conn:
        admin = auth.Principal("t", "test", "admin")
        for dev in device_ids:
            devices.provision(fleet, conn, device_id=dev, profile="rpi4", tags=[], actor=admin)
    return MqttRuntime(fleet, parse_workers=parse_workers), publisher


def _message(device: str, seq: int) -> SimpleNamespace:
    """What the link hands ``_on_message``: a topic and a payload."""
    payload = TelemetryBatch(device_id=device, records=(
        Record(seq=seq, kind="metrics", at=NOW, body={"n": seq}),)).to_bytes()
    return SimpleNamespace(topic=device_topic(device, "telemetry"), payload=payload)


def _stop(runtime: MqttRuntime) -> None:
    runtime._ingest_pool.shutdown(wait=True)
    if runtime.parse_pool is not None:
        runtime.parse_pool.close()
    runtime._ack_pool.shutdown(wait=True)
    runtime._replan_pool.shutdown(wait=True)
    runtime.fleet.engine.dispose()


def test_messages_queued_while_the_worker_is_busy_are_stored_in_groups(
        tmp_path: Path) -> None:
    runtime, publisher = _runtime(tmp_path, ["dev-a", "dev-b"])
    groups: list[int] = []
    store = runtime._store_group

    def counted(checked: list[Checked], now: int) -> None:
        groups.append(len(checked))
        store(checked, now)

    runtime._store_group = counted  # type: ignore[method-assign]
    busy = threading.Event()
    try:
        runtime._ingest_pool.submit(busy.wait, 30)  # the worker is busy with something else
        total = INGEST_GROUP + 6
        for seq in range(1, total // 2 + 1):
            runtime._on_message(_message("dev-a", seq))
            runtime._on_message(_message("dev-b", seq))
        busy.set()
        runtime._ingest_pool.submit(lambda: None).result(30)  # the drain ran before this
        runtime.wait_acks(30)
        assert groups == [INGEST_GROUP, 6]
        assert runtime.ingested == total
        assert runtime.counters.snapshot()["stored"] == {"telemetry": total}
        with atomic(runtime.fleet.engine) as conn:
            held = dict(conn.execute(select(tables.stream_acks.c.device_id,
                                            tables.stream_acks.c.upto_seq)).all())
        assert held == {"dev-a": total // 2, "dev-b": total // 2}
        last = {device: upto for device, upto in publisher.acks}  # in the order sent
        assert last == {"dev-a": total // 2, "dev-b": total // 2}
        # alone again: the next message is stored at once, in a group of its own
        runtime._on_message(_message("dev-a", total // 2 + 1))
        runtime._ingest_pool.submit(lambda: None).result(30)
        assert groups[-1] == 1 and runtime.ingested == total + 1
    finally:
        busy.set()
        _stop(runtime)


def test_a_group_the_database_refuses_is_stored_one_message_at_a_time(tmp_path: Path) -> None:
    runtime, publisher = _runtime(tmp_path, ["dev-a", "dev-b"])
    with atomic(runtime.fleet.engine) as conn:  # the database refuses dev-b's records
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse_b BEFORE INSERT ON device_records WHEN "
            "NEW.device_id = 'dev-b' BEGIN SELECT RAISE(ABORT, 'refused for dev-b'); END")
    try:
        runtime._ingest_group([(m.topic, m.payload) for m in (
            _message("dev-a", 1), _message("dev-b", 1), _message("dev-a", 2))])
        runtime.wait_acks(30)
        with atomic(runtime.fleet.engine) as conn:
            rows = conn.execute(select(tables.device_records.c.device_id,
                                       tables.device_records.c.seq)).all()
        assert sorted(rows) == [("dev-a", 1), ("dev-a", 2)]
        assert runtime.ingested == 2
        assert all(device == "dev-a" for device, _ in publisher.acks)
        assert publisher.acks[-1] == ("dev-a", 2)
    finally:
        _stop(runtime)

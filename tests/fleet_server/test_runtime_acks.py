"""Acks leave on the runtime's own sender thread: ingest never waits for a PUBACK, and of the
acks waiting for one (device, stream) only the newest is sent (it covers the others)."""

from __future__ import annotations

import threading
from pathlib import Path

from fleet_server.fleet import init_data_dir, open_fleet
from fleet_server.runtime import MqttRuntime
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

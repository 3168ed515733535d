"""How the fleet simulator hosts many agents per process: pure parts, no server or broker.

(The simulations themselves run in ``tests/integration/test_simulator.py``.)
"""

from __future__ import annotations

import threading

import pytest

from fleet_server.simulate import SimConfig, workers_for
from fleet_server.simulate_devices import (
    MAX_AGENTS_PER_PROCESS,
    MAX_AGENTS_PER_SHARED_PROCESS,
    NewestFirstExecutor,
    thread_deltas,
    thread_kind,
)


def test_the_newest_queued_job_runs_first_and_shutdown_still_runs_them_all() -> None:
    pool = NewestFirstExecutor(1, thread_name_prefix="test-newest")
    gate, ran = threading.Event(), list[int]()
    pool.submit(gate.wait, 10)  # holds the only thread while the rest queue up
    futures = [pool.submit(ran.append, i) for i in range(5)]
    gate.set()
    pool.shutdown(wait=True)
    assert ran == [4, 3, 2, 1, 0]
    assert all(f.done() and f.exception() is None for f in futures)


@pytest.mark.parametrize(("devices", "workers", "loop", "expected"), [
    (1000, 2, "shared", 2),
    (1000, 1, "shared", -(-1000 // MAX_AGENTS_PER_SHARED_PROCESS)),
    (1000, 2, "thread", -(-1000 // MAX_AGENTS_PER_PROCESS)),
    (3, 8, "thread", 3),
    (20, 0, "shared", 0),
], ids=["shared-as-asked", "shared-raised", "thread-raised-for-select", "one-per-device",
        "in-process"])
def test_workers_are_raised_to_what_the_mqtt_loop_allows(devices: int, workers: int,
                                                          loop: str, expected: int) -> None:
    assert workers_for(SimConfig(devices=devices, workers=workers, mqtt_loop=loop)) == expected


@pytest.mark.parametrize(("field", "value", "message"), [
    ("mqtt_loop", "asyncio", "mqtt_loop: expected one of shared, thread, got 'asyncio'"),
    ("executor_order", "lifo", "executor_order: expected one of newest-first, fifo, got 'lifo'"),
], ids=["mqtt-loop", "executor-order"])
def test_unknown_hosting_options_are_refused(field: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(**{field: value})  # type: ignore[arg-type]


def test_thread_counters_are_differenced_and_summed_over_processes() -> None:
    row = {"threads": 2, "cpu_s": 1.0, "voluntary": 10, "nonvoluntary": 1}
    later = {"threads": 2, "cpu_s": 1.5, "voluntary": 30, "nonvoluntary": 4}
    fresh = {"threads": 1, "cpu_s": 0.25, "voluntary": 5, "nonvoluntary": 0}
    out = thread_deltas([{"loop": row}, {}], [{"loop": later}, {"loop": fresh}])
    assert out == {"loop": {"threads": 3, "cpu_s": 0.75, "voluntary": 25, "nonvoluntary": 3}}


@pytest.mark.parametrize(("name", "kind"), [
    ("MainThread", "loop"), ("sim-agents_3", "executor"),
    ("paho-mqtt-client-edgefleet-sim-00001", "paho"), ("edgefleet-mqtt-driver", "mqtt-driver"),
    ("edgefleet-infer-0", "serving"), ("Thread-7", "other"), ("", "native"),
])
def test_worker_threads_are_grouped_by_name(name: str, kind: str) -> None:
    assert thread_kind(name) == kind

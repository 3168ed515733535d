"""A rollout moves as soon as it can, not at the next maintenance pass.

Two things move a running rollout without a device changing what it runs: its wave's bake time
ending and new health numbers (telemetry and drift records). No report marks either moment, so
the runtime re-judges running rollouts every ``rollout_tick_s`` (:meth:`MqttRuntime.tick_rollouts`)
instead of waiting for the maintenance pass. The Fleetlet harness of ``test_rollouts`` runs the
real runtime's ingest and re-plan paths on an injected clock; no maintenance pass runs here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_rollouts import Fleetlet


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator[Callable[[int], Fleetlet]]:
    made: list[Fleetlet] = []

    def make(n: int) -> Fleetlet:
        made.append(Fleetlet(tmp_path / f"f{len(made)}", n))
        return made[-1]
    yield make
    for f in made:
        f.fleet.engine.dispose()


def test_a_tick_after_the_bake_time_starts_the_next_wave(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(3)
    rid = f.deploy("2", "1,all", bake_s=600)["id"]
    f.settle()
    assert len(f.on("2")) == 1
    f.clock.now += 599
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert len(f.on("2")) == 1, "the bake time is not over: the wave must hold"
    f.clock.now += 1
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert len(f.on("2")) == 3
    f.settle()
    assert f.rollout(rid)["status"] == "running", "the last wave bakes too"
    f.clock.now += 600
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert f.rollout(rid)["status"] == "completed"


def test_a_tick_with_no_running_rollout_changes_nothing(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(2)
    before = f.runtime.replans
    sent = {d: len(v) for d, v in f.recorder.desired.items()}
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert f.runtime.replans == before
    assert {d: len(v) for d, v in f.recorder.desired.items()} == sent


def test_health_numbers_are_judged_on_the_tick_and_stop_the_wave_at_the_bake_end(
        make_fleet: Callable[[int], Fleetlet]) -> None:
    f = make_fleet(3)
    rid = f.deploy("2", "1,all", bake_s=600, max_error_rate=0.05, min_samples=50)["id"]
    f.settle()
    wave0 = f.on("2")
    assert len(wave0) == 1 and f.rollout(rid)["status"] == "running"

    def error_gate() -> dict[str, object]:
        return next(g for g in f.rollout(rid)["gates"] if g["gate"] == "error_rate")

    assert error_gate()["value"] is None
    f.metrics(wave0[0], "2", ok=40, errors=20)  # telemetry only: no reported message follows
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert error_gate()["value"] == 20 / 60  # judged on the tick, no maintenance pass
    f.clock.now += 600
    f.runtime.tick_rollouts()
    f.runtime.wait_replans(timeout=30)
    assert f.rollout(rid)["status"] == "paused"
    assert f.on("2") == wave0

"""The fleet simulator: ~20 real agents against a real server, on both brokers.

Each scenario runs :class:`fleet_server.simulate.FleetSimulation`: uvicorn serving the admin API
and TUF repository, the embedded amqtt broker or a real Mosquitto, the digits MLP converted for
two profiles, and 20 real agents (in this process, or in worker processes). It deploys v1 and
waits, with a deadline, until every device reports its expected outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from fleet_server.mqtt.mosquitto import find_mosquitto
from fleet_server.simulate import (
    BAD_VERSION,
    VERSION,
    FleetSimulation,
    SimConfig,
    build_bundles,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICES = 20
PROFILES = ("rpi4", "rpi-zero2w")


@dataclass(frozen=True)
class Scenario:
    broker: str
    workers: int = 0
    fail_fraction: float = 0.0
    offline_fraction: float = 0.0
    offline_for_s: float = 3.0
    mqtt_loop: str = "shared"  # "thread": a paho network thread per agent, as on a device


SCENARIOS = {
    "embedded-all-converge": Scenario("embedded"),
    "mosquitto-all-converge-in-workers": Scenario("mosquitto", workers=2),
    "mosquitto-paho-thread-per-agent-health-failures-and-offline": Scenario(
        "mosquitto", workers=1, fail_fraction=0.25, offline_fraction=0.1, mqtt_loop="thread"),
    "mosquitto-health-failures-and-offline": Scenario("mosquitto", workers=1,
                                                      fail_fraction=0.25,
                                                      offline_fraction=0.1),
    "embedded-health-failures-and-offline": Scenario("embedded", fail_fraction=0.25,
                                                     offline_fraction=0.1),
}


@pytest.fixture(scope="module")
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """digits 1.0.0 converted once for both profiles, shared by every scenario."""
    cache = tmp_path_factory.mktemp("sim-bundles")
    build_bundles(cache, PROFILES)
    return cache


@pytest.mark.parametrize("scenario", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_fleet_converges(scenario: Scenario, bundle_cache: Path, tmp_path: Path) -> None:
    if scenario.broker == "mosquitto" and find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (apt-get install -y mosquitto)")
    config = SimConfig(devices=DEVICES, workers=scenario.workers, broker=scenario.broker,
                       profiles=PROFILES, fail_fraction=scenario.fail_fraction,
                       offline_fraction=scenario.offline_fraction, offline_after_s=0.0,
                       offline_for_s=scenario.offline_for_s, timeout_s=45.0,
                       mqtt_loop=scenario.mqtt_loop,
                       work_dir=tmp_path / "sim", cache_dir=bundle_cache)
    with FleetSimulation(config) as sim:
        result = sim.run()
        devices = {d.device_id: d for d in sim.devices}

    pending = sorted(d for d, o in result.outcomes.items() if o == "pending")
    assert result.converged, f"not converged: {pending}; running {result.running}"
    assert len(result.outcomes) == DEVICES
    failing = {d for d, spec in devices.items() if spec.fails}
    offline = {d for d, spec in devices.items() if spec.offline}
    assert len(failing) == round(scenario.fail_fraction * DEVICES)
    assert len(offline) == round(scenario.offline_fraction * DEVICES)
    for dev, outcome in result.outcomes.items():
        if dev in failing:  # the health check refused 1.0.1: rolled back, never serving it
            assert outcome == "rolled_back", (dev, outcome)
            assert result.running[dev] in (None, VERSION), (dev, result.running[dev])
            assert result.running[dev] != BAD_VERSION
        else:
            assert outcome == "ok", (dev, outcome)
            assert result.running[dev] == VERSION, (dev, result.running[dev])
    for dev in offline:  # offline during the deploy, converged only after coming back
        assert result.converged_at[dev] >= scenario.offline_for_s, (dev, result.converged_at)
    # every device's reports went through the broker and were ingested; each desired state
    # was signed and published once
    assert result.desired_published == DEVICES
    assert result.ingest_messages >= DEVICES
    assert result.server_cpu_s > 0
    if scenario.workers:
        assert result.agents_cpu_s is not None and result.agents_cpu_s > 0
        assert result.agent_rss_mb_per_device is not None

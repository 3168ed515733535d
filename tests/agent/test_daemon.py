"""The daemon's front door: only this device's, fresh, correctly signed desired states pass.

The Agent is built from a real provisioning file written by the real server library; nothing
here touches the network (the link is never started).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import load_config
from agent.daemon.app import Agent, load_provisioning
from agent.errors import ConfigError
from agent.protocol.messages import DesiredState
from agent.protocol.signed import sign_desired
from fleet_server.auth import Principal
from fleet_server.db import atomic
from fleet_server.fleet import Fleet, init_data_dir, open_fleet
from fleet_server.registry import devices
from fleet_server.settings import Settings

NOW = 1_800_000_000


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    settings = Settings(data_dir=tmp_path / "server")
    init_data_dir(settings, clock=lambda: NOW)
    return open_fleet(settings, clock=lambda: NOW)


@pytest.fixture
def agent(fleet: Fleet, tmp_path: Path) -> Agent:
    with atomic(fleet.engine) as conn:
        out = devices.provision(fleet, conn, device_id="pi-7", profile="rpi4", tags=[],
                                actor=Principal("t", "test", "admin"))
    prov = tmp_path / "dev" / "provisioning.json"
    prov.parent.mkdir()
    prov.write_bytes(out.provisioning.to_bytes())
    prov.chmod(0o600)
    cfg = tmp_path / "dev" / "agent.toml"
    cfg.write_text('provisioning = "provisioning.json"\ndata_dir = "data"\nhttp_port = 0\n')
    return Agent(load_config(cfg), clock=lambda: NOW)


def state(device: str = "pi-7", seq: int = 1, issued: int = NOW - 10,
          expires: int = NOW + 3600) -> DesiredState:
    return DesiredState(device_id=device, sequence=seq, issued_at=issued, expires_at=expires,
                        models=())


def test_a_valid_state_passes(agent: Agent, fleet: Fleet) -> None:
    got = agent._on_desired(sign_desired(state(), fleet.director_key))
    assert got is not None and got.sequence == 1
    assert agent.status.last_result is None


HOSTILE = [
    ("another-devices-state", lambda f: sign_desired(state(device="pi-8"), f.director_key),
     "pi-8"),
    ("signed-by-an-unknown-key", lambda f: sign_desired(state(), Ed25519PrivateKey.generate()),
     "signature"),
    ("expired", lambda f: sign_desired(state(issued=NOW - 7200, expires=NOW - 60),
                                       f.director_key), "expire"),
    ("tampered-after-signing", lambda f: _tamper(sign_desired(state(), f.director_key)),
     "signature"),
    ("not-json", lambda f: b"\xff{", "envelope"),
]


def _tamper(envelope: bytes) -> bytes:
    doc = json.loads(envelope)
    doc["signed"]["sequence"] = 99
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("make", "why"), [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_states_are_refused_and_reported(agent: Agent, fleet: Fleet, make, why) -> None:
    assert agent._on_desired(make(fleet)) is None
    assert agent.status.last_result == "refused"
    assert why.lower() in (agent.status.last_error or "").lower()


def test_replay_of_an_older_state_is_refused_but_the_same_retained_one_is_ignored(
        agent: Agent, fleet: Fleet) -> None:
    agent.status.applied_sequence = 5
    assert agent._on_desired(sign_desired(state(seq=5), fleet.director_key)) is None
    assert agent.status.last_result is None  # the retained state we applied, seen again
    assert agent._on_desired(sign_desired(state(seq=3), fleet.director_key)) is None
    assert agent.status.last_result == "refused"
    assert "3" in (agent.status.last_error or "")


def test_provisioning_file_readable_by_others_is_refused(agent: Agent) -> None:
    path = agent.config.provisioning
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        load_provisioning(path)


@pytest.mark.parametrize(("rand", "expected"), [(0.0, (1, 30)), (0.5, (2, 45)), (1.0, (2, 60))],
                         ids=["low", "mid", "high"])
def test_reconnect_bounds_are_jittered_per_device(rand: float, expected: tuple[int, int]) -> None:
    from agent.transport.mqtt import reconnect_jitter

    assert reconnect_jitter(1.0, 60.0, lambda: rand) == expected

"""The reference-vs-live distribution of one device: the view, the API and the dashboard's
model page, from real drift summaries through the real ingest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import MODEL, START, Digits, Fleetlet, trained_digits

from agent.drift import bin_counts, psi
from fleet_server import auth
from fleet_server.api import create_app
from fleet_server.dashboard.health import model_page, parse_since
from fleet_server.db import atomic
from fleet_server.db.engine import reading
from fleet_server.errors import InvalidInput, NotFound
from fleet_server.monitoring import TimeRange, distribution_view
from model_tools.examples.digits import shifted

HOUR = TimeRange(START, START + 3600, 600)


@pytest.fixture(scope="module")
def digits() -> Digits:
    return trained_digits()


@pytest.fixture
def fleetlet(tmp_path: Path, digits: Digits) -> Iterator[Fleetlet]:
    """pi-1 and zero-1 serve the eval split as it is, pi-2 a copy with its centre dead."""
    f = Fleetlet(tmp_path, {"pi-1": "rpi4", "pi-2": "rpi4", "zero-1": "rpi-zero2w"},
                 digits.baseline)
    calm = digits.windows(digits.x_eval, window=180)
    f.drift("pi-1", calm, at=START + 100)
    f.drift("zero-1", calm, at=START + 100)
    f.drift("pi-2", digits.windows(shifted(digits.x_eval, "dead"), window=180),
            at=START + 200)
    yield f
    f.close()


def test_one_devices_live_counts_against_its_profiles_reference(
        fleetlet: Fleetlet, digits: Digits) -> None:
    f = fleetlet
    ref = digits.baseline["inputs"]["input"]["features"][18]
    pooled = distribution_view(f.fleet, MODEL, HOUR, version="1.0.0", feature=18)
    one = distribution_view(f.fleet, MODEL, HOUR, version="1.0.0", feature=18, device="pi-2")
    dead = bin_counts(shifted(digits.x_eval, "dead")[:, 18], ref["edges"])
    assert (one["device"], one["profile"], one["profiles"]) == ("pi-2", "rpi4", ["rpi4"])
    assert one["live_counts"] == dead.tolist() and one["samples"] == 540
    assert (one["windows"], one["devices"]) == (3, 1)
    assert one["psi"] == pytest.approx(psi(ref["ref"], dead), rel=1e-5)
    # the pooled view mixes in the calm devices: one device's drift stands out alone
    assert pooled["device"] is None and pooled["devices"] == 3
    assert one["psi"] > pooled["psi"]
    zero = distribution_view(f.fleet, MODEL, HOUR, version="1.0.0", feature=18,
                             device="zero-1")
    assert (zero["profile"], zero["devices"], zero["samples"]) == ("rpi-zero2w", 1, 540)


BAD = [
    ("unknown-device", {"device": "pi-9"}, NotFound, "device 'pi-9' not found"),
    ("other-profile", {"device": "pi-2", "profile": "rpi-zero2w"}, InvalidInput,
     "profile: expected device 'pi-2''s profile 'rpi4' or none, got 'rpi-zero2w'"),
]


@pytest.mark.parametrize(("name", "args", "error", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_device_queries(fleetlet: Fleetlet, name: str, args: dict[str, Any],
                            error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        distribution_view(fleetlet.fleet, MODEL, HOUR, version="1.0.0", **args)


def test_the_api_and_the_model_page_show_the_devices_distribution(
        fleetlet: Fleetlet) -> None:
    f = fleetlet
    f.clock.now = START + 3600
    with atomic(f.fleet.engine) as conn:
        _, reader = auth.create_token(conn, name="viewer", scope="reader", now=START)
    app = create_app(f.settings, clock=f.clock, fleet=f.fleet)
    with TestClient(app) as client:
        got = client.get(f"/v1/monitoring/models/{MODEL}/distribution",
                         params={"version": "1.0.0", "feature": 18, "device": "pi-2"},
                         headers={"Authorization": f"Bearer {reader}"})
        assert got.status_code == 200, got.text
        view = distribution_view(f.fleet, MODEL, TimeRange.make(START + 3600),  # as the API
                                 version="1.0.0", feature=18, device="pi-2")
        assert got.json() == json.loads(json.dumps(view))
        assert got.json()["device"] == "pi-2"
        missing = client.get(f"/v1/monitoring/models/{MODEL}/distribution",
                             params={"version": "1.0.0", "device": "pi-9"},
                             headers={"Authorization": f"Bearer {reader}"})
        assert missing.status_code == 404 and "pi-9" in missing.json()["detail"]
    with reading(f.fleet.engine) as conn:
        page = model_page(f.fleet, conn, MODEL, parse_since("1h", START + 3600),
                          device="pi-2", version="1.0.0", input_name="input", feature=18)
    assert page.distribution is not None and page.distribution["device"] == "pi-2"
    assert page.distribution["live_counts"] == view["live_counts"]

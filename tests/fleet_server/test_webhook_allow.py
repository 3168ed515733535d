"""The ``webhook_allow`` list: what it allows (pure, table-driven), the settings that carry
it, and the three places it is enforced: creating a rule (422), queueing a delivery (stored
``failed``), and the sender right before a POST (no request), against a real HTTP receiver on
loopback and real error-rate alerts through the real ingest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import MODEL, PUBLISHER, START, Fleetlet, Receiver, metrics_body
from pydantic import ValidationError
from sqlalchemy import select

from fleet_server import auth
from fleet_server.api import create_app
from fleet_server.db import atomic, tables
from fleet_server.errors import InvalidInput
from fleet_server.monitoring import (
    AlertRule,
    WebhookAllowList,
    WebhookSender,
    create_rule,
    evaluate_alerts,
)
from fleet_server.settings import Settings

LIST = WebhookAllowList.parse(["hooks.example.com", "*.corp.example", "10.0.0.7", "[fd00::7]",
                               "https://ops.example.org/edgefleet/"])
URLS = [
    ("host", "https://hooks.example.com/services/T0/B0", True),
    ("host-any-port-and-scheme", "http://hooks.example.com:8080/x", True),
    ("host-case", "https://HOOKS.example.COM/x", True),
    ("wildcard-subdomain", "https://alerts.eu.corp.example/x", True),
    ("wildcard-not-the-domain", "https://corp.example/x", False),
    ("wildcard-not-a-lookalike", "https://evilcorp.example/x", False),
    ("ip", "http://10.0.0.7:9000/hook", True),
    ("ipv6", "http://[fd00::7]/hook", True),
    ("other-ip", "http://10.0.0.8/hook", False),
    ("metadata-endpoint", "http://169.254.169.254/latest/meta-data/", False),
    ("loopback", "http://127.0.0.1:8080/v1/tokens", False),
    ("userinfo-trick", "https://hooks.example.com@evil.example/x", False),
    ("suffix-trick", "https://hooks.example.com.evil.example/x", False),
    ("prefix-exact", "https://ops.example.org/edgefleet", True),
    ("prefix-below", "https://ops.example.org/edgefleet/alerts?x=1", True),
    ("prefix-segment-boundary", "https://ops.example.org/edgefleetx", False),
    ("prefix-other-path", "https://ops.example.org/admin", False),
    ("prefix-dot-dot", "https://ops.example.org/edgefleet/../admin", False),
    ("prefix-encoded-dot-dot", "https://ops.example.org/edgefleet/%2E%2E/admin", False),
    ("prefix-other-scheme", "http://ops.example.org/edgefleet/x", False),
    ("prefix-other-port", "https://ops.example.org:8443/edgefleet/x", False),
    ("prefix-default-port-spelled", "https://ops.example.org:443/edgefleet/x", True),
    ("not-http", "ftp://hooks.example.com/x", False),
    ("bad-port", "https://hooks.example.com:99999/x", False),
]


@pytest.mark.parametrize(("name", "url", "allowed"), URLS, ids=[u[0] for u in URLS])
def test_what_the_list_allows(name: str, url: str, allowed: bool) -> None:
    assert LIST.allows(url) is allowed


BAD_ENTRIES = [
    ("empty", "", "a host, \\*.domain, IP address or http\\(s\\):// URL prefix"),
    ("spaces", " hooks.example.com", "a host"),
    ("scheme", "ftp://files.example.com/", "an http:// or https:// URL prefix"),
    ("userinfo", "https://u:p@hooks.example.com/", "without user, query or fragment"),
    ("query", "https://hooks.example.com/?token=1", "without user, query or fragment"),
    ("dot-dot", "https://hooks.example.com/a/../b", "a path without '.' or '..' segments"),
    ("bare-wildcard", "*.com", "\\*.domain with a domain of at least two labels"),
    ("not-a-host", "hooks example.com", "a host name"),
]


@pytest.mark.parametrize(("name", "entry", "match"), BAD_ENTRIES, ids=[b[0] for b in BAD_ENTRIES])
def test_bad_entries_are_refused_by_name(name: str, entry: str, match: str) -> None:
    with pytest.raises(ValueError, match=f"webhook_allow entry {re.escape(repr(entry))}: "
                       f"expected .*{match}"):
        WebhookAllowList.parse([entry])
    with pytest.raises(ValidationError, match="webhook_allow"):
        Settings(data_dir=Path("/nonexistent"), webhook_allow=[entry])


def test_settings_default_to_no_list_and_read_json_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(data_dir=Path("/d")).webhook_allow_list is None
    monkeypatch.setenv("EDGEFLEET_WEBHOOK_ALLOW", '["hooks.example.com", "*.corp.example"]')
    got = Settings(data_dir=Path("/d")).webhook_allow_list
    assert got is not None and got.entries == ("hooks.example.com", "*.corp.example")
    monkeypatch.setenv("EDGEFLEET_WEBHOOK_ALLOW", "[]")
    none = Settings(data_dir=Path("/d")).webhook_allow_list
    assert none is not None and not none.allows("https://hooks.example.com/")


# ------------------------------------------------------------------------------- enforcement
@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([])
    yield r
    r.close()


@pytest.fixture
def fleetlet(tmp_path: Path) -> Iterator[Fleetlet]:
    f = Fleetlet(tmp_path, {"pi-1": "rpi4"}, {})
    yield f
    f.close()


def narrow(f: Fleetlet, entries: list[str]) -> None:
    """The server restarted with ``webhook_allow`` = ``entries``."""
    f.settings = f.fleet.settings = Settings(data_dir=f.settings.data_dir,
                                             webhook_allow=entries)


def failing_device(f: Fleetlet) -> None:
    """pi-1 fails half its requests: an error-rate rule over 10 % holds."""
    f.metrics("pi-1", [metrics_body([5.0] * 50, {"runtime": 50})], at=START)


def rule(url: str) -> AlertRule:
    return AlertRule(0, MODEL, "error_rate", 0.1, min_samples=10, window_s=600,
                     webhook_url=url)


def deliveries(f: Fleetlet) -> list[tuple[str, int, str | None]]:
    w = tables.alert_webhooks.c
    with atomic(f.fleet.engine) as conn:
        return [(r.status, r.attempts, r.last_error) for r in conn.execute(
            select(w.status, w.attempts, w.last_error).order_by(w.id))]


def test_creating_a_rule_outside_the_list_is_refused(fleetlet: Fleetlet) -> None:
    f = fleetlet
    narrow(f, ["hooks.example.com"])
    allow = f.fleet.settings.webhook_allow_list
    with atomic(f.fleet.engine) as conn, pytest.raises(
            InvalidInput, match=r"webhook_url: expected a URL allowed by the server's "
            r"webhook_allow list \[hooks.example.com\], got 'http://169.254.169.254/x'"):
        create_rule(conn, rule("http://169.254.169.254/x"), actor=PUBLISHER, now=START,
                    allow=allow)
    with atomic(f.fleet.engine) as conn:
        create_rule(conn, rule("https://hooks.example.com/x"), actor=PUBLISHER, now=START,
                    allow=allow)

    with atomic(f.fleet.engine) as conn:
        _, token = auth.create_token(conn, name="ci", scope="publisher", now=START)
    app = create_app(f.settings, clock=f.clock, fleet=f.fleet)
    body = {"model": MODEL, "kind": "error_rate", "threshold": 0.1}
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {token}"}
        refused = client.post("/v1/alert-rules", headers=headers,
                              json={**body, "webhook_url": "http://127.0.0.1:8080/v1/x"})
        assert refused.status_code == 422
        assert "webhook_allow list [hooks.example.com]" in refused.json()["detail"]
        made = client.post("/v1/alert-rules", headers=headers,
                           json={**body, "webhook_url": "https://hooks.example.com/y"})
        assert made.status_code == 201, made.text
        listed = client.get("/v1/alert-rules", headers=headers).json()
    assert [r["webhook_url"] for r in listed["items"]] == ["https://hooks.example.com/x",
                                                           "https://hooks.example.com/y"]


def test_a_delivery_outside_a_narrowed_list_is_stored_failed_and_never_sent(
        fleetlet: Fleetlet, receiver: Receiver) -> None:
    f = fleetlet
    with atomic(f.fleet.engine) as conn:  # made while no list was set
        create_rule(conn, rule(receiver.url), actor=PUBLISHER, now=START)
    narrow(f, ["hooks.example.com"])
    failing_device(f)
    [fired] = evaluate_alerts(f.fleet, now=START)
    assert (fired.after, fired.webhook) == ("firing", False)
    sender = WebhookSender(f.fleet.engine, clock=f.clock)
    try:
        assert sender.deliver_due() == 0
    finally:
        sender.stop()
    [(status, tries, error)] = deliveries(f)
    assert (status, tries) == ("failed", 0)
    assert error == ("not sent: the URL is outside the server's webhook_allow list "
                     "[hooks.example.com]")
    assert receiver.paths == []


def test_the_sender_checks_the_list_again_before_each_post(
        fleetlet: Fleetlet, receiver: Receiver) -> None:
    f = fleetlet
    with atomic(f.fleet.engine) as conn:
        create_rule(conn, rule(receiver.url), actor=PUBLISHER, now=START)
    failing_device(f)
    [fired] = evaluate_alerts(f.fleet, now=START)  # no list: queued pending
    assert fired.webhook
    narrowed = WebhookAllowList.parse(["hooks.example.com"])
    sender = WebhookSender(f.fleet.engine, clock=f.clock, allow=narrowed)
    try:
        assert sender.deliver_due() == 0
    finally:
        sender.stop()
    assert receiver.paths == []
    [(status, tries, error)] = deliveries(f)
    assert (status, tries) == ("failed", 1)  # one attempt row, no request, no retry
    assert error is not None and "outside the server's webhook_allow list" in error

    # a list that names the receiver lets the next delivery through
    f.metrics("pi-1", [metrics_body([5.0] * 100)], at=START + 700)
    f.clock.now = START + 700
    [resolved] = evaluate_alerts(f.fleet, now=START + 700)
    assert (resolved.after, resolved.webhook) == ("resolved", True)
    sender = WebhookSender(f.fleet.engine, clock=f.clock,
                           allow=WebhookAllowList.parse([f"{receiver.url}"]))
    try:
        assert sender.deliver_due() == 1
    finally:
        sender.stop()
    assert receiver.paths == ["/hooks/edgefleet"]


# ------------------------------------------------------------------------------- serve options
SERVE_CASES = [
    ("defaults", [], {}, 0, (30, None), "NOTE: alert webhooks may POST to any URL"),
    ("options", ["--record-retention", "90", "--webhook-allow", "hooks.example.com",
                 "--webhook-allow", "*.corp.example"], {}, 0,
     (90, ("hooks.example.com", "*.corp.example")), None),
    ("environment", [], {"EDGEFLEET_RECORD_RETENTION_DAYS": "0",
                         "EDGEFLEET_WEBHOOK_ALLOW": '["10.0.0.7"]'}, 0, (0, ("10.0.0.7",)),
     None),
    ("bad-entry", ["--webhook-allow", "ftp://x"], {}, 2, None,
     "webhook_allow entry 'ftp://x': expected an http:// or https:// URL prefix"),
    ("negative-days", ["--record-retention", "-1"], {}, 2, None, "--record-retention"),
]


@pytest.mark.parametrize(("name", "args", "env", "code", "settings", "says"), SERVE_CASES,
                         ids=[c[0] for c in SERVE_CASES])
def test_serve_takes_the_retention_and_the_allow_list(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, args: list[str],
        env: dict[str, str], code: int, settings: tuple[int, Any] | None,
        says: str | None) -> None:
    """``serve`` up to the point it would start uvicorn: the settings it builds, and what it
    says on stderr."""
    import uvicorn
    from click.testing import CliRunner

    import fleet_server.api.app as app_module
    import fleet_server.runtime as runtime_module
    from fleet_server.cli import cli

    built: list[Settings] = []
    monkeypatch.setattr(app_module, "create_app", lambda s: built.append(s) or object())
    monkeypatch.setattr(runtime_module, "attach_mqtt", lambda app, **kw: None)
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: None)
    for var in ("EDGEFLEET_RECORD_RETENTION_DAYS", "EDGEFLEET_WEBHOOK_ALLOW"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(cli, ["serve", "--data-dir", str(tmp_path), *args],
                                prog_name="fleet_server", env=env)
    assert result.exit_code == code, result.output
    if settings is not None:
        [got] = built
        assert (got.record_retention_days, got.webhook_allow) == settings
    if says is not None:
        assert says in result.output
    elif code == 0:
        assert "NOTE" not in result.output

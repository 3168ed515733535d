"""The ``webhook_allow`` list: what it allows (pure, table-driven), the settings that carry
it, and the three places it is enforced: creating a rule (422), queueing a delivery (stored
``failed``), and the sender right before a POST (no request), against a real HTTP receiver on
loopback and real error-rate alerts through the real ingest.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from monitoring_helpers import (
    MODEL,
    PUBLISHER,
    START,
    Fleetlet,
    Receiver,
    metrics_body,
    tls_pair,
)
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
                               "https://ops.example.org/edgefleet/", "192.168.50.0/24",
                               "https://10.9.0.7/ef/"])
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
    ("cidr", "http://192.168.50.9:8080/hook", True),
    ("cidr-outside", "http://192.168.51.9/hook", False),
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
    # an IP as a URL prefix's host allows that prefix only, not the whole address
    ("ip-prefix", "https://10.9.0.7/ef/alerts", True),
    ("ip-prefix-other-port", "http://10.9.0.7:2375/containers/create", False),
    ("ip-prefix-other-path", "https://10.9.0.7/admin", False),
    ("ip-prefix-dot-dot", "https://10.9.0.7/ef/../x", False),
    ("ip-prefix-mapped-v6", "https://[::ffff:10.9.0.7]/ef/x", False),
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
    ("cidr-host-bits", "10.0.0.1/8", "a CIDR network such as 10.20.0.0/16"),
    ("path-without-scheme", "hooks.example.com/x", "or an http\\(s\\):// URL prefix"),
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


ADDRESSES = [
    # name, list, address, refused as (None: allowed)
    ("public-v4", ["hooks.example.com"], "93.184.215.14", None),
    ("public-v6", ["hooks.example.com"], "2606:4700::1111", None),
    ("loopback", ["hooks.example.com"], "127.0.0.1", "loopback"),
    ("loopback-v6", ["hooks.example.com"], "::1", "loopback"),
    ("loopback-v4-mapped", ["hooks.example.com"], "::ffff:127.0.0.1", "loopback"),
    ("metadata-endpoint", ["hooks.example.com"], "169.254.169.254", "link-local"),
    ("link-local-v6", ["hooks.example.com"], "fe80::1", "link-local"),
    ("private", ["hooks.example.com"], "10.1.2.3", "private"),
    ("private-v6", ["hooks.example.com"], "fd00::1", "private"),
    ("multicast", ["hooks.example.com"], "224.0.0.251", "multicast"),
    ("unspecified", ["hooks.example.com"], "0.0.0.0", "unspecified"),
    ("shared-cgnat", ["hooks.example.com"], "100.64.0.1", "non-global"),
    ("named-address", ["hooks.example.com", "127.0.0.1"], "127.0.0.1", None),
    ("named-by-a-prefix", ["http://10.1.2.3:8080/hooks"], "10.1.2.3", None),
    ("named-network", ["hooks.example.com", "10.0.0.0/8"], "10.1.2.3", None),
    ("named-network-v6", ["fd00::/8"], "fd00::1", None),
    ("mapped-in-named-network", ["127.0.0.0/8"], "::ffff:127.0.0.1", None),
    ("other-network", ["10.0.0.0/8"], "192.168.1.1", "private"),
]


@pytest.mark.parametrize(("name", "entries", "address", "kind"), ADDRESSES,
                         ids=[a[0] for a in ADDRESSES])
def test_which_addresses_a_webhook_may_connect_to(name: str, entries: list[str], address: str,
                                                  kind: str | None) -> None:
    refusal = WebhookAllowList.parse(entries).address_refusal(address)
    if kind is None:
        assert refusal is None
    else:
        article = "an" if kind[0] in "aeiou" else "a"
        assert refusal == (f"{address} is {article} {kind} address, and the server's webhook_allow "
                           f"list [{', '.join(entries)}] names neither it nor a network "
                           f"holding it")


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


# ----------------------------------------------------------- resolved at send time, pinned
class Resolver:
    """An injected DNS: ``answers`` per host, one list per call (the last one repeats)."""

    def __init__(self, **answers: list[list[str]]) -> None:
        self.answers = {host.replace("_", "."): list(a) for host, a in answers.items()}
        self.calls: list[tuple[str, int]] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        script = self.answers.get(host)
        if not script:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return script.pop(0) if len(script) > 1 else script[0]


def queued(f: Fleetlet, url: str, entries: list[str]) -> WebhookAllowList:
    """A firing alert whose delivery to ``url`` is pending under the list ``entries``."""
    narrow(f, entries)
    allow = f.fleet.settings.webhook_allow_list
    assert allow is not None
    with atomic(f.fleet.engine) as conn:
        create_rule(conn, rule(url), actor=PUBLISHER, now=START, allow=allow)
    failing_device(f)
    [fired] = evaluate_alerts(f.fleet, now=START)
    assert (fired.after, fired.webhook) == ("firing", True)
    return allow


def send_due(f: Fleetlet, allow: WebhookAllowList, resolver: Resolver,
             transport: httpx.BaseTransport | None = None) -> int:
    sender = WebhookSender(f.fleet.engine, clock=f.clock, allow=allow, resolver=resolver,
                           transport=transport)
    try:
        return sender.deliver_due()
    finally:
        sender.stop()


def test_a_name_resolving_to_an_internal_address_is_refused_and_logged(
        fleetlet: Fleetlet, receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    f = fleetlet
    port = receiver.port
    dns = Resolver(hooks_example_com=[["127.0.0.1"]])
    allow = queued(f, f"http://hooks.example.com:{port}/hooks/edgefleet",
                   ["hooks.example.com"])
    assert dns.calls == []  # creating the rule and queueing resolve nothing
    with caplog.at_level(logging.WARNING, logger="fleet_server.monitoring.webhooks"):
        assert send_due(f, allow, dns) == 0
    assert receiver.paths == [] and dns.calls == [("hooks.example.com", port)]
    why = ("not sent: hooks.example.com resolves to 127.0.0.1: 127.0.0.1 is a loopback "
           "address, and the server's webhook_allow list [hooks.example.com] names neither "
           "it nor a network holding it")
    assert deliveries(f) == [("failed", 1, why)]  # refused: no retry
    assert why in caplog.text


@pytest.mark.parametrize(("name", "cert_for", "delivered"), [
    ("certificate-for-the-name", "hooks.example.com", True),
    ("certificate-for-another-name", "other.example.com", False),
], ids=["certificate-for-the-name", "certificate-for-another-name"])
def test_https_to_the_checked_address_verifies_the_certificate_on_the_name(
        fleetlet: Fleetlet, name: str, cert_for: str, delivered: bool) -> None:
    """A real TLS receiver on loopback: the connection goes to 127.0.0.1, the TLS server
    name and the certificate check are on hooks.example.com."""
    f = fleetlet
    server_tls, client_tls = tls_pair(cert_for)
    receiver = Receiver([], tls=server_tls)
    try:
        dns = Resolver(hooks_example_com=[["127.0.0.1"]])
        allow = queued(f, f"https://hooks.example.com:{receiver.port}/hooks/edgefleet",
                       ["hooks.example.com", "127.0.0.1"])
        got = send_due(f, allow, dns, httpx.HTTPTransport(verify=client_tls))
    finally:
        receiver.close()
    [(status, tries, error)] = deliveries(f)
    if delivered:
        assert (got, status, error) == (1, "delivered", None)
        assert receiver.received[0][2]["Host"] == f"hooks.example.com:{receiver.port}"
    else:  # a certificate error is an error like any other: retried, never sent
        assert (got, status, tries, receiver.received) == (0, "pending", 1, [])
        assert error is not None and "certificate verify failed" in error


def test_a_named_network_lets_the_name_through_to_the_checked_address(
        fleetlet: Fleetlet, receiver: Receiver) -> None:
    """No real DNS says hooks.example.com is 127.0.0.1: the request reaching the receiver
    went to the address the resolver gave, with the name kept in the Host header."""
    f = fleetlet
    port = receiver.port
    dns = Resolver(hooks_example_com=[["127.0.0.1"]])
    allow = queued(f, f"http://hooks.example.com:{port}/hooks/edgefleet",
                   ["hooks.example.com", "127.0.0.0/8"])
    assert send_due(f, allow, dns) == 1
    [(status, body, headers, path)] = receiver.received
    assert (status, path, body["event"]) == (200, "/hooks/edgefleet", "firing")
    assert headers["Host"] == f"hooks.example.com:{port}"
    assert len(dns.calls) == 1
    assert deliveries(f) == [("delivered", 1, None)]


def test_the_next_checked_address_is_tried_when_one_does_not_connect(
        fleetlet: Fleetlet, receiver: Receiver) -> None:
    """Like ``socket.create_connection``: nothing listens on 127.0.0.2 (the receiver is bound
    to 127.0.0.1), so the same attempt goes on to the second address."""
    f = fleetlet
    dns = Resolver(hooks_example_com=[["127.0.0.2", "127.0.0.1"]])
    allow = queued(f, f"http://hooks.example.com:{receiver.port}/hooks/edgefleet",
                   ["hooks.example.com", "127.0.0.0/8"])
    assert send_due(f, allow, dns) == 1
    assert receiver.paths == ["/hooks/edgefleet"] and len(dns.calls) == 1
    assert deliveries(f) == [("delivered", 1, None)]


class Capture(httpx.BaseTransport):
    """Answers 200 and keeps each request (no network)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200)


def test_the_post_goes_to_the_address_checked_not_to_a_second_answer(
        fleetlet: Fleetlet) -> None:
    """DNS rebinding: the name answers a public address, then a loopback one. The name is
    resolved once per attempt and the request is made to that answer; for https, the TLS
    server name and certificate check stay on the name."""
    f = fleetlet
    dns = Resolver(hooks_example_com=[["93.184.215.14"], ["127.0.0.1"]])
    allow = queued(f, "https://hooks.example.com/hooks/edgefleet", ["hooks.example.com"])
    http = Capture()
    assert send_due(f, allow, dns, http) == 1
    [request] = http.requests
    assert str(request.url) == "https://93.184.215.14/hooks/edgefleet"
    assert request.headers["Host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert dns.calls == [("hooks.example.com", 443)]


class TimesOutOn(Capture):
    """Answers 200, except a connect timeout for requests to ``host`` (a dropped route)."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == self.host:
            self.requests.append(request)
            raise httpx.ConnectTimeout("timed out", request=request)
        return super().handle_request(request)


def test_a_connect_timeout_goes_on_to_the_next_checked_address(fleetlet: Fleetlet) -> None:
    """A dual-stack receiver whose IPv6 route silently drops: the same attempt goes on to
    the IPv4 address, as a connection by name would."""
    f = fleetlet
    dns = Resolver(hooks_example_com=[["2001:4860::1", "93.184.215.14"]])
    allow = queued(f, "https://hooks.example.com/x", ["hooks.example.com"])
    http = TimesOutOn("2001:4860::1")
    assert send_due(f, allow, dns, http) == 1
    assert [r.url.host for r in http.requests] == ["2001:4860::1", "93.184.215.14"]
    assert deliveries(f) == [("delivered", 1, None)]


def test_one_internal_address_in_the_answer_refuses_the_delivery(fleetlet: Fleetlet) -> None:
    f = fleetlet
    dns = Resolver(hooks_example_com=[["93.184.215.14", "10.0.0.5"]])
    allow = queued(f, "https://hooks.example.com/x", ["hooks.example.com"])
    http = Capture()
    assert send_due(f, allow, dns, http) == 0
    assert http.requests == []
    [(status, tries, error)] = deliveries(f)
    assert (status, tries) == ("failed", 1)
    assert error is not None and "resolves to 10.0.0.5: 10.0.0.5 is a private address" in error


def test_a_name_that_does_not_resolve_is_retried(fleetlet: Fleetlet) -> None:
    f = fleetlet
    dns = Resolver()  # nothing resolves
    allow = queued(f, "https://hooks.example.com/x", ["hooks.example.com"])
    http = Capture()
    assert send_due(f, allow, dns, http) == 0
    [(status, tries, error)] = deliveries(f)
    assert (status, tries) == ("pending", 1)
    assert error is not None and error.startswith("not sent: hooks.example.com does not "
                                                  "resolve")
    dns.answers["hooks.example.com"] = [["93.184.215.14"]]
    f.clock.now = START + 5  # the first retry is due 5 s later
    assert send_due(f, allow, dns, http) == 1
    assert [str(r.url) for r in http.requests] == ["https://93.184.215.14/x"]


def test_an_ip_address_in_the_url_is_checked_without_dns(fleetlet: Fleetlet,
                                                         receiver: Receiver) -> None:
    f = fleetlet
    dns = Resolver()
    allow = queued(f, receiver.url, [receiver.url])  # a prefix naming 127.0.0.1
    assert send_due(f, allow, dns) == 1
    assert receiver.paths == ["/hooks/edgefleet"] and dns.calls == []


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

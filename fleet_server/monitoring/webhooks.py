"""Alert webhooks: POST each queued delivery from one worker thread, with retries (adapter).

The alert evaluation queues a delivery (a row of ``alert_webhooks``: URL, canonical JSON
payload, ``pending``) in the transaction that changes the alert, and calls
:meth:`WebhookSender.notify`, which only sets an event. The sender's thread then POSTs the
payload with httpx (``Content-Type: application/json``):

- a 2xx answer delivers it;
- a 4xx other than 408 and 429 is fatal (the receiver refuses this payload; retrying cannot
  help): ``failed`` at once;
- anything else (5xx, 408, 429, no answer, a timeout) is transient: it is tried again after
  :func:`backoff_s` (5 s, 10 s, 20 s, ... capped at 10 minutes), ``failed`` after
  ``max_attempts``.

Right before each POST the URL is checked against the server's ``webhook_allow`` list
(:mod:`fleet_server.monitoring.allowlist`), given as ``allow``: a delivery queued before the
list was narrowed fails without a request (one attempt row saying why). With a list, the
host is then resolved once through the injected ``resolver``, every address is checked, and
the POST connects to the checked address (:func:`~fleet_server.monitoring.webhook_target.pin`):
an internal address the list does not name fails the delivery without a request, a name that
does not resolve is retried like any transient error. Both are logged and recorded on the
delivery (``last_error``) and its attempt row. Redirects are never followed, so an allowed
receiver cannot bounce the POST elsewhere; connections are not reused, so one made for one
name never carries a POST for another.

Every attempt is a row of ``webhook_attempts`` (when, HTTP status or error). Deliveries of one
alert to one URL go out in order: a resolve never overtakes the fire it follows. Pending
deliveries survive a restart (the next sender picks them up). Time comes from the injected
clock, and the waits between retries go through the injected ``sleep`` (tests advance a fake
clock instead of sleeping); with nothing due the thread sleeps until notified.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
from sqlalchemy import Engine, insert, select, update

from fleet_server.db import atomic, tables
from fleet_server.db.engine import reading
from fleet_server.errors import FleetError
from fleet_server.monitoring.allowlist import WebhookAllowList
from fleet_server.monitoring.webhook_target import (
    Resolver,
    Target,
    WebhookTargetError,
    pin,
    system_resolver,
)

__all__ = ["BACKOFF_BASE_S", "BACKOFF_CAP_S", "MAX_ATTEMPTS", "WebhookSender", "backoff_s",
           "is_fatal"]

log = logging.getLogger(__name__)

#: the first retry's delay; each next one doubles
BACKOFF_BASE_S: Final = 5.0
#: the longest delay between two attempts
BACKOFF_CAP_S: Final = 600.0
#: attempts before a delivery is given up (``failed``)
MAX_ATTEMPTS: Final = 8
_USER_AGENT: Final = "edgefleet-alerts/1"


def backoff_s(attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): ``5 * 2**(n-1)``,
    at most :data:`BACKOFF_CAP_S`.

    Raises:
        ValueError: ``attempt`` < 1.
    """
    if attempt < 1:
        raise ValueError(f"attempt: expected >= 1, got {attempt}")
    return float(min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(attempt - 1, 30)))


def is_fatal(status: int) -> bool:
    """Whether an HTTP status means the receiver refuses the payload for good."""
    return 400 <= status < 500 and status not in (408, 429)


class WebhookSender:
    """Delivers queued alert webhooks from its own thread (module docstring).

    Args:
        engine: the fleet's database.
        clock: unix seconds (injected in tests).
        sleep: waits that many seconds between retries; default: an interruptible wait that
            :meth:`notify` and :meth:`stop` cut short.
        transport: an httpx transport (tests may inject one; default: the network).
        timeout_s: per request (connect, read, write each).
        max_attempts: attempts before a delivery fails.
        allow: the server's ``webhook_allow`` list (None: any URL, no address check; see
            ``Settings.webhook_allow_list``).
        resolver: resolves a URL's host when ``allow`` is set (default: the system's
            ``getaddrinfo``; tests inject one).
    """

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] | None = None,
                 transport: httpx.BaseTransport | None = None, timeout_s: float = 10.0,
                 max_attempts: int = MAX_ATTEMPTS,
                 allow: WebhookAllowList | None = None,
                 resolver: Resolver = system_resolver) -> None:
        self._engine = engine
        self._clock = clock
        self._wake = threading.Event()
        self._sleep = sleep or self._wake.wait
        self._transport = transport
        self._timeout_s = timeout_s
        self._http: httpx.Client | None = None  # made at the first attempt
        self._max_attempts = max_attempts
        self._allow = allow
        self._resolve = resolver
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the worker thread (once).

        Raises:
            RuntimeError: it is already running.
        """
        if self._thread is not None:
            raise RuntimeError("the webhook sender is already running")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgefleet-webhooks",
                                        daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """Deliveries were queued: wake the thread (never blocks)."""
        self._wake.set()

    def stop(self, timeout: float | None = 15.0) -> None:
        """Stop the thread after the attempt in flight, if any; close the HTTP client."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                self.deliver_due()
                due = self._next_due()
            except FleetError as exc:  # the database failed: try again in a while
                log.error("webhook deliveries: %s", exc)
                due = int(self._clock()) + int(BACKOFF_BASE_S)
            if self._stopping:
                return
            if due is None:
                self._wake.wait()
                continue
            delay = due - self._clock()
            if delay > 0:
                self._sleep(delay)

    def _next_due(self) -> int | None:
        w = tables.alert_webhooks.c
        with reading(self._engine) as conn:
            due = conn.execute(select(w.next_at).where(w.status == "pending")
                               .order_by(w.next_at).limit(1)).scalar()
        return None if due is None else int(due)

    def deliver_due(self) -> int:
        """Try every pending delivery that is due now, in order; return how many were
        delivered. Also callable without the thread.

        Raises:
            StoreError: the database failed.
        """
        w = tables.alert_webhooks.c
        with reading(self._engine) as conn:
            pending = conn.execute(select(w.id, w.alert_id, w.url, w.payload, w.attempts,
                                          w.next_at).where(w.status == "pending")
                                   .order_by(w.id)).all()
        blocked: set[tuple[int, str]] = set()
        delivered = 0
        for row in pending:
            key = (int(row.alert_id), str(row.url))
            if key in blocked or row.next_at > self._clock():
                blocked.add(key)  # later deliveries of this alert and URL wait for it
                continue
            if self._attempt(row):
                delivered += 1
            else:
                blocked.add(key)
        return delivered

    @staticmethod
    def _post(http: httpx.Client, row: Any, target: Target | None) -> httpx.Response:
        """POST ``row``'s payload to its URL, or to ``target`` (its URL pinned to an address).

        Raises:
            httpx.HTTPError: no answer (caught by the caller).
        """
        headers = {"Content-Type": "application/json"}
        if target is None:
            return http.post(row.url, content=row.payload.encode("utf-8"), headers=headers)
        headers["Host"] = target.host_header
        return http.post(target.url, content=row.payload.encode("utf-8"), headers=headers,
                         extensions=target.extensions())

    def _attempt(self, row: Any) -> bool:
        attempt = int(row.attempts) + 1
        status: int | None = None
        error: str | None = None
        http = self._http
        if http is None:
            http = self._http = httpx.Client(transport=self._transport, timeout=self._timeout_s,
                                      follow_redirects=False, trust_env=False,
                                      limits=httpx.Limits(max_keepalive_connections=0),
                                      headers={"User-Agent": _USER_AGENT})
        refused = self._allow is not None and not self._allow.allows(row.url)
        targets: list[Target | None] = [None]  # None: the URL as it is (no list)
        if refused:
            entries = self._allow.entries if self._allow is not None else ()
            error = (f"not sent: the URL is outside the server's webhook_allow list "
                     f"[{', '.join(entries)}]")
        elif self._allow is not None:
            try:
                targets = list(pin(row.url, self._allow, self._resolve))
            except WebhookTargetError as exc:
                error, refused = str(exc)[:500], not exc.transient
                log.warning("alert webhook %s to %s: %s", row.id, row.url, error)
        if error is None:
            for target in targets:  # the checked addresses in order, while none connects
                try:
                    response = self._post(http, row, target)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # nothing sent:
                    # the next address may do (a dual-stack receiver whose IPv6 route drops)
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    continue
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"[:500]
                    break
                status = response.status_code
                error = None if 200 <= status < 300 else f"HTTP {status}: {response.text[:200]}"
                break
        now = int(self._clock())
        ok = error is None
        if ok:
            state, next_at = "delivered", now
        elif refused or (status is not None and is_fatal(status)) or \
                attempt >= self._max_attempts:
            state, next_at = "failed", now
        else:
            state, next_at = "pending", now + int(backoff_s(attempt))
        w = tables.alert_webhooks
        with atomic(self._engine) as conn:
            conn.execute(insert(tables.webhook_attempts).values(
                webhook_id=row.id, attempt=attempt, at=now, status_code=status, error=error))
            conn.execute(update(w).where(w.c.id == row.id).values(
                status=state, attempts=attempt, next_at=next_at, last_error=error,
                done_at=None if state == "pending" else now))
        if state == "failed":
            log.warning("alert webhook %s to %s failed after %d attempt(s): %s", row.id,
                        row.url, attempt, error)
        return ok

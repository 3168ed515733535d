"""Alert rules: what they say, when they hold, and the alert state machine (pure).

A rule watches one model (one version, or all of them) and judges every device on the records
it sent in the last ``window_s`` seconds, folded with the rollout gates' aggregation
(:class:`fleet_server.rollout.health.Accumulator`):

=============  ===========================================================================
kind           a device is over the threshold when
=============  ===========================================================================
drift_psi      its largest input-feature PSI of any drift window > ``threshold``, over
               windows covering >= ``min_samples`` predictions
error_rate     errors / requests > ``threshold`` (0..1), with >= ``min_samples`` requests
p95_latency    its p95 latency > ``threshold`` ms, or, without a threshold, > its device
               profile's ``latency_budget_ms``; with >= ``min_samples`` requests
=============  ===========================================================================

The rule *holds* when at least ``min_devices`` devices are over. An alert is one episode of a
rule holding; its states follow ONE transition table (:data:`TRANSITIONS`, STYLE rule 3)::

    (none)  --holds-->  pending  --held for_s-->  firing  --clears-->  resolved
       \\---held (for_s = 0)--------------------->/   pending --clears--> resolved (never fired)

Events come from :func:`event_for` (the condition now, when it began, ``for_s``). While an
alert is open, each evaluation that holds refreshes its devices and values; when it resolves it
keeps the last ones that held. Rule fields are checked by :meth:`AlertRule.check`
(:class:`~fleet_server.errors.InvalidInput` names the field, expected against actual).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final
from urllib.parse import urlsplit

from fleet_server.errors import InvalidInput
from fleet_server.rollout.health import Accumulator

__all__ = [
    "KINDS",
    "OPEN",
    "STATES",
    "TRANSITIONS",
    "AlertRule",
    "Breach",
    "Event",
    "event_for",
    "judge",
    "next_state",
    "summary",
]

#: rule kinds
KINDS: Final = ("drift_psi", "error_rate", "p95_latency")
#: alert states
STATES: Final = ("pending", "firing", "resolved")
#: states of an alert that is still open (at most one per rule)
OPEN: Final = ("pending", "firing")
_MAX_WINDOW_S: Final = 7 * 86400
_MAX_FOR_S: Final = 30 * 86400


class Event(enum.Enum):
    HOLDS = "holds"  # the condition holds, not yet for for_s
    HELD = "held"  # the condition has held for for_s
    CLEARS = "clears"  # the condition does not hold


#: (state of the rule's open alert, or None, event) -> next state (None: no alert)
TRANSITIONS: Final[Mapping[tuple[str | None, Event], str | None]] = {
    (None, Event.HOLDS): "pending",
    (None, Event.HELD): "firing",
    (None, Event.CLEARS): None,
    ("pending", Event.HOLDS): "pending",
    ("pending", Event.HELD): "firing",
    ("pending", Event.CLEARS): "resolved",
    ("firing", Event.HOLDS): "firing",
    ("firing", Event.HELD): "firing",
    ("firing", Event.CLEARS): "resolved",
}


def event_for(holds: bool, started_at: int | None, now: int, for_s: int) -> Event:
    """The event of one evaluation: ``started_at`` is when the open alert's condition began
    (None without an open alert: it begins now)."""
    if not holds:
        return Event.CLEARS
    began = now if started_at is None else started_at
    return Event.HELD if now - began >= for_s else Event.HOLDS


def next_state(state: str | None, event: Event) -> str | None:
    """Raises: ValueError: ``state`` is not an open state or None (a resolved alert is never
    stepped again: the next episode is a new alert)."""
    if (state, event) not in TRANSITIONS:
        raise ValueError(f"alert state: expected one of {', '.join(OPEN)} or None, got "
                         f"{state!r}")
    return TRANSITIONS[(state, event)]


@dataclass(frozen=True)
class AlertRule:
    """One rule (a row of ``alert_rules``); ``id`` is 0 before it is stored."""

    id: int
    model: str
    kind: str
    threshold: float | None
    version: str | None = None
    min_devices: int = 1
    for_s: int = 0
    window_s: int = 300
    min_samples: int = 100
    webhook_url: str | None = None

    def check(self) -> AlertRule:
        """Return self if every field is valid.

        Raises:
            InvalidInput: a field is out of range (the message names it).
        """
        def bad(name: str, expected: str, got: object) -> InvalidInput:
            return InvalidInput(f"{name}: expected {expected}, got {got!r}")

        if not self.model or len(self.model) > 200:
            raise bad("model", "a name of 1..200 characters", self.model)
        if self.version is not None and not 0 < len(self.version) <= 100:
            raise bad("version", "a version of 1..100 characters or null", self.version)
        if self.kind not in KINDS:
            raise bad("kind", " | ".join(KINDS), self.kind)
        t = self.threshold
        finite = isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
        if self.kind == "drift_psi" and not (finite and t is not None and t > 0):
            raise bad("threshold", "a PSI > 0 for a drift_psi rule (0.25: a significant "
                      "shift)", t)
        if self.kind == "error_rate" and not (finite and t is not None and 0 <= t < 1):
            raise bad("threshold", "an error rate in [0, 1) for an error_rate rule", t)
        if self.kind == "p95_latency" and t is not None and not (finite and t > 0):
            raise bad("threshold", "milliseconds > 0, or null for each device profile's "
                      "latency budget", t)
        for name, value, low, high in (("min_devices", self.min_devices, 1, 1_000_000),
                                       ("for_s", self.for_s, 0, _MAX_FOR_S),
                                       ("window_s", self.window_s, 10, _MAX_WINDOW_S),
                                       ("min_samples", self.min_samples, 1, 1 << 40)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise bad(name, f"an integer in {low}..{high}", value)
        if self.webhook_url is not None:
            parts = urlsplit(self.webhook_url)
            if parts.scheme not in ("http", "https") or not parts.hostname or \
                    len(self.webhook_url) > 2000:
                raise bad("webhook_url", "an http:// or https:// URL of at most 2000 "
                          "characters", self.webhook_url)
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Breach:
    """One device over a rule's threshold: its value, the limit it broke, what it is based
    on (requests, or predictions for drift)."""

    device: str
    value: float
    limit: float
    samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def judge(rule: AlertRule, devices: Mapping[str, Accumulator],
          budgets: Mapping[str, float | None]) -> list[Breach]:
    """The devices over ``rule``'s threshold, worst first.

    Args:
        devices: per device, its records of the rule's model (and version) in the window.
        budgets: per device, its profile's latency budget in ms (p95_latency rules without a
            threshold; a device without one is never judged).
    """
    out = []
    for device, acc in devices.items():
        value: float | None
        limit: float | None = rule.threshold
        if rule.kind == "drift_psi":
            value, samples = acc.max_psi, acc.samples
        elif rule.kind == "error_rate":
            value, samples = acc.error_rate, acc.requests
        else:
            value, samples = acc.percentile("p95"), acc.requests
            if limit is None:
                limit = budgets.get(device)
        if value is None or limit is None or samples < rule.min_samples:
            continue
        if value > limit:
            out.append(Breach(device, value, float(limit), samples))
    return sorted(out, key=lambda b: (-b.value, b.device))


_WHAT = {"drift_psi": "input PSI", "error_rate": "error rate", "p95_latency": "p95 latency"}


def _value(kind: str, value: float) -> str:
    if kind == "error_rate":
        return f"{value:.2%}"
    if kind == "p95_latency":
        return f"{value:g} ms"
    return f"{value:.3g}"


def summary(rule: AlertRule, breaches: list[Breach]) -> str:
    """One line saying what holds: e.g. ``2 device(s) with input PSI over 0.2 (at least 1
    needed) in the last 300 s: pi-2 1.31, pi-3 0.41``."""
    if rule.threshold is not None:
        over = _value(rule.kind, rule.threshold)
    else:
        over = "the profile's latency budget"
    shown = ", ".join(f"{b.device} {_value(rule.kind, b.value)}" for b in breaches[:5])
    more = f" and {len(breaches) - 5} more" if len(breaches) > 5 else ""
    return (f"{len(breaches)} device(s) with {_WHAT[rule.kind]} over {over} (at least "
            f"{rule.min_devices} needed) in the last {rule.window_s} s"
            + (f": {shown}{more}" if breaches else ""))

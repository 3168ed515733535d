"""MQTT topics: names, parsing, and who may touch which (the ACL rule, as a pure function).

Every topic lives under ``edgefleet/v1/devices/{device_id}/{kind}``::

    kind        direction          retained  what
    desired     server -> device   yes       signed desired state (agent.protocol.signed)
    ack         server -> device   no        highest contiguous telemetry/drift seq stored
    reported    device -> server   yes       what runs, last result and error
    status      device -> server   yes       online/offline (offline is the last will)
    telemetry   device -> server   no        sequence-numbered records
    drift       device -> server   no        sequence-numbered drift summaries

A device authenticates with its device id as MQTT username and may publish only its own
``reported|status|telemetry|drift`` and subscribe only to its own ``desired|ack``, without
wildcards. The server user may do anything under ``edgefleet/v1/``. :func:`may_access` is that
rule for the embedded broker; :func:`mosquitto_acl` renders the same rule as a Mosquitto
``acl_file`` with ``%u`` patterns.

Errors: :class:`TopicError` (an :class:`agent.protocol.ProtocolError`, so a ``ValueError``) for
a topic or device id that is not ours.
Pure: standard library only.
"""

from __future__ import annotations

import re
from typing import TypeGuard

from agent.protocol._errors import ProtocolError

__all__ = [
    "DEVICES_PREFIX",
    "DEVICE_ID_PATTERN",
    "DEVICE_PUBLISHES",
    "DEVICE_SUBSCRIBES",
    "KINDS",
    "TOPIC_ROOT",
    "TopicError",
    "ack_topic",
    "check_device_id",
    "desired_topic",
    "device_topic",
    "drift_topic",
    "is_valid_device_id",
    "may_access",
    "mosquitto_acl",
    "parse_topic",
    "reported_topic",
    "server_subscriptions",
    "status_topic",
    "subscription_filter",
    "telemetry_topic",
]

#: everything edgefleet publishes or subscribes to starts with this
TOPIC_ROOT = "edgefleet/v1/"
DEVICES_PREFIX = "edgefleet/v1/devices/"
#: every per-device topic kind
KINDS = ("desired", "reported", "status", "telemetry", "drift", "ack")
#: what a device may publish (under its own id)
DEVICE_PUBLISHES = ("reported", "status", "telemetry", "drift")
#: what a device may subscribe to (under its own id, no wildcards)
DEVICE_SUBSCRIBES = ("desired", "ack")
#: a device id is also its MQTT username: lowercase, digits and dashes, 1..63 characters
DEVICE_ID_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
_DEVICE_ID = re.compile(DEVICE_ID_PATTERN)


class TopicError(ProtocolError):
    """A topic or device id is not one of ours. Names the thing, expected against actual."""

    def __init__(self, what: str, expected: str, actual: object) -> None:
        self.what = what
        self.expected = expected
        self.actual = actual
        shown = repr(actual)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"{what}: expected {expected}, got {shown}")


# ---------------------------------------------------------------------------------------------
# device ids and topic names
# ---------------------------------------------------------------------------------------------
def is_valid_device_id(device_id: object) -> TypeGuard[str]:
    """True when ``device_id`` is a usable device id (and hence a safe topic level).

    The id must fully match :data:`DEVICE_ID_PATTERN`, which rules out the MQTT wildcards
    ``+`` and ``#``, the level separator ``/``, upper case, and a trailing newline.
    """
    return isinstance(device_id, str) and _DEVICE_ID.fullmatch(device_id) is not None


def check_device_id(device_id: object) -> str:
    """Return ``device_id`` unchanged if valid.

    Raises:
        TopicError: it is not a string matching :data:`DEVICE_ID_PATTERN`.
    """
    if not is_valid_device_id(device_id):
        raise TopicError("device id", f"a string matching {DEVICE_ID_PATTERN}", device_id)
    return device_id


def device_topic(device_id: str, kind: str) -> str:
    """The topic of one ``kind`` for one device, e.g. ``edgefleet/v1/devices/d1/desired``.

    Raises:
        TopicError: the device id is invalid or ``kind`` is not one of :data:`KINDS`.
    """
    check_device_id(device_id)
    if kind not in KINDS:
        raise TopicError("topic kind", "one of " + ", ".join(KINDS), kind)
    return f"{DEVICES_PREFIX}{device_id}/{kind}"


def desired_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/desired``.

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "desired")


def reported_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/reported``.

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "reported")


def status_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/status`` (also the last-will topic).

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "status")


def telemetry_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/telemetry``.

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "telemetry")


def drift_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/drift``.

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "drift")


def ack_topic(device_id: str) -> str:
    """``edgefleet/v1/devices/{device_id}/ack``.

    Raises:
        TopicError: the device id is invalid.
    """
    return device_topic(device_id, "ack")


def parse_topic(topic: str) -> tuple[str, str]:
    """Split a concrete per-device topic into ``(device_id, kind)``.

    Raises:
        TopicError: the topic is not ``edgefleet/v1/devices/{valid id}/{known kind}`` exactly
            (other prefix, extra or missing levels, wildcards, bad id, unknown kind).
    """
    if not isinstance(topic, str) or not topic.startswith(DEVICES_PREFIX):
        raise TopicError("topic", f"a topic under {DEVICES_PREFIX}", topic)
    levels = topic[len(DEVICES_PREFIX):].split("/")
    if len(levels) != 2:
        raise TopicError("topic", f"{DEVICES_PREFIX}{{device_id}}/{{kind}}", topic)
    device_id, kind = levels
    if not is_valid_device_id(device_id):
        raise TopicError(f"device id in topic {topic!r}",
                         f"a string matching {DEVICE_ID_PATTERN}", device_id)
    if kind not in KINDS:
        raise TopicError(f"kind in topic {topic!r}", "one of " + ", ".join(KINDS), kind)
    return device_id, kind


def subscription_filter(kind: str) -> str:
    """The all-devices filter for one kind, e.g. ``edgefleet/v1/devices/+/reported``.

    Raises:
        TopicError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise TopicError("topic kind", "one of " + ", ".join(KINDS), kind)
    return f"{DEVICES_PREFIX}+/{kind}"


def server_subscriptions() -> tuple[str, ...]:
    """The filters the fleet server subscribes to: every device-published kind."""
    return tuple(subscription_filter(kind) for kind in DEVICE_PUBLISHES)


# ---------------------------------------------------------------------------------------------
# the ACL rule
# ---------------------------------------------------------------------------------------------
def _valid_topic_name(topic: str) -> bool:
    """An MQTT topic *name* (what one publishes to): non-empty, no wildcards, no NUL."""
    return bool(topic) and not any(c in topic for c in "+#\0")


def _valid_topic_filter(topic: str) -> bool:
    """An MQTT topic *filter*: ``+`` fills a whole level, ``#`` only as the whole last level."""
    if not topic or "\0" in topic:
        return False
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def may_access(username: str, topic: str, *, publish: bool, server_user: str) -> bool:
    """The edgefleet ACL: may ``username`` publish to / subscribe to ``topic``?

    - ``server_user`` may publish to any topic name and subscribe to any filter (wildcards
      allowed) under ``edgefleet/v1/``, and nothing outside it.
    - any other user is a device whose username is its device id: it may publish only
      ``edgefleet/v1/devices/{username}/{reported|status|telemetry|drift}`` and subscribe only
      to ``edgefleet/v1/devices/{username}/{desired|ack}``, exactly: a subscription with ``+``
      or ``#`` is refused even when it would match only its own topics.
    - an empty or invalid username, and malformed topics, get nothing.

    Args:
        username: the authenticated MQTT username of the client.
        topic: the topic name (publish) or topic filter (subscribe).
        publish: True for a publish, False for a subscribe.
        server_user: the fleet server's MQTT username.

    Raises:
        ValueError: ``server_user`` is empty (it would grant everything to a client with
            an empty username).
    """
    if not server_user:
        raise ValueError("may_access: server_user must be a non-empty username")
    if not username:
        return False
    if username == server_user:
        ok = _valid_topic_name(topic) if publish else _valid_topic_filter(topic)
        return ok and topic.startswith(TOPIC_ROOT) and len(topic) > len(TOPIC_ROOT)
    if not is_valid_device_id(username) or not _valid_topic_name(topic):
        return False  # also refuses every wildcard in a device's subscription
    try:
        device_id, kind = parse_topic(topic)
    except TopicError:
        return False
    if device_id != username:
        return False
    return kind in (DEVICE_PUBLISHES if publish else DEVICE_SUBSCRIBES)


def mosquitto_acl(server_user: str) -> str:
    """Render :func:`may_access` as a Mosquitto ``acl_file``.

    Devices get ``pattern`` lines with ``%u`` (Mosquitto refuses to substitute a username
    holding ``+``, ``#`` or ``/``); the server user gets ``readwrite edgefleet/v1/#``. Anything
    not granted is denied. One difference in form, not effect: Mosquitto lets a device
    *subscribe* with a wildcard but delivers only messages its ``read`` patterns allow, where
    :func:`may_access` refuses the subscription outright.

    Raises:
        ValueError: ``server_user`` is empty or holds whitespace, control characters, ``+``,
            ``#`` or ``/`` (it would corrupt the file or never match).
    """
    if not server_user or any(c.isspace() or not c.isprintable() or c in "+#/"
                              for c in server_user):
        raise ValueError(
            f"mosquitto_acl: server_user must be a printable name without whitespace, "
            f"'+', '#' or '/', got {server_user!r}")
    lines = [
        "# edgefleet MQTT ACL (generated by agent.protocol.topics.mosquitto_acl; do not edit)",
        "# devices: the username is the device id",
    ]
    lines += [f"pattern write {DEVICES_PREFIX}%u/{kind}" for kind in DEVICE_PUBLISHES]
    lines += [f"pattern read {DEVICES_PREFIX}%u/{kind}" for kind in DEVICE_SUBSCRIBES]
    lines += [
        "",
        "# the fleet server",
        f"user {server_user}",
        f"topic readwrite {TOPIC_ROOT}#",
    ]
    return "\n".join(lines) + "\n"

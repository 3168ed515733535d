"""agent.protocol.topics: names, parsing, the ACL rule and its Mosquitto rendering."""

from __future__ import annotations

import pytest

from agent.protocol import topics
from agent.protocol.topics import (
    DEVICE_PUBLISHES,
    DEVICE_SUBSCRIBES,
    KINDS,
    TopicError,
    check_device_id,
    device_topic,
    is_valid_device_id,
    may_access,
    mosquitto_acl,
    parse_topic,
    server_subscriptions,
    subscription_filter,
)

SERVER = "fleet-server"

# ---------------------------------------------------------------------------------------------
# device ids
# ---------------------------------------------------------------------------------------------
DEVICE_IDS = [
    ("simple", "dev-1", True),
    ("one char", "a", True),
    ("digits first", "0rpi", True),
    ("63 chars", "a" * 63, True),
    ("64 chars", "a" * 64, False),
    ("empty", "", False),
    ("leading dash", "-dev", False),
    ("upper case", "Dev1", False),
    ("plus wildcard", "dev+1", False),
    ("hash wildcard", "dev#", False),
    ("slash", "dev/1", False),
    ("trailing newline", "dev1\n", False),
    ("underscore", "dev_1", False),
    ("space", "dev 1", False),
    ("nul", "dev\0", False),
    ("not a string", 7, False),
]


@pytest.mark.parametrize(("device_id", "valid"), [(d, v) for _, d, v in DEVICE_IDS],
                         ids=[name for name, _, _ in DEVICE_IDS])
def test_device_id_validity(device_id: object, valid: bool) -> None:
    assert is_valid_device_id(device_id) is valid
    if valid:
        assert check_device_id(device_id) == device_id
    else:
        with pytest.raises(TopicError, match="device id: expected a string matching"):
            check_device_id(device_id)


# ---------------------------------------------------------------------------------------------
# builders and parser
# ---------------------------------------------------------------------------------------------
BUILDERS = [
    ("desired", topics.desired_topic),
    ("reported", topics.reported_topic),
    ("status", topics.status_topic),
    ("telemetry", topics.telemetry_topic),
    ("drift", topics.drift_topic),
    ("ack", topics.ack_topic),
]


@pytest.mark.parametrize(("kind", "build"), BUILDERS, ids=[k for k, _ in BUILDERS])
def test_builders_round_trip_through_parse(kind: str, build: object) -> None:
    assert callable(build)
    topic = build("dev-1")
    assert topic == f"edgefleet/v1/devices/dev-1/{kind}"
    assert topic == device_topic("dev-1", kind)
    assert parse_topic(topic) == ("dev-1", kind)


def test_every_kind_has_a_builder() -> None:
    assert tuple(k for k, _ in BUILDERS) == KINDS


BAD_BUILDS = [
    ("bad device id", "Dev", "desired", "device id"),
    ("wildcard device id", "+", "desired", "device id"),
    ("unknown kind", "dev-1", "config", "topic kind"),
]


@pytest.mark.parametrize(("device_id", "kind", "what"), [r[1:] for r in BAD_BUILDS],
                         ids=[r[0] for r in BAD_BUILDS])
def test_device_topic_refuses(device_id: str, kind: str, what: str) -> None:
    with pytest.raises(TopicError, match=what):
        device_topic(device_id, kind)


BAD_TOPICS = [
    ("other root", "other/v1/devices/dev-1/desired", "topic under edgefleet/v1/devices/"),
    ("other version", "edgefleet/v2/devices/dev-1/desired", "topic under"),
    ("no kind", "edgefleet/v1/devices/dev-1", "{device_id}/{kind}"),
    ("extra level", "edgefleet/v1/devices/dev-1/desired/x", "{device_id}/{kind}"),
    ("trailing slash", "edgefleet/v1/devices/dev-1/desired/", "{device_id}/{kind}"),
    ("empty device", "edgefleet/v1/devices//desired", "device id in topic"),
    ("plus as device", "edgefleet/v1/devices/+/desired", "device id in topic"),
    ("hash as kind", "edgefleet/v1/devices/dev-1/#", "kind in topic"),
    ("unknown kind", "edgefleet/v1/devices/dev-1/config", "kind in topic"),
    ("upper-case kind", "edgefleet/v1/devices/dev-1/Desired", "kind in topic"),
    ("empty", "", "topic under"),
]


@pytest.mark.parametrize(("topic", "message"), [r[1:] for r in BAD_TOPICS],
                         ids=[r[0] for r in BAD_TOPICS])
def test_parse_topic_refuses(topic: str, message: str) -> None:
    with pytest.raises(TopicError) as info:
        parse_topic(topic)
    assert message in str(info.value)
    assert "expected" in str(info.value) and "got" in str(info.value)


def test_subscription_filters() -> None:
    assert subscription_filter("reported") == "edgefleet/v1/devices/+/reported"
    assert server_subscriptions() == tuple(
        f"edgefleet/v1/devices/+/{k}" for k in ("reported", "status", "telemetry", "drift"))
    with pytest.raises(TopicError, match="topic kind"):
        subscription_filter("nope")


# ---------------------------------------------------------------------------------------------
# the ACL rule
# ---------------------------------------------------------------------------------------------
P = "edgefleet/v1/devices/"
ACCESS = [
    # name, username, topic, publish, allowed
    ("device publishes own reported", "dev-1", P + "dev-1/reported", True, True),
    ("device publishes own status", "dev-1", P + "dev-1/status", True, True),
    ("device publishes own telemetry", "dev-1", P + "dev-1/telemetry", True, True),
    ("device publishes own drift", "dev-1", P + "dev-1/drift", True, True),
    ("device publishes own desired", "dev-1", P + "dev-1/desired", True, False),
    ("device publishes own ack", "dev-1", P + "dev-1/ack", True, False),
    ("device subscribes own desired", "dev-1", P + "dev-1/desired", False, True),
    ("device subscribes own ack", "dev-1", P + "dev-1/ack", False, True),
    ("device subscribes own reported", "dev-1", P + "dev-1/reported", False, False),
    ("device subscribes own telemetry", "dev-1", P + "dev-1/telemetry", False, False),
    ("device publishes other's reported", "dev-1", P + "dev-2/reported", True, False),
    ("device subscribes other's desired", "dev-1", P + "dev-2/desired", False, False),
    ("device id prefix of other", "dev-1", P + "dev-10/desired", False, False),
    ("device subscribes + for device", "dev-1", P + "+/desired", False, False),
    ("device subscribes own/+", "dev-1", P + "dev-1/+", False, False),
    ("device subscribes own/#", "dev-1", P + "dev-1/#", False, False),
    ("device subscribes #", "dev-1", "#", False, False),
    ("device subscribes root/#", "dev-1", "edgefleet/v1/#", False, False),
    ("device publishes to own/#", "dev-1", P + "dev-1/#", True, False),
    ("device publishes extra level", "dev-1", P + "dev-1/reported/x", True, False),
    ("device outside root", "dev-1", "other/dev-1/reported", True, False),
    ("device $SYS", "dev-1", "$SYS/broker/clients", False, False),
    ("invalid username", "Dev-1", P + "Dev-1/reported", True, False),
    ("username with plus", "dev+1", P + "dev+1/reported", True, False),
    ("empty username", "", P + "dev-1/reported", True, False),
    ("server publishes desired", SERVER, P + "dev-1/desired", True, True),
    ("server publishes ack", SERVER, P + "dev-1/ack", True, True),
    ("server subscribes + reported", SERVER, P + "+/reported", False, True),
    ("server subscribes root/#", SERVER, "edgefleet/v1/#", False, True),
    ("server publishes other v1 topic", SERVER, "edgefleet/v1/fleet/announce", True, True),
    ("server publishes with wildcard", SERVER, P + "+/desired", True, False),
    ("server subscribes #", SERVER, "#", False, False),
    ("server subscribes edgefleet/#", SERVER, "edgefleet/#", False, False),
    ("server outside root", SERVER, "other/topic", True, False),
    ("server v2", SERVER, "edgefleet/v2/devices/dev-1/desired", True, False),
    ("server bare root", SERVER, "edgefleet/v1/", True, False),
    ("server malformed filter", SERVER, "edgefleet/v1/dev#", False, False),
    ("server # not last", SERVER, "edgefleet/v1/#/x", False, False),
    ("server partial +", SERVER, "edgefleet/v1/devices/d+/x", False, False),
    ("server $SYS", SERVER, "$SYS/#", False, False),
]


@pytest.mark.parametrize(("username", "topic", "publish", "allowed"), [r[1:] for r in ACCESS],
                         ids=[r[0] for r in ACCESS])
def test_may_access(username: str, topic: str, publish: bool, allowed: bool) -> None:
    assert may_access(username, topic, publish=publish, server_user=SERVER) is allowed


def test_may_access_refuses_empty_server_user() -> None:
    with pytest.raises(ValueError, match="server_user"):
        may_access("", P + "dev-1/reported", publish=True, server_user="")


def test_mosquitto_acl_lines() -> None:
    text = mosquitto_acl(SERVER)
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines == [
        "pattern write edgefleet/v1/devices/%u/reported",
        "pattern write edgefleet/v1/devices/%u/status",
        "pattern write edgefleet/v1/devices/%u/telemetry",
        "pattern write edgefleet/v1/devices/%u/drift",
        "pattern read edgefleet/v1/devices/%u/desired",
        "pattern read edgefleet/v1/devices/%u/ack",
        f"user {SERVER}",
        "topic readwrite edgefleet/v1/#",
    ]
    assert text.endswith("\n")


@pytest.mark.parametrize("kind", KINDS)
def test_mosquitto_acl_agrees_with_may_access(kind: str) -> None:
    """Each device pattern, with %u filled in, grants exactly what may_access grants."""
    text = mosquitto_acl(SERVER)
    topic = device_topic("dev-1", kind)
    writes = f"pattern write {P}%u/{kind}" in text
    reads = f"pattern read {P}%u/{kind}" in text
    assert writes is may_access("dev-1", topic, publish=True, server_user=SERVER)
    assert reads is may_access("dev-1", topic, publish=False, server_user=SERVER)
    assert writes is (kind in DEVICE_PUBLISHES)
    assert reads is (kind in DEVICE_SUBSCRIBES)


BAD_SERVER_USERS = [
    ("empty", ""),
    ("space", "fleet server"),
    ("newline injection", "srv\ntopic readwrite #"),
    ("plus", "srv+"),
    ("hash", "srv#"),
    ("slash", "srv/1"),
]


@pytest.mark.parametrize("server_user", [u for _, u in BAD_SERVER_USERS],
                         ids=[n for n, _ in BAD_SERVER_USERS])
def test_mosquitto_acl_refuses_unsafe_server_user(server_user: str) -> None:
    with pytest.raises(ValueError, match="server_user"):
        mosquitto_acl(server_user)

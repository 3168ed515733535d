"""agent.protocol.messages: checked parsing, canonical bytes, unknown fields kept."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    Ack,
    DesiredState,
    DriftBatch,
    MessageError,
    Record,
    Reported,
    Status,
    TelemetryBatch,
    canonical_json,
    parse_device_message,
    parse_json,
)
from agent.protocol.topics import TopicError

SHA = "ab" * 32
DELETE = object()


def desired() -> dict[str, Any]:
    return {
        "schema_version": 1, "device_id": "dev-1", "sequence": 7, "issued_at": 1_000,
        "expires_at": 2_000,
        "models": [{"name": "digits", "version": "1.2.0", "target_path": "digits/1.2.0/model.onnx",
                    "manifest_target": "digits/1.2.0/manifest.json", "sha256": SHA,
                    "length": 1234, "profile": "rpi4-cpu"}],
    }


def reported() -> dict[str, Any]:
    return {
        "schema_version": 1, "device_id": "dev-1", "applied_sequence": 7,
        "running": [{"name": "digits", "version": "1.2.0", "sha256": SHA}],
        "state": "Committed", "last_result": "ok", "last_error": None,
        "agent_version": "0.1.0", "reported_at": 1_500,
    }


def status() -> dict[str, Any]:
    return {"schema_version": 1, "device_id": "dev-1", "online": True, "at": 1_500}


def batch() -> dict[str, Any]:
    return {
        "schema_version": 1, "device_id": "dev-1",
        "records": [{"seq": 3, "kind": "latency", "at": 1_500, "body": {"p50_ms": 1.5}},
                    {"seq": 5, "kind": "latency", "at": 1_510, "body": {"p50_ms": 1.7}}],
    }


def ack() -> dict[str, Any]:
    return {"schema_version": 1, "device_id": "dev-1", "stream": "telemetry", "upto_seq": 5}


KINDS: list[tuple[str, type[Any], Callable[[], dict[str, Any]]]] = [
    ("desired", DesiredState, desired),
    ("reported", Reported, reported),
    ("status", Status, status),
    ("telemetry", TelemetryBatch, batch),
    ("drift", DriftBatch, batch),
    ("ack", Ack, ack),
]


def mutate(data: dict[str, Any], path: str, value: object) -> dict[str, Any]:
    """Set (or with DELETE remove) a dotted path; list indexes are numbers."""
    data = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "make"), [(c, m) for _, c, m in KINDS],
                         ids=[k for k, _, _ in KINDS])
def test_round_trip(cls: type[Any], make: Callable[[], dict[str, Any]]) -> None:
    msg = cls.from_dict(make())
    raw = msg.to_bytes()
    again = cls.from_bytes(raw)
    assert again == msg
    assert again.to_bytes() == raw
    assert json.loads(raw) == make()


UNKNOWN = [
    # name, message, path of the object that gains {"x_future": ...}
    ("desired top level", DesiredState, desired, ""),
    ("desired model", DesiredState, desired, "models.0"),
    ("reported top level", Reported, reported, ""),
    ("reported running model", Reported, reported, "running.0"),
    ("status top level", Status, status, ""),
    ("telemetry top level", TelemetryBatch, batch, ""),
    ("telemetry record", TelemetryBatch, batch, "records.1"),
    ("drift record", DriftBatch, batch, "records.0"),
    ("ack top level", Ack, ack, ""),
]


@pytest.mark.parametrize(("cls", "make", "where"), [r[1:] for r in UNKNOWN],
                         ids=[r[0] for r in UNKNOWN])
def test_unknown_fields_survive_round_trip(
        cls: type[Any], make: Callable[[], dict[str, Any]], where: str) -> None:
    data = make()
    extra = {"x_future": {"nested": [1, "two", None]}, "x_flag": True}
    target: Any = data
    for part in filter(None, where.split(".")):
        target = target[int(part)] if isinstance(target, list) else target[part]
    target.update(extra)

    msg = cls.from_bytes(json.dumps(data).encode())
    assert json.loads(msg.to_bytes()) == data
    assert cls.from_bytes(msg.to_bytes()).to_dict() == data


def test_canonical_bytes_are_stable() -> None:
    msg = Ack.from_dict(ack())
    assert msg.to_bytes() == (
        b'{"device_id":"dev-1","schema_version":1,"stream":"telemetry","upto_seq":5}')
    reordered = dict(reversed(list(ack().items())))
    assert Ack.from_bytes(json.dumps(reordered, indent=4).encode()).to_bytes() == msg.to_bytes()


def test_canonical_json_is_utf8_not_escaped() -> None:
    data = reported()
    data["last_error"] = "modèle refusé ✗"
    raw = Reported.from_dict(data).to_bytes()
    assert "modèle refusé ✗".encode() in raw


def test_desired_state_may_be_empty() -> None:
    state = DesiredState.from_dict(mutate(desired(), "models", []))
    assert state.models == ()
    assert DesiredState.from_bytes(state.to_bytes()) == state


def test_batch_seq_helpers() -> None:
    b = TelemetryBatch.from_dict(batch())
    assert (b.first_seq, b.last_seq) == (3, 5)
    assert b.records[0] == Record(seq=3, kind="latency", at=1_500, body={"p50_ms": 1.5})


# ---------------------------------------------------------------------------------------------
# every error path
# ---------------------------------------------------------------------------------------------
ERRORS: list[tuple[str, type[Any], Callable[[], dict[str, Any]], str, object, str, str]] = [
    # name, class, base, path, new value, error field, expected (substring)
    ("schema newer", DesiredState, desired, "schema_version", 2, "schema_version", "1..1"),
    ("schema zero", Status, status, "schema_version", 0, "schema_version", ">= 1"),
    ("schema missing", Ack, ack, "schema_version", DELETE, "schema_version", "required"),
    ("schema string", Ack, ack, "schema_version", "1", "schema_version", "an integer"),
    ("device id missing", DesiredState, desired, "device_id", DELETE, "device_id", "required"),
    ("device id wildcard", DesiredState, desired, "device_id", "dev+1", "device_id",
     "matching"),
    ("device id slash", Reported, reported, "device_id", "a/b", "device_id", "matching"),
    ("device id number", Status, status, "device_id", 5, "device_id", "a string"),
    ("sequence zero", DesiredState, desired, "sequence", 0, "sequence", ">= 1"),
    ("sequence bool", DesiredState, desired, "sequence", True, "sequence", "an integer"),
    ("sequence float", DesiredState, desired, "sequence", 7.0, "sequence", "an integer"),
    ("issued_at negative", DesiredState, desired, "issued_at", -1, "issued_at", ">= 0"),
    ("expires before issued", DesiredState, desired, "expires_at", 1_000, "expires_at",
     "after issued_at (1000)"),
    ("models not list", DesiredState, desired, "models", {}, "models", "a list"),
    ("models null", DesiredState, desired, "models", None, "models", "a list"),
    ("model not object", DesiredState, desired, "models.0", "digits", "models[0]",
     "an object"),
    ("model name missing", DesiredState, desired, "models.0.name", DELETE, "models[0].name",
     "required"),
    ("model name empty", DesiredState, desired, "models.0.name", "", "models[0].name",
     "non-empty"),
    ("model name traversal", DesiredState, desired, "models.0.name", "../etc",
     "models[0].name", "plain name"),
    ("model version dotdot", DesiredState, desired, "models.0.version", "..",
     "models[0].version", "plain name"),
    ("model version backslash", DesiredState, desired, "models.0.version", "1\\2",
     "models[0].version", "plain name"),
    ("target absolute", DesiredState, desired, "models.0.target_path", "/etc/passwd",
     "models[0].target_path", "relative TUF target"),
    ("target dotdot", DesiredState, desired, "models.0.target_path", "a/../../b",
     "models[0].target_path", "relative TUF target"),
    ("manifest target empty segment", DesiredState, desired, "models.0.manifest_target",
     "a//manifest.json", "models[0].manifest_target", "relative TUF target"),
    ("sha256 short", DesiredState, desired, "models.0.sha256", "ab", "models[0].sha256",
     "64 lowercase hex"),
    ("sha256 upper", DesiredState, desired, "models.0.sha256", SHA.upper(),
     "models[0].sha256", "64 lowercase hex"),
    ("length zero", DesiredState, desired, "models.0.length", 0, "models[0].length", ">= 1"),
    ("profile missing", DesiredState, desired, "models.0.profile", DELETE,
     "models[0].profile", "required"),
    ("applied negative", Reported, reported, "applied_sequence", -1, "applied_sequence",
     ">= 0"),
    ("running not list", Reported, reported, "running", "x", "running", "a list"),
    ("running sha bad", Reported, reported, "running.0.sha256", "zz", "running[0].sha256",
     "64 lowercase hex"),
    ("state empty", Reported, reported, "state", "", "state", "non-empty"),
    ("last_result unknown", Reported, reported, "last_result", "meh", "last_result",
     "one of ok, failed, rolled_back, refused or null"),
    ("last_error number", Reported, reported, "last_error", 3, "last_error",
     "a string or null"),
    ("agent_version missing", Reported, reported, "agent_version", DELETE, "agent_version",
     "required"),
    ("reported_at string", Reported, reported, "reported_at", "now", "reported_at",
     "an integer"),
    ("online int", Status, status, "online", 1, "online", "a boolean"),
    ("online null", Status, status, "online", None, "online", "a boolean"),
    ("at negative", Status, status, "at", -5, "at", ">= 0"),
    ("records empty", TelemetryBatch, batch, "records", [], "records", "at least one"),
    ("record seq zero", TelemetryBatch, batch, "records.0.seq", 0, "records[0].seq", ">= 1"),
    ("record seq repeats", TelemetryBatch, batch, "records.1.seq", 3, "records[1].seq",
     "above the previous record's 3"),
    ("record seq decreases", DriftBatch, batch, "records.1.seq", 2, "records[1].seq",
     "above the previous record's 3"),
    ("record kind empty", DriftBatch, batch, "records.0.kind", "", "records[0].kind",
     "non-empty"),
    ("record body list", TelemetryBatch, batch, "records.0.body", [1], "records[0].body",
     "an object"),
    ("record at missing", TelemetryBatch, batch, "records.0.at", DELETE, "records[0].at",
     "required"),
    ("ack stream unknown", Ack, ack, "stream", "logs", "stream", "one of telemetry, drift"),
    ("ack upto negative", Ack, ack, "upto_seq", -1, "upto_seq", ">= 0"),
]


@pytest.mark.parametrize(("cls", "make", "path", "value", "field", "expected"),
                         [r[1:] for r in ERRORS], ids=[r[0] for r in ERRORS])
def test_invalid_fields_are_named(cls: type[Any], make: Callable[[], dict[str, Any]],
                                  path: str, value: object, field: str, expected: str) -> None:
    data = mutate(make(), path, value)
    with pytest.raises(MessageError) as info:
        cls.from_bytes(json.dumps(data).encode())
    assert info.value.field == field
    assert expected in info.value.expected
    assert f"field {field!r}: expected" in str(info.value)
    assert str(info.value).startswith(cls.MESSAGE)


def test_duplicate_model_names_refused() -> None:
    data = desired()
    data["models"].append(dict(data["models"][0], version="2.0.0"))
    with pytest.raises(MessageError, match="one entry per model name"):
        DesiredState.from_dict(data)


def test_top_level_not_object() -> None:
    with pytest.raises(MessageError, match="expected an object, got 'list'"):
        Status.from_bytes(b"[]")


def test_to_bytes_refuses_what_from_bytes_would() -> None:
    bad = DesiredState(device_id="dev-1", sequence=0, issued_at=1, expires_at=2, models=())
    with pytest.raises(MessageError, match="'sequence': expected an integer >= 1"):
        bad.to_bytes()


# ---------------------------------------------------------------------------------------------
# raw bytes: size, encoding, strict JSON
# ---------------------------------------------------------------------------------------------
def test_oversize_message_refused_before_parsing() -> None:
    raw = b" " * (MAX_MESSAGE_BYTES + 1)  # not even JSON: the size check comes first
    with pytest.raises(MessageError, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
        Status.from_bytes(raw)


def test_oversize_batch_refused_on_the_way_out() -> None:
    body = {"blob": "x" * 1000}
    records = tuple(Record(seq=i + 1, kind="k", at=0, body=body) for i in range(300))
    with pytest.raises(MessageError, match=f"at most {MAX_MESSAGE_BYTES} bytes"):
        TelemetryBatch(device_id="dev-1", records=records).to_bytes()


RAW_ERRORS = [
    ("not utf-8", b'{"a": "\xff"}', "UnicodeDecodeError"),
    ("truncated", b'{"a": ', "JSONDecodeError"),
    ("NaN", b'{"a": NaN}', "NaN is not JSON"),
    ("Infinity", b'{"a": Infinity}', "Infinity is not JSON"),
    ("duplicate key", b'{"a": 1, "a": 2}', "duplicate key 'a'"),
    ("lone surrogate", b'{"a": "\\ud800"}', "lone surrogates"),
    ("huge integer", b'{"a": ' + b"9" * 5000 + b"}", "ValueError"),
    ("deep nesting", b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    ("not bytes", "{}", "bytes"),
]


@pytest.mark.parametrize(("raw", "detail"), [r[1:] for r in RAW_ERRORS],
                         ids=[r[0] for r in RAW_ERRORS])
def test_parse_json_is_strict(raw: bytes, detail: str) -> None:
    with pytest.raises(MessageError) as info:
        parse_json(raw)
    assert info.value.field == "<root>"
    assert detail in str(info.value)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(MessageError, match="no NaN"):
        canonical_json({"a": float("nan")})


# ---------------------------------------------------------------------------------------------
# decode by topic
# ---------------------------------------------------------------------------------------------
DISPATCH = [(k, c, m) for k, c, m in KINDS if k != "desired"]


@pytest.mark.parametrize(("kind", "cls", "make"), DISPATCH, ids=[k for k, _, _ in DISPATCH])
def test_parse_device_message_by_topic(kind: str, cls: type[Any],
                                       make: Callable[[], dict[str, Any]]) -> None:
    msg = parse_device_message(f"edgefleet/v1/devices/dev-1/{kind}",
                               cls.from_dict(make()).to_bytes())
    assert type(msg) is cls


DISPATCH_ERRORS = [
    ("body claims another device", "edgefleet/v1/devices/dev-2/status", MessageError,
     "'dev-2' (the device in topic"),
    ("desired is signed, not plain", "edgefleet/v1/devices/dev-1/desired", MessageError,
     "a topic kind with a plain message"),
    ("not our topic", "other/dev-1/status", TopicError, "topic under"),
]


@pytest.mark.parametrize(("topic", "error", "message"), [r[1:] for r in DISPATCH_ERRORS],
                         ids=[r[0] for r in DISPATCH_ERRORS])
def test_parse_device_message_refuses(topic: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        parse_device_message(topic, Status.from_dict(status()).to_bytes())
    assert message in str(info.value)


def test_protocol_imports_without_cryptography() -> None:
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "import agent.protocol.topics, agent.protocol.messages, agent.protocol.signed\n"
            "assert 'cryptography.hazmat' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)

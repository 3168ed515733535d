"""MQTT messages: the ONE definition, shared by fleet_server and agent.

One frozen dataclass per topic kind (see :mod:`agent.protocol.topics`)::

    desired    DesiredState (inside the signed envelope of agent.protocol.signed)
    reported   Reported        status     Status
    telemetry  TelemetryBatch  drift      DriftBatch      ack   Ack

Each has ``from_dict``/``from_bytes`` (check everything, raise :class:`MessageError`) and
``to_dict``/``to_bytes``. ``to_bytes`` is canonical JSON (sorted keys, compact separators,
UTF-8, no NaN): the same message always gives the same bytes, which is what the desired-state
signature covers. ``to_bytes`` also re-checks the message, so we never send what we would refuse.

Forward compatibility (python-tuf ADR 0008): every object keeps the fields it does not know in
``unrecognized`` and writes them back unchanged. A ``schema_version`` newer than
:data:`SCHEMA_VERSION` is refused. Payloads over :data:`MAX_MESSAGE_BYTES` are refused before
parsing.

Reading telemetry for storage: :func:`parse_device_rows` is :func:`parse_device_message` with
telemetry and drift batches read straight into :class:`RecordRows` (each record's seq, kind,
at and body as canonical JSON text), which is what a store needs. When the payload is itself
canonical JSON with plain records (what the agent sends), one pass parses it without the
duplicate-key hook, checks every field and proves the payload canonical by rebuilding its text
from the bodies it encodes anyway (``_json``'s docstring says why that comparison stands in for
the hook); anything else takes the reference path (``from_bytes``), so both accept and refuse
exactly the same payloads, with the same errors, and give the same rows. A caller with a faster
JSON library passes it as a :class:`JSONCodec` (the server passes orjson's; this package stays
standard library only): the same one-pass read then runs on bytes with that library, and a
payload it cannot prove canonical takes the standard-library one-pass read, then the reference
path. A record body nests at most :data:`MAX_BODY_DEPTH` objects and arrays deep, on every path.

Errors: :class:`MessageError` (an :class:`agent.protocol.ProtocolError`, so a ``ValueError``)
names the field, expected against actual; a bad topic raises
:class:`agent.protocol.topics.TopicError` (also a ``ProtocolError``). The strict JSON reading
and canonical writing are defined once, in ``agent.protocol._json``, shared with the manifest.
Pure: standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from agent.protocol import _json
from agent.protocol._errors import ProtocolError, shown
from agent.protocol.topics import DEVICE_ID_PATTERN, is_valid_device_id, parse_topic

__all__ = [
    "LAST_RESULTS",
    "MAX_BODY_DEPTH",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "STREAMS",
    "Ack",
    "DesiredModel",
    "DesiredState",
    "DeviceMessage",
    "DriftBatch",
    "JSONCodec",
    "MessageError",
    "Record",
    "RecordRows",
    "Reported",
    "RunningModel",
    "Status",
    "TelemetryBatch",
    "canonical_json",
    "parse_device_message",
    "parse_device_rows",
    "parse_json",
]

SCHEMA_VERSION = 1
#: the largest payload we parse or produce (bytes); brokers default far higher
MAX_MESSAGE_BYTES = 256 * 1024
#: how deeply objects and arrays may nest in a record body, the body itself counting as one
#: (as ``_json.copy_json`` counts): a fixed bound, the same on every read path, well inside
#: the parsers' own recursion limits
MAX_BODY_DEPTH = _json.MAX_COPY_DEPTH
#: what ``Reported.last_result`` may say (or null: nothing attempted yet)
LAST_RESULTS = ("ok", "failed", "rolled_back", "refused")
#: the acknowledged, sequence-numbered device streams
STREAMS = ("telemetry", "drift")
_HEX = frozenset("0123456789abcdef")


class MessageError(ProtocolError):
    """A message (or part of one) is malformed. Names the field, expected against actual."""

    def __init__(self, field: str, expected: str, actual: object, *,
                 message: str = "message") -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        self.message = message
        super().__init__(f"{message} field {field!r}: expected {expected}, got {shown(actual)}")


# ---------------------------------------------------------------------------------------------
# canonical JSON (defined once in agent.protocol._json; here it raises MessageError)
# ---------------------------------------------------------------------------------------------
def canonical_json(value: object, *, message: str = "message") -> bytes:
    """Canonical JSON bytes: sorted keys, ``,``/``:`` separators, UTF-8, NaN/Infinity refused.

    Raises:
        MessageError: the value holds NaN/Infinity, a lone surrogate, or a non-JSON type.
    """
    try:
        return _json.canonical_json(value)
    except _json.JSONError as exc:
        raise MessageError(exc.where, exc.expected, exc.actual, message=message) from exc


def parse_json(raw: bytes, *, message: str = "message", limit: int = MAX_MESSAGE_BYTES) -> Any:
    """Parse untrusted JSON bytes, refusing oversize input before looking at it.

    Strict: UTF-8 only, no NaN/Infinity (also none from a number too large for a float), no
    duplicate keys, no lone surrogates (so the result can always be written back as canonical
    JSON).

    Raises:
        MessageError: too large, not UTF-8, not strict JSON, or nested too deeply.
    """
    try:
        return _json.parse_json(raw, limit=limit, finite=True)
    except _json.JSONError as exc:
        raise MessageError(exc.where, exc.expected, exc.actual, message=message) from exc


# ---------------------------------------------------------------------------------------------
# a reader that names the field it reads; what it leaves is `unrecognized`
# ---------------------------------------------------------------------------------------------
_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", dict: "an object",
               list: "a list", bool: "a boolean"}


class _Reader:
    def __init__(self, data: object, path: str, message: str) -> None:
        self.path = path
        self.message = message
        if not isinstance(data, dict):
            raise MessageError(path or "<root>", "an object", type(data).__name__,
                               message=message)
        self._d: dict[str, Any] = dict(data)

    def where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, expected: str, actual: object) -> MessageError:
        return MessageError(self.where(key), expected, actual, message=self.message)

    def take(self, key: str, kind: type, *, nullable: bool = False) -> Any:
        """Pop a field; a missing nullable field reads as None."""
        if key not in self._d:
            if nullable:
                return None
            raise self.error(key, f"{_KIND_NAMES[kind]} (required)", "missing")
        value = self._d.pop(key)
        if value is None and nullable:
            return None
        # bool is an int in Python; `"sequence": true` is still wrong
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            expected = _KIND_NAMES[kind] + (" or null" if nullable else "")
            raise self.error(key, expected, value)
        return value

    def string(self, key: str, *, nullable: bool = False) -> Any:
        value = self.take(key, str, nullable=nullable)
        if value == "":
            raise self.error(key, "a non-empty string", value)
        return value

    def integer(self, key: str, minimum: int) -> int:
        value: int = self.take(key, int)
        if value < minimum:
            raise self.error(key, f"an integer >= {minimum}", value)
        return value

    def device_id(self) -> str:
        value: str = self.take("device_id", str)
        if not is_valid_device_id(value):
            raise self.error("device_id", f"a string matching {DEVICE_ID_PATTERN}", value)
        return value

    def schema_version(self) -> int:
        value = self.integer("schema_version", 1)
        if value > SCHEMA_VERSION:
            raise self.error("schema_version", f"1..{SCHEMA_VERSION}", value)
        return value

    def sha256(self, key: str) -> str:
        value: str = self.take(key, str)
        if len(value) != 64 or not set(value) <= _HEX:
            raise self.error(key, "64 lowercase hex digits", value)
        return value

    def plain_name(self, key: str) -> str:
        """A model name or version: used in paths on the device, so no traversal."""
        value: str = self.string(key)
        if value in (".", "..") or value.startswith(".") or any(c in value for c in "/\\\0"):
            raise self.error(key, "a plain name (no path separators, not starting with '.')",
                             value)
        return value

    def target_name(self, key: str) -> str:
        """A TUF target path: relative, '/'-separated, no empty, '.' or '..' segments."""
        value: str = self.string(key)
        if ("\\" in value or "\0" in value
                or any(seg in ("", ".", "..") for seg in value.split("/"))):
            raise self.error(key, "a relative TUF target path (no '', '.', '..' segments)",
                             value)
        return value

    def choice(self, key: str, allowed: tuple[str, ...], *, nullable: bool = False) -> Any:
        value = self.take(key, str, nullable=nullable)
        if value is not None and value not in allowed:
            extra = " or null" if nullable else ""
            raise self.error(key, "one of " + ", ".join(allowed) + extra, value)
        return value

    def rest(self) -> dict[str, Any]:
        return self._d


class _Message:
    """Shared ``from_bytes``/``to_bytes`` for top-level messages."""

    MESSAGE: ClassVar[str] = "message"

    @classmethod
    def from_dict(cls, data: object) -> Self:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, raw: bytes) -> Self:
        """Parse and check a message payload.

        Raises:
            MessageError: over :data:`MAX_MESSAGE_BYTES`, not strict UTF-8 JSON, or invalid.
        """
        return cls.from_dict(parse_json(raw, message=cls.MESSAGE))

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes of a checked message.

        Raises:
            MessageError: the message would be refused by ``from_bytes`` (invalid fields,
                or over :data:`MAX_MESSAGE_BYTES`).
        """
        data = self.to_dict()
        type(self).from_dict(data)
        raw = canonical_json(data, message=self.MESSAGE)
        if len(raw) > MAX_MESSAGE_BYTES:
            raise MessageError("<root>", f"at most {MAX_MESSAGE_BYTES} bytes",
                               f"{len(raw)} bytes", message=self.MESSAGE)
        return raw


# ---------------------------------------------------------------------------------------------
# desired (server -> device, signed)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DesiredModel:
    """One model a device should run, pinned by the TUF targets that carry it."""

    name: str
    version: str
    target_path: str  # TUF target name of the model file
    manifest_target: str  # TUF target name of its manifest.json
    sha256: str  # of the model file
    length: int  # of the model file, bytes
    profile: str
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str = "model",
                  message: str = "desired state") -> DesiredModel:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, path, message)
        return cls(
            name=r.plain_name("name"),
            version=r.plain_name("version"),
            target_path=r.target_name("target_path"),
            manifest_target=r.target_name("manifest_target"),
            sha256=r.sha256("sha256"),
            length=r.integer("length", 1),
            profile=r.string("profile"),
            unrecognized=r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"name": self.name, "version": self.version, "target_path": self.target_path,
                "manifest_target": self.manifest_target, "sha256": self.sha256,
                "length": self.length, "profile": self.profile, **self.unrecognized}


@dataclass(frozen=True)
class DesiredState(_Message):
    """What one device should run; ``models`` empty means: run nothing.

    ``sequence`` grows by at least one with every new state for a device; ``issued_at`` and
    ``expires_at`` are unix seconds.
    """

    MESSAGE: ClassVar[str] = "desired state"

    device_id: str
    sequence: int
    issued_at: int
    expires_at: int
    models: tuple[DesiredModel, ...]
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object) -> DesiredState:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, "", cls.MESSAGE)
        version = r.schema_version()
        device_id = r.device_id()
        sequence = r.integer("sequence", 1)
        issued_at = r.integer("issued_at", 0)
        expires_at = r.integer("expires_at", 0)
        if expires_at <= issued_at:
            raise r.error("expires_at", f"a time after issued_at ({issued_at})", expires_at)
        models = tuple(DesiredModel.from_dict(m, f"models[{i}]", cls.MESSAGE)
                       for i, m in enumerate(r.take("models", list)))
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise r.error("models", "one entry per model name", names)
        return cls(schema_version=version, device_id=device_id, sequence=sequence,
                   issued_at=issued_at, expires_at=expires_at, models=models,
                   unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"schema_version": self.schema_version, "device_id": self.device_id,
                "sequence": self.sequence, "issued_at": self.issued_at,
                "expires_at": self.expires_at, "models": [m.to_dict() for m in self.models],
                **self.unrecognized}


# ---------------------------------------------------------------------------------------------
# reported and status (device -> server, retained)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunningModel:
    """A model the device is serving right now."""

    name: str
    version: str
    sha256: str
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str = "running",
                  message: str = "reported state") -> RunningModel:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, path, message)
        return cls(name=r.plain_name("name"), version=r.plain_name("version"),
                   sha256=r.sha256("sha256"), unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256,
                **self.unrecognized}


@dataclass(frozen=True)
class Reported(_Message):
    """What a device runs and how its last update went.

    ``applied_sequence`` is the last desired-state sequence it acted on (0: none yet);
    ``state`` is the update state machine's state name; ``reported_at`` is unix seconds.
    """

    MESSAGE: ClassVar[str] = "reported state"

    device_id: str
    applied_sequence: int
    running: tuple[RunningModel, ...]
    state: str
    last_result: str | None  # one of LAST_RESULTS, or None: nothing attempted yet
    last_error: str | None
    agent_version: str
    reported_at: int
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object) -> Reported:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, "", cls.MESSAGE)
        return cls(
            schema_version=r.schema_version(),
            device_id=r.device_id(),
            applied_sequence=r.integer("applied_sequence", 0),
            running=tuple(RunningModel.from_dict(m, f"running[{i}]", cls.MESSAGE)
                          for i, m in enumerate(r.take("running", list))),
            state=r.string("state"),
            last_result=r.choice("last_result", LAST_RESULTS, nullable=True),
            last_error=r.take("last_error", str, nullable=True),
            agent_version=r.string("agent_version"),
            reported_at=r.integer("reported_at", 0),
            unrecognized=r.rest(),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"schema_version": self.schema_version, "device_id": self.device_id,
                "applied_sequence": self.applied_sequence,
                "running": [m.to_dict() for m in self.running], "state": self.state,
                "last_result": self.last_result, "last_error": self.last_error,
                "agent_version": self.agent_version, "reported_at": self.reported_at,
                **self.unrecognized}


@dataclass(frozen=True)
class Status(_Message):
    """Online/offline. The offline one is the last will, registered at connect: its ``at`` is
    the connect time, not the moment the broker noticed the device was gone."""

    MESSAGE: ClassVar[str] = "status"

    device_id: str
    online: bool
    at: int  # unix seconds
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object) -> Status:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, "", cls.MESSAGE)
        return cls(schema_version=r.schema_version(), device_id=r.device_id(),
                   online=r.take("online", bool), at=r.integer("at", 0),
                   unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"schema_version": self.schema_version, "device_id": self.device_id,
                "online": self.online, "at": self.at, **self.unrecognized}


# ---------------------------------------------------------------------------------------------
# telemetry and drift (device -> server, sequence numbered, acked)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One sequence-numbered record of a device stream; ``body`` is free-form JSON."""

    seq: int  # >= 1, per device and stream
    kind: str
    at: int  # unix seconds
    body: Mapping[str, Any]
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object, path: str = "record",
                  message: str = "record") -> Record:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, path, message)
        seq, kind, at = r.integer("seq", 1), r.string("kind"), r.integer("at", 0)
        body = r.take("body", dict)
        depth = _json.nesting_depth(body, MAX_MESSAGE_BYTES)  # never deeper than the bytes
        if depth > MAX_BODY_DEPTH:
            raise r.error("body", f"objects and arrays nested at most {MAX_BODY_DEPTH} deep",
                          f"{depth} deep")
        return cls(seq=seq, kind=kind, at=at, body=body, unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"seq": self.seq, "kind": self.kind, "at": self.at, "body": dict(self.body),
                **self.unrecognized}


@dataclass(frozen=True)
class _RecordBatch(_Message):
    """Records of one stream, at least one, ``seq`` strictly increasing (gaps allowed)."""

    STREAM: ClassVar[str] = ""

    device_id: str
    records: tuple[Record, ...]
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def first_seq(self) -> int:
        return self.records[0].seq

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq

    @classmethod
    def from_dict(cls, data: object) -> Self:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, "", cls.MESSAGE)
        version = r.schema_version()
        device_id = r.device_id()
        raw = r.take("records", list)
        if not raw:
            raise r.error("records", "at least one record", raw)
        records = tuple(Record.from_dict(x, f"records[{i}]", cls.MESSAGE)
                        for i, x in enumerate(raw))
        for i in range(1, len(records)):
            if records[i].seq <= records[i - 1].seq:
                raise r.error(f"records[{i}].seq",
                              f"a seq above the previous record's {records[i - 1].seq}",
                              records[i].seq)
        return cls(schema_version=version, device_id=device_id, records=records,
                   unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"schema_version": self.schema_version, "device_id": self.device_id,
                "records": [x.to_dict() for x in self.records], **self.unrecognized}


@dataclass(frozen=True)
class TelemetryBatch(_RecordBatch):
    """Telemetry records (latency, counts, errors...) from one device."""

    STREAM: ClassVar[str] = "telemetry"
    MESSAGE: ClassVar[str] = "telemetry batch"


@dataclass(frozen=True)
class DriftBatch(_RecordBatch):
    """Drift summaries from one device."""

    STREAM: ClassVar[str] = "drift"
    MESSAGE: ClassVar[str] = "drift batch"


@dataclass(frozen=True)
class Ack(_Message):
    """Server -> device: every record of ``stream`` up to ``upto_seq`` is stored (0: none)."""

    MESSAGE: ClassVar[str] = "ack"

    device_id: str
    stream: str  # one of STREAMS
    upto_seq: int
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, data: object) -> Ack:
        """Build and check one from parsed JSON.

        Raises:
            MessageError: a field is missing, of the wrong type or out of range.
        """
        r = _Reader(data, "", cls.MESSAGE)
        return cls(schema_version=r.schema_version(), device_id=r.device_id(),
                   stream=r.choice("stream", STREAMS), upto_seq=r.integer("upto_seq", 0),
                   unrecognized=r.rest())

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, unrecognized fields included (no checks: see ``to_bytes``)."""
        return {"schema_version": self.schema_version, "device_id": self.device_id,
                "stream": self.stream, "upto_seq": self.upto_seq, **self.unrecognized}


# ---------------------------------------------------------------------------------------------
# dispatch by topic
# ---------------------------------------------------------------------------------------------
DeviceMessage = Reported | Status | TelemetryBatch | DriftBatch | Ack
#: topic kind -> message class, for every kind that carries a plain (unsigned) message
MESSAGE_TYPES: Mapping[str, type[Reported | Status | TelemetryBatch | DriftBatch | Ack]] = {
    "reported": Reported,
    "status": Status,
    "telemetry": TelemetryBatch,
    "drift": DriftBatch,
    "ack": Ack,
}


def parse_device_message(topic: str, payload: bytes) -> DeviceMessage:
    """Decode a payload by its topic, and check it speaks for the topic's device.

    The broker's ACL guarantees only who published to the topic; this makes sure the body
    does not claim another ``device_id``. ``desired`` topics carry a signed envelope: use
    :func:`agent.protocol.signed.verify_desired` for those.

    Raises:
        TopicError: the topic is not one of ours.
        MessageError: the topic carries no plain message, the payload is invalid, or its
            ``device_id`` differs from the topic's.
    """
    device_id, kind = parse_topic(topic)
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise MessageError("<topic>", "a topic kind with a plain message: "
                           + ", ".join(MESSAGE_TYPES), kind)
    msg = cls.from_bytes(payload)
    if msg.device_id != device_id:
        raise MessageError("device_id", f"{device_id!r} (the device in topic {topic!r})",
                           msg.device_id, message=cls.MESSAGE)
    return msg


# ---------------------------------------------------------------------------------------------
# telemetry and drift read straight into rows (module docstring)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RecordRows:
    """A checked telemetry or drift batch as rows: ``(seq, kind, at, body)`` per record, in
    order, ``body`` the record body's canonical JSON text. The records' own unrecognized
    fields are not kept; the batch's are (``floor``, ``from_seq``...)."""

    device_id: str
    stream: str  # one of STREAMS
    rows: tuple[tuple[int, str, int, str], ...]
    schema_version: int = SCHEMA_VERSION
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class JSONCodec:
    """A faster JSON library for the one-pass read of :func:`parse_device_rows`, injected by a
    caller that has one (this package imports only the standard library).

    The read proves a payload canonical by rebuilding it with ``dumps`` from what ``loads``
    made of it; that proof holds for ``canonical_json`` only where ``dumps`` writes what
    ``canonical_json`` writes, so ``unsure`` must flag every payload where it may not.

    Attributes:
        name: for logs, e.g. ``"orjson 3.11"``.
        loads: UTF-8 JSON bytes to data (dict, list, str, int, float, bool, None), refusing
            invalid UTF-8, NaN and Infinity.
        dumps: data to compact JSON bytes with sorted keys, UTF-8, escaping only what
            ``canonical_json`` escapes.
        errors: what ``loads`` and ``dumps`` raise on what they refuse.
        unsure: True for every payload on which ``dumps`` may write a value otherwise than
            ``canonical_json`` (say, a number form Python never writes): such a payload takes
            the standard-library read.
    """

    name: str
    loads: Callable[[bytes], Any]
    dumps: Callable[[Any], bytes]
    errors: tuple[type[Exception], ...]
    unsure: Callable[[bytes], bool]


def parse_device_rows(topic: str, payload: bytes, *,
                      codec: JSONCodec | None = None) -> Reported | Status | Ack | RecordRows:
    """:func:`parse_device_message`, with telemetry and drift batches as :class:`RecordRows`;
    ``codec``: a faster JSON library for the one-pass read (module docstring).

    Raises:
        TopicError: the topic is not one of ours.
        MessageError: as :func:`parse_device_message`, for the same payloads.
    """
    device_id, kind = parse_topic(topic)
    cls = MESSAGE_TYPES.get(kind)
    if cls is not TelemetryBatch and cls is not DriftBatch:
        msg = parse_device_message(topic, payload)
        assert not isinstance(msg, _RecordBatch)  # by its topic kind
        return msg
    fast = None if codec is None else _codec_rows(cls.STREAM, device_id, payload, codec)
    if fast is None:
        fast = _canonical_rows(cls.STREAM, device_id, payload)
    if fast is not None:
        return fast
    batch = parse_device_message(topic, payload)  # the reference path: raises what it refuses
    assert isinstance(batch, _RecordBatch)
    try:
        rows = tuple((r.seq, r.kind, r.at, _json.canonical_text(dict(r.body)))
                     for r in batch.records)
    except _json.JSONError as exc:  # parse_json proved the bodies encodable
        raise AssertionError(f"a parsed record body does not encode: {exc}") from exc
    return RecordRows(device_id=batch.device_id, stream=batch.STREAM, rows=rows,
                      schema_version=batch.schema_version, unrecognized=dict(batch.unrecognized))


_BATCH_FIELDS = ("schema_version", "device_id", "records")


def _batch_records(data: object, device_id: str) -> list[Any] | None:
    """The records of a parsed batch whose envelope ``_RecordBatch.from_dict`` accepts for
    ``device_id`` (None: take the next path)."""
    if type(data) is not dict or data.get("device_id") != device_id:
        return None
    version = data.get("schema_version")
    records = data.get("records")
    if (type(version) is not int or not 1 <= version <= SCHEMA_VERSION
            or type(records) is not list or not records):
        return None
    return records


def _too_deep(body: dict[str, Any]) -> bool:
    """Whether a body nests past :data:`MAX_BODY_DEPTH`. The fast paths walk it only when its
    JSON text holds more ``{`` and ``[`` than that (their count bounds its depth)."""
    return _json.nesting_depth(body, MAX_BODY_DEPTH) > MAX_BODY_DEPTH


def _stdlib_loads(raw: bytes) -> Any:
    return _json.parse_unchecked(raw.decode("utf-8"))


def _stdlib_dumps(value: object) -> bytes:
    # a lone surrogate (from a \ud800 escape) fails the encode: not canonical, next path
    return _json.canonical_text(value).encode("utf-8")


#: the standard library's read as a codec: it writes exactly ``canonical_json``, so it is never
#: unsure
_STDLIB = JSONCodec(name="json", loads=_stdlib_loads, dumps=_stdlib_dumps,
                    errors=(UnicodeError, _json.JSONError), unsure=lambda raw: False)


def _canonical_rows(stream: str, device_id: str, raw: bytes) -> RecordRows | None:
    """The one-pass read of a canonical batch with plain records (module docstring), with the
    standard library; None when it cannot prove the payload valid and canonical: the caller
    then takes the reference path.

    Accepts only what ``_RecordBatch.from_dict`` accepts, and more strictly: records holding
    exactly ``seq``, ``kind``, ``at`` and ``body``, and the payload byte-identical to the
    canonical JSON of what it parses to (so no duplicate keys, no lone surrogates).
    """
    return _codec_rows(stream, device_id, raw, _STDLIB)


def _codec_rows(stream: str, device_id: str, raw: bytes, codec: JSONCodec) -> RecordRows | None:
    """The one-pass read with ``codec`` (:func:`_canonical_rows` passes the standard
    library's); None also when the codec is ``unsure`` of the payload (the caller then takes
    the standard-library read).

    The proof: the payload is byte-identical to ``codec.dumps`` of what ``codec.loads`` made
    of it, and holds nothing on which ``dumps`` and ``canonical_json`` may differ, so it is
    the canonical JSON of that same data.
    """
    if not isinstance(raw, bytes) or len(raw) > MAX_MESSAGE_BYTES or codec.unsure(raw):
        return None
    dumps = codec.dumps
    try:
        data = codec.loads(raw)
        records = _batch_records(data, device_id)
        if records is None:
            return None
        rows: list[tuple[int, str, int, str]] = []
        pieces: list[bytes] = []
        kinds: dict[str, bytes] = {}
        previous = 0  # seq >= 1, strictly increasing
        for record in records:
            if type(record) is not dict or len(record) != 4:
                return None
            seq, kind, at, body = record["seq"], record["kind"], record["at"], record["body"]
            if (type(seq) is not int or type(at) is not int or type(kind) is not str
                    or type(body) is not dict or seq <= previous or at < 0 or not kind):
                return None
            previous = seq
            kind_json = kinds.get(kind)
            if kind_json is None:
                kind_json = kinds[kind] = dumps(kind)
            body_json = dumps(body)
            if (body_json.count(b"{") + body_json.count(b"[") > MAX_BODY_DEPTH
                    and _too_deep(body)):
                return None
            pieces.append(b'{"at":%d,"body":%b,"kind":%b,"seq":%d}'
                          % (at, body_json, kind_json, seq))
            rows.append((seq, kind, at, body_json.decode("utf-8")))
        records_json = b"[" + b",".join(pieces) + b"]"
        parts = [dumps(key) + b":" + (records_json if key == "records" else dumps(value))
                 for key, value in sorted(data.items())]
    except KeyError:  # a record with four fields, not those four
        return None
    except codec.errors:
        return None
    if b"{" + b",".join(parts) + b"}" != raw:
        return None
    return RecordRows(device_id=device_id, stream=stream, rows=tuple(rows),
                      schema_version=data["schema_version"],
                      unrecognized={k: v for k, v in data.items() if k not in _BATCH_FIELDS})

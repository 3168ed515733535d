"""parse_device_rows: the one-pass read of telemetry agrees with the reference path.

For thousands of generated payloads (canonical ones as the agent sends them, and nasty ones:
duplicate keys at every level, NaN, lone surrogates, non-canonical numbers and escapes, wrong
types, truncations, flipped bytes), ``parse_device_rows`` must accept exactly what
``parse_device_message`` accepts, refuse the rest with the same error, and give the same rows.
The fast path itself (``_canonical_rows``) must take every canonical payload (else this test
would prove nothing) and only ever accept what the reference accepts, with the same rows.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from agent.protocol import _json
from agent.protocol.messages import (
    DriftBatch,
    MessageError,
    Record,
    RecordRows,
    TelemetryBatch,
    _canonical_rows,
    parse_device_message,
    parse_device_rows,
)
from agent.protocol.topics import TopicError, device_topic
from fleet_server.ingest_parse import storage_body

DEVICE = "dev-1"
STRINGS = ["", "a", "digits-mlp", "é", "日本", "\x7f", "tab\there", 'q"uote', "back\\slash",
           "\x00nul", "\U0001f600", "line\nbreak", "\u2028"]
FLOATS = [0.0, -0.0, 1.5, 1.667, 1e-7, 1e22, 123456789.125, -3.25, 2.5e-300]


def value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        return {rng.choice([*STRINGS, "k1", "k2", "z"]): value(rng, depth + 1)
                for _ in range(rng.randrange(0, 4))}
    if depth < 3 and roll < 0.35:
        return [value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return rng.choice([None, True, False, rng.randrange(-10**6, 10**6), rng.choice(FLOATS),
                       rng.choice(STRINGS), 2**70])


def canonical_batch(rng: random.Random) -> bytes:
    seq = rng.randrange(1, 50)
    records = []
    for _ in range(rng.randrange(1, 6)):
        body = {rng.choice(["count", "p50", "model", "é", "x"]): value(rng) for _ in range(3)}
        records.append(Record(seq=seq, kind=rng.choice(["metrics.requests", "event", "k\x7f",
                                                        "ünï"]),
                              at=rng.randrange(0, 2**40), body=body))
        seq += rng.randrange(1, 3)
    extra = rng.choice([{}, {"floor": 1, "from_seq": records[0].seq}, {"z_future": [1, "x"]}])
    cls = rng.choice([TelemetryBatch, DriftBatch])
    return cls(device_id=DEVICE, records=tuple(records), unrecognized=extra).to_bytes()


def mutations(raw: bytes, rng: random.Random) -> list[bytes]:
    """Nasty variants of a canonical payload, most of them still valid JSON."""
    text = raw.decode("utf-8")
    data = json.loads(text)
    out = [
        json.dumps(data).encode(),  # spaces after separators: valid, not canonical
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode(),  # \\u escapes
        text.replace('"records":[{', '"records":[{"seq":1,', 1).encode(),  # duplicate in record
        text.replace('{"device_id"', '{"schema_version":1,"device_id"', 1).encode(),  # top dup
        text.replace('"body":{', '"body":{"a":1,"a":2,', 1).encode(),  # duplicate in a body
        text.replace('"body":{', '"body":{"n":NaN,', 1).encode(),
        text.replace('"body":{', '"body":{"n":Infinity,', 1).encode(),
        text.replace('"body":{', '"body":{"s":"\\ud800",', 1).encode(),  # lone surrogate
        text.replace('"body":{', '"body":{"s":"\\ud83d\\ude00",', 1).encode(),  # escaped pair
        text.replace('"body":{', '"body":{"s":"\\u00e9",', 1).encode(),
        text.replace('"body":{', '"body":{"f":1.50,', 1).encode(),
        text.replace('"body":{', '"body":{"f":1e2,', 1).encode(),
        text.replace('"body":{', '"body":{"f":-0,', 1).encode(),
        text.replace('"body":{', '"body":{"i":' + "9" * 5000 + ",", 1).encode(),
        text.replace('"body":{', '"body":{"f":1e999,', 1).encode(),  # overflows to inf
        text.replace('"body":{', '"body":{"f":1' + "0" * 250 + "e99,", 1).encode(),
        text.replace('"body":{', '"body":{"f":-1E+0400,', 1).encode(),
        text.replace('"body":{', '"body":{"d":' + "[" * 5000 + "]" * 5000 + ",", 1).encode(),
        text.replace('"seq":', '"seq":true,"x":', 1).encode(),
        text.replace('"seq":', '"seq":0,"x":', 1).encode(),
        text.replace('"seq":', '"seq":1.0,"x":', 1).encode(),
        text.replace('"at":', '"at":-1,"x":', 1).encode(),
        text.replace('"kind":', '"kind":"","x":', 1).encode(),
        text.replace('"schema_version":1', '"schema_version":2').encode(),
        text.replace('"schema_version":1', '"schema_version":true').encode(),
        text.replace(f'"device_id":"{DEVICE}"', '"device_id":"dev-2"').encode(),
        text.replace('"records":[', '"records":[[],', 1).encode(),
        text.replace('"body":{', '"body":[{', 1).replace("},\"kind\"", "}],\"kind\"", 1).encode(),
        b"[" + raw + b"]",
        b"\xef\xbb\xbf" + raw,  # a UTF-8 byte order mark
        raw + b" ",
        raw[:-1] + b"\xff}",
    ]
    if len(data["records"]) > 1:  # seqs out of order
        swapped = dict(data, records=data["records"][::-1])
        out.append(_json.canonical_json(swapped))
        out.append(_json.canonical_json(dict(data, records=[])))
    for _ in range(4):
        cut = rng.randrange(1, len(raw))
        out.append(raw[:cut])
        flipped = bytearray(raw)
        flipped[rng.randrange(len(raw))] = rng.randrange(256)
        out.append(bytes(flipped))
    return out


def outcome(fn: Any, topic: str, raw: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(topic, raw)
    except (MessageError, TopicError) as exc:
        return type(exc).__name__, str(exc)


def reference_rows(topic: str, raw: bytes) -> RecordRows:
    msg = parse_device_message(topic, raw)
    assert isinstance(msg, (TelemetryBatch, DriftBatch))
    return RecordRows(msg.device_id, msg.STREAM,
                      tuple((r.seq, r.kind, r.at, _json.canonical_json(r.body).decode("utf-8"))
                            for r in msg.records), msg.schema_version, dict(msg.unrecognized))


def test_fast_and_reference_paths_agree_on_thousands_of_payloads() -> None:
    rng = random.Random(7)
    fast_taken = compared = 0
    for _ in range(400):
        raw = canonical_batch(rng)
        for n, payload in enumerate([raw, *mutations(raw, rng)]):
            for kind in ("telemetry", "drift"):
                topic = device_topic(DEVICE, kind)
                want = outcome(reference_rows, topic, payload)
                got = outcome(parse_device_rows, topic, payload)
                assert got[0] == want[0], (payload[:300], want, got)
                if want[0] == "ok":
                    assert got[1] == want[1] and got[1].unrecognized == want[1].unrecognized
                else:
                    assert got[1] == want[1]
                fast = _canonical_rows(kind, DEVICE, payload)
                if fast is not None:
                    fast_taken += n == 0
                    assert want[0] == "ok", (payload[:300], want)
                    assert fast == want[1] and fast.unrecognized == want[1].unrecognized
                elif n == 0:
                    pytest.fail(f"the fast path refused a canonical batch: {raw[:300]!r}")
                compared += 1
    assert fast_taken == 800 and compared > 20_000


@pytest.mark.parametrize("text", STRINGS, ids=[repr(s) for s in STRINGS])
def test_stored_body_is_the_ascii_escaped_canonical_json(text: str) -> None:
    body = {"model": text, text: [1.5, text], "n": 3}
    assert storage_body(_json.canonical_text(body)) == json.dumps(
        body, sort_keys=True, separators=(",", ":"))


def test_a_canonical_batch_is_read_once_without_the_reference_path(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = TelemetryBatch(device_id=DEVICE, records=(
        Record(seq=3, kind="metrics", at=10, body={"p50": 1.5, "model": "m"}),),
        unrecognized={"floor": 3}).to_bytes()

    def refuse(*_args: object) -> None:
        raise AssertionError("the reference path ran for a canonical batch")

    monkeypatch.setattr("agent.protocol.messages.parse_device_message", refuse)
    rows = parse_device_rows(device_topic(DEVICE, "telemetry"), raw)
    assert rows == RecordRows(DEVICE, "telemetry", ((3, "metrics", 10, '{"model":"m","p50":1.5}'),))
    assert rows.unrecognized == {"floor": 3}

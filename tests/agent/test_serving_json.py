"""The JSON form with and without the orjson accelerator: the same accepts, refusals and numbers.

:mod:`agent.serving.wire` uses orjson, when importable, only as a fast path whose answers the
standard library's :mod:`json` defines (see its module docstring). Every case here runs both
ways: with a recording wrapper around the real orjson at the module's seam (``wire._orjson``,
what ``EDGEFLEET_JSON`` sets at import) and with the accelerator off, and the outcomes must be
equal. Each row also pins the outcome and, for the accelerated run, whether the fast path's
answer stood, so a row cannot pass by both paths being wrong together or by the fast path
never running (pure).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from agent.errors import InputRejected
from agent.protocol.manifest import TensorSpec
from agent.serving import wire

orjson = pytest.importorskip("orjson")

SPECS = (TensorSpec("x", "float32", (None, 4)), TensorSpec("ids", "int64", (None,)),
         TensorSpec("big", "uint64", (None,)), TensorSpec("mask", "bool", (None,)))


class RecordingOrjson(SimpleNamespace):
    """The real orjson behind the seam, counting what it was asked and what it returned."""

    def __init__(self) -> None:
        super().__init__(JSONDecodeError=orjson.JSONDecodeError, calls=0)

    def loads(self, data: Any) -> Any:
        self.calls += 1
        return orjson.loads(data)

    def dumps(self, value: Any) -> bytes:
        self.calls += 1
        result: bytes = orjson.dumps(value)
        return result


class CountingJson(SimpleNamespace):
    """The standard json module behind wire's name for it, counting ``loads`` calls."""

    def __init__(self) -> None:
        super().__init__(calls=0)

    def loads(self, data: Any) -> Any:
        self.calls += 1
        return json.loads(data)


def both(monkeypatch: pytest.MonkeyPatch, fn: Callable[[], Any]
         ) -> tuple[tuple[str, Any], tuple[str, Any], RecordingOrjson, int]:
    """``fn``'s outcome with the accelerator (recorded) and without it, and how many times the
    accelerated run fell back to :func:`json.loads`."""
    def outcome() -> tuple[str, Any]:
        try:
            return "ok", fn()
        except (InputRejected, ValueError, TypeError) as exc:
            return type(exc).__name__, str(exc)

    fake, std = RecordingOrjson(), CountingJson()
    monkeypatch.setattr(wire, "_orjson", fake)
    monkeypatch.setattr(wire, "json", std)
    fast = outcome()
    monkeypatch.setattr(wire, "_orjson", None)
    monkeypatch.setattr(wire, "json", json)
    return fast, outcome(), fake, std.calls


def f16(values: Any) -> np.ndarray:
    return np.array(values, np.float16)


def f32(values: Any) -> np.ndarray:
    return np.array(values, np.float32)


def f64(values: Any) -> np.ndarray:
    return np.array(values, np.float64)


def arrays(feeds: dict[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Comparable form: dtype name and values (NaN-safe through repr)."""
    return {k: (v.dtype.name, repr(v.tolist())) for k, v in feeds.items()}


BIG_INT = "123456789012345678901234567890"
REQUESTS = [
    # id, body, expected: dict of input -> (dtype, values) or the words of the refusal;
    # which path answered: "fast" (orjson's answer stands), "json" (orjson refused or its
    # answer was refused: json decided), "skip" (a long digit run: json only)
    ("floats", b'{"inputs":{"x":[[0.1,0.2,-3.5e-7,3e18]]}}',
     {"x": ("float32", repr(f32([[0.1, 0.2, -3.5e-7, 3e18]]).tolist()))}, "fast"),
    ("fraction-with-many-digits", b'{"inputs":{"x":[[0.00012345678901234567,0,0,0]]}}',
     {"x": ("float32", repr(f32([[0.00012345678901234567, 0, 0, 0]]).tolist()))}, "fast"),
    ("ints-for-a-float-input", b'{"inputs":{"x":[[1,2,3,4]]}}',
     {"x": ("float32", "[[1.0, 2.0, 3.0, 4.0]]")}, "fast"),
    ("int64-extremes", b'{"inputs":{"ids":[-9223372036854775808,9223372036854775807]}}',
     {"ids": ("int64", "[-9223372036854775808, 9223372036854775807]")}, "skip"),
    ("ints-of-18-digits", b'{"inputs":{"ids":[-999999999999999999,999999999999999999]}}',
     {"ids": ("int64", "[-999999999999999999, 999999999999999999]")}, "fast"),
    ("uint64-max", b'{"inputs":{"big":[18446744073709551615]}}',
     {"big": ("uint64", "[18446744073709551615]")}, "skip"),
    ("bools", b'{"inputs":{"mask":[true,false]}}', {"mask": ("bool", "[True, False]")}, "fast"),
    ("duplicate-key-keeps-the-last", b'{"inputs":{"x":[[9,9,9,9]],"x":[[1,2,3,4]]}}',
     {"x": ("float32", "[[1.0, 2.0, 3.0, 4.0]]")}, "fast"),
    ("nan-and-infinity-are-read", b'{"inputs":{"x":[[NaN,Infinity,-Infinity,0]]}}',
     {"x": ("float32", "[[nan, inf, -inf, 0.0]]")}, "json"),
    ("number-past-float64", b'{"inputs":{"x":[[1e400,0,0,0]]}}',
     {"x": ("float32", "[[inf, 0.0, 0.0, 0.0]]")}, "json"),
    ("huge-int-for-a-float-input", b'{"inputs":{"x":[[1,2,3,' + BIG_INT.encode() + b']]}}',
     ["'x'", "float32", "mixed values"], "skip"),
    ("huge-int-among-floats", b'{"inputs":{"x":[[1.5,2,3,' + BIG_INT.encode() + b']]}}',
     ["'x'", "float32", "mixed values"], "skip"),
    ("huge-int-for-an-int-input", b'{"inputs":{"ids":[1,-' + BIG_INT.encode() + b']}}',
     ["'ids'", "int64", "mixed values"], "skip"),
    ("past-uint64-for-uint64", b'{"inputs":{"big":[18446744073709551616]}}',
     ["'big'", "uint64", "mixed values"], "skip"),
    ("big-float-is-kept", b'{"inputs":{"x":[[1e19,0,0,0]]}}',
     {"x": ("float32", repr(f32([[1e19, 0, 0, 0]]).tolist()))}, "fast"),
    ("fraction-for-an-int-input", b'{"inputs":{"ids":[1.5]}}',
     ["'ids'", "int64", "fractional"], "json"),
    ("int-out-of-range", b'{"inputs":{"ids":[9223372036854775808]}}',
     ["'ids'", "int64", "9223372036854775808"], "skip"),
    ("strings", b'{"inputs":{"x":[["a","b","c","d"]]}}', ["'x'", "strings"], "json"),
    ("null", b'{"inputs":{"x":[[null,1,2,3]]}}', ["'x'", "mixed values"], "json"),
    ("ragged", b'{"inputs":{"x":[[1,2,3,4],[1]]}}', ["'x'", "ragged"], "json"),
    ("unknown-input", b'{"inputs":{"y":[1]}}', ["unknown input 'y'"], "json"),
    ("not-an-object", b"[1,2,3]", ['{"inputs"'], "json"),
    ("malformed", b'{"inputs":{"x":[[1,2', ["request body is not JSON", "Expecting"], "json"),
    ("leading-zero", b'{"inputs":{"x":[[01,2,3,4]]}}', ["request body is not JSON"], "json"),
    ("utf16-body", '{"inputs":{"x":[[1,2,3,4]]}}'.encode("utf-16"),
     {"x": ("float32", "[[1.0, 2.0, 3.0, 4.0]]")}, "json"),
    ("utf8-bom", b'\xef\xbb\xbf{"inputs":{"x":[[1,2,3,4]]}}',
     {"x": ("float32", "[[1.0, 2.0, 3.0, 4.0]]")}, "json"),
    ("invalid-utf8", b'{"inputs":{"\xff":[1]}}', ["not JSON", "utf-8"], "json"),
    ("lone-surrogate-key", b'{"inputs":{"\\ud800":[1]}}', ["unknown input '\\ud800'"], "json"),
    ("nested-too-deeply", b'{"inputs":{"x":' + b"[" * 5000 + b"]" * 5000 + b"}}",
     ["not JSON", "nested too deeply"], "json"),
]


@pytest.mark.parametrize(("body", "expected", "path"), [c[1:] for c in REQUESTS],
                         ids=[c[0] for c in REQUESTS])
def test_decode_json_inputs_same_either_way(monkeypatch: pytest.MonkeyPatch, body: bytes,
                                            expected: dict[str, Any] | list[str],
                                            path: str) -> None:
    decoded_the_same(monkeypatch, lambda: arrays(wire.decode_json_inputs(body, SPECS)),
                     expected, path)


def decoded_the_same(monkeypatch: pytest.MonkeyPatch, decode: Callable[[], Any],
                     expected: dict[str, Any] | list[str], path: str) -> None:
    """``decode`` gives the same outcome with orjson and with json, ``expected`` (the arrays,
    or words of the refusal), and took ``path`` (fast, fast then json, or json alone)."""
    fast, slow, fake, fallbacks = both(monkeypatch, decode)
    assert fast == slow
    assert (fake.calls, fallbacks) == {"fast": (1, 0), "json": (1, 1), "skip": (0, 1)}[path]
    if isinstance(expected, dict):
        assert slow == ("ok", expected)
    else:
        assert slow[0] == "InputRejected"
        for word in expected:
            assert word in slow[1]


OUTPUTS = [
    # id, outputs, whether orjson's text stands (False: json wrote it)
    ("float32", {"p": f32([[0.1, 1e-5, 3.4e38, -0.0, 1.17549435e-38]])}, True),
    ("float64-and-float16", {"a": np.array([1 / 3, 5e-324]), "h": f16([0.1, 65504])},
     True),
    ("ints-and-bools", {"i": np.array([np.iinfo(np.int64).min, 0], np.int64),
                        "u": np.array([np.iinfo(np.uint64).max], np.uint64),
                        "b": np.array([True, False])}, True),
    ("zero-dim-and-empty", {"s": f32(2.5), "e": np.zeros((0, 3), np.float32)}, True),
    ("non-contiguous", {"t": np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]}, True),
    ("nan-and-infinity", {"p": f32([np.nan, np.inf, -np.inf, 1.0])}, False),
]


@pytest.mark.parametrize(("outputs", "fast_stands"), [c[1:] for c in OUTPUTS],
                         ids=[c[0] for c in OUTPUTS])
def test_encode_json_prediction_same_numbers_either_way(
        monkeypatch: pytest.MonkeyPatch, outputs: dict[str, np.ndarray],
        fast_stands: bool) -> None:
    fast, slow, fake, _ = both(monkeypatch,
                               lambda: wire.encode_json_prediction("m", "1", outputs))
    assert fake.calls == 1
    assert fast[0] == slow[0] == "ok"
    lists = {k: np.asarray(v).tolist() for k, v in outputs.items()}
    doc = {"model": "m", "version": "1", "outputs": lists}
    # orjson's text where it stands, else exactly json's
    assert fast[1] == (orjson.dumps(doc) if fast_stands else slow[1])
    # both parse (with json) to the same doubles: the model's values as float64
    assert repr(json.loads(fast[1])) == repr(json.loads(slow[1])) == repr(doc)


def test_float32_outputs_are_written_as_their_float64_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Not float32's shortest repr: 0.1f is 0.10000000149011612, and the reader gets that."""
    monkeypatch.setattr(wire, "_orjson", RecordingOrjson())
    text = wire.encode_json_prediction("m", "1", {"p": f32([0.1])})
    assert b"0.10000000149011612" in text
    got = wire.decode_json_prediction(text).outputs["p"]
    assert got.dtype == np.float64
    assert got.astype(np.float32).tobytes() == f32([0.1]).tobytes()


INPUTS = [
    # id, inputs, expected text from both ways (None: any, as long as they parse the same),
    # or the words of the ValueError
    ("array", {"x": f32([[0.5, 1e-5]])}, None),
    ("nested-lists", {"x": [[1, 2], [3, 4]]}, None),
    ("nan-is-written-as-json-does", {"x": f64([np.nan, np.inf])},
     b'{"inputs":{"x":[NaN,Infinity]}}'),
    ("int-key-is-converted-as-json-does", {1: f64([1.0])}, b'{"inputs":{"1":[1.0]}}'),
    ("object-values-refused", {"x": [object()]}, ["inputs are not numbers"]),
    ("huge-int", {"x": [10**30]}, b'{"inputs":{"x":[' + b"1" + b"0" * 30 + b"]}}"),
]


@pytest.mark.parametrize(("inputs", "expected"), [c[1:] for c in INPUTS],
                         ids=[c[0] for c in INPUTS])
def test_encode_json_inputs_same_either_way(monkeypatch: pytest.MonkeyPatch,
                                            inputs: dict[Any, Any],
                                            expected: bytes | list[str] | None) -> None:
    fast, slow, _, _ = both(monkeypatch, lambda: wire.encode_json_inputs(inputs))
    if isinstance(expected, list):
        assert fast == slow
        assert slow[0] == "ValueError"
        for word in expected:
            assert word in slow[1]
        return
    assert fast[0] == slow[0] == "ok"
    assert repr(json.loads(fast[1])) == repr(json.loads(slow[1]))
    if expected is not None:
        assert fast[1] == slow[1] == expected


RESPONSES = [
    # id, body, expected (outputs as dtype and values) or the words of the refusal; which
    # path answered (as in REQUESTS)
    ("plain", b'{"model":"m","version":"1","outputs":{"p":[[0.25,1e-5]],"l":[3]}}',
     {"p": ("float64", "[[0.25, 1e-05]]"), "l": ("int64", "[3]")}, "fast"),
    ("nan", b'{"model":"m","version":"1","outputs":{"p":[NaN,Infinity]}}',
     {"p": ("float64", "[nan, inf]")}, "json"),
    ("huge-int", b'{"model":"m","version":"1","outputs":{"p":[' + BIG_INT.encode() + b"]}}",
     {"p": ("object", f"[{BIG_INT}]")}, "skip"),
    ("wrong-shape", b'{"model":"m","outputs":{}}', ['{"model": str'], "json"),
    ("not-json", b"<html>", ["response body is not JSON"], "json"),
]


@pytest.mark.parametrize(("body", "expected", "path"), [c[1:] for c in RESPONSES],
                         ids=[c[0] for c in RESPONSES])
def test_decode_json_prediction_same_either_way(monkeypatch: pytest.MonkeyPatch, body: bytes,
                                                expected: dict[str, Any] | list[str],
                                                path: str) -> None:
    decoded_the_same(monkeypatch, lambda: arrays(wire.decode_json_prediction(body).outputs),
                     expected, path)


def test_random_floats_round_trip_to_the_same_doubles(monkeypatch: pytest.MonkeyPatch) -> None:
    """orjson's float reading and writing agree with json's on many values of every scale."""
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.standard_normal(3000),
                             np.exp(rng.uniform(-700, 700, 3000)) * rng.choice([-1, 1], 3000),
                             rng.random(3000).astype(np.float32).astype(np.float64)])
    outputs = {"v": values}
    fast, _, _, _ = both(monkeypatch,
                         lambda: wire.encode_json_prediction("m", "1", outputs))
    assert fast[0] == "ok"
    assert json.loads(fast[1])["outputs"]["v"] == values.tolist()
    # and reading: the same text through both parsers gives the same doubles
    small = values[np.abs(values) < 1e18]  # larger ones are re-read by json (see the wire)
    small = small[: len(small) // 4 * 4]
    text = b'{"inputs":{"x":' + json.dumps(small.reshape(-1, 4).tolist()).encode() + b"}}"
    spec = (TensorSpec("x", "float64", (None, 4)),)
    fast_in, slow_in, _, fallbacks = both(monkeypatch,
                                          lambda: wire.decode_json_inputs(text, spec)["x"])
    assert fallbacks == 0
    assert fast_in[0] == slow_in[0] == "ok"
    assert fast_in[1].tobytes() == slow_in[1].tobytes()


@pytest.mark.parametrize(("environ", "accelerated"), [
    ({}, True), ({wire.JSON_ENV_VAR: "auto"}, True), ({wire.JSON_ENV_VAR: ""}, True),
    ({wire.JSON_ENV_VAR: "stdlib"}, False),
], ids=["unset", "auto", "empty", "stdlib"])
def test_env_var_turns_the_accelerator_off(environ: dict[str, str], accelerated: bool) -> None:
    got = wire._accelerator(environ)
    assert (got is orjson) if accelerated else (got is None)


def test_env_var_typo_warns_and_keeps_the_accelerator() -> None:
    with pytest.warns(UserWarning, match="EDGEFLEET_JSON: expected auto or stdlib, got 'stdlb'"):
        got = wire._accelerator({wire.JSON_ENV_VAR: "stdlb"})
    assert got is orjson

"""The bundle manifest: round trips, forward compatibility, and errors that name the field."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.manifest import (
    DTYPES,
    MAX_MANIFEST_BYTES,
    SCHEMA_VERSION,
    Manifest,
    ManifestError,
    Tensor,
    TensorSpec,
    is_plain_name,
    sha256_file,
)


def _tensor(shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return Tensor(dtype, tuple(shape), bytes(DTYPES[dtype] * _prod(shape))).to_dict()


def _prod(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def valid() -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "model": {"name": "digits", "version": "1.2.0"},
        "profile": "rpi4",
        "runtime": "onnxruntime",
        "precision": "int8-static",
        "task": "classification",
        "file": {"path": "model.onnx", "sha256": "a" * 64, "length": 1234},
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["N", 64]}],
        "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [None, 10]}],
        "golden": {"inputs": {"input": _tensor([2, 64])},
                   "outputs": {"probabilities": _tensor([2, 10])},
                   "atol": 0.1, "rtol": 0.0, "min_agreement": 0.97},
        "validation": {"top1_agreement": 0.99},
        "candidates": [{"precision": "int8-static", "chosen": True}],
        "drift_baseline": {"version": 1},
        "lineage": {"source_sha256": "b" * 64},
    }


def test_round_trip_is_stable_and_canonical() -> None:
    m = Manifest.from_dict(valid())
    again = Manifest.from_bytes(m.to_bytes())
    assert again == m
    assert again.to_bytes() == m.to_bytes()
    assert m.inputs[0].shape == ("N", 64)  # a symbolic dim keeps its name...
    assert m.inputs[0].static_shape == (None, 64)  # ...and is dynamic
    assert m.golden.inputs["input"].shape == (2, 64)


def test_unknown_fields_survive_a_round_trip_at_every_level() -> None:
    d = valid()
    d["future_top"] = {"x": [1, 2]}
    d["model"]["family"] = "vision"
    d["file"]["compression"] = "none"
    d["inputs"][0]["layout"] = "NC"
    d["golden"]["seed"] = 7
    out = json.loads(Manifest.from_dict(copy.deepcopy(d)).to_bytes())
    assert out["future_top"] == {"x": [1, 2]}
    assert out["model"]["family"] == "vision"
    assert out["file"]["compression"] == "none"
    assert out["inputs"][0]["layout"] == "NC"
    assert out["golden"]["seed"] == 7


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        keys = path.split(".")
        target: Any = d
        for k in keys[:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = keys[-1]
        if value is _DELETE:
            target.pop(last, None)
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return mutate


_DELETE = object()


def _nested(depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(depth):
        out = {"a": out}
    return out

BAD = [
    ("newer-schema", _set("schema_version", SCHEMA_VERSION + 1), "schema_version"),
    ("schema-not-int", _set("schema_version", "1"), "schema_version"),
    ("no-model", _set("model", _DELETE), "model"),
    ("name-with-slash", _set("model.name", "../evil"), "model.name"),
    ("name-dot-dot", _set("model.name", ".."), "model.name"),
    ("name-with-space", _set("model.name", "my model"), "model.name"),
    ("name-not-ascii", _set("model.name", "modèle"), "model.name"),
    ("empty-version", _set("model.version", ""), "model.version"),
    ("version-dot", _set("model.version", "."), "model.version"),
    ("version-dot-dot", _set("model.version", ".."), "model.version"),
    ("version-hidden", _set("model.version", ".1"), "model.version"),
    ("version-slash", _set("model.version", "1/2"), "model.version"),
    ("version-backslash", _set("model.version", "1\\2"), "model.version"),
    ("version-nul", _set("model.version", "1\x002"), "model.version"),
    ("version-space", _set("model.version", "1.0 beta"), "model.version"),
    ("version-trailing-newline", _set("model.version", "1.0\n"), "model.version"),
    ("version-not-a-string", _set("model.version", 1), "model.version"),
    ("empty-profile", _set("profile", ""), "profile"),
    ("profile-dot-dot", _set("profile", ".."), "profile"),
    ("profile-path", _set("profile", "rpi4/../../etc"), "profile"),
    ("profile-backslash", _set("profile", "rpi4\\x"), "profile"),
    ("profile-nul", _set("profile", "rpi4\x00"), "profile"),
    ("profile-hidden", _set("profile", ".rpi4"), "profile"),
    ("profile-space", _set("profile", "rpi 4"), "profile"),
    ("unknown-runtime", _set("runtime", "tensorrt"), "runtime"),
    ("unknown-precision", _set("precision", "int4"), "precision"),
    ("unknown-task", _set("task", "ranking"), "task"),
    ("file-for-other-runtime", _set("file.path", "model.tflite"), "file.path"),
    ("short-sha", _set("file.sha256", "abc"), "file.sha256"),
    ("upper-sha", _set("file.sha256", "A" * 64), "file.sha256"),
    ("zero-length", _set("file.length", 0), "file.length"),
    ("bool-length", _set("file.length", True), "file.length"),
    ("no-inputs", _set("inputs", []), "inputs"),
    ("bad-dtype", _set("inputs.0.dtype", "complex64"), "inputs[0].dtype"),
    ("negative-dim", _set("inputs.0.shape", [-1, 64]), "inputs[0].shape[0]"),
    ("duplicate-output", _set("outputs", [{"name": "a", "dtype": "float32", "shape": [1]}] * 2),
     "outputs"),
    ("golden-unknown-input", _set("golden.inputs", {"nope": _tensor([1, 64])}),
     "golden.inputs.nope"),
    ("golden-wrong-shape", _set("golden.inputs", {"input": _tensor([2, 63])}),
     "golden.inputs.input"),
    ("golden-input-wrong-dtype", _set("golden.inputs", {"input": _tensor([2, 64], "float64")}),
     "golden.inputs.input"),
    ("golden-output-unknown", _set("golden.outputs", {"nope": _tensor([2, 10])}),
     "golden.outputs.nope"),
    ("golden-output-wrong-dtype",
     _set("golden.outputs", {"probabilities": _tensor([2, 10], "float16")}),
     "golden.outputs.probabilities"),
    ("golden-output-wrong-shape", _set("golden.outputs", {"probabilities": _tensor([2, 9])}),
     "golden.outputs.probabilities"),
    ("golden-output-wrong-rank", _set("golden.outputs", {"probabilities": _tensor([20])}),
     "golden.outputs.probabilities"),
    ("golden-bytes-short", _set("golden.inputs.input.b64", "AAAA"), "golden.inputs.input.b64"),
    ("golden-not-base64", _set("golden.inputs.input.b64", "!!"), "golden.inputs.input.b64"),
    ("negative-atol", _set("golden.atol", -1), "golden.atol"),
    ("nan-atol", _set("golden.atol", float("nan")), "golden.atol"),
    ("agreement-over-1", _set("golden.min_agreement", 1.5), "golden.min_agreement"),
    ("validation-not-object", _set("validation", []), "validation"),
    ("no-lineage", _set("lineage", _DELETE), "lineage"),
    ("schema-version-too-big-to-print", _set("schema_version", 10**5000), "schema_version"),
    ("nan-in-lineage", _set("lineage.x", float("nan")), "lineage.x"),
    ("infinity-in-unknown-field", _set("future", [1, float("inf")]), "future[1]"),
    ("not-json-in-validation", _set("validation.when", object()), "validation.when"),
    ("non-string-key", _set("drift_baseline", {1: "x"}), "drift_baseline"),
    ("nested-too-deep", _set("lineage", _nested(150)), "lineage" + ".a" * 99),
]


@pytest.mark.parametrize(("mutate", "field"), [(m, f) for _, m, f in BAD],
                         ids=[i for i, _, _ in BAD])
def test_bad_manifest_names_the_field(mutate: Any, field: str) -> None:
    d = valid()
    mutate(d)
    with pytest.raises(ManifestError) as info:
        Manifest.from_dict(d)
    assert info.value.path == field
    assert "expected" in str(info.value) and field in str(info.value)


def test_verify_model_bytes_says_expected_and_actual() -> None:
    m = Manifest.from_dict(valid())
    m.verify_model_bytes(1234, "a" * 64)
    with pytest.raises(ManifestError, match=r"expected 1234 bytes, got 1235 bytes"):
        m.verify_model_bytes(1235, "a" * 64)
    with pytest.raises(ManifestError, match=r"file\.sha256"):
        m.verify_model_bytes(1234, "c" * 64)


def test_sha256_file_takes_a_path(tmp_path: Path) -> None:
    f = tmp_path / "model.onnx"
    f.write_bytes(b"abc")
    assert sha256_file(f) == (3, hashlib.sha256(b"abc").hexdigest())
    assert sha256_file(str(f)) == sha256_file(f)


# ---------------------------------------------------------------------------------------------
# round trips: what is read is written back, in the same place
# ---------------------------------------------------------------------------------------------
_ABSENT = object()


def _get(d: Any, path: str) -> Any:
    for key in path.split("."):
        if isinstance(d, list):
            d = d[int(key)]
        elif key in d:
            d = d[key]
        else:
            return _ABSENT
    return d


def _keep(d: dict[str, Any]) -> None:
    """No change: the row checks something :func:`valid` already holds."""


ROUND_TRIPS = [
    # an unknown top-level field with the name the model object's leftovers once hid under
    ("top-level-model_unrecognized-stays-top-level",
     _set("model_unrecognized", {"name": "evil"}), "model_unrecognized", {"name": "evil"}),
    ("top-level-model_unrecognized-leaves-the-name-alone",
     _set("model_unrecognized", {"name": "evil"}), "model.name", "digits"),
    ("model-unknown-field", _set("model.family", "vision"), "model.family", "vision"),
    ("golden-input-tensor-unknown-field", _set("golden.inputs.input.layout", "NC"),
     "golden.inputs.input.layout", "NC"),
    ("golden-output-tensor-unknown-field", _set("golden.outputs.probabilities.note", [1]),
     "golden.outputs.probabilities.note", [1]),
    ("symbolic-dim-keeps-its-name", _keep, "inputs.0.shape", ["N", 64]),
    ("null-dim-stays-null", _keep, "outputs.0.shape", [None, 10]),
    ("min_runtime_version", _set("min_runtime_version", "1.17"), "min_runtime_version", "1.17"),
    ("plus-and-underscore-in-version", _set("model.version", "1.0.0+build_5"), "model.version",
     "1.0.0+build_5"),
    # null == absent for optional known fields: one meaning, one canonical form
    ("null-min_runtime_version-is-absent", _set("min_runtime_version", None),
     "min_runtime_version", _ABSENT),
    ("null-min_agreement-is-absent", _set("golden.min_agreement", None), "golden.min_agreement",
     _ABSENT),
    ("null-candidates-is-empty", _set("candidates", None), "candidates", []),
    ("absent-candidates-is-empty", _set("candidates", _DELETE), "candidates", []),
]


@pytest.mark.parametrize(("mutate", "path", "expected"), [r[1:] for r in ROUND_TRIPS],
                         ids=[r[0] for r in ROUND_TRIPS])
def test_round_trip_writes_back_what_it_read(mutate: Any, path: str, expected: Any) -> None:
    d = valid()
    mutate(d)
    m = Manifest.from_dict(d)
    raw = m.to_bytes()
    assert _get(json.loads(raw), path) == expected
    assert _get(m.to_dict(), path) == expected
    again = Manifest.from_bytes(raw)
    assert again == m and again.to_bytes() == raw


NULL_IS_ABSENT = ["min_runtime_version", "golden.min_agreement", "candidates"]


@pytest.mark.parametrize("path", NULL_IS_ABSENT, ids=NULL_IS_ABSENT)
def test_null_optional_field_means_absent(path: str) -> None:
    with_null, without = valid(), valid()
    _set(path, None)(with_null)
    _set(path, _DELETE)(without)
    assert Manifest.from_dict(with_null) == Manifest.from_dict(without)
    assert Manifest.from_dict(with_null).to_bytes() == Manifest.from_dict(without).to_bytes()


ACCEPTS_SHAPE = [
    ("symbolic-batch", ("N", 64), (2, 64), True),
    ("null-batch", (None, 64), (7, 64), True),
    ("all-fixed", (2, 64), (2, 64), True),
    ("fixed-dim-differs", ("N", 64), (2, 63), False),
    ("fixed-batch-differs", (1, 64), (2, 64), False),
    ("rank-differs", ("N",), (2, 64), False),
    ("scalar", (), (), True),
]


@pytest.mark.parametrize(("spec", "shape", "ok"), [r[1:] for r in ACCEPTS_SHAPE],
                         ids=[r[0] for r in ACCEPTS_SHAPE])
def test_symbolic_and_null_dims_are_both_dynamic(spec: tuple[int | str | None, ...],
                                                 shape: tuple[int, ...], ok: bool) -> None:
    ts = TensorSpec("x", "float32", spec)
    assert ts.accepts_shape(shape) is ok
    assert ts.static_shape == tuple(d if isinstance(d, int) else None for d in spec)


PLAIN_NAMES = [
    ("semver", "1.2.0", True),
    ("semver-build", "1.0.0+build.5", True),
    ("profile", "rpi-zero2w", True),
    ("underscore-start", "_x", True),
    ("empty", "", False),
    ("dot", ".", False),
    ("dot-dot", "..", False),
    ("leading-dot", ".v1", False),
    ("slash", "a/b", False),
    ("backslash", "a\\b", False),
    ("nul", "a\x00b", False),
    ("space", "a b", False),
    ("trailing-newline", "v1\n", False),
    ("non-ascii-digit", "v\u0661", False),
    ("not-a-string", 1, False),
]


@pytest.mark.parametrize(("value", "ok"), [r[1:] for r in PLAIN_NAMES],
                         ids=[r[0] for r in PLAIN_NAMES])
def test_plain_name_rule(value: object, ok: bool) -> None:
    assert is_plain_name(value) is ok


# ---------------------------------------------------------------------------------------------
# bytes in and out: strict JSON, bounded size
# ---------------------------------------------------------------------------------------------
def _raw(path: str, literal: bytes) -> bytes:
    """valid() as JSON bytes with the value at ``path`` replaced by the raw ``literal``."""
    d = valid()
    _set(path, "@@MARK@@")(d)
    return json.dumps(d).encode().replace(b'"@@MARK@@"', literal)


FROM_BYTES = [
    ("not-utf8", b"\xff\xfe", "UnicodeDecodeError"),
    ("not-json", b"{not json", "JSONDecodeError"),
    ("not-object", b"[]", "an object"),
    ("nan", _raw("golden.atol", b"NaN"), "NaN is not JSON"),
    ("infinity", _raw("golden.rtol", b"Infinity"), "Infinity is not JSON"),
    ("minus-infinity", _raw("lineage.x", b"-Infinity"), "-Infinity is not JSON"),
    ("nan-in-unknown-field", _raw("future", b"[NaN]"), "NaN is not JSON"),
    ("huge-integer", _raw("file.length", b"9" * 5000), "ValueError"),
    ("deep-nesting", _raw("lineage.x", b"[" * 100_000 + b"]" * 100_000), "RecursionError"),
    ("duplicate-key", _raw("lineage", b'{"a": 1, "a": 2}'), "duplicate key 'a'"),
    ("lone-surrogate", _raw("lineage.x", b'"\\ud800"'), "lone surrogates"),
    ("over-the-size-limit", b" " * (MAX_MANIFEST_BYTES + 1),
     f"at most {MAX_MANIFEST_BYTES} bytes, got {MAX_MANIFEST_BYTES + 1} bytes"),
]


@pytest.mark.parametrize(("raw", "detail"), [r[1:] for r in FROM_BYTES],
                         ids=[r[0] for r in FROM_BYTES])
def test_from_bytes_refuses_what_is_not_strict_json(raw: bytes, detail: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(raw)
    assert info.value.path == "manifest"
    assert detail in str(info.value)


# what strict JSON parsing lets through and a manifest still refuses, naming the field as
# from_dict does (from_bytes checks a fresh parse in place instead of copying it)
FROM_BYTES_FIELDS = [
    ("float-overflow-in-lineage", _raw("lineage.x", b"1e999"), "lineage.x"),
    ("negative-overflow-in-unknown-field", _raw("future", b"[1, -1e999]"), "future[1]"),
    ("float-overflow-as-tolerance", _raw("golden.atol", b"1e400"), "golden.atol"),
    ("long-mantissa-overflow", _raw("drift_baseline.edges", b"[0.5, 1" + b"0" * 400 + b".0]"),
     "drift_baseline.edges[1]"),
    ("nested-too-deep", _raw("lineage", json.dumps(_nested(150)).encode()),
     "lineage" + ".a" * 99),
]


@pytest.mark.parametrize(("raw", "field"), [r[1:] for r in FROM_BYTES_FIELDS],
                         ids=[r[0] for r in FROM_BYTES_FIELDS])
def test_from_bytes_refuses_what_strict_json_lets_through(raw: bytes, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(raw)
    assert info.value.path == field
    assert "expected" in str(info.value)


# the edges of what from_bytes checks after strict parsing: the largest double is
# 1.7976931348623157e308 (a literal past it parses as infinity), and nesting may go 100 levels
# deep (the root object is level 1, so lineage=_nested(98) is level 100)
FROM_BYTES_EDGES = [
    ("largest-power-of-ten", _raw("lineage.x", b"1e308"), "lineage.x", 1e308),
    ("largest-double", _raw("lineage.x", b"1.7976931348623157e308"), "lineage.x",
     1.7976931348623157e308),
    ("309-digit-float", _raw("lineage.x", b"1" + b"0" * 308 + b".0"), "lineage.x", 1e308),
    ("underflow-is-zero", _raw("lineage.x", b"1e-400"), "lineage.x", 0.0),
    ("400-digit-integer", _raw("lineage.x", b"9" * 400), "lineage.x", int("9" * 400)),
    ("exponent-in-a-string", _raw("lineage.x", b'"1e999 ]]] {{{"'), "lineage.x",
     "1e999 ]]] {{{"),
    ("nesting-at-the-limit", _raw("lineage", json.dumps(_nested(98)).encode()),
     "lineage" + ".a" * 98, {}),
]


@pytest.mark.parametrize(("raw", "field", "value"), [r[1:] for r in FROM_BYTES_EDGES],
                         ids=[r[0] for r in FROM_BYTES_EDGES])
def test_from_bytes_accepts_up_to_the_edges(raw: bytes, field: str, value: Any) -> None:
    got = _get(Manifest.from_bytes(raw).to_dict(), field)
    assert got == value and type(got) is type(value)


PAST_THE_EDGES = [
    ("one-power-of-ten-over", _raw("lineage.x", b"1e309"), "lineage.x"),
    ("just-over-the-largest-double", _raw("lineage.x", b"1.8e308"), "lineage.x"),
    ("exponent-with-plus", _raw("lineage.x", b"1E+309"), "lineage.x"),
    ("two-digit-exponent-long-mantissa", _raw("lineage.x", b"2" + b"0" * 209 + b"e99"),
     "lineage.x"),
    ("400-digit-float", _raw("lineage.x", b"4" + b"0" * 399 + b".5"), "lineage.x"),
    ("nesting-one-past-the-limit", _raw("lineage", json.dumps(_nested(99)).encode()),
     "lineage" + ".a" * 99),
    # for any check on the text: counted with the brackets in strings (a "]" before, a "["
    # after), this nests only 100 deep
    ("deep-between-brackets-in-strings", _raw("lineage", json.dumps(
        {"s": "]", "deep": _nested(98), "t": "["}).encode()),
     "lineage.deep" + ".a" * 98),
]


@pytest.mark.parametrize(("raw", "field"), [r[1:] for r in PAST_THE_EDGES],
                         ids=[r[0] for r in PAST_THE_EDGES])
def test_from_bytes_refuses_past_the_edges(raw: bytes, field: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_bytes(raw)
    assert info.value.path == field
    assert "expected" in str(info.value)


def test_from_bytes_builds_what_from_dict_builds_and_shares_nothing() -> None:
    raw = json.dumps(_rich()).encode()
    m = Manifest.from_bytes(raw)
    assert m == Manifest.from_dict(_rich())
    assert m.to_bytes() == Manifest.from_dict(_rich()).to_bytes()
    before = m.to_bytes()
    m.to_dict()["lineage"]["tools"]["onnx"] = "0"
    m.to_dict()["candidates"][0]["chosen"] = False
    assert m.to_bytes() == before
    # what it holds is plain JSON: a replace() copies and checks it like any other value
    assert type(m.lineage) is dict and all(type(c) is dict for c in m.candidates)
    lineage = m.lineage
    changed = replace(m, profile="rpi5")
    assert changed.lineage == lineage and changed.lineage is not lineage


def test_from_bytes_accepts_what_it_refuses_only_past_the_limit() -> None:
    m = Manifest.from_dict(valid())
    raw = m.to_bytes()
    padded = raw + b" " * (MAX_MANIFEST_BYTES - len(raw))
    assert len(padded) == MAX_MANIFEST_BYTES
    assert Manifest.from_bytes(padded) == m


def _golden(**changes: Any) -> Any:
    def change(m: Manifest) -> Manifest:
        return replace(m, golden=replace(m.golden, **changes))
    return change


TO_BYTES = [
    ("nan-atol", _golden(atol=float("nan")), "no NaN"),
    ("infinite-rtol", _golden(rtol=float("inf")), "no NaN"),
    ("lone-surrogate", lambda m: replace(m, lineage={"x": "\ud800"}), "lone surrogates"),
    ("over-the-size-limit", lambda m: replace(m, lineage={"x": "x" * MAX_MANIFEST_BYTES}),
     f"at most {MAX_MANIFEST_BYTES} bytes"),
]


@pytest.mark.parametrize(("change", "detail"), [r[1:] for r in TO_BYTES],
                         ids=[r[0] for r in TO_BYTES])
def test_to_bytes_refuses_what_from_bytes_would(change: Any, detail: str) -> None:
    m = change(Manifest.from_dict(valid()))
    with pytest.raises(ManifestError) as info:
        m.to_bytes()
    assert detail in str(info.value)


def test_to_bytes_is_standard_json() -> None:
    raw = Manifest.from_dict(valid()).to_bytes()
    assert raw.endswith(b"}\n") and b"NaN" not in raw and b"Infinity" not in raw
    json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))


# ---------------------------------------------------------------------------------------------
# no shared mutable state with the caller
# ---------------------------------------------------------------------------------------------
def _rich() -> dict[str, Any]:
    d = valid()
    d["lineage"]["tools"] = {"onnx": "1.17"}
    d["future"] = {"x": [1, 2]}
    d["model"]["tags"] = ["a"]
    d["inputs"][0]["layout"] = {"order": ["N", "C"]}
    d["golden"]["inputs"]["input"]["meta"] = {"seed": [7]}
    return d


ALIASING = [
    ("input-validation", lambda src, m: src["validation"].update(top1_agreement=0.0)),
    ("input-nested-lineage", lambda src, m: src["lineage"]["tools"].update(onnx="0")),
    ("input-candidate", lambda src, m: src["candidates"][0].update(chosen=False)),
    ("input-drift-baseline", lambda src, m: src["drift_baseline"].clear()),
    ("input-unknown-top-level", lambda src, m: src["future"]["x"].append(3)),
    ("input-unknown-model-field", lambda src, m: src["model"]["tags"].append("b")),
    ("input-unknown-spec-field", lambda src, m: src["inputs"][0]["layout"]["order"].pop()),
    ("input-unknown-tensor-field",
     lambda src, m: src["golden"]["inputs"]["input"]["meta"]["seed"].append(8)),
    ("to_dict-lineage", lambda src, m: m.to_dict()["lineage"]["tools"].update(onnx="0")),
    ("to_dict-unknown-top-level", lambda src, m: m.to_dict()["future"]["x"].append(3)),
    ("to_dict-unknown-model-field", lambda src, m: m.to_dict()["model"]["tags"].append("b")),
    ("to_dict-candidate", lambda src, m: m.to_dict()["candidates"][0].update(chosen=False)),
    ("to_dict-unknown-spec-field",
     lambda src, m: m.to_dict()["inputs"][0]["layout"]["order"].pop()),
]


@pytest.mark.parametrize("change", [r[1] for r in ALIASING], ids=[r[0] for r in ALIASING])
def test_manifest_shares_no_mutable_state_with_its_caller(change: Any) -> None:
    src = _rich()
    m = Manifest.from_dict(src)
    before = m.to_bytes()
    change(src, m)
    assert m.to_bytes() == before


def test_direct_construction_copies_its_arguments() -> None:
    lineage: dict[str, Any] = {"tools": {"onnx": "1.17"}}
    unknown: dict[str, Any] = {"future": [1]}
    m = replace(Manifest.from_dict(valid()), lineage=lineage, unrecognized=unknown)
    before = m.to_bytes()
    lineage["tools"]["onnx"] = "0"
    unknown["future"].append(2)
    assert m.to_bytes() == before


CLASHES = [
    ("tensor-spec", lambda m: TensorSpec("x", "float32", (1,), unrecognized={"shape": [2]})),
    ("tensor", lambda m: Tensor("float32", (1,), bytes(4), unrecognized={"b64": ""})),
    ("file", lambda m: replace(m.file, unrecognized={"sha256": "0" * 64})),
    ("golden", lambda m: replace(m.golden, unrecognized={"atol": 1.0})),
    ("manifest", lambda m: replace(m, unrecognized={"profile": "other"})),
    ("model", lambda m: replace(m, model_unrecognized={"name": "other"})),
]


@pytest.mark.parametrize("build", [r[1] for r in CLASHES], ids=[r[0] for r in CLASHES])
def test_unrecognized_may_not_shadow_a_known_field(build: Any) -> None:
    """Writing it back would overwrite the known field (the `model_unrecognized` bug class)."""
    with pytest.raises(ValueError, match="known field"):
        build(Manifest.from_dict(valid()))

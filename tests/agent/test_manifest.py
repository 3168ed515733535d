"""The bundle manifest: round trips, forward compatibility, and errors that name the field."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from agent.protocol.manifest import SCHEMA_VERSION, Manifest, ManifestError, Tensor


def _tensor(shape: list[int], dtype: str = "float32") -> dict[str, Any]:
    return Tensor(dtype, tuple(shape), bytes(4 * _prod(shape))).to_dict()


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
    assert m.inputs[0].shape == (None, 64)  # symbolic dims are dynamic
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
            del target[last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return mutate


_DELETE = object()

BAD = [
    ("newer-schema", _set("schema_version", SCHEMA_VERSION + 1), "schema_version"),
    ("schema-not-int", _set("schema_version", "1"), "schema_version"),
    ("no-model", _set("model", _DELETE), "model"),
    ("name-with-slash", _set("model.name", "../evil"), "model.name"),
    ("empty-version", _set("model.version", ""), "model.version"),
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
    ("golden-unknown-input", _set("golden.inputs", {"nope": _tensor([1, 64])}), "golden.inputs.nope"),
    ("golden-wrong-shape", _set("golden.inputs", {"input": _tensor([2, 63])}), "golden.inputs.input"),
    ("golden-bytes-short", _set("golden.inputs.input.b64", "AAAA"), "golden.inputs.input.b64"),
    ("golden-not-base64", _set("golden.inputs.input.b64", "!!"), "golden.inputs.input.b64"),
    ("negative-atol", _set("golden.atol", -1), "golden.atol"),
    ("nan-atol", _set("golden.atol", float("nan")), "golden.atol"),
    ("agreement-over-1", _set("golden.min_agreement", 1.5), "golden.min_agreement"),
    ("validation-not-object", _set("validation", []), "validation"),
    ("no-lineage", _set("lineage", _DELETE), "lineage"),
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


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"{not json", b"[]"], ids=["not-utf8", "not-json",
                                                                         "not-object"])
def test_from_bytes_refuses_non_manifests(raw: bytes) -> None:
    with pytest.raises(ManifestError):
        Manifest.from_bytes(raw)


def test_verify_model_bytes_says_expected_and_actual() -> None:
    m = Manifest.from_dict(valid())
    m.verify_model_bytes(1234, "a" * 64)
    with pytest.raises(ManifestError, match="expected 1234 bytes, got 1235 bytes"):
        m.verify_model_bytes(1235, "a" * 64)
    with pytest.raises(ManifestError, match="file.sha256"):
        m.verify_model_bytes(1234, "c" * 64)

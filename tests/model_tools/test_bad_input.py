"""Bad input through the real CLI: the exit code, a message that names the thing and says
expected against actual, and never anything half-written that looks like a bundle.

Exit codes (model_tools.cli): 1 error, 2 usage error, 3 refused (report.json written).

Every model here is a tiny real ONNX graph built with ``onnx.helper`` (float32 [N, 4] ->
MatMul -> Softmax [N, 3], random weights), so each conversion takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper

from agent.protocol.manifest import Manifest
from device_profiles import PROFILE_DIR
from model_tools.cli import cli

# failures never reach the timing step; accepted conversions time more runs, because the
# latency gate compares medians of microsecond-scale runs and must not trip on scheduler noise
FAIL_RUNS = ("--latency-runs", "10")
OK_RUNS = ("--latency-runs", "50")
VALID_PROFILES = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
BUNDLE_FILES = ["manifest.json", "model.onnx"]
SAMPLES = 8


# --- tiny models and data ---------------------------------------------------------------------

def _weights(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(4, 3)).astype(np.float32)


def tiny_classifier(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """float32 x[N, 4] -> MatMul(W[4, 3]) -> Softmax -> probs[N, 3] (``batch`` = N)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"], name="matmul"),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1, name="softmax")],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(_weights(seed), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # well inside what onnxruntime accepts
    onnx.checker.check_model(model)
    return model


def reference_probs(x: np.ndarray, seed: int = 0) -> np.ndarray:
    logits = x.astype(np.float64) @ _weights(seed).astype(np.float64)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _inputs(rows: int = SAMPLES, cols: int = 4, dtype: type = np.float32) -> np.ndarray:
    return np.random.default_rng(1).random((rows, cols)).astype(dtype)


def _profile_toml(name: str, **changes: str) -> str:
    """The shipped rpi4 profile renamed, with some ``key = value`` lines replaced."""
    lines = []
    for line in (PROFILE_DIR / "rpi4.toml").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "name":
            line = f'name = "{name}"'
        elif key in changes:
            line = f"{key} = {changes[key]}"
        lines.append(line)
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every input file the cases use, good and bad, by name."""
    d = tmp_path_factory.mktemp("inputs")
    p: dict[str, Path] = {}

    p["good"] = d / "tiny.onnx"
    onnx.save_model(tiny_classifier(), p["good"])
    raw = p["good"].read_bytes()

    p["fixed_batch"] = d / "fixed_batch.onnx"
    onnx.save_model(tiny_classifier(batch=1), p["fixed_batch"])

    p["random"] = d / "random.onnx"
    p["random"].write_bytes(np.random.default_rng(2).bytes(300))
    p["text"] = d / "notes.onnx"
    p["text"].write_text("this is a README, not a model\n")
    p["truncated"] = d / "truncated.onnx"
    p["truncated"].write_bytes(raw[: len(raw) // 2])
    p["missing_model"] = d / "no_such_model.onnx"

    undefined = tiny_classifier()
    undefined.graph.node[0].input[0] = "nope"  # MatMul reads a tensor nobody defines
    p["undefined_input"] = d / "undefined_input.onnx"
    onnx.save_model(undefined, p["undefined_input"])
    bad_attr = tiny_classifier()
    bad_attr.graph.node[1].attribute[0].name = "axes"  # Softmax has `axis`, not `axes`
    p["bad_attribute"] = d / "bad_attribute.onnx"
    onnx.save_model(bad_attr, p["bad_attribute"])

    for key, sub in (("ext_model", "ext"), ("ext_missing", "ext_missing")):
        (d / sub).mkdir()
        p[key] = d / sub / "model.onnx"
        onnx.save_model(tiny_classifier(), p[key], save_as_external_data=True,
                        all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    (d / "ext_missing" / "weights.bin").unlink()

    x = _inputs()
    npz = {
        "cal": {"x": x},
        "eval": {"x": x, "labels": np.arange(SAMPLES) % 3},
        "cal_missing_input": {"y": x},
        "cal_float64": {"x": x.astype(np.float64)},
        "cal_wrong_shape": {"x": _inputs(cols=5)},
        "cal_empty": {"x": np.zeros((0, 4), np.float32)},
        "eval_short_labels": {"x": x, "labels": np.zeros(SAMPLES - 1, np.int64)},
    }
    for key, arrays in npz.items():
        p[key] = d / f"{key}.npz"
        np.savez(p[key], **arrays)
    p["not_npz"] = d / "not_npz.npz"
    p["not_npz"].write_text("x0,x1,x2,x3\n0.1,0.2,0.3,0.4\n")
    p["single_array"] = d / "single_array.npz"
    with open(p["single_array"], "wb") as fh:
        np.save(fh, x)  # an .npy under an .npz name
    p["missing_npz"] = d / "no_such_cal.npz"

    def profile_dir(key: str, files: dict[str, str]) -> None:
        p[key] = d / key
        p[key].mkdir()
        for fname, text in files.items():
            (p[key] / fname).write_text(text)

    profile_dir("profiles_tiny", {"tinybox.toml": _profile_toml(
        "tinybox", max_artifact_bytes="100")})
    profile_dir("profiles_bad_field", {"broken.toml": _profile_toml("broken", threads='"four"')})
    profile_dir("profiles_bad_toml", {"broken.toml": 'name = "broken"\narch = [\n'})
    p["missing_profiles"] = d / "no_such_profiles"
    return p


def _cli(args: list[str], env: dict[str, str | None] | None = None) -> Result:
    runner = CliRunner(env={"EDGEFLEET_PROFILES": None, **(env or {})})
    result = runner.invoke(cli, args, prog_name="model_tools")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        # CliRunner maps an escaped exception to exit code 1 too: that is a crash, not a message
        raise result.exception
    return result


def _said(result: Result) -> str:
    """stderr with whitespace collapsed (click and rich wrap long lines)."""
    return " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def good_bundle(ws: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("good") / "bundle"
    result = _cli(["convert", str(ws["good"]), "--profile", "rpi4", "--out", str(out),
                   "--precision", "fp32", "--calibration", str(ws["cal"]), *OK_RUNS])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == BUNDLE_FILES
    return out


def _snapshot(path: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``path`` (or of ``path`` itself)."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(path.rglob("*")) if f.is_file()}


def _assert_no_leftovers(out: Path) -> None:
    """No temporary or backup directories from the atomic publish left beside ``out``."""
    stray = [f.name for f in out.parent.iterdir() if f.name.startswith(f".{out.name}.")]
    assert not stray, f"left behind next to {out}: {stray}"


# --- convert: one row per kind of bad input ---------------------------------------------------

@dataclass(frozen=True)
class Bad:
    """``model_tools convert`` with ``args`` (``@key`` = a file from ``ws``) must fail.

    ``out``: what ``--out`` holds beforehand: "absent", "bundle" (a good bundle) or "file".
    ``says``: fragments the error message must contain (whitespace-normalised).
    """

    args: tuple[str, ...]
    exit_code: int
    says: tuple[str, ...]
    out: str = "absent"


CONVERT_CASES: dict[str, Bad] = {
    # the model file
    "not-onnx-random-bytes": Bad(
        ("@random", "--profile", "rpi4"), 1,
        ("random.onnx", "not an ONNX model", "expected a file written by onnx.save")),
    "not-onnx-text-file": Bad(
        ("@text", "--profile", "rpi4"), 1, ("notes.onnx", "not an ONNX model")),
    "truncated-onnx": Bad(
        ("@truncated", "--profile", "rpi4"), 1, ("truncated.onnx", "not an ONNX model")),
    "graph-undefined-input": Bad(
        ("@undefined_input", "--profile", "rpi4"), 1,
        ("undefined_input.onnx", "invalid ONNX graph", "'nope'", "MatMul",
         "is not output of any previous nodes")),
    "graph-wrong-op-attribute": Bad(
        ("@bad_attribute", "--profile", "rpi4"), 1,
        ("bad_attribute.onnx", "invalid ONNX graph", "attribute: axes", "Softmax")),
    "missing-model-file": Bad(
        ("@missing_model", "--profile", "rpi4"), 1, ("no_such_model.onnx", "does not exist")),
    "external-weights-missing": Bad(
        ("@ext_missing", "--profile", "rpi4"), 1,
        ("model.onnx", "tensor 'W'", "external data file 'weights.bin'", "does not exist",
         "beside the model")),
    # the profile
    "unknown-profile": Bad(
        ("@good", "--profile", "rpi9"), 1,
        ("unknown profile 'rpi9'", "valid profiles: " + ", ".join(VALID_PROFILES))),
    "profile-toml-wrong-field-type": Bad(
        ("@good", "--profile", "broken", "--profiles-dir", "@profiles_bad_field"), 1,
        ("broken.toml", "field 'threads'", "expected int", "got 'four'")),
    "profile-toml-syntax-error": Bad(
        ("@good", "--profile", "broken", "--profiles-dir", "@profiles_bad_toml"), 1,
        ("broken.toml", "expected valid TOML")),
    "profiles-dir-missing": Bad(
        ("@good", "--profile", "rpi4", "--profiles-dir", "@missing_profiles"), 2,
        ("--profiles-dir", "no_such_profiles", "does not exist")),
    "precision-not-allowed-by-profile": Bad(
        ("@good", "--profile", "rpi4", "--precision", "fp16"), 1,
        ("precision 'fp16' is not allowed by profile 'rpi4'",
         "allowed: int8-static, int8-dynamic, fp32")),
    "int8-static-profile-without-calibration": Bad(
        ("@good", "--profile", "rpi-zero2w"), 1,
        ("int8-static", "'rpi-zero2w'", "needs a calibration set", "--calibration")),
    "int8-static-precision-without-calibration": Bad(
        ("@good", "--profile", "rpi4", "--precision", "int8-static"), 1,
        ("int8-static", "'rpi4'", "needs a calibration set", "--calibration")),
    "artifact-over-size-budget": Bad(
        ("@good", "--profile", "tinybox", "--profiles-dir", "@profiles_tiny",
         "--calibration", "@cal"), 3,
        ("no artifact meets profile 'tinybox'", "fp32: size", "(limit <= 100)", "report.json")),
    # calibration / eval data
    "calibration-missing-input": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@cal_missing_input"), 1,
        ("calibration data cal_missing_input.npz", "model input 'x'", "expected arrays ['x']",
         "found ['y']")),
    "calibration-wrong-dtype": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@cal_float64"), 1,
        ("cal_float64.npz", "input 'x' has dtype float64, expected float32")),
    "calibration-wrong-shape": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@cal_wrong_shape"), 1,
        ("cal_wrong_shape.npz", "input 'x' has shape [8, 5], expected [?, 4]")),
    "calibration-empty": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@cal_empty"), 1,
        ("cal_empty.npz", "holds no samples (shape [0, 4])", "expected at least one")),
    "calibration-not-npz": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@not_npz"), 1,
        ("not_npz.npz", "not an .npz file", "expected a zip archive", "not a zip archive")),
    "calibration-is-npy": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@single_array"), 1,
        ("single_array.npz", "not an .npz file", "single-array .npy file", "numpy.savez")),
    "calibration-file-missing": Bad(
        ("@good", "--profile", "rpi4", "--calibration", "@missing_npz"), 1,
        ("no_such_cal.npz", "does not exist")),
    "eval-labels-wrong-length": Bad(
        ("@good", "--profile", "rpi4", "--eval", "@eval_short_labels"), 1,
        ("eval data eval_short_labels.npz",
         f"'labels' has {SAMPLES - 1} entries, expected {SAMPLES}")),
    # the output directory
    "out-not-empty-without-force": Bad(
        ("@good", "--profile", "rpi4"), 1, ("is not empty", "--force"), out="bundle"),
    "out-is-a-file": Bad(
        ("@good", "--profile", "rpi4"), 1, ("exists and is not a directory",), out="file"),
    # names that become paths on the device and TUF target names
    "version-is-a-parent-dir": Bad(
        ("@good", "--profile", "rpi4", "--version", ".."), 1,
        ("version '..' cannot be used", "expected a plain name", "not starting with '.'")),
    "name-with-a-space": Bad(
        ("@good", "--profile", "rpi4", "--name", "my model"), 1,
        ("model name 'my model' cannot be used", "expected a plain name")),
    # usage
    "usage-missing-profile": Bad(("@good",), 2, ("Missing option '--profile'",)),
    "usage-unknown-precision": Bad(
        ("@good", "--profile", "rpi4", "--precision", "int4"), 2, ("--precision", "'int4'")),
    "usage-too-few-latency-runs": Bad(
        ("@good", "--profile", "rpi4", "--latency-runs", "5"), 2,
        ("--latency-runs", "10<=x<=100000")),
}


def _argv(case: Bad, ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    args = [str(ws[a[1:]]) if a.startswith("@") else a for a in case.args]
    return ["convert", *args[:1], "--out", str(out), *FAIL_RUNS, *args[1:], *extra]


def _prepare_out(kind: str, out: Path, good_bundle: Path) -> None:
    if kind == "bundle":
        shutil.copytree(good_bundle, out)
    elif kind == "file":
        out.write_text("not a directory\n")


@pytest.mark.parametrize("case", list(CONVERT_CASES.values()), ids=list(CONVERT_CASES))
def test_convert_bad_input(case: Bad, ws: dict[str, Path], good_bundle: Path,
                           tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    _prepare_out(case.out, out, good_bundle)
    before = _snapshot(out) if out.exists() else None

    result = _cli(_argv(case, ws, out))

    assert result.exit_code == case.exit_code, result.output
    said = _said(result)
    for fragment in case.says:
        assert fragment in said, f"{fragment!r} not in {said!r}"
    if case.exit_code != 2:
        assert said.startswith("error: ") or "\nerror: " in result.stderr
    if before is not None:
        assert _snapshot(out) == before, "the existing --out was modified"
    elif case.exit_code == 3:
        assert sorted(os.listdir(out)) == ["report.json"]  # the refusal, never a bundle
    else:
        assert not out.exists(), f"{out} was created: {os.listdir(out)}"
    _assert_no_leftovers(out)


KEEP_EXISTING = [
    pytest.param(case, id=name)
    for name, case in CONVERT_CASES.items() if case.out == "absent"
]


@pytest.mark.parametrize("case", KEEP_EXISTING)
def test_failed_convert_with_force_leaves_existing_bundle_alone(
        case: Bad, ws: dict[str, Path], good_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(good_bundle, out)
    before = _snapshot(out)

    result = _cli(_argv(case, ws, out, "--force"))

    assert result.exit_code == case.exit_code, result.output
    assert _snapshot(out) == before
    _assert_no_leftovers(out)
    assert _cli(["inspect", str(out)]).exit_code == 0
    rejected = out.parent / "bundle.rejected.json"
    if case.exit_code == 3:  # the refusal's report goes beside the bundle it did not replace
        assert json.loads(rejected.read_text())["status"] == "rejected"
        assert str(rejected) in result.stderr
    else:
        assert not rejected.exists()


def test_force_replaces_an_existing_bundle(ws: dict[str, Path], good_bundle: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(good_bundle, out)
    (out / "stale.txt").write_text("from an older build\n")

    result = _cli(["convert", str(ws["good"]), "--profile", "rpi4", "--out", str(out),
                   "--precision", "fp32", "--version", "2.0.0", "--force", *OK_RUNS])

    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == BUNDLE_FILES
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["version"] == "2.0.0"
    _assert_no_leftovers(out)


@pytest.mark.parametrize("via", ["option", "environment"])
def test_over_size_budget_is_refused_with_a_report(via: str, ws: dict[str, Path],
                                                   tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["convert", str(ws["good"]), "--profile", "tinybox", "--out", str(out),
            "--calibration", str(ws["cal"]), *FAIL_RUNS]
    if via == "option":
        result = _cli([*args, "--profiles-dir", str(ws["profiles_tiny"])])
    else:
        result = _cli(args, env={"EDGEFLEET_PROFILES": str(ws["profiles_tiny"])})

    assert result.exit_code == 3, result.output
    assert sorted(os.listdir(out)) == ["report.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "rejected" and report["chosen"] is None
    assert report["validation"]["max_artifact_bytes"] == 100
    by_precision = {c["precision"]: c for c in report["candidates"]}
    assert set(by_precision) == {"int8-static", "int8-dynamic", "fp32"}
    for cand in by_precision.values():
        assert not cand["ok"] and not cand["chosen"]
        assert any(r.startswith(f"size {cand['size_bytes']} (limit <= 100)")
                   for r in cand["reasons"]), cand["reasons"]

    inspected = _cli(["inspect", str(out)])
    assert inspected.exit_code == 1
    said = _said(inspected)
    assert "is not a bundle: no manifest.json" in said and "status 'rejected'" in said


def test_fixed_batch_model_gets_golden_tensors_its_spec_accepts(ws: dict[str, Path],
                                                               tmp_path: Path) -> None:
    """A model taking exactly one sample: golden I/O is one sample, which the manifest checks
    against the declared [1, 4] -> [1, 3] (it used to be 8 samples, refused as a manifest)."""
    out = tmp_path / "bundle"
    result = _cli(["convert", str(ws["fixed_batch"]), "--profile", "rpi4", "--out", str(out),
                   "--precision", "fp32", "--calibration", str(ws["cal"]), *OK_RUNS])
    assert result.exit_code == 0, result.output
    manifest = Manifest.from_bytes((out / "manifest.json").read_bytes())
    assert manifest.inputs[0].shape == (1, 4)
    assert manifest.golden.inputs["x"].shape == (1, 4)
    assert manifest.golden.outputs["probs"].shape == (1, 3)


def test_external_data_model_becomes_one_self_contained_file(ws: dict[str, Path],
                                                             tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    result = _cli(["convert", str(ws["ext_model"]), "--profile", "rpi4", "--out", str(out),
                   "--precision", "fp32", "--calibration", str(ws["cal"]), *OK_RUNS])

    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == BUNDLE_FILES  # no weights.bin beside it
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lineage"]["source_had_external_data"] is True
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)

    alone = tmp_path / "elsewhere" / "model.onnx"  # far from the source's weights.bin
    alone.parent.mkdir()
    shutil.copyfile(out / "model.onnx", alone)
    session = ort.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
    x = _inputs()
    (probs,) = session.run(["probs"], {"x": x})
    np.testing.assert_allclose(probs, reference_probs(x), atol=1e-5)


@pytest.mark.parametrize(("profiles", "says"), [
    pytest.param("profiles_bad_field", ("broken.toml", "field 'threads'", "got 'four'"),
                 id="wrong-field-type"),
    pytest.param("profiles_bad_toml", ("broken.toml", "expected valid TOML"), id="toml-syntax"),
])
def test_profiles_command_names_the_malformed_file_and_field(
        profiles: str, says: tuple[str, ...], ws: dict[str, Path]) -> None:
    result = _cli(["profiles", "--profiles-dir", str(ws[profiles])])
    assert result.exit_code == 1, result.output
    for fragment in says:
        assert fragment in _said(result)


# --- inspect ----------------------------------------------------------------------------------

def _flip_model_byte(bundle: Path, _tmp: Path) -> Path:
    path = bundle / "model.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bundle


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path, Path], Path]:
    def mutate(bundle: Path, _tmp: Path) -> Path:
        manifest = json.loads((bundle / "manifest.json").read_text())
        edit(manifest)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        return bundle
    return mutate


def _truncate_manifest(bundle: Path, _tmp: Path) -> Path:
    raw = (bundle / "manifest.json").read_bytes()
    (bundle / "manifest.json").write_bytes(raw[: len(raw) // 2])
    return bundle


def _remove_model(bundle: Path, _tmp: Path) -> Path:
    (bundle / "model.onnx").unlink()
    return bundle


def _tar(compressed: bool, tamper: bool = False) -> Callable[[Path, Path], Path]:
    def pack(bundle: Path, tmp: Path) -> Path:
        if tamper:
            _flip_model_byte(bundle, tmp)
        target = tmp / ("bundle.tar.gz" if compressed else "bundle.tar")
        with tarfile.open(target, "w:gz" if compressed else "w") as tar:
            for name in BUNDLE_FILES:
                tar.add(bundle / name, arcname=name)
        return target
    return pack


def _model_file_instead(_bundle: Path, tmp: Path) -> Path:
    target = tmp / "model.onnx"
    onnx.save_model(tiny_classifier(), target)
    return target


@dataclass(frozen=True)
class Inspect:
    """``model_tools inspect`` on a copy of a good bundle after ``mutate(copy, tmp) -> target``."""

    mutate: Callable[[Path, Path], Path]
    exit_code: int
    says: tuple[str, ...]


INSPECT_CASES: dict[str, Inspect] = {
    "tampered-model-byte": Inspect(
        _flip_model_byte, 1, ("model file does not match its manifest", "'file.sha256'")),
    "manifest-missing-field": Inspect(
        _edit_manifest(lambda m: m.pop("task")), 1,
        ("manifest.json", "field 'task'", "expected a value (required), got missing")),
    "manifest-wrong-field-type": Inspect(
        _edit_manifest(lambda m: m["file"].update(length="225")), 1,
        ("manifest.json", "field 'file.length'", "expected an integer")),
    "manifest-truncated": Inspect(
        _truncate_manifest, 1, ("manifest.json", "expected strict UTF-8 JSON", "JSONDecodeError")),
    "model-file-missing": Inspect(
        _remove_model, 1, ("model file 'model.onnx' named by the manifest is missing",)),
    "not-a-bundle-file": Inspect(
        _model_file_instead, 1, ("is not a bundle", "expected a directory or a tar file")),
    "tar-bundle": Inspect(_tar(compressed=False), 0, ()),
    "tar-gz-bundle": Inspect(_tar(compressed=True), 0, ()),
    "tar-bundle-tampered": Inspect(
        _tar(compressed=False, tamper=True), 1, ("does not match its manifest", "sha256")),
}


@pytest.mark.parametrize("case", list(INSPECT_CASES.values()), ids=list(INSPECT_CASES))
def test_inspect(case: Inspect, good_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(good_bundle, bundle)
    expected_sha = json.loads((bundle / "manifest.json").read_text())["file"]["sha256"]
    target = case.mutate(bundle, tmp_path)

    result = _cli(["inspect", str(target)])

    assert result.exit_code == case.exit_code, result.output
    said = _said(result)
    for fragment in case.says:
        assert fragment in said, f"{fragment!r} not in {said!r}"
    if case.exit_code == 0:
        assert "[verified]" in result.stdout and expected_sha in result.stdout
    elif "sha256" in case.says[-1]:  # expected against actual: both digests are shown
        actual = hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
        assert f"expected {expected_sha}, got {actual}" in said


# --- the real process: exit codes survive `python -m model_tools` -----------------------------

@pytest.mark.parametrize(("argv", "exit_code", "says"), [
    pytest.param(["convert", "@missing_model", "--profile", "rpi4", "--out", "@out"], 1,
                 "no_such_model.onnx' does not exist", id="missing-model"),
    pytest.param(["convert", "@good", "--out", "@out"], 2, "Missing option '--profile'",
                 id="usage"),
])
def test_exit_codes_of_the_real_process(argv: list[str], exit_code: int, says: str,
                                        ws: dict[str, Path], tmp_path: Path) -> None:
    paths = {**ws, "out": tmp_path / "bundle"}
    args = [str(paths[a[1:]]) if a.startswith("@") else a for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_PROFILES"}
    proc = subprocess.run([sys.executable, "-m", "model_tools", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)
    assert proc.returncode == exit_code, proc.stderr
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bundle").exists()

"""Device profiles: every shipped file passes the schema; bad ones are named precisely."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.profiles import ProfileError, load_profiles, parse_profile
from device_profiles import PROFILE_DIR
from model_tools.errors import ProfileNotFound
from model_tools.profiles import all_profiles, get_profile

REQUIRED = {"rpi4", "rpi5", "rpi-zero2w", "jetson-orin-nano", "x86-generic"}


def test_shipped_profiles_are_valid_and_complete() -> None:
    profiles = all_profiles()
    assert set(profiles) >= REQUIRED
    for name, p in profiles.items():
        assert p.name == name
        assert p.precision == "auto" or p.precision in p.allowed_precisions
        assert 0 < p.tolerances.min_top1_agreement <= 1


def test_special_classes_say_what_they_are() -> None:
    zero = get_profile("rpi-zero2w")
    assert zero.memory_mb == 512 and zero.max_artifact_bytes <= 16 << 20
    assert all(p.startswith("int8") for p in zero.candidates)
    jetson = get_profile("jetson-orin-nano")
    assert jetson.precision == "fp16" and jetson.accelerator == "cuda"
    assert jetson.execution_providers[:2] == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert not jetson.is_cpu_only


def test_unknown_profile_lists_the_valid_ones() -> None:
    with pytest.raises(ProfileNotFound) as info:
        get_profile("rpi3")
    for name in REQUIRED:
        assert name in str(info.value)


def _base() -> dict[str, Any]:
    return tomllib.loads((PROFILE_DIR / "rpi4.toml").read_text())


def _with(**changes: Any) -> dict[str, Any]:
    d = _base()
    for k, v in changes.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    return d


def _tol(**changes: Any) -> dict[str, Any]:
    d = _base()
    d["tolerances"] = {**d["tolerances"], **changes}
    return d


BAD = [
    ("unknown-field", {**_base(), "ram": 4}, "ram"),
    ("name-dot-dot", _with(name=".."), "name"),
    ("name-hidden", _with(name=".rpi4"), "name"),
    ("name-with-slash", _with(name="rpi4/x"), "name"),
    ("name-with-space", _with(name="rpi 4"), "name"),
    ("name-not-ascii", _with(name="rpi4é"), "name"),
    ("missing-runtime", _with(runtime=None), "runtime"),
    ("bad-runtime", _with(runtime="tensorflow"), "runtime"),
    ("bad-arch", _with(arch="mips"), "arch"),
    ("tiny-memory", _with(memory_mb=8), "memory_mb"),
    ("memory-as-string", _with(memory_mb="2GB"), "memory_mb"),
    ("no-providers", _with(execution_providers=[]), "execution_providers"),
    ("unknown-provider", _with(execution_providers=["MagicEP"]), "execution_providers"),
    ("bad-precision", _with(precision="int4"), "precision"),
    ("precision-not-allowed", _with(precision="fp16"), "precision"),
    ("duplicate-allowed", _with(allowed_precisions=["fp32", "fp32"]), "allowed_precisions"),
    ("zero-size", _with(max_artifact_bytes=0), "max_artifact_bytes"),
    ("negative-budget", _with(latency_budget_ms=-1.0), "latency_budget_ms"),
    ("zero-threads", _with(threads=0), "threads"),
    ("bool-threads", _with(threads=True), "threads"),
    ("agreement-over-1", _tol(min_top1_agreement=1.5), "tolerances.min_top1_agreement"),
    ("negative-error", _tol(max_abs_error=-0.1), "tolerances.max_abs_error"),
    ("unknown-tolerance", _tol(max_latency=3), "tolerances.max_latency"),
]


@pytest.mark.parametrize(("data", "field"), [(d, f) for _, d, f in BAD], ids=[i for i, _, _ in BAD])
def test_bad_profile_names_the_field(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ProfileError) as info:
        parse_profile(data, "custom.toml")
    assert info.value.field == field
    assert "custom.toml" in str(info.value) and "expected" in str(info.value)


def test_file_name_must_match_profile_name(tmp_path: Path) -> None:
    (tmp_path / "other.toml").write_text((PROFILE_DIR / "rpi4.toml").read_text())
    with pytest.raises(ProfileError, match=r"other\.toml"):
        load_profiles(tmp_path)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text("name = \n")
    with pytest.raises(ProfileError, match=r"broken\.toml"):
        load_profiles(tmp_path)


def test_empty_profiles_directory_is_an_error_not_an_empty_list(tmp_path: Path) -> None:
    from model_tools.errors import InputError

    with pytest.raises(InputError, match="no device profiles"):
        all_profiles(tmp_path)

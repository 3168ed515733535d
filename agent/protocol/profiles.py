"""Device profiles: the schema of ``device_profiles/*.toml`` and its checked loader.

A profile is data shared by all three programs: model_tools converts for it, fleet_server
refuses artifacts that do not match a device's profile, and the agent health-checks against its
latency budget and runs with its providers and threads. Pure: stdlib ``tomllib`` only.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol._errors import ProtocolError
from agent.protocol.manifest import PLAIN_NAME_RULE, PRECISIONS, RUNTIMES, is_plain_name

__all__ = [
    "ARCHES",
    "PROFILE_PRECISIONS",
    "DeviceProfile",
    "ProfileError",
    "Tolerances",
    "UnknownProfileError",
    "load_profiles",
    "parse_profile",
]

ARCHES = ("aarch64", "armv7l", "x86_64")
#: what a profile may ask for: a concrete precision, or ``auto`` (pick among allowed_precisions)
PROFILE_PRECISIONS = (*PRECISIONS, "auto")
_KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "XnnpackExecutionProvider",
    "ArmNNExecutionProvider",
    "ACLExecutionProvider",
)
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)*")
_FIELDS = {
    "name", "description", "arch", "memory_mb", "runtime", "execution_providers", "precision",
    "allowed_precisions", "max_artifact_bytes", "latency_budget_ms", "threads", "accelerator",
    "min_runtime_version", "tolerances",
}


class ProfileError(ProtocolError):
    """A profile file is malformed; names the file and field, expected against actual."""

    def __init__(self, source: str, fld: str, expected: str, actual: object) -> None:
        self.source, self.field, self.expected, self.actual = source, fld, expected, actual
        super().__init__(f"profile {source}: field {fld!r}: expected {expected}, got {actual!r}")


class UnknownProfileError(ProtocolError, LookupError):
    """No profile of that name; lists the valid ones."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name, self.known = name, sorted(known)
        super().__init__(f"unknown profile {name!r}; valid profiles: {', '.join(self.known)}")


@dataclass(frozen=True)
class Tolerances:
    min_top1_agreement: float  # fraction [0, 1] of samples whose top-1 class matches the source
    max_accuracy_drop: float  # absolute fraction (0.01 = one point) against the source model
    max_abs_error: float  # largest |artifact - source| allowed on any score/probability output


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str
    memory_mb: int  # RAM of the smallest board in the class, MiB
    runtime: str  # "onnxruntime" | "tflite"
    execution_providers: tuple[str, ...]  # preference order, onnxruntime names
    precision: str  # a concrete precision, or "auto"
    allowed_precisions: tuple[str, ...]  # the candidates "auto" may choose from
    max_artifact_bytes: int  # the model file may not be larger
    latency_budget_ms: float  # p95 for one sample on the device
    threads: int  # intra-op threads for the runtime
    tolerances: Tolerances
    accelerator: str | None = None  # e.g. "cuda"; None = CPU only
    # the oldest runtime the class's devices have, on the line the runtime's artifacts state
    # their own minimum on (TFLite: TensorFlow's release line, as TFLiteConverter writes it);
    # None: not stated, so not checked
    min_runtime_version: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def candidates(self) -> tuple[str, ...]:
        """The precisions a conversion should try, in the profile's order."""
        return self.allowed_precisions if self.precision == "auto" else (self.precision,)

    @property
    def is_cpu_only(self) -> bool:
        return self.accelerator is None


def _need(d: dict[str, Any], key: str, kind: type | tuple[type, ...], src: str) -> Any:
    if key not in d:
        raise ProfileError(src, key, "a value (required)", "missing")
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ProfileError(src, key, "/".join(k.__name__ for k in kinds), value)
    return value


def parse_profile(data: Mapping[str, Any], source: str = "<memory>") -> DeviceProfile:
    """Check one profile's parsed TOML and build a :class:`DeviceProfile`.

    Raises:
        ProfileError: a field is missing, unknown, of the wrong type or out of range.
    """
    d = dict(data)
    unknown = sorted(set(d) - _FIELDS)
    if unknown:
        raise ProfileError(source, unknown[0], "one of " + ", ".join(sorted(_FIELDS)), "unknown")
    name = _need(d, "name", str, source)
    if not is_plain_name(name):  # it becomes a path on the device and part of TUF target names
        raise ProfileError(source, "name", PLAIN_NAME_RULE, name)
    arch = _need(d, "arch", str, source)
    if arch not in ARCHES:
        raise ProfileError(source, "arch", "one of " + ", ".join(ARCHES), arch)
    memory = _need(d, "memory_mb", int, source)
    if memory < 64:
        raise ProfileError(source, "memory_mb", ">= 64", memory)
    runtime = _need(d, "runtime", str, source)
    if runtime not in RUNTIMES:
        raise ProfileError(source, "runtime", "one of " + ", ".join(RUNTIMES), runtime)
    providers = _need(d, "execution_providers", list, source)
    if not providers or any(p not in _KNOWN_PROVIDERS for p in providers):
        raise ProfileError(source, "execution_providers",
                           "a non-empty list of " + ", ".join(_KNOWN_PROVIDERS), providers)
    precision = _need(d, "precision", str, source)
    if precision not in PROFILE_PRECISIONS:
        raise ProfileError(source, "precision", "one of " + ", ".join(PROFILE_PRECISIONS),
                           precision)
    allowed = d.get("allowed_precisions", [precision] if precision != "auto" else None)
    if (not isinstance(allowed, list) or not allowed
            or any(p not in PRECISIONS for p in allowed) or len(set(allowed)) != len(allowed)):
        raise ProfileError(source, "allowed_precisions",
                           "a non-empty list of distinct " + ", ".join(PRECISIONS), allowed)
    if precision != "auto" and precision not in allowed:
        raise ProfileError(source, "precision", f"one of allowed_precisions {allowed}", precision)
    max_bytes = _need(d, "max_artifact_bytes", int, source)
    if max_bytes <= 0:
        raise ProfileError(source, "max_artifact_bytes", "> 0", max_bytes)
    budget = float(_need(d, "latency_budget_ms", (int, float), source))
    if not math.isfinite(budget) or budget <= 0:
        raise ProfileError(source, "latency_budget_ms", "a finite number > 0", budget)
    threads = _need(d, "threads", int, source)
    if not 1 <= threads <= 256:
        raise ProfileError(source, "threads", "1..256", threads)
    tol = _need(d, "tolerances", dict, source)
    tol_fields = {"min_top1_agreement", "max_accuracy_drop", "max_abs_error"}
    extra_tol = sorted(set(tol) - tol_fields)
    if extra_tol:
        raise ProfileError(source, f"tolerances.{extra_tol[0]}",
                           "one of " + ", ".join(sorted(tol_fields)), "unknown")
    values = {}
    for key in sorted(tol_fields):
        v = _need(tol, key, (int, float), f"{source} [tolerances]")
        if not math.isfinite(v) or v < 0 or (key != "max_abs_error" and v > 1):
            raise ProfileError(source, f"tolerances.{key}",
                               "a fraction in [0, 1]" if key != "max_abs_error" else ">= 0", v)
        values[key] = float(v)
    accelerator = d.get("accelerator")
    if accelerator is not None and not isinstance(accelerator, str):
        raise ProfileError(source, "accelerator", "a string", accelerator)
    min_runtime = d.get("min_runtime_version")
    if min_runtime is not None and (not isinstance(min_runtime, str)
                                    or not _VERSION.fullmatch(min_runtime)):
        raise ProfileError(source, "min_runtime_version",
                           "a version of dotted numbers such as \"2.14.0\"", min_runtime)
    return DeviceProfile(
        name=name,
        description=str(d.get("description", "")),
        arch=arch,
        memory_mb=memory,
        runtime=runtime,
        execution_providers=tuple(providers),
        precision=precision,
        allowed_precisions=tuple(allowed),
        max_artifact_bytes=max_bytes,
        latency_budget_ms=budget,
        threads=threads,
        tolerances=Tolerances(**values),
        accelerator=accelerator,
        min_runtime_version=min_runtime,
    )


def load_profiles(directory: str | Path) -> dict[str, DeviceProfile]:
    """Load every ``*.toml`` in ``directory``; the file stem must equal the profile name.

    Raises:
        ProfileError: a file is not TOML, or not a valid profile, or names clash.
    """
    out: dict[str, DeviceProfile] = {}
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ProfileError(path.name, "(file)", "valid TOML", str(exc)) from exc
        profile = parse_profile(data, path.name)
        if profile.name != path.stem:
            raise ProfileError(path.name, "name", f"{path.stem!r} (the file name)", profile.name)
        out[profile.name] = profile
    return out

"""Which artifact to ship: a pure function of measured candidates and the device profile.

Every candidate gets the same checks, each recorded with its limit and value so the report can
say exactly why something was refused:

- ``size``: file bytes <= the profile's ``max_artifact_bytes``
- ``top1_agreement``: >= ``min_top1_agreement`` (classifiers)
- ``accuracy_drop``: source accuracy - artifact accuracy <= ``max_accuracy_drop`` (with labels)
- ``max_abs_error``: <= ``max_abs_error`` (on float outputs)
- ``latency``: p50 <= :class:`LatencyGate` ``limit_ms``, i.e. not slower than the fp32 source
  on this host. With ``auto`` the gate is tight: ``source_p50 * (1 + max(5 %, 2 * noise)) +
  5 µs``, where ``noise`` is the relative p50 difference between two sessions of the *same*
  source model timed in the same interleaved run (an A/A test), so the gate is as tight as this
  host's own jitter allows and no tighter. Dynamic int8 on conv nets runs several times slower
  in onnxruntime; that must be caught here, not on the device. When the profile *demands* one
  precision (no choice to make), only gross slowdowns (over :data:`FIXED_MAX_SLOWDOWN`) are
  refused: the profile owner traded speed for size on purpose, and the report shows the ratio.
- ``latency_budget``: p95 on the build host <= the profile's ``latency_budget_ms``. The build
  host is faster than the device, so this is necessary, not sufficient: the device's health
  check measures the real thing.
- ``min_runtime_version``: the oldest runtime that runs the artifact (TFLite records it from
  its op versions) <= the profile's ``min_runtime_version``, the oldest runtime its devices
  have. Older runtimes reject newer op versions (tflite-runtime 2.14 refuses TF 2.21's
  dynamic-range ``FULLY_CONNECTED`` v12, which needs 2.17), so such an artifact must be refused
  here, not on the device. Skipped when either side does not say.

The latency gate's reference is the model every candidate competes with in the *same* runtime:
the ONNX source in onnxruntime for onnxruntime profiles, the fp32 ``.tflite`` in ai-edge-litert
for TFLite profiles (:attr:`LatencyGate.reference` names it).

The winner is the smallest passing candidate (ties: the faster one). No winner -> rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.profiles import DeviceProfile

__all__ = [
    "FIXED_MAX_SLOWDOWN",
    "LATENCY_SLACK_MS",
    "MIN_NOISE_RATIO",
    "Check",
    "Decision",
    "Judged",
    "LatencyGate",
    "Measured",
    "decide",
    "version_key",
]

#: the gate never claims a finer resolution than this, whatever the A/A run says
MIN_NOISE_RATIO = 0.05
#: below a few microseconds a call's own overhead jitters more than any model difference
LATENCY_SLACK_MS = 0.005
#: a precision the profile demands may be this much slower than fp32 before it is refused
FIXED_MAX_SLOWDOWN = 1.5


@dataclass(frozen=True)
class LatencyGate:
    """How much slower than the fp32 source a candidate may run on this host."""

    source_p50_ms: float  # p50 of the reference model (see ``reference``) on this host
    noise: float  # |p50(reference, session B) / p50(reference, session A) - 1|, same run
    auto: bool  # True: choosing among candidates; False: the profile demands one precision
    reference: str = "source"  # what the candidates are timed against

    @property
    def ratio(self) -> float:
        measured = 1.0 + max(MIN_NOISE_RATIO, 2.0 * self.noise)
        return measured if self.auto else max(FIXED_MAX_SLOWDOWN, measured)

    @property
    def limit_ms(self) -> float:
        return self.source_p50_ms * self.ratio + LATENCY_SLACK_MS

    def to_dict(self) -> dict[str, Any]:
        return {"source_p50_ms": self.source_p50_ms, "reference": self.reference,
                "noise": self.noise,
                "mode": "auto" if self.auto else "fixed", "ratio": self.ratio,
                "slack_ms": LATENCY_SLACK_MS, "limit_ms": self.limit_ms}


@dataclass(frozen=True)
class Measured:
    """What was measured for one candidate (``error`` set when it could not be built)."""

    precision: str
    size_bytes: int = 0
    top1_agreement: float | None = None
    accuracy_delta: float | None = None  # artifact - source (negative = lost accuracy)
    max_abs_error: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    error: str | None = None
    notes: tuple[str, ...] = ()
    min_runtime_version: str | None = None  # the oldest runtime that runs it, when known


@dataclass(frozen=True)
class Check:
    name: str
    limit: float | str  # a version string for ``min_runtime_version``, else a number
    value: float | str
    ok: bool

    def describe(self) -> str:
        op = {"size": "<=", "top1_agreement": ">=", "accuracy_drop": "<=",
              "max_abs_error": "<=", "latency": "<=", "latency_budget": "<=",
              "min_runtime_version": "<="}[self.name]
        if isinstance(self.value, str) or isinstance(self.limit, str):
            return (f"{self.name} {self.value} (limit {op} {self.limit}: the runtime on the "
                    "profile's devices)")
        return f"{self.name} {self.value:.6g} (limit {op} {self.limit:.6g})"


def version_key(text: str) -> tuple[int, ...]:
    """``"2.17.0"`` -> ``(2, 17, 0)``, padded to 3 parts; what the runtime check compares.

    Raises:
        ValueError: ``text`` does not start with a dotted number.
    """
    head = text.strip().split("-", 1)[0].split("+", 1)[0]
    parts = head.split(".")
    if not head or not all(p.isdigit() for p in parts):
        raise ValueError(f"version {text!r}: expected dotted numbers such as 2.17.0")
    return tuple(int(p) for p in parts) + (0,) * max(0, 3 - len(parts))


@dataclass(frozen=True)
class Judged:
    measured: Measured
    checks: tuple[Check, ...]
    ok: bool
    reasons: tuple[str, ...]

    def to_dict(self, chosen: bool) -> dict[str, Any]:
        m = self.measured
        return {
            "precision": m.precision,
            "size_bytes": m.size_bytes,
            "top1_agreement": m.top1_agreement,
            "accuracy_delta": m.accuracy_delta,
            "max_abs_error": m.max_abs_error,
            "p50_ms": m.p50_ms,
            "p95_ms": m.p95_ms,
            "ok": self.ok,
            "chosen": chosen,
            "reasons": list(self.reasons),
            "notes": list(m.notes),
            "min_runtime_version": m.min_runtime_version,
            "checks": [c.__dict__ for c in self.checks],
        }


@dataclass(frozen=True)
class Decision:
    judged: tuple[Judged, ...]
    chosen: Judged | None
    latency_gate: dict[str, Any] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.chosen is None

    def table(self) -> list[dict[str, Any]]:
        return [j.to_dict(j is self.chosen) for j in self.judged]


def judge(m: Measured, profile: DeviceProfile, gate: LatencyGate | None) -> Judged:
    """Apply every check to one candidate. Pure."""
    if m.error is not None:
        return Judged(m, (), False, (f"could not be built: {m.error}",))
    tol = profile.tolerances
    checks = [Check("size", profile.max_artifact_bytes, m.size_bytes,
                    m.size_bytes <= profile.max_artifact_bytes)]
    if m.top1_agreement is not None:
        checks.append(Check("top1_agreement", tol.min_top1_agreement, m.top1_agreement,
                            m.top1_agreement >= tol.min_top1_agreement))
    if m.accuracy_delta is not None:
        drop = -m.accuracy_delta
        checks.append(Check("accuracy_drop", tol.max_accuracy_drop, drop,
                            drop <= tol.max_accuracy_drop + 1e-12))
    if m.max_abs_error is not None:
        checks.append(Check("max_abs_error", tol.max_abs_error, m.max_abs_error,
                            m.max_abs_error <= tol.max_abs_error))
    if gate is not None and m.p50_ms is not None:
        checks.append(Check("latency", gate.limit_ms, m.p50_ms, m.p50_ms <= gate.limit_ms))
    if m.p95_ms is not None:
        budget = profile.latency_budget_ms
        checks.append(Check("latency_budget", budget, m.p95_ms, m.p95_ms <= budget))
    if m.min_runtime_version is not None and profile.min_runtime_version is not None:
        have = profile.min_runtime_version
        checks.append(Check("min_runtime_version", have, m.min_runtime_version,
                            version_key(m.min_runtime_version) <= version_key(have)))
    failed = tuple(c.describe() for c in checks if not c.ok)
    return Judged(m, tuple(checks), not failed, failed)


def decide(candidates: Sequence[Measured], profile: DeviceProfile,
           gate: LatencyGate | None) -> Decision:
    """Judge every candidate and pick the smallest that passes (ties: lower p50). Pure.

    Raises:
        ValueError: no candidates were given (programmer error).
    """
    if not candidates:
        raise ValueError("decide() needs at least one candidate")
    judged = tuple(judge(m, profile, gate) for m in candidates)
    passing = [j for j in judged if j.ok]
    chosen = min(passing, key=lambda j: (j.measured.size_bytes, j.measured.p50_ms or 0.0),
                 default=None)
    return Decision(judged, chosen, gate.to_dict() if gate else {})

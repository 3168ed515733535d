"""Which artifact to ship: a pure function of measured candidates and the device profile.

Every candidate gets the same checks, each recorded with its limit and value so the report can
say exactly why something was refused:

- ``size``: file bytes <= the profile's ``max_artifact_bytes``
- ``top1_agreement``: >= ``min_top1_agreement`` (classifiers)
- ``accuracy_drop``: source accuracy - artifact accuracy <= ``max_accuracy_drop`` (with labels)
- ``max_abs_error``: <= ``max_abs_error`` (on float outputs)
- ``latency``: p50 <= source p50 * :data:`LATENCY_RATIO` + :data:`LATENCY_SLACK_MS`. An
  artifact slower than the fp32 source is not shipped: dynamic int8 on conv nets runs several
  times slower in onnxruntime, and that must be caught here, not on the device. The ratio and
  slack absorb timer noise on models that run in microseconds, where a few percent is jitter.

The winner is the smallest passing candidate (ties: the faster one). No winner -> rejected.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.protocol.profiles import DeviceProfile

__all__ = ["LATENCY_RATIO", "LATENCY_SLACK_MS", "Check", "Decision", "Judged", "Measured", "decide"]

LATENCY_RATIO = 1.10
LATENCY_SLACK_MS = 0.02


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


@dataclass(frozen=True)
class Check:
    name: str
    limit: float
    value: float
    ok: bool

    def describe(self) -> str:
        op = {"size": "<=", "top1_agreement": ">=", "accuracy_drop": "<=",
              "max_abs_error": "<=", "latency": "<="}[self.name]
        return f"{self.name} {self.value:.6g} (limit {op} {self.limit:.6g})"


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
            "checks": [c.__dict__ for c in self.checks],
        }


@dataclass(frozen=True)
class Decision:
    judged: tuple[Judged, ...]
    chosen: Judged | None
    latency_gate: dict[str, float] = field(default_factory=dict)

    @property
    def rejected(self) -> bool:
        return self.chosen is None

    def table(self) -> list[dict[str, Any]]:
        return [j.to_dict(j is self.chosen) for j in self.judged]


def judge(m: Measured, profile: DeviceProfile, source_p50_ms: float | None) -> Judged:
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
    if source_p50_ms is not None and m.p50_ms is not None:
        limit = source_p50_ms * LATENCY_RATIO + LATENCY_SLACK_MS
        checks.append(Check("latency", limit, m.p50_ms, m.p50_ms <= limit))
    failed = tuple(c.describe() for c in checks if not c.ok)
    return Judged(m, tuple(checks), not failed, failed)


def decide(candidates: Sequence[Measured], profile: DeviceProfile,
           source_p50_ms: float | None) -> Decision:
    """Judge every candidate and pick the smallest that passes (ties: lower p50). Pure.

    Raises:
        ValueError: no candidates were given (programmer error).
    """
    if not candidates:
        raise ValueError("decide() needs at least one candidate")
    judged = tuple(judge(m, profile, source_p50_ms) for m in candidates)
    passing = [j for j in judged if j.ok]
    chosen = min(passing, key=lambda j: (j.measured.size_bytes, j.measured.p50_ms or 0.0),
                 default=None)
    gate = {"ratio": LATENCY_RATIO, "slack_ms": LATENCY_SLACK_MS}
    if source_p50_ms is not None:
        gate["source_p50_ms"] = source_p50_ms
    return Decision(judged, chosen, gate)

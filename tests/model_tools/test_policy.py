"""The pure selection policy: named scenarios, expected winner or refusal with reasons."""

from __future__ import annotations

import dataclasses

import pytest

from agent.protocol.profiles import DeviceProfile, Tolerances
from model_tools.policy import (
    FIXED_MAX_SLOWDOWN,
    LATENCY_SLACK_MS,
    MIN_NOISE_RATIO,
    LatencyGate,
    Measured,
    decide,
)

PROFILE = DeviceProfile(
    name="test", description="", arch="aarch64", memory_mb=1024, runtime="onnxruntime",
    execution_providers=("CPUExecutionProvider",), precision="auto",
    allowed_precisions=("int8-static", "int8-dynamic", "fp16", "fp32"),
    max_artifact_bytes=1_000, latency_budget_ms=10.0, threads=2,
    tolerances=Tolerances(min_top1_agreement=0.98, max_accuracy_drop=0.01, max_abs_error=0.1),
)
SRC_P50 = 1.0
AUTO = LatencyGate(source_p50_ms=SRC_P50, noise=0.0, auto=True)


def m(precision: str, size: int, *, agree: float = 1.0, delta: float = 0.0, err: float = 0.0,
      p50: float = 1.0, error: str | None = None) -> Measured:
    return Measured(precision, size, agree, delta, err, p50, p50 * 1.2, error)


FP32 = m("fp32", 900)
SCENARIOS = [
    ("smallest-passing-wins", [m("int8-static", 250), m("int8-dynamic", 240), FP32],
     "int8-dynamic", {}),
    ("slow-int8-is-caught", [m("int8-dynamic", 240, p50=3.5), m("int8-static", 250), FP32],
     "int8-static", {"int8-dynamic": "latency"}),
    ("within-timer-noise-is-not-slower",
     [m("int8-static", 250, p50=SRC_P50 * (1 + MIN_NOISE_RATIO) + LATENCY_SLACK_MS - 1e-6),
      FP32], "int8-static", {}),
    ("ten-percent-slower-is-slower", [m("int8-dynamic", 240, p50=SRC_P50 * 1.10), FP32],
     "fp32", {"int8-dynamic": "latency"}),
    ("over-the-device-budget", [m("int8-static", 250, p50=11.0), FP32], "fp32",
     {"int8-static": "latency_budget"}),
    ("agreement-too-low", [m("int8-static", 250, agree=0.9), FP32], "fp32",
     {"int8-static": "top1_agreement"}),
    ("accuracy-drop-too-big", [m("int8-static", 250, delta=-0.05), FP32], "fp32",
     {"int8-static": "accuracy_drop"}),
    ("accuracy-gain-is-fine", [m("int8-static", 250, delta=+0.02), FP32], "int8-static", {}),
    ("error-too-big", [m("fp16", 450, err=0.5), FP32], "fp32", {"fp16": "max_abs_error"}),
    ("build-failure-is-a-reason", [m("int8-static", 0, error="quantizer crashed"), FP32], "fp32",
     {"int8-static": "could not be built"}),
    ("tie-on-size-goes-to-faster", [m("int8-static", 250, p50=0.9), m("int8-dynamic", 250,
                                                                    p50=0.8)],
     "int8-dynamic", {}),
    ("everything-over-budget", [m("fp32", 2_000), m("int8-static", 1_001)], None,
     {"fp32": "size", "int8-static": "size"}),
]


@pytest.mark.parametrize(("candidates", "winner", "reasons"),
                         [(c, w, r) for _, c, w, r in SCENARIOS], ids=[s[0] for s in SCENARIOS])
def test_decide(candidates: list[Measured], winner: str | None, reasons: dict[str, str]) -> None:
    decision = decide(candidates, PROFILE, AUTO)
    assert (decision.chosen.measured.precision if decision.chosen else None) == winner
    assert decision.rejected == (winner is None)
    by_name = {j.measured.precision: j for j in decision.judged}
    for precision, reason in reasons.items():
        assert not by_name[precision].ok
        assert any(reason in r for r in by_name[precision].reasons), by_name[precision].reasons
    table = decision.table()
    assert [row["chosen"] for row in table].count(True) == (0 if winner is None else 1)


def test_reasons_state_value_and_limit() -> None:
    decision = decide([m("int8-static", 250, agree=0.9)], PROFILE, AUTO)
    (reason,) = decision.judged[0].reasons
    assert reason == "top1_agreement 0.9 (limit >= 0.98)"


def test_no_latency_gate_without_a_source_timing() -> None:
    decision = decide([m("int8-static", 250, p50=5.0)], PROFILE, None)
    assert decision.chosen is not None
    assert decision.latency_gate == {}


GATES = [
    ("quiet-host-auto", 0.0, True, 1 + MIN_NOISE_RATIO),
    ("noisy-host-auto-widens", 0.08, True, 1.16),
    ("fixed-only-refuses-gross", 0.0, False, FIXED_MAX_SLOWDOWN),
    ("fixed-very-noisy-host", 0.4, False, 1.8),
]


@pytest.mark.parametrize(("noise", "auto", "ratio"), [g[1:] for g in GATES],
                         ids=[g[0] for g in GATES])
def test_gate_ratio_follows_the_measured_noise(noise: float, auto: bool, ratio: float) -> None:
    gate = LatencyGate(source_p50_ms=2.0, noise=noise, auto=auto)
    assert gate.ratio == pytest.approx(ratio)
    assert gate.limit_ms == pytest.approx(2.0 * ratio + LATENCY_SLACK_MS)
    assert gate.to_dict()["mode"] == ("auto" if auto else "fixed")


def test_fixed_precision_tolerates_a_modest_slowdown_but_not_a_gross_one() -> None:
    fixed = LatencyGate(source_p50_ms=SRC_P50, noise=0.0, auto=False)
    assert decide([m("int8-static", 250, p50=1.3)], PROFILE, fixed).chosen is not None
    refused = decide([m("int8-dynamic", 240, p50=3.8)], PROFILE, fixed)
    assert refused.rejected and "latency" in refused.judged[0].reasons[0]


def test_no_candidates_is_a_programmer_error() -> None:
    with pytest.raises(ValueError):
        decide([], PROFILE, AUTO)


def test_measured_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        FP32.size_bytes = 1  # type: ignore[misc]

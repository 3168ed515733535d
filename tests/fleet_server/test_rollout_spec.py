"""Rollout specs: the shorthand, the dict form and every validation rule, as named rows."""

from __future__ import annotations

from typing import Any

import pytest

from fleet_server.rollout import Gates, RolloutSpec, SpecError, WaveSpec, parse_waves


def F(fraction: float) -> WaveSpec:
    return WaveSpec(fraction=fraction)


def S(size: int) -> WaveSpec:
    return WaveSpec(size=size)


PARSES: dict[str, tuple[str, tuple[WaveSpec, ...], str]] = {
    "percentages": ("5%,25%,100%", (F(0.05), F(0.25), F(1.0)), "5%,25%,all"),
    "counts-then-all": ("2,10,all", (S(2), S(10), F(1.0)), "2,10,all"),
    "counts-then-percentages": ("1, 10% ,ALL", (S(1), F(0.1), F(1.0)), "1,10%,all"),
    "fractional-percentage": ("12.5%,100%", (F(0.125), F(1.0)), "12.5%,all"),
    "single-wave": ("all", (F(1.0),), "all"),
}


@pytest.mark.parametrize(("text", "waves", "back"), list(PARSES.values()), ids=list(PARSES))
def test_shorthand_parses_and_prints_back(text: str, waves: tuple[WaveSpec, ...],
                                          back: str) -> None:
    spec = RolloutSpec.parse(text)
    assert spec.waves == waves
    assert spec.waves_text() == back
    assert RolloutSpec.parse(back) == spec
    assert RolloutSpec.from_dict(spec.to_dict()) == spec


def test_dict_round_trip_keeps_every_gate() -> None:
    gates = Gates(min_committed=0.9, max_failed=0.05, bake_s=900, max_error_rate=0.01,
                  max_p95_ms=None, max_psi=0.25, min_samples=200, offline_grace_s=7200,
                  latency_gate=True, min_reporting=0.8)
    spec = RolloutSpec.parse("5%,25%,100%", gates, "rollback")
    data = spec.to_dict()
    assert data == {"waves": [{"fraction": 0.05}, {"fraction": 0.25}, {"fraction": 1.0}],
                    "gates": {"min_committed": 0.9, "max_failed": 0.05, "bake_s": 900,
                              "max_error_rate": 0.01, "max_p95_ms": None, "max_psi": 0.25,
                              "min_samples": 200, "offline_grace_s": 7200,
                              "latency_gate": True, "min_reporting": 0.8},
                    "on_failure": "rollback"}
    assert RolloutSpec.from_dict(data) == spec


FROM_DICT: dict[str, tuple[dict[str, Any], RolloutSpec]] = {
    "shorthand-string": ({"waves": "2,all"}, RolloutSpec((S(2), F(1.0)))),
    "list-of-strings-and-counts": ({"waves": [1, "50%", "all"]},
                                   RolloutSpec((S(1), F(0.5), F(1.0)))),
    "defaults": ({"waves": [{"fraction": 1}]}, RolloutSpec((F(1.0),), Gates(), "pause")),
    "partial-gates": ({"waves": "all", "gates": {"bake_s": 60}},
                      RolloutSpec((F(1.0),), Gates(bake_s=60))),
    "min-reporting-quorum": ({"waves": "all", "gates": {"min_reporting": 0.8}},
                             RolloutSpec((F(1.0),), Gates(min_reporting=0.8))),
    "min-reporting-an-int-1": ({"waves": "all", "gates": {"min_reporting": 1}},
                               RolloutSpec((F(1.0),), Gates())),
    "report-timeout-fails-by-default": (
        {"waves": "all", "gates": {"report_timeout_s": 600}},
        RolloutSpec((F(1.0),), Gates(report_timeout_s=600, on_report_timeout="fail"))),
    "report-timeout-excludes": (
        {"waves": "all", "gates": {"report_timeout_s": 600, "on_report_timeout": "exclude"}},
        RolloutSpec((F(1.0),), Gates(report_timeout_s=600, on_report_timeout="exclude"))),
    "no-report-timeout-written-as-null": (
        {"waves": "all", "gates": {"report_timeout_s": None, "on_report_timeout": "fail"}},
        RolloutSpec((F(1.0),), Gates())),
}


@pytest.mark.parametrize(("data", "spec"), list(FROM_DICT.values()), ids=list(FROM_DICT))
def test_from_dict_accepts(data: dict[str, Any], spec: RolloutSpec) -> None:
    assert RolloutSpec.from_dict(data) == spec


TARGETS: dict[str, tuple[WaveSpec, int, int]] = {
    "5-percent-of-7-is-at-least-1": (F(0.05), 7, 1),
    "5-percent-of-100-is-5-not-6": (F(0.05), 100, 5),
    "7-percent-of-100-is-7": (F(0.07), 100, 7),
    "25-percent-of-10-rounds-up": (F(0.25), 10, 3),
    "all-of-13": (F(1.0), 13, 13),
    "count-capped-by-the-fleet": (S(10), 4, 4),
    "count": (S(2), 20, 2),
    "empty-fleet": (F(0.5), 0, 0),
}


@pytest.mark.parametrize(("wave", "total", "target"), list(TARGETS.values()), ids=list(TARGETS))
def test_wave_target(wave: WaveSpec, total: int, target: int) -> None:
    assert wave.target(total) == target


BAD: dict[str, tuple[Any, str, str]] = {
    # (from_dict input, field named, words in the message)
    "not-an-object": ([], "<root>", "expected an object"),
    "no-waves": ({}, "waves", "(required)"),
    "unknown-top-field": ({"waves": "all", "wave": "all"}, "wave", "no such field"),
    "empty-waves": ({"waves": []}, "waves", "at least one wave"),
    "empty-shorthand": ({"waves": " "}, "waves", "comma-separated"),
    "waves-not-a-list": ({"waves": 5}, "waves", "a list of waves"),
    "last-wave-not-all": ({"waves": "5%,25%"}, "waves[1]", "100% or 'all'"),
    "counts-only": ({"waves": "2,10"}, "waves[1]", "100% or 'all'"),
    "fractions-not-increasing": ({"waves": "25%,25%,100%"}, "waves[1]",
                                 "a percentage above 25%"),
    "fractions-decreasing": ({"waves": "50%,10%,100%"}, "waves[1]", "a percentage above 50%"),
    "counts-not-increasing": ({"waves": "10,2,all"}, "waves[1]", "a count above 10"),
    "count-after-percentage": ({"waves": "25%,10,all"}, "waves[1]",
                               "counts come before percentages"),
    "all-before-the-end": ({"waves": "all,all"}, "waves[1]", "a percentage above all"),
    "zero-percent": ({"waves": "0%,100%"}, "waves[0]", "(0%, 100%]"),
    "over-100-percent": ({"waves": "150%"}, "waves[0]", "(0%, 100%]"),
    "zero-count": ({"waves": "0,all"}, "waves[0]", "an integer >= 1"),
    "word": ({"waves": "half,all"}, "waves[0]", "a count (2), a percentage (25%) or 'all'"),
    "decimal-without-percent": ({"waves": "0.5,all"}, "waves[0]", "a count (2)"),
    "wave-with-both": ({"waves": [{"size": 2, "fraction": 0.5}, "all"]}, "waves[0]",
                       "exactly one of size and fraction"),
    "wave-with-neither": ({"waves": [{}, "all"]}, "waves[0]", "exactly one"),
    "wave-unknown-field": ({"waves": [{"percent": 5}, "all"]}, "waves[0].percent",
                           "no such field"),
    "wave-fraction-as-string": ({"waves": [{"fraction": "0.5"}, "all"]}, "waves[0].fraction",
                                "a number in (0, 1]"),
    "wave-size-as-bool": ({"waves": [{"size": True}, "all"]}, "waves[0].size",
                          "an integer >= 1"),
    "wave-negative-count": ({"waves": [-1, "all"]}, "waves[0]", "an integer >= 1"),
    "wave-null": ({"waves": [None, "all"]}, "waves[0]", "an object {size|fraction}"),
    "bad-on-failure": ({"waves": "all", "on_failure": "retry"}, "on_failure",
                       "one of pause, rollback"),
    "gates-not-an-object": ({"waves": "all", "gates": 3}, "gates", "an object"),
    "gates-unknown-field": ({"waves": "all", "gates": {"bake": 60}}, "gates.bake",
                            "no such field"),
    "min-committed-above-1": ({"waves": "all", "gates": {"min_committed": 1.5}},
                              "gates.min_committed", "a number in [0, 1]"),
    "max-failed-negative": ({"waves": "all", "gates": {"max_failed": -0.1}},
                            "gates.max_failed", "a number in [0, 1]"),
    "max-failed-nan": ({"waves": "all", "gates": {"max_failed": float("nan")}},
                       "gates.max_failed", "a number in [0, 1]"),
    "bake-negative": ({"waves": "all", "gates": {"bake_s": -1}}, "gates.bake_s",
                      "an integer >= 0"),
    "bake-float": ({"waves": "all", "gates": {"bake_s": 1.5}}, "gates.bake_s",
                   "an integer >= 0"),
    "grace-as-string": ({"waves": "all", "gates": {"offline_grace_s": "1h"}},
                        "gates.offline_grace_s", "an integer >= 0"),
    "min-samples-zero": ({"waves": "all", "gates": {"min_samples": 0}}, "gates.min_samples",
                         "an integer >= 1"),
    "error-rate-above-1": ({"waves": "all", "gates": {"max_error_rate": 2}},
                           "gates.max_error_rate", "a number in [0, 1]"),
    "p95-zero": ({"waves": "all", "gates": {"max_p95_ms": 0}}, "gates.max_p95_ms",
                 "a finite number > 0 (ms) or null"),
    "p95-infinite": ({"waves": "all", "gates": {"max_p95_ms": float("inf")}},
                     "gates.max_p95_ms", "a finite number > 0"),
    "psi-negative": ({"waves": "all", "gates": {"max_psi": -1}}, "gates.max_psi",
                     "a finite number >= 0 or null"),
    "latency-gate-not-bool": ({"waves": "all", "gates": {"latency_gate": "no"}},
                              "gates.latency_gate", "a boolean"),
    # a quorum of no device would let a health gate pass on no evidence at all
    "min-reporting-zero": ({"waves": "all", "gates": {"min_reporting": 0}},
                           "gates.min_reporting", "a number in (0, 1]"),
    "min-reporting-above-1": ({"waves": "all", "gates": {"min_reporting": 1.2}},
                              "gates.min_reporting", "a number in (0, 1]"),
    "min-reporting-as-string": ({"waves": "all", "gates": {"min_reporting": "80%"}},
                                "gates.min_reporting", "a number in (0, 1]"),
    "report-timeout-negative": ({"waves": "all", "gates": {"report_timeout_s": -60}},
                                "gates.report_timeout_s", "an integer >= 1 (seconds) or null"),
    # a deadline of 0 would time a device out the moment it commits
    "report-timeout-zero": ({"waves": "all", "gates": {"report_timeout_s": 0}},
                            "gates.report_timeout_s", "an integer >= 1 (seconds) or null"),
    "report-timeout-as-string": ({"waves": "all", "gates": {"report_timeout_s": "10m"}},
                                 "gates.report_timeout_s", "an integer >= 1"),
    "report-timeout-float": ({"waves": "all", "gates": {"report_timeout_s": 600.5}},
                             "gates.report_timeout_s", "an integer >= 1"),
    "report-timeout-bool": ({"waves": "all", "gates": {"report_timeout_s": True}},
                            "gates.report_timeout_s", "an integer >= 1"),
    "on-report-timeout-unknown": (
        {"waves": "all", "gates": {"report_timeout_s": 600, "on_report_timeout": "skip"}},
        "gates.on_report_timeout", "one of fail, exclude"),
    "on-report-timeout-not-a-string": (
        {"waves": "all", "gates": {"report_timeout_s": 600, "on_report_timeout": 1}},
        "gates.on_report_timeout", "one of fail, exclude"),
    # without a deadline nothing is ever excluded: refused rather than silently ignored
    "exclude-without-a-deadline": ({"waves": "all", "gates": {"on_report_timeout": "exclude"}},
                                   "gates.on_report_timeout",
                                   "'fail' (the default) while gates.report_timeout_s is null"),
}


@pytest.mark.parametrize(("data", "field", "says"), list(BAD.values()), ids=list(BAD))
def test_invalid_specs_name_the_field(data: Any, field: str, says: str) -> None:
    with pytest.raises(SpecError) as info:
        RolloutSpec.from_dict(data)
    assert info.value.field == field
    assert says in str(info.value)
    assert f"field {field!r}: expected " in str(info.value)
    assert isinstance(info.value, ValueError)


def test_the_message_shows_expected_against_actual() -> None:
    with pytest.raises(SpecError, match=r"rollout spec field 'waves\[1\]': expected 100% or "
                                        r"'all' \(the last wave covers every selected device\),"
                                        r" got '25%'"):
        RolloutSpec.parse("5%,25%")


def test_constructors_check_too() -> None:
    with pytest.raises(SpecError, match="exactly one of size and fraction"):
        WaveSpec()
    with pytest.raises(SpecError, match="'waves'"):
        RolloutSpec(waves=[F(1.0)])  # type: ignore[arg-type]
    with pytest.raises(SpecError, match=r"gates\.max_failed"):
        Gates(max_failed=2)
    with pytest.raises(SpecError, match="on_failure"):
        RolloutSpec((F(1.0),), on_failure="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="total: expected an integer >= 0, got -1"):
        F(0.5).target(-1)


def test_min_reporting_defaults_to_every_committed_device() -> None:
    assert Gates().min_reporting == 1.0
    assert RolloutSpec.from_dict({"waves": "all"}).gates.min_reporting == 1.0


def test_the_report_deadline_is_written_only_when_set() -> None:
    """A spec without it reads on a server from before it existed (unknown fields refused)."""
    plain = RolloutSpec.from_dict({"waves": "all"}).to_dict()["gates"]
    assert "report_timeout_s" not in plain and "on_report_timeout" not in plain
    assert Gates.from_dict(plain) == Gates()
    timed = RolloutSpec.from_dict({"waves": "all", "gates": {
        "report_timeout_s": 900, "on_report_timeout": "exclude"}})
    gates = timed.to_dict()["gates"]
    assert (gates["report_timeout_s"], gates["on_report_timeout"]) == (900, "exclude")
    assert RolloutSpec.from_dict(timed.to_dict()) == timed


def test_parse_waves_does_not_check_the_whole() -> None:
    assert parse_waves("25%,10") == (F(0.25), S(10))

"""What a rollout should do: its waves, its gates and what happens when a gate fails (pure).

A rollout moves the devices a deployment selects to a new model version in *waves*. Each wave
is cumulative: ``5%,25%,100%`` means 5% of the selected devices, then 25% in all (20% more),
then every device. A wave is a count (``2``) or a fraction (``25%``); ``all`` is ``100%``.
Rules, checked by :class:`RolloutSpec`:

- at least one wave, and the last one covers every selected device (``100%`` or ``all``):
  a count cannot, because the fleet may grow between the spec and the last wave;
- counts come before fractions (``1,5%,100%`` is fine, ``25%,10,100%`` is not: whether 10
  devices is more than 25% depends on the fleet), and each kind strictly increases.

How many devices a wave holds is decided by the planner from the number of selected devices
``n`` at the time: a fraction ``f`` gives ``ceil(f * n)`` devices but at least 1 (5% of 7 is
1); a count is capped at ``n``; a wave never holds fewer than the wave before it.

:class:`Gates` says when a wave has passed or failed (see :mod:`fleet_server.rollout.gates`
for the exact semantics); ``on_failure`` says whether a failed gate pauses the rollout or
rolls it back.

Every constructor checks its values and raises :class:`SpecError` (a ``ValueError``) naming
the field, expected against actual. ``from_dict`` refuses unknown fields: a misspelt
``bake`` silently falling back to the default bake time would be a quiet safety bug.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, cast

__all__ = [
    "ON_FAILURE",
    "ON_REPORT_TIMEOUT",
    "Gates",
    "OnFailure",
    "OnReportTimeout",
    "RolloutSpec",
    "SpecError",
    "WaveSpec",
    "parse_waves",
]

OnFailure = Literal["pause", "rollback"]
#: what a rollout may do when a gate fails
ON_FAILURE: Final = ("pause", "rollback")
OnReportTimeout = Literal["fail", "exclude"]
#: what a committed device that missed ``gates.report_timeout_s`` does to a health gate
ON_REPORT_TIMEOUT: Final = ("fail", "exclude")


class SpecError(ValueError):
    """A rollout spec value is invalid. Names the field, expected against actual."""

    def __init__(self, field: str, expected: str, actual: object) -> None:
        self.field = field
        self.expected = expected
        self.actual = actual
        shown = repr(actual)
        if len(shown) > 120:
            shown = shown[:117] + "..."
        super().__init__(f"rollout spec field {field!r}: expected {expected}, got {shown}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fraction(name: str, value: object, *, low_open: bool = False) -> None:
    expected = "a number in (0, 1]" if low_open else "a number in [0, 1]"
    if not _is_number(value) or not math.isfinite(cast(float, value)):
        raise SpecError(name, expected, value)
    number = cast(float, value)
    if number > 1 or number < 0 or (low_open and number == 0):
        raise SpecError(name, expected, value)


# ---------------------------------------------------------------------------------------------
# waves
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaveSpec:
    """One cumulative wave: ``size`` devices in all, or ``fraction`` of the selected devices.

    Exactly one of the two is set.
    """

    size: int | None = None  # devices, >= 1
    fraction: float | None = None  # of the selected devices, in (0, 1]

    def __post_init__(self) -> None:
        if (self.size is None) == (self.fraction is None):
            raise SpecError("wave", "exactly one of size and fraction",
                            {"size": self.size, "fraction": self.fraction})
        if self.size is not None and (not _is_int(self.size) or self.size < 1):
            raise SpecError("wave.size", "an integer >= 1", self.size)
        if self.fraction is not None:
            _check_fraction("wave.fraction", self.fraction, low_open=True)
            object.__setattr__(self, "fraction", float(self.fraction))

    @property
    def covers_all(self) -> bool:
        return self.fraction == 1.0

    def target(self, total: int) -> int:
        """How many of ``total`` selected devices this wave reaches (cumulative).

        Raises:
            ValueError: ``total`` is negative.
        """
        if total < 0:
            raise ValueError(f"total: expected an integer >= 0, got {total}")
        if total == 0:
            return 0
        if self.size is not None:
            return min(self.size, total)
        assert self.fraction is not None
        # round first: 0.05 * 100 is 5.000000000000001 in binary floating point
        return min(total, max(1, math.ceil(round(self.fraction * total, 9))))

    def to_text(self) -> str:
        """``"2"``, ``"25%"`` or ``"all"``: what :meth:`parse` reads back."""
        if self.size is not None:
            return str(self.size)
        assert self.fraction is not None
        return "all" if self.covers_all else f"{self.fraction * 100:g}%"

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size} if self.size is not None else {"fraction": self.fraction}

    @classmethod
    def parse(cls, text: str, where: str = "wave") -> WaveSpec:
        """Read ``"2"``, ``"25%"``, ``"12.5%"`` or ``"all"``.

        Raises:
            SpecError: anything else, a count below 1 or a percentage outside (0, 100].
        """
        expected = "a count (2), a percentage (25%) or 'all'"
        word = text.strip().lower()
        if word == "all":
            return cls(fraction=1.0)
        try:
            if word.endswith("%"):
                percent = float(word[:-1])
                if not math.isfinite(percent) or not 0 < percent <= 100:
                    raise SpecError(where, "a percentage in (0%, 100%]", text)
                return cls(fraction=percent / 100)
            if word.isascii() and word.isdigit():
                return cls(size=int(word))
        except SpecError as exc:
            raise SpecError(where, exc.expected, text) from exc
        except ValueError as exc:
            raise SpecError(where, expected, text) from exc
        raise SpecError(where, expected, text)

    @classmethod
    def from_value(cls, value: object, where: str = "wave") -> WaveSpec:
        """A wave from JSON: ``{"size": 2}``, ``{"fraction": 0.25}``, ``"25%"`` or ``2``.

        Raises:
            SpecError: not one of those forms, or out of range.
        """
        if isinstance(value, str):
            return cls.parse(value, where)
        if _is_int(value):
            try:
                return cls(size=cast(int, value))
            except SpecError as exc:
                raise SpecError(where, exc.expected, value) from exc
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"size", "fraction"})
            if unknown:
                raise SpecError(f"{where}.{unknown[0]}", "no such field (size, fraction)",
                                value[unknown[0]])
            try:
                return cls(size=value.get("size"), fraction=value.get("fraction"))
            except SpecError as exc:
                raise SpecError(where + exc.field.removeprefix("wave"), exc.expected,
                                exc.actual) from exc
        raise SpecError(where, "an object {size|fraction}, a count or a percentage string",
                        value)


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """Read the shorthand ``"5%,25%,100%"`` or ``"2,10,all"`` (not yet checked as a whole:
    :class:`RolloutSpec` does that).

    Raises:
        SpecError: an empty list or a part that is not a wave.
    """
    if not text.strip():
        raise SpecError("waves", "a comma-separated list such as '5%,25%,100%'", text)
    return tuple(WaveSpec.parse(p, f"waves[{i}]") for i, p in enumerate(text.split(",")))


def _check_waves(waves: Sequence[WaveSpec]) -> None:
    if not waves:
        raise SpecError("waves", "at least one wave", [])
    for i, wave in enumerate(waves):
        if not isinstance(wave, WaveSpec):
            raise SpecError(f"waves[{i}]", "a WaveSpec", wave)
    last = waves[-1]
    if not last.covers_all:
        raise SpecError(f"waves[{len(waves) - 1}]",
                        "100% or 'all' (the last wave covers every selected device)",
                        last.to_text())
    for i in range(1, len(waves)):
        before, wave = waves[i - 1], waves[i]
        if before.fraction is not None and wave.size is not None:
            raise SpecError(f"waves[{i}]", f"a percentage after {before.to_text()} (counts "
                            "come before percentages)", wave.to_text())
        if before.size is not None and wave.size is not None and wave.size <= before.size:
            raise SpecError(f"waves[{i}]", f"a count above {before.size}", wave.size)
        if (before.fraction is not None and wave.fraction is not None
                and wave.fraction <= before.fraction):
            raise SpecError(f"waves[{i}]", f"a percentage above {before.to_text()}",
                            wave.to_text())


# ---------------------------------------------------------------------------------------------
# gates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gates:
    """When a wave has passed or failed. Fractions are of the wave's devices.

    A wave passes when at least ``min_committed`` of its devices committed, at most
    ``max_failed`` failed, ``bake_s`` went by since its last device was assigned or committed
    (whichever is later), and every health gate holds on the committed devices with at least
    ``min_samples`` requests (drift: predictions). A health gate passes only once
    ``min_reporting`` of the wave's committed devices (all of them by default) have that many;
    until then it waits, and its detail names the devices it waits for. ``None`` switches a
    health gate off, except ``max_p95_ms``: None means each device's profile latency budget,
    and ``latency_gate=False`` switches that one off (for fleets whose devices may serve too
    little traffic to ever judge it).

    ``report_timeout_s`` is a deadline for that evidence: a committed device of the wave that
    a health gate still cannot judge that long after it committed has *timed out*, and
    ``on_report_timeout`` says what then: ``"fail"`` fails the gate once the timed-out devices
    leave it short of its quorum, ``"exclude"`` leaves them out of the quorum (named in the
    gate's detail). None (the default) waits without a deadline; ``"exclude"`` needs one.
    """

    min_committed: float = 1.0  # fraction of the wave, in [0, 1]
    max_failed: float = 0.0  # fraction of the wave, in [0, 1]; more than this fails the wave
    bake_s: int = 0  # seconds after the wave's last assignment or commit (the later)
    #                  before it passes
    max_error_rate: float | None = None  # errors / requests per device, in [0, 1]
    max_p95_ms: float | None = None  # per device; None: the device profile's latency budget
    max_psi: float | None = None  # the largest input-feature PSI per device, >= 0
    min_samples: int = 100  # requests (drift: predictions) before a device's health counts
    offline_grace_s: int = 3600  # an offline device that has not applied the state this long
    #                              after its assignment counts as failed
    latency_gate: bool = True  # judge p95 latency at all
    min_reporting: float = 1.0  # fraction of the wave's committed devices, in (0, 1], that
    #                             must have min_samples before a health gate can pass
    report_timeout_s: int | None = None  # seconds after a device of the wave committed by
    #                                      which a health gate must be able to judge it; None:
    #                                      no deadline, the gate waits for it
    on_report_timeout: OnReportTimeout = "fail"  # a device that missed the deadline "fail"s
    #                                              the gate or is "exclude"d from its quorum

    def __post_init__(self) -> None:
        _check_fraction("gates.min_committed", self.min_committed)
        _check_fraction("gates.max_failed", self.max_failed)
        _check_fraction("gates.min_reporting", self.min_reporting, low_open=True)
        for name in ("bake_s", "offline_grace_s"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise SpecError(f"gates.{name}", "an integer >= 0 (seconds)", value)
        if not isinstance(self.latency_gate, bool):
            raise SpecError("gates.latency_gate", "a boolean", self.latency_gate)
        if self.report_timeout_s is not None and (not _is_int(self.report_timeout_s)
                                                  or self.report_timeout_s < 1):
            raise SpecError("gates.report_timeout_s", "an integer >= 1 (seconds) or null (no "
                            "deadline)", self.report_timeout_s)
        if self.on_report_timeout not in ON_REPORT_TIMEOUT:
            raise SpecError("gates.on_report_timeout", "one of " + ", ".join(ON_REPORT_TIMEOUT),
                            self.on_report_timeout)
        if self.on_report_timeout != "fail" and self.report_timeout_s is None:
            raise SpecError("gates.on_report_timeout", "'fail' (the default) while "
                            "gates.report_timeout_s is null: without a deadline nothing times "
                            "out", self.on_report_timeout)
        if not _is_int(self.min_samples) or self.min_samples < 1:
            raise SpecError("gates.min_samples", "an integer >= 1", self.min_samples)
        if self.max_error_rate is not None:
            _check_fraction("gates.max_error_rate", self.max_error_rate)
        if self.max_p95_ms is not None and (
                not _is_number(self.max_p95_ms) or not math.isfinite(self.max_p95_ms)
                or self.max_p95_ms <= 0):
            raise SpecError("gates.max_p95_ms", "a finite number > 0 (ms) or null (the "
                            "profile's latency budget)", self.max_p95_ms)
        if self.max_psi is not None and (
                not _is_number(self.max_psi) or not math.isfinite(self.max_psi)
                or self.max_psi < 0):
            raise SpecError("gates.max_psi", "a finite number >= 0 or null", self.max_psi)
        for name in ("min_committed", "max_failed", "max_error_rate", "max_p95_ms", "max_psi",
                     "min_reporting"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        """Every field, except the report deadline's two while it is off: a spec that does not
        use them reads on a server from before they existed (its ``from_dict`` refuses
        unknown fields)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.report_timeout_s is None:
            del out["report_timeout_s"], out["on_report_timeout"]
        return out

    @classmethod
    def from_dict(cls, data: object, where: str = "gates") -> Gates:
        """Gates from JSON; missing fields take their defaults.

        Raises:
            SpecError: not an object, an unknown field, or a value out of range.
        """
        if not isinstance(data, Mapping):
            raise SpecError(where, "an object", data)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(f"{where}.{unknown[0]}", "no such field (" + ", ".join(
                f.name for f in fields(cls)) + ")", data[unknown[0]])
        return cls(**{k: data[k] for k in known if k in data})


# ---------------------------------------------------------------------------------------------
# the spec
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutSpec:
    """Waves, gates and what a failed gate does (``"pause"`` or ``"rollback"``)."""

    waves: tuple[WaveSpec, ...]
    gates: Gates = field(default_factory=Gates)
    on_failure: OnFailure = "pause"

    def __post_init__(self) -> None:
        if not isinstance(self.waves, tuple):
            raise SpecError("waves", "a tuple of WaveSpec", self.waves)
        _check_waves(self.waves)
        if not isinstance(self.gates, Gates):
            raise SpecError("gates", "a Gates", self.gates)
        if self.on_failure not in ON_FAILURE:
            raise SpecError("on_failure", "one of " + ", ".join(ON_FAILURE), self.on_failure)

    @classmethod
    def parse(cls, waves: str, gates: Gates | None = None,
              on_failure: OnFailure = "pause") -> RolloutSpec:
        """A spec from the wave shorthand, e.g. ``RolloutSpec.parse("2,10,all")``.

        Raises:
            SpecError: the waves or ``on_failure`` are invalid.
        """
        return cls(parse_waves(waves), gates if gates is not None else Gates(), on_failure)

    def waves_text(self) -> str:
        """The shorthand, e.g. ``"5%,25%,all"``."""
        return ",".join(w.to_text() for w in self.waves)

    def to_dict(self) -> dict[str, Any]:
        return {"waves": [w.to_dict() for w in self.waves], "gates": self.gates.to_dict(),
                "on_failure": self.on_failure}

    @classmethod
    def from_dict(cls, data: object) -> RolloutSpec:
        """A spec from JSON. ``waves`` is a list (of ``{"size"|"fraction"}`` objects, counts
        or percentage strings) or the shorthand string; ``gates`` and ``on_failure`` are
        optional (defaults: :class:`Gates` defaults, ``"pause"``).

        Raises:
            SpecError: a missing or unknown field, or an invalid value.
        """
        if not isinstance(data, Mapping):
            raise SpecError("<root>", "an object", data)
        unknown = sorted(set(data) - {"waves", "gates", "on_failure"})
        if unknown:
            raise SpecError(unknown[0], "no such field (waves, gates, on_failure)",
                            data[unknown[0]])
        if "waves" not in data:
            raise SpecError("waves", "a list of waves or a string such as '5%,25%,100%' "
                            "(required)", "missing")
        raw = data["waves"]
        if isinstance(raw, str):
            waves = parse_waves(raw)
        elif isinstance(raw, (list, tuple)):
            waves = tuple(WaveSpec.from_value(w, f"waves[{i}]") for i, w in enumerate(raw))
        else:
            raise SpecError("waves", "a list of waves or a string such as '5%,25%,100%'", raw)
        gates = Gates.from_dict(data.get("gates", {}))
        on_failure = data.get("on_failure", "pause")
        if on_failure not in ON_FAILURE:
            raise SpecError("on_failure", "one of " + ", ".join(ON_FAILURE), on_failure)
        return cls(waves=waves, gates=gates, on_failure=cast(OnFailure, on_failure))

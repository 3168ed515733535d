"""The rollout's persisted state: statuses, per-device assignments and :class:`RolloutState`.

Split from :mod:`fleet_server.rollout.planner` because this is the one part of the planner
that outlives a call: the I/O shell stores :meth:`RolloutState.to_dict` after every planning
step and reads it back with :meth:`RolloutState.from_dict`, so its format is versioned
(:data:`STATE_VERSION`) and kept apart from the logic that may change freely. A version 1
state still reads (the fields version 2 added are unset); a newer one is refused. Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Literal

from fleet_server.rollout.messages import GateReport

__all__ = [
    "ACTIVE",
    "ENDED",
    "OUTCOMES",
    "STATE_VERSION",
    "STATUSES",
    "Assignment",
    "Outcome",
    "RolloutState",
    "Status",
]

Status = Literal["running", "paused", "completed", "rolled_back", "cancelled", "superseded"]
STATUSES: Final = ("running", "paused", "completed", "rolled_back", "cancelled", "superseded")
#: statuses in which the rollout still holds devices on its version
ACTIVE: Final = ("running", "paused", "completed")
#: version of :meth:`RolloutState.to_dict`: 2 added ``committed_at``, ``final`` and
#: ``final_reason`` to each assignment and leaves optional fields at their default out (a
#: version 1 state reads with the new ones unset)
STATE_VERSION: Final = 2
Outcome = Literal["pending", "committed", "failed"]
OUTCOMES: Final = ("pending", "committed", "failed")
#: statuses in which the rollout has ended: its per-device outcomes are frozen
ENDED: Final = ("rolled_back", "cancelled", "superseded")


@dataclass(frozen=True)
class Assignment:
    """A device moved to the rollout's version, in wave ``wave``, at ``assigned_at``."""

    device_id: str
    wave: int
    assigned_at: int
    previous_version: str | None  # what it ran before (None: no version of this model)
    failed: str | None = None  # why it counts as failed; set once, and it was reverted then
    active: bool = True  # False while the device is not selected any more
    committed_at: int | None = None  # the first step that saw it committed: starts its
    #                                  report deadline, and the wave's latest one its bake
    final: Outcome | None = None  # its outcome when the rollout ended (None: not ended)
    final_reason: str | None = None  # why, then

    def __post_init__(self) -> None:
        if self.final is not None and self.final not in OUTCOMES:
            raise ValueError(f"rollout assignment {self.device_id} final: expected one of "
                             f"{', '.join(OUTCOMES)} or None, got {self.final!r}")

    def to_dict(self) -> dict[str, Any]:
        """The fields, leaving out the optional ones at their defaults: the state of a
        1,000-device rollout is rewritten on every planning step, so its size matters
        (``from_dict`` reads a missing field as its default)."""
        out: dict[str, Any] = {"device_id": self.device_id, "wave": self.wave,
                               "assigned_at": self.assigned_at,
                               "previous_version": self.previous_version}
        for name in _OPTIONAL:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                out[name] = value
        return out


#: the fields of :class:`Assignment` that :meth:`Assignment.to_dict` leaves out at their default
_OPTIONAL: Final = ("failed", "active", "committed_at", "final", "final_reason")
_DEFAULTS: Final[dict[str, Any]] = {f.name: f.default for f in fields(Assignment)
                                    if f.name in _OPTIONAL}


@dataclass(frozen=True)
class RolloutState:
    """Everything the planner remembers between calls; persist it with :meth:`to_dict`."""

    rollout_id: str
    model: str
    version: str
    status: Status = "running"
    wave: int = 0  # the current wave
    wave_started_at: int | None = None  # None: not started yet
    assignments: tuple[Assignment, ...] = ()  # in assignment order
    reason: str | None = None  # why it is paused, rolled back, cancelled or superseded
    gates: tuple[GateReport, ...] = ()  # the latest evaluation
    updated_at: int | None = None  # ``now`` of the last plan

    def __post_init__(self) -> None:
        for name in ("rollout_id", "model", "version"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"rollout state {name}: expected a non-empty string, got "
                                 f"{getattr(self, name)!r}")
        if self.status not in STATUSES:
            raise ValueError(f"rollout state status: expected one of {', '.join(STATUSES)}, "
                             f"got {self.status!r}")
        ids = [a.device_id for a in self.assignments]
        if len(set(ids)) != len(ids):
            raise ValueError("rollout state assignments: expected one per device, got "
                             f"duplicates {sorted({i for i in ids if ids.count(i) > 1})}")

    def wave_devices(self, index: int) -> tuple[str, ...]:
        """The devices assigned in wave ``index`` (active or not), in assignment order."""
        return tuple(a.device_id for a in self.assignments if a.wave == index)

    def assignment(self, device_id: str) -> Assignment | None:
        return next((a for a in self.assignments if a.device_id == device_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "rollout_id": self.rollout_id,
                "model": self.model, "version": self.version, "status": self.status,
                "wave": self.wave, "wave_started_at": self.wave_started_at,
                "assignments": [a.to_dict() for a in self.assignments], "reason": self.reason,
                "gates": [asdict(g) for g in self.gates], "updated_at": self.updated_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        """Read what :meth:`to_dict` wrote.

        Raises:
            ValueError: a newer ``state_version``, or missing or invalid fields.
        """
        version = data.get("state_version")
        if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
            raise ValueError(f"rollout state state_version: expected 1..{STATE_VERSION}, "
                             f"got {version!r}")
        try:
            return cls(
                rollout_id=data["rollout_id"], model=data["model"], version=data["version"],
                status=data["status"], wave=int(data["wave"]),
                wave_started_at=data.get("wave_started_at"),
                assignments=tuple(Assignment(**a) for a in data.get("assignments", ())),
                reason=data.get("reason"),
                gates=tuple(GateReport(**g) for g in data.get("gates", ())),
                updated_at=data.get("updated_at"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"rollout state: expected the fields of state_version "
                             f"{version}, got {exc!r}") from exc

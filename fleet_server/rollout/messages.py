"""What goes into and comes out of the rollout planner: reports and commands in, actions out.

Split from :mod:`fleet_server.rollout.planner` so that the vocabulary the I/O shell
(:mod:`fleet_server.deploy.rollouts`), the gates (:mod:`fleet_server.rollout.gates`) and the
persisted state (:mod:`fleet_server.rollout.state`) share lives apart from the planning logic,
and each of them can import it without importing the others.

- :class:`DeviceReport`: what the server knows of one device for the rollout's model, checked
  on construction (device input: a bad one raises ``ValueError`` naming the field).
- Commands (:data:`Command`): :class:`Pause`, :class:`Resume`, :class:`Cancel` and
  :class:`Supersede`; :class:`CommandError` when the rollout's status does not allow one.
- Actions (:data:`Action`): what one planning step asks the shell to carry out or record,
  each JSON-ready through ``to_dict`` for the audit log; :class:`GateReport` is also kept in
  the state as the latest evaluation. All pure data.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, cast

from agent.protocol.messages import LAST_RESULTS

__all__ = [
    "Action",
    "AssignVersion",
    "Cancel",
    "Command",
    "CommandError",
    "DeviceReport",
    "GateReport",
    "Pause",
    "Resume",
    "RevertDevice",
    "RolloutCancelled",
    "RolloutCompleted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutRolledBack",
    "RolloutSuperseded",
    "Supersede",
    "WaveAdvanced",
]


class CommandError(ValueError):
    """A command that the rollout's status does not allow (e.g. resuming a cancelled one)."""


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceReport:
    """What the server knows of one device, for this rollout's model.

    ``desired_sequence`` is the sequence of the signed desired state that carries this
    rollout's version to the device (None: not signed yet); the health numbers cover the new
    version only, since the device was assigned.
    """

    device_id: str
    profile: str
    running_version: str | None = None  # of this rollout's model; None: not running it
    applied_sequence: int = 0  # from Reported
    desired_sequence: int | None = None
    last_result: str | None = None  # one of LAST_RESULTS, or None
    last_error: str | None = None
    online: bool = False
    requests: int = 0  # served by the new version (ok + errors)
    errors: int = 0
    p95_ms: float | None = None  # of the successful requests
    max_psi: float | None = None  # largest input-feature PSI of the drift summaries
    samples: int = 0  # predictions the drift figures cover
    latency_budget_ms: float | None = None  # the device profile's budget

    def __post_init__(self) -> None:
        if not self.device_id:
            raise ValueError("device report device_id: expected a non-empty string, got ''")
        if self.last_result is not None and self.last_result not in LAST_RESULTS:
            raise ValueError(f"device report {self.device_id} last_result: expected one of "
                             f"{', '.join(LAST_RESULTS)} or None, got {self.last_result!r}")
        for name in ("applied_sequence", "requests", "errors", "samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"device report {self.device_id} {name}: expected >= 0, "
                                 f"got {getattr(self, name)}")
        if self.errors > self.requests:
            raise ValueError(f"device report {self.device_id} errors: expected at most "
                             f"requests ({self.requests}), got {self.errors}")
        for name in ("p95_ms", "max_psi", "latency_budget_ms"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < float("inf"):
                raise ValueError(f"device report {self.device_id} {name}: expected a finite "
                                 f"number >= 0 or None, got {value!r}")


@dataclass(frozen=True)
class Pause:
    reason: str = "paused by an operator"


@dataclass(frozen=True)
class Resume:
    pass


@dataclass(frozen=True)
class Cancel:
    reason: str = "cancelled by an operator"


@dataclass(frozen=True)
class Supersede:
    by: str  # the rollout or deployment that takes over


Command = Pause | Resume | Cancel | Supersede


# ---------------------------------------------------------------------------------------------
# actions
# ---------------------------------------------------------------------------------------------
class _Action:
    KIND: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """``{"action": kind, **fields}`` for the audit log."""
        return {"action": self.KIND, **asdict(cast(Any, self))}


@dataclass(frozen=True)
class AssignVersion(_Action):
    """Move a device to the rollout's version."""

    KIND: ClassVar[str] = "assign"
    device_id: str
    version: str


@dataclass(frozen=True)
class RevertDevice(_Action):
    """Put a device back on the version it ran before (None: no version of this model)."""

    KIND: ClassVar[str] = "revert"
    device_id: str
    version: str | None
    reason: str = ""


@dataclass(frozen=True)
class WaveAdvanced(_Action):
    """Wave ``index`` started (0 when the rollout starts)."""

    KIND: ClassVar[str] = "wave"
    index: int


@dataclass(frozen=True)
class RolloutPaused(_Action):
    KIND: ClassVar[str] = "paused"
    reason: str


@dataclass(frozen=True)
class RolloutResumed(_Action):
    KIND: ClassVar[str] = "resumed"


@dataclass(frozen=True)
class RolloutRolledBack(_Action):
    KIND: ClassVar[str] = "rolled_back"
    reason: str


@dataclass(frozen=True)
class RolloutCompleted(_Action):
    KIND: ClassVar[str] = "completed"


@dataclass(frozen=True)
class RolloutCancelled(_Action):
    KIND: ClassVar[str] = "cancelled"
    reason: str


@dataclass(frozen=True)
class RolloutSuperseded(_Action):
    KIND: ClassVar[str] = "superseded"
    by: str


@dataclass(frozen=True)
class GateReport(_Action):
    """One gate of one wave: ``ok`` True passed, False failed, None waiting."""

    KIND: ClassVar[str] = "gate"
    wave: int
    gate: str  # failed | committed | bake | error_rate | p95_ms | psi
    value: float | None
    limit: float | None
    ok: bool | None
    detail: str = ""


Action = (AssignVersion | RevertDevice | WaveAdvanced | RolloutPaused | RolloutResumed
          | RolloutRolledBack | RolloutCompleted | RolloutCancelled | RolloutSuperseded
          | GateReport)


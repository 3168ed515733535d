"""The rollout planner: state + device reports + clock + commands -> new state + actions (pure).

No I/O and no clock reads: the I/O shell loads the state and the reports, calls :func:`plan`
with ``now``, then stores the new state and carries out the actions in one transaction (or,
level-triggered, re-derives every device's version from :func:`desired`). Same inputs, same
outputs, always.

Assignment. The selected devices are ordered by ``sha256(rollout_id + "\\0" + device_id)``
(:func:`assignment_order`). Wave ``i`` holds the first ``target_i`` devices of that order not
yet assigned, where ``target_i`` is cumulative (:meth:`WaveSpec.target` of the number of
selected devices now). An assignment is never taken back or moved to another wave: devices
that are selected later are simply next in line (and after completion they join the last
wave at once), so re-planning never reshuffles. A device that stops being selected stays
in the state but is inactive: it counts nowhere and is not reverted.

A device's outcome in this rollout (:func:`outcome`), from its report:

- *failed* once it has applied the desired state carrying the version (``applied_sequence >=
  desired_sequence``) and runs another version (it rolled back by itself, or never moved), or
  reports ``failed``, ``rolled_back`` or ``refused``; or when it is offline, has not applied
  that state, and ``offline_grace_s`` went by since its assignment (a device that never
  reported counts as offline). Failure is sticky: the planner records it with its reason and
  emits :class:`RevertDevice` for that device at once, so the server's desired state follows
  what the device runs (no divergence).
- *committed* when it applied that state, runs the version and its last result is ``ok``. The
  first step that sees it so records ``committed_at``. ``last_result`` is about the device's
  whole last update, not about one model: once a device was seen committed, a failed result
  while it still runs the version came from a later desired state (another model's update)
  and does not fail it here. Before that, it does (a failed rollback can leave the new
  version running: safer to stop).
- *pending* otherwise (not assigned yet, downloading, offline within the grace, and a device
  wiped and re-provisioned under the same id, which applied nothing yet).

Gates (:class:`Gates`), judged on the active devices of the current wave, ``n`` of them:

- ``failed``: failed / n > ``max_failed`` fails the wave at once (no need to wait for the bake);
  earlier waves are held to the same limit, so a canary that goes bad later still stops the
  rollout. ``n`` counts every device assigned to the wave, reported or not: one failure among
  the first reports is not "100% failed".
- ``committed``: committed / n >= ``min_committed`` passes; when nothing is pending any more
  and it is below, it can never pass, and fails.
- ``bake``: ``bake_s`` seconds since the wave's last assignment. Nothing else passes, and no
  health gate fails, before that.
- health: ``error_rate`` (errors / requests), ``p95_ms`` (against ``max_p95_ms`` or, when that
  is None, the device's own profile budget) and ``psi`` (the largest input-feature PSI). A
  committed device is *judged* once it has ``min_samples`` requests (predictions, for
  ``psi``). The worst judged device decides, and a health gate is three-valued:

  - it *fails* after the bake as soon as one judged device is over its limit (evidence of
    harm is enough; more devices cannot make it good). The committed devices of earlier
    waves are still watched: one that went over its limit since its wave passed fails the
    current wave too (they never count toward its quorum);
  - it *passes* after the bake only once :func:`quorum` of the wave's committed devices are
    judged: ``ceil(min_reporting * committed)``, so all of them by default. Without a bake
    time this is what stops one early healthy device from passing the wave for the others;
  - otherwise it *waits*, and its detail says how many more devices it needs and names them
    (``dev-7 (offline, 0 requests)``), so a stalled rollout says why in its status.

  A committed device that goes offline before it sent ``min_samples`` (or never gets traffic)
  therefore holds the wave for as long as it stays so: the rollout neither passes on less
  evidence than the spec asked for nor fails a device that did nothing wrong. It waits
  visibly; the operator lowers the quorum for such fleets (``min_reporting``, e.g. 0.8),
  switches ``latency_gate`` off for fleets without traffic, or pauses or cancels.

All gates pass -> the next wave starts (:class:`WaveAdvanced`; an empty wave passes at once)
or, after the last one, :class:`RolloutCompleted`. A gate fails -> ``on_failure``: ``pause``
(:class:`RolloutPaused`) or ``rollback`` (:class:`RevertDevice` for every moved device not
reverted yet, then :class:`RolloutRolledBack`). :class:`GateReport` actions are emitted when
a wave is decided (for the audit log); the latest evaluation is always in ``state.gates``.

Commands, applied in order before anything else: :class:`Pause` and :class:`Resume` (each a
no-op when already so), :class:`Cancel` (reverts every moved device) and :class:`Supersede`
(reverts nothing: the newer rollout takes over). A resumed rollout is judged again at once,
so one paused by a failed gate pauses again unless the reports changed. A command that makes
no sense in the current status raises :class:`CommandError`.

Ending (:data:`ENDED`: rolled back, cancelled, superseded) freezes every device's outcome in
its assignment (``final``, ``final_reason``): after that, a device's reports are about later
updates (a v3 that fails on a device says nothing about the v2 rollout it superseded), so
:func:`summary` shows a superseded rollout as it ended, and a rolled-back or cancelled one
as it ended plus how far the revert got.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Final, Literal, cast

from agent.protocol.messages import LAST_RESULTS
from fleet_server.rollout.spec import Gates, RolloutSpec

__all__ = [
    "ACTIVE",
    "ENDED",
    "FAILED_RESULTS",
    "OUTCOMES",
    "STATE_VERSION",
    "STATUSES",
    "Action",
    "AssignVersion",
    "Assignment",
    "Cancel",
    "Command",
    "CommandError",
    "DeviceReport",
    "GateReport",
    "Outcome",
    "Pause",
    "Resume",
    "RevertDevice",
    "RolloutCancelled",
    "RolloutCompleted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutRolledBack",
    "RolloutState",
    "RolloutSuperseded",
    "Status",
    "Supersede",
    "WaveAdvanced",
    "assignment_order",
    "desired",
    "outcome",
    "plan",
    "quorum",
    "summary",
]

Status = Literal["running", "paused", "completed", "rolled_back", "cancelled", "superseded"]
STATUSES: Final = ("running", "paused", "completed", "rolled_back", "cancelled", "superseded")
#: statuses in which the rollout still holds devices on its version
ACTIVE: Final = ("running", "paused", "completed")
#: ``Reported.last_result`` values that make a device failed
FAILED_RESULTS: Final = ("failed", "rolled_back", "refused")
#: version of :meth:`RolloutState.to_dict`: 2 added ``committed_at``, ``final`` and
#: ``final_reason`` to each assignment and leaves optional fields at their default out (a
#: version 1 state reads with the new ones unset)
STATE_VERSION: Final = 2
Outcome = Literal["pending", "committed", "failed"]
OUTCOMES: Final = ("pending", "committed", "failed")
#: statuses in which the rollout has ended: its per-device outcomes are frozen
ENDED: Final = ("rolled_back", "cancelled", "superseded")


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


# ---------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """A device moved to the rollout's version, in wave ``wave``, at ``assigned_at``."""

    device_id: str
    wave: int
    assigned_at: int
    previous_version: str | None  # what it ran before (None: no version of this model)
    failed: str | None = None  # why it counts as failed; set once, and it was reverted then
    active: bool = True  # False while the device is not selected any more
    committed_at: int | None = None  # the first step that saw it committed
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


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------
def assignment_order(rollout_id: str, device_ids: Iterable[str]) -> list[str]:
    """The devices in the order the rollout takes them: by ``sha256(rollout_id\\0device_id)``.

    Stable: adding or removing devices never changes the relative order of the others.
    """
    def key(device_id: str) -> tuple[str, str]:
        digest = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).hexdigest()
        return digest, device_id
    return sorted(device_ids, key=key)


def outcome(state: RolloutState, assignment: Assignment, report: DeviceReport | None,
            now: int | None = None, offline_grace_s: int | None = None
            ) -> tuple[Outcome, str | None]:
    """A moved device's outcome and why (see the module docstring).

    Without ``now`` and ``offline_grace_s`` an offline device stays pending (the planner
    marks it failed when the grace is over, and that is sticky).
    """
    if assignment.failed is not None:
        return "failed", assignment.failed
    if report is not None and report.desired_sequence is not None \
            and report.applied_sequence >= report.desired_sequence:
        runs = report.running_version == state.version
        # a failed result after this device was seen committed, while it still runs the
        # version, is about a later update (another model in its desired state): not ours
        if report.last_result in FAILED_RESULTS and not (runs and assignment.committed_at
                                                         is not None):
            return "failed", (f"{report.last_result}: {report.last_error or 'no error given'} "
                              f"(runs {report.running_version or 'no version'})")
        if not runs:
            return "failed", (f"runs {report.running_version or 'no version'} instead of "
                              f"{state.version} after applying the desired state")
        if report.last_result == "ok" or assignment.committed_at is not None:
            return "committed", None
        return "pending", "applied, no result yet"
    if report is not None and report.online:
        return "pending", "updating"
    what = "offline" if report is not None else "no report"
    if now is not None and offline_grace_s is not None \
            and now - assignment.assigned_at >= offline_grace_s:
        return "failed", (f"{what} {now - assignment.assigned_at}s after assignment without "
                          f"applying it (grace {offline_grace_s}s)")
    return "pending", what


def desired(state: RolloutState) -> dict[str, str | None]:
    """The version this rollout wants on each device it moved (None: no version of the model).

    The level-triggered view of the actions: failed devices and every device of a rolled-back
    or cancelled rollout are back on their previous version. Devices not in the dict are not
    this rollout's business. A superseded rollout keeps its devices where they are until the
    newer rollout moves them: the caller gives the newer one precedence.
    """
    out: dict[str, str | None] = {}
    for a in state.assignments:
        if not a.active:
            continue
        back = a.failed is not None or state.status in ("rolled_back", "cancelled")
        out[a.device_id] = a.previous_version if back else state.version
    return out


# ---------------------------------------------------------------------------------------------
# plan
# ---------------------------------------------------------------------------------------------
def plan(spec: RolloutSpec, state: RolloutState, devices: Iterable[str],
         reports: Iterable[DeviceReport] | Mapping[str, DeviceReport], now: int,
         commands: Sequence[Command] = ()) -> tuple[RolloutState, tuple[Action, ...]]:
    """One planning step (see the module docstring for the semantics).

    Args:
        spec: the rollout's waves and gates.
        state: what the last step returned (a fresh :class:`RolloutState` to start).
        devices: the ids of the devices the deployment selects now.
        reports: the latest report per device (devices without one count as offline).
        now: unix seconds.
        commands: operator commands, applied first, in order.

    Returns:
        The new state and the actions to carry out, in order.

    Raises:
        TypeError: ``now`` is not an integer.
        ValueError: duplicate device ids or reports, ``now`` before the last step, a state
            from a spec with more waves, or a device without a latency budget when the p95
            gate needs it.
        CommandError: a command the status does not allow.
    """
    if isinstance(now, bool) or not isinstance(now, int):
        raise TypeError(f"now: expected an integer (unix seconds), got {now!r}")
    if state.updated_at is not None and now < state.updated_at:
        raise ValueError(f"now: expected a time at or after the last step "
                         f"({state.updated_at}), got {now}")
    if not 0 <= state.wave < len(spec.waves):
        raise ValueError(f"rollout state wave: expected 0..{len(spec.waves) - 1} (the spec "
                         f"has {len(spec.waves)} waves), got {state.wave}")
    selected = list(devices)
    if len(set(selected)) != len(selected):
        raise ValueError("devices: expected unique ids, got duplicates "
                         f"{sorted({d for d in selected if selected.count(d) > 1})}")
    by_id = _index(reports)
    out: list[Action] = []
    st = state
    for command in commands:
        st = _command(st, command, by_id, out)
    chosen = set(selected)
    st = replace(st, assignments=tuple(
        a if a.active == (a.device_id in chosen) else replace(a, active=a.device_id in chosen)
        for a in st.assignments))
    if st.status in ACTIVE:
        grace = spec.gates.offline_grace_s if st.status != "completed" else None
        st = _observe(st, by_id, now, grace, out)
    if st.status == "running":
        st = _advance(spec, st, selected, by_id, now, out)
    elif st.status == "completed":
        st = _assign(spec, st, selected, by_id, now, out)
    elif st.status == "paused":
        st = replace(st, gates=_judge(spec, st, by_id, now)[1])
    return replace(st, updated_at=now), tuple(out)


def _index(reports: Iterable[DeviceReport] | Mapping[str, DeviceReport]
           ) -> dict[str, DeviceReport]:
    items = reports.values() if isinstance(reports, Mapping) else reports
    out: dict[str, DeviceReport] = {}
    for r in items:
        if r.device_id in out:
            raise ValueError(f"reports: expected one per device, got two for {r.device_id}")
        out[r.device_id] = r
    return out


def _command(st: RolloutState, command: Command, by_id: Mapping[str, DeviceReport],
             out: list[Action]) -> RolloutState:
    name = type(command).__name__
    if st.status not in ACTIVE:
        raise CommandError(f"rollout {st.rollout_id} is {st.status}: expected running, "
                           f"paused or completed for {name}")
    if isinstance(command, Pause):
        if st.status == "completed":
            raise CommandError(f"rollout {st.rollout_id} is completed: nothing to pause")
        if st.status == "running":
            out.append(RolloutPaused(command.reason))
            return replace(st, status="paused", reason=command.reason)
        return st
    if isinstance(command, Resume):
        if st.status == "completed":
            raise CommandError(f"rollout {st.rollout_id} is completed: nothing to resume")
        if st.status == "paused":
            out.append(RolloutResumed())
            return replace(st, status="running", reason=None)
        return st
    if isinstance(command, Cancel):
        st = _revert_all(_freeze(st, by_id), command.reason, out)
        out.append(RolloutCancelled(command.reason))
        return replace(st, status="cancelled", reason=command.reason)
    if isinstance(command, Supersede):
        out.append(RolloutSuperseded(command.by))
        return replace(_freeze(st, by_id), status="superseded",
                       reason=f"superseded by {command.by}")
    raise ValueError(f"commands: expected Pause, Resume, Cancel or Supersede, got {command!r}")


def _revert_all(st: RolloutState, reason: str, out: list[Action]) -> RolloutState:
    for a in st.assignments:
        if a.active and a.failed is None:
            out.append(RevertDevice(a.device_id, a.previous_version, reason))
    return st


def _observe(st: RolloutState, by_id: Mapping[str, DeviceReport], now: int,
             grace: int | None, out: list[Action]) -> RolloutState:
    """Record failures (and revert those devices) and first commits."""
    changed = []
    for a in st.assignments:
        if a.active and a.failed is None:
            verdict, why = outcome(st, a, by_id.get(a.device_id), now, grace)
            if verdict == "failed":
                a = replace(a, failed=why)
                out.append(RevertDevice(a.device_id, a.previous_version, why or "failed"))
            elif verdict == "committed" and a.committed_at is None:
                a = replace(a, committed_at=now)
        changed.append(a)
    return replace(st, assignments=tuple(changed))


def _freeze(st: RolloutState, by_id: Mapping[str, DeviceReport]) -> RolloutState:
    """Every device's outcome as the rollout ends: what :func:`summary` shows from then on,
    whatever the devices report about later updates."""
    frozen = []
    for a in st.assignments:
        if a.final is None:
            verdict, why = outcome(st, a, by_id.get(a.device_id))
            a = replace(a, final=verdict, final_reason=why)
        frozen.append(a)
    return replace(st, assignments=tuple(frozen))


def _assign(spec: RolloutSpec, st: RolloutState, selected: Sequence[str],
            by_id: Mapping[str, DeviceReport], now: int, out: list[Action]) -> RolloutState:
    """Top the current wave up to its cumulative target."""
    total = len(selected)
    target = max(spec.waves[i].target(total) for i in range(st.wave + 1))
    need = target - sum(1 for a in st.assignments if a.active)
    if need <= 0:
        return st
    taken = {a.device_id for a in st.assignments}
    new = [d for d in assignment_order(st.rollout_id, selected) if d not in taken][:need]
    added = []
    for device_id in new:
        report = by_id.get(device_id)
        added.append(Assignment(device_id, st.wave, now,
                                report.running_version if report else None))
        out.append(AssignVersion(device_id, st.version))
    return replace(st, assignments=st.assignments + tuple(added))


def _advance(spec: RolloutSpec, st: RolloutState, selected: Sequence[str],
             by_id: Mapping[str, DeviceReport], now: int, out: list[Action]) -> RolloutState:
    if st.wave_started_at is None:
        st = replace(st, wave_started_at=now)
        out.append(WaveAdvanced(st.wave))
    while True:
        st = _assign(spec, st, selected, by_id, now, out)
        decision, reports, reason = _judge(spec, st, by_id, now)
        st = replace(st, gates=reports)
        if decision == "wait":
            return st
        out.extend(reports)
        if decision == "fail":
            assert reason is not None
            if spec.on_failure == "pause":
                out.append(RolloutPaused(reason))
                return replace(st, status="paused", reason=reason)
            st = _revert_all(_freeze(st, by_id), f"rollout rolled back: {reason}", out)
            out.append(RolloutRolledBack(reason))
            return replace(st, status="rolled_back", reason=reason)
        if st.wave == len(spec.waves) - 1:
            out.append(RolloutCompleted())
            return replace(st, status="completed")
        st = replace(st, wave=st.wave + 1, wave_started_at=now)
        out.append(WaveAdvanced(st.wave))


Decision = Literal["pass", "fail", "wait"]


def _judge(spec: RolloutSpec, st: RolloutState, by_id: Mapping[str, DeviceReport], now: int
           ) -> tuple[Decision, tuple[GateReport, ...], str | None]:
    """The current wave's gates (and the failed gate of earlier waves)."""
    g = spec.gates
    reports: list[GateReport] = []
    for w in range(st.wave):
        earlier = [a for a in st.assignments if a.active and a.wave == w]
        failed = sum(1 for a in earlier if a.failed is not None)
        if earlier and failed / len(earlier) > g.max_failed:
            reports.append(GateReport(w, "failed", failed / len(earlier), g.max_failed, False,
                                      f"{failed} of {len(earlier)} devices failed"))
    wave = [a for a in st.assignments if a.active and a.wave == st.wave]
    n = len(wave)
    if n == 0:
        return _decide(reports)
    verdicts = {a.device_id: outcome(st, a, by_id.get(a.device_id))[0] for a in wave}
    failed = sum(1 for v in verdicts.values() if v == "failed")
    committed = [a for a in wave if verdicts[a.device_id] == "committed"]
    pending = n - failed - len(committed)
    reports.append(GateReport(st.wave, "failed", failed / n, g.max_failed,
                              failed / n <= g.max_failed, f"{failed} of {n} devices failed"))
    reached = len(committed) / n >= g.min_committed
    reports.append(GateReport(st.wave, "committed", len(committed) / n, g.min_committed,
                              True if reached else (False if pending == 0 else None),
                              f"{len(committed)} of {n} devices committed, {pending} pending"))
    elapsed = now - max(a.assigned_at for a in wave)
    baked = elapsed >= g.bake_s
    reports.append(GateReport(st.wave, "bake", float(elapsed), float(g.bake_s),
                              True if baked else None, f"{elapsed}s of {g.bake_s}s since the "
                              "wave's last assignment"))
    healthy = [by_id[a.device_id] for a in committed]
    before = [r for a in st.assignments if a.active and a.wave < st.wave and a.failed is None
              and (r := by_id.get(a.device_id)) is not None
              and outcome(st, a, r)[0] == "committed"]
    for gate in _health_gates(g):
        reports.append(_health(st.wave, gate, baked, g, healthy, _rows(gate, g, healthy),
                               _rows(gate, g, before)))
    return _decide(reports)


def _health_gates(g: Gates) -> list[str]:
    return [gate for gate, on in (("error_rate", g.max_error_rate is not None),
                                  ("p95_ms", g.latency_gate), ("psi", g.max_psi is not None))
            if on]


def _rows(gate: str, g: Gates, devices: Sequence[DeviceReport]
          ) -> list[tuple[str, float, float]]:
    """(device, value, limit) of the devices with enough samples for ``gate``."""
    if gate == "error_rate":
        assert g.max_error_rate is not None
        return [(r.device_id, r.errors / r.requests, g.max_error_rate)
                for r in devices if r.requests >= g.min_samples]
    if gate == "p95_ms":
        return [(r.device_id, r.p95_ms, _budget(g.max_p95_ms, r))
                for r in devices if r.requests >= g.min_samples and r.p95_ms is not None]
    assert g.max_psi is not None
    return [(r.device_id, r.max_psi, g.max_psi)
            for r in devices if r.samples >= g.min_samples and r.max_psi is not None]


def _budget(limit: float | None, report: DeviceReport) -> float:
    if limit is not None:
        return limit
    if report.latency_budget_ms is None:
        raise ValueError(f"device report {report.device_id} latency_budget_ms: expected the "
                         f"budget of profile {report.profile} (gates.max_p95_ms is None), "
                         "got None")
    return report.latency_budget_ms


def quorum(min_reporting: float, committed: int) -> int:
    """How many of ``committed`` devices a health gate needs judged before it can pass:
    ``ceil(min_reporting * committed)``, at least 1 (0 without committed devices)."""
    if committed <= 0:
        return 0
    # round first: 0.8 * 5 is 4.000000000000001 in binary floating point
    return min(committed, max(1, math.ceil(round(min_reporting * committed, 9))))


#: devices a waiting health gate names in its detail (the rest are counted)
_NAMED: Final = 5


def _health(wave: int, gate: str, baked: bool, g: Gates, committed: Sequence[DeviceReport],
            rows: list[tuple[str, float, float]], earlier: list[tuple[str, float, float]]
            ) -> GateReport:
    """One health gate over the wave's committed devices; ``rows`` holds the judged ones
    (enough samples) as (device, value, limit), ``earlier`` the judged committed devices of
    the waves that passed before.

    The worst device (the highest value relative to its limit) decides: after the bake, one
    judged device over its limit fails the gate, whatever the others say, and a device of an
    earlier wave that went bad since its wave passed counts too. The gate passes only after
    the bake and once :func:`quorum` of this wave's committed devices are judged; until then
    it waits, and its detail says how many devices it waits for and names them.
    """
    what = "predictions" if gate == "psi" else "requests"
    n = len(committed)
    need = quorum(g.min_reporting, n)
    worst = min(rows, key=_badness) if rows else None
    gone_bad = [row for row in earlier if row[1] > row[2]]
    if gone_bad and (worst is None or _badness(min(gone_bad, key=_badness)) < _badness(worst)):
        worst = min(gone_bad, key=_badness)  # shown only when it is over its limit
    value, limit = (worst[1], worst[2]) if worst else (None, None)
    bad = worst is not None and worst[1] > worst[2]
    head = (f"worst {worst[0]}{' (an earlier wave)' if worst in earlier else ''}: "
            f"{worst[1]:g} against {worst[2]:g}" if worst else "no device judged yet")
    also = f", and {len(earlier)} of earlier waves" if earlier else ""
    if not n:
        detail = f"{head}; no committed device of this wave to judge yet"
    elif len(rows) >= need:
        detail = f"{head} ({len(rows)} of {n} committed devices judged{also})"
    else:
        judged = {row[0] for row in rows}
        short = [r for r in committed if r.device_id not in judged]
        named = ", ".join(_shortfall(r, gate, g.min_samples) for r in short[:_NAMED])
        more = f" and {len(short) - _NAMED} more" if len(short) > _NAMED else ""
        detail = (f"{head}; waiting for {need - len(rows)} more of {n} committed devices to "
                  f"have {g.min_samples} {what} ({len(rows)} have, {need} needed at "
                  f"min_reporting {g.min_reporting * 100:g}%)"
                  + (f": {named}{more}" if named else ""))
    if not baked:
        ok = None
    elif bad:
        ok = False
    else:
        ok = True if n and len(rows) >= need else None
    return GateReport(wave, gate, value, limit, ok, detail)


def _badness(row: tuple[str, float, float]) -> tuple[float, str]:
    device, value, limit = row
    if limit > 0:
        return -value / limit, device
    return (-float("inf") if value > 0 else 0.0), device


def _shortfall(r: DeviceReport, gate: str, min_samples: int) -> str:
    """Why a committed device is not judged yet, e.g. ``dev-3 (offline, 40 requests)``."""
    count = r.samples if gate == "psi" else r.requests
    what = "predictions" if gate == "psi" else "requests"
    why = f"{count} {what}" if count < min_samples else (
        "no successful request" if gate == "p95_ms" else "no PSI")
    return f"{r.device_id} ({'' if r.online else 'offline, '}{why})"


def _decide(reports: list[GateReport]
            ) -> tuple[Decision, tuple[GateReport, ...], str | None]:
    failing = next((r for r in reports if r.ok is False), None)
    if failing is not None:
        return "fail", tuple(reports), (f"wave {failing.wave} gate {failing.gate}: "
                                        f"{failing.detail}")
    if all(r.ok for r in reports):
        return "pass", tuple(reports), None
    return "wait", tuple(reports), None


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summary(state: RolloutState,
            reports: Iterable[DeviceReport] | Mapping[str, DeviceReport]) -> dict[str, Any]:
    """Per wave: assigned, committed, failed, pending, reverted; the latest gates; each moved
    device with the version the rollout wants on it and the version it actually runs (from
    its report), and why it is not committed.

    Counts are of active devices (still selected). Once the rollout ended (:data:`ENDED`),
    outcomes no longer follow the devices' reports, which may be about later updates: a
    superseded rollout shows each device's outcome frozen when it ended (``final``); after a
    rollback or a cancel, failed devices stay failed and the others are ``reverted`` once they
    no longer run this version (back on their previous one, or moved on by a newer
    deployment), else ``pending`` (reverting). Each row also carries ``outcome_at_end``.
    States written before state_version 2 have no frozen outcomes: they fall back to the
    reports. JSON-ready.

    Raises:
        ValueError: duplicate reports.
    """
    by_id = _index(reports)
    want = desired(state)
    last = max([state.wave, *(a.wave for a in state.assignments)])
    waves: list[dict[str, Any]] = [
        {"index": i, "assigned": 0, "committed": 0, "failed": 0, "pending": 0, "reverted": 0}
        for i in range(last + 1)]
    rows = []
    for a in state.assignments:
        report = by_id.get(a.device_id)
        running = report.running_version if report else None
        verdict: str
        if state.status == "superseded" and a.final is not None:
            verdict, why = a.final, a.final_reason
        elif a.failed is None and state.status in ("rolled_back", "cancelled"):
            verdict, why = _reverting(state, a, report)
        else:
            verdict, why = outcome(state, a, report)
        if a.active:
            waves[a.wave]["assigned"] += 1
            waves[a.wave][verdict] += 1
        rows.append({"device_id": a.device_id, "wave": a.wave, "active": a.active,
                     "outcome": verdict, "reason": why, "desired_version": want.get(a.device_id),
                     "running_version": running, "previous_version": a.previous_version,
                     "last_result": report.last_result if report else None,
                     "last_error": report.last_error if report else None,
                     "online": report.online if report else False,
                     "outcome_at_end": a.final})
    return {"rollout_id": state.rollout_id, "model": state.model, "version": state.version,
            "status": state.status, "reason": state.reason, "wave": state.wave,
            "wave_started_at": state.wave_started_at, "updated_at": state.updated_at,
            "waves": waves, "gates": [asdict(g) for g in state.gates], "devices": rows}


def _reverting(state: RolloutState, a: Assignment, report: DeviceReport | None
               ) -> tuple[str, str | None]:
    """A device of a rolled-back or cancelled rollout that did not fail: ``reverted`` once it
    no longer runs this version, else ``pending``."""
    if report is None:
        return "pending", "reverting"
    running = report.running_version
    if running == a.previous_version:
        return "reverted", None
    if running == state.version:
        return "pending", "reverting"
    before = a.previous_version or "no version"
    return "reverted", (f"runs {running or 'no version'} now, not {before}: moved on by a "
                        "newer deployment")

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

How a device's outcome and a wave's gates are judged is :mod:`fleet_server.rollout.gates`
(:func:`outcome`, :func:`quorum`); the reports, commands and actions are
:mod:`fleet_server.rollout.messages`, and the persisted :class:`RolloutState` (with its
statuses) is :mod:`fleet_server.rollout.state`. The package (:mod:`fleet_server.rollout`)
exports the public names of all four.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any

from fleet_server.rollout.gates import judge, outcome
from fleet_server.rollout.messages import (
    Action,
    AssignVersion,
    Cancel,
    Command,
    CommandError,
    DeviceReport,
    Pause,
    Resume,
    RevertDevice,
    RolloutCancelled,
    RolloutCompleted,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutSuperseded,
    Supersede,
    WaveAdvanced,
)
from fleet_server.rollout.spec import RolloutSpec
from fleet_server.rollout.state import ACTIVE, Assignment, RolloutState

__all__ = ["assignment_order", "desired", "plan", "summary"]

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
        st = replace(st, gates=judge(spec, st, by_id, now)[1])
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
        decision, reports, reason = judge(spec, st, by_id, now)
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

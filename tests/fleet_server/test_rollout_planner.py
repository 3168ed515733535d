"""The rollout planner as named, table-driven scenarios (STYLE rules 1, 13, 16).

Each scenario is a spec, a fleet and a timeline of steps. A step gives the clock, the reports
the devices send (a *policy*: every device assigned so far reports ``default`` unless its
(wave, position) is overridden; devices not assigned yet run the old version) and operator
commands; it expects the status after the step and the actions, abbreviated by :func:`brief`
(passing gate reports are left out, failing ones show as ``FAIL wave:gate``). Every run also
checks invariants: no device assigned or reverted twice, and the actions replayed onto the
devices agree with the level-triggered :func:`desired` view.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import pytest

from fleet_server.rollout import (
    Action,
    Assignment,
    AssignVersion,
    Cancel,
    Command,
    CommandError,
    DeviceReport,
    GateReport,
    Gates,
    Pause,
    Resume,
    RevertDevice,
    RolloutCancelled,
    RolloutCompleted,
    RolloutPaused,
    RolloutResumed,
    RolloutRolledBack,
    RolloutSpec,
    RolloutState,
    RolloutSuperseded,
    Supersede,
    WaveAdvanced,
    assignment_order,
    desired,
    plan,
    summary,
)
from fleet_server.rollout.gates import bake_start, quorum

OLD, NEW = "v1", "v2"


def fleet_of(n: int) -> list[str]:
    return [f"dev-{i:03d}" for i in range(n)]


# ---------------------------------------------------------------------------------------------
# reports
# ---------------------------------------------------------------------------------------------
Override = str | Mapping[str, Any]


def report(device_id: str, kind: str, **extra: Any) -> DeviceReport | None:
    """One device's report: ``kind`` says how its update of NEW went."""
    base: dict[str, Any] = {"profile": "rpi4", "latency_budget_ms": 50.0, "online": True}
    if kind == "unassigned":
        base.update(running_version=OLD, applied_sequence=3, last_result="ok")
    elif kind == "ok":
        base.update(running_version=NEW, applied_sequence=4, desired_sequence=4,
                    last_result="ok", requests=500, errors=0, p95_ms=20.0, max_psi=0.01,
                    samples=500)
    elif kind == "updating":
        base.update(running_version=OLD, applied_sequence=3, desired_sequence=4,
                    last_result="ok")
    elif kind in ("failed", "rolled_back", "refused"):
        base.update(running_version=OLD, applied_sequence=4, desired_sequence=4,
                    last_result=kind, last_error=f"{kind} on the device")
    elif kind == "wrong_version":
        base.update(running_version="v0", applied_sequence=4, desired_sequence=4,
                    last_result="ok")
    elif kind == "offline":
        base.update(running_version=OLD, applied_sequence=3, desired_sequence=4,
                    last_result="ok", online=False)
    elif kind == "silent":
        return None
    else:
        raise AssertionError(f"unknown report kind {kind!r}")
    base.update(extra)
    return DeviceReport(device_id, **base)


#: committed and online, but has served nothing yet
SILENT: Final = {"requests": 0, "errors": 0, "p95_ms": None, "samples": 0, "max_psi": None}
#: committed, then went offline before it sent any telemetry
GONE: Final = {**SILENT, "online": False}
#: applied a later desired state (sequence 5) whose other model failed; still runs NEW
OTHER_MODEL_FAILED: Final = {"applied_sequence": 5, "last_result": "rolled_back",
                             "last_error": "model other 3: health check failed"}
#: wiped and re-provisioned: a fresh agent that runs nothing and applied nothing yet
WIPED: Final = {**SILENT, "running_version": None, "applied_sequence": 0, "last_result": None}

Policy = Callable[[RolloutState, Sequence[str]], list[DeviceReport]]


def fleet(default: str = "ok", overrides: Mapping[tuple[int, int], Override] | None = None,
          **health: Any) -> Policy:
    """Every assigned device reports ``default`` (with ``health`` on "ok" reports) unless
    ``overrides[(wave, position in wave)]`` says another kind, or gives extra fields."""
    def policy(state: RolloutState, devices: Sequence[str]) -> list[DeviceReport]:
        out = []
        for device_id in devices:
            a = state.assignment(device_id)
            if a is None:
                r = report(device_id, "unassigned")
            else:
                o = (overrides or {}).get((a.wave, state.wave_devices(a.wave).index(device_id)))
                kind = o if isinstance(o, str) else default
                extra = dict(health) if kind == "ok" else {}
                if isinstance(o, Mapping):
                    extra.update(o)
                r = report(device_id, kind, **extra)
            if r is not None:
                out.append(r)
        return out
    return policy


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    at: int
    status: str
    actions: list[str]
    reports: Policy = field(default_factory=fleet)
    commands: tuple[Command, ...] = ()
    devices: Sequence[str] | None = None  # the fleet from this step on


@dataclass(frozen=True)
class Scenario:
    spec: RolloutSpec
    devices: Sequence[str]
    steps: Sequence[Step]


def spec(waves: str, on_failure: str = "pause", **gates: Any) -> RolloutSpec:
    """Scenarios about the bake give ``bake_s``: the bake counts from a wave's last commit,
    which a step sees only after the step that assigned the device."""
    g: dict[str, Any] = {"min_committed": 1.0, "max_failed": 0.0, "bake_s": 0,
                         "min_samples": 100, "offline_grace_s": 300}
    g.update(gates)
    return RolloutSpec.parse(waves, Gates(**g), on_failure)  # type: ignore[arg-type]


def timed(on_report_timeout: str, on_failure: str = "pause", waves: str = "2,all",
          **gates: Any) -> RolloutSpec:
    """The error-rate gate only, and a 600 s deadline for its evidence."""
    return spec(waves, on_failure, latency_gate=False, max_error_rate=0.05,
                report_timeout_s=600, on_report_timeout=on_report_timeout, **gates)


def brief(actions: Sequence[Action]) -> list[str]:
    words: list[str] = []
    for a in actions:
        if isinstance(a, GateReport):
            if a.ok is not False:
                continue
            word = f"FAIL {a.wave}:{a.gate}"
        elif isinstance(a, AssignVersion):
            word = "assign"
        elif isinstance(a, RevertDevice):
            word = f"revert {a.version}"
        elif isinstance(a, WaveAdvanced):
            word = f"wave {a.index}"
        else:
            word = {RolloutPaused: "paused", RolloutResumed: "resumed",
                    RolloutRolledBack: "rolled_back", RolloutCompleted: "completed",
                    RolloutCancelled: "cancelled", RolloutSuperseded: "superseded"}[type(a)]
        words.append(word)
    out: list[str] = []
    for word in words:  # collapse runs: assign, assign, assign -> assign*3
        if out and out[-1].split("*")[0] == word:
            head, _, count = out[-1].partition("*")
            out[-1] = f"{head}*{int(count or 1) + 1}"
        else:
            out.append(word)
    return out


def run(sc: Scenario) -> list[tuple[RolloutState, tuple[Action, ...]]]:
    state = RolloutState("rollout-7", "digits", NEW)
    devices = list(sc.devices)
    on_device: dict[str, str | None] = {}  # the actions replayed
    assigned: set[str] = set()
    reverted: set[str] = set()
    history = []
    for step in sc.steps:
        devices = list(step.devices) if step.devices is not None else devices
        reports = step.reports(state, devices)
        state, actions = plan(sc.spec, state, devices, reports, step.at, step.commands)
        where = f"at t={step.at}: {brief(actions)} ({state.reason})"
        assert state.status == step.status, where
        assert brief(actions) == step.actions, where
        for a in actions:
            if isinstance(a, AssignVersion):
                assert a.device_id not in assigned, f"{a.device_id} assigned twice"
                assigned.add(a.device_id)
                on_device[a.device_id] = a.version
            elif isinstance(a, RevertDevice):
                assert a.device_id not in reverted, f"{a.device_id} reverted twice"
                reverted.add(a.device_id)
                on_device[a.device_id] = a.version
        active = {a.device_id for a in state.assignments if a.active}
        assert desired(state) == {d: on_device[d] for d in active}, where
        history.append((state, actions))
    return history


SCENARIOS: dict[str, Scenario] = {
    # a wave's devices commit at the first step after their assignment; the bake counts from
    # the wave's last commit (or assignment, when that is later)
    "happy-path-three-waves-completes": Scenario(spec("5%,25%,100%", bake_s=60), fleet_of(20), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(30, "running", []),  # committed: the bake starts
        Step(89, "running", []),
        Step(90, "running", ["wave 1", "assign*4"]),
        Step(120, "running", []),
        Step(180, "running", ["wave 2", "assign*15"]),
        Step(200, "running", []),
        Step(260, "completed", ["completed"]),
        Step(320, "completed", []),
    ]),
    "bake-not-elapsed-no-advance": Scenario(spec("50%,100%", bake_s=600), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(10, "running", []),  # all committed at once, but baking
        Step(609, "running", []),
        Step(610, "running", ["wave 1", "assign*2"]),
    ]),
    # a device selected later is assigned after the others committed; while it is still
    # updating (within min_committed), the bake counts from its assignment
    "bake-counts-from-the-waves-last-assignment": Scenario(
        spec("50%,100%", bake_s=100, min_committed=0.6), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", []),  # both committed
            Step(50, "running", ["assign"], devices=fleet_of(6)),  # 50% of 6 is 3
            Step(110, "running", [], reports=fleet(overrides={(0, 2): "updating"})),
            Step(149, "running", [], reports=fleet(overrides={(0, 2): "updating"})),
            Step(150, "running", ["wave 1", "assign*3"],
                 reports=fleet(overrides={(0, 2): "updating"})),
        ]),
    # a device that commits late restarts the bake: every device is watched for bake_s
    "bake-counts-from-the-waves-last-commit": Scenario(
        spec("50%,100%", bake_s=100), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): "updating"})),
            Step(90, "running", []),  # the second one committed
            Step(110, "running", []),  # 100 s after the first commit, 20 after the last
            Step(189, "running", []),
            Step(190, "running", ["wave 1", "assign*2"]),
        ]),
    "too-many-failures-pause": Scenario(spec("50%,100%", max_failed=0.2), fleet_of(10), [
        Step(0, "running", ["wave 0", "assign*5"]),
        Step(10, "paused", ["revert v1*2", "FAIL 0:failed", "FAIL 0:committed", "paused"],
             reports=fleet(overrides={(0, 1): "failed", (0, 3): "refused"})),
        Step(20, "paused", [], reports=fleet(overrides={(0, 1): "failed", (0, 3): "refused"})),
    ]),
    "too-many-failures-rollback-reverts-every-moved-device": Scenario(
        spec("50%,100%", "rollback", max_failed=0.2), fleet_of(10), [
            Step(0, "running", ["wave 0", "assign*5"]),
            Step(10, "rolled_back", ["revert v1*2", "FAIL 0:failed", "FAIL 0:committed",
                                     "revert v1*3", "rolled_back"],
                 reports=fleet(overrides={(0, 0): "failed", (0, 4): "wrong_version"})),
            Step(20, "rolled_back", []),
        ]),
    "failures-within-the-limit-advance": Scenario(
        spec("50%,100%", max_failed=0.25, min_committed=0.75), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(60, "running", ["revert v1", "wave 1", "assign*4"],
                 reports=fleet(overrides={(0, 2): "failed"})),
        ]),
    "committed-unreachable-fails": Scenario(
        spec("50%,100%", max_failed=0.5, min_committed=1.0), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(5, "paused", ["revert v1", "FAIL 0:committed", "paused"],
                 reports=fleet(overrides={(0, 0): "rolled_back"})),
        ]),
    "error-rate-gate-fails-after-the-bake": Scenario(
        spec("50%,100%", bake_s=60, max_error_rate=0.05), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(30, "running", [], reports=fleet(overrides={(0, 1): {"errors": 50}})),
            Step(59, "running", [], reports=fleet(overrides={(0, 1): {"errors": 50}})),
            # seen committed at 30, so the wave could pass only at 90; bad evidence fails it
            # once bake_s went by since the assignment: a late commit never delays failing
            Step(60, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 1): {"errors": 50}})),
        ]),
    "error-rate-within-the-limit-passes": Scenario(
        spec("50%,100%", max_error_rate=0.05), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", ["wave 1", "assign*2"], reports=fleet(errors=25)),
        ]),
    "p95-gate-fails-against-the-spec-limit": Scenario(
        spec("50%,100%", "rollback", max_p95_ms=30.0), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "rolled_back", ["FAIL 0:p95_ms", "revert v1*2", "rolled_back"],
                 reports=fleet(p95_ms=31.0)),
        ]),
    "p95-gate-fails-against-the-profile-budget": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "paused", ["FAIL 0:p95_ms", "paused"],
             reports=fleet(overrides={(0, 0): {"profile": "jetson-orin-nano",
                                               "latency_budget_ms": 10.0, "p95_ms": 12.0}})),
    ]),
    "p95-within-each-profile-budget-passes": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "running", ["wave 1", "assign*2"], reports=fleet(
            p95_ms=45.0, overrides={(0, 0): {"profile": "rpi-zero2w",
                                             "latency_budget_ms": 200.0, "p95_ms": 150.0}})),
    ]),
    "psi-gate-fails": Scenario(spec("50%,100%", "rollback", max_psi=0.2), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "rolled_back", ["FAIL 0:psi", "revert v1*2", "rolled_back"],
             reports=fleet(overrides={(0, 1): {"max_psi": 0.45}})),
    ]),
    "too-few-samples-waits-then-passes": Scenario(
        spec("50%,100%", max_error_rate=0.05, max_psi=0.2), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", [], reports=fleet(requests=99, samples=99, errors=50,
                                                  max_psi=0.9, p95_ms=900.0)),
            Step(600, "running", [], reports=fleet(requests=99, samples=99, errors=50,
                                                   max_psi=0.9, p95_ms=900.0)),
            Step(700, "running", ["wave 1", "assign*2"], reports=fleet(requests=100)),
        ]),
    "too-few-samples-then-enough-bad-ones-fail": Scenario(
        spec("50%,100%", max_psi=0.2), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", [], reports=fleet(samples=10, max_psi=0.9)),
            Step(70, "paused", ["FAIL 0:psi", "paused"], reports=fleet(max_psi=0.9)),
        ]),
    "device-rolled-back-by-itself-counts-as-failed": Scenario(
        spec("2,all", max_failed=0.5, min_committed=0.5), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", ["revert v1", "wave 1", "assign*4"],
                 reports=fleet(overrides={(0, 1): "rolled_back"})),
        ]),
    "earlier-wave-going-bad-stops-the-rollout": Scenario(
        spec("2,all", max_failed=0.0), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", ["wave 1", "assign*4"]),
            Step(70, "paused", ["revert v1", "FAIL 0:failed", "paused"],
                 reports=fleet(overrides={(0, 0): "rolled_back"})),
        ]),
    "offline-within-grace-pending-past-grace-failed": Scenario(
        spec("50%,100%", offline_grace_s=300), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(100, "running", [], reports=fleet(overrides={(0, 0): "offline"})),
            Step(299, "running", [], reports=fleet(overrides={(0, 0): "offline"})),
            Step(300, "paused", ["revert v1", "FAIL 0:failed", "FAIL 0:committed", "paused"],
                 reports=fleet(overrides={(0, 0): "offline"})),
        ]),
    "never-reported-past-grace-failed": Scenario(
        spec("50%,100%", "rollback", offline_grace_s=300), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(300, "rolled_back", ["revert v1", "FAIL 0:failed", "FAIL 0:committed",
                                      "revert v1", "rolled_back"],
                 reports=fleet(overrides={(0, 1): "silent"})),
        ]),
    "no-traffic-waits-for-the-latency-gate": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(6000, "running", [], reports=fleet(requests=0, p95_ms=None)),
    ]),
    "no-traffic-without-health-gates-advances": Scenario(
        spec("50%,100%", latency_gate=False), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", ["wave 1", "assign*2"], reports=fleet(requests=0, p95_ms=None)),
        ]),
    "online-but-slow-stays-pending": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(10_000, "running", [], reports=fleet(overrides={(0, 0): "updating"})),
        Step(10_001, "running", ["wave 1", "assign*2"]),
    ]),
    "pause-before-start-assigns-nothing": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "paused", ["paused"], commands=(Pause(),)),
        Step(100, "paused", []),
        Step(200, "running", ["resumed", "wave 0", "assign*2"], commands=(Resume(),)),
    ]),
    "pause-mid-wave-holds-then-resume-advances": Scenario(spec("5%,25%,100%", bake_s=60),
                                                          fleet_of(20), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(30, "paused", ["paused"], commands=(Pause(),)),
        Step(500, "paused", []),
        Step(500, "paused", [], commands=(Pause(),)),  # idempotent
        Step(600, "running", ["resumed", "wave 1", "assign*4"], commands=(Resume(),)),
        Step(600, "running", [], commands=(Resume(),)),  # idempotent
    ]),
    "resume-after-a-failed-gate-pauses-again": Scenario(spec("50%,100%"), fleet_of(4), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "paused", ["FAIL 0:p95_ms", "paused"], reports=fleet(p95_ms=80.0)),
        Step(70, "paused", ["resumed", "FAIL 0:p95_ms", "paused"], reports=fleet(p95_ms=80.0),
             commands=(Resume(),)),
        Step(80, "running", ["resumed", "wave 1", "assign*2"], commands=(Resume(),)),
    ]),
    "cancel-mid-wave-reverts-moved-devices": Scenario(spec("5%,25%,100%"), fleet_of(20), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "running", ["wave 1", "assign*4"]),
        Step(70, "cancelled", ["revert v1*5", "cancelled"], commands=(Cancel(),)),
        Step(80, "cancelled", []),
    ]),
    "cancel-while-paused": Scenario(spec("50%,100%", max_failed=0.2), fleet_of(10), [
        Step(0, "running", ["wave 0", "assign*5"]),
        Step(10, "paused", ["revert v1*2", "FAIL 0:failed", "FAIL 0:committed", "paused"],
             reports=fleet(overrides={(0, 1): "failed", (0, 3): "refused"})),
        Step(20, "cancelled", ["revert v1*3", "cancelled"], commands=(Cancel(),)),
    ]),
    "cancel-after-completion-reverts-everything": Scenario(spec("1,all"), fleet_of(3), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "running", ["wave 1", "assign*2"]),
        Step(120, "completed", ["completed"]),
        Step(130, "cancelled", ["revert v1*3", "cancelled"], commands=(Cancel(),)),
    ]),
    "supersede-mid-rollout-reverts-nothing": Scenario(spec("5%,25%,100%"), fleet_of(20), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "running", ["wave 1", "assign*4"]),
        Step(61, "superseded", ["superseded"], commands=(Supersede("rollout-8"),)),
        Step(200, "superseded", []),
    ]),
    "supersede-after-completion": Scenario(spec("all"), fleet_of(2), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "completed", ["completed"]),
        Step(61, "superseded", ["superseded"], commands=(Supersede("rollout-8"),)),
    ]),
    "counts-two-ten-all": Scenario(spec("2,10,all"), fleet_of(20), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "running", ["wave 1", "assign*8"]),
        Step(120, "running", ["wave 2", "assign*10"]),
        Step(180, "completed", ["completed"]),
    ]),
    "counts-then-fractions": Scenario(spec("1,10%,all"), fleet_of(30), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "running", ["wave 1", "assign*2"]),
        Step(120, "running", ["wave 2", "assign*27"]),
    ]),
    "counts-larger-than-the-fleet-pass-through-empty-waves": Scenario(
        spec("2,10,all"), fleet_of(5), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(60, "running", ["wave 1", "assign*3"]),
            Step(120, "completed", ["wave 2", "completed"]),
        ]),
    "one-device-fleet": Scenario(spec("5%,25%,100%"), fleet_of(1), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "completed", ["wave 1", "wave 2", "completed"]),
    ]),
    "rounding-5-percent-of-7-is-1": Scenario(spec("5%,50%,100%"), fleet_of(7), [
        Step(0, "running", ["wave 0", "assign"]),
        Step(60, "running", ["wave 1", "assign*3"]),  # ceil(3.5) = 4 in all
        Step(120, "running", ["wave 2", "assign*3"]),
    ]),
    "rounding-5-percent-of-100-is-5": Scenario(spec("5%,100%"), fleet_of(100), [
        Step(0, "running", ["wave 0", "assign*5"]),
    ]),
    "empty-fleet-completes": Scenario(spec("5%,100%"), [], [
        Step(0, "completed", ["wave 0", "wave 1", "completed"]),
    ]),
    "new-devices-join-a-completed-rollout": Scenario(spec("all"), fleet_of(2), [
        Step(0, "running", ["wave 0", "assign*2"]),
        Step(60, "completed", ["completed"]),
        Step(100, "completed", ["assign*2"], devices=fleet_of(4)),
        Step(10_000, "completed", [], reports=fleet(overrides={(0, 3): "offline"})),
        Step(10_001, "completed", ["revert v1"], reports=fleet(overrides={(0, 2): "failed"})),
    ]),
    # rollout-7 orders fleet_of(4) as dev-001, dev-000, dev-003, dev-002
    "deselected-device-counts-nowhere-and-is-not-reverted": Scenario(
        spec("50%,100%", "rollback"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            # dev-001 leaves the selection while failing: wave 0 is topped up instead
            Step(60, "running", ["assign"], devices=["dev-000", "dev-002", "dev-003"]),
            Step(120, "running", ["wave 1", "assign"]),
            Step(180, "rolled_back", ["revert v1", "FAIL 1:failed", "FAIL 1:committed",
                                      "revert v1*2", "rolled_back"],
                 reports=fleet(overrides={(1, 0): "refused"})),
        ]),
    # --- health gates judge a wave only on enough of it (gates.min_reporting) ---------------
    # no bake: one healthy device used to pass the wave before the other one served anything
    "no-bake-health-gate-waits-for-every-committed-device": Scenario(
        spec("2,all", bake_s=0, max_error_rate=0.05), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): SILENT})),
            Step(20, "running", ["wave 1", "assign*2"]),
        ]),
    "committed-then-offline-without-telemetry-holds-the-wave": Scenario(
        spec("2,all", bake_s=0), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 0): GONE})),
            Step(100_000, "running", [], reports=fleet(overrides={(0, 0): GONE})),
        ]),
    "quorum-passes-without-the-silent-device": Scenario(
        spec("4,all", bake_s=0, min_reporting=0.75), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(10, "running", ["wave 1", "assign*4"], reports=fleet(overrides={(0, 3): GONE})),
        ]),
    "quorum-not-reached-waits": Scenario(
        spec("4,all", bake_s=0, min_reporting=0.75), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE, (0, 3): SILENT})),
            Step(20, "running", ["wave 1", "assign*4"],
                 reports=fleet(overrides={(0, 1): GONE})),
        ]),
    "quorum-rounds-up-3-of-4-at-0.6": Scenario(
        spec("4,all", bake_s=0, min_reporting=0.6), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 0): GONE, (0, 2): SILENT})),
        ]),
    "one-bad-judged-device-fails-before-the-quorum": Scenario(
        spec("2,all", bake_s=0, max_error_rate=0.05), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 0): {"errors": 100}, (0, 1): SILENT})),
        ]),
    "after-the-bake-health-waits-for-a-late-reporter": Scenario(
        spec("2,all", bake_s=60, max_psi=0.2), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): {"samples": 10}})),
            Step(70, "running", [], reports=fleet(overrides={(0, 1): {"samples": 10}})),
            Step(71, "running", ["wave 1", "assign*2"]),
        ]),
    "many-failures-judged-over-the-wave-not-over-the-reporters": Scenario(
        spec("4,all", max_failed=0.25, min_committed=0.5), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            # 1 failed, 3 not reported yet: 1 of 4 is within the limit (not 1 of 1)
            Step(10, "running", ["revert v1"], reports=fleet(overrides={
                (0, 0): "failed", (0, 1): "updating", (0, 2): "updating", (0, 3): "updating"})),
            Step(20, "paused", ["revert v1", "FAIL 0:failed", "paused"], reports=fleet(
                overrides={(0, 0): "failed", (0, 1): "refused", (0, 2): "updating",
                           (0, 3): "updating"})),
        ]),
    # a canary that went bad after its wave passed stops the next wave's health gate
    "an-earlier-wave-gone-unhealthy-fails-the-current-wave": Scenario(
        spec("2,all", bake_s=60, max_error_rate=0.05), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", []),
            Step(70, "running", ["wave 1", "assign*4"]),
            Step(100, "running", [], reports=fleet(overrides={(0, 0): {"errors": 60}})),
            Step(160, "paused", ["FAIL 1:error_rate", "paused"],
                 reports=fleet(overrides={(0, 0): {"errors": 60}})),
        ]),
    # ... but healthy earlier waves do not stand in for the current wave's quorum
    "earlier-waves-do-not-count-toward-the-quorum": Scenario(
        spec("2,all", bake_s=0, max_error_rate=0.05), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", ["wave 1", "assign*4"]),
            Step(20, "running", [], reports=fleet(overrides={
                (1, i): SILENT for i in range(4)})),
            Step(30, "completed", ["completed"]),
        ]),
    # --- a deadline for evidence (gates.report_timeout_s, on_report_timeout) ---------------
    # both devices commit at 10; one goes offline without telemetry: at 610 it has missed the
    # deadline, and the error-rate gate can no longer reach its quorum
    "report-timeout-fails-the-wave": Scenario(
        timed("fail"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(609, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(610, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 1): GONE})),
        ]),
    "report-timeout-rolls-back-with-on-failure-rollback": Scenario(
        timed("fail", "rollback"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(610, "rolled_back", ["FAIL 0:error_rate", "revert v1*2", "rolled_back"],
                 reports=fleet(overrides={(0, 1): GONE})),
        ]),
    # online but serving nothing is the same: the deadline is about evidence, not connectivity
    "report-timeout-fails-an-online-but-idle-device": Scenario(
        timed("fail"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): SILENT})),
            Step(609, "running", [], reports=fleet(overrides={(0, 1): SILENT})),
            Step(610, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 1): SILENT})),
        ]),
    "report-timeout-excludes-the-silent-device": Scenario(
        timed("exclude"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(609, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(610, "running", ["wave 1", "assign*2"], reports=fleet(overrides={(0, 1): GONE})),
        ]),
    "report-timeout-excludes-an-online-but-idle-device": Scenario(
        timed("exclude"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): SILENT})),
            Step(610, "running", ["wave 1", "assign*2"],
                 reports=fleet(overrides={(0, 1): SILENT})),
        ]),
    # the deadline counts from each device's own commit, not from the wave's first one
    "report-timeout-counts-from-each-devices-commit": Scenario(
        timed("fail"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): "updating"})),
            Step(300, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(899, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(900, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 1): GONE})),
        ]),
    # it sends its numbers a second before the deadline: judged like any other device
    "report-just-before-the-deadline-is-judged": Scenario(
        timed("fail"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(609, "running", ["wave 1", "assign*2"]),
        ]),
    "report-just-before-the-deadline-with-bad-numbers-fails-on-them": Scenario(
        timed("exclude"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(609, "paused", ["FAIL 0:error_rate", "paused"],
                 reports=fleet(overrides={(0, 1): {"errors": 100}})),
        ]),
    # 'fail' fails only once the quorum is out of reach: a device still within its deadline
    # can make it up
    "report-timeout-fails-when-the-quorum-is-out-of-reach": Scenario(
        timed("fail", waves="4,all", min_reporting=0.5), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(10, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 1): "updating", (0, 2): "updating", (0, 3): "updating"})),
            Step(300, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
            # 1 judged, 1 timed out, 2 committed at 300 and silent: 2 of 4 needed
            Step(610, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
            Step(899, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
            Step(900, "paused", ["FAIL 0:error_rate", "paused"], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
        ]),
    "report-timeout-quorum-made-up-by-a-later-device": Scenario(
        timed("fail", waves="4,all", min_reporting=0.5), fleet_of(8), [
            Step(0, "running", ["wave 0", "assign*4"]),
            Step(10, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 1): "updating", (0, 2): "updating", (0, 3): "updating"})),
            Step(300, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
            Step(610, "running", [], reports=fleet(overrides={
                (0, 0): GONE, (0, 2): SILENT, (0, 3): SILENT})),
            Step(620, "running", ["wave 1", "assign*4"], reports=fleet(overrides={
                (0, 0): GONE, (0, 3): SILENT})),
        ]),
    # the bake still holds: a device past its deadline fails the gate only after the bake,
    # and one that reports before the bake is over is judged
    "report-timeout-waits-for-the-bake": Scenario(
        timed("fail", bake_s=1000), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(700, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(1010, "running", ["wave 1", "assign*2"]),
        ]),
    # devices of earlier waves do not time out: their wave passed (here on a quorum)
    "report-timeout-ignores-earlier-waves": Scenario(
        timed("fail", min_reporting=0.5), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", ["wave 1", "assign*4"], reports=fleet(overrides={(0, 1): GONE})),
            Step(20, "running", [], reports=fleet(overrides={
                (0, 1): GONE, **{(1, i): "updating" for i in range(4)}})),
            Step(700, "completed", ["completed"], reports=fleet(overrides={(0, 1): GONE})),
        ]),
    # ... but an excluded device is still watched: bad numbers later fail the current wave
    "an-excluded-device-that-reports-bad-numbers-later-fails-the-rollout": Scenario(
        timed("exclude"), fleet_of(6), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(610, "running", ["wave 1", "assign*4"], reports=fleet(overrides={(0, 1): GONE})),
            Step(620, "paused", ["FAIL 1:error_rate", "paused"], reports=fleet(overrides={
                (0, 1): {"errors": 100}, **{(1, i): "updating" for i in range(4)}})),
        ]),
    # without a deadline (the default) the silent device holds the wave, as before
    "no-report-timeout-holds-the-wave": Scenario(
        spec("2,all", latency_gate=False, max_error_rate=0.05), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", [], reports=fleet(overrides={(0, 1): GONE})),
            Step(100_000, "running", [], reports=fleet(overrides={(0, 1): GONE})),
        ]),
    # --- evidence about other updates ------------------------------------------------------
    # the device committed NEW; a later desired state (another model) failed on it while it
    # still runs NEW: that result is not about this rollout
    "a-later-failure-while-running-the-version-keeps-the-commit": Scenario(
        spec("2,all", bake_s=60), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", []),
            Step(70, "running", ["wave 1", "assign*2"],
                 reports=fleet(overrides={(0, 1): OTHER_MODEL_FAILED})),
        ]),
    # never seen committed: a failure while it runs NEW may be a rollback of NEW that failed
    "a-failure-before-any-commit-counts-even-while-running-the-version": Scenario(
        spec("2,all"), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "paused", ["revert v1", "FAIL 0:failed", "FAIL 0:committed", "paused"],
                 reports=fleet(overrides={(0, 1): OTHER_MODEL_FAILED})),
        ]),
    # a committed device wiped and re-provisioned (same id, fresh agent): it runs nothing and
    # applied nothing, so it is pending again and holds the wave until it has re-applied
    "re-provisioned-device-is-pending-until-it-re-applies": Scenario(
        spec("2,all", bake_s=60), fleet_of(4), [
            Step(0, "running", ["wave 0", "assign*2"]),
            Step(10, "running", []),
            Step(60, "running", [], reports=fleet(overrides={(0, 0): WIPED})),
            Step(70, "running", ["wave 1", "assign*2"]),
        ]),
}


@pytest.mark.parametrize("sc", list(SCENARIOS.values()), ids=list(SCENARIOS))
def test_scenario(sc: Scenario) -> None:
    run(sc)


# ---------------------------------------------------------------------------------------------
# determinism and stable assignment
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCENARIOS), ids=list(SCENARIOS))
def test_same_inputs_same_outputs(name: str) -> None:
    first, second = run(SCENARIOS[name]), run(SCENARIOS[name])
    assert first == second
    assert [s.to_dict() for s, _ in first] == [s.to_dict() for s, _ in second]


def test_assignment_order_is_stable_when_devices_are_added() -> None:
    small = assignment_order("rollout-7", fleet_of(20))
    big = assignment_order("rollout-7", fleet_of(40))
    assert [d for d in big if d in set(small)] == small
    assert assignment_order("rollout-7", reversed(fleet_of(20))) == small
    assert assignment_order("rollout-8", fleet_of(20)) != small  # per rollout, not global


def test_added_devices_do_not_reshuffle_earlier_assignments() -> None:
    sp = spec("10%,50%,100%")
    state = RolloutState("rollout-7", "digits", NEW)
    state, _ = plan(sp, state, fleet_of(20), fleet()(state, fleet_of(20)), 0)
    wave0 = state.wave_devices(0)
    assert len(wave0) == 2
    grown = fleet_of(60)
    state, actions = plan(sp, state, grown, fleet()(state, grown), 10)
    assert state.wave_devices(0)[:2] == wave0
    assert len(state.wave_devices(0)) == 6  # 10% of 60
    assert brief(actions) == ["assign*4"]
    state, _ = plan(sp, state, grown, fleet()(state, grown), 70)
    assert state.wave_devices(0)[:2] == wave0 and state.wave == 1
    assert len(state.wave_devices(1)) == 24


def test_the_first_wave_is_the_head_of_the_assignment_order() -> None:
    state, _ = plan(spec("25%,100%"), RolloutState("r", "digits", NEW), fleet_of(8), [], 0)
    assert list(state.wave_devices(0)) == assignment_order("r", fleet_of(8))[:2]


# ---------------------------------------------------------------------------------------------
# what the actions and the summary carry
# ---------------------------------------------------------------------------------------------
def test_rollback_reverts_each_moved_device_to_its_own_previous_version() -> None:
    sp = spec("all", "rollback", max_p95_ms=30.0)
    devices = fleet_of(3)
    before = [report(d, "unassigned", running_version=v)
              for d, v in zip(devices, ("v0", OLD, None), strict=True)]
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices,
                    [r for r in before if r is not None], 0)
    state, actions = plan(sp, state, devices, fleet(p95_ms=99.0)(state, devices), 60)
    assert state.status == "rolled_back"
    reverts = {a.device_id: a.version for a in actions if isinstance(a, RevertDevice)}
    assert reverts == {"dev-000": "v0", "dev-001": OLD, "dev-002": None}
    assert desired(state) == reverts
    assert state.reason is not None and "p95_ms" in state.reason


def test_self_rolled_back_device_shows_the_version_it_runs_and_why() -> None:
    sp = spec("2,all", max_failed=0.5, min_committed=0.5)
    devices = fleet_of(4)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    bad = state.wave_devices(0)[1]
    policy = fleet(overrides={(0, 1): "rolled_back"})
    reports = policy(state, devices)
    state, actions = plan(sp, state, devices, reports, 10)
    assert RevertDevice(bad, None, "rolled_back: rolled_back on the device (runs v1)") \
        in actions  # it never reported before its assignment: previous version unknown
    view = summary(state, reports)
    row = next(r for r in view["devices"] if r["device_id"] == bad)
    assert row["outcome"] == "failed"
    assert row["running_version"] == OLD
    assert row["last_result"] == "rolled_back"
    assert row["last_error"] == "rolled_back on the device"
    assert view["waves"][0] == {"index": 0, "assigned": 2, "committed": 1, "failed": 1,
                                "pending": 0, "reverted": 0}
    assert row["desired_version"] is None
    assert desired(state)[bad] is None  # the server stops asking for NEW


def test_summary_per_wave_and_gates() -> None:
    sp = spec("50%,100%", bake_s=60, max_error_rate=0.1)
    devices = fleet_of(6)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    reports = fleet(overrides={(0, 1): "updating", (0, 2): "offline"})(state, devices)
    state, _ = plan(sp, state, devices, reports, 30)
    view = summary(state, reports)
    assert view["status"] == "running" and view["wave"] == 0
    assert view["waves"] == [{"index": 0, "assigned": 3, "committed": 1, "failed": 0,
                              "pending": 2, "reverted": 0}]
    gates = {g["gate"]: g for g in view["gates"]}
    assert gates["committed"]["ok"] is None
    assert gates["committed"]["detail"] == "1 of 3 devices committed, 2 pending"
    first = state.wave_devices(0)[0]  # committed: first seen so at 30, when the bake restarts
    assert gates["bake"] == {"wave": 0, "gate": "bake", "value": 0.0, "limit": 60.0,
                             "ok": None, "detail": f"0s of 60s since the wave's last commit "
                                                   f"({first})"}
    assert gates["failed"]["ok"] is True
    assert gates["error_rate"]["ok"] is None  # judged after the bake
    assert {r["reason"] for r in view["devices"]} == {None, "updating", "offline"}


def test_summary_after_a_rollback_follows_the_devices_back() -> None:
    sp = spec("all", "rollback", max_failed=0.5, min_committed=0.0, max_psi=0.2)
    devices = fleet_of(4)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices,
                    fleet()(RolloutState("r", "digits", NEW), devices), 0)
    state, _ = plan(sp, state, devices, fleet(max_psi=0.3, overrides={
        (0, 0): "failed"})(state, devices), 60)
    assert state.status == "rolled_back"
    order = state.wave_devices(0)
    # the failed one is back already; one more went back, two still run NEW
    reports = [report(order[0], "failed"), report(order[1], "unassigned", applied_sequence=5),
               report(order[2], "ok"), report(order[3], "ok")]
    view = summary(state, [r for r in reports if r is not None])
    assert view["waves"] == [{"index": 0, "assigned": 4, "committed": 0, "failed": 1,
                              "pending": 2, "reverted": 1}]
    rows = {r["device_id"]: r for r in view["devices"]}
    assert [rows[d]["outcome"] for d in order] == ["failed", "reverted", "pending", "pending"]
    assert {rows[d]["desired_version"] for d in order} == {OLD}
    assert rows[order[2]]["running_version"] == NEW
    assert rows[order[2]]["reason"] == "reverting"


def test_gate_reports_are_emitted_when_a_wave_is_decided() -> None:
    sp = spec("50%,100%", max_error_rate=0.05, max_psi=0.2)
    devices = fleet_of(4)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    state, actions = plan(sp, state, devices, fleet(errors=5)(state, devices), 60)
    gates = [a for a in actions if isinstance(a, GateReport)]
    assert [(g.gate, g.ok) for g in gates] == [
        ("failed", True), ("committed", True), ("bake", True), ("error_rate", True),
        ("p95_ms", True), ("psi", True)]
    p95 = gates[4]
    assert (p95.value, p95.limit) == (20.0, 50.0)
    assert gates[3].value == 0.01
    assert all(g.wave == 0 for g in gates)
    # the new wave's gates are in the state, not in the actions
    assert {g.wave for g in state.gates} == {1}


def test_health_gate_worst_device_is_judged_against_its_own_budget() -> None:
    sp = spec("all")
    devices = fleet_of(2)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    slow_pi = {"p95_ms": 45.0}  # 0.9 of the rpi4 budget
    jetson = {"profile": "jetson-orin-nano", "latency_budget_ms": 10.0, "p95_ms": 11.0}
    reports = fleet(overrides={(0, 0): slow_pi, (0, 1): jetson})(state, devices)
    state, actions = plan(sp, state, devices, reports, 60)
    p95 = next(a for a in actions if isinstance(a, GateReport) and a.gate == "p95_ms")
    assert (p95.value, p95.limit, p95.ok) == (11.0, 10.0, False)
    assert state.wave_devices(0)[1] in p95.detail


def test_a_failing_earlier_wave_device_is_named_in_the_reason() -> None:
    history = run(SCENARIOS["an-earlier-wave-gone-unhealthy-fails-the-current-wave"])
    state = history[-1][0]
    canary = state.wave_devices(0)[0]
    assert state.reason == (f"wave 1 gate error_rate: worst {canary} (an earlier wave): 0.12 "
                            "against 0.05 (4 of 4 committed devices judged, and 2 of earlier "
                            "waves)")


def test_a_waiting_health_gate_names_the_devices_it_waits_for() -> None:
    sp = spec("all", bake_s=0, latency_gate=False, max_error_rate=0.1, min_reporting=0.7)
    devices = fleet_of(14)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    order = state.wave_devices(0)
    quiet = {(0, i): (GONE if i % 2 else {"requests": 40}) for i in range(7)}
    state, actions = plan(sp, state, devices, fleet(overrides=quiet)(state, devices), 10)
    assert state.status == "running" and not any(isinstance(a, WaveAdvanced) for a in actions)
    gate = next(g for g in state.gates if g.gate == "error_rate")
    assert gate.ok is None and (gate.value, gate.limit) == (0.0, 0.1)
    assert gate.detail.startswith(
        f"worst {min(order[7:])}: 0 against 0.1; waiting for 3 more of 14 committed devices to "
        "have 100 requests (7 have, 10 needed at min_reporting 70%): ")
    assert f"{order[0]} (40 requests), {order[1]} (offline, 0 requests)" in gate.detail
    assert gate.detail.endswith(" and 2 more")  # 7 short, 5 named
    # the rollout's status carries it: summary() is what the API, CLI and dashboard show
    shown = {g["gate"]: g for g in summary(state, fleet(overrides=quiet)(state, devices))[
        "gates"]}
    assert shown["error_rate"]["ok"] is None and "waiting for 3 more" in \
        shown["error_rate"]["detail"]


@pytest.mark.parametrize(("name", "state"), [
    ("report-timeout-fails-the-wave", "offline, "),
    ("report-timeout-fails-an-online-but-idle-device", "")],
    ids=["offline", "online-but-idle"])
def test_a_timed_out_device_is_named_in_the_failed_gate(name: str, state: str) -> None:
    history = run(SCENARIOS[name])
    final = history[-1][0]
    first, silent = final.wave_devices(0)
    assert final.reason == (
        f"wave 0 gate error_rate: worst {first}: 0 against 0.05; 1 of 2 committed devices "
        "missed the report deadline (1 judged, 0 still within it, 2 needed at min_reporting "
        "100%); timed out, no 100 requests within report_timeout_s 600s of committing: "
        f"{silent} ({state}0 requests in 600s)")
    waiting = next(g for g in history[-2][0].gates if g.gate == "error_rate")
    assert waiting.ok is None and waiting.detail.endswith(
        f"(1 have, 2 needed at min_reporting 100%, each within 600s of committing): "
        f"{silent} ({state}0 requests in 599s)")


def test_an_excluded_device_is_named_in_the_passing_gate() -> None:
    history = run(SCENARIOS["report-timeout-excludes-the-silent-device"])
    state, actions = history[-1]
    first, silent = state.wave_devices(0)
    passed = next(a for a in actions if isinstance(a, GateReport) and a.gate == "error_rate")
    assert passed.ok is True and passed.detail == (
        f"worst {first}: 0 against 0.05 (1 of 2 committed devices judged, 1 excluded); "
        "excluded, no 100 requests within report_timeout_s 600s of committing: "
        f"{silent} (offline, 0 requests in 600s)")


def test_a_wave_whose_every_committed_device_timed_out_passes_on_exclude() -> None:
    sp = timed("exclude", waves="1,all")
    devices = fleet_of(3)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    quiet = fleet(overrides={(0, 0): SILENT})
    state, _ = plan(sp, state, devices, quiet(state, devices), 10)
    state, actions = plan(sp, state, devices, quiet(state, devices), 610)
    gate = next(a for a in actions if isinstance(a, GateReport) and a.gate == "error_rate")
    assert gate.ok is True and gate.detail.startswith(
        "no device judged yet (0 of 1 committed devices judged, 1 excluded); excluded, ")
    assert state.wave == 1


def test_a_device_times_out_per_gate() -> None:
    """Requests but no drift windows: judged for the error rate, timed out for drift only."""
    sp = timed("fail", max_psi=0.2)
    devices = fleet_of(4)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    no_drift = fleet(overrides={(0, 1): {"samples": 0, "max_psi": None}})
    state, _ = plan(sp, state, devices, no_drift(state, devices), 10)
    state, actions = plan(sp, state, devices, no_drift(state, devices), 610)
    gates = {g.gate: g for g in actions if isinstance(g, GateReport)}
    assert gates["error_rate"].ok is True and "timed out" not in gates["error_rate"].detail
    assert gates["psi"].ok is False and gates["psi"].detail.endswith(
        "timed out, no 100 predictions within report_timeout_s 600s of committing: "
        f"{state.wave_devices(0)[1]} (0 predictions in 600s)")
    assert state.status == "paused"


def test_summary_shows_the_timed_out_devices() -> None:
    """summary() is what GET /v1/rollouts/{id}, `rollout status` and the dashboard show."""
    history = run(SCENARIOS["report-timeout-fails-the-wave"])
    state = history[-1][0]
    silent = state.wave_devices(0)[1]
    view = summary(state, fleet(overrides={(0, 1): GONE})(state, fleet_of(4)))
    gate = next(g for g in view["gates"] if g["gate"] == "error_rate")
    assert gate["ok"] is False and "timed out, no 100 requests" in gate["detail"]
    assert f"{silent} (offline, 0 requests in 600s)" in gate["detail"]
    assert view["status"] == "paused" and view["reason"].endswith(gate["detail"])


BAKE_STARTS: dict[str, tuple[list[Assignment], dict[str, int], tuple[int, str | None]]] = {
    "nothing-committed": ([Assignment("a", 0, 5, None), Assignment("b", 0, 9, None)], {},
                          (9, None)),
    "committed-after-the-last-assignment": (
        [Assignment("a", 0, 5, None), Assignment("b", 0, 9, None)], {"a": 20, "b": 12},
        (20, "a")),
    "assigned-after-the-last-commit": (
        [Assignment("a", 0, 5, None), Assignment("c", 0, 30, None)], {"a": 20}, (30, None)),
    "a-tie-is-the-assignment": ([Assignment("a", 0, 5, None), Assignment("c", 0, 20, None)],
                                {"a": 20}, (20, None)),
}


@pytest.mark.parametrize(("wave", "committed_at", "start"), list(BAKE_STARTS.values()),
                         ids=list(BAKE_STARTS))
def test_bake_start(wave: list[Assignment], committed_at: dict[str, int],
                    start: tuple[int, str | None]) -> None:
    assert bake_start(wave, committed_at) == start


def test_bake_start_of_no_devices_raises() -> None:
    with pytest.raises(ValueError, match="wave: expected at least one assignment, got none"):
        bake_start([], {})


@pytest.mark.parametrize(("fraction", "committed", "needed"), [
    (1.0, 5, 5), (0.8, 5, 4), (0.6, 4, 3), (0.5, 3, 2), (0.01, 3, 1), (1.0, 1, 1),
    (0.5, 0, 0)], ids=["all", "0.8-of-5-is-4-not-5", "0.6-of-4-rounds-up", "half-of-3",
                       "at-least-one", "one", "no-committed-device"])
def test_quorum(fraction: float, committed: int, needed: int) -> None:
    assert quorum(fraction, committed) == needed


def _v2_completed_then_superseded() -> tuple[RolloutState, list[str]]:
    """A v2 rollout committed on 5 devices, then superseded by a v3 deployment."""
    sp = spec("all")
    devices = fleet_of(5)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    state, _ = plan(sp, state, devices, fleet()(state, devices), 60)
    assert state.status == "completed"
    state, actions = plan(sp, state, devices, fleet()(state, devices), 70,
                          [Supersede("deployment 9")])
    assert brief(actions) == ["superseded"]
    return state, list(state.wave_devices(0))


def test_a_superseded_rollout_keeps_the_outcomes_it_ended_with() -> None:
    state, order = _v2_completed_then_superseded()
    # v3 then fails its health check on one device (back on v2, reported rolled_back after a
    # newer sequence) and commits on the others: none of that is about the v2 rollout
    later = [report(order[0], "ok", applied_sequence=6, last_result="rolled_back",
                    last_error="v3: health check failed"),
             *(report(d, "ok", running_version="v3", applied_sequence=6) for d in order[1:])]
    view = summary(state, [r for r in later if r is not None])
    assert view["waves"] == [{"index": 0, "assigned": 5, "committed": 5, "failed": 0,
                              "pending": 0, "reverted": 0}]
    rows = {r["device_id"]: r for r in view["devices"]}
    assert {r["outcome"] for r in rows.values()} == {"committed"}
    assert {r["outcome_at_end"] for r in rows.values()} == {"committed"}
    assert rows[order[0]]["last_result"] == "rolled_back"  # what the device says now
    assert rows[order[1]]["running_version"] == "v3"


def test_a_superseded_rollout_freezes_pending_and_failed_devices_too() -> None:
    sp = spec("all", max_failed=0.5, min_committed=0.0)
    devices = fleet_of(4)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    order = state.wave_devices(0)
    at_end = fleet(overrides={(0, 0): "refused", (0, 1): "updating"})(state, devices)
    state, _ = plan(sp, state, devices, at_end, 10, [Supersede("deployment 9")])
    frozen = {r["device_id"]: (r["outcome"], r["reason"])
              for r in summary(state, at_end)["devices"]}
    assert frozen[order[0]][0] == "failed" and "refused" in str(frozen[order[0]][1])
    assert frozen[order[1]] == ("pending", "updating")
    assert frozen[order[2]] == frozen[order[3]] == ("committed", None)
    # every device then commits v3: the v2 rollout still says what it ended with
    v3 = [report(d, "ok", running_version="v3", applied_sequence=9) for d in order]
    assert {r["device_id"]: (r["outcome"], r["reason"]) for r in summary(
        state, [r for r in v3 if r is not None])["devices"]} == frozen


def test_a_rolled_back_rollout_counts_devices_moved_on_by_a_newer_deployment_as_reverted(
        ) -> None:
    sp = spec("all", "rollback", max_failed=0.5, min_committed=0.0)
    devices = fleet_of(4)
    fresh = RolloutState("r", "digits", NEW)
    state, _ = plan(sp, fresh, devices, fleet()(fresh, devices), 0)  # all on v1 before
    state, _ = plan(sp, state, devices, fleet(p95_ms=99.0, overrides={(0, 0): "failed"})(
        state, devices), 60)
    assert state.status == "rolled_back"
    order = state.wave_devices(0)
    assert [state.assignment(d).final for d in order] == [  # type: ignore[union-attr]
        "failed", "committed", "committed", "committed"]
    later = [report(order[0], "ok", running_version="v3", applied_sequence=9),  # sticky
             report(order[1], "unassigned", applied_sequence=5),  # back on v1
             report(order[2], "ok"),  # still on NEW: reverting
             report(order[3], "ok", running_version="v3", applied_sequence=9)]  # moved on
    rows = {r["device_id"]: r for r in summary(state, [r for r in later if r])["devices"]}
    assert [rows[d]["outcome"] for d in order] == ["failed", "reverted", "pending", "reverted"]
    assert rows[order[3]]["reason"] == "runs v3 now, not v1: moved on by a newer deployment"
    assert rows[order[2]]["reason"] == "reverting"


def test_the_stored_state_leaves_defaults_out() -> None:
    state, _ = _v2_completed_then_superseded()
    first = state.to_dict()["assignments"][0]
    assert set(first) == {"device_id", "wave", "assigned_at", "previous_version",
                          "committed_at", "final"}  # not failed, active, final_reason
    assert first["final"] == "committed" and first["committed_at"] == 60
    assert RolloutState.from_dict(state.to_dict()) == state


def test_a_state_written_before_version_2_still_reads() -> None:
    state, _ = _v2_completed_then_superseded()
    old = state.to_dict()
    old["state_version"] = 1  # every field written, none of version 2's
    old["assignments"] = [{"device_id": a.device_id, "wave": a.wave,
                           "assigned_at": a.assigned_at, "previous_version": a.previous_version,
                           "failed": a.failed, "active": a.active} for a in state.assignments]
    back = RolloutState.from_dict(old)
    assert [(a.committed_at, a.final) for a in back.assignments] == [(None, None)] * 5
    assert back.status == "superseded"


# ---------------------------------------------------------------------------------------------
# state round trip and misuse
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["too-many-failures-pause", "happy-path-three-waves-completes",
                                  "cancel-while-paused"])
def test_state_round_trips_through_a_dict(name: str) -> None:
    for state, _ in run(SCENARIOS[name]):
        assert RolloutState.from_dict(state.to_dict()) == state


def test_planning_from_a_reloaded_state_gives_the_same_result() -> None:
    sp = spec("5%,25%,100%")
    devices = fleet_of(20)
    state, _ = plan(sp, RolloutState("r", "digits", NEW), devices, [], 0)
    reloaded = RolloutState.from_dict(state.to_dict())
    assert plan(sp, state, devices, fleet()(state, devices), 60) == \
        plan(sp, reloaded, devices, fleet()(reloaded, devices), 60)


def _started() -> RolloutState:
    return plan(spec("50%,100%"), RolloutState("r", "digits", NEW), fleet_of(4), [], 100)[0]


MISUSE: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "clock-goes-backwards": (
        lambda: plan(spec("50%,100%"), _started(), fleet_of(4), [], 99),
        ValueError, "expected a time at or after the last step (100), got 99"),
    "clock-not-an-int": (
        lambda: plan(spec("all"), RolloutState("r", "m", NEW), [], [], 1.5),  # type: ignore[arg-type]
        TypeError, "now: expected an integer"),
    "duplicate-devices": (
        lambda: plan(spec("all"), RolloutState("r", "m", NEW), ["a", "a"], [], 0),
        ValueError, "expected unique ids, got duplicates ['a']"),
    "duplicate-reports": (
        lambda: plan(spec("all"), RolloutState("r", "m", NEW), ["a"],
                     [DeviceReport("a", "rpi4"), DeviceReport("a", "rpi4")], 0),
        ValueError, "expected one per device, got two for a"),
    "state-from-a-longer-spec": (
        lambda: plan(spec("all"), replace(_started(), wave=1), fleet_of(4), [], 200),
        ValueError, "expected 0..0 (the spec has 1 waves), got 1"),
    "no-latency-budget-for-the-p95-gate": (
        lambda: plan(spec("all"), plan(spec("all"), RolloutState("r", "m", NEW), ["a"], [],
                                       0)[0], ["a"],
                     [replace(_ok("a"), latency_budget_ms=None)], 60),
        ValueError, "latency_budget_ms: expected the budget of profile rpi4"),
    "resume-a-cancelled-rollout": (
        lambda: plan(spec("50%,100%"), replace(_started(), status="cancelled"), fleet_of(4),
                     [], 200, [Resume()]),
        CommandError, ("rollout r is cancelled: expected running, paused or completed for "
                       "Resume")),
    "pause-a-completed-rollout": (
        lambda: plan(spec("50%,100%"), replace(_started(), status="completed", wave=1),
                     fleet_of(4), [], 200, [Pause()]),
        CommandError, "completed: nothing to pause"),
    "cancel-a-rolled-back-rollout": (
        lambda: plan(spec("50%,100%"), replace(_started(), status="rolled_back"),
                     fleet_of(4), [], 200, [Cancel()]),
        CommandError, "is rolled_back"),
    "bad-last-result": (
        lambda: DeviceReport("a", "rpi4", last_result="exploded"),
        ValueError, "last_result: expected one of ok, failed, rolled_back, refused"),
    "more-errors-than-requests": (
        lambda: DeviceReport("a", "rpi4", requests=1, errors=2),
        ValueError, "errors: expected at most requests (1), got 2"),
    "newer-state-version": (
        lambda: RolloutState.from_dict({**_started().to_dict(), "state_version": 3}),
        ValueError, "state_version: expected 1..2, got 3"),
    "bad-frozen-outcome": (
        lambda: RolloutState.from_dict({**_started().to_dict(), "assignments": [
            {**_started().to_dict()["assignments"][0], "final": "exploded"}]}),
        ValueError, "final: expected one of pending, committed, failed or None"),
    "bad-state-status": (
        lambda: RolloutState("r", "m", NEW, status="exploded"),  # type: ignore[arg-type]
        ValueError, "status: expected one of running"),
}


def _ok(device_id: str) -> DeviceReport:
    r = report(device_id, "ok")
    assert r is not None
    return r


@pytest.mark.parametrize(("call", "error", "says"), list(MISUSE.values()), ids=list(MISUSE))
def test_misuse_raises(call: Callable[[], object], error: type[Exception], says: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert says in str(info.value)

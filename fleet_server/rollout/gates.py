"""How the rollout planner judges a device and a wave: device outcomes and the gates (pure).

Split from :mod:`fleet_server.rollout.planner` because judging the evidence (which devices
count, how many must report, which one decides) is the subtle part of a rollout and reads best
on its own; the planner only acts on the decision (:func:`judge`: pass, fail or wait).

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
- ``bake``: ``bake_s`` seconds since the wave's bake started (:func:`bake_start`): the later
  of its last assignment and its last commit, i.e. the largest ``assigned_at`` of its active
  devices and ``committed_at`` of those committed now (the planner step that first saw each
  commit; failed and pending devices do not count). So every committed device was watched
  for ``bake_s``, including one that committed late, and a late commit restarts the bake.
  Nothing else passes before that. Failing counts from the wave's last assignment only: a
  health gate with bad evidence fails once ``bake_s`` went by since then, so devices that
  commit one after another never keep a known-bad version running longer.
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
  switches ``latency_gate`` off for fleets without traffic, gives the evidence a deadline
  (below), or pauses or cancels.

- ``report_timeout_s`` (None: no deadline, as above): a committed device of the current wave
  that a health gate still cannot judge ``report_timeout_s`` after its ``committed_at`` has
  *timed out* for that gate (each gate on its own: a device may have requests but no drift
  windows). Online or offline makes no difference: the deadline is about evidence. It is not
  sticky: a device that sends its numbers later is judged again (and can still fail the
  gate). Devices of earlier waves never time out: their wave passed. ``on_report_timeout``:

  - ``fail``: the gate fails (after the bake, like any health gate) once the timed-out
    devices leave it short of its quorum for good: the judged devices plus the unjudged ones
    still within their deadline are fewer than :func:`quorum`. With the default
    ``min_reporting`` of 1 that is the first timed-out device. The device itself is not
    marked failed nor reverted (it did nothing wrong that we know of): the wave fails, and
    ``on_failure`` pauses or rolls back the rollout, like AWS IoT Jobs' ``TIMED_OUT``
    counted by abort criteria;
  - ``exclude``: the gate leaves it out of its quorum (``ceil(min_reporting * (committed -
    excluded))``), and the detail names it: ``excluded, no 100 requests within
    report_timeout_s 600s of committing: dev-7 (offline, 0 requests in 612s)``. If every
    committed device timed out, the gate passes on no health evidence at all (the devices
    did commit, so their on-device health check passed): use ``fail`` where that is not
    acceptable.

  Either way the detail names the timed-out devices, and while the gate waits it gives each
  unjudged device's time since its commit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, Literal

from fleet_server.rollout.messages import DeviceReport, GateReport
from fleet_server.rollout.spec import Gates, RolloutSpec
from fleet_server.rollout.state import Assignment, Outcome, RolloutState

__all__ = [
    "FAILED_RESULTS",
    "Decision",
    "bake_start",
    "judge",
    "outcome",
    "quorum",
]

#: ``Reported.last_result`` values that make a device failed
FAILED_RESULTS: Final = ("failed", "rolled_back", "refused")


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



Decision = Literal["pass", "fail", "wait"]


def judge(spec: RolloutSpec, st: RolloutState, by_id: Mapping[str, DeviceReport], now: int
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
    # a commit no step recorded yet (only when called outside plan) is one seen just now
    since = {a.device_id: now if a.committed_at is None else a.committed_at for a in committed}
    pending = n - failed - len(committed)
    reports.append(GateReport(st.wave, "failed", failed / n, g.max_failed,
                              failed / n <= g.max_failed, f"{failed} of {n} devices failed"))
    reached = len(committed) / n >= g.min_committed
    reports.append(GateReport(st.wave, "committed", len(committed) / n, g.min_committed,
                              True if reached else (False if pending == 0 else None),
                              f"{len(committed)} of {n} devices committed, {pending} pending"))
    start, last = bake_start(wave, since)
    elapsed = now - start
    baked = elapsed >= g.bake_s
    # bad evidence fails once the wave's devices were all assigned bake_s ago: a later commit
    # delays passing, never failing
    may_fail = now - max(a.assigned_at for a in wave) >= g.bake_s
    reports.append(GateReport(st.wave, "bake", float(elapsed), float(g.bake_s),
                              True if baked else None, f"{elapsed}s of {g.bake_s}s since the "
                              + (f"wave's last commit ({last})" if last else
                                 "wave's last assignment")))
    healthy = [by_id[a.device_id] for a in committed]
    # seconds since each committed device committed: only the report deadline needs them
    waited = {device_id: now - at for device_id, at in since.items()} \
        if g.report_timeout_s is not None else {}
    before = [r for a in st.assignments if a.active and a.wave < st.wave and a.failed is None
              and (r := by_id.get(a.device_id)) is not None
              and outcome(st, a, r)[0] == "committed"]
    for gate in _health_gates(g):
        reports.append(_health(st.wave, gate, (baked, may_fail), g, healthy,
                               _rows(gate, g, healthy), _rows(gate, g, before), waited))
    return _decide(reports)


def bake_start(wave: Sequence[Assignment], committed_at: Mapping[str, int]
               ) -> tuple[int, str | None]:
    """When the wave's bake starts: the later of its last assignment and its last commit.

    Args:
        wave: the wave's active assignments (at least one).
        committed_at: when each of its committed devices was first seen committed (devices
            that failed or are pending are not in it).

    Returns:
        The time, and the device whose commit it is (None: an assignment is later, or as late).

    Raises:
        ValueError: ``wave`` is empty.
    """
    if not wave:
        raise ValueError("wave: expected at least one assignment, got none")
    assigned = max(a.assigned_at for a in wave)
    last = max(committed_at.values(), default=assigned)
    if last > assigned:
        return last, max(d for d, at in committed_at.items() if at == last)
    return assigned, None


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


def _health(wave: int, gate: str, bake: tuple[bool, bool], g: Gates,
            committed: Sequence[DeviceReport], rows: list[tuple[str, float, float]],
            earlier: list[tuple[str, float, float]], waited: Mapping[str, int]) -> GateReport:
    """One health gate over the wave's committed devices; ``rows`` holds the judged ones
    (enough samples) as (device, value, limit), ``earlier`` the judged committed devices of
    the waves that passed before, ``waited`` the seconds since each committed device of the
    wave committed.

    ``bake`` is (baked, may_fail): the bake counts from the wave's last assignment or commit
    for passing, but only from its last assignment for failing, so a late commit never
    delays acting on bad evidence that is already in.

    The worst device (the highest value relative to its limit) decides: after the bake, one
    judged device over its limit fails the gate, whatever the others say, and a device of an
    earlier wave that went bad since its wave passed counts too. The gate passes only after
    the bake and once :func:`quorum` of this wave's committed devices are judged; until then
    it waits, and its detail says how many devices it waits for and names them.

    With ``report_timeout_s``, an unjudged device that committed that long ago has timed out:
    ``exclude`` leaves it out of the quorum's base, ``fail`` fails the gate after the bake once
    the judged devices and those still within the deadline cannot make the quorum.
    """
    what = "predictions" if gate == "psi" else "requests"
    n = len(committed)
    timeout = g.report_timeout_s
    late: list[DeviceReport] = []
    short: list[DeviceReport] = []  # unjudged, within the deadline: filled in when needed
    if timeout is not None:
        unjudged = _unjudged(committed, rows)
        late = [r for r in unjudged if waited[r.device_id] >= timeout]
        short = [r for r in unjudged if waited[r.device_id] < timeout]
    exclude = g.on_report_timeout == "exclude"
    need = quorum(g.min_reporting, n - len(late) if exclude else n)
    missed = bool(late) and not exclude and len(rows) + len(short) < need
    worst = min(rows, key=_badness) if rows else None
    gone_bad = [row for row in earlier if row[1] > row[2]]
    if gone_bad and (worst is None or _badness(min(gone_bad, key=_badness)) < _badness(worst)):
        worst = min(gone_bad, key=_badness)  # shown only when it is over its limit
    value, limit = (worst[1], worst[2]) if worst else (None, None)
    bad = worst is not None and worst[1] > worst[2]
    head = (f"worst {worst[0]}{' (an earlier wave)' if worst in earlier else ''}: "
            f"{worst[1]:g} against {worst[2]:g}" if worst else "no device judged yet")
    also = f", and {len(earlier)} of earlier waves" if earlier else ""
    excluded = f", {len(late)} excluded" if late and exclude else ""
    at = f"min_reporting {g.min_reporting * 100:g}%"
    if not n:
        detail = f"{head}; no committed device of this wave to judge yet"
    elif len(rows) >= need:
        detail = f"{head} ({len(rows)} of {n} committed devices judged{excluded}{also})"
    elif missed:
        detail = (f"{head}; {len(late)} of {n} committed devices missed the report deadline "
                  f"({len(rows)} judged, {len(short)} still within it, {need} needed at {at})")
    else:
        if timeout is None:
            short = _unjudged(committed, rows)
        deadline = f", each within {timeout}s of committing" if timeout is not None else ""
        detail = (f"{head}; waiting for {need - len(rows)} more of {n} committed devices to "
                  f"have {g.min_samples} {what} ({len(rows)} have{excluded}, {need} needed at "
                  f"{at}{deadline})" + _named(": ", short, gate, g.min_samples,
                                              waited if timeout is not None else None))
    if late:
        detail += _named(f"; {'excluded' if exclude else 'timed out'}, no {g.min_samples} "
                         f"{what} within report_timeout_s {timeout}s of committing: ", late,
                         gate, g.min_samples, waited)
    baked, may_fail = bake
    if (bad or missed) and may_fail:
        ok = False
    elif not baked:
        ok = None
    else:
        ok = True if n and len(rows) >= need else None
    return GateReport(wave, gate, value, limit, ok, detail)


def _unjudged(committed: Sequence[DeviceReport], rows: list[tuple[str, float, float]]
              ) -> list[DeviceReport]:
    judged = {row[0] for row in rows}
    return [r for r in committed if r.device_id not in judged]


def _named(lead: str, devices: Sequence[DeviceReport], gate: str, min_samples: int,
           waited: Mapping[str, int] | None = None) -> str:
    """``lead`` and the first :data:`_NAMED` devices with why each is not judged ("" for
    none)."""
    if not devices:
        return ""
    named = ", ".join(_shortfall(r, gate, min_samples, waited) for r in devices[:_NAMED])
    more = f" and {len(devices) - _NAMED} more" if len(devices) > _NAMED else ""
    return f"{lead}{named}{more}"


def _badness(row: tuple[str, float, float]) -> tuple[float, str]:
    device, value, limit = row
    if limit > 0:
        return -value / limit, device
    return (-float("inf") if value > 0 else 0.0), device


def _shortfall(r: DeviceReport, gate: str, min_samples: int,
               waited: Mapping[str, int] | None = None) -> str:
    """Why a committed device is not judged yet, e.g. ``dev-3 (offline, 40 requests)``, and
    with ``waited`` since when: ``dev-3 (0 requests in 612s)``."""
    count = r.samples if gate == "psi" else r.requests
    what = "predictions" if gate == "psi" else "requests"
    why = f"{count} {what}" if count < min_samples else (
        "no successful request" if gate == "p95_ms" else "no PSI")
    when = f" in {waited[r.device_id]}s" if waited is not None else ""
    return f"{r.device_id} ({'' if r.online else 'offline, '}{why}{when})"


def _decide(reports: list[GateReport]
            ) -> tuple[Decision, tuple[GateReport, ...], str | None]:
    failing = next((r for r in reports if r.ok is False), None)
    if failing is not None:
        return "fail", tuple(reports), (f"wave {failing.wave} gate {failing.gate}: "
                                        f"{failing.detail}")
    if all(r.ok for r in reports):
        return "pass", tuple(reports), None
    return "wait", tuple(reports), None


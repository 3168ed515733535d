"""Start-up recovery: ONE function maps "the record we died with" to "what to do now" (pure).

Like mender's ``initState.getNextState``: the runner calls :func:`recover` once at start-up (and
after a transient error, when the caller retries), then does what the returned
:class:`RecoveryAction` says. Every state's work is re-runnable, so the default is to run the
state we died in again; the boot-loop counter (``UpdateRecord.attempt``, the number of writes
that entered the state) stops that from going on forever.

The table, checked top to bottom (``loop_limit`` is ``AgentConfig.boot_loop_limit``)::

    record                                       action    then
    -------------------------------------------  --------  ----------------------------------
    none                                         NOTHING   no update was ever started
    reported (a final state, report sent)        NOTHING   the update is finished
    final state, work done, report not sent      REPORT    send the final report, finish
    waiting (last try ended in a transient err)  RETRY     run the state's work again; nothing
                                                           was in flight, so no attempt counted
    Failed, attempt >= loop_limit                REPORT    give up Failed's own work (it keeps
                                                           crashing); report, finish
    other state, attempt >= loop_limit           FIRE      LoopDetected -> Failed (which rolls
                                                           back if the new version is active)
    any state, attempt < loop_limit              RERUN     enter the same state again (attempt
                                                           + 1) and run its work again

Per state, RERUN means (every phase is idempotent; see ``slots.py`` and ``runner.py``):
:data:`RERUN_MEANS` holds the same table as data, for documentation and tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

from agent.updater.machine import FINAL_STATES, Event, State, next_state

if TYPE_CHECKING:  # only the type: this module does no I/O and needs no sqlite3
    from agent.updater.records import UpdateRecord

__all__ = ["RERUN_MEANS", "Action", "RecoveryAction", "recover"]


class Action(StrEnum):
    """What the runner does at start-up."""

    NOTHING = "nothing"  # no update in flight
    RERUN = "rerun"  # re-enter ``state`` (persisting attempt + 1), then run its work
    RETRY = "retry"  # run ``state``'s work again without counting an attempt
    FIRE = "fire"  # feed ``event`` to the machine from the record's state; enter ``state``
    REPORT = "report"  # skip the work: send the final report and finish


#: what running each state again after a crash in it amounts to
RERUN_MEANS: Mapping[State, str] = MappingProxyType({
    State.IDLE: "start the update (Start -> Fetching)",
    State.FETCHING: "download again (TUF reuses a complete cached target)",
    State.VERIFYING: "hash the downloaded file and check the manifest again",
    State.STAGING: "stage again; a complete staged copy is kept, a partial one replaced",
    State.HEALTH_CHECK: "check the staged model again; activating twice is a no-op",
    State.COMMITTED: "commit and clean up again (idempotent), then report ok",
    State.ROLLED_BACK: "roll back again (a no-op once current is the old version), report",
    State.FAILED: "roll back if the new version is active, clean up, report failed",
})


@dataclass(frozen=True)
class RecoveryAction:
    """The decision: ``action``, the ``state`` to run (or enter), the ``event`` to fire."""

    action: Action
    state: State | None = None
    event: Event | None = None
    reason: str = ""


def recover(record: UpdateRecord | None, *, loop_limit: int) -> RecoveryAction:
    """Decide what to do with the update record found at start-up (see the module table).

    Args:
        record: the newest update record, or ``None`` when there is none.
        loop_limit: entries into one state after which a further crash is a boot loop (>= 1).

    Raises:
        ValueError: ``loop_limit`` < 1, or the record's ``attempt`` < 1.
    """
    if isinstance(loop_limit, bool) or not isinstance(loop_limit, int) or loop_limit < 1:
        raise ValueError(f"loop_limit: expected an integer >= 1, got {loop_limit!r}")
    if record is None:
        return RecoveryAction(Action.NOTHING, reason="no update recorded")
    state = record.state
    if record.attempt < 1:
        raise ValueError(f"update {record.update_id}: attempt must be >= 1, got "
                         f"{record.attempt}")
    final = state in FINAL_STATES
    if final and record.reported:
        return RecoveryAction(Action.NOTHING, reason=f"update {record.update_id} finished in "
                              f"{state.value}")
    if final and record.done:
        return RecoveryAction(Action.REPORT, state, reason=f"{state.value}: work done, report "
                              "not yet sent")
    if record.waiting:
        return RecoveryAction(Action.RETRY, state, reason=f"{state.value}: retrying after a "
                              f"transient error: {record.transient_error}")
    if record.attempt >= loop_limit:
        loop = (f"boot loop: state {state.value} entered {record.attempt} times, the limit is "
                f"{loop_limit}")
        if state is State.FAILED:
            return RecoveryAction(Action.REPORT, state, reason=f"{loop}; reporting without "
                                  "finishing its work")
        return RecoveryAction(Action.FIRE, next_state(state, Event.LOOP_DETECTED),
                              Event.LOOP_DETECTED, reason=loop)
    return RecoveryAction(Action.RERUN, state, reason=f"died in {state.value} (attempt "
                          f"{record.attempt} of {loop_limit}): {RERUN_MEANS[state]}")

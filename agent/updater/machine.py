"""The update state machine: states, a closed set of events, and ONE transition table (pure).

The table is data (mender's ``AddTransition(...)`` list, not handlers that return their
successor): the runner's phases only *return events*, and :func:`next_state` looks the pair up.
An undefined pair is a programmer error and raises :class:`UndefinedTransition`.

::

    Idle ─Start▶ Fetching ─Fetched▶ Verifying ─Verified▶ Staging ─Staged▶ HealthCheck
                   │                  │                    │               │       │
                   │ FetchFailed      │ VerifyFailed       │ StageFailed   │       │ Healthy
                   ▼                  ▼                    ▼               │       ▼
                 Failed ◀──────────────────────────────────────┐ Unhealthy │   Committed
                                                RollbackFailed │           ▼       │
                                                             RolledBack ◀──────────┘
                                                                      CommitFailed

    LoopDetected: from every state but Failed, to Failed (the boot-loop counter; recovery.py)

What each state does (the work runs *after* the state is persisted; see ``runner.py``):

=============  ==============================================================================
Idle           nothing yet: the update is accepted and recorded
Fetching       download model file and manifest (TUF); transient errors are retried, not events
Verifying      length + sha256 against the desired state and manifest; profile, runtime
Staging        copy into ``models/<name>/<version>/`` (not served yet)
HealthCheck    load the staged model, replay golden I/O, check latency; then swap ``current``
Committed      make it permanent, clean up, report ``ok``
RolledBack     point ``current`` back to the previous version, clean up, report ``rolled_back``
Failed         roll back if the new version is active, clean up, report ``failed``
=============  ==============================================================================

Committed, RolledBack and Failed are *final*: the update ends in one of them once its work is
done and reported. Their work can still fail (CommitFailed, RollbackFailed), which is why two of
them have outgoing transitions; Failed has none.

Entering a state is always committed before its work (a crashed *process* finds it). Entering
one of :data:`DURABLE_STATES` is also flushed to the disk (fsync) first, because their work
changes what runs: the health check loads the new model (which may take the whole device down,
and the boot-loop counter must survive that), and the final states move the ``current``
pointer. The work of the other states (download, verify, copy into a staging directory) changes
nothing that runs and is re-runnable, so after a power cut that lost their record, recovery
simply redoes it. SQLite writes WAL commits in order, so the next durable write makes the
earlier ones durable too.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType

__all__ = [
    "DURABLE_STATES",
    "FAILURE_EVENTS",
    "FINAL_STATES",
    "RESULTS",
    "TRANSITIONS",
    "Event",
    "State",
    "UndefinedTransition",
    "events_from",
    "is_final",
    "next_state",
]


class State(StrEnum):
    """Where an update is. The value is what ``Reported.state`` says and what is persisted."""

    IDLE = "Idle"
    FETCHING = "Fetching"
    VERIFYING = "Verifying"
    STAGING = "Staging"
    HEALTH_CHECK = "HealthCheck"
    COMMITTED = "Committed"
    ROLLED_BACK = "RolledBack"
    FAILED = "Failed"


class Event(StrEnum):
    """What a phase (or recovery) can say happened. Closed: nothing else moves the machine."""

    START = "Start"
    FETCHED = "Fetched"
    FETCH_FAILED = "FetchFailed"
    VERIFIED = "Verified"
    VERIFY_FAILED = "VerifyFailed"
    STAGED = "Staged"
    STAGE_FAILED = "StageFailed"
    HEALTHY = "Healthy"
    UNHEALTHY = "Unhealthy"
    COMMIT_FAILED = "CommitFailed"
    ROLLBACK_FAILED = "RollbackFailed"
    LOOP_DETECTED = "LoopDetected"


_S, _E = State, Event

#: the one transition table: (state, event) -> next state
TRANSITIONS: Mapping[tuple[State, Event], State] = MappingProxyType({
    (_S.IDLE, _E.START): _S.FETCHING,
    (_S.IDLE, _E.LOOP_DETECTED): _S.FAILED,

    (_S.FETCHING, _E.FETCHED): _S.VERIFYING,
    (_S.FETCHING, _E.FETCH_FAILED): _S.FAILED,
    (_S.FETCHING, _E.LOOP_DETECTED): _S.FAILED,

    (_S.VERIFYING, _E.VERIFIED): _S.STAGING,
    (_S.VERIFYING, _E.VERIFY_FAILED): _S.FAILED,
    (_S.VERIFYING, _E.LOOP_DETECTED): _S.FAILED,

    (_S.STAGING, _E.STAGED): _S.HEALTH_CHECK,
    (_S.STAGING, _E.STAGE_FAILED): _S.FAILED,
    (_S.STAGING, _E.LOOP_DETECTED): _S.FAILED,

    (_S.HEALTH_CHECK, _E.HEALTHY): _S.COMMITTED,
    (_S.HEALTH_CHECK, _E.UNHEALTHY): _S.ROLLED_BACK,
    (_S.HEALTH_CHECK, _E.LOOP_DETECTED): _S.FAILED,

    (_S.COMMITTED, _E.COMMIT_FAILED): _S.ROLLED_BACK,
    (_S.COMMITTED, _E.LOOP_DETECTED): _S.FAILED,

    (_S.ROLLED_BACK, _E.ROLLBACK_FAILED): _S.FAILED,
    (_S.ROLLED_BACK, _E.LOOP_DETECTED): _S.FAILED,
})

#: the event a state's phase yields when its work fails fatally (transient errors yield none)
FAILURE_EVENTS: Mapping[State, Event] = MappingProxyType({
    _S.FETCHING: _E.FETCH_FAILED,
    _S.VERIFYING: _E.VERIFY_FAILED,
    _S.STAGING: _E.STAGE_FAILED,
    _S.HEALTH_CHECK: _E.UNHEALTHY,
    _S.COMMITTED: _E.COMMIT_FAILED,
    _S.ROLLED_BACK: _E.ROLLBACK_FAILED,
})

#: final state -> ``Reported.last_result`` (one of ``agent.protocol.messages.LAST_RESULTS``)
RESULTS: Mapping[State, str] = MappingProxyType({
    _S.COMMITTED: "ok",
    _S.ROLLED_BACK: "rolled_back",
    _S.FAILED: "failed",
})

FINAL_STATES: frozenset[State] = frozenset(RESULTS)

#: states whose entry is fsynced before their work runs (see the module docstring)
DURABLE_STATES: frozenset[State] = frozenset({_S.HEALTH_CHECK, *FINAL_STATES})


class UndefinedTransition(RuntimeError):
    """``next_state`` was asked for a (state, event) pair the table does not define.

    A programmer error (a phase returned an event its state cannot take), hence a
    ``RuntimeError`` rather than an ``AgentError``.
    """

    def __init__(self, state: State, event: Event) -> None:
        self.state, self.event = state, event
        allowed = ", ".join(e.value for e in events_from(state)) or "none (final)"
        super().__init__(f"no transition from state {state.value} on event {event.value}; "
                         f"events defined in {state.value}: {allowed}")


def next_state(state: State, event: Event) -> State:
    """The state ``event`` moves ``state`` to, from :data:`TRANSITIONS`.

    Raises:
        UndefinedTransition: the table has no such pair.
    """
    try:
        return TRANSITIONS[(State(state), Event(event))]
    except KeyError:
        raise UndefinedTransition(State(state), Event(event)) from None


def events_from(state: State) -> tuple[Event, ...]:
    """Every event defined in ``state``, in table order."""
    return tuple(e for (s, e) in TRANSITIONS if s is state)


def is_final(state: State) -> bool:
    """True for Committed, RolledBack and Failed: states an update ends in."""
    return state in FINAL_STATES

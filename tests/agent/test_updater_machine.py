"""The transition table: every defined pair, and every undefined pair raises (pure)."""

from __future__ import annotations

import itertools

import pytest

from agent.protocol.messages import LAST_RESULTS
from agent.updater.machine import (
    FAILURE_EVENTS,
    FINAL_STATES,
    RESULTS,
    TRANSITIONS,
    Event,
    State,
    UndefinedTransition,
    events_from,
    is_final,
    next_state,
)

S, E = State, Event

# (state, event, next state): the whole table, written out once more by hand
DEFINED = [
    (S.IDLE, E.START, S.FETCHING),
    (S.IDLE, E.LOOP_DETECTED, S.FAILED),
    (S.FETCHING, E.FETCHED, S.VERIFYING),
    (S.FETCHING, E.FETCH_FAILED, S.FAILED),
    (S.FETCHING, E.LOOP_DETECTED, S.FAILED),
    (S.VERIFYING, E.VERIFIED, S.STAGING),
    (S.VERIFYING, E.VERIFY_FAILED, S.FAILED),
    (S.VERIFYING, E.LOOP_DETECTED, S.FAILED),
    (S.STAGING, E.STAGED, S.HEALTH_CHECK),
    (S.STAGING, E.STAGE_FAILED, S.FAILED),
    (S.STAGING, E.LOOP_DETECTED, S.FAILED),
    (S.HEALTH_CHECK, E.HEALTHY, S.COMMITTED),
    (S.HEALTH_CHECK, E.UNHEALTHY, S.ROLLED_BACK),
    (S.HEALTH_CHECK, E.LOOP_DETECTED, S.FAILED),
    (S.COMMITTED, E.COMMIT_FAILED, S.ROLLED_BACK),
    (S.COMMITTED, E.LOOP_DETECTED, S.FAILED),
    (S.ROLLED_BACK, E.ROLLBACK_FAILED, S.FAILED),
    (S.ROLLED_BACK, E.LOOP_DETECTED, S.FAILED),
]
UNDEFINED = [(s, e) for s, e in itertools.product(State, Event)
             if (s, e) not in {(a, b) for a, b, _ in DEFINED}]


@pytest.mark.parametrize(("state", "event", "expected"), DEFINED,
                         ids=[f"{s.value}-{e.value}" for s, e, _ in DEFINED])
def test_defined_transition(state: State, event: Event, expected: State) -> None:
    assert next_state(state, event) is expected


def test_the_table_is_exactly_the_defined_rows() -> None:
    assert dict(TRANSITIONS) == {(s, e): n for s, e, n in DEFINED}


@pytest.mark.parametrize(("state", "event"), UNDEFINED,
                         ids=[f"{s.value}-{e.value}" for s, e in UNDEFINED])
def test_undefined_pair_raises(state: State, event: Event) -> None:
    with pytest.raises(UndefinedTransition) as info:
        next_state(state, event)
    assert info.value.state is state and info.value.event is event
    assert state.value in str(info.value) and event.value in str(info.value)


def test_undefined_names_what_is_allowed() -> None:
    with pytest.raises(UndefinedTransition, match="Healthy, Unhealthy, LoopDetected"):
        next_state(S.HEALTH_CHECK, E.FETCHED)
    with pytest.raises(UndefinedTransition, match=r"none \(final\)"):
        next_state(S.FAILED, E.START)


def test_the_table_cannot_be_changed() -> None:
    with pytest.raises(TypeError):
        TRANSITIONS[(S.FAILED, E.START)] = S.IDLE  # type: ignore[index]


def test_every_state_is_reachable_from_idle() -> None:
    seen, frontier = {S.IDLE}, [S.IDLE]
    while frontier:
        here = frontier.pop()
        for (s, _), n in TRANSITIONS.items():
            if s is here and n not in seen:
                seen.add(n)
                frontier.append(n)
    assert seen == set(State)


def test_loop_detected_leads_from_every_state_but_failed_to_failed() -> None:
    for state in State:
        if state is S.FAILED:
            assert events_from(state) == ()
        else:
            assert next_state(state, E.LOOP_DETECTED) is S.FAILED


def test_failure_events_are_defined_in_their_states() -> None:
    for state, event in FAILURE_EVENTS.items():
        assert (state, event) in TRANSITIONS
    assert set(FAILURE_EVENTS) == set(State) - {S.IDLE, S.FAILED}


def test_final_states_and_results() -> None:
    assert {S.COMMITTED, S.ROLLED_BACK, S.FAILED} == FINAL_STATES
    assert all(is_final(s) == (s in FINAL_STATES) for s in State)
    assert set(RESULTS.values()) <= set(LAST_RESULTS)
    assert RESULTS[S.COMMITTED] == "ok" and RESULTS[S.ROLLED_BACK] == "rolled_back"


def test_happy_path_is_a_chain_of_the_success_events() -> None:
    state = S.IDLE
    chain = [state]
    for event in (E.START, E.FETCHED, E.VERIFIED, E.STAGED, E.HEALTHY):
        state = next_state(state, event)
        chain.append(state)
    assert [s.value for s in chain] == ["Idle", "Fetching", "Verifying", "Staging",
                                        "HealthCheck", "Committed"]


def test_values_are_what_is_persisted_and_reported() -> None:
    assert State("HealthCheck") is S.HEALTH_CHECK
    assert Event("LoopDetected") is E.LOOP_DETECTED
    with pytest.raises(ValueError):
        next_state("Nowhere", E.START)  # type: ignore[arg-type]

"""recover(): the record we died with -> what to do now, including the boot-loop counter (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from agent.protocol.messages import DesiredModel
from agent.updater.machine import Event, State
from agent.updater.records import UpdateRecord
from agent.updater.recovery import RERUN_MEANS, Action, RecoveryAction, recover

LIMIT = 5
S, A = State, Action
DESIRED = DesiredModel(name="clf", version="2", target_path="clf/2/model.onnx",
                       manifest_target="clf/2/manifest.json", sha256="a" * 64, length=10,
                       profile="test-cpu")


def record(state: State, **kw: Any) -> UpdateRecord:
    return UpdateRecord(update_id="7/clf", sequence=7, desired=DESIRED, state=state, **kw)


@dataclass(frozen=True)
class Case:
    name: str
    record: UpdateRecord | None
    action: Action
    state: State | None = None
    event: Event | None = None


CASES = [
    Case("no record", None, A.NOTHING),
    # died in a state, under the limit: run it again
    *[Case(f"died in {s.value}", record(s, attempt=1), A.RERUN, s) for s in State],
    *[Case(f"died in {s.value} again", record(s, attempt=LIMIT - 1), A.RERUN, s)
      for s in State],
    # final states: reported = finished; done = only the report is left
    *[Case(f"{s.value} reported", record(s, done=True, reported=True), A.NOTHING)
      for s in (S.COMMITTED, S.ROLLED_BACK, S.FAILED)],
    *[Case(f"{s.value} done, report pending", record(s, done=True, attempt=LIMIT + 3),
           A.REPORT, s) for s in (S.COMMITTED, S.ROLLED_BACK, S.FAILED)],
    # waiting after a transient error: nothing in flight, no attempt counted
    Case("Fetching waiting for the network", record(S.FETCHING, waiting=True,
                                                    attempt=LIMIT + 10), A.RETRY, S.FETCHING),
    Case("Committed waiting", record(S.COMMITTED, waiting=True), A.RETRY, S.COMMITTED),
    # the boot-loop counter
    *[Case(f"loop in {s.value}", record(s, attempt=LIMIT), A.FIRE, S.FAILED,
           Event.LOOP_DETECTED) for s in State if s is not S.FAILED],
    Case("loop in HealthCheck, far over", record(S.HEALTH_CHECK, attempt=LIMIT + 7), A.FIRE,
         S.FAILED, Event.LOOP_DETECTED),
    Case("loop in Failed: give up its work, report", record(S.FAILED, attempt=LIMIT),
         A.REPORT, S.FAILED),
    # reported but not a final state cannot happen; reported alone does not finish it
    Case("non-final marked reported", record(S.STAGING, reported=True), A.RERUN, S.STAGING),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_recovery_table(case: Case) -> None:
    got = recover(case.record, loop_limit=LIMIT)
    assert isinstance(got, RecoveryAction)
    assert (got.action, got.state, got.event) == (case.action, case.state, case.event)
    assert got.reason


def test_loop_reason_names_state_count_and_limit() -> None:
    got = recover(record(S.HEALTH_CHECK, attempt=5), loop_limit=5)
    assert "HealthCheck" in got.reason and "5 times" in got.reason and "limit is 5" in got.reason


def test_a_boot_loop_is_detected_after_exactly_loop_limit_entries() -> None:
    """Simulate a process that dies in HealthCheck every time it is started."""
    rec = record(S.HEALTH_CHECK, attempt=1)
    entries = 1
    while (action := recover(rec, loop_limit=3)).action is A.RERUN:
        rec = rec.evolve(attempt=rec.attempt + 1)  # what the runner persists on re-entry
        entries += 1
    assert entries == 3
    assert action.action is A.FIRE and action.state is S.FAILED


def test_limit_one_means_no_second_chance() -> None:
    assert recover(record(S.STAGING), loop_limit=1).action is A.FIRE


@pytest.mark.parametrize("bad", [0, -1, True, 2.5])
def test_bad_limit_is_a_programmer_error(bad: Any) -> None:
    with pytest.raises(ValueError, match="loop_limit"):
        recover(None, loop_limit=bad)


def test_bad_attempt_is_a_programmer_error() -> None:
    with pytest.raises(ValueError, match="attempt"):
        recover(record(S.IDLE, attempt=0), loop_limit=LIMIT)


def test_every_state_says_what_a_rerun_means() -> None:
    assert set(RERUN_MEANS) == set(State)

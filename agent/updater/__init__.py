"""The agent's update state machine: fetch, verify, stage, health-check, commit or roll back.

Pure core, thin shell (STYLE rules 1, 3-5, 9)::

    machine.py   (pure)    State, Event, the ONE transition table TRANSITIONS, next_state
    recovery.py  (pure)    recover(record, loop_limit): "state we died in" -> what to do now
    verify.py    (pure)    the artifact against the desired state, its manifest and the profile
    health.py              golden I/O and latency budget on a loaded model (Runtime seam)
    records.py   (adapter) UpdateRecord + StateStore over <data_dir>/state.db (SQLite)
    slots.py     (adapter) ModelStore: stage / activate / commit / rollback / cleanup on disk
    runner.py              UpdateRunner: persist the state, run its phase, map the outcome to
                           an event, look up the next state; report once per update
"""

from __future__ import annotations

from agent.updater.health import HealthReport, RuntimeHealthChecker, health_check
from agent.updater.machine import (
    FINAL_STATES,
    TRANSITIONS,
    Event,
    State,
    UndefinedTransition,
    next_state,
)
from agent.updater.records import StateStore, UpdateRecord
from agent.updater.recovery import Action, RecoveryAction, recover
from agent.updater.runner import (
    Fetched,
    Fetcher,
    HealthChecker,
    Installer,
    Outcome,
    Reporter,
    TargetsFetcher,
    UpdateReport,
    UpdateRunner,
    Verifier,
)
from agent.updater.slots import ModelStore, OnActivate
from agent.updater.verify import ArtifactVerifier, verify_artifact

__all__ = [
    "FINAL_STATES",
    "TRANSITIONS",
    "Action",
    "ArtifactVerifier",
    "Event",
    "Fetched",
    "Fetcher",
    "HealthChecker",
    "HealthReport",
    "Installer",
    "ModelStore",
    "OnActivate",
    "Outcome",
    "RecoveryAction",
    "Reporter",
    "RuntimeHealthChecker",
    "State",
    "StateStore",
    "TargetsFetcher",
    "UndefinedTransition",
    "UpdateRecord",
    "UpdateReport",
    "UpdateRunner",
    "Verifier",
    "health_check",
    "next_state",
    "recover",
    "verify_artifact",
]

"""Rollouts: waves, gates and the pure planner that moves a deployment through them.

- :mod:`fleet_server.rollout.spec`: :class:`RolloutSpec` (waves, :class:`Gates`, on_failure),
  checked on construction; ``from_dict``/``to_dict`` and the ``"5%,25%,100%"`` shorthand.
- :mod:`fleet_server.rollout.planner`: :func:`plan` (state + reports + clock + commands ->
  new state + actions), :func:`desired` and :func:`summary` (per-device outcomes frozen once
  a rollout ended). Pure: no I/O, no clock reads. It re-exports the names of the three
  modules it was split into:
- :mod:`fleet_server.rollout.gates`: how a device's outcome (:func:`outcome`) and a wave's
  gates are judged, and the health gates' :func:`quorum` (pure).
- :mod:`fleet_server.rollout.messages`: :class:`DeviceReport`, the commands and the actions
  (:class:`GateReport` among them) that go into and come out of :func:`plan`.
- :mod:`fleet_server.rollout.state`: :class:`RolloutState`, its :class:`Assignment` rows and
  statuses, persisted through ``to_dict``/``from_dict`` (``state_version``).
- :mod:`fleet_server.rollout.health`: a device's requests, errors, p95 and drift on one model
  version, folded from the metrics and drift record bodies it sent (pure).

The I/O shell around them is :mod:`fleet_server.deploy.rollouts` (storage, device reports, one
planning pass) and :func:`fleet_server.deploy.service.advance_rollouts`.

Errors: :class:`SpecError` (a bad spec) and :class:`CommandError` (a command the rollout's
status does not allow) are both ``ValueError``; the API maps them to 422 and 409.
"""

from fleet_server.rollout.gates import outcome
from fleet_server.rollout.messages import (
    Action,
    AssignVersion,
    Cancel,
    Command,
    CommandError,
    DeviceReport,
    GateReport,
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
from fleet_server.rollout.planner import assignment_order, desired, plan, summary
from fleet_server.rollout.spec import Gates, RolloutSpec, SpecError, WaveSpec, parse_waves
from fleet_server.rollout.state import Assignment, RolloutState

__all__ = [
    "Action",
    "AssignVersion",
    "Assignment",
    "Cancel",
    "Command",
    "CommandError",
    "DeviceReport",
    "GateReport",
    "Gates",
    "Pause",
    "Resume",
    "RevertDevice",
    "RolloutCancelled",
    "RolloutCompleted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutRolledBack",
    "RolloutSpec",
    "RolloutState",
    "RolloutSuperseded",
    "SpecError",
    "Supersede",
    "WaveAdvanced",
    "WaveSpec",
    "assignment_order",
    "desired",
    "outcome",
    "parse_waves",
    "plan",
    "summary",
]

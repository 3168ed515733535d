"""The runner: drives one update through the machine, persisting before every phase.

For each state: write the record with that state (``StateStore.save``, one transaction, fsynced
for :data:`agent.updater.machine.DURABLE_STATES`), call the state's phase, let the phase *return
an event*, and look the next state up in :data:`agent.updater.machine.TRANSITIONS`. Errors are
classified once, here:

- a *transient* :class:`AgentError` (``TransportError``: the server is unreachable) is not an
  event. The record is marked ``waiting`` and the error is raised to the caller, which retries
  with backoff by calling :meth:`UpdateRunner.resume` (the attempt is not counted: nothing was
  in flight);
- a *fatal* ``AgentError`` becomes the state's failure event (:data:`FAILURE_EVENTS`), and is
  reported once, with the final state;
- anything else is a bug: it propagates and the record stays in the state it was in, so the
  next start-up runs it again, and the boot-loop counter ends the loop.

The phases and what each calls (all seams injected, so tests run on fakes)::

    Idle         -> Start
    Fetching     fetcher.fetch(desired)                        -> Fetched | FetchFailed
    Verifying    sha256 of the download, verifier.verify(...)  -> Verified | VerifyFailed
    Staging      installer.stage(name, version, file, manifest) -> Staged | StageFailed
    HealthCheck  checker.check(staged manifest, staged file); installer.activate(name, version)
                 (which calls the serving hook)                -> Healthy | Unhealthy
    Committed    installer.commit(name), cleanup               -> report ok | CommitFailed
    RolledBack   installer.rollback(name, version), cleanup    -> report | RollbackFailed
    Failed       installer.rollback(...) if the new version is current, cleanup -> report

A final state's work ends with ``done`` persisted, then one :class:`UpdateReport` to the
reporter, then ``reported`` persisted. A crash between the report and that last write sends
the report again on start-up: reports carry ``update_id`` so the receiver can drop the copy.
When a rollback fails, the rollback error is chained onto the original one (``__cause__`` and
``add_note``) and both reach the report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.errors import AgentError, InstallError
from agent.protocol.manifest import Manifest, sha256_file
from agent.protocol.messages import DesiredModel, RunningModel
from agent.updater.machine import (
    DURABLE_STATES,
    FAILURE_EVENTS,
    RESULTS,
    Event,
    State,
    is_final,
    next_state,
)
from agent.updater.records import StateStore, UpdateRecord
from agent.updater.recovery import Action, recover

__all__ = [
    "Fetched",
    "Fetcher",
    "HealthChecker",
    "Installer",
    "Outcome",
    "Reporter",
    "TargetFetcher",
    "TargetRequest",
    "TargetsFetcher",
    "UpdateReport",
    "UpdateRunner",
    "Verifier",
    "describe",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# seams
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fetched:
    """Where a fetch left the model file and its manifest (complete, verified by TUF)."""

    model_file: Path
    manifest_file: Path


class Fetcher(Protocol):
    def fetch(self, desired: DesiredModel) -> Fetched:
        """Download the model file and manifest the desired state names.

        Raises: TransportError (transient, retried), ArtifactError (refused: fatal).
        """
        ...

    def discard(self, fetched: Fetched) -> None:
        """Forget the downloads (best effort; called once the update ended)."""
        ...


@dataclass(frozen=True)
class TargetRequest:
    """One TUF target to download. ``expect_*`` come from the signed desired state: the target
    must be the very file the director named, not just any file TUF would accept under that
    name."""

    path: str
    expect_sha256: str | None = None
    expect_length: int | None = None


class TargetFetcher(Protocol):
    """``agent.transport.artifacts.ArtifactFetcher``'s shape."""

    def fetch_all(self, targets: Sequence[TargetRequest]) -> list[Path]: ...


class TargetsFetcher:
    """A :class:`Fetcher` over a TUF target fetcher: the model file and the manifest, after ONE
    metadata refresh."""

    def __init__(self, targets: TargetFetcher) -> None:
        self._targets = targets

    def fetch(self, desired: DesiredModel) -> Fetched:
        """Raises: TransportError, ArtifactError (from the target fetcher)."""
        model, manifest = self._targets.fetch_all([
            TargetRequest(desired.target_path, desired.sha256, desired.length),
            TargetRequest(desired.manifest_target)])
        return Fetched(model, manifest)

    def discard(self, fetched: Fetched) -> None:
        for path in (fetched.model_file, fetched.manifest_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class Verifier(Protocol):
    def verify(self, desired: DesiredModel, manifest_bytes: bytes, *, length: int,
               sha256: str) -> Manifest:
        """Raises: ArtifactError."""
        ...


class HealthChecker(Protocol):
    def check(self, manifest: Manifest, model_path: Path) -> object:
        """Raises: HealthCheckFailed."""
        ...


class Installer(Protocol):
    """``agent.updater.slots.ModelStore``'s phases (mender's installer vocabulary)."""

    supports_rollback: bool
    needs_restart: bool

    def stage(self, name: str, version: str, model_file: str | Path, manifest_bytes: bytes,
              manifest: Manifest | None = None) -> Path: ...
    def activate(self, name: str, version: str) -> Path: ...
    def commit(self, name: str) -> str: ...
    def rollback(self, name: str, from_version: str | None = None) -> str | None: ...
    def cleanup(self, name: str, keep: Collection[str] = ()) -> list[str]: ...
    def current(self, name: str) -> str | None: ...
    def manifest(self, name: str, version: str) -> Manifest: ...
    def model_path(self, name: str, version: str) -> Path: ...


@dataclass(frozen=True)
class UpdateReport:
    """The one report of an update's outcome (the daemon folds it into ``Reported``)."""

    update_id: str
    sequence: int
    name: str
    version: str  # the version the update was for
    state: str  # final state
    result: str  # one of LAST_RESULTS: ok, rolled_back, failed
    error: str | None
    running: RunningModel | None  # what `current` points to now, if anything
    at: float  # unix seconds

    def to_dict(self) -> dict[str, Any]:
        """``Reported``-like fields (no device_id / agent_version: the daemon adds those)."""
        return {"update_id": self.update_id, "applied_sequence": self.sequence,
                "model": {"name": self.name, "version": self.version},
                "running": [self.running.to_dict()] if self.running else [],
                "state": self.state, "last_result": self.result, "last_error": self.error,
                "reported_at": int(self.at)}


class Reporter(Protocol):
    def report(self, report: UpdateReport) -> None:
        """Queue or send it. Raises: TransportError (transient: sent again on resume)."""
        ...


@dataclass(frozen=True)
class Outcome:
    """How a run ended: the final record, the error behind it, the report sent."""

    record: UpdateRecord
    error: AgentError | None = None
    report: UpdateReport | None = None

    @property
    def state(self) -> State:
        return self.record.state

    @property
    def result(self) -> str:
        return RESULTS[self.record.state]


def describe(exc: BaseException) -> str:
    """``Type: message`` plus the notes, on one line (what a report's ``last_error`` says)."""
    notes = getattr(exc, "__notes__", None) or []
    return "; ".join([f"{type(exc).__name__}: {exc}", *notes])


@dataclass(frozen=True)
class _Step:
    event: Event | None  # None: a final state's work is done
    record: UpdateRecord


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
class UpdateRunner:
    """Drives updates through the machine; see the module docstring. One update at a time."""

    def __init__(self, *, store: StateStore, installer: Installer, fetcher: Fetcher,
                 verifier: Verifier, checker: HealthChecker, reporter: Reporter,
                 clock: Callable[[], float] = time.time, loop_limit: int = 5,
                 on_enter: Callable[[UpdateRecord], None] | None = None) -> None:
        """Wire the seams.

        Args:
            store: the state records (``state.db``).
            installer: the model store (``ModelStore``, its ``on_activate`` hook wired to
                serving).
            fetcher: downloads (``TargetsFetcher(ArtifactFetcher(...))``).
            verifier: ``ArtifactVerifier(profile)``.
            checker: ``RuntimeHealthChecker(profile)``.
            reporter: where the one report per update goes (the outbox / ``reported``).
            clock: unix seconds, for record and report timestamps.
            loop_limit: ``AgentConfig.boot_loop_limit``.
            on_enter: observer called after each state is persisted, before its work.
        """
        self._store = store
        self._installer = installer
        self._fetcher = fetcher
        self._verifier = verifier
        self._checker = checker
        self._reporter = reporter
        self._clock = clock
        self._loop_limit = loop_limit
        self._on_enter = on_enter
        self._error: AgentError | None = None
        # (update id, manifest bytes, the manifest Verifying parsed from them): Staging hands
        # it to the installer instead of having the same bytes parsed again
        self._verified: tuple[str, bytes, Manifest] | None = None
        self._phases: dict[State, Callable[[UpdateRecord], _Step]] = {
            State.IDLE: self._idle,
            State.FETCHING: self._fetching,
            State.VERIFYING: self._verifying,
            State.STAGING: self._staging,
            State.HEALTH_CHECK: self._health_check,
            State.COMMITTED: self._committed,
            State.ROLLED_BACK: self._rolled_back,
            State.FAILED: self._failed,
        }

    # -- entry points -----------------------------------------------------------------------
    def start(self, desired: DesiredModel, sequence: int) -> Outcome:
        """Record a new update (Idle) and drive it to a final state.

        Raises:
            RuntimeError: an unfinished update is recorded (call :meth:`resume` first).
            ValueError: this update id (sequence and model name) was already started.
            TransportError: a transient failure; the update waits; call :meth:`resume` later.
            StoreError: the state database failed; nothing was done after the last write.
        """
        pending = self._store.load()
        if pending is not None and not pending.finished:
            raise RuntimeError(f"update {pending.update_id} is unfinished in "
                               f"{pending.state.value}; resume() it before starting another")
        update_id = UpdateRecord.make_id(sequence, desired.name)
        if self._store.get(update_id) is not None:
            raise ValueError(f"update {update_id} was already started")
        now = self._clock()
        rec = UpdateRecord(update_id=update_id, sequence=sequence, desired=desired,
                           state=State.IDLE, previous_version=self._installer.current(
                               desired.name), created_at=now, updated_at=now)
        self._error = None
        self._store.save(rec, durable=False)  # Idle does nothing: Fetching's record follows
        self._entered(rec)
        return self._drive(rec)

    def resume(self) -> Outcome | None:
        """Recover at start-up (or retry after a transient error) and drive to the end.

        Returns:
            The outcome, or ``None`` when no update was in flight.

        Raises:
            TransportError: still transient; retry later with backoff.
            StoreError: the state database failed.
        """
        rec = self._store.load()
        action = recover(rec, loop_limit=self._loop_limit)
        if rec is None or action.action is Action.NOTHING:
            return None
        log.info("update %s: %s (%s)", rec.update_id, action.action.value, action.reason)
        self._error = None
        if action.action is Action.REPORT:
            if rec.state is State.FAILED and not rec.done:
                rec = rec.evolve(last_error=_join(rec.last_error, action.reason))
            return self._finish(rec)
        if action.action is Action.RETRY:
            # in flight again: from here a crash counts as an attempt
            rec = self._save(rec.evolve(waiting=False, transient_error=None))
        elif action.action is Action.FIRE:
            assert action.state is not None
            self._error = AgentError(action.reason)
            rec = self._enter(rec.evolve(last_error=_join(rec.last_error, action.reason)),
                              action.state)
        else:
            rec = self._enter(rec, rec.state)
        return self._drive(rec)

    # -- the loop ---------------------------------------------------------------------------
    def _drive(self, rec: UpdateRecord) -> Outcome:
        while True:
            try:
                step = self._phases[rec.state](rec)
            except AgentError as exc:
                if exc.transient:
                    self._save(rec.evolve(waiting=True, transient_error=describe(exc)))
                    raise
                event = FAILURE_EVENTS.get(rec.state)
                if event is None:
                    raise
                log.warning("update %s: %s in %s: %s", rec.update_id, event.value,
                            rec.state.value, describe(exc))
                self._error = exc
                step = _Step(event, rec.evolve(last_error=describe(exc)))
            if step.event is None:
                return self._finish(step.record)
            rec = self._enter(step.record, next_state(rec.state, step.event))

    def _enter(self, rec: UpdateRecord, state: State) -> UpdateRecord:
        """Persist ``state`` BEFORE its work runs (durably for :data:`DURABLE_STATES`); count
        re-entries (the boot-loop counter)."""
        attempt = rec.attempt + 1 if state is rec.state else 1
        rec = self._save(rec.evolve(state=state, attempt=attempt, waiting=False, done=False,
                                    reported=False, transient_error=None),
                         durable=state in DURABLE_STATES)
        self._entered(rec)
        return rec

    def _entered(self, rec: UpdateRecord) -> None:
        log.info("update %s: %s (attempt %d)", rec.update_id, rec.state.value, rec.attempt)
        if self._on_enter is not None:
            self._on_enter(rec)

    def _save(self, rec: UpdateRecord, *, durable: bool = False) -> UpdateRecord:
        """Write ``rec``; only state entries that must survive a power cut are ``durable``
        (the other writes only say more about a state whose entry was written before)."""
        rec = rec.evolve(updated_at=self._clock())
        self._store.save(rec, durable=durable)
        return rec

    # -- phases: each returns an event ------------------------------------------------------
    def _idle(self, rec: UpdateRecord) -> _Step:
        return _Step(Event.START, rec)

    def _fetching(self, rec: UpdateRecord) -> _Step:
        got = self._fetcher.fetch(rec.desired)
        return _Step(Event.FETCHED, rec.evolve(model_download=str(got.model_file),
                                               manifest_download=str(got.manifest_file)))

    def _downloads(self, rec: UpdateRecord) -> tuple[Path, bytes]:
        if rec.model_download is None or rec.manifest_download is None:
            raise InstallError(f"update {rec.update_id}: no downloaded files recorded")
        try:
            return Path(rec.model_download), Path(rec.manifest_download).read_bytes()
        except OSError as exc:
            raise InstallError(f"update {rec.update_id}: the downloaded manifest cannot be "
                               f"read: {exc}") from exc

    def _verifying(self, rec: UpdateRecord) -> _Step:
        model_file, manifest_bytes = self._downloads(rec)
        try:
            length, digest = sha256_file(model_file)
        except OSError as exc:
            raise InstallError(f"update {rec.update_id}: the downloaded model cannot be read: "
                               f"{exc}") from exc
        manifest = self._verifier.verify(rec.desired, manifest_bytes, length=length,
                                         sha256=digest)
        self._verified = (rec.update_id, manifest_bytes, manifest)
        return _Step(Event.VERIFIED, rec)

    def _staging(self, rec: UpdateRecord) -> _Step:
        model_file, manifest_bytes = self._downloads(rec)
        verified, self._verified = self._verified, None
        parsed = None  # after a restart, or if the file changed: the installer parses it
        if verified is not None and verified[:2] == (rec.update_id, manifest_bytes):
            parsed = verified[2]
        self._installer.stage(rec.name, rec.version, model_file, manifest_bytes, parsed)
        return _Step(Event.STAGED, rec)

    def _health_check(self, rec: UpdateRecord) -> _Step:
        manifest = self._installer.manifest(rec.name, rec.version)
        self._checker.check(manifest, self._installer.model_path(rec.name, rec.version))
        self._installer.activate(rec.name, rec.version)  # pointer swap + serving hook
        return _Step(Event.HEALTHY, rec)

    def _committed(self, rec: UpdateRecord) -> _Step:
        self._installer.commit(rec.name)
        self._cleanup(rec)
        return _Step(None, rec)

    def _rolled_back(self, rec: UpdateRecord) -> _Step:
        try:
            self._installer.rollback(rec.name, from_version=rec.version)
        except AgentError as exc:
            if exc.transient:
                raise
            chained = self._chain(exc, rec)
            raise chained from chained.__cause__
        self._cleanup(rec)
        return _Step(None, rec)

    def _failed(self, rec: UpdateRecord) -> _Step:
        if self._installer.current(rec.name) == rec.version:
            try:  # the new version is serving (a loop, or a failed rollback): go back
                self._installer.rollback(rec.name, from_version=rec.version)
            except AgentError as exc:
                if exc.transient:
                    raise
                chained = self._chain(exc, rec)
                self._error = chained
                rec = rec.evolve(last_error=describe(chained))
        self._cleanup(rec)
        return _Step(None, rec)

    # -- finishing --------------------------------------------------------------------------
    def _finish(self, rec: UpdateRecord) -> Outcome:
        """Final state's work is done: persist that, report once, persist that."""
        if not rec.done:
            rec = self._save(rec.evolve(done=True, waiting=False, transient_error=None))
        if rec.model_download and rec.manifest_download:
            self._discard(rec)
        report = UpdateReport(update_id=rec.update_id, sequence=rec.sequence, name=rec.name,
                              version=rec.version, state=rec.state.value,
                              result=RESULTS[rec.state], error=rec.last_error,
                              running=self._running(rec.name), at=self._clock())
        self._reporter.report(report)
        rec = self._save(rec.evolve(reported=True))
        log.info("update %s: finished %s (%s)", rec.update_id, rec.state.value, report.result)
        try:
            self._store.prune()
        except AgentError as exc:
            log.warning("pruning old update records failed: %s", describe(exc))
        assert is_final(rec.state)
        return Outcome(rec, self._error, report)

    def _running(self, name: str) -> RunningModel | None:
        try:
            version = self._installer.current(name)
            if version is None:
                return None
            sha = self._installer.manifest(name, version).file.sha256
        except AgentError as exc:
            log.warning("model %s: cannot tell what is running: %s", name, describe(exc))
            return None
        return RunningModel(name=name, version=version, sha256=sha)

    def _cleanup(self, rec: UpdateRecord) -> None:
        try:
            removed = self._installer.cleanup(rec.name)
        except AgentError as exc:  # best effort: the next update's cleanup tries again
            log.warning("update %s: cleanup: %s", rec.update_id, describe(exc))
            return
        if removed:
            log.info("update %s: removed %s", rec.update_id, ", ".join(removed))

    def _discard(self, rec: UpdateRecord) -> None:
        assert rec.model_download is not None and rec.manifest_download is not None
        try:
            self._fetcher.discard(Fetched(Path(rec.model_download), Path(rec.manifest_download)))
        except (AgentError, OSError) as exc:
            log.warning("update %s: discarding downloads: %s", rec.update_id, exc)

    def _original(self, rec: UpdateRecord) -> AgentError:
        """The error that led here: the live one, or (after a restart) the recorded text."""
        if self._error is not None:
            return self._error
        return AgentError(rec.last_error or f"update {rec.update_id} ended in {rec.state.value}")

    def _chain(self, rollback_error: AgentError, rec: UpdateRecord) -> AgentError:
        """Keep both errors: the original as ``__cause__`` and, for the report, in a note."""
        original = self._original(rec)
        rollback_error.add_note(f"rollback of {rec.name} {rec.version} was after: "
                                f"{describe(original)}")
        rollback_error.__cause__ = original
        return rollback_error


def _join(first: str | None, second: str) -> str:
    return second if not first else f"{first}; {second}"

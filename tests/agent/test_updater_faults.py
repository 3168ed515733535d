"""The fault-injection matrix (mender's ``stateTransitionsWithUpdateModulesTestCases``).

For every state an "Error in X" case and a "Killed in X" case, plus boot loops. A kill is a
``Killed`` (a ``BaseException``: nothing in the agent catches it) raised mid-phase; the runner
and its store connection are then abandoned, and a NEW runner over the same data directory
and ``state.db`` resumes, as after ``kill -9``. The store, the model store (``ModelStore`` on a
real directory) and the verifier are real; fetcher, health checker, serving hook and reporter
are fakes at their seams.

Each row asserts the chain of persisted states (every entry into a state, re-entries included),
the chain of calls into the phases (``"<call> failed"``: it raised; ``"<call> killed"``: the
process died in it), what serving was told to run, and the report; every row ends with the
device on the old or the new model, the update finished, ``current`` pointing at a complete
version, downloads and staged leftovers removed, and exactly one report.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from test_health import WEIGHTS, Bundle, make_bundle, make_profile

from agent.errors import (
    AgentError,
    ArtifactError,
    HealthCheckFailed,
    InstallError,
    RuntimeLoadError,
    StoreError,
    TransportError,
)
from agent.protocol.manifest import Manifest
from agent.protocol.messages import DesiredModel
from agent.updater.machine import State
from agent.updater.records import StateStore, UpdateRecord
from agent.updater.runner import Fetched, Outcome, UpdateReport, UpdateRunner
from agent.updater.slots import ModelStore
from agent.updater.verify import ArtifactVerifier

T = TypeVar("T")
LIMIT = 3  # boot_loop_limit for these tests
KILL = "kill"
Fault = type[AgentError] | str


class Killed(BaseException):
    """The process died here (SIGKILL, power cut)."""


class Faults:
    """Injected faults by point; each queued fault fires once, in order, across restarts."""

    def __init__(self, plan: Mapping[str, Sequence[Fault]]) -> None:
        self._plan = {k: list(v) for k, v in plan.items()}

    def take(self, point: str) -> Fault | None:
        queue = self._plan.get(point)
        return queue.pop(0) if queue else None

    def fire(self, point: str) -> None:
        fault = self.take(point)
        if fault == KILL:
            raise Killed(point)
        if isinstance(fault, type):
            raise fault(f"injected: {point}")


def traced(calls: list[str], label: str, faults: Faults, point: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` between the ``point`` and ``point:after`` faults, logging the call."""
    try:
        faults.fire(point)
        result = fn()
        faults.fire(f"{point}:after")
    except Killed:
        calls.append(f"{label} killed")
        raise
    except AgentError:
        calls.append(f"{label} failed")
        raise
    calls.append(label)
    return result


# ---------------------------------------------------------------------------------------------
# fakes at the seams, and wrappers that record and inject around the real adapters
# ---------------------------------------------------------------------------------------------
class RecordingStore(StateStore):
    def __init__(self, path: Path, faults: Faults, saves: list[tuple[str, int]],
                 synced: list[tuple[str, bool, bool]]) -> None:
        super().__init__(path)
        self.faults, self.saves, self.synced = faults, saves, synced

    def save(self, record: UpdateRecord, *, applied_sequence: int | None = None,
             durable: bool = True) -> None:
        self.faults.fire(f"save:{record.state.value}")
        super().save(record, applied_sequence=applied_sequence, durable=durable)
        self.saves.append((record.state.value, record.attempt))
        # what the connection really committed with: 2 = FULL (fsync), 1 = NORMAL
        level = self._db.execute("PRAGMA synchronous").fetchone()[0]
        self.synced.append((record.state.value, record.done or record.reported, level == 2))


class FaultyInstaller:
    supports_rollback = True
    needs_restart = False

    def __init__(self, real: ModelStore, faults: Faults, calls: list[str]) -> None:
        self.real, self.faults, self.calls = real, faults, calls

    def stage(self, name: str, version: str, model_file: str | Path, manifest_bytes: bytes,
              manifest: Manifest | None = None) -> Path:
        return traced(self.calls, f"stage {version}", self.faults, "stage",
                      lambda: self.real.stage(name, version, model_file, manifest_bytes,
                                              manifest))

    def activate(self, name: str, version: str) -> Path:
        return traced(self.calls, f"activate {version}", self.faults, "activate",
                      lambda: self.real.activate(name, version))

    def commit(self, name: str) -> str:
        return traced(self.calls, "commit", self.faults, "commit",
                      lambda: self.real.commit(name))

    def rollback(self, name: str, from_version: str | None = None) -> str | None:
        return traced(self.calls, f"rollback {from_version}", self.faults,
                      "rollback", lambda: self.real.rollback(name, from_version))

    def cleanup(self, name: str, keep: Collection[str] = ()) -> list[str]:
        return traced(self.calls, "cleanup", self.faults, "cleanup",
                      lambda: self.real.cleanup(name, keep))

    def current(self, name: str) -> str | None:
        return self.real.current(name)

    def manifest(self, name: str, version: str) -> Manifest:
        return self.real.manifest(name, version)

    def model_path(self, name: str, version: str) -> Path:
        return self.real.model_path(name, version)


class FakeFetcher:
    """Serves the bundles from memory into ``downloads/``; can corrupt or die mid-download."""

    def __init__(self, repo: Mapping[str, Bundle], downloads: Path, faults: Faults,
                 calls: list[str]) -> None:
        self.repo, self.downloads, self.faults, self.calls = repo, downloads, faults, calls

    def fetch(self, desired: DesiredModel) -> Fetched:
        bundle = self.repo[desired.version]
        src = self.repo["1"].model_file if self.faults.take("fetch:corrupt") else \
            bundle.model_file
        dest = self.downloads / desired.name / desired.version

        def download() -> Fetched:
            dest.mkdir(parents=True, exist_ok=True)
            if self.faults.take("fetch:half") == KILL:
                data = src.read_bytes()
                (dest / "model.onnx").write_bytes(data[: len(data) // 2])
                raise Killed("mid-download")
            shutil.copyfile(src, dest / "model.onnx")
            shutil.copyfile(bundle.manifest_file, dest / "manifest.json")
            return Fetched(dest / "model.onnx", dest / "manifest.json")

        return traced(self.calls, "fetch", self.faults, "fetch", download)

    def discard(self, fetched: Fetched) -> None:
        fetched.model_file.unlink(missing_ok=True)
        fetched.manifest_file.unlink(missing_ok=True)


class FakeChecker:
    def __init__(self, faults: Faults, calls: list[str]) -> None:
        self.faults, self.calls = faults, calls

    def check(self, manifest: Manifest, model_path: Path) -> None:
        assert model_path.is_file() and model_path.parent.name == manifest.version
        traced(self.calls, f"check {manifest.version}", self.faults, "check", lambda: None)


class FakeReporter:
    def __init__(self, faults: Faults, reports: list[UpdateReport]) -> None:
        self.faults, self.reports = faults, reports

    def report(self, report: UpdateReport) -> None:
        traced([], "report", self.faults, "report", lambda: self.reports.append(report))


@dataclass
class World:
    """One device: a data directory, the artifacts it can fetch, and what everyone saw."""

    data: Path
    repo: Mapping[str, Bundle]
    saves: list[tuple[str, int]] = field(default_factory=list)
    synced: list[tuple[str, bool, bool]] = field(default_factory=list)  # state, bookkeeping, fsync
    calls: list[str] = field(default_factory=list)
    serving: list[str] = field(default_factory=list)
    reports: list[UpdateReport] = field(default_factory=list)

    def runner(self, faults: Faults) -> UpdateRunner:
        """A fresh agent process over the same data directory."""
        def serve(name: str, version: str | None, path: Path | None) -> None:
            traced(self.serving, str(version), faults, f"serve:{version}", lambda: None)

        def on_enter(rec: UpdateRecord) -> None:
            faults.fire(f"enter:{rec.state.value}")

        return UpdateRunner(
            store=RecordingStore(self.data / "state.db", faults, self.saves, self.synced),
            installer=FaultyInstaller(ModelStore(self.data, on_activate=serve), faults,
                                      self.calls),
            fetcher=FakeFetcher(self.repo, self.data / "downloads", faults, self.calls),
            verifier=ArtifactVerifier(make_profile()),
            checker=FakeChecker(faults, self.calls),
            reporter=FakeReporter(faults, self.reports),
            clock=lambda: 1_800_000_000.0,
            loop_limit=LIMIT,
            on_enter=on_enter,
        )

    def clear(self) -> None:
        for seen in (self.saves, self.synced, self.calls, self.serving, self.reports):
            seen.clear()


def entries(saves: list[tuple[str, int]]) -> list[str]:
    """The persisted state chain: every write that entered a state (or re-entered it)."""
    out: list[str] = []
    last: tuple[str, int] | None = None
    for save in saves:
        if save != last:
            out.append(save[0])
        last = save
    return out


def drive(world: World, faults: Faults, desired: DesiredModel, sequence: int) -> Outcome:
    """Start the update; after each kill (or store failure) restart the agent and resume;
    after a transient error, resume in the same process (the daemon's backoff)."""
    runner = world.runner(faults)
    outcome: Outcome | None = None
    try:
        outcome = runner.start(desired, sequence)
    except (Killed, StoreError):
        runner = world.runner(faults)
    except TransportError:
        pass
    for _ in range(20):
        if outcome is not None:
            return outcome
        try:
            outcome = runner.resume()
            assert outcome is not None
        except (Killed, StoreError):
            runner = world.runner(faults)
        except TransportError:
            pass
    raise AssertionError("the update never finished")


# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Bundle]:
    root = tmp_path_factory.mktemp("repo")
    return {"1": make_bundle(root / "1", version="1"),
            "2": make_bundle(root / "2", version="2", weights=WEIGHTS * 2)}


@pytest.fixture
def world(tmp_path: Path, repo: dict[str, Bundle]) -> World:
    """A device already running version 1 (installed by the runner itself)."""
    w = World(tmp_path / "data", repo)
    outcome = drive(w, Faults({}), repo["1"].desired, 1)
    assert outcome.result == "ok" and w.serving == ["1"]
    w.clear()
    return w


UP = ["Idle", "Fetching", "Verifying", "Staging", "HealthCheck"]
OK_CALLS = ["fetch", "stage 2", "check 2", "activate 2", "commit", "cleanup"]


@dataclass(frozen=True)
class Case:
    name: str
    faults: Mapping[str, Sequence[Fault]]
    states: list[str]
    calls: list[str]
    result: str
    running: str  # the version `current` points to at the end
    serving: list[str] | None = None
    error: str | None = None  # regex the report's last_error must match


CASES = [
    Case("no fault", {}, [*UP, "Committed"], OK_CALLS, "ok", "2", ["2"]),

    # -- Error in X ---------------------------------------------------------------------------
    Case("error in Idle: writing Fetching fails, nothing is fetched until it is written",
         {"save:Fetching": [StoreError]}, ["Idle", "Idle", *UP[1:], "Committed"], OK_CALLS,
         "ok", "2", ["2"]),
    Case("error in Fetching: TUF refuses the target (fatal)", {"fetch": [ArtifactError]},
         ["Idle", "Fetching", "Failed"], ["fetch failed", "cleanup"], "failed", "1", [],
         r"^ArtifactError: injected: fetch$"),
    Case("error in Fetching: server unreachable (transient, retried, not counted)",
         {"fetch": [TransportError, TransportError]}, [*UP, "Committed"],
         ["fetch failed", "fetch failed", *OK_CALLS], "ok", "2", ["2"]),
    Case("error in Verifying: downloaded file is not the one named", {"fetch:corrupt": [KILL]},
         ["Idle", "Fetching", "Verifying", "Failed"], ["fetch", "cleanup"], "failed", "1", [],
         r"downloaded file has sha256 [0-9a-f]{64}, expected"),
    Case("error in Staging: disk full", {"stage": [InstallError]}, [*UP[:4], "Failed"],
         ["fetch", "stage 2 failed", "cleanup"], "failed", "1", []),
    Case("error in HealthCheck: golden outputs differ (never served)",
         {"check": [HealthCheckFailed]}, [*UP, "RolledBack"],
         ["fetch", "stage 2", "check 2 failed", "rollback 2", "cleanup"], "rolled_back", "1",
         [], r"HealthCheckFailed: injected: check"),
    Case("error in HealthCheck: serving cannot load it after the pointer swap",
         {"serve:2": [RuntimeLoadError]}, [*UP, "RolledBack"],
         ["fetch", "stage 2", "check 2", "activate 2 failed", "rollback 2", "cleanup"],
         "rolled_back", "1", ["2 failed", "1"]),
    Case("error in Committed: commit fails, rolled back", {"commit": [InstallError]},
         [*UP, "Committed", "RolledBack"],
         ["fetch", "stage 2", "check 2", "activate 2", "commit failed", "rollback 2",
          "cleanup"], "rolled_back", "1", ["2", "1"]),
    Case("error in Committed: the report cannot be sent at first", {"report": [TransportError]},
         [*UP, "Committed"], OK_CALLS, "ok", "2", ["2"]),
    Case("error in RolledBack: rollback fails, Failed rolls back",
         {"commit": [InstallError], "rollback": [InstallError]},
         [*UP, "Committed", "RolledBack", "Failed"],
         ["fetch", "stage 2", "check 2", "activate 2", "commit failed", "rollback 2 failed",
          "rollback 2", "cleanup"], "failed", "1", ["2", "1"],
         r"InstallError: injected: rollback; rollback of clf 2 was after: InstallError: "
         r"injected: commit"),
    Case("error in RolledBack and Failed: rollback keeps failing, stays on the new model",
         {"commit": [InstallError], "rollback": [InstallError, InstallError]},
         [*UP, "Committed", "RolledBack", "Failed"],
         ["fetch", "stage 2", "check 2", "activate 2", "commit failed", "rollback 2 failed",
          "rollback 2 failed", "cleanup"], "failed", "2", ["2"],
         r"injected: rollback; rollback of clf 2 was after: InstallError: injected: rollback;"
         r" rollback of clf 2 was after: InstallError: injected: commit"),
    Case("error in Failed: the report cannot be sent at first",
         {"fetch": [ArtifactError], "report": [TransportError]}, ["Idle", "Fetching", "Failed"],
         ["fetch failed", "cleanup"], "failed", "1", []),
    Case("error in Failed: cleanup fails, still reported once",
         {"fetch": [ArtifactError], "cleanup": [InstallError]}, ["Idle", "Fetching", "Failed"],
         ["fetch failed", "cleanup failed"], "failed", "1", []),

    # -- Killed in X --------------------------------------------------------------------------
    Case("killed in Idle", {"enter:Idle": [KILL]}, ["Idle", "Idle", *UP[1:], "Committed"],
         OK_CALLS, "ok", "2", ["2"]),
    Case("killed in Fetching mid-download", {"fetch:half": [KILL]},
         ["Idle", "Fetching", "Fetching", *UP[2:], "Committed"], ["fetch killed", *OK_CALLS],
         "ok", "2", ["2"]),
    Case("killed in Verifying", {"enter:Verifying": [KILL]},
         [*UP[:3], "Verifying", "Staging", "HealthCheck", "Committed"], OK_CALLS, "ok", "2"),
    Case("killed in Staging after the copy, before Staged was written", {"stage:after": [KILL]},
         [*UP[:4], "Staging", "HealthCheck", "Committed"],
         ["fetch", "stage 2 killed", *OK_CALLS[1:]], "ok", "2", ["2"]),
    Case("killed in HealthCheck while checking", {"check": [KILL]},
         [*UP, "HealthCheck", "Committed"],
         ["fetch", "stage 2", "check 2 killed", *OK_CALLS[2:]], "ok", "2", ["2"]),
    Case("killed in HealthCheck after the pointer swap", {"serve:2": [KILL]},
         [*UP, "HealthCheck", "Committed"],
         ["fetch", "stage 2", "check 2", "activate 2 killed", *OK_CALLS[2:]], "ok", "2",
         ["2 killed", "2"]),
    Case("killed in Committed before commit and report", {"enter:Committed": [KILL]},
         [*UP, "Committed", "Committed"], OK_CALLS, "ok", "2", ["2"]),
    Case("killed in Committed after commit", {"commit:after": [KILL]},
         [*UP, "Committed", "Committed"], [*OK_CALLS[:4], "commit killed", "commit", "cleanup"],
         "ok", "2", ["2"]),
    Case("killed in RolledBack after the pointer went back",
         {"serve:2": [RuntimeLoadError], "rollback:after": [KILL]},
         [*UP, "RolledBack", "RolledBack"],
         ["fetch", "stage 2", "check 2", "activate 2 failed", "rollback 2 killed",
          "rollback 2", "cleanup"], "rolled_back", "1", ["2 failed", "1"],
         r"RuntimeLoadError: injected: serve:2"),
    Case("killed in Failed", {"fetch": [ArtifactError], "enter:Failed": [KILL]},
         ["Idle", "Fetching", "Failed", "Failed"], ["fetch failed", "cleanup"], "failed", "1",
         [], r"ArtifactError: injected: fetch"),

    # -- boot loops: the same kill on every start-up -------------------------------------------
    Case("boot loop in HealthCheck: serving the new model kills the agent",
         {"serve:2": [KILL] * 9}, UP + ["HealthCheck"] * 2 + ["Failed"],
         ["fetch", "stage 2", *["check 2", "activate 2 killed"] * 3, "rollback 2", "cleanup"],
         "failed", "1", ["2 killed"] * 3 + ["1"],
         r"boot loop: state HealthCheck entered 3 times, the limit is 3"),
    Case("boot loop in Committed", {"commit": [KILL] * 9},
         UP + ["Committed"] * 3 + ["Failed"],
         [*OK_CALLS[:4], *["commit killed"] * 3, "rollback 2", "cleanup"], "failed", "1",
         ["2", "1"], r"boot loop: state Committed entered 3 times"),
    Case("boot loop in Failed: give up its work, still report",
         {"fetch": [ArtifactError], "cleanup": [KILL] * 9},
         ["Idle", "Fetching", "Failed", "Failed", "Failed"],
         ["fetch failed", *["cleanup killed"] * 3], "failed", "1", [],
         r"injected: fetch; boot loop: state Failed entered 3 times.*reporting without"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault_matrix(world: World, repo: dict[str, Bundle], case: Case) -> None:
    outcome = drive(world, Faults(case.faults), repo["2"].desired, 2)

    assert entries(world.saves) == case.states
    assert world.calls == case.calls
    if case.serving is not None:
        assert world.serving == case.serving
    # exactly one report, for this update, with the outcome
    assert [(r.update_id, r.result) for r in world.reports] == [("2/clf", case.result)]
    report = world.reports[0]
    assert report.state == case.states[-1] == outcome.state.value
    assert report.running is not None and report.running.version == case.running
    assert report.running.sha256 == repo[case.running].manifest.file.sha256
    if case.error is not None:
        assert report.error is not None and re.search(case.error, report.error), report.error
    elif case.result == "ok":
        assert report.error is None
    # the record is finished, on disk
    rec = StateStore(world.data / "state.db").load()
    assert rec is not None and rec.finished and rec.update_id == "2/clf"
    assert rec.state is State(case.states[-1])
    # the device: on the old or the new model, `current` valid, nothing left over
    store = ModelStore(world.data)
    assert store.current("clf") == case.running and store.is_complete("clf", case.running)
    current = world.data / "models" / "clf" / "current"
    assert current.resolve() == (world.data / "models" / "clf" / case.running).resolve()
    assert set(store.versions("clf")) <= {store.current("clf"), store.previous("clf")}
    if "cleanup failed" not in case.calls and "cleanup killed" not in case.calls:
        assert not [p for p in (world.data / "models" / "clf").iterdir()
                    if p.name.startswith(".")]
    assert not [p for p in (world.data / "downloads").rglob("*") if p.is_file()]
    # and a later start-up has nothing to do
    assert world.runner(Faults({})).resume() is None
    assert len(world.reports) == 1


def test_every_state_has_an_error_and_a_killed_case() -> None:
    names = " | ".join(c.name for c in CASES)
    for state in State:
        assert f"error in {state.value}" in names, state
        assert f"killed in {state.value}" in names, state


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("faults", "durable"), [
    ({}, ["HealthCheck", "Committed"]),
    ({"check": [HealthCheckFailed]}, ["HealthCheck", "RolledBack"]),
    ({"stage": [InstallError]}, ["Failed"]),
], ids=["committed", "rolled-back", "failed"])
def test_only_entering_states_that_change_what_runs_is_fsynced(
        world: World, repo: dict[str, Bundle], faults: dict[str, list[object]],
        durable: list[str]) -> None:
    """Idle..Staging and the bookkeeping writes (done, reported) are committed without an
    fsync; entering HealthCheck and the final states is flushed before their work."""
    world.runner(Faults(faults)).start(repo["2"].desired, 2)
    entering = [(state, fsync) for state, bookkeeping, fsync in world.synced if not bookkeeping]
    assert [state for state, fsync in entering if fsync] == durable
    assert {state for state, fsync in entering if not fsync} <= {
        "Idle", "Fetching", "Verifying", "Staging"}
    assert not [s for s, bookkeeping, fsync in world.synced if bookkeeping and fsync]
    assert [s for s, bookkeeping, _ in world.synced if bookkeeping] == [durable[-1]] * 2


def test_a_failed_rollback_keeps_both_errors(world: World, repo: dict[str, Bundle]) -> None:
    faults = Faults({"commit": [InstallError], "rollback": [InstallError]})
    outcome = world.runner(faults).start(repo["2"].desired, 2)
    assert outcome.state is State.FAILED and outcome.result == "failed"
    err = outcome.error
    assert isinstance(err, InstallError) and str(err) == "injected: rollback"
    assert isinstance(err.__cause__, InstallError) and str(err.__cause__) == "injected: commit"
    assert any("was after: InstallError: injected: commit" in n for n in err.__notes__)


def test_killed_between_report_and_its_record_reports_again_with_the_same_id(
        world: World, repo: dict[str, Bundle]) -> None:
    """At-least-once: the receiver drops the copy by ``update_id``."""
    outcome = drive(world, Faults({"report:after": [KILL]}), repo["2"].desired, 2)
    assert outcome.result == "ok"
    assert [r.update_id for r in world.reports] == ["2/clf", "2/clf"]
    assert world.reports[0].to_dict() == world.reports[1].to_dict()


def test_first_install_rolled_back_leaves_no_model(tmp_path: Path,
                                                   repo: dict[str, Bundle]) -> None:
    w = World(tmp_path / "data", repo)
    outcome = drive(w, Faults({"commit": [InstallError]}), repo["1"].desired, 1)
    assert outcome.result == "rolled_back"
    assert w.serving == ["1", "None"]
    assert ModelStore(w.data).current("clf") is None
    assert w.reports[0].running is None and w.reports[0].to_dict()["running"] == []


def test_start_refuses_while_an_update_is_unfinished(world: World,
                                                     repo: dict[str, Bundle]) -> None:
    with pytest.raises(Killed):
        world.runner(Faults({"enter:Staging": [KILL]})).start(repo["2"].desired, 2)
    with pytest.raises(RuntimeError, match="2/clf is unfinished in Staging"):
        world.runner(Faults({})).start(repo["2"].desired, 3)
    assert world.runner(Faults({})).resume() is not None
    with pytest.raises(ValueError, match="2/clf was already started"):
        world.runner(Faults({})).start(repo["2"].desired, 2)


def test_report_dict_is_reported_like(world: World, repo: dict[str, Bundle]) -> None:
    outcome = world.runner(Faults({})).start(repo["2"].desired, 2)
    assert outcome.report is not None
    d = outcome.report.to_dict()
    assert d["applied_sequence"] == 2 and d["state"] == "Committed" and d["last_result"] == "ok"
    assert d["running"] == [{"name": "clf", "version": "2",
                             "sha256": repo["2"].manifest.file.sha256}]
    assert d["last_error"] is None and d["reported_at"] == 1_800_000_000

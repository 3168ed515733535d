"""kill -9 in the middle of an update, for real: a child process, real files, a real model.

The child (this file run as a script: ``python test_updater_kill9.py child CONFIG``) runs the
real runner over a real data directory: ``StateStore`` on ``state.db``, ``ModelStore`` with a
serving hook that loads the model through onnxruntime, the real verifier and the real
``RuntimeHealthChecker`` on a real ONNX model (float32 [N,4] -> MatMul -> Softmax [N,3]) with
golden I/O computed by onnxruntime. Its fetcher copies from a local "repository" directory.

A test hook pauses the child at a chosen point: it prints ``PAUSED <point>`` and blocks reading
its stdin. The parent waits for that line (bounded ``select``, no sleeps), SIGKILLs the child,
checks what was persisted, starts a NEW child that resumes, and checks the end state: the
update finished, ``current`` points at a complete version directory, and the report (appended
to a file by the child, fsynced) was sent exactly once.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT_S = 60.0

# ---------------------------------------------------------------------------------------------
# the child
# ---------------------------------------------------------------------------------------------


def _pause(point: str, want: str | None) -> None:
    if point == want:
        print(f"PAUSED {point}", flush=True)
        sys.stdin.readline()  # blocks until the parent kills us (it never writes)
        raise SystemExit("resumed from a pause: the parent was supposed to kill this process")


def child_main(cfg: dict[str, Any]) -> None:
    from test_health import make_profile

    from agent.protocol.messages import DesiredModel
    from agent.serving.runtime import OnnxRuntime
    from agent.updater.health import RuntimeHealthChecker
    from agent.updater.records import StateStore, UpdateRecord
    from agent.updater.runner import Fetched, UpdateReport, UpdateRunner
    from agent.updater.slots import ModelStore
    from agent.updater.verify import ArtifactVerifier

    data, repo, pause = Path(cfg["data"]), Path(cfg["repo"]), cfg.get("pause")
    profile = make_profile(budget_ms=10_000.0)

    class Fetcher:
        def fetch(self, desired: DesiredModel) -> Fetched:
            src = repo / desired.version
            dest = data / "downloads" / desired.name / desired.version
            dest.mkdir(parents=True, exist_ok=True)
            raw = (src / "model.onnx").read_bytes()
            with open(dest / "model.onnx", "wb") as fh:
                fh.write(raw[: len(raw) // 2])
                fh.flush()
                os.fsync(fh.fileno())
                _pause("fetch:half", pause)
                fh.write(raw[len(raw) // 2:])
                fh.flush()
                os.fsync(fh.fileno())
            shutil.copyfile(src / "manifest.json", dest / "manifest.json")
            return Fetched(dest / "model.onnx", dest / "manifest.json")

        def discard(self, fetched: Fetched) -> None:
            fetched.model_file.unlink(missing_ok=True)
            fetched.manifest_file.unlink(missing_ok=True)

    class Reporter:
        def report(self, report: UpdateReport) -> None:
            with open(cfg["reports"], "a", encoding="utf-8") as fh:
                fh.write(json.dumps(report.to_dict()) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    # as the daemon wires it: the model that passed is handed to the activation
    checker = RuntimeHealthChecker(profile, latency_runs=5, hand_over=True)

    def serve(name: str, version: str | None, path: Path | None) -> None:
        _pause(f"serve:{version}", pause)
        how = "-"
        if path is not None:  # what the serving layer does: take or load, then swap
            model = checker.take(path / "model.onnx")
            how = "loaded" if model is None else "handed"
            if model is None:
                model = OnnxRuntime().load(path / "model.onnx", threads=1)
            model.close()
        with open(cfg["serving"], "a", encoding="utf-8") as fh:
            fh.write(f"{version} {how}\n")

    def on_enter(rec: UpdateRecord) -> None:
        _pause(f"enter:{rec.state.value}", pause)

    runner = UpdateRunner(
        store=StateStore.in_dir(data), installer=ModelStore(data, on_activate=serve),
        fetcher=Fetcher(), verifier=ArtifactVerifier(profile),
        checker=checker, reporter=Reporter(),
        loop_limit=5, on_enter=on_enter)
    if cfg.get("start"):
        desired = DesiredModel.from_dict(json.loads((repo / cfg["start"] / "desired.json")
                                                    .read_text()))
        outcome = runner.start(desired, int(cfg["sequence"]))
    else:
        resumed = runner.resume()
        assert resumed is not None, "nothing to resume"
        outcome = resumed
    print(f"DONE {outcome.state.value}", flush=True)


# ---------------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------------
class Child:
    def __init__(self, cfg: dict[str, Any]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            cwd=ROOT, text=True)

    def line(self) -> str:
        """The child's next line on stdout, waiting at most TIMEOUT_S."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
        if not ready:
            self.proc.kill()
            raise AssertionError(f"child said nothing in {TIMEOUT_S} s")
        text = self.proc.stdout.readline().strip()
        if not text:
            _, err = self.proc.communicate(timeout=TIMEOUT_S)
            raise AssertionError(f"child exited {self.proc.returncode}: {err}")
        return text

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=TIMEOUT_S) == -signal.SIGKILL
        self.close()

    def finish(self) -> str:
        text = self.line()
        assert self.proc.wait(timeout=TIMEOUT_S) == 0
        self.close()
        return text

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_health import WEIGHTS, WEIGHTS_PERTURBED_BY, make_bundle

    root = tmp_path_factory.mktemp("repo")
    bundles = {"1": make_bundle(root / "1", version="1"),
               "2": make_bundle(root / "2", version="2", weights=WEIGHTS * 2),
               # its model file no longer matches the golden outputs recorded for it
               "3": make_bundle(root / "3", version="3", weights=WEIGHTS + WEIGHTS_PERTURBED_BY,
                                golden_weights=WEIGHTS)}
    for version, b in bundles.items():
        (root / version / "desired.json").write_text(json.dumps(b.desired.to_dict()))
    return root


@pytest.fixture(scope="module")
def installed(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device directory running version 1, installed by a child."""
    base = tmp_path_factory.mktemp("device")
    cfg = config(base, repo, start="1", sequence=1)
    assert Child(cfg).finish() == "DONE Committed"
    return base


def config(base: Path, repo: Path, **kw: Any) -> dict[str, Any]:
    return {"data": str(base / "data"), "repo": str(repo), "reports": str(base / "reports"),
            "serving": str(base / "serving"), **kw}


def reports(base: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (base / "reports").read_text().splitlines()]


SCENARIOS = [
    # (name, pause point, version to install, state persisted at the kill, final, running)
    ("Fetching mid-download", "fetch:half", "2", "Fetching", "Committed", "2"),
    ("Staging", "enter:Staging", "2", "Staging", "Committed", "2"),
    ("HealthCheck after the pointer swap", "serve:2", "2", "HealthCheck", "Committed", "2"),
    ("Committed before the report", "enter:Committed", "2", "Committed", "Committed", "2"),
    ("RolledBack after a failed health check", "enter:RolledBack", "3", "RolledBack",
     "RolledBack", "1"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "pause", "version", "died_in", "final", "running"), SCENARIOS,
                         ids=[s[0] for s in SCENARIOS])
def test_sigkill_then_resume(installed: Path, repo: Path, tmp_path: Path, name: str,
                             pause: str, version: str, died_in: str, final: str,
                             running: str) -> None:
    from agent.updater.records import StateStore
    from agent.updater.slots import ModelStore

    base = tmp_path / "device"
    shutil.copytree(installed, base, symlinks=True)
    data = base / "data"
    update_id = "2/clf"

    child = Child(config(base, repo, start=version, sequence=2, pause=pause))
    assert child.line() == f"PAUSED {pause}"
    child.kill9()

    store = StateStore.in_dir(data)
    rec = store.load()
    assert rec is not None and rec.update_id == update_id and rec.state.value == died_in
    assert not rec.finished
    if pause == "serve:2":  # the pointer was swapped before the process died
        assert ModelStore(data).current("clf") == "2"
    assert [r["update_id"] for r in reports(base)] == ["1/clf"]

    assert Child(config(base, repo)).finish() == f"DONE {final}"

    rec = store.load()
    assert rec is not None and rec.finished and rec.state.value == final
    models = ModelStore(data)
    assert models.current("clf") == running and models.is_complete("clf", running)
    current = data / "models" / "clf" / "current"
    assert current.is_symlink() and current.resolve() == (current.parent / running).resolve()
    assert sorted(p.name for p in (current.resolve()).iterdir()) == ["manifest.json",
                                                                     "model.onnx"]
    sent = [r for r in reports(base) if r["update_id"] == update_id]
    assert len(sent) == 1, sent
    assert sent[0]["state"] == final
    assert sent[0]["running"][0]["version"] == running
    # serving got the checked session (checked again by the resumed child when the first died
    # before its activation); a version whose check failed never served at all
    serving = (base / "serving").read_text().splitlines()
    assert serving[0] == "1 handed", serving  # the install of version 1 (the fixture)
    if final == "Committed":
        assert serving[-1] == "2 handed", serving
    else:
        assert serving == ["1 handed"], serving
    if final == "RolledBack":
        assert "HealthCheckFailed" in sent[0]["last_error"]
        assert "differs from the golden output" in sent[0]["last_error"]
    # nothing left over: no staged leftovers, no downloads
    assert not [p for p in current.parent.iterdir() if p.name.startswith(".")]
    assert not [p for p in (data / "downloads").rglob("*") if p.is_file()]
    store.close()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "child":
        child_main(json.loads(sys.argv[2]))
    else:  # pragma: no cover
        raise SystemExit("usage: test_updater_kill9.py child CONFIG_JSON")

"""Plumbing for ``scripts/demo.py``: print-then-run commands, child processes, bounded waits,
and the few pure readings of server answers the demo prints.

The plumbing knows nothing about fleets: it runs commands the way a person would type them
(printing each one first, so the demo's output doubles as a tutorial), keeps the long-running
children (server, agents) in one place so they are always stopped, and waits on observable state
with a deadline. The pure readings of the server's answers (tested in
``tests/test_demo_lib.py``): :func:`rollout_line` turns a rollout's status into one line,
:func:`drift_windows` takes each device's per-window PSI out of the server's drift view and
:func:`drift_line` prints them, :func:`alert_devices` names who an alert is about. Stdlib only
(numpy is imported lazily by :func:`failing_copy`); the demo itself asks the server, through
``FleetClient`` and the CLI.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

__all__ = [
    "Children",
    "DemoError",
    "Shell",
    "alert_devices",
    "banner",
    "drift_line",
    "drift_windows",
    "failing_copy",
    "free_port",
    "http_answer",
    "http_ok",
    "note",
    "rollout_line",
    "stop_stale",
    "tail",
    "wait_for",
]

T = TypeVar("T")

BOLD, DIM, RESET = ("\033[1m", "\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "", "")


class DemoError(Exception):
    """A demo step failed; ``log`` is the file whose tail explains it (if any)."""

    def __init__(self, message: str, log: Path | None = None, output: str = "") -> None:
        super().__init__(message)
        self.log, self.output = log, output


def banner(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def note(text: str) -> None:
    print(text, flush=True)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror or exc})"
    return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the redirect itself is the answer


def http_answer(url: str, timeout: float = 2.0) -> tuple[int, str] | None:
    """``GET url`` without following a redirect: its status and ``Location`` header (empty
    when it has none), or None when nothing answers."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=timeout) as resp:
            return int(resp.status), str(resp.headers.get("Location") or "")
    except urllib.error.HTTPError as exc:
        return int(exc.code), str(exc.headers.get("Location") or "")
    except (OSError, ValueError):
        return None


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float,
             interval: float = 0.25, alive: Callable[[], None] | None = None,
             log: Path | None = None) -> T:
    """Poll ``check`` until it returns something truthy; ``alive`` raises if a child died.

    Raises:
        DemoError: the deadline passed (names ``what`` and ``log``).
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}", log)
        time.sleep(interval)


@dataclass
class Shell:
    """Runs commands in ``cwd`` with ``env``, printing each as ``$ command`` first.

    ``sys.executable`` is shown as ``python`` and paths relative to ``cwd``, so the printed
    line is what a reader types in a shell with the venv activated.
    """

    cwd: Path
    env: dict[str, str]
    max_lines: int = 12

    def display(self, args: Sequence[str], shown: Mapping[int, str] | None = None,
                width: int = 96) -> str:
        """The command as a reader would type it, wrapped with ``\\`` before an option
        once a line would pass ``width`` characters."""
        words = []
        for i, a in enumerate(args):
            if shown and i in shown:
                words.append(shown[i])  # already shell-quoted by the caller
            elif a == sys.executable:
                words.append("python")
            else:
                words.append(shlex.quote(a))
        # an option and its value stay together on one line
        groups: list[str] = []
        for word in words:
            if groups and not word.startswith("-") and groups[-1].startswith("-") \
                    and " " not in groups[-1]:
                groups[-1] += " " + word
            else:
                groups.append(word)
        lines = [groups[0]]
        for group in groups[1:]:
            if group.startswith("-") and len(lines[-1]) + 1 + len(group) > width - 2:
                lines.append("    " + group)
            else:
                lines[-1] += " " + group
        return " \\\n".join(lines)

    def run(self, args: Sequence[str], *, show_output: bool | int = True,
            shown: Mapping[int, str] | None = None, timeout: float = 120.0,
            check: bool = True, width: int = 150) -> subprocess.CompletedProcess[str]:
        """Print the command, run it, print (up to ``max_lines`` of) its stdout, each line cut
        at ``width`` characters.

        Raises:
            DemoError: non-zero exit (with its output) or a timeout.
        """
        print(f"$ {self.display(args, shown)}", flush=True)
        try:
            done = subprocess.run(list(args), cwd=self.cwd, env=self.env, text=True,
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"command timed out after {timeout:.0f}s: "
                            f"{self.display(args, shown)}") from exc
        if check and done.returncode != 0:
            raise DemoError(f"command failed (exit {done.returncode}): "
                            f"{self.display(args, shown)}",
                            output=(done.stdout + done.stderr).strip())
        if show_output:
            limit = self.max_lines if show_output is True else int(show_output)
            self.echo(done.stdout, limit, width)
        return done

    @staticmethod
    def echo(text: str, limit: int, width: int = 150) -> None:
        """Print ``text`` indented: at most ``limit`` lines, each cut at ``width`` chars."""
        lines = text.rstrip("\n").splitlines()
        for line in lines[:limit]:
            print(f"  {line if len(line) <= width else line[:width - 3] + '...'}")
        if len(lines) > limit:
            print(f"  {DIM}... ({len(lines) - limit} more lines){RESET}")
        sys.stdout.flush()


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    handle: IO[bytes]


@dataclass
class Children:
    """The long-running processes the demo started: started once, always stopped once.

    Each child gets its own session (so a Ctrl-C in the terminal reaches only the demo, which
    then stops them in order) and its stdout+stderr in a log file. ``pids_file`` lists
    ``name pid log`` per child.
    """

    shell: Shell
    pids_file: Path
    children: list[Child] = field(default_factory=list)
    kept: bool = False

    def __post_init__(self) -> None:
        atexit.register(self.stop_all)

    def start(self, name: str, args: Sequence[str], log: Path) -> Child:
        print(f"$ {self.shell.display(args)} > {os.path.relpath(log, self.shell.cwd)} 2>&1 &",
              flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        handle = log.open("wb")
        try:
            proc = subprocess.Popen(list(args), cwd=self.shell.cwd, env=self.shell.env,
                                    stdin=subprocess.DEVNULL, stdout=handle,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        except BaseException:
            handle.close()
            raise
        child = Child(name, proc, log, handle)
        self.children.append(child)
        self._write_pids()
        return child

    def check_alive(self, child: Child) -> None:
        code = child.proc.poll()
        if code is not None:
            raise DemoError(f"{child.name} exited early (exit {code})", child.log)

    def check_all_alive(self) -> None:
        for child in self.children:
            self.check_alive(child)

    def _write_pids(self) -> None:
        self.pids_file.parent.mkdir(parents=True, exist_ok=True)
        self.pids_file.write_text("".join(
            f"{c.name} {c.proc.pid} {os.path.relpath(c.log, self.shell.cwd)}\n"
            for c in self.children), encoding="utf-8")

    def keep(self) -> None:
        """Leave every child running when the demo exits."""
        self.kept = True
        for child in self.children:
            child.handle.close()

    def stop_all(self, timeout: float = 10.0) -> list[str]:
        """SIGTERM every child (agents first, then the server), wait up to ``timeout`` in all,
        then SIGKILL what is left. Idempotent; does nothing after :meth:`keep`.

        Returns:
            One line per child: how it stopped.
        """
        if self.kept:
            return []
        report = []
        live = [c for c in reversed(self.children) if c.proc.poll() is None]
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in live:
            try:
                code = child.proc.wait(max(0.1, deadline - time.monotonic()))
                # uvicorn shuts down gracefully, then re-raises the signal: -15 is normal
                how = "exit 0" if code == 0 else (
                    "ended by the signal" if code == -signal.SIGTERM else f"exit {code}")
                report.append(f"{child.name} (pid {child.proc.pid}) stopped on SIGTERM ({how})")
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait(5)
                report.append(f"{child.name} (pid {child.proc.pid}) did not stop within "
                              f"{timeout:.0f}s: killed")
        for child in self.children:
            child.handle.close()
        self.children.clear()
        with contextlib.suppress(OSError):
            self.pids_file.unlink()
        return report


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def stop_stale(pids_file: Path, out_dir: Path, timeout: float = 10.0) -> list[str]:
    """Stop the children a previous ``--keep`` run left, listed in ``pids_file``.

    Only a pid whose command line is still one of ours (``-m fleet_server serve`` or
    ``-m agent run`` with a path inside ``out_dir``) is signalled: a pid reused by an
    unrelated process is left alone.
    """
    try:
        lines = pids_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    out = str(out_dir.resolve())
    stopped: list[int] = []
    for line in reversed(lines):  # agents first, the server last
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        argv = _cmdline(pid)
        try:
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except OSError:
            continue
        ours = ("fleet_server" in argv or "agent" in argv) and any(
            str((cwd / a).resolve()).startswith(out) for a in argv[1:] if "/" in a)
        if ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
                stopped.append(pid)
    deadline = time.monotonic() + timeout
    for pid in stopped:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return [f"stopped pid {pid} left running by an earlier --keep run" for pid in stopped]


def failing_copy(src: Path, dst: Path, version: str) -> list[str]:
    """Copy bundle directory ``src`` to ``dst`` as ``version``, with every float32 golden output
    ``p`` replaced by ``1 - p``: a build whose on-device health check must fail.

    The model file, its sha256 and length are untouched, so the copy still passes every
    server-side check; only the device's health check (which re-runs the golden inputs and
    compares) can notice. ``tests/integration/test_rollout_e2e.py`` builds its failing version
    the same way. Nothing is written when ``src`` cannot be changed so; ``manifest.json`` is
    replaced atomically.

    Returns:
        The names of the outputs changed.

    Raises:
        ValueError: ``src`` holds no float32 golden output to change.
    """
    import numpy as np

    manifest: dict[str, Any] = json.loads((src / "manifest.json").read_text(encoding="utf-8"))
    manifest["model"]["version"] = version
    changed = []
    for name, tensor in manifest["golden"]["outputs"].items():
        if tensor["dtype"] == "float32":
            raw = np.frombuffer(base64.b64decode(tensor["b64"]), np.float32)
            tensor["b64"] = base64.b64encode((1.0 - raw).astype(np.float32).tobytes()).decode()
            changed.append(name)
    if not changed:
        raise ValueError(f"{src / 'manifest.json'}: expected a float32 golden output, got "
                         f"{sorted(manifest['golden']['outputs'])}")
    shutil.copytree(src, dst)
    manifest_path = dst / "manifest.json"
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return changed


# ------------------------------------------------------------------------ rollout progress

_HEALTH_GATES = {"error_rate": "error rate", "p95_ms": "p95 ms", "psi": "PSI"}


def _num(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "-"


def _gate_text(gate: Mapping[str, Any]) -> str | None:
    """One gate of the latest evaluation, compactly; None for what the counts already say."""
    name, ok, value, limit = gate.get("gate"), gate.get("ok"), gate.get("value"), gate.get("limit")
    if name in ("failed", "committed"):
        return None if ok is not False else f"FAILED: {gate.get('detail')}"
    if name == "bake":
        return f"baked {_num(limit)}s" if ok else f"baking {_num(value)}s of {_num(limit)}s"
    label = _HEALTH_GATES.get(str(name), str(name))
    if value is None:
        return f"{label} waits for samples"
    verdict = "ok" if ok is True else "FAILED" if ok is False else "judged after the bake"
    return f"{label} {_num(value)} (limit {_num(limit)}) {verdict}"


def rollout_line(rollout: Mapping[str, Any]) -> str:
    """A rollout's progress in one line, from the body of ``GET /v1/rollouts/{id}`` (what
    ``fleet_server rollout status ID --json`` prints): the current wave, the device counts
    of every wave so far and the current wave's latest gate evaluation.

    A finished rollout shows its reason or, completed, its last gate evaluation. Examples:
    ``wave 1/2 (20%): 1 moved, 1 committed | baking 2s of 3s, p95 ms waits for samples``,
    ``rolled_back: 1 moved, 1 failed | wave 0 gate failed: 1 of 1 devices failed``.
    """
    waves = rollout.get("waves") or []
    totals = {k: sum(int(w.get(k) or 0) for w in waves)
              for k in ("assigned", "committed", "failed", "pending", "reverted")}
    counts = ", ".join([f"{totals['assigned']} moved"]
                       + [f"{totals[k]} {k}" for k in ("committed", "failed", "pending",
                                                       "reverted") if totals[k]])
    status = rollout.get("status")
    wave = int(rollout.get("wave") or 0)
    gates = [text for g in rollout.get("gates") or () if g.get("wave") == wave
             for text in [_gate_text(g)] if text]
    if status == "running":
        target = next((w.get("target") for w in waves if w.get("index") == wave), None)
        head = f"wave {wave + 1}/{rollout.get('wave_count') or '?'}" + (
            f" ({target})" if target else "")
    else:
        head = str(status)
        reason = rollout.get("reason")
        if reason or status != "completed":
            gates = [str(reason or "no reason given")]
    return f"{head}: {counts}" + (f" | {', '.join(gates)}" if gates else "")


# --------------------------------------------------------------------------- drift on the server

def drift_windows(view: Mapping[str, Any], device_id: str) -> list[float]:
    """The max PSI of each drift window ``device_id`` sent, oldest first, from the server's
    drift view: the body of ``GET /v1/monitoring/models/{model}/drift``
    (``FleetClient.monitor_drift``, what ``fleet_server monitor drift --json`` prints).

    The view has no per-window rows: per time bucket it gives each device's largest PSI and
    how many windows it folded. Asked with buckets small enough that each holds at most one
    window of the device (the demo asks for 1 s buckets and lets a second pass between two
    windows), a bucket's value is that one window's own. A bucket holding several would hide
    all but the largest, so this refuses it rather than pass off a maximum as every window.

    Raises:
        ValueError: a bucket holds more than one window of ``device_id``.
    """
    out: list[float] = []
    for bucket in view.get("buckets") or ():
        for row in bucket.get("devices") or ():
            if row.get("device") != device_id or row.get("max_psi") is None:
                continue
            if int(row.get("windows") or 0) != 1:
                raise ValueError(f"drift view bucket {bucket.get('start')} of "
                                 f"{view.get('bucket_s')} s: expected at most one window of "
                                 f"{device_id}, got {row.get('windows')}; ask for smaller "
                                 "buckets")
            out.append(float(row["max_psi"]))
    return out


def drift_line(device_id: str, values: Sequence[float], threshold: float, *,
               shifted_from: int | None = None) -> str:
    """One device's drift windows, oldest first, as the server has them: the max PSI of each
    (``*`` after a value: a window from index ``shifted_from`` on, sent after the inputs
    shifted) and a verdict on the latest against ``threshold`` (the alert rule's)."""
    if not values:
        return f"{device_id}: no drift window yet"
    shown = ", ".join(f"{v:.3g}" + ("*" if shifted_from is not None and i >= shifted_from
                                    else "") for i, v in enumerate(values))
    last = values[-1]
    verdict = (f"OVER the alert threshold: {last:.3g} > {threshold:g}" if last > threshold
               else f"ok: {last:.3g} <= {threshold:g}")
    return f"{device_id}: {len(values)} window(s), max PSI each: {shown} -> {verdict}"


def alert_devices(alert: Mapping[str, Any]) -> list[str]:
    """The devices an alert (a row of ``GET /v1/alerts``) says are over its threshold, worst
    first."""
    return [str(b.get("device")) for b in alert.get("devices") or ()]

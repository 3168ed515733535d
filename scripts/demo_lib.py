"""Plumbing for ``scripts/demo.py``: print-then-run commands, child processes, bounded waits.

Nothing here knows about fleets: it runs commands the way a person would type them (printing
each one first, so the demo's output doubles as a tutorial), keeps the long-running children
(server, agents) in one place so they are always stopped, and waits on observable state with a
deadline. Stdlib only (numpy is imported lazily by :func:`corrupt_golden_outputs`).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import os
import shlex
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
    "banner",
    "corrupt_golden_outputs",
    "free_port",
    "http_ok",
    "note",
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
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Print the command, run it, print (up to ``max_lines`` of) its stdout.

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
            self.echo(done.stdout, limit)
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


def corrupt_golden_outputs(manifest_path: Path) -> list[str]:
    """Replace every float32 golden output ``p`` by ``1 - p`` in a bundle's manifest.json.

    The model file, its sha256 and length are untouched, so the bundle still passes every
    server-side check; only the on-device health check (which re-runs the golden inputs and
    compares) can notice. This is what ``tests/integration/test_end_to_end.py`` does.

    Returns:
        The names of the outputs changed.
    """
    import numpy as np

    manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
    changed = []
    for name, tensor in manifest["golden"]["outputs"].items():
        if tensor["dtype"] == "float32":
            raw = np.frombuffer(base64.b64decode(tensor["b64"]), np.float32)
            tensor["b64"] = base64.b64encode((1.0 - raw).astype(np.float32).tobytes()).decode()
            changed.append(name)
    tmp = manifest_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, manifest_path)
    return changed

"""The isolated TFLite converter environment: a venv with TensorFlow and onnx2tf, made on demand.

TensorFlow 2.21 and onnx2tf 1.28.8 bring their own numpy, protobuf and onnx constraints, and
weigh ~600 MB to download (2.3 GB installed); none of that may reach the main stack (the agent
must stay light, and onnxruntime's quantizer must keep its own pins). So they live in a venv of
their own, created by ``model_tools setup tflite`` (:func:`create_env`) and only ever *executed*
by this package, as a subprocess (:mod:`model_tools.tflite.worker`).

Where it lives (:func:`resolve_location`), first match wins:

1. an explicit path (``--tflite-env DIR``);
2. ``$EDGEFLEET_TFLITE_ENV``;
3. ``$XDG_CACHE_HOME/edgefleet/tflite-env-<digest>`` (``~/.cache`` when unset), where the digest
   covers :data:`PINS`, the Python version and the machine: a changed pin set gets a new
   directory, and the old one is never used by mistake.

The pins are also recorded in the environment (:data:`MARKER`); an environment whose recorded
pins differ from :data:`PINS` (possible at an explicit location) is refused with the command
that rebuilds it.

Creation is atomic: the venv is built in a sibling ``.<name>.tmp-<pid>-*`` directory, checked
(every pinned import works, ``onnxsim`` is on its ``bin/``), stamped with the marker and only
then renamed into place. A venv's scripts carry its absolute path in their shebangs, so they
are rewritten to the final path before the rename. A half-built environment (a crash, a failed
``pip install``) has no marker and never sits at the final path, so it is never used; the next
:func:`create_env` deletes the temporary directories of builders that are no longer running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import venv
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from model_tools.errors import ConverterEnvError

__all__ = [
    "ENV_VAR",
    "MARKER",
    "PINS",
    "SETUP_COMMAND",
    "Builder",
    "ConverterEnv",
    "create_env",
    "default_location",
    "find_env",
    "pins_digest",
    "pip_builder",
    "resolve_location",
]

#: exact versions that co-install on Python 3.11 (checked with ``pip install --dry-run``):
#: TensorFlow and onnx2tf, plus everything onnx2tf imports or runs (``onnxsim`` as a program)
PINS: tuple[str, ...] = (
    "tensorflow==2.21.0",
    "tf-keras==2.21.0",
    "onnx2tf==1.28.8",
    "onnx==1.23.2",
    "onnxruntime==1.31.1",
    "onnxsim==0.8.1",
    "onnx_graphsurgeon==0.6.1",
    "sng4onnx==2.0.1",
    "sne4onnx==2.0.1",
    "ai-edge-litert==2.3.0",
    "psutil==7.2.2",
    "h5py==3.14.0",
    "flatbuffers==25.12.19",
    "ml_dtypes==0.6.0",
    "protobuf==7.36.2",
    "numpy==2.4.6",
    "requests==2.34.2",
)
ENV_VAR = "EDGEFLEET_TFLITE_ENV"
MARKER = "edgefleet-tflite-env.json"
SETUP_COMMAND = "model_tools setup tflite"
#: what the environment must be able to import before it is published
_SMOKE_IMPORTS = ("tensorflow", "tf_keras", "onnx2tf", "onnx", "onnxsim", "onnx_graphsurgeon",
                  "sng4onnx", "ai_edge_litert.interpreter", "psutil", "numpy")
_LOG = "setup.log"

Progress = Callable[[str], None]
#: populates an empty directory into a working venv with ``pins`` installed (a seam for tests)
Builder = Callable[[Path, Sequence[str], Progress], None]


def pins_digest(pins: Sequence[str] = PINS) -> str:
    """12 hex digits over the pins, the Python version and the machine (venvs are neither
    portable across Python versions nor across architectures)."""
    text = "\n".join([*sorted(pins), f"python {sys.version_info[0]}.{sys.version_info[1]}",
                      f"machine {platform.machine()}"])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_location(environ: Mapping[str, str] | None = None,
                     pins: Sequence[str] = PINS) -> Path:
    """``$XDG_CACHE_HOME/edgefleet/tflite-env-<digest>`` (``~/.cache`` when unset)."""
    env = os.environ if environ is None else environ
    cache = Path(env["XDG_CACHE_HOME"]) if env.get("XDG_CACHE_HOME") else (
        Path.home() / ".cache")
    return cache / "edgefleet" / f"tflite-env-{pins_digest(pins)}"


def resolve_location(explicit: Path | None = None, environ: Mapping[str, str] | None = None,
                     pins: Sequence[str] = PINS) -> Path:
    """Where the environment is: ``explicit``, else ``$EDGEFLEET_TFLITE_ENV``, else the cache."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return Path(explicit).absolute()
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR]).absolute()
    return default_location(env, pins).absolute()


def _setup_hint(location: Path, environ: Mapping[str, str] | None = None,
                force: bool = False) -> str:
    """The exact command that (re)creates the environment at ``location``."""
    cmd = SETUP_COMMAND
    if location != default_location(environ).absolute():
        cmd += f" --tflite-env {location}"
    return cmd + (" --force" if force else "")


@dataclass(frozen=True)
class ConverterEnv:
    """A complete, checked converter environment."""

    root: Path
    pins: tuple[str, ...]
    python_version: str

    @property
    def bin_dir(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin_dir / "python"

    def subprocess_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment variables a converter subprocess runs with.

        The venv's ``bin/`` comes first on ``PATH``: onnx2tf runs ``onnxsim`` as a program found
        on ``PATH``, and silently skips the simplification when it is not there. Nothing of this
        process's Python setup leaks in (``PYTHONPATH``, ``PYTHONHOME``, another venv), and
        TensorFlow's C++ logging is kept to errors.
        """
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
        rest = env.get("PATH", "")
        env["PATH"] = str(self.bin_dir) + (os.pathsep + rest if rest else "")
        env["VIRTUAL_ENV"] = str(self.root)
        env["PYTHONNOUSERSITE"] = "1"
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        return env


def _read_marker(location: Path) -> dict[str, object] | None:
    try:
        data = json.loads((location / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_env(location: Path, pins: Sequence[str] = PINS,
             environ: Mapping[str, str] | None = None) -> ConverterEnv:
    """The complete environment at ``location``, built for exactly ``pins``.

    Raises:
        ConverterEnvError: nothing there, not a finished environment (no marker: never used,
            whatever else is in it), built for other pins, or its python is gone. The message
            gives the exact command that fixes it.
    """
    location = Path(location).absolute()
    if not location.exists():
        raise ConverterEnvError(
            f"the TFLite converter environment (TensorFlow {_pin(pins, 'tensorflow')}, onnx2tf "
            f"{_pin(pins, 'onnx2tf')}) is not set up: expected it at {location}; create it "
            f"once with: {_setup_hint(location, environ)}")
    marker = _read_marker(location)
    if marker is None:
        if not _is_venv(location):
            raise ConverterEnvError(
                f"{location} is not a TFLite converter environment (no {MARKER}, not a venv); "
                f"point --tflite-env or ${ENV_VAR} elsewhere, or remove it and run: "
                f"{_setup_hint(location, environ)}")
        raise ConverterEnvError(
            f"{location} is not a finished TFLite converter environment (no readable {MARKER}: "
            f"an interrupted setup?); rebuild it with: "
            f"{_setup_hint(location, environ, force=True)}")
    recorded = marker.get("pins")
    if not isinstance(recorded, list) or sorted(recorded) != sorted(pins):
        have = sorted(recorded) if isinstance(recorded, list) else recorded
        changed = sorted(set(pins) - set(have)) if isinstance(have, list) else list(pins)
        raise ConverterEnvError(
            f"the TFLite converter environment at {location} was built for other pins "
            f"(expected {', '.join(changed)} among them, it has {have}); rebuild it with: "
            f"{_setup_hint(location, environ, force=True)}")
    env = ConverterEnv(root=location, pins=tuple(pins),
                       python_version=str(marker.get("python", "")))
    if not os.access(env.python, os.X_OK):
        raise ConverterEnvError(
            f"the TFLite converter environment at {location} has no runnable {env.python} "
            "(was its base Python removed?); rebuild it with: "
            f"{_setup_hint(location, environ, force=True)}")
    return env


def _is_venv(path: Path) -> bool:
    return (path / "pyvenv.cfg").is_file()


def _pin(pins: Sequence[str], name: str) -> str:
    return next((p.split("==", 1)[1] for p in pins if p.startswith(name + "==")), "?")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def pip_builder(target: Path, pins: Sequence[str], progress: Progress) -> None:
    """The real :data:`Builder`: ``venv`` with pip, ``pip install`` the pins, import them all.

    pip reads its usual configuration (index, find-links, certificates) from this process's
    environment. Its output goes to ``<target>/setup.log``; the last lines are in the error.

    Raises:
        ConverterEnvError: venv creation, ``pip install`` or the import check failed.
    """
    progress(f"creating a venv in {target}")
    try:
        venv.EnvBuilder(with_pip=True, symlinks=os.name != "nt", clear=False).create(target)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ConverterEnvError(f"cannot create a venv at {target}: {exc}") from exc
    python = target / "bin" / "python"
    env = ConverterEnv(target, tuple(pins), "").subprocess_env()
    log = target / _LOG
    steps = [
        (f"installing {len(pins)} pinned packages (TensorFlow, onnx2tf...: ~600 MB download)",
         [str(python), "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
          "--no-warn-script-location", *pins]),
        ("checking that every pinned package imports",
         [str(python), "-I", "-c", "import " + ", ".join(_SMOKE_IMPORTS)]),
    ]
    for label, cmd in steps:
        progress(label)
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            try:
                code = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                      check=False).returncode
            except OSError as exc:
                raise ConverterEnvError(f"cannot run {cmd[0]}: {exc}") from exc
        if code != 0:
            raise ConverterEnvError(
                f"{label} failed (exit {code}) while building the TFLite converter "
                f"environment; last lines of the log:\n{_tail(log)}")
    if not (target / "bin" / "onnxsim").is_file():
        raise ConverterEnvError(f"the onnxsim program is missing from {target / 'bin'} after "
                                "installing onnxsim; onnx2tf needs it on PATH")


def _relocate(tmp: Path, final: Path) -> None:
    """Point the venv's text files (script shebangs, activate scripts, pyvenv.cfg) at ``final``.

    Only ``bin/`` and ``pyvenv.cfg`` name the venv's own path; symlinks and binaries are left
    alone.
    """
    old, new = str(tmp).encode(), str(final).encode()
    files = [p for p in (tmp / "bin").iterdir() if p.is_file() and not p.is_symlink()]
    files.append(tmp / "pyvenv.cfg")
    for path in files:
        if not path.is_file():
            continue
        data = path.read_bytes()
        if old not in data or b"\0" in data[:4096]:
            continue
        mode = path.stat().st_mode
        path.write_bytes(data.replace(old, new))
        os.chmod(path, mode)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(location: Path) -> None:
    """Delete ``.<name>.tmp-<pid>-*`` directories whose builder process is gone."""
    prefix = f".{location.name}.tmp-"
    if not location.parent.is_dir():
        return
    for path in location.parent.iterdir():
        if not path.name.startswith(prefix):
            continue
        pid_text = path.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(path, ignore_errors=True)


def create_env(location: Path, pins: Sequence[str] = PINS, *, force: bool = False,
               progress: Progress = lambda _msg: None, builder: Builder = pip_builder,
               now: dt.datetime | None = None) -> ConverterEnv:
    """Build the converter environment at ``location`` atomically and return it.

    An existing complete environment for the same pins is returned as it is, unless ``force``.
    With ``force`` the new environment replaces the old one (any venv: an unfinished one, or
    one for other pins) only once it is complete. A directory that is not a venv is never
    replaced.

    Raises:
        ConverterEnvError: ``location`` holds something else (a venv for other pins without
            ``force``, or anything that is not a venv), or building failed; nothing at
            ``location`` changed.
    """
    location = Path(location).absolute()
    pins = tuple(pins)
    if location.exists():
        if not force:
            with contextlib.suppress(ConverterEnvError):
                return find_env(location, pins)
        if location.is_dir() and not any(location.iterdir()):
            location.rmdir()
        elif not (location.is_dir() and _is_venv(location)):
            raise ConverterEnvError(
                f"{location} exists and is not a venv; refusing to replace it: choose another "
                f"--tflite-env, or remove it first")
        elif not force:
            raise ConverterEnvError(
                f"{location} is not a TFLite converter environment for these pins; replace "
                f"it with: {_setup_hint(location, force=True)}")
    location.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(location)
    tmp = Path(tempfile.mkdtemp(prefix=f".{location.name}.tmp-{os.getpid()}-",
                                dir=location.parent))
    old: Path | None = None
    try:
        builder(tmp, pins, progress)
        if not os.access(tmp / "bin" / "python", os.X_OK):
            raise ConverterEnvError(f"building the environment left no runnable "
                                    f"{tmp / 'bin' / 'python'}")
        _relocate(tmp, location)
        stamp = (now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds")
        marker = {"schema_version": 1, "pins": list(pins), "digest": pins_digest(pins),
                  "python": platform.python_version(), "machine": platform.machine(),
                  "created_at": stamp}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        if location.exists():
            old = location.parent / f".{location.name}.old-{os.getpid()}"
            os.replace(location, old)
        try:
            os.replace(tmp, location)
        except OSError:
            if old is None and location.exists():  # another builder won the race: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return find_env(location, pins)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not location.exists():
            os.replace(old, location)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    progress(f"TFLite converter environment ready at {location}")
    return find_env(location, pins)

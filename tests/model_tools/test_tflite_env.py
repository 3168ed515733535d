"""The isolated TFLite converter environment: where it lives, atomic creation, clear refusals.

A fake builder stands in for ``pip install`` (seconds instead of a 600 MB download): it writes
what a venv writes that matters here (``pyvenv.cfg``, ``bin/python``, a console script whose
shebang names the build directory). The real builder runs in test_tflite_convert.py's session
fixture and in CI's ``model_tools setup tflite``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner

from model_tools.cli import cli
from model_tools.errors import ConverterEnvError
from model_tools.tflite.env import (
    ENV_VAR,
    MARKER,
    PINS,
    SETUP_COMMAND,
    create_env,
    default_location,
    find_env,
    pins_digest,
    resolve_location,
)

ROOT = Path(__file__).resolve().parents[2]


def fake_builder(target: Path, pins: Sequence[str], progress: object) -> None:
    """A venv's skeleton: enough for find_env, relocation and PATH checks."""
    (target / "bin").mkdir()
    (target / "pyvenv.cfg").write_text(f"home = /usr/bin\ncommand = python -m venv {target}\n")
    (target / "bin" / "python").symlink_to(sys.executable)
    script = target / "bin" / "onnxsim"
    script.write_text(f"#!{target}/bin/python\nprint('onnxsim')\n")
    script.chmod(0o755)
    (target / "pins.txt").write_text("\n".join(pins))


def failing_builder(target: Path, pins: Sequence[str], progress: object) -> None:
    fake_builder(target, pins, progress)
    raise ConverterEnvError("pip install failed (exit 1) while building")


def test_location_explicit_then_env_var_then_cache(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    default = tmp_path / "cache" / "edgefleet" / f"tflite-env-{pins_digest()}"
    assert resolve_location(None, env) == default
    assert resolve_location(None, {**env, ENV_VAR: str(tmp_path / "ci")}) == tmp_path / "ci"
    assert resolve_location(tmp_path / "x", {**env, ENV_VAR: str(tmp_path / "ci")}) == (
        tmp_path / "x")
    assert default_location({"HOME": "/nowhere"}).name == f"tflite-env-{pins_digest()}"


def test_a_changed_pin_set_gets_a_new_default_location(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    bumped = tuple(p.replace("onnx2tf==1.28.8", "onnx2tf==1.28.9") for p in PINS)
    assert bumped != PINS
    assert pins_digest(bumped) != pins_digest(PINS)
    assert default_location(env, bumped) != default_location(env, PINS)
    assert pins_digest(tuple(reversed(PINS))) == pins_digest(PINS)  # order does not matter


def test_missing_environment_names_the_exact_setup_command(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    with pytest.raises(ConverterEnvError) as info:
        find_env(default_location(env), environ=env)
    text = str(info.value)
    assert text.endswith(f"create it once with: {SETUP_COMMAND}")
    assert "tensorflow" in text.lower() and "onnx2tf" in text
    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(ConverterEnvError) as info:
        find_env(elsewhere, environ=env)
    assert str(info.value).endswith(f"{SETUP_COMMAND} --tflite-env {elsewhere}")


def test_create_is_atomic_and_relocates_scripts(tmp_path: Path) -> None:
    location = tmp_path / "envs" / "tflite"
    seen: list[str] = []
    env = create_env(location, builder=fake_builder, progress=seen.append)
    assert env.root == location and env.python == location / "bin" / "python"
    assert sorted(p.name for p in location.parent.iterdir()) == ["tflite"]  # no temp left
    marker = json.loads((location / MARKER).read_text())
    assert marker["pins"] == list(PINS) and marker["digest"] == pins_digest()
    shebang = (location / "bin" / "onnxsim").read_text().splitlines()[0]
    assert shebang == f"#!{location}/bin/python"
    assert os.access(location / "bin" / "onnxsim", os.X_OK)
    assert str(location) in (location / "pyvenv.cfg").read_text()
    run = subprocess.run([str(location / "bin" / "onnxsim")], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip() == "onnxsim"  # the rewritten shebang runs
    assert find_env(location) == env
    assert any("ready" in m for m in seen)


def test_a_complete_environment_is_reused_not_rebuilt(tmp_path: Path) -> None:
    location = tmp_path / "env"
    first = create_env(location, builder=fake_builder)

    def must_not_build(*_args: object) -> None:
        raise AssertionError("rebuilt a complete environment")

    assert create_env(location, builder=must_not_build) == first


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    location = tmp_path / "env"
    with pytest.raises(ConverterEnvError, match="pip install failed"):
        create_env(location, builder=failing_builder)
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_once_the_new_one_is_complete(tmp_path: Path) -> None:
    location = tmp_path / "env"
    create_env(location, builder=fake_builder)
    stamp = (location / MARKER).read_bytes()
    with pytest.raises(ConverterEnvError):
        create_env(location, builder=failing_builder, force=True)
    assert (location / MARKER).read_bytes() == stamp  # the old one is intact and usable
    find_env(location)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["env"]


def test_a_half_built_environment_is_never_used(tmp_path: Path) -> None:
    """A builder killed mid-way leaves a venv without the marker: refused, and rebuildable."""
    location = tmp_path / "env"
    fake_builder_dir = location
    fake_builder_dir.mkdir()
    fake_builder(fake_builder_dir, PINS, None)  # everything but the marker
    with pytest.raises(ConverterEnvError) as info:
        find_env(location)
    assert "not a finished" in str(info.value)
    assert str(info.value).endswith(f"--tflite-env {location} --force")
    with pytest.raises(ConverterEnvError, match="--force"):
        create_env(location, builder=fake_builder)
    create_env(location, builder=fake_builder, force=True)
    find_env(location)


def test_stale_build_directories_of_dead_builders_are_removed(tmp_path: Path) -> None:
    location = tmp_path / "env"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f".env.tmp-{dead}-abc"
    live = tmp_path / f".env.tmp-{os.getpid()}-xyz"  # a builder still running (this one)
    stale.mkdir()
    live.mkdir()
    create_env(location, builder=fake_builder)
    assert not stale.exists() and live.exists()


def test_other_pins_are_refused_with_the_rebuild_command(tmp_path: Path) -> None:
    location = tmp_path / "env"
    create_env(location, builder=fake_builder)
    bumped = tuple(p.replace("tensorflow==2.21.0", "tensorflow==2.22.0") for p in PINS)
    with pytest.raises(ConverterEnvError) as info:
        find_env(location, bumped)
    assert "tensorflow==2.22.0" in str(info.value) and "--force" in str(info.value)
    create_env(location, bumped, builder=fake_builder, force=True)
    assert find_env(location, bumped).pins == bumped


def test_a_directory_that_is_not_a_venv_is_never_replaced(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(ConverterEnvError, match="not a venv"):
        create_env(precious, builder=fake_builder, force=True)
    with pytest.raises(ConverterEnvError, match="not a TFLite converter environment"):
        find_env(precious)
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_subprocess_env_puts_the_environment_first(tmp_path: Path) -> None:
    env = create_env(tmp_path / "env", builder=fake_builder)
    got = env.subprocess_env({"PATH": "/usr/bin:/bin", "PYTHONPATH": "/work/main",
                              "VIRTUAL_ENV": "/work/main/.venv", "HOME": "/root"})
    assert got["PATH"].split(os.pathsep) == [str(env.bin_dir), "/usr/bin", "/bin"]
    assert "PYTHONPATH" not in got and got["VIRTUAL_ENV"] == str(env.root)
    assert got["HOME"] == "/root" and got["PYTHONNOUSERSITE"] == "1"


def test_cli_setup_reports_an_existing_environment(tmp_path: Path) -> None:
    location = tmp_path / "env"
    create_env(location, builder=fake_builder)
    result = CliRunner().invoke(cli, ["setup", "tflite", "--tflite-env", str(location),
                                      "--json"], prog_name="model_tools")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["location"] == str(location) and data["pins"] == list(PINS)


def test_convert_without_the_environment_exits_1_with_the_command(tmp_path: Path) -> None:
    """Before any work: the model need not even exist for the message to be right."""
    missing = tmp_path / "no-env"
    env = {**os.environ, ENV_VAR: str(missing)}
    run = subprocess.run(
        [sys.executable, "-m", "model_tools", "convert", str(tmp_path / "m.onnx"),
         "--profile", "rpi4-tflite", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert run.returncode == 1, run.stderr
    assert f"{SETUP_COMMAND} --tflite-env {missing}" in run.stderr
    assert not (tmp_path / "out").exists()

"""``model_tools``: convert a model per device profile, list profiles, inspect bundles.

A thin shell: each command parses options, calls one library function, formats the result.

Exit codes:
  0  ok
  1  error: bad model, data, profile or output directory; a conversion step failed; a bundle
     does not match its manifest
  2  usage error (unknown option, missing argument)
  3  refused: no artifact meets the profile's tolerances or size budget (report.json written)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from model_tools.errors import ModelToolsError, ValidationRejected

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

EXIT_CODES = """\b
Exit codes: 0 ok; 1 error (bad model, data, profile, output directory, failed step,
bundle not matching its manifest); 2 usage error; 3 refused (no artifact meets the
profile; report.json written)."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


def json_option(fn: F) -> F:
    """Shared option: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout (progress stays on stderr).")(fn)


def profile_dir_option(fn: F) -> F:
    """Shared option: where profiles live."""
    return click.option("--profiles-dir",
                        type=click.Path(exists=True, file_okay=False, path_type=Path),
                        envvar="EDGEFLEET_PROFILES", default=None,
                        help="Directory of device profile TOML files "
                             "(default: the shipped device_profiles/).")(fn)


def tflite_env_option(fn: F) -> F:
    """Shared option: where the isolated TFLite converter environment lives."""
    return click.option("--tflite-env", type=click.Path(file_okay=False, path_type=Path),
                        envvar="EDGEFLEET_TFLITE_ENV", default=None,
                        help="The TFLite converter environment (default: "
                             "$XDG_CACHE_HOME/edgefleet/tflite-env-<digest of its pins>).")(fn)


def _fail(exc: ModelToolsError) -> None:
    click.echo(f"error: {exc}", err=True)
    for note in getattr(exc, "__notes__", []):
        click.echo(f"  note: {note}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.version_option(_version(), "--version", prog_name="model_tools")
def cli() -> None:
    """Convert models for edge devices and prove the result still agrees with the source.

    \b
    Example:
      model_tools profiles
      model_tools convert model.onnx --profile rpi4 --out bundles/rpi4 \\
          --calibration cal.npz --eval eval.npz --name digits --version 1.0.0
      model_tools inspect bundles/rpi4
      model_tools setup tflite      # once, before converting for a tflite profile
    """


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--profile", "profile_name", required=True, help="Device profile name.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to write (must be empty or absent unless --force).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help=".npz with one array per model input (needed for int8-static).")
@click.option("--eval", "eval_path", type=click.Path(path_type=Path),
              help=".npz held-out set (+ optional 'labels') to validate against.")
@click.option("--name", help="Model name (default: the model file's stem).")
@click.option("--version", "model_version", default="1.0.0", show_default=True,
              help="Model version recorded in the manifest.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8-dynamic",
                                                "int8-static"]),
              help="Override the profile's precision.")
@click.option("--force", is_flag=True, help="Replace a non-empty output directory.")
@click.option("--latency-runs", default=300, show_default=True, type=click.IntRange(10, 100000),
              help="Timed single-sample runs per candidate.")
@profile_dir_option
@tflite_env_option
@json_option
def convert(model: Path, profile_name: str, out: Path, calibration: Path | None,
            eval_path: Path | None, name: str | None, model_version: str,
            precision: str | None, force: bool, latency_runs: int,
            profiles_dir: Path | None, tflite_env: Path | None, as_json: bool) -> None:
    """Quantize/convert MODEL.onnx for a device profile, validate it, write a bundle.

    Profiles whose runtime is tflite build .tflite files with TensorFlow and onnx2tf, which
    run in their own environment: create it once with `model_tools setup tflite`.

    \b
    Example:
      model_tools convert mlp.onnx --profile rpi-zero2w --out out/zero \\
          --calibration cal.npz --eval eval.npz --version 1.2.0
      model_tools convert cnn.onnx --profile rpi4-tflite --out out/rpi4-tflite \\
          --calibration cal.npz --eval eval.npz
    """
    from model_tools.pipeline import ConvertRequest
    from model_tools.pipeline import convert as run_convert
    from model_tools.profiles import get_profile
    from model_tools.render import Reporter, candidates_table, summary_lines

    try:
        profile = get_profile(profile_name, profiles_dir)
        request = ConvertRequest(model=model, profile=profile, out=out,
                                 calibration=calibration, eval=eval_path, name=name,
                                 version=model_version, precision=precision, force=force,
                                 latency_runs=latency_runs, tflite_env=tflite_env)
        with Reporter(quiet=False) as reporter:
            result = run_convert(request, progress=reporter.step)
    except ValidationRejected as exc:
        if as_json:
            click.echo(json.dumps(exc.report, indent=1, sort_keys=True))
        else:
            candidates_table(exc.report)
        _fail(exc)
        return
    except ModelToolsError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(result.report, indent=1, sort_keys=True))
        return
    candidates_table(result.report)
    for line in summary_lines(result.manifest, result.bundle):
        click.echo(line)


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("what", type=click.Choice(["tflite"]))
@click.option("--force", is_flag=True,
              help="Rebuild even if a complete environment is there (it is replaced only once "
                   "the new one is complete).")
@tflite_env_option
@json_option
def setup(what: str, force: bool, tflite_env: Path | None, as_json: bool) -> None:
    """Create the isolated environment a conversion needs (WHAT: tflite).

    TFLite conversion runs TensorFlow and onnx2tf, which conflict with this package's own
    dependencies, so they live in a venv of their own (pinned versions, built once with pip:
    about 600 MB to download, 2.3 GB on disk, a minute or two). Default location:
    $XDG_CACHE_HOME/edgefleet/tflite-env-<digest of the pins>. An environment that is already
    complete is left alone.

    \b
    Example:
      model_tools setup tflite
      model_tools setup tflite --tflite-env /opt/edgefleet/tflite-env
    """
    from model_tools.tflite.env import create_env, resolve_location

    location = resolve_location(tflite_env)
    try:
        env = create_env(location, force=force, progress=lambda m: click.echo(m, err=True))
    except ModelToolsError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps({"what": what, "location": str(env.root),
                               "python": str(env.python), "pins": list(env.pins)}, indent=1))
        return
    click.echo(f"{what} converter environment: {env.root}")


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@profile_dir_option
@json_option
def profiles(profiles_dir: Path | None, as_json: bool) -> None:
    """List the device profiles.

    \b
    Example:
      model_tools profiles --json
    """
    from model_tools.profiles import all_profiles

    try:
        found = all_profiles(profiles_dir)
    except ModelToolsError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps({n: _profile_dict(p) for n, p in found.items()}, indent=1))
        return
    from model_tools.render import profiles_table

    profiles_table(found)


def _profile_dict(p: Any) -> dict[str, Any]:
    d = dict(p.__dict__)
    d["tolerances"] = dict(p.tolerances.__dict__)
    d.pop("extra", None)
    return d


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
def inspect(bundle: Path, as_json: bool) -> None:
    """Print a bundle's manifest summary and re-verify its model file's sha256 and length.

    \b
    Example:
      model_tools inspect out/rpi4
    """
    from model_tools.package import read_bundle
    from model_tools.render import inspect_lines

    try:
        checked = read_bundle(bundle)
    except ModelToolsError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps({"verified": True, "sha256": checked.model_sha256,
                               "length": checked.model_length,
                               "manifest": checked.manifest.to_dict()}, indent=1,
                              sort_keys=True))
        return
    for line in inspect_lines(checked):
        click.echo(line)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="model_tools")


if __name__ == "__main__":  # pragma: no cover
    main()

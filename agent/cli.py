"""``edgefleet-agent``: run the daemon, show its state, ask it for a prediction.

A thin shell: each command parses options, calls one library function, formats the result.
Each command imports what it needs when it runs, so ``--help``, ``--version`` and ``predict``
do not pay for importing the daemon (MQTT, TUF, SQLite, the updater: about half a second on a
2-core VM, more on a Pi).

The daemon runs on uvloop when it is installed, else on asyncio's own loop
(:mod:`agent.serving.eventloop`; ``EDGEFLEET_EVENT_LOOP=asyncio`` forces the fallback).

Exit codes:
  0  ok
  1  error (bad config or provisioning file, the daemon cannot start, the request failed)
  2  usage error
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from agent.errors import AgentError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_CODES = """\b
Exit codes: 0 ok; 1 error (config, provisioning, daemon or request failed); 2 usage error."""


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``: the installed distribution's version, read only when asked for."""
    if not value or ctx.resilient_parsing:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = version("edgefleet")
    except PackageNotFoundError:  # same fallback as agent.daemon.app.AGENT_VERSION
        text = "0+unknown"
    click.echo(f"edgefleet-agent, version {text}")
    ctx.exit()


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


config_option = click.option(
    "--config", "config_path", required=True, envvar="EDGEFLEET_AGENT_CONFIG",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent config file (TOML: provisioning = ..., data_dir = ...).")


@click.group(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Show the version and exit.")
def cli() -> None:
    """The edgefleet on-device agent.

    \b
    Example:
      edgefleet-agent run --config /etc/edgefleet/agent.toml
      edgefleet-agent status --config /etc/edgefleet/agent.toml
      edgefleet-agent predict digits --json '{"inputs": {"input": [[0, 0.5, ...]]}}'
    """


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@config_option
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: Path, log_level: str) -> None:
    """Run the daemon until SIGTERM or SIGINT.

    \b
    Example:
      edgefleet-agent run --config agent.toml
    """
    import asyncio
    import logging
    import signal

    from agent.config import load_config
    from agent.daemon.app import Agent
    from agent.serving import eventloop

    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loop_name, new_loop = eventloop.loop_factory()
    except (ValueError, RuntimeError) as exc:  # a bad EDGEFLEET_EVENT_LOOP
        _fail(exc)
        return
    logging.getLogger(__name__).info("event loop: %s", loop_name)
    try:
        config = load_config(config_path, fallback=config_path.with_suffix(".fallback.toml"))
        agent = Agent(config)
    except AgentError as exc:
        _fail(exc)
        return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(a: Any) -> None:
            click.echo(f"edgefleet-agent {a.prov.device_id}: serving on "
                       f"http://{config.http_host}:{a.server.port}", err=True)

        await agent.run(stop, ready=ready)

    try:
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(main())
    except AgentError as exc:
        _fail(exc)


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(config_path: Path, as_json: bool) -> None:
    """Show what this device runs, its last update and its outbox, from its data directory.

    \b
    Example:
      edgefleet-agent status --config agent.toml --json
    """
    from agent.config import load_config
    from agent.daemon.status import read_status

    try:
        info = read_status(load_config(config_path))
    except AgentError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(info, indent=1, sort_keys=True))
        return
    click.echo(f"device     {info['device_id']} (profile {info['profile']})")
    click.echo(f"applied    desired-state sequence {info['applied_sequence']}")
    for m in info["models"]:
        click.echo(f"model      {m['name']}: current {m['current'] or '-'}, "
                   f"previous {m['previous'] or '-'}")
    last = info["last_update"]
    if last:
        click.echo(f"update     {last['update_id']}: {last['state']}"
                   + (f" ({last['last_error']})" if last.get("last_error") else ""))
    click.echo(f"outbox     {info['outbox_depth']} records waiting")


@cli.command(context_settings=CONTEXT, epilog=EXIT_CODES)
@click.argument("model")
@click.option("--json", "body", required=True,
              help='Request body: {"inputs": {NAME: nested lists}}.')
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8500, show_default=True, type=int)
def predict(model: str, body: str, host: str, port: int) -> None:
    """Ask the running daemon's local API for a prediction.

    \b
    Example:
      edgefleet-agent predict digits --json '{"inputs": {"input": [[0.0, 0.1, ...]]}}'
    """
    from agent.serving.client import AgentClient

    try:
        inputs = json.loads(body)["inputs"]
    except (ValueError, KeyError, TypeError) as exc:
        raise click.UsageError(f'--json: expected {{"inputs": {{...}}}}: {exc}') from exc
    client = AgentClient(host, port)
    try:
        out = client.predict(model, inputs)
    except (AgentError, OSError) as exc:
        _fail(exc)
        return
    finally:
        client.close()
    click.echo(json.dumps({"model": out.model, "version": out.version,
                           "outputs": {k: v.tolist() for k, v in out.outputs.items()}},
                          indent=1, sort_keys=True))


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="edgefleet-agent")


if __name__ == "__main__":  # pragma: no cover
    main()

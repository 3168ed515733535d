"""``fleet_server``: create a fleet, serve it, and drive its admin API from a shell.

A thin shell (STYLE rule 19): each command parses options, calls one library function or one
API call (:class:`fleet_server.client.FleetClient`), and formats the result.

* local commands work on ``--data-dir``: ``init``, ``serve``, ``keys rotate``,
  ``mosquitto-config``;
* API commands talk to a running server: ``--url`` (``EDGEFLEET_URL``), ``--token``
  (``EDGEFLEET_TOKEN``), ``--json``.

Exit codes:
  0  ok
  1  error: the server refused or failed (its detail is printed), the server cannot be
     reached, the data directory is missing, already initialised or unusable, a file would be
     overwritten, the audit chain is broken
  2  usage error: unknown option, bad argument, no token, or not supported yet
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from fleet_server import cli_text
from fleet_server.cli_text import selector_text as _selector_text
from fleet_server.cli_text import table as _table
from fleet_server.cli_text import when as _when
from fleet_server.client import DEFAULT_URL, FleetClient
from fleet_server.errors import FleetError

if TYPE_CHECKING:
    from fleet_server.settings import Settings

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])
PROG = "fleet_server"
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EXIT_CODES = """\b
Exit codes: 0 ok; 1 error (the server refused or failed and its detail is printed, the
server is unreachable, the data directory is missing, already initialised or unusable, a
file would be overwritten, the audit chain is broken); 2 usage error (bad option or
argument, no token, not supported yet)."""

#: a bundle directory up to this size is tarred in memory, a larger one in a temporary file
_SPOOL_BYTES = 32 << 20


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgefleet")
    except PackageNotFoundError:
        return "unknown"


# --------------------------------------------------------------------------------- plumbing

def _version_option(fn: F) -> F:
    fn = click.version_option(_version(), "--version", prog_name=PROG)(fn)
    params = fn.__click_params__  # type: ignore[attr-defined]
    params.insert(0, params.pop())  # listed last, next to --help
    return fn


def _command(group: click.Group, name: str | None = None) -> Callable[[F], click.Command]:
    """``@group.command`` with ``-h``, ``--version`` and the exit codes, as every command has."""
    def decorate(fn: F) -> click.Command:
        return group.command(name, context_settings=CONTEXT, epilog=EXIT_CODES)(
            _version_option(fn))
    return decorate


def _subgroup(group: click.Group, name: str) -> Callable[[F], click.Group]:
    def decorate(fn: F) -> click.Group:
        return group.group(name, context_settings=CONTEXT, epilog=EXIT_CODES)(
            _version_option(fn))
    return decorate


def json_option(fn: F) -> F:
    """Shared option: machine-readable output on stdout."""
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the result as JSON on stdout.")(fn)


def data_dir_option(fn: F) -> F:
    """Shared option: the server's data directory."""
    return click.option("--data-dir", required=True, envvar="EDGEFLEET_DATA_DIR",
                        type=click.Path(file_okay=False, path_type=Path),
                        help="The fleet's data directory (env EDGEFLEET_DATA_DIR).")(fn)


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta[f"{PROG}.{param.name}"] = value
    return value


def api_options(fn: F) -> F:
    """Shared options of every API command: where the server is, the token, --json."""
    options = [
        click.option("--url", envvar="EDGEFLEET_URL", default=DEFAULT_URL, show_default=True,
                     expose_value=False, callback=_remember,
                     help="The fleet server's base URL (env EDGEFLEET_URL)."),
        click.option("--token", envvar="EDGEFLEET_TOKEN", expose_value=False,
                     callback=_remember,
                     help="API token (env EDGEFLEET_TOKEN; `fleet_server init` prints the "
                          "first one)."),
        click.option("--json", "as_json", is_flag=True, expose_value=False,
                     callback=_remember,
                     help="Print the server's answer as JSON on stdout."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _meta(name: str) -> Any:
    return click.get_current_context().meta.get(f"{PROG}.{name}")


def _api() -> FleetClient:
    """The client for this invocation's --url and --token.

    Raises:
        click.UsageError: no token given.
    """
    token = _meta("token")
    if not token:
        raise click.UsageError("no API token: pass --token or set EDGEFLEET_TOKEN "
                               "(`fleet_server init` printed the first admin token)")
    url = _meta("url") or DEFAULT_URL
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        raise click.UsageError(f"--url: expected http://host:port or https://..., got {url!r}")
    return FleetClient(url, token)


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors fleet_server raises on purpose, and disk errors, into exit code 1."""
    try:
        yield
    except FleetError as exc:
        click.echo(f"error: {exc}", err=True)
        for note in getattr(exc, "__notes__", []):
            click.echo(f"  note: {note}", err=True)
        raise click.exceptions.Exit(EXIT_ERROR) from exc
    except OSError as exc:
        _fail(f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}")


def _settings(**given: Any) -> Settings:
    """Settings from the options that were given (the rest from EDGEFLEET_* or defaults)."""
    from pydantic import ValidationError

    from fleet_server.settings import Settings

    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise click.UsageError(f"invalid settings: {problems}") from exc


def _emit(data: Any, lines: Callable[[], Sequence[str]]) -> None:
    if _meta("as_json"):
        click.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    for line in lines():
        click.echo(line)


# --------------------------------------------------------------------------------- the group

@click.group(context_settings=CONTEXT, epilog=EXIT_CODES)
@_version_option
def cli() -> None:
    """Register devices and models, publish TUF-signed artifacts and signed desired states.

    \b
    Example:
      fleet_server init --data-dir /var/lib/edgefleet
      fleet_server serve --data-dir /var/lib/edgefleet &
      export EDGEFLEET_TOKEN=ef_admin_...
      fleet_server device provision pi-01 --profile rpi4 --tag lab --out pi-01.json
      fleet_server model push bundles/rpi4
      fleet_server deploy digits 1.0.0 --to tag:lab
      fleet_server rollout status
    """


# --------------------------------------------------------------------------------- local

@_command(cli)
@data_dir_option
@json_option
def init(data_dir: Path, as_json: bool) -> None:
    """Create a fleet in a new data directory and print the first admin token, once.

    Creates the database, the TUF repository and its keys, the director key that signs
    desired states, and one admin API token. Only the token's hash is stored: copy it now.

    \b
    Example:
      fleet_server init --data-dir /var/lib/edgefleet
    """
    from fleet_server.fleet import init_data_dir

    with _errors():
        secret = init_data_dir(_settings(data_dir=data_dir))
    if as_json:
        click.echo(json.dumps({"data_dir": str(data_dir), "token": secret, "scope": "admin"},
                              indent=1, sort_keys=True))
        return
    click.echo(f"Created the fleet in {data_dir} (database, TUF repository, director key).")
    click.echo("The first admin token is shown only once (only its hash is stored); "
               "use it with:")
    click.echo("")
    click.echo(f"  export EDGEFLEET_TOKEN={secret}")
    click.echo("")
    click.echo(f"Then start the server: fleet_server serve --data-dir {data_dir}")


@_command(cli)
@data_dir_option
@click.option("--host", help="Address the admin API binds to (default 127.0.0.1; "
                             "env EDGEFLEET_HOST).")
@click.option("--port", type=click.IntRange(0, 65535),
              help="Admin API port (default 8080; env EDGEFLEET_PORT; 0 picks a free one and "
                   "needs --public-url).")
@click.option("--public-url", help="URL devices use to reach this server, written into "
                                   "provisioning files (default http://HOST:PORT).")
@click.option("--mqtt-url", help="'embedded' (default: a broker inside this process) or "
                                 "mqtt://user:pass@host:port / mqtts://... of a broker.")
@click.option("--mqtt-host", help="Embedded broker bind address (default 127.0.0.1).")
@click.option("--mqtt-port", type=click.IntRange(0, 65535),
              help="Embedded broker port (default 1883).")
@click.option("--mqtt-public-url", help="Broker URL written into provisioning files "
                                        "(default: derived from the above).")
@click.option("--environment", type=click.Choice(["development", "production"]),
              help="'production' refuses plain-text listeners on non-loopback addresses "
                   "(default development).")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]),
              help="uvicorn's log level.")
@click.option("--maintenance-interval", "maintenance_s", default=30.0, show_default=True,
              type=click.FloatRange(min=0.5), metavar="SECONDS",
              help="Seconds between maintenance passes: timestamp re-signing, desired states "
                   "near expiry, alert rules (an alert changes state at most this late).")
@click.option("--record-retention", "record_retention_days", type=click.IntRange(0, 36500),
              metavar="DAYS",
              help="Keep device telemetry and drift records this many days after they "
                   "arrive; 0 keeps them forever (default 30; env "
                   "EDGEFLEET_RECORD_RETENTION_DAYS).")
@click.option("--webhook-allow", "webhook_allow", multiple=True, metavar="HOST|URL|CIDR",
              help="Where alert webhooks may POST (repeatable): a host, *.domain, IP "
                   "address, CIDR network or http(s):// URL prefix. With a list, names are "
                   "resolved at send time and loopback, link local, private and other "
                   "internal addresses are refused unless an IP or CIDR entry names them. "
                   "Unset: any URL, with a warning (env EDGEFLEET_WEBHOOK_ALLOW as a JSON "
                   "list).")
@click.option("--ingest-parse-workers", "ingest_parse_workers", type=click.IntRange(0, 64),
              metavar="N",
              help="Processes that parse device telemetry once ingest falls behind; 0 parses "
                   "on the ingest thread (default min(2, CPUs - 1); env "
                   "EDGEFLEET_INGEST_PARSE_WORKERS).")
def serve(data_dir: Path, host: str | None, port: int | None, public_url: str | None,
          mqtt_url: str | None, mqtt_host: str | None, mqtt_port: int | None,
          mqtt_public_url: str | None, environment: str | None, log_level: str,
          maintenance_s: float, record_retention_days: int | None,
          webhook_allow: tuple[str, ...], ingest_parse_workers: int | None) -> None:
    """Run the fleet server (admin API, TUF repository) on uvicorn until interrupted.

    Every option can also come from the environment as EDGEFLEET_<OPTION> (for example
    EDGEFLEET_MQTT_URL). Anything served in plain text off loopback is printed loudly on
    stderr, and refused with --environment production.

    \b
    Example:
      fleet_server serve --data-dir /var/lib/edgefleet --port 8080
      fleet_server serve --data-dir /var/lib/edgefleet --host 0.0.0.0 \\
          --public-url https://fleet.example.com --environment production \\
          --mqtt-url mqtts://_edgefleet_server:SECRET@broker.example.com:8883 \\
          --record-retention 90 --webhook-allow hooks.slack.com
    """
    settings = _settings(data_dir=data_dir, host=host, port=port, public_url=public_url,
                         mqtt_url=mqtt_url, mqtt_host=mqtt_host, mqtt_port=mqtt_port,
                         mqtt_public_url=mqtt_public_url, environment=environment,
                         record_retention_days=record_retention_days,
                         webhook_allow=webhook_allow or None,
                         ingest_parse_workers=ingest_parse_workers)
    if settings.port == 0 and not settings.public_url:
        raise click.UsageError("--port 0 needs --public-url: provisioning files tell devices "
                               "the server's URL")
    reasons = settings.insecure_reasons()
    for reason in reasons:
        click.secho(f"INSECURE: {reason}", err=True, bold=True, fg="red")
    if reasons and settings.environment == "production":
        _fail("refusing to serve in production with the insecure settings above")
    if settings.webhook_allow is None:
        click.secho("NOTE: alert webhooks may POST to any URL (no --webhook-allow list); "
                    "set one to limit where the server sends them", err=True, fg="yellow")
    import uvicorn

    with _errors():
        try:
            from fleet_server.api.app import create_app
        except ImportError as exc:
            raise FleetError(f"the admin API cannot be loaded: {exc}") from exc
        app = create_app(settings)
        from fleet_server.runtime import attach_mqtt

        attach_mqtt(app, maintenance_interval_s=maintenance_s,
                    parse_workers=settings.ingest_parse_workers)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)


@_subgroup(cli, "keys")
def keys() -> None:
    """Rotate the fleet's signing keys (on the data directory; no server needed).

    \b
    Example:
      fleet_server keys rotate timestamp --data-dir /var/lib/edgefleet
    """


@_command(keys, "rotate")
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp",
                                           "director"]))
@data_dir_option
@json_option
def keys_rotate(role: str, data_dir: Path, as_json: bool) -> None:
    """Replace a TUF role's key with a new one and publish a new root version.

    Devices follow the rotation at their next TUF refresh: the new root is signed by the
    old root key too. A running server needs no restart (it re-reads the repository on
    every change). Rotating the director key (desired-state signatures) is not supported yet.

    \b
    Example:
      fleet_server keys rotate timestamp --data-dir /var/lib/edgefleet
    """
    if role == "director":
        _fail("rotating the director key is not supported yet: devices pin it at "
              "provisioning, and there is no rollover for it so far", EXIT_USAGE)
    from fleet_server.tuf_repo import TufRepository

    with _errors():
        repo = TufRepository.open(data_dir / "tuf")
        before = repo.versions()["root"]
        keyid = repo.rotate_key(role, now=dt.datetime.now(dt.UTC))
        after = repo.versions()["root"]
    if as_json:
        click.echo(json.dumps({"role": role, "keyid": keyid, "root_version_before": before,
                               "root_version": after}, indent=1, sort_keys=True))
        return
    click.echo(f"Rotated the {role} key: new key id {keyid}")
    click.echo(f"Root version {before} -> {after}; devices pick it up at their next refresh.")


@_command(cli, "mosquitto-config")
@data_dir_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory to write mosquitto.conf, passwd and acl to (created 0700).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The listener's address; anything but loopback needs --certfile/--keyfile.")
@click.option("--port", default=1883, show_default=True, type=click.IntRange(1, 65535),
              help="The listener's port.")
@click.option("--certfile", type=click.Path(dir_okay=False, path_type=Path),
              help="TLS certificate for the listener (with --keyfile): mqtts://.")
@click.option("--keyfile", type=click.Path(dir_okay=False, path_type=Path),
              help="TLS private key for the listener.")
@click.option("--group", help="Make passwd and acl 0640 with this group (e.g. mosquitto, when "
                              "root starts the broker and it drops to that user).")
@json_option
def mosquitto_config(data_dir: Path, out: Path, host: str, port: int, certfile: Path | None,
                     keyfile: Path | None, group: str | None, as_json: bool) -> None:
    """Write a Mosquitto configuration for this fleet: mosquitto.conf, passwd and acl.

    The password file holds the server's own user and every live (not revoked) device, with
    the hashes the server stores (mosquitto's $7$ format); the ACL lets each device touch only
    its own topics. The server's MQTT password is created on first use in
    DATA_DIR/mqtt/server.secret (0600). Re-run after provisioning or revoking devices, then
    reload mosquitto (SIGHUP).

    \b
    Example:
      fleet_server mosquitto-config --data-dir /var/lib/edgefleet --out /etc/mosquitto/edgefleet
      mosquitto -c /etc/mosquitto/edgefleet/mosquitto.conf
    """
    from fleet_server.mqtt.mosquitto import MosquittoTls
    from fleet_server.settings import SERVER_MQTT_USER

    if (certfile is None) != (keyfile is None):
        raise click.UsageError("--certfile and --keyfile go together")
    tls = None if certfile is None or keyfile is None else MosquittoTls(
        certfile.resolve(), keyfile.resolve())
    with _errors():
        try:
            written, secret_path = _write_mosquitto(data_dir, out, host, port, tls, group)
        except ValueError as exc:
            raise FleetError(str(exc)) from exc
    scheme = "mqtt" if tls is None else "mqtts"
    result = {"out": str(out), "files": [str(p) for p in written], "host": host, "port": port,
              "server_user": SERVER_MQTT_USER, "server_secret": str(secret_path)}
    _emit_local(as_json, result, lambda: [
        *(f"wrote {p}" for p in written),
        f"The server connects as {SERVER_MQTT_USER}; its password is in {secret_path}:",
        (f"  fleet_server serve --data-dir {data_dir} --mqtt-url "
         f"\"{scheme}://{SERVER_MQTT_USER}:$(cat {secret_path})@{host}:{port}\"")])


def _emit_local(as_json: bool, data: Any, lines: Callable[[], Sequence[str]]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=1, sort_keys=True))
        return
    for line in lines():
        click.echo(line)


def _server_mqtt_secret(data_dir: Path) -> tuple[str, Path]:
    """The server's MQTT password (created 0600 if absent) and where it lives."""
    from fleet_server.fleet import server_mqtt_secret

    return server_mqtt_secret(data_dir), data_dir / "mqtt" / "server.secret"


def _write_mosquitto(data_dir: Path, out: Path, host: str, port: int, tls: Any,
                     group: str | None) -> tuple[list[Path], Path]:
    """Gather the credentials and hand them to :mod:`fleet_server.mqtt.mosquitto`."""
    from sqlalchemy import select

    from fleet_server.db import tables
    from fleet_server.fleet import open_fleet
    from fleet_server.mqtt import mosquitto
    from fleet_server.mqtt.passwords import hash_password
    from fleet_server.settings import SERVER_MQTT_USER

    fleet = open_fleet(_settings(data_dir=data_dir))
    try:
        with fleet.engine.connect() as conn:
            rows = conn.execute(select(tables.devices.c.id, tables.devices.c.mqtt_password_hash)
                                .where(tables.devices.c.revoked_at.is_(None))
                                .order_by(tables.devices.c.id)).all()
    finally:
        fleet.engine.dispose()
    secret, secret_path = _server_mqtt_secret(data_dir)
    credentials = {SERVER_MQTT_USER: hash_password(secret)}
    credentials.update({str(r.id): str(r.mqtt_password_hash) for r in rows})
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = mosquitto.write_mosquitto_files(out, credentials, SERVER_MQTT_USER, group=group)
    config = out / "mosquitto.conf"
    text = mosquitto.render_mosquitto_config(host, port, files.password_file.resolve(),
                                             files.acl_file.resolve(), tls=tls)
    _write_private_atomically(config, text.encode("utf-8"), replace=True)
    return [config, files.password_file, files.acl_file], secret_path


def _write_private_atomically(path: Path, data: bytes, *, replace: bool) -> None:
    """Write ``data`` to ``path`` with mode 0600: a temporary file in the same directory, then
    ``os.replace`` (``replace=True``) or a hard link that fails if ``path`` exists.

    Raises:
        FileExistsError: ``path`` exists and ``replace`` is False.
        OSError: the directory is not writable.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and never clobbers
            except FileExistsError:
                raise
            except OSError:  # no hard links here (vfat, some network file systems)
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
                os.replace(tmp, path)
            else:
                os.unlink(tmp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------- tokens

@_subgroup(cli, "token")
def token() -> None:
    """Create API tokens for people and CI.

    \b
    Example:
      fleet_server token create --name ci --scope publisher
    """


@_command(token, "create")
@click.option("--name", required=True, help="Who or what uses it (shown in the audit log).")
@click.option("--scope", required=True, type=click.Choice(["admin", "publisher", "reader"]),
              help="admin: everything; publisher: push models and deploy; reader: read only.")
@api_options
def token_create(name: str, scope: str) -> None:
    """Create an API token and print its secret, once.

    \b
    Example:
      fleet_server token create --name ci --scope publisher
    """
    with _errors(), _api() as api:
        out = api.create_token(name, scope)
    secret = out.get("secret") or out.get("token")
    _emit(out, lambda: [
        f"Created token {out.get('id', '?')} {name!r} (scope {scope}).",
        "Its secret is shown only once (only its hash is stored):", "",
        f"  {secret}"])


# --------------------------------------------------------------------------------- devices

@_subgroup(cli, "device")
def device() -> None:
    """Provision, list, show and revoke devices.

    \b
    Example:
      fleet_server device provision pi-01 --profile rpi4 --tag lab --out pi-01.json
      fleet_server device list
    """


@_command(device, "provision")
@click.argument("device_id", metavar="ID")
@click.option("--profile", required=True, help="The device's profile (see model_tools "
                                               "profiles).")
@click.option("--tag", "tags", multiple=True, help="A tag to select it by (repeatable).")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the provisioning file (0600; it holds the device's "
                   "secrets).")
@click.option("--force", is_flag=True, help="Replace an existing --out file.")
@api_options
def device_provision(device_id: str, profile: str, tags: tuple[str, ...], out: Path,
                     force: bool) -> None:
    """Register a device and write its provisioning file (secrets are never printed).

    Copy the file to the device (the agent reads it at start-up), then delete this copy.
    Device ids are never reused, even after revocation.

    \b
    Example:
      fleet_server device provision pi-01 --profile rpi4 --tag lab --tag floor-2 \\
          --out pi-01.json
    """
    from agent.protocol.provisioning import Provisioning, ProvisioningError

    # checked before the device exists: a registered device whose secrets went nowhere is lost
    if out.exists() and not force:
        _fail(f"{out} exists; refusing to overwrite it (use --force to replace it)")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        _fail(f"{out.parent} is not a writable directory")
    with _errors(), _api() as api:
        answer = api.provision_device(device_id, profile, tags)
    lost = (f"device {device_id!r} is registered but its provisioning file was not written; "
            f"revoke it (fleet_server device revoke {device_id}) and provision another id")
    try:
        data = Provisioning.from_dict(answer.get("provisioning")).to_bytes()
        _write_private_atomically(out, data, replace=force)
    except ProvisioningError as exc:
        _fail(f"the server sent an invalid provisioning file ({exc}); {lost}")
    except OSError as exc:
        _fail(f"cannot write {out}: {exc.strerror or exc}; {lost}")
    info = answer.get("device") or {"id": device_id}
    _emit({"device": info, "path": str(out)}, lambda: [
        *_device_lines(info),
        (f"provisioning file: {out} (0600, holds the device's secrets: copy it to the "
         "device, then delete it here)")])


def _status(d: Mapping[str, Any]) -> str:
    if d.get("revoked"):
        return f"revoked {_when(d.get('revoked_at'))}"
    return "online" if d.get("online") else "offline"


def _device_lines(d: Mapping[str, Any]) -> list[str]:
    reported = d.get("reported") or {}
    desired = d.get("desired") or {}
    running = ", ".join(f"{m.get('name')} {m.get('version')}"
                        for m in reported.get("running") or ()) or "-"
    wanted = ", ".join(f"{m.get('name')} {m.get('version')}"
                       for m in desired.get("models") or ()) or "-"
    lines = [
        f"device:   {d.get('id')}",
        f"profile:  {d.get('profile', '-')}",
        f"tags:     {', '.join(d.get('tags') or ()) or '-'}",
        f"status:   {_status(d)}",
        f"created:  {_when(d.get('created_at'))}",
    ]
    if "last_seen_at" in d:
        lines.append(f"seen:     {_when(d.get('last_seen_at'))}")
    if "desired" in d:
        lines.append(f"desired:  sequence {desired['sequence']}: {wanted}" if desired
                     else "desired:  none (no deployment targets it)")
    if "reported" in d:
        lines.append(f"running:  {running} (applied sequence "
                     f"{reported.get('applied_sequence', '-')}, state "
                     f"{reported.get('state', '-')}, last result "
                     f"{reported.get('last_result') or '-'})" if reported
                     else "running:  nothing reported yet")
        if reported.get("last_error"):
            lines.append(f"error:    {reported['last_error']}")
    return lines


@_command(device, "list")
@click.option("--tag", help="Only devices with this tag.")
@click.option("--profile", help="Only devices with this profile.")
@api_options
def device_list(tag: str | None, profile: str | None) -> None:
    """List devices: profile, tags, online, what they run.

    \b
    Example:
      fleet_server device list --tag lab
    """
    with _errors(), _api() as api:
        items = api.list_devices(tag=tag, profile=profile)

    def lines() -> list[str]:
        rows = [[d.get("id"), d.get("profile"), ",".join(d.get("tags") or ()) or "-",
                 _status(d).split()[0],
                 _when(d.get("last_seen_at")),
                 ", ".join(f"{m.get('name')} {m.get('version')}" for m in
                           (d.get("reported") or {}).get("running") or ()) or "-"]
                for d in items]
        return [*_table(["ID", "PROFILE", "TAGS", "STATUS", "LAST SEEN", "RUNNING"], rows),
                f"{len(items)} device(s)"]
    _emit(items, lines)


@_command(device, "show")
@click.argument("device_id", metavar="ID")
@api_options
def device_show(device_id: str) -> None:
    """Show one device: desired state, reported state, last error.

    \b
    Example:
      fleet_server device show pi-01
    """
    with _errors(), _api() as api:
        d = api.get_device(device_id)
    _emit(d, lambda: _device_lines(d))


@_command(device, "revoke")
@click.argument("device_id", metavar="ID")
@api_options
def device_revoke(device_id: str) -> None:
    """Revoke a device: its MQTT credentials and token stop working (the id stays taken).

    \b
    Example:
      fleet_server device revoke pi-01
    """
    with _errors(), _api() as api:
        d = api.revoke_device(device_id)
    _emit(d, lambda: [f"Revoked device {d.get('id', device_id)} at {_when(d.get('revoked_at'))}.",
                      "Re-run `fleet_server mosquitto-config` if you use Mosquitto."])


# --------------------------------------------------------------------------------- models

@_subgroup(cli, "model")
def model() -> None:
    """Push model bundles (from model_tools convert) and inspect the registry.

    \b
    Example:
      fleet_server model push bundles/rpi4
      fleet_server model list
    """


@contextlib.contextmanager
def _bundle_body(bundle: Path) -> Iterator[tuple[IO[bytes], int]]:
    """The bundle as a tar stream and its length: a tar file as it is; a directory tarred
    with just manifest.json and the model file (in memory, or a temporary file if large).

    Raises:
        FleetError: the directory has no readable manifest.
        OSError: a file cannot be read.
    """
    import tarfile

    from agent.protocol.manifest import MANIFEST_FILE, Manifest, ManifestError

    if bundle.is_file():
        with bundle.open("rb") as fh:
            yield fh, bundle.stat().st_size
        return
    try:
        manifest = Manifest.from_bytes((bundle / MANIFEST_FILE).read_bytes())
    except FileNotFoundError as exc:
        raise FleetError(f"{bundle} is not a bundle: no {MANIFEST_FILE}") from exc
    except ManifestError as exc:
        raise FleetError(f"{bundle / MANIFEST_FILE}: {exc}") from exc

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mode = 0o644
        return info

    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES) as spool:
        with tarfile.open(fileobj=spool, mode="w") as tar:
            for name in (MANIFEST_FILE, manifest.file.path):
                tar.add(bundle / name, arcname=name, recursive=False, filter=plain)
        length = spool.tell()
        spool.seek(0)
        yield spool, length


@_command(model, "push")
@click.argument("bundle", type=click.Path(exists=True, path_type=Path))
@api_options
def model_push(bundle: Path) -> None:
    """Upload a bundle (a directory, .tar or .tar.gz) and publish it as TUF targets.

    The server re-checks the model file against the manifest and the profile; versions are
    immutable (pushing the same name, version and profile twice is refused).

    \b
    Example:
      fleet_server model push bundles/rpi4
      fleet_server model push digits-1.0.0-rpi4.tar.gz
    """
    with _errors(), _bundle_body(bundle) as (body, length), _api() as api:
        out = api.push_model(body, length)
    _emit(out, lambda: [f"Pushed {out.get('name')} {out.get('version')}:",
                        *_artifact_lines(out)])


def _artifact_lines(version: Mapping[str, Any]) -> list[str]:
    rows = [[a.get("profile"), a.get("runtime"), a.get("precision"), a.get("length"),
             str(a.get("sha256", ""))[:16], a.get("target_path")]
            for a in version.get("artifacts") or ()]
    return _table(["PROFILE", "RUNTIME", "PRECISION", "BYTES", "SHA256", "TUF TARGET"], rows)


@_command(model, "list")
@api_options
def model_list() -> None:
    """List model versions and the profiles each was built for.

    \b
    Example:
      fleet_server model list --json
    """
    with _errors(), _api() as api:
        items = api.list_models()
    _emit(items, lambda: _table(["NAME", "VERSION", "PROFILES", "CREATED"], [
        [m.get("name"), m.get("version"), ",".join(m.get("profiles") or ()),
         _when(m.get("created_at"))] for m in items]))


@_command(model, "show")
@click.argument("name")
@click.argument("model_version", metavar="VERSION")
@api_options
def model_show(name: str, model_version: str) -> None:
    """Show a model version: every profile's artifact and its validation report.

    \b
    Example:
      fleet_server model show digits 1.0.0
    """
    with _errors(), _api() as api:
        out = api.get_model_version(name, model_version)

    def lines() -> list[str]:
        result = [f"{out.get('name')} {out.get('version')}", *_artifact_lines(out)]
        for a in out.get("artifacts") or ():
            report = a.get("validation") or {}
            if isinstance(report, Mapping) and report:
                shown = ", ".join(f"{k}={v}" for k, v in sorted(report.items())
                                  if isinstance(v, (int, float, str, bool)))
                result.append(f"validation [{a.get('profile')}]: {shown or '-'}")
        return result
    _emit(out, lines)


# --------------------------------------------------------------------------------- deploy

def _parse_selectors(ctx: click.Context, param: click.Parameter,
                     values: tuple[str, ...]) -> dict[str, Any]:
    selector: dict[str, Any] = {"devices": [], "tags": [], "profiles": [], "all": False}
    keys = {"device": "devices", "tag": "tags", "profile": "profiles"}
    for value in values:
        kind, _, what = value.partition(":")
        if value == "all":
            selector["all"] = True
        elif kind in keys and what:
            selector[keys[kind]].append(what)
        else:
            raise click.BadParameter(f"{value!r}: expected device:ID, tag:TAG, profile:NAME "
                                     "or all", ctx, param)
    if selector["all"] and (selector["devices"] or selector["tags"] or selector["profiles"]):
        raise click.BadParameter("'all' cannot be combined with other selectors", ctx, param)
    return selector


def rollout_options(fn: F) -> F:
    """Shared options: waves, gates and on-failure of a staged rollout."""
    options = [
        click.option("--waves", help="Roll out in cumulative waves, e.g. 5%,25%,100% or "
                                     "1,10,all (counts first; the last is 100% or all). "
                                     "Without it every targeted device is told at once."),
        click.option("--bake", "bake_s", type=click.IntRange(min=0), metavar="SECONDS",
                     help="Wait this long after a wave's last assignment or device commit "
                          "(the later) before it passes [default: 0]."),
        click.option("--min-committed", type=float, metavar="FRACTION",
                     help="A wave passes once this fraction of it committed [default: 1]."),
        click.option("--max-failed", type=float, metavar="FRACTION",
                     help="A wave fails once more than this fraction of it failed "
                          "[default: 0]."),
        click.option("--max-error-rate", type=float, metavar="FRACTION",
                     help="Fail a wave when a committed device's errors/requests exceed this "
                          "[default: off]."),
        click.option("--max-p95-ms", type=float, metavar="MS",
                     help="Fail a wave when a committed device's p95 latency exceeds this "
                          "[default: its profile's latency budget]."),
        click.option("--no-latency-gate", is_flag=True,
                     help="Do not judge p95 latency at all (devices that serve little "
                          "traffic would otherwise hold a wave until they have --min-samples)."),
        click.option("--max-psi", type=float, metavar="PSI",
                     help="Fail a wave when a committed device's input drift (largest "
                          "feature PSI) exceeds this [default: off]."),
        click.option("--min-samples", type=click.IntRange(min=1), metavar="N",
                     help="Requests (drift: predictions) a device needs before its health "
                          "counts [default: 100]."),
        click.option("--min-reporting", type=float, metavar="FRACTION",
                     help="A health gate passes only once this fraction of the wave's "
                          "committed devices served enough requests to be judged; until then "
                          "it waits [default: 1, all of them]."),
        click.option("--offline-grace", "offline_grace_s", type=click.IntRange(min=0),
                     metavar="SECONDS",
                     help="An offline device that has not applied its new state this long "
                          "after its assignment counts as failed [default: 3600]."),
        click.option("--report-timeout", "report_timeout_s", type=click.IntRange(min=1),
                     metavar="SECONDS",
                     help="A committed device that a health gate still cannot judge (fewer "
                          "than --min-samples) this long after it committed has timed out; "
                          "see --on-report-timeout [default: no deadline, the gate waits]."),
        click.option("--on-report-timeout", type=click.Choice(["fail", "exclude"]),
                     help="What a timed-out device does: fail the health gate once the quorum "
                          "is out of reach, or be excluded from the quorum and named in the "
                          "gate's detail (needs --report-timeout) [default: fail]."),
        click.option("--on-failure", type=click.Choice(["pause", "rollback"]),
                     help="When a gate fails: pause the rollout, or roll every moved device "
                          "back to its previous version [default: pause]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _rollout_body(waves: str | None, on_failure: str | None,
                  gates: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``rollout`` object of a deploy, checked here (a bad value is a usage error).

    Raises:
        click.UsageError: gate options without --waves, or an invalid spec.
    """
    from fleet_server.rollout import RolloutSpec, SpecError

    given = {k: v for k, v in gates.items() if v is not None}
    if waves is None:
        if given or on_failure:
            raise click.UsageError("gate and --on-failure options need --waves (without "
                                   "waves every targeted device is told at once)")
        return None
    body: dict[str, Any] = {"waves": waves, "gates": given}
    if on_failure:
        body["on_failure"] = on_failure
    try:
        RolloutSpec.from_dict(body)
    except SpecError as exc:
        raise click.UsageError(str(exc)) from exc
    return body


@_command(cli, "deploy")
@click.argument("model_name", metavar="MODEL")
@click.argument("model_version", metavar="VERSION")
@click.option("--to", "selector", multiple=True, required=True, callback=_parse_selectors,
              help="Which devices: device:ID, tag:TAG, profile:NAME (repeatable; a device "
                   "must match every kind given, any value of a kind), or all.")
@rollout_options
@api_options
def deploy(model_name: str, model_version: str, selector: dict[str, Any], waves: str | None,
           bake_s: int | None, min_committed: float | None, max_failed: float | None,
           max_error_rate: float | None, max_p95_ms: float | None, no_latency_gate: bool,
           max_psi: float | None, min_samples: int | None, min_reporting: float | None,
           offline_grace_s: int | None, report_timeout_s: int | None,
           on_report_timeout: str | None, on_failure: str | None) -> None:
    """Deploy a model version: at once, or in waves that advance as their gates pass.

    Each device gets the artifact built for its own profile; the deploy is refused if some
    targeted device's profile has none. A newer deployment of the same model wins per device,
    and supersedes the model's running rollout.

    With --waves, the first wave's devices are told at once and the next wave starts when
    the current one passes its gates (enough committed, few enough failed, the bake time
    over, healthy). A failed gate pauses the rollout or, with --on-failure rollback, puts
    every moved device back on its previous version. A device that rolls back by itself
    counts as failed. The p95 latency gate is on by default and waits until every committed
    device of the wave (or --min-reporting of them) served --min-samples requests: pass
    --no-latency-gate for devices without traffic. --report-timeout gives that evidence a
    deadline (with --on-report-timeout exclude, silent devices then leave the quorum).
    Follow the rollout, pause, resume or cancel it with `fleet_server rollout`.

    \b
    Example:
      fleet_server deploy digits 1.0.0 --to tag:lab --to profile:rpi4
      fleet_server deploy digits 1.0.1 --to device:pi-01 --to device:pi-02
      fleet_server deploy digits 1.1.0 --to all --waves 5%,25%,100% --bake 600 \\
          --max-failed 0.1 --max-error-rate 0.02 --on-failure rollback
      fleet_server deploy digits 1.2.0 --to all --waves 10%,all --report-timeout 3600 \\
          --on-report-timeout exclude
    """
    rollout_body = _rollout_body(waves, on_failure, {
        "bake_s": bake_s, "min_committed": min_committed, "max_failed": max_failed,
        "max_error_rate": max_error_rate, "max_p95_ms": max_p95_ms, "max_psi": max_psi,
        "min_samples": min_samples, "min_reporting": min_reporting,
        "offline_grace_s": offline_grace_s, "report_timeout_s": report_timeout_s,
        "on_report_timeout": on_report_timeout,
        "latency_gate": False if no_latency_gate else None})
    with _errors(), _api() as api:
        out = api.deploy(model_name, model_version, selector, rollout=rollout_body)
    devices = out.get("devices") or []

    def lines() -> list[str]:
        result = [(f"Deployment {out.get('id')}: {model_name} {model_version} to "
                   f"{len(devices)} device(s): {', '.join(devices) or '-'}")]
        superseded = out.get("superseded_rollouts") or []
        if superseded:
            result.append(f"Superseded rollout(s): {', '.join(map(str, superseded))}")
        rollout = out.get("rollout")
        if rollout:
            moved = [d.get("device_id") for d in rollout.get("devices") or ()]
            result.append(f"Rollout {rollout.get('id')} {rollout.get('status')} in waves "
                          f"{rollout.get('waves_text')}: wave {rollout.get('wave')} took "
                          f"{len(moved)} device(s): {', '.join(moved) or '-'}")
        result.append("Desired state re-signed for: "
                      f"{', '.join(out.get('desired_changed') or ()) or '-'}")
        result.append("Follow it with: fleet_server rollout status"
                      + (f" {rollout.get('id')}" if rollout else ""))
        return result
    _emit(out, lines)


@_subgroup(cli, "deployment")
def deployment() -> None:
    """List and cancel deployments.

    \b
    Example:
      fleet_server deployment list
      fleet_server deployment cancel 3
    """


@_command(deployment, "list")
@api_options
def deployment_list() -> None:
    """List deployments, newest first: model, version, selector, status.

    \b
    Example:
      fleet_server deployment list
    """
    with _errors(), _api() as api:
        items = api.list_deployments()
    _emit(items, lambda: _table(["ID", "MODEL", "VERSION", "TO", "STATUS", "CREATED"], [
        [d.get("id"), d.get("model"), d.get("version"), _selector_text(d.get("selector") or {}),
         d.get("status"), _when(d.get("created_at"))] for d in items]))


@_command(deployment, "cancel")
@click.argument("deployment_id", metavar="ID", type=int)
@api_options
def deployment_cancel(deployment_id: int) -> None:
    """Cancel a deployment; its devices fall back to what older active deployments say.

    \b
    Example:
      fleet_server deployment cancel 3
    """
    with _errors(), _api() as api:
        out = api.cancel_deployment(deployment_id)
    _emit(out, lambda: [f"Deployment {out.get('id', deployment_id)} is {out.get('status')}."])


@_subgroup(cli, "rollout")
def rollout() -> None:
    """Follow deployments on the devices; pause, resume or cancel staged rollouts.

    A rollout has the id of the deployment that started it (`deploy --waves ...`).

    \b
    Example:
      fleet_server rollout status
      fleet_server rollout status 7
      fleet_server rollout pause 7 --reason "error rate on line 3"
    """


@_command(rollout, "status")
@click.argument("rollout_id", metavar="[ID]", required=False, type=click.IntRange(min=1))
@click.option("--all", "include_inactive", is_flag=True,
              help="Without ID: include cancelled and superseded deployments.")
@api_options
def rollout_status(rollout_id: int | None, include_inactive: bool) -> None:
    """Show one rollout in detail, or every deployment's progress.

    With ID: the rollout's status and reason, its gates, per wave how many devices were
    assigned, committed, failed, are pending or reverted, the latest gate evaluation, and
    every moved device's desired version against the version it runs, its last result and
    why it is not committed (a device that rolled back by itself shows its error).

    Without ID: the rollouts, then per active deployment and targeted device the desired
    sequence against what it runs (for a rollout, which wave took it, or `waiting`).

    \b
    Example:
      fleet_server rollout status 7
      fleet_server rollout status
      fleet_server rollout status --all --json
    """
    if rollout_id is not None:
        if include_inactive:
            raise click.UsageError("--all applies without ID only")
        with _errors(), _api() as api:
            one = api.get_rollout(rollout_id)
        _emit(one, lambda: cli_text.rollout_lines(one))
        return
    with _errors(), _api() as api:
        status = api.rollout(include_inactive=include_inactive)
    shown = [e["rollout"] for e in status if e.get("rollout")]

    def lines() -> list[str]:
        out = []
        if shown:
            out += ["Rollouts (details: fleet_server rollout status ID):",
                    *cli_text.rollouts_table(shown)]
        return out + cli_text.deployment_progress_lines(status)
    _emit(status, lines)


def _rollout_command(command: str, rollout_id: int, reason: str | None) -> None:
    with _errors(), _api() as api:
        out = api.command_rollout(rollout_id, command, reason)
    _emit(out, lambda: [
        f"Rollout {out.get('id', rollout_id)} is {out.get('status')}"
        + (f": {out['reason']}" if out.get("reason") else "") + ".",
        *cli_text.rollout_lines(out)[1:]])


@_command(rollout, "pause")
@click.argument("rollout_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--reason", help="Why (shown in the rollout's status).")
@api_options
def rollout_pause(rollout_id: int, reason: str | None) -> None:
    """Pause a running rollout: no more devices are moved until it is resumed.

    Devices already moved keep the new version; one that fails is still put back.

    \b
    Example:
      fleet_server rollout pause 7 --reason "investigating errors on line 3"
    """
    _rollout_command("pause", rollout_id, reason)


@_command(rollout, "resume")
@click.argument("rollout_id", metavar="ID", type=click.IntRange(min=1))
@api_options
def rollout_resume(rollout_id: int) -> None:
    """Resume a paused rollout. Its gates are judged again at once: one paused by a failed
    gate pauses again unless the devices' reports changed.

    \b
    Example:
      fleet_server rollout resume 7
    """
    _rollout_command("resume", rollout_id, None)


@_command(rollout, "cancel")
@click.argument("rollout_id", metavar="ID", type=click.IntRange(min=1))
@click.option("--reason", help="Why (shown in the rollout's status).")
@api_options
def rollout_cancel(rollout_id: int, reason: str | None) -> None:
    """Cancel a rollout: every device it moved goes back to its previous version (a new
    signed desired state). Refused for a rollout that already finished.

    \b
    Example:
      fleet_server rollout cancel 7 --reason "wrong model"
    """
    _rollout_command("cancel", rollout_id, reason)


# --------------------------------------------------------------------------------- monitor

_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _parse_duration(ctx: click.Context, param: click.Parameter, value: str | None, *,
                    zero: bool) -> int | None:
    """``90``, ``90s``, ``15m``, ``6h``, ``2d`` -> seconds (``0`` only where ``zero``)."""
    if value is None:
        return None
    number, unit = value[:-1] if value[-1:].isalpha() else value, value[-1:].lower() \
        if value[-1:].isalpha() else ""
    if not number.isdigit() or unit not in _DURATION_UNITS or (int(number) == 0 and not zero):
        expected = "a duration such as " + ("0, " if zero else "") + "90s, 15m, 6h or 2d"
        raise click.BadParameter(f"{value!r}: expected {expected}", ctx, param)
    return int(number) * _DURATION_UNITS[unit]


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """A duration over 0: a range, a bucket or a window."""
    return _parse_duration(ctx, param, value, zero=False)


def _hold_duration(ctx: click.Context, param: click.Parameter, value: str | None
                   ) -> int | None:
    """A duration that may be 0 (``--for 0s``: at once, the default)."""
    return _parse_duration(ctx, param, value, zero=True)


def span_options(fn: F) -> F:
    """Shared options of the monitoring commands: how far back, and the bucket size."""
    options = [
        click.option("--since", "since_s", callback=_duration, metavar="DURATION",
                     help="How far back to look: 30m, 6h, 2d... [default: 1h]."),
        click.option("--bucket", "bucket_s", callback=_duration, metavar="DURATION",
                     help="Time bucket of the series, e.g. 5m [default: the server picks one "
                          "giving at most 60]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _since(since_s: int | None) -> int | None:
    """The API's ``since``: ``since_s`` before now on this machine's clock (the server's
    clock ends the range)."""
    import time

    return None if since_s is None else int(time.time()) - since_s


@_subgroup(cli, "monitor")
def monitor() -> None:
    """Watch models on the devices: requests, errors, latency percentiles, input drift.

    Computed by the server from the devices' own summaries (never raw data), on the
    server's clock: a record counts when the server received it.

    \b
    Example:
      fleet_server monitor fleet
      fleet_server monitor model digits --since 6h
      fleet_server monitor drift digits --device pi-2
    """


@_command(monitor, "fleet")
@span_options
@api_options
def monitor_fleet(since_s: int | None, bucket_s: int | None) -> None:
    """Devices by state, open alerts, and per model version where it runs, its requests,
    errors, p95 latency and largest input PSI.

    \b
    Example:
      fleet_server monitor fleet --since 24h
    """
    with _errors(), _api() as api:
        view = api.monitor_fleet(since=_since(since_s), bucket=bucket_s)
    _emit(view, lambda: cli_text.fleet_monitor_lines(view))


@_command(monitor, "model")
@click.argument("model_name", metavar="NAME")
@span_options
@api_options
def monitor_model(model_name: str, since_s: int | None, bucket_s: int | None) -> None:
    """One model: per version and per device, requests, errors, latency percentiles against
    the profile's budget, and the largest input PSI. Devices that run it but sent nothing
    show 0 requests.

    \b
    Example:
      fleet_server monitor model digits --since 6h --json
    """
    with _errors(), _api() as api:
        view = api.monitor_model(model_name, since=_since(since_s), bucket=bucket_s)
    _emit(view, lambda: cli_text.model_monitor_lines(view))


@_command(monitor, "drift")
@click.argument("model_name", metavar="NAME")
@click.option("--model-version", "model_version", metavar="VERSION",
              help="One version of the model [default: every version].")
@click.option("--device", "device_id", metavar="ID", help="One device; also lists its "
                                                           "buckets.")
@span_options
@api_options
def monitor_drift(model_name: str, model_version: str | None, device_id: str | None,
                  since_s: int | None, bucket_s: int | None) -> None:
    """Input drift over time from the devices' drift summaries: per device its latest
    largest feature PSI, the trend over the range, the PSI per bucket as a sparkline, and the
    features that moved most in its latest window. --json adds, per bucket, the PSI and JS of
    every feature (largest and mean over devices).

    \b
    Example:
      fleet_server monitor drift digits
      fleet_server monitor drift digits --device pi-2 --since 30m --bucket 1m
    """
    with _errors(), _api() as api:
        view = api.monitor_drift(model_name, version=model_version, device=device_id,
                                 since=_since(since_s), bucket=bucket_s)
    _emit(view, lambda: cli_text.drift_lines(view))


# --------------------------------------------------------------------------------- alerts

@_subgroup(cli, "alert")
def alert() -> None:
    """Alert rules on a model's devices, and the alerts they raise.

    The server evaluates every rule in its maintenance pass: an alert is pending while the
    condition holds for less than --for, then firing, and resolved once it no longer holds.
    Each change is in the audit log, and a rule's --webhook gets a JSON POST when its alert
    fires and when it resolves.

    \b
    Example:
      fleet_server alert rule add digits --kind drift_psi --threshold 0.25 --for 10m
      fleet_server alert list --state firing
    """


@_subgroup(alert, "rule")
def alert_rule() -> None:
    """Add, list and remove alert rules.

    \b
    Example:
      fleet_server alert rule list
    """


@_command(alert_rule, "add")
@click.argument("model_name", metavar="MODEL")
@click.option("--kind", required=True,
              type=click.Choice(["drift_psi", "error_rate", "p95_latency"]),
              help="drift_psi: a device's largest input-feature PSI is over --threshold; "
                   "error_rate: its errors/requests are; p95_latency: its p95 latency in ms "
                   "is (without --threshold: over its profile's latency budget).")
@click.option("--threshold", type=float, help="The limit (see --kind).")
@click.option("--model-version", "model_version", metavar="VERSION",
              help="One version of the model [default: every version].")
@click.option("--min-devices", type=click.IntRange(min=1), default=1, show_default=True,
              help="Devices that must be over the threshold at once.")
@click.option("--for", "for_s", callback=_hold_duration, metavar="DURATION",
              help="How long it must hold before the alert fires [default: 0, at once].")
@click.option("--window", "window_s", callback=_duration, metavar="DURATION",
              help="How much of each device's history is judged [default: 5m].")
@click.option("--min-samples", type=click.IntRange(min=1), metavar="N",
              help="Requests (drift: predictions) a device needs in the window to be judged "
                   "[default: 100].")
@click.option("--webhook", "webhook_url", metavar="URL",
              help="POST a JSON payload here when the alert fires and when it resolves.")
@api_options
def alert_rule_add(model_name: str, kind: str, threshold: float | None,
                   model_version: str | None, min_devices: int, for_s: int | None,
                   window_s: int | None, min_samples: int | None,
                   webhook_url: str | None) -> None:
    """Add an alert rule on a model's devices (needs a publisher token).

    \b
    Example:
      fleet_server alert rule add digits --kind drift_psi --threshold 0.25 \\
          --min-devices 2 --for 10m --webhook https://hooks.example.com/edgefleet
      fleet_server alert rule add digits --kind error_rate --threshold 0.02
      fleet_server alert rule add digits --kind p95_latency --model-version 1.1.0
    """
    body: dict[str, Any] = {"model": model_name, "kind": kind, "threshold": threshold,
                            "min_devices": min_devices}
    optional = {"version": model_version, "for_s": for_s, "window_s": window_s,
                "min_samples": min_samples, "webhook_url": webhook_url}
    body.update({k: v for k, v in optional.items() if v is not None})
    with _errors(), _api() as api:
        rule = api.create_alert_rule(body)
    _emit(rule, lambda: [f"Added alert rule {rule.get('id')}:",
                         *cli_text.alert_rules_table([rule])])


@_command(alert_rule, "list")
@api_options
def alert_rule_list() -> None:
    """List the alert rules.

    \b
    Example:
      fleet_server alert rule list --json
    """
    with _errors(), _api() as api:
        rules = api.list_alert_rules()
    _emit(rules, lambda: cli_text.alert_rules_table(rules))


@_command(alert_rule, "rm")
@click.argument("rule_id", metavar="ID", type=click.IntRange(min=1))
@api_options
def alert_rule_rm(rule_id: int) -> None:
    """Remove an alert rule; its open alert resolves (needs a publisher token).

    \b
    Example:
      fleet_server alert rule rm 3
    """
    with _errors(), _api() as api:
        rule = api.delete_alert_rule(rule_id)
    _emit(rule, lambda: [(f"Removed alert rule {rule.get('id')} ({rule.get('kind')} on "
                          f"{rule.get('model')}).")])


@_command(alert, "list")
@click.option("--state", type=click.Choice(["pending", "firing", "resolved"]),
              help="Only alerts in this state.")
@click.option("--model", "model_name", help="Only alerts about this model.")
@api_options
def alert_list(state: str | None, model_name: str | None) -> None:
    """List alerts, newest first: state, when it started, fired and resolved, and what
    held (the devices over the threshold and their values).

    \b
    Example:
      fleet_server alert list --state firing
    """
    with _errors(), _api() as api:
        alerts = api.list_alerts(state=state, model=model_name)
    _emit(alerts, lambda: cli_text.alerts_table(alerts))


# --------------------------------------------------------------------------------- audit

@_command(cli, "audit")
@api_options
def audit() -> None:
    """Print the audit log and check its hash chain (exit 1 if it is broken).

    \b
    Example:
      fleet_server audit --json
    """
    with _errors(), _api() as api:
        out = api.audit()
    entries = out.get("entries") or out.get("items") or []
    intact = out.get("chain_intact", out.get("intact"))
    broken_at = out.get("first_broken_id", out.get("broken_at"))

    def lines() -> list[str]:
        verdict = ("intact" if intact else
                   f"BROKEN at entry {broken_at}" if intact is False else "not reported")
        return [*_table(["ID", "AT", "ACTOR", "ACTION", "TARGET"], [
            [e.get("id"), _when(e.get("at")), e.get("actor"), e.get("action"), e.get("target")]
            for e in entries]), f"{len(entries)} entries; hash chain: {verdict}"]
    _emit(out, lines)
    if intact is False:
        raise click.exceptions.Exit(EXIT_ERROR)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name=PROG)


if __name__ == "__main__":  # pragma: no cover
    main()

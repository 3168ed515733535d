"""Mosquitto as edgefleet's broker: config, password and ACL files, and a test process.

Production runs a system Mosquitto (2.0.x) from files this module writes::

    render_mosquitto_config(...)  -> mosquitto.conf text: one listener, no anonymous clients,
                                     password_file, acl_file, max_packet_size, optional TLS
    write_mosquitto_files(...)    -> password file (``user:$7$...``, the hashes the server
                                     stores, :mod:`fleet_server.mqtt.passwords`) and ACL file
                                     (:func:`agent.protocol.topics.mosquitto_acl`), atomically

After rewriting the files, send the broker SIGHUP: Mosquitto re-reads both and disconnects
connected clients whose credentials are gone (revocation). :class:`MosquittoProcess` does all
of this for tests on a free loopback port.

File permissions: the files are 0600 (0640 with ``group``). Started as root, Mosquitto drops
to the ``mosquitto`` user before reading them (and re-reads them as that user on SIGHUP), so
either pass ``group=`` a group that user is in, or run it with ``user root`` in the config
(``render_mosquitto_config(..., user="root")``), or start it as the files' owner.

Mosquitto queues at most 1,000 messages per offline client and then drops silently: never rely
on the broker's queue; the retained desired state is the truth.

Errors: ``ValueError`` for names or values that would corrupt the files (a ``:`` in a username,
a newline in a path); :class:`fleet_server.mqtt.errors.BrokerSetupError` when the test process
cannot start or reload. Standard library only (plus :mod:`agent.protocol`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from agent.protocol.messages import MAX_MESSAGE_BYTES
from agent.protocol.topics import is_valid_device_id, mosquitto_acl
from fleet_server.mqtt.errors import BrokerSetupError
from fleet_server.mqtt.passwords import is_password_hash

__all__ = [
    "MAX_PACKET_BYTES",
    "MosquittoFiles",
    "MosquittoProcess",
    "MosquittoTls",
    "find_mosquitto",
    "is_loopback",
    "render_mosquitto_config",
    "write_mosquitto_files",
]

logger = logging.getLogger(__name__)

#: the largest MQTT packet (remaining length) either broker accepts from a client: a
#: MAX_MESSAGE_BYTES payload plus room for topic, packet id and CONNECT fields
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + 1024
_FIXED_HEADER_MAX = 5  # Mosquitto's max_packet_size counts the fixed header too


@dataclass(frozen=True)
class MosquittoTls:
    """TLS for the Mosquitto listener (paths as Mosquitto will see them)."""

    certfile: Path
    keyfile: Path
    #: CA for client certificates; with it, clients must present one (mutual TLS)
    client_ca_file: Path | None = None


@dataclass(frozen=True)
class MosquittoFiles:
    """What :func:`write_mosquitto_files` wrote."""

    password_file: Path
    acl_file: Path


def _config_value(what: str, value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in "\r\n\0") or text != text.strip():
        raise ValueError(f"mosquitto config: {what} must be one non-empty line without "
                         f"surrounding spaces, got {text!r}")
    return text


def is_loopback(host: str) -> bool:
    """True when ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def render_mosquitto_config(listen_host: str, port: int, password_file: Path | str,
                            acl_file: Path | str, *, persistence_dir: Path | str | None = None,
                            user: str | None = None, tls: MosquittoTls | None = None) -> str:
    """The text of a ``mosquitto.conf`` for edgefleet (Mosquitto 2.0).

    One listener, no anonymous clients, the password and ACL files, packets over
    :data:`MAX_PACKET_BYTES` refused (the client is disconnected), logs to stderr.

    Args:
        listen_host: address of the listener; anything but loopback without ``tls`` logs a
            loud warning.
        port: TCP port of the listener.
        password_file: path of the password file (from :func:`write_mosquitto_files`).
        acl_file: path of the ACL file (from :func:`write_mosquitto_files`).
        persistence_dir: keep retained messages and sessions on disk there (``None``: in
            memory; the server republishes desired states at start-up anyway).
        user: the ``user`` Mosquitto switches to when started as root (``"root"`` keeps root;
            ``None`` leaves Mosquitto's default, ``mosquitto``).
        tls: certificate and key for the listener, or None for plain MQTT.

    Raises:
        ValueError: a value holds a newline or is empty, or the port is out of range.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"mosquitto config: port must be 1..65535, got {port}")
    host = _config_value("listen_host", listen_host)
    if tls is None and not is_loopback(host):
        logger.warning(
            "MOSQUITTO LISTENER ON %s WITHOUT TLS: device passwords and desired states cross "
            "the network in clear text. Listen on 127.0.0.1 or configure TLS.", host)
    lines = [
        "# edgefleet broker config (generated by fleet_server.mqtt.mosquitto; do not edit)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {_config_value('password_file', password_file)}",
        f"acl_file {_config_value('acl_file', acl_file)}",
        f"max_packet_size {MAX_PACKET_BYTES + _FIXED_HEADER_MAX}",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if user is not None:
        lines.append(f"user {_config_value('user', user)}")
    if persistence_dir is None:
        lines.append("persistence false")
    else:
        location = _config_value("persistence_dir", persistence_dir).rstrip("/") + "/"
        lines += ["persistence true", f"persistence_location {location}"]
    lines += ["", f"listener {port} {host}"]
    if tls is not None:
        lines += [f"certfile {_config_value('certfile', tls.certfile)}",
                  f"keyfile {_config_value('keyfile', tls.keyfile)}",
                  "tls_version tlsv1.2"]
        if tls.client_ca_file is not None:
            lines += [f"cafile {_config_value('client_ca_file', tls.client_ca_file)}",
                      "require_certificate true"]
    return "\n".join(lines) + "\n"


def _check_credentials(credentials: Mapping[str, str], server_user: str) -> list[str]:
    lines = []
    for username in sorted(credentials):
        stored = credentials[username]
        if username != server_user and not is_valid_device_id(username):
            raise ValueError(f"mosquitto password file: username {username!r} is neither the "
                             "server user nor a valid device id")
        if not username or any(c in username for c in ":\r\n\0") or username.strip() != username:
            raise ValueError(f"mosquitto password file: username {username!r} cannot be "
                             "written (':', whitespace or a newline)")
        if not is_password_hash(stored):
            raise ValueError(f"mosquitto password file: the entry for {username!r} is not a "
                             "$7$ hash (store hashes, never passwords)")
        lines.append(f"{username}:{stored}")
    return lines


def _write_atomic(path: Path, text: str, *, mode: int, group: int | None) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same directory and os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), mode)
            if group is not None:
                os.fchown(handle.fileno(), -1, group)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _group_id(group: int | str) -> int:
    if isinstance(group, int):
        return group
    import grp  # POSIX only; imported here so the module stays importable elsewhere

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError as exc:
        raise ValueError(f"mosquitto files: no group named {group!r}") from exc


def write_mosquitto_files(directory: Path | str, credentials: Mapping[str, str],
                          server_user: str, *, group: int | str | None = None) -> MosquittoFiles:
    """Write ``passwd`` and ``acl`` for Mosquitto into ``directory``, atomically.

    Args:
        directory: an existing directory (keep it private: 0700 or 0750).
        credentials: username -> ``$7$`` hash, devices and the server user alike. A username
            missing here cannot connect: removing one and reloading is revocation.
        server_user: the fleet server's MQTT username (may touch all of ``edgefleet/v1/``).
        group: give both files this group and mode 0640 (e.g. ``"mosquitto"`` when root
            starts the broker and it drops to that user); None: mode 0600.

    Returns:
        The paths written.

    Raises:
        ValueError: a username is not a device id (or the server user) or cannot be written,
            a value is not a ``$7$`` hash, the server user is unusable in an ACL, or the group
            does not exist.
        OSError: the directory is missing or not writable.
    """
    lines = _check_credentials(credentials, server_user)
    acl = mosquitto_acl(server_user)
    gid = None if group is None else _group_id(group)
    mode = 0o600 if gid is None else 0o640
    root = Path(directory)
    files = MosquittoFiles(password_file=root / "passwd", acl_file=root / "acl")
    header = "# edgefleet MQTT users (generated by fleet_server.mqtt.mosquitto; do not edit)\n"
    _write_atomic(files.password_file, header + "".join(f"{line}\n" for line in lines),
                  mode=mode, group=gid)
    _write_atomic(files.acl_file, acl, mode=mode, group=gid)
    return files


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (PATH, then /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = Path("/usr/sbin/mosquitto")
    return str(fallback) if os.access(fallback, os.X_OK) else None


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class MosquittoProcess:
    """A real Mosquitto on a free loopback port, for tests (production uses a system one).

    ::

        with MosquittoProcess(tmp_path, {"d1": hash_password(pw), ...}, "fleet-server") as m:
            ... connect to m.host, m.port ...
            m.reload({"fleet-server": ...})   # d1 revoked: refused from now on

    Started as root, the config says ``user root`` so the 0600 files stay readable.

    Args:
        directory: where config, password, ACL and log files go.
        credentials: username -> ``$7$`` hash.
        server_user: the fleet server's MQTT username.
        binary: the mosquitto executable (default: :func:`find_mosquitto`).
        host: listen address (loopback).
        start_timeout: seconds to wait until the broker accepts connections.
    """

    def __init__(self, directory: Path | str, credentials: Mapping[str, str], server_user: str,
                 *, binary: str | None = None, host: str = "127.0.0.1",
                 start_timeout: float = 10.0) -> None:
        self._dir = Path(directory)
        self._credentials = dict(credentials)
        self._server_user = server_user
        self._binary = binary or find_mosquitto()
        self.host = host
        self._start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None
        self.log_file = self._dir / "mosquitto.log"

    @property
    def port(self) -> int:
        """The listener's port.

        Raises:
            RuntimeError: not started.
        """
        if self._port is None:
            raise RuntimeError("MosquittoProcess.port: not started")
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://host:port`` without credentials."""
        return f"mqtt://{self.host}:{self.port}"

    def log_text(self) -> str:
        """Everything Mosquitto logged so far."""
        try:
            return self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Write the files, start Mosquitto and wait until it accepts TCP connections.

        Raises:
            BrokerSetupError: no mosquitto binary, it exited, or it did not accept connections
                within ``start_timeout`` (its log is in the message).
            RuntimeError: already started.
        """
        if self._process is not None:
            raise RuntimeError("MosquittoProcess.start: already started")
        if self._binary is None:
            raise BrokerSetupError("mosquitto: no binary found on PATH or in /usr/sbin")
        files = write_mosquitto_files(self._dir, self._credentials, self._server_user)
        for _attempt in range(3):  # the free port can be taken between probe and bind
            port = _free_port(self.host)
            config = self._dir / "mosquitto.conf"
            config.write_text(render_mosquitto_config(
                self.host, port, files.password_file, files.acl_file,
                user="root" if os.geteuid() == 0 else None), encoding="utf-8")
            with self.log_file.open("ab") as log:
                process = subprocess.Popen([self._binary, "-c", str(config)],
                                           stdout=log, stderr=log, stdin=subprocess.DEVNULL)
            if self._wait_accepting(process, port):
                self._process, self._port = process, port
                return
            if "Address already in use" not in self.log_text():
                break
        raise BrokerSetupError(f"mosquitto did not start on {self.host}; its log:\n"
                               f"{self.log_text()[-2000:]}")

    def _wait_accepting(self, process: subprocess.Popen[bytes], port: int) -> bool:
        """Bounded poll: connect until accepted; False if the process exits or time runs out."""
        deadline = time.monotonic() + self._start_timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, port), timeout=0.5):
                    return True
            except OSError:
                pass  # not listening yet: wait below, noticing an early exit
            try:
                process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            return False
        process.kill()
        process.wait()
        return False

    def reload(self, credentials: Mapping[str, str] | None = None, *,
               timeout: float = 10.0) -> None:
        """Rewrite the files (with new ``credentials`` if given), SIGHUP, wait for the reload.

        Returns once Mosquitto has logged "Reloading config.": it reloads synchronously in
        that loop iteration, so every packet it reads afterwards sees the new files.

        Raises:
            BrokerSetupError: the process is gone or did not reload within ``timeout``.
            RuntimeError: not started.
        """
        if self._process is None:
            raise RuntimeError("MosquittoProcess.reload: not started")
        if credentials is not None:
            self._credentials = dict(credentials)
        write_mosquitto_files(self._dir, self._credentials, self._server_user)
        before = self.log_text().count("Reloading config.")
        self._process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count("Reloading config.") > before:
                return
            try:
                self._process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                continue
            raise BrokerSetupError(f"mosquitto exited during reload; its log:\n"
                                   f"{self.log_text()[-2000:]}")
        raise BrokerSetupError(f"mosquitto did not reload within {timeout} s")

    def stop(self) -> None:
        """Terminate Mosquitto (kill after 5 s). Idempotent."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

"""Agent configuration: an explicit frozen value, built once by :func:`load_config`.

The config file (TOML) names the provisioning file and the data directory; everything secret
lives in the provisioning file (0600). ``EDGEFLEET_AGENT_<FIELD>`` environment variables
override the file (e.g. ``EDGEFLEET_AGENT_HTTP_PORT=0``). A fallback file on the persistent data
partition is read when the main one is missing (mender's ``LoadConfig(main, fallback)``).

Data directory layout (index of every on-disk file; cf. STYLE rule 6)::

    <data_dir>/state.db          update state machine records (since 1)
    <data_dir>/outbox.db         telemetry/drift/events outbox, WAL (since 1)
    <data_dir>/tuf/              TUF client metadata (root pinned from provisioning) (since 1)
    <data_dir>/downloads/        partial downloads; never installed from here (since 1)
    <data_dir>/models/<name>/<version>/{model.onnx|model.tflite, manifest.json} (since 1)
    <data_dir>/models/<name>/current  -> symlink to the active version dir; swapped
                                         atomically (rename of a temp symlink) (since 1)
    <data_dir>/models/<name>/previous -> the version kept for instant rollback (since 1)
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from agent.errors import ConfigError

__all__ = ["AgentConfig", "load_config"]


@dataclass(frozen=True)
class AgentConfig:
    provisioning: Path  # the file `fleet_server device provision` wrote (0600)
    data_dir: Path  # persistent partition: state, outbox, models
    http_host: str = "127.0.0.1"  # local inference API; loopback unless you mean it
    http_port: int = 8500  # 0 = any free port (tests)
    max_body_bytes: int = 8 << 20  # inference request bodies over this get 413
    outbox_max_rows: int = 1_000_000  # cap on disk; raw metrics evicted first
    metrics_interval_s: float = 10.0  # per-request metrics aggregated per interval
    drift_window: int = 500  # predictions per drift summary window
    drift_window_s: float = 300.0  # or this many seconds, whichever first
    sync_batch: int = 500  # outbox rows per MQTT message
    reconnect_min_s: float = 1.0  # backoff floor
    reconnect_max_s: float = 60.0  # backoff cap (jittered)
    max_download_bytes: int = 1 << 30  # hard cap on any one target download
    boot_loop_limit: int = 5  # state writes in one state before LoopDetected

    def with_overrides(self, **changes: Any) -> AgentConfig:
        return replace(self, **changes)


def _coerce(name: str, kind: Any, value: Any, source: str) -> Any:
    try:
        if kind in (Path, "Path"):
            return Path(value)
        if kind in (int, "int"):
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if kind in (float, "float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}: expected {kind}, got {value!r}") from exc


def load_config(main: Path, fallback: Path | None = None,
                environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the config file (or the fallback), apply environment overrides, check it.

    Raises:
        ConfigError: neither file readable, not TOML, unknown or mistyped field, a required
            field missing.
    """
    env = os.environ if environ is None else environ
    source = main
    if not main.is_file() and fallback is not None and fallback.is_file():
        source = fallback
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {main} not found"
                          + (f" (nor fallback {fallback})" if fallback else "")) from exc
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {source}: {exc}") from exc
    known = {f.name: f.type for f in fields(AgentConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field {unknown[0]!r}; expected one of "
                          f"{', '.join(sorted(known))}")
    values = {k: _coerce(k, known[k], v, str(source)) for k, v in data.items()}
    for name, kind in known.items():
        key = f"EDGEFLEET_AGENT_{name.upper()}"
        if key in env:
            values[name] = _coerce(name, kind, env[key], key)
    for required in ("provisioning", "data_dir"):
        if required not in values:
            raise ConfigError(f"{source}: {required!r} is required")
    # relative paths are relative to the config file, not to wherever the daemon started
    for name in ("provisioning", "data_dir"):
        if not values[name].is_absolute():
            values[name] = (source.parent / values[name]).resolve()
    cfg = AgentConfig(**values)
    if cfg.http_port < 0 or cfg.http_port > 65535:
        raise ConfigError(f"{source}: http_port: expected 0..65535, got {cfg.http_port}")
    return cfg

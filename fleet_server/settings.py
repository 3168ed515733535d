"""Server configuration: one explicit value, validated when the app is built (never at import).

Every field can come from the environment as ``EDGEFLEET_<FIELD>`` (e.g. ``EDGEFLEET_DATA_DIR``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from fleet_server.monitoring.allowlist import WebhookAllowList

__all__ = ["SERVER_MQTT_USER", "Settings", "is_loopback"]

#: the server's own MQTT username; '_' can never appear in a device id, so no device can take it
SERVER_MQTT_USER = "_edgefleet_server"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEFLEET_", extra="forbid", frozen=True)

    data_dir: Path
    database_url: str | None = None  # default: sqlite:///<data_dir>/fleet.db (WAL)
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None  # what devices use to reach us; default http://host:port
    mqtt_url: str = "embedded"  # or mqtt://user:pass@host:port / mqtts://...
    mqtt_host: str = "127.0.0.1"  # embedded broker bind address
    mqtt_port: int = Field(1883, ge=0, le=65535)  # embedded broker port (0 = any free port)
    mqtt_public_url: str | None = None  # broker URL written into provisioning files
    desired_ttl_s: int = Field(7 * 24 * 3600, ge=60)  # desired states expire after this
    desired_refresh_margin_s: int = Field(24 * 3600, ge=10)  # re-sign this long before expiry
    max_upload_bytes: int = Field(512 << 20, ge=1024)  # largest accepted bundle file
    max_page_size: int = Field(500, ge=1, le=10000)
    environment: str = "development"  # "production" refuses insecure defaults
    # device_records (telemetry, drift) kept this many days after the server received them;
    # 0 keeps them forever (fleet_server.monitoring.retention)
    record_retention_days: int = Field(30, ge=0, le=36500)
    # where alert webhooks may POST: hosts, *.domains, IPs or http(s) URL prefixes; None
    # allows any URL (warned at start), [] none (fleet_server.monitoring.allowlist).
    # From the environment as JSON: EDGEFLEET_WEBHOOK_ALLOW='["hooks.example.com"]'
    webhook_allow: tuple[str, ...] | None = None
    # processes that parse telemetry off the ingest thread once it falls behind; None picks
    # min(2, CPUs - 1), 0 parses on the ingest thread (fleet_server.ingest_parse)
    ingest_parse_workers: int | None = Field(None, ge=0, le=64)

    @field_validator("environment")
    @classmethod
    def _env(cls, v: str) -> str:
        if v not in ("development", "production"):
            raise ValueError(f"expected 'development' or 'production', got {v!r}")
        return v

    @field_validator("webhook_allow")
    @classmethod
    def _webhook_allow(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        from fleet_server.monitoring.allowlist import WebhookAllowList

        if v is not None:
            WebhookAllowList.parse(v)  # ValueError names the entry
        return v

    @property
    def webhook_allow_list(self) -> WebhookAllowList | None:
        """``webhook_allow`` parsed (None: no list, any URL)."""
        from fleet_server.monitoring.allowlist import WebhookAllowList

        return None if self.webhook_allow is None else WebhookAllowList.parse(
            self.webhook_allow)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'fleet.db'}"

    @property
    def base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def insecure_reasons(self) -> list[str]:
        """What is plain-text on a non-loopback address (said loudly; refused in production)."""
        out = []
        if not is_loopback(self.host) and not self.base_url.startswith("https://"):
            out.append(f"admin API on {self.host} without HTTPS (put a TLS proxy in front and "
                       "set public_url to https://...)")
        if self.mqtt_url == "embedded" and not is_loopback(self.mqtt_host):
            out.append(f"embedded MQTT broker on {self.mqtt_host} without TLS")
        if self.mqtt_url.startswith("mqtt://") and not any(
                h in self.mqtt_url for h in ("@127.", "@localhost", "//127.", "//localhost")):
            out.append("external MQTT broker over plain mqtt:// (use mqtts://)")
        return out

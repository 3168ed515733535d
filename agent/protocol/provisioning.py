"""The provisioning file: everything a device needs to join the fleet, written once by
``fleet_server device provision`` and read by the agent at start-up.

It holds secrets (MQTT password, HTTP token), so it is written 0600 and never logged. The TUF
root is pinned here: the agent trusts exactly this root and follows rotations from it.

Pure: stdlib only.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PROVISIONING_VERSION", "Provisioning", "ProvisioningError"]

PROVISIONING_VERSION = 1


class ProvisioningError(ValueError):
    """The provisioning file is malformed; names the field, expected against actual."""

    def __init__(self, path: str, expected: str, actual: object) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(f"provisioning field {path!r}: expected {expected}, got {actual!r}")


def _str(d: Mapping[str, Any], key: str, where: str) -> str:
    value = d.get(key)
    if not isinstance(value, str) or not value:
        raise ProvisioningError(f"{where}{key}", "a non-empty string",
                                "missing" if value is None else type(value).__name__)
    return value


def _obj(d: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = d.get(key)
    if not isinstance(value, dict):
        raise ProvisioningError(key, "an object", "missing" if value is None else
                                type(value).__name__)
    return value


@dataclass(frozen=True)
class Provisioning:
    device_id: str
    profile: str
    mqtt_url: str  # mqtt://host:port or mqtts://host:port
    mqtt_username: str
    mqtt_password: str
    http_url: str  # the fleet server's base URL
    http_token: str  # device-scope token: TUF metadata and targets only
    tuf_metadata_url: str
    tuf_targets_url: str
    tuf_root: bytes  # the pinned root.json, exact bytes
    director_keys_pem: tuple[str, ...]  # Ed25519 public keys that may sign desired states
    mqtt_ca_pem: str | None = None  # pinned broker CA for mqtts://
    unrecognized: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return (f"Provisioning(device_id={self.device_id!r}, profile={self.profile!r}, "
                f"mqtt_url={self.mqtt_url!r}, http_url={self.http_url!r})")

    @classmethod
    def from_dict(cls, data: object) -> Provisioning:
        """Raises: ProvisioningError on any missing or mistyped field."""
        if not isinstance(data, dict):
            raise ProvisioningError("(file)", "a JSON object", type(data).__name__)
        d = dict(data)
        version = d.pop("schema_version", None)
        if version != PROVISIONING_VERSION:
            raise ProvisioningError("schema_version", str(PROVISIONING_VERSION), version)
        mqtt, http, tuf, director = (_obj(d, k) for k in ("mqtt", "http", "tuf", "director"))
        for k in ("mqtt", "http", "tuf", "director"):
            d.pop(k)
        root = tuf.get("root")
        if not isinstance(root, dict) or root.get("signed", {}).get("_type") != "root":
            raise ProvisioningError("tuf.root", "a TUF root metadata object", type(root).__name__)
        keys = director.get("public_keys_pem")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) for k in keys):
            raise ProvisioningError("director.public_keys_pem", "a non-empty list of PEM strings",
                                    keys)
        url = _str(mqtt, "url", "mqtt.")
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ProvisioningError("mqtt.url", "mqtt://host:port or mqtts://host:port", url)
        ca = mqtt.get("ca_pem")
        device_id = d.pop("device_id", None)
        profile = d.pop("profile", None)
        return cls(
            device_id=_str({"device_id": device_id}, "device_id", ""),
            profile=_str({"profile": profile}, "profile", ""),
            mqtt_url=url,
            mqtt_username=_str(mqtt, "username", "mqtt."),
            mqtt_password=_str(mqtt, "password", "mqtt."),
            http_url=_str(http, "base_url", "http.").rstrip("/"),
            http_token=_str(http, "token", "http."),
            tuf_metadata_url=_str(tuf, "metadata_url", "tuf."),
            tuf_targets_url=_str(tuf, "targets_url", "tuf."),
            tuf_root=(base64.b64decode(tuf["root_b64"]) if isinstance(tuf.get("root_b64"), str)
                      else json.dumps(root, sort_keys=True, separators=(",", ":")).encode()),
            director_keys_pem=tuple(keys),
            mqtt_ca_pem=ca if isinstance(ca, str) else None,
            unrecognized=d,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Provisioning:
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProvisioningError("(file)", "UTF-8 JSON", str(exc)) from exc
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema_version": PROVISIONING_VERSION,
            "device_id": self.device_id,
            "profile": self.profile,
            "mqtt": {"url": self.mqtt_url, "username": self.mqtt_username,
                     "password": self.mqtt_password},
            "http": {"base_url": self.http_url, "token": self.http_token},
            "tuf": {"metadata_url": self.tuf_metadata_url, "targets_url": self.tuf_targets_url,
                    "root": json.loads(self.tuf_root),
                    # the exact bytes: TUF verifies signatures over the canonical form, but
                    # the agent writes root.json back to disk and should write what it got
                    "root_b64": base64.b64encode(self.tuf_root).decode("ascii")},
            "director": {"public_keys_pem": list(self.director_keys_pem)},
        }
        if self.mqtt_ca_pem:
            out["mqtt"]["ca_pem"] = self.mqtt_ca_pem
        out.update(self.unrecognized)
        return out

    def to_bytes(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n").encode("utf-8")

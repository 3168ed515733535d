"""MQTT for the fleet server: the embedded broker, Mosquitto files, the server's client.

::

    passwords   $7$ (PBKDF2-HMAC-SHA512) hashes, Mosquitto's format: the server stores only these
    broker      EmbeddedBroker: amqtt in-process, CredentialStore auth + the topics.may_access ACL
    mosquitto   mosquitto.conf / password / ACL files for a system Mosquitto; MosquittoProcess
    link        ServerLink: the server's paho client (publish-and-wait-PUBACK, subscribe, inbox)
    errors      MqttError tree under fleet_server.errors.FleetError

Topic names and the access rule come from :mod:`agent.protocol.topics`, message formats from
:mod:`agent.protocol.messages`: this package adds no second definition of either.

``broker`` imports amqtt and ``link`` imports paho; both are loaded lazily by attribute access
here, so importing ``fleet_server.mqtt`` for passwords or Mosquitto files pulls in neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fleet_server.mqtt.errors import (
    AckTimeoutError,
    BrokerSetupError,
    BrokerUnavailableError,
    ConnectRefusedError,
    MqttError,
    MqttFatalError,
    MqttTransientError,
    SubscribeRefusedError,
    TlsError,
)
from fleet_server.mqtt.mosquitto import (
    MAX_PACKET_BYTES,
    MosquittoFiles,
    MosquittoProcess,
    MosquittoTls,
    find_mosquitto,
    is_loopback,
    render_mosquitto_config,
    write_mosquitto_files,
)
from fleet_server.mqtt.passwords import (
    generate_password,
    hash_password,
    is_password_hash,
    verify_password,
)

if TYPE_CHECKING:
    from fleet_server.mqtt.broker import CredentialStore, EmbeddedBroker, server_tls_context
    from fleet_server.mqtt.link import InboundMessage, LinkConfig, ServerLink, redact_url

__all__ = [
    "MAX_PACKET_BYTES",
    "AckTimeoutError",
    "BrokerSetupError",
    "BrokerUnavailableError",
    "ConnectRefusedError",
    "CredentialStore",
    "EmbeddedBroker",
    "InboundMessage",
    "LinkConfig",
    "MosquittoFiles",
    "MosquittoProcess",
    "MosquittoTls",
    "MqttError",
    "MqttFatalError",
    "MqttTransientError",
    "ServerLink",
    "SubscribeRefusedError",
    "TlsError",
    "find_mosquitto",
    "generate_password",
    "hash_password",
    "is_loopback",
    "is_password_hash",
    "redact_url",
    "render_mosquitto_config",
    "server_tls_context",
    "verify_password",
    "write_mosquitto_files",
]

_LAZY = {
    "CredentialStore": "fleet_server.mqtt.broker",
    "EmbeddedBroker": "fleet_server.mqtt.broker",
    "server_tls_context": "fleet_server.mqtt.broker",
    "InboundMessage": "fleet_server.mqtt.link",
    "LinkConfig": "fleet_server.mqtt.link",
    "ServerLink": "fleet_server.mqtt.link",
    "redact_url": "fleet_server.mqtt.link",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

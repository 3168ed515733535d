"""Errors of the MQTT adapters (:mod:`fleet_server.mqtt`), split by who is at fault.

::

    FleetError                         (fleet_server.errors) root of every fleet_server error
    └── MqttError                      anything about the broker or the server's MQTT link
        ├── MqttTransientError         retry later, with backoff: nothing is wrong with us
        │   ├── BrokerUnavailableError cannot reach the broker, or the link is down right now
        │   └── AckTimeoutError        no CONNACK / PUBACK / SUBACK within the timeout
        └── MqttFatalError             retrying will not help: fix the configuration
            ├── ConnectRefusedError    the broker refused our CONNECT (credentials, ACL,
            │                          protocol); the code is in ``reason``
            ├── SubscribeRefusedError  the broker refused one or more topic filters (ACL)
            ├── TlsError               TLS files unusable, or the broker's certificate does
            │                          not verify against the pinned CA
            └── BrokerSetupError       a broker we run could not start or reload: port taken,
                                       unreadable TLS or password files, mosquitto exited

paho-mqtt's ``MQTTErrorCode`` / ``ReasonCode`` values, its ``RuntimeError`` / ``ValueError``
from ``wait_for_publish``, socket and ``ssl`` errors, and amqtt's ``BrokerError`` are
translated inside :mod:`fleet_server.mqtt.link` and :mod:`fleet_server.mqtt.broker` with
``raise ... from exc`` and never cross this package's boundary. Plain ``ValueError`` /
``RuntimeError`` mean programmer misuse (a wildcard in a publish topic, an oversized payload,
``publish`` before ``connect``).
"""

from __future__ import annotations

from fleet_server.errors import FleetError

__all__ = [
    "AckTimeoutError",
    "BrokerSetupError",
    "BrokerUnavailableError",
    "ConnectRefusedError",
    "MqttError",
    "MqttFatalError",
    "MqttTransientError",
    "SubscribeRefusedError",
    "TlsError",
]


class MqttError(FleetError):
    """Something about the MQTT broker or the server's link to it."""

    #: True when the same call may succeed later without a configuration change
    transient: bool = False


class MqttTransientError(MqttError):
    """The broker is unreachable or slow right now; retry with backoff."""

    transient = True


class BrokerUnavailableError(MqttTransientError):
    """The broker cannot be reached, or the link is down at the moment of the call."""


class AckTimeoutError(MqttTransientError):
    """The broker did not acknowledge (CONNACK, PUBACK, SUBACK) within the timeout."""


class MqttFatalError(MqttError):
    """Retrying will not help until someone fixes the configuration."""


class ConnectRefusedError(MqttFatalError):
    """The broker answered our CONNECT with a refusal (bad credentials, not authorised)."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        #: the broker's CONNACK reason, as paho names it (e.g. ``"Not authorized"``)
        self.reason = reason


class SubscribeRefusedError(MqttFatalError):
    """The broker refused one or more topic filters (its ACL does not allow them)."""

    def __init__(self, message: str, *, refused: tuple[str, ...]) -> None:
        super().__init__(message)
        #: the refused topic filters
        self.refused = refused


class TlsError(MqttFatalError):
    """TLS cannot work: unreadable CA/certificate/key files, or the broker's certificate does
    not verify against the pinned CA (or is for another host name)."""


class BrokerSetupError(MqttFatalError):
    """A broker we run (embedded amqtt, or a Mosquitto test process) failed to start or reload."""

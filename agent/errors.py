"""agent errors: one root, split by who is at fault.

::

    AgentError                     root of every error the agent raises on purpose
    ├── ConfigError                the config or provisioning file is wrong (fix it, restart)
    ├── ArtifactError              bad or hostile artifact: signature, digest, size, profile
    │   │                          mismatch, a desired state for another device, a replay.
    │   │                          FATAL for that update: reported to the fleet, never retried
    │   └── HealthCheckFailed      the new model loaded but broke its golden outputs or the
    │                              profile's latency budget (rolled back, reported)
    ├── TransportError             broker or server unreachable, download interrupted.
    │                              TRANSIENT: retried with capped, jittered backoff
    ├── InstallError               staging/activation failed on this device (disk, rename);
    │                              rolled back; if the rollback fails too, its error is
    │                              chained with ``add_note``/``__cause__``
    ├── RuntimeLoadError           the inference runtime cannot load or run a model
    ├── InputRejected              an inference request does not fit the model (HTTP 400)
    └── StoreError                 the agent's SQLite files failed (state, outbox)

Third-party exceptions (paho, tuf, onnxruntime, sqlite3) are translated inside the adapter that
calls them, with ``raise ... from exc``, and never cross a package boundary.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ArtifactError",
    "ConfigError",
    "HealthCheckFailed",
    "InputRejected",
    "InstallError",
    "RuntimeLoadError",
    "StoreError",
    "TransportError",
]


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""

    #: transient errors are retried with backoff; fatal ones are reported and not retried
    transient = False


class ConfigError(AgentError):
    """The config or provisioning file is wrong."""


class ArtifactError(AgentError):
    """A bad or hostile artifact or desired state (fatal for that update)."""


class HealthCheckFailed(ArtifactError):
    """The new model failed its on-device health check."""


class TransportError(AgentError):
    """The broker or server cannot be reached, or a download was interrupted (transient)."""

    transient = True


class InstallError(AgentError):
    """Staging or activation failed on this device."""


class RuntimeLoadError(AgentError):
    """The inference runtime cannot load or run a model."""


class InputRejected(AgentError):
    """An inference request does not fit the model's inputs."""


class StoreError(AgentError):
    """The agent's SQLite files failed."""

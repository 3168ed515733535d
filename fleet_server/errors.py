"""fleet_server errors: one root, split by who is at fault.

::

    FleetError                        root of every error fleet_server raises on purpose
    ├── RequestError                  the caller asked for something wrong (HTTP 4xx)
    │   ├── Unauthenticated           no token, or an unknown/revoked one (401)
    │   ├── Forbidden                 the token's scope does not allow it (403)
    │   ├── NotFound                  unknown device, model, version, deployment, rollout (404)
    │   ├── Conflict                  duplicate model version, device id taken, data dir
    │   │                             exists, deploy to devices with no artifact, a rollout
    │   │                             command its status does not allow (409)
    │   ├── InvalidInput              a field is wrong: names it, expected vs actual; a bad
    │   │                             rollout spec (422)
    │   └── PayloadTooLarge           upload over the configured limit (413)
    ├── BundleRejected                a pushed bundle is malformed or inconsistent (422)
    ├── StoreError                    the database or data directory failed (500)
    ├── BrokerError                   the MQTT broker cannot be reached or refused us
    └── TrustError                    the TUF repository (fleet_server.tuf_repo)
        ├── TargetError               the caller's artifact is not acceptable (fix it, re-push)
        │   ├── TargetNameError       not a safe relative URL path (``..``, ``/x``, ``a\\b``)
        │   ├── TargetSourceError     the file to publish is missing or not a regular file
        │   └── TargetConflictError   name already published with other bytes (immutable)
        ├── RepositoryStateError      the repository on disk is not usable as asked
        │   ├── RepositoryExistsError     ``create`` over an existing repository
        │   ├── RepositoryNotFoundError   ``open`` where there is no repository
        │   └── RepositoryCorruptError    metadata missing, unparsable or not verifiable
        └── KeyStoreError             a private key file is missing, unreadable, does not
                                      match its public key, or is readable by others

Every class carries ``status_code``; the API maps errors to HTTP in exactly one place
(``fleet_server.api.app``), never with HTTPException in domain code.
Other subsystems add their branches under ``FleetError``. Third-party exceptions
(python-tuf, securesystemslib, cryptography) are translated inside the adapter that calls
them, with ``raise ... from exc``, and never cross the package boundary. Plain
``ValueError`` / ``RuntimeError`` mean programmer misuse (a naive ``datetime``, an unknown
role name), not a fault of the repository or its inputs. ``OSError`` from the disk itself
(full, read-only) is passed through unchanged.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BundleRejected",
    "Conflict",
    "FleetError",
    "Forbidden",
    "InvalidInput",
    "KeyStoreError",
    "NotFound",
    "PayloadTooLarge",
    "RepositoryCorruptError",
    "RepositoryExistsError",
    "RepositoryNotFoundError",
    "RepositoryStateError",
    "RequestError",
    "StoreError",
    "TargetConflictError",
    "TargetError",
    "TargetNameError",
    "TargetSourceError",
    "TrustError",
    "Unauthenticated",
]


class FleetError(Exception):
    """Root of every error fleet_server raises on purpose."""

    status_code = 500


class RequestError(FleetError):
    """The caller asked for something wrong."""

    status_code = 400


class Unauthenticated(RequestError):
    """No token, or a token that is unknown or revoked."""

    status_code = 401


class Forbidden(RequestError):
    """The token's scope does not allow this."""

    status_code = 403


class NotFound(RequestError):
    """No such device, model, version or deployment."""

    status_code = 404


class Conflict(RequestError):
    """The request conflicts with what is stored."""

    status_code = 409


class InvalidInput(RequestError):
    """A field is wrong; the message names it, expected against actual."""

    status_code = 422


class PayloadTooLarge(RequestError):
    """An upload is over the configured limit."""

    status_code = 413


class BundleRejected(FleetError):
    """A pushed bundle is malformed, inconsistent or not for a known profile."""

    status_code = 422


class StoreError(FleetError):
    """The database or the data directory failed."""


class BrokerError(FleetError):
    """The MQTT broker cannot be reached or refused the server."""

    status_code = 503


class TrustError(FleetError):
    """Something about the TUF repository: its inputs, its files or its keys."""


class TargetError(TrustError):
    """The artifact offered for publication is not acceptable."""


class TargetNameError(TargetError):
    """A target name is not a safe, normalised, relative URL path."""


class TargetSourceError(TargetError):
    """The file to publish does not exist or is not a regular file."""


class TargetConflictError(TargetError):
    """A target name is already published with different content.

    Published artifacts are immutable: a device may already have verified the old bytes.
    """


class RepositoryStateError(TrustError):
    """The repository on disk is not in a state that allows the operation."""


class RepositoryExistsError(RepositoryStateError):
    """``create`` was asked to make a repository where one already exists."""


class RepositoryNotFoundError(RepositoryStateError):
    """``open`` found no repository in the data directory."""


class RepositoryCorruptError(RepositoryStateError):
    """Metadata on disk is missing, unparsable, inconsistent or fails verification."""


class KeyStoreError(TrustError):
    """A private key cannot be used: missing, unreadable, mismatched or too permissive."""

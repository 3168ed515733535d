"""fleet_server errors: one root, split by who is at fault.

::

    FleetError                        root of every error fleet_server raises on purpose
    └── TrustError                    the TUF repository (fleet_server.tuf_repo)
        ├── TargetError               the caller's artifact is not acceptable (fix it, re-push)
        │   ├── TargetNameError       name is not a safe relative URL path (``..``, ``/x``, ``a\\b``)
        │   ├── TargetSourceError     the file to publish is missing or not a regular file
        │   └── TargetConflictError   name already published with other bytes (immutable)
        ├── RepositoryStateError      the repository on disk is not usable as asked
        │   ├── RepositoryExistsError     ``create`` over an existing repository
        │   ├── RepositoryNotFoundError   ``open`` where there is no repository
        │   └── RepositoryCorruptError    metadata missing, unparsable or not verifiable
        └── KeyStoreError             a private key file is missing, unreadable, does not
                                      match its public key, or is readable by others

Other subsystems add their branches under ``FleetError``. Third-party exceptions
(python-tuf, securesystemslib, cryptography) are translated inside the adapter that calls
them, with ``raise ... from exc``, and never cross the package boundary. Plain
``ValueError`` / ``RuntimeError`` mean programmer misuse (a naive ``datetime``, an unknown
role name), not a fault of the repository or its inputs. ``OSError`` from the disk itself
(full, read-only) is passed through unchanged.
"""

from __future__ import annotations

__all__ = [
    "FleetError",
    "KeyStoreError",
    "RepositoryCorruptError",
    "RepositoryExistsError",
    "RepositoryNotFoundError",
    "RepositoryStateError",
    "TargetConflictError",
    "TargetError",
    "TargetNameError",
    "TargetSourceError",
    "TrustError",
]


class FleetError(Exception):
    """Root of every error fleet_server raises on purpose."""


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

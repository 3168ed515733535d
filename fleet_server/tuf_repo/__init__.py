"""The fleet server's TUF repository (python-tuf Metadata API, file-backed).

Create once with :meth:`TufRepository.create`, then :meth:`TufRepository.open`; serve
:attr:`TufRepository.public_dir` (``metadata/`` and ``targets/``) over HTTP(S) to devices,
which verify everything with ``tuf.ngclient`` from a root pinned at provisioning
(:meth:`TufRepository.root_bytes`). Errors are in :mod:`fleet_server.errors` under
``TrustError``.
"""

from __future__ import annotations

from fleet_server.errors import (
    KeyStoreError,
    RepositoryCorruptError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    RepositoryStateError,
    TargetConflictError,
    TargetError,
    TargetNameError,
    TargetSourceError,
    TrustError,
)
from fleet_server.tuf_repo.keys import KeyStore, export_public_key, public_key_pem
from fleet_server.tuf_repo.repository import (
    ONLINE_ROLES,
    ROLES,
    ExpiryPolicy,
    TargetRecord,
    TufRepository,
    roles_to_refresh,
    validate_target_name,
)

__all__ = [
    "ONLINE_ROLES",
    "ROLES",
    "ExpiryPolicy",
    "KeyStore",
    "KeyStoreError",
    "RepositoryCorruptError",
    "RepositoryExistsError",
    "RepositoryNotFoundError",
    "RepositoryStateError",
    "TargetConflictError",
    "TargetError",
    "TargetNameError",
    "TargetRecord",
    "TargetSourceError",
    "TrustError",
    "TufRepository",
    "export_public_key",
    "public_key_pem",
    "roles_to_refresh",
    "validate_target_name",
]

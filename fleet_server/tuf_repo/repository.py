"""The fleet server's TUF repository: python-tuf metadata, file-backed in a data directory.

On-disk layout (``layout_version`` 1)::

    data_dir/                          0755
      repository.json                  {"format": "edgefleet-tuf-repo", "layout_version": 1}
      .lock                            flock(2) held while an operation reads or writes
      keys/                            0700, NEVER served: private keys, {keyid}.pem, 0600
      public/                          serve this directory as-is (HTTP, CDN, mirror)
        metadata/                      -> Updater(metadata_base_url=".../metadata/")
          {N}.root.json                every root version ever published, 1..N (0644)
          root.json                    copy of the newest root (for humans and tools)
          timestamp.json               the commit point of every change
          {N}.snapshot.json            consistent snapshots: one file per version
          {N}.targets.json
        targets/                       -> Updater(target_base_url=".../targets/")
          models/x/1.0/rpi4/{sha256}.model.onnx   hash-prefixed, content-addressed (0644)

Every file is written with :func:`~fleet_server.tuf_repo.keys.atomic_write`. A change writes
its files in dependency order (target file, targets, snapshot, timestamp), so
``timestamp.json`` is the commit point: a crash before it leaves only unreferenced new files
that clients cannot reach and the next change overwrites. Key rotations follow the same rule
(see :meth:`TufRepository.rotate_key`) and are safe to crash at any step.

The expiry decisions are pure (:class:`ExpiryPolicy`, :func:`roles_to_refresh`,
:func:`validate_target_name`); :class:`TufRepository` is the I/O shell around python-tuf's
Metadata API. ``now`` is always injected; nothing here reads the wall clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

from securesystemslib.signer import Signer
from tuf.api.exceptions import RepositoryError as TufRepositoryError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from fleet_server.errors import (
    KeyStoreError,
    RepositoryCorruptError,
    RepositoryExistsError,
    RepositoryNotFoundError,
    TargetConflictError,
    TargetNameError,
    TargetSourceError,
)
from fleet_server.tuf_repo.keys import KeyStore, atomic_write, export_public_key
from fleet_server.tuf_repo.served import ServedFiles

__all__ = [
    "LAYOUT_VERSION",
    "MAX_TARGET_NAME_LENGTH",
    "ONLINE_ROLES",
    "ROLES",
    "ExpiryPolicy",
    "TargetRecord",
    "TufRepository",
    "roles_to_refresh",
    "validate_target_name",
]

LAYOUT_VERSION = 1
_FORMAT = "edgefleet-tuf-repo"
ROLES: tuple[str, ...] = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
#: Roles the server re-signs on its own (their keys are online).
ONLINE_ROLES: tuple[str, ...] = (Targets.type, Snapshot.type, Timestamp.type)
MAX_TARGET_NAME_LENGTH = 512

_METADATA_MODE = 0o644
_DIR_MODE = 0o755
_CHUNK = 1 << 20
_HASH = "sha256"
_ROOT_FILE_RE = re.compile(r"([1-9][0-9]*)\.root\.json")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")

_S = TypeVar("_S", Root, Targets, Snapshot, Timestamp)  # as constrained by Metadata[T]


# --------------------------------------------------------------------------- pure core


@dataclass(frozen=True)
class ExpiryPolicy:
    """How long each role's metadata is valid, and when the server renews it.

    A role is renewed by :meth:`TufRepository.refresh_timestamp` once it is within its
    margin of expiry (or past it). Margins must be shorter than lifetimes, or every refresh
    would re-sign.
    """

    root: timedelta = timedelta(days=365)  # lifetime of each root version
    targets: timedelta = timedelta(days=90)  # lifetime of each targets version
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    targets_margin: timedelta = timedelta(days=14)  # renew targets this long before expiry
    snapshot_margin: timedelta = timedelta(days=2)
    timestamp_margin: timedelta = timedelta(hours=6)

    def __post_init__(self) -> None:
        for role in ROLES:
            if self.lifetime(role) <= timedelta(0):
                raise ValueError(f"{role} lifetime must be > 0, got {self.lifetime(role)}")
        for role in ONLINE_ROLES:
            margin, lifetime = self.margin(role), self.lifetime(role)
            if not timedelta(0) <= margin < lifetime:
                raise ValueError(
                    f"{role} margin must be in [0, {lifetime}) (its lifetime), got {margin}"
                )

    def lifetime(self, role: str) -> timedelta:
        """Return how long a freshly signed ``role`` metadata stays valid.

        Args:
            role: One of :data:`ROLES`.

        Raises:
            ValueError: ``role`` is not a top-level role.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}, expected one of {ROLES}")
        return cast(timedelta, getattr(self, role))

    def margin(self, role: str) -> timedelta:
        """Return how long before expiry an online ``role`` is renewed.

        Args:
            role: One of :data:`ONLINE_ROLES`.

        Raises:
            ValueError: ``role`` is not an online role (root is renewed only by a rotation).
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"no refresh margin for role {role!r}, expected one of {ONLINE_ROLES}")
        return cast(timedelta, getattr(self, f"{role}_margin"))


def _cascade(roles: frozenset[str] | set[str]) -> frozenset[str]:
    """A new targets needs a new snapshot; a new snapshot needs a new timestamp."""
    out = set(roles)
    if Targets.type in out:
        out.add(Snapshot.type)
    if Snapshot.type in out:
        out.add(Timestamp.type)
    return frozenset(out)


def roles_to_refresh(
    expires: Mapping[str, datetime], now: datetime, policy: ExpiryPolicy
) -> frozenset[str]:
    """Decide which online roles must be re-signed at ``now``.

    A role is due when ``expires - now <= margin``; a due role drags the roles above it
    along (targets -> snapshot -> timestamp), since each pins the version of the one below.

    Args:
        expires: Current expiry of each online role (timezone-aware).
        now: The reference time (timezone-aware).
        policy: Margins per role.

    Returns:
        The roles to re-sign; empty if nothing is due.

    Raises:
        ValueError: ``now`` is naive, or ``expires`` lacks an online role.
    """
    now = _utc(now)
    missing = [role for role in ONLINE_ROLES if role not in expires]
    if missing:
        raise ValueError(f"expires must have every online role, missing {missing}")
    due = {role for role in ONLINE_ROLES if expires[role] - now <= policy.margin(role)}
    return _cascade(due)


def validate_target_name(name: str) -> str:
    """Check that ``name`` is a safe, normalised, relative target path.

    Target names become URL paths (python-tuf does not quote them) and file paths under
    ``public/targets``, so each ``/``-separated segment must match
    ``[A-Za-z0-9_][A-Za-z0-9._+-]*``: no ``..`` or ``.``, no hidden files, no empty segments,
    no backslashes, no URL metacharacters.

    Args:
        name: e.g. ``models/digits/1.0.0/rpi4/model.onnx``.

    Returns:
        ``name`` unchanged.

    Raises:
        TargetNameError: ``name`` is not acceptable; the message says why.
    """
    if not isinstance(name, str):
        raise TargetNameError(f"target name must be a str, got {type(name).__name__}")
    if not name:
        raise TargetNameError("target name is empty")
    if len(name) > MAX_TARGET_NAME_LENGTH:
        raise TargetNameError(
            f"target name is {len(name)} characters long, expected at most {MAX_TARGET_NAME_LENGTH}"
        )
    if "\\" in name:
        raise TargetNameError(
            f"target name {name!r} contains a backslash, expected '/'-separated segments"
        )
    if name.startswith("/"):
        raise TargetNameError(
            f"target name {name!r} is absolute, expected a relative path such as "
            "'models/digits/1.0.0/rpi4/model.onnx'"
        )
    for segment in name.split("/"):
        if segment == "":
            raise TargetNameError(
                f"target name {name!r} has an empty segment ('//' or a trailing '/')"
            )
        if segment in (".", ".."):
            raise TargetNameError(
                f"target name {name!r} has a {segment!r} segment, expected a normalised path"
            )
        if _SEGMENT_RE.fullmatch(segment) is None:
            raise TargetNameError(
                f"target name {name!r}: segment {segment!r} must match "
                f"{_SEGMENT_RE.pattern} (letters, digits, '._+-'; not starting with '.+-')"
            )
    return name


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got naive {now.isoformat()}")
    return now.astimezone(UTC)


@dataclass(frozen=True)
class TargetRecord:
    """A published artifact, as the targets metadata lists it.

    Attributes:
        name: The target name (path relative to the targets base URL, without hash prefix).
        length: Size in bytes.
        sha256: Lowercase hex digest of the content.
    """

    name: str
    length: int
    sha256: str

    @property
    def url_path(self) -> str:
        """Hash-prefixed path under ``public/targets`` (what ``tuf.ngclient`` downloads)."""
        parent, sep, base = self.name.rpartition("/")
        return f"{parent}{sep}{self.sha256}.{base}"


# --------------------------------------------------------------------------- I/O shell


@dataclass
class _State:
    """The four current top-level metadata, as loaded and verified from disk."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    root_files: list[Path] = field(default_factory=list)

    def expires(self) -> dict[str, datetime]:
        return {
            Root.type: self.root.signed.expires,
            Targets.type: self.targets.signed.expires,
            Snapshot.type: self.snapshot.signed.expires,
            Timestamp.type: self.timestamp.signed.expires,
        }


def _parse(data: bytes, kind: type[_S], where: Path) -> Metadata[_S]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except TufRepositoryError as exc:
        raise RepositoryCorruptError(f"{where} is not valid TUF metadata: {exc}") from exc
    if not isinstance(md.signed, kind):
        raise RepositoryCorruptError(
            f"{where} holds {md.signed.type} metadata, expected {kind.type}"
        )
    return cast(Metadata[_S], md)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise RepositoryCorruptError(f"metadata file {path} is missing") from exc


def _meta_for(version: int, data: bytes) -> MetaFile:
    return MetaFile.from_data(version, data, [_HASH])


def _sign(md: Metadata[Any], signers: Sequence[Signer]) -> None:
    md.signatures.clear()
    for signer in signers:
        md.sign(signer, append=True)


class TufRepository:
    """A TUF repository (root, targets, snapshot, timestamp) kept in a data directory.

    Use :meth:`create` once, then :meth:`open`. Every operation takes an exclusive
    ``flock`` on ``data_dir/.lock`` and re-reads (and re-verifies) the metadata from disk,
    so several processes may share one data directory.

    Args:
        data_dir: The repository directory (see the module docstring for its layout).
        expiry: Lifetimes and refresh margins; defaults to :class:`ExpiryPolicy()`.
    """

    def __init__(self, data_dir: Path, expiry: ExpiryPolicy | None = None) -> None:
        self._data_dir = Path(data_dir)
        self._expiry = expiry or ExpiryPolicy()
        self._keys = KeyStore(self._data_dir / "keys")
        self._thread_lock = threading.RLock()
        #: the public files as bytes for the HTTP routes (re-validated by stat per request)
        self.served = ServedFiles()

    def __repr__(self) -> str:
        return f"TufRepository({str(self._data_dir)!r})"

    # ----------------------------------------------------------------- paths

    @property
    def data_dir(self) -> Path:
        """The repository directory."""
        return self._data_dir

    @property
    def public_dir(self) -> Path:
        """The directory to serve: ``metadata/`` and ``targets/``, nothing secret."""
        return self._data_dir / "public"

    @property
    def metadata_dir(self) -> Path:
        """Served as the ngclient ``metadata_base_url``."""
        return self.public_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """Served as the ngclient ``target_base_url``."""
        return self.public_dir / "targets"

    @property
    def expiry(self) -> ExpiryPolicy:
        """The expiry policy this handle signs with."""
        return self._expiry

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    def create(
        cls, data_dir: Path, *, now: datetime, expiry: ExpiryPolicy | None = None
    ) -> TufRepository:
        """Create a new repository: four Ed25519 keys and version 1 of every role.

        The repository is built in a temporary sibling directory and renamed into place,
        so a crash never leaves a half-made repository at ``data_dir``.

        Args:
            data_dir: Where to create it; must not exist or be an empty directory.
            now: Reference time for the expiry dates (timezone-aware).
            expiry: Lifetimes and margins; defaults to :class:`ExpiryPolicy()`.

        Returns:
            The opened repository.

        Raises:
            RepositoryExistsError: ``data_dir`` exists and is not empty.
            ValueError: ``now`` is naive.
            OSError: The directory could not be written.
        """
        now = _utc(now)
        policy = expiry or ExpiryPolicy()
        data_dir = Path(data_dir)
        if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
            raise RepositoryExistsError(
                f"{data_dir} already exists and is not an empty directory; "
                "refusing to create a TUF repository over it"
            )
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{data_dir.name}.", suffix=".creating", dir=data_dir.parent)
        )
        try:
            cls._build(staging, now, policy)
            try:
                os.rename(staging, data_dir)  # replaces an empty directory atomically
            except OSError as exc:
                raise RepositoryExistsError(
                    f"{data_dir} appeared while the repository was being created: {exc}"
                ) from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return cls.open(data_dir, expiry=policy)

    @classmethod
    def _build(cls, base: Path, now: datetime, policy: ExpiryPolicy) -> None:
        os.chmod(base, _DIR_MODE)
        repo = cls(base, policy)
        keys = KeyStore.create(repo._keys.path)
        for directory in (repo.public_dir, repo.metadata_dir, repo.targets_dir):
            directory.mkdir(mode=_DIR_MODE)
            os.chmod(directory, _DIR_MODE)

        root = Root(expires=now + policy.root, consistent_snapshot=True)
        for role in ROLES:
            root.add_key(keys.generate(), role)
        root_md = Metadata(root)
        state = _State(
            root=root_md,
            targets=Metadata(Targets(expires=now + policy.targets)),
            snapshot=Metadata(Snapshot(expires=now + policy.snapshot)),
            timestamp=Metadata(Timestamp(expires=now + policy.timestamp)),
        )
        _sign(root_md, repo._signers(root, Root.type))
        repo._write_root(root_md)
        # version 1 of each role; _publish bumps versions, so write these directly.
        targets_bytes = repo._sign_and_write(state, Targets.type, f"1.{Targets.type}.json")
        state.snapshot.signed.meta[f"{Targets.type}.json"] = _meta_for(1, targets_bytes)
        snapshot_bytes = repo._sign_and_write(state, Snapshot.type, f"1.{Snapshot.type}.json")
        state.timestamp.signed.snapshot_meta = _meta_for(1, snapshot_bytes)
        repo._sign_and_write(state, Timestamp.type, f"{Timestamp.type}.json")
        layout = {"format": _FORMAT, "layout_version": LAYOUT_VERSION}
        atomic_write(
            base / "repository.json",
            json.dumps(layout, indent=2).encode() + b"\n",
            mode=_METADATA_MODE,
        )

    @classmethod
    def open(cls, data_dir: Path, *, expiry: ExpiryPolicy | None = None) -> TufRepository:
        """Open an existing repository and verify its metadata.

        Args:
            data_dir: A directory made by :meth:`create`.
            expiry: Lifetimes and margins for future signing; defaults to
                :class:`ExpiryPolicy()` (expiry dates are not stored as policy).

        Returns:
            The repository handle.

        Raises:
            RepositoryNotFoundError: ``data_dir`` holds no repository.
            RepositoryCorruptError: The layout version is unknown, or the metadata is
                missing, inconsistent or fails signature verification.
            KeyStoreError: A role's private key is missing or unusable.
        """
        data_dir = Path(data_dir)
        layout_file = data_dir / "repository.json"
        try:
            layout = json.loads(layout_file.read_bytes())
        except FileNotFoundError as exc:
            raise RepositoryNotFoundError(
                f"no TUF repository in {data_dir}: expected {layout_file}"
            ) from exc
        except ValueError as exc:
            raise RepositoryCorruptError(f"{layout_file} is not JSON: {exc}") from exc
        if not isinstance(layout, dict) or layout.get("format") != _FORMAT:
            raise RepositoryCorruptError(f"{layout_file} does not describe an {_FORMAT}")
        if layout.get("layout_version") != LAYOUT_VERSION:
            raise RepositoryCorruptError(
                f"{layout_file} has layout_version {layout.get('layout_version')!r}, "
                f"expected {LAYOUT_VERSION}"
            )
        repo = cls(data_dir, expiry)
        with repo._transaction() as state:
            for role in ROLES:  # fail now, not at the first push, if a key is unusable
                repo._signers(state.root.signed, role)
        return repo

    # ----------------------------------------------------------------- reads

    def root_bytes(self, version: int | None = None) -> bytes:
        """Return the exact bytes of a root metadata version, for provisioning devices.

        A device pinned to any version follows later rotations through the chain of
        ``{N}.root.json`` files, which are never deleted.

        Args:
            version: Root version to return; the newest when ``None``.

        Returns:
            The signed root metadata file content.

        Raises:
            ValueError: ``version`` is not between 1 and the newest version.
            RepositoryCorruptError: The repository fails verification.
        """
        with self._transaction() as state:
            newest = state.root.signed.version
            if version is None:
                version = newest
            if not 1 <= version <= newest:
                raise ValueError(f"root version must be in [1, {newest}], got {version}")
            return _read(self.metadata_dir / f"{version}.{Root.type}.json")

    def versions(self) -> dict[str, int]:
        """Return the current version of each top-level role.

        Raises:
            RepositoryCorruptError: The repository fails verification.
        """
        with self._transaction() as state:
            return {
                Root.type: state.root.signed.version,
                Targets.type: state.targets.signed.version,
                Snapshot.type: state.snapshot.signed.version,
                Timestamp.type: state.timestamp.signed.version,
            }

    def expires(self) -> dict[str, datetime]:
        """Return the current expiry of each top-level role (UTC).

        Raises:
            RepositoryCorruptError: The repository fails verification.
        """
        with self._transaction() as state:
            return state.expires()

    def targets(self) -> dict[str, TargetRecord]:
        """Return every published target by name.

        Raises:
            RepositoryCorruptError: The repository fails verification.
        """
        with self._transaction() as state:
            return {
                name: TargetRecord(name, info.length, info.hashes[_HASH])
                for name, info in state.targets.signed.targets.items()
            }

    def public_keys(self) -> dict[str, list[dict[str, Any]]]:
        """Return each role's public keys as JSON-ready TUF key dicts.

        Raises:
            RepositoryCorruptError: The repository fails verification.
        """
        with self._transaction() as state:
            root = state.root.signed
            return {
                role: [export_public_key(root.get_key(k)) for k in root.roles[role].keyids]
                for role in ROLES
            }

    # ----------------------------------------------------------------- writes

    def add_target(
        self, name: str, path: Path, *, now: datetime, replace: bool = False
    ) -> TargetRecord:
        """Publish a file as target ``name`` and re-sign targets, snapshot and timestamp.

        The content is stored hash-prefixed under ``public/targets``. Publishing the same
        name with identical content is a no-op (no new metadata versions). Content files of
        replaced targets are kept, so devices mid-download are not broken.

        Args:
            name: Target path, e.g. ``models/digits/1.0.0/rpi4/model.onnx``.
            path: The file to publish (read once, streamed).
            now: Reference time for the new expiry dates (timezone-aware).
            replace: Allow replacing a target already published with different content.

        Returns:
            The published target.

        Raises:
            TargetNameError: ``name`` is not a safe relative path.
            TargetSourceError: ``path`` is not a regular file.
            TargetConflictError: ``name`` is published with other content and ``replace``
                is false.
            KeyStoreError: An online key is missing or unusable.
            RepositoryCorruptError: The repository fails verification.
            ValueError: ``now`` is naive.
            OSError: A file could not be read or written.
        """
        validate_target_name(name)
        now = _utc(now)
        source = Path(path)
        if not source.is_file():
            raise TargetSourceError(f"target source {source} is not a regular file")
        staged: Path | None
        staged, length, digest = self._stage(source)  # slow part, outside the lock
        try:
            record = TargetRecord(name, length, digest)
            final = self.targets_dir / record.url_path
            with self._transaction() as state:
                existing = state.targets.signed.targets.get(name)
                if existing is not None:
                    old = existing.hashes.get(_HASH)
                    if old == digest and existing.length == length:
                        if not final.is_file():  # heal a lost content file
                            final.parent.mkdir(parents=True, exist_ok=True)
                            os.replace(staged, final)
                            staged = None
                        return record
                    if not replace:
                        raise TargetConflictError(
                            f"target {name!r} is already published with sha256 {old} "
                            f"({existing.length} bytes), got sha256 {digest} ({length} bytes); "
                            "published artifacts are immutable: use a new name, or replace=True"
                        )
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                staged = None
                state.targets.signed.targets[name] = TargetFile(length, {_HASH: digest}, name)
                self._publish(state, {Targets.type}, now)
                return record
        finally:
            if staged is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(staged)

    def refresh_timestamp(self, now: datetime) -> bool:
        """Re-sign the online roles that are within their margin of expiry at ``now``.

        Usually only the timestamp; the snapshot (and targets) too when they are due, see
        :func:`roles_to_refresh`. Call it periodically, well inside the timestamp margin.
        Root is not renewed here: its key is meant to be offline; rotate it instead.

        Args:
            now: The reference time (timezone-aware).

        Returns:
            Whether anything was re-signed.

        Raises:
            KeyStoreError: An online key is missing or unusable.
            RepositoryCorruptError: The repository fails verification.
            ValueError: ``now`` is naive.
            OSError: A metadata file could not be written.
        """
        now = _utc(now)
        with self._transaction() as state:
            due = roles_to_refresh(state.expires(), now, self._expiry)
            if not due:
                return False
            self._publish(state, set(due), now)
            return True

    def rotate_key(self, role: str, *, now: datetime) -> str:
        """Replace ``role``'s key with a new Ed25519 key; delete the old private key.

        For ``root`` the new root version is signed by the old *and* the new root key, so
        devices trusting the old root accept it (TUF root rotation). For an online role the
        role's metadata is first re-published signed by old and new key (valid under both
        the current and the next root), then root version N+1 names the new key and is
        signed by the root key. Every intermediate state on disk verifies, so a crash at
        any step leaves a working repository (plus at most one unused key file, pruned by
        the next rotation).

        Args:
            role: One of ``root``, ``targets``, ``snapshot``, ``timestamp``.
            now: Reference time for the new expiry dates (timezone-aware).

        Returns:
            The new key's id.

        Raises:
            ValueError: ``role`` is not a top-level role, or ``now`` is naive.
            KeyStoreError: A current key is missing or unusable.
            RepositoryCorruptError: The repository fails verification.
            OSError: A file could not be written or removed.
        """
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}, expected one of {ROLES}")
        now = _utc(now)
        with self._transaction() as state:
            root = state.root.signed
            root_signers = self._signers(root, Root.type)
            old_keyids = list(root.roles[role].keyids)
            new_key = self._keys.generate()
            new_signer = self._keys.signer(new_key)
            if role != Root.type:
                self._publish(state, {role}, now, extra_signers={role: [new_signer]})
            for keyid in old_keyids:
                root.revoke_key(keyid, role)
            root.add_key(new_key, role)
            root.version += 1
            root.expires = now + self._expiry.root
            signers = [*root_signers, new_signer] if role == Root.type else root_signers
            _sign(state.root, signers)
            self._write_root(state.root)
            self._keys.prune(frozenset(root.keys))
            return new_key.keyid

    # ----------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[_State]:
        """Hold the repository lock and yield freshly loaded, verified state."""
        with self._thread_lock:
            lock_fd = os.open(self._data_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX)
                yield self._load()
            finally:
                os.close(lock_fd)  # releases the flock

    def _load(self) -> _State:
        """Read and verify the whole repository state (sans keys)."""
        md_dir = self.metadata_dir
        versions = sorted(
            int(m.group(1))
            for p in md_dir.iterdir()
            if (m := _ROOT_FILE_RE.fullmatch(p.name)) is not None
        )
        if versions != list(range(1, len(versions) + 1)) or not versions:
            raise RepositoryCorruptError(
                f"root versions in {md_dir} must be 1..N without gaps, found {versions}"
            )
        previous: Root | None = None
        root_md: Metadata[Root] | None = None
        for version in versions:
            where = md_dir / f"{version}.{Root.type}.json"
            root_md = _parse(_read(where), Root, where)
            if root_md.signed.version != version:
                raise RepositoryCorruptError(
                    f"{where} holds root version {root_md.signed.version}, expected {version}"
                )
            result = root_md.signed.get_root_verification_result(
                previous, root_md.signed_bytes, root_md.signatures
            )
            if not result:
                raise RepositoryCorruptError(
                    f"{where} is not signed by a threshold of the old and new root keys"
                )
            previous = root_md.signed
        assert root_md is not None
        root = root_md.signed

        where = md_dir / f"{Timestamp.type}.json"
        timestamp = _parse(_read(where), Timestamp, where)
        self._verify_role(root, Timestamp.type, timestamp, where)

        snap_meta = timestamp.signed.snapshot_meta
        where = md_dir / f"{snap_meta.version}.{Snapshot.type}.json"
        snapshot = self._load_pinned(root, Snapshot, snap_meta, where)

        targets_meta = snapshot.signed.meta.get(f"{Targets.type}.json")
        if targets_meta is None:
            raise RepositoryCorruptError(f"{where} does not list {Targets.type}.json")
        where = md_dir / f"{targets_meta.version}.{Targets.type}.json"
        targets = self._load_pinned(root, Targets, targets_meta, where)
        return _State(root_md, targets, snapshot, timestamp)

    def _load_pinned(self, root: Root, kind: type[_S], meta: MetaFile, where: Path) -> Metadata[_S]:
        data = _read(where)
        try:
            meta.verify_length_and_hashes(data)
        except TufRepositoryError as exc:
            raise RepositoryCorruptError(f"{where} does not match its pinned hash: {exc}") from exc
        md = _parse(data, kind, where)
        if md.signed.version != meta.version:
            raise RepositoryCorruptError(
                f"{where} holds {kind.type} version {md.signed.version}, expected {meta.version}"
            )
        self._verify_role(root, kind.type, md, where)
        return md

    @staticmethod
    def _verify_role(root: Root, role: str, md: Metadata[Any], where: Path) -> None:
        try:
            root.verify_delegate(role, md.signed_bytes, md.signatures)
        except TufRepositoryError as exc:
            raise RepositoryCorruptError(f"{where} fails verification: {exc}") from exc

    def _signers(self, root: Root, role: str) -> list[Signer]:
        keyids = root.roles[role].keyids
        if not keyids:
            raise KeyStoreError(f"root lists no key for role {role}, expected at least 1")
        return [self._keys.signer(root.get_key(keyid)) for keyid in keyids]

    def _sign_and_write(
        self,
        state: _State,
        role: str,
        filename: str,
        extra_signers: Sequence[Signer] = (),
    ) -> bytes:
        md: Metadata[Any] = getattr(state, role)
        _sign(md, [*self._signers(state.root.signed, role), *extra_signers])
        data = md.to_bytes()
        atomic_write(self.metadata_dir / filename, data, mode=_METADATA_MODE)
        return data

    def _publish(
        self,
        state: _State,
        roles: set[str],
        now: datetime,
        extra_signers: Mapping[str, Sequence[Signer]] | None = None,
    ) -> None:
        """Bump, re-sign and write ``roles`` (and the roles above them); timestamp last."""
        extra = extra_signers or {}
        due = _cascade(roles)
        if Targets.type in due:
            targets = state.targets.signed
            targets.version += 1
            targets.expires = now + self._expiry.targets
            data = self._sign_and_write(
                state,
                Targets.type,
                f"{targets.version}.{Targets.type}.json",
                extra.get(Targets.type, ()),
            )
            state.snapshot.signed.meta[f"{Targets.type}.json"] = _meta_for(targets.version, data)
        if Snapshot.type in due:
            snapshot = state.snapshot.signed
            snapshot.version += 1
            snapshot.expires = now + self._expiry.snapshot
            data = self._sign_and_write(
                state,
                Snapshot.type,
                f"{snapshot.version}.{Snapshot.type}.json",
                extra.get(Snapshot.type, ()),
            )
            state.timestamp.signed.snapshot_meta = _meta_for(snapshot.version, data)
        if Timestamp.type in due:
            timestamp = state.timestamp.signed
            timestamp.version += 1
            timestamp.expires = now + self._expiry.timestamp
            self._sign_and_write(
                state, Timestamp.type, f"{Timestamp.type}.json", extra.get(Timestamp.type, ())
            )

    def _write_root(self, root_md: Metadata[Root]) -> None:
        data = root_md.to_bytes()
        version = root_md.signed.version
        atomic_write(self.metadata_dir / f"{version}.{Root.type}.json", data, mode=_METADATA_MODE)
        atomic_write(self.metadata_dir / f"{Root.type}.json", data, mode=_METADATA_MODE)

    def _stage(self, source: Path) -> tuple[Path, int, str]:
        """Copy ``source`` into a temp file under ``targets/``, hashing as it streams."""
        digest = hashlib.sha256()
        length = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.targets_dir, prefix=".stage.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                os.fchmod(out.fileno(), _METADATA_MODE)
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    length += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        return Path(tmp_name), length, digest.hexdigest()

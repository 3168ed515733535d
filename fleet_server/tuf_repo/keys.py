"""Ed25519 signing keys for the TUF repository, stored as PEM files.

A :class:`KeyStore` is a directory (mode 0700) of private keys, one PKCS#8 PEM file per key,
named by TUF key id (``{keyid}.pem``, mode 0600). Which key belongs to which role is *not*
stored here: the current root metadata is the one source of truth for that. Naming files by
key id (not by role) makes rotation crash-safe: the new key is written next to the old one,
the metadata switches over, and only then is the old file deleted.

Private key material never appears in ``repr``, log lines or exception messages; the public
half can be exported as a TUF key dict or as a PEM ``SubjectPublicKeyInfo``.

This module also holds :func:`atomic_write`, the one atomic file-replacement helper of the
``tuf_repo`` package.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from securesystemslib.exceptions import UnsupportedLibraryError
from securesystemslib.signer import CryptoSigner, Key, SSlibKey

from fleet_server.errors import KeyStoreError

__all__ = [
    "KEY_DIR_MODE",
    "PRIVATE_KEY_MODE",
    "KeyStore",
    "atomic_write",
    "export_public_key",
    "public_key_pem",
]

PRIVATE_KEY_MODE = 0o600
KEY_DIR_MODE = 0o700

_KEYID_RE = re.compile(r"[0-9a-f]{64}")


def atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    """Replace ``path`` with ``data`` atomically, with permission bits ``mode``.

    Writes a temporary file in the same directory, sets its mode, fsyncs it and
    ``os.replace``-s it over ``path``; readers see the old or the new file, never a torn
    one. The temporary file is removed if anything fails.

    Args:
        path: Destination file; its parent directory must exist.
        data: The complete new content.
        mode: Permission bits for the new file, e.g. ``0o644`` or ``0o600`` (not subject
            to the umask).

    Raises:
        OSError: The file could not be written or renamed.
    """
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def export_public_key(key: Key) -> dict[str, Any]:
    """Return the public key as a JSON-ready TUF key dict, with its ``keyid``.

    Args:
        key: A TUF/securesystemslib public key.

    Returns:
        ``{"keyid": ..., "keytype": "ed25519", "scheme": "ed25519", "keyval": {...}}``.

    Raises:
        ValueError: Never for keys made by this module; kept for foreign key types
            securesystemslib cannot serialise.
    """
    return {"keyid": key.keyid, **key.to_dict()}


def public_key_pem(key: Key) -> bytes:
    """Return an Ed25519 public key as a PEM ``SubjectPublicKeyInfo`` block.

    Args:
        key: An ``ed25519`` TUF key.

    Returns:
        The PEM bytes (``-----BEGIN PUBLIC KEY-----`` ...).

    Raises:
        ValueError: ``key`` is not an Ed25519 key with a hex ``public`` value.
    """
    if key.keytype != "ed25519":
        raise ValueError(f"expected an ed25519 key, got keytype {key.keytype!r}")
    raw = bytes.fromhex(str(key.keyval["public"]))
    public = Ed25519PublicKey.from_public_bytes(raw)
    return public.public_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PublicFormat.SubjectPublicKeyInfo,
    )


class KeyStore:
    """A directory of Ed25519 private keys named by key id.

    Args:
        key_dir: The directory; :meth:`create` makes it, the constructor only points at it.
    """

    def __init__(self, key_dir: Path) -> None:
        self._dir = Path(key_dir)

    def __repr__(self) -> str:
        return f"KeyStore({str(self._dir)!r})"

    @property
    def path(self) -> Path:
        """The key directory."""
        return self._dir

    @classmethod
    def create(cls, key_dir: Path) -> KeyStore:
        """Make an empty key directory with mode 0700.

        Args:
            key_dir: Directory to create; its parent must exist.

        Returns:
            The new key store.

        Raises:
            KeyStoreError: ``key_dir`` already exists.
            OSError: The directory could not be created.
        """
        try:
            os.mkdir(key_dir, KEY_DIR_MODE)
        except FileExistsError as exc:
            raise KeyStoreError(f"key directory {key_dir} already exists") from exc
        os.chmod(key_dir, KEY_DIR_MODE)  # mkdir's mode is filtered by the umask
        return cls(key_dir)

    def _key_path(self, keyid: str) -> Path:
        # Key ids come from root metadata: never let one become a path component unchecked.
        if not _KEYID_RE.fullmatch(keyid):
            raise KeyStoreError(f"key id {keyid!r} is not 64 lowercase hex digits")
        return self._dir / f"{keyid}.pem"

    def generate(self) -> SSlibKey:
        """Generate a new Ed25519 key pair and store the private half (0600).

        Returns:
            The public key, with its TUF key id.

        Raises:
            KeyStoreError: The crypto backend is unavailable.
            OSError: The key file could not be written.
        """
        try:
            signer = CryptoSigner.generate_ed25519()
        except UnsupportedLibraryError as exc:
            raise KeyStoreError(f"cannot generate an ed25519 key: {exc}") from exc
        public = signer.public_key
        atomic_write(self._key_path(public.keyid), signer.private_bytes, mode=PRIVATE_KEY_MODE)
        return public

    def signer(self, public_key: Key) -> CryptoSigner:
        """Load the signer for ``public_key`` from its PEM file.

        The file must not be accessible to group or others (like OpenSSH, a key readable by
        others is treated as compromised and refused).

        Args:
            public_key: The public key, as listed in root metadata.

        Returns:
            A signer whose ``public_key`` is ``public_key``.

        Raises:
            KeyStoreError: The file is missing, unreadable, too permissive, not an Ed25519
                PEM private key, or its public half does not match ``public_key``.
        """
        path = self._key_path(public_key.keyid)
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyStoreError(
                f"private key {public_key.keyid[:16]}... not found: expected file {path}"
            ) from exc
        except OSError as exc:
            raise KeyStoreError(f"private key file {path} is unreadable: {exc}") from exc
        if mode & 0o077:
            raise KeyStoreError(
                f"private key file {path} has mode {mode:04o}, expected {PRIVATE_KEY_MODE:04o}"
            )
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            # The message from cryptography never contains key material.
            raise KeyStoreError(f"private key file {path} is not a PEM private key") from exc
        if not isinstance(private, Ed25519PrivateKey):
            raise KeyStoreError(
                f"private key file {path} holds a {type(private).__name__}, expected Ed25519"
            )
        if not isinstance(public_key, SSlibKey):
            raise KeyStoreError(
                f"public key {public_key.keyid[:16]}... is a {type(public_key).__name__}, "
                "expected SSlibKey"
            )
        try:
            return CryptoSigner(private, public_key)
        except ValueError as exc:  # includes securesystemslib's KeyMismatchError
            raise KeyStoreError(
                f"private key file {path} does not match public key {public_key.keyid[:16]}..."
            ) from exc

    def keyids(self) -> frozenset[str]:
        """Return the ids of every private key file in the store.

        Raises:
            OSError: The directory cannot be listed.
        """
        return frozenset(
            p.stem for p in self._dir.glob("*.pem") if _KEYID_RE.fullmatch(p.stem) is not None
        )

    def remove(self, keyid: str) -> None:
        """Delete the private key file for ``keyid`` (no error if it is already gone).

        The file is unlinked, not shredded: on flash storage overwriting in place gives no
        guarantee anyway.

        Args:
            keyid: The TUF key id.

        Raises:
            KeyStoreError: ``keyid`` is not a well-formed key id.
            OSError: The file exists but could not be removed.
        """
        with contextlib.suppress(FileNotFoundError):
            self._key_path(keyid).unlink()

    def prune(self, keep: frozenset[str]) -> frozenset[str]:
        """Delete every private key whose id is not in ``keep``.

        Args:
            keep: Key ids still referenced by the current root metadata.

        Returns:
            The ids that were deleted.

        Raises:
            OSError: A file could not be removed.
        """
        stale = self.keyids() - keep
        for keyid in stale:
            self.remove(keyid)
        return stale

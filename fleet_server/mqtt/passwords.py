"""MQTT password hashes in Mosquitto's own ``$7$`` format (pure: standard library only).

The server stores only these hashes. One hash string serves both brokers: the embedded amqtt
broker verifies it with :func:`verify_password`, and :func:`fleet_server.mqtt.mosquitto.
write_mosquitto_files` writes it unchanged into a Mosquitto ``password_file``::

    $7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512(password, salt, iterations, 64)>

which is what ``mosquitto_passwd`` 2.0 writes (``-H sha512-pbkdf2``, the default: 12-byte salt,
101 iterations, standard base64 with padding). Mosquitto reads the iteration count from the
string, so a larger count works with it too.

101 iterations is cheap on purpose: the broker runs PBKDF2 on every CONNECT. That is only
safe because device passwords are random tokens (:func:`generate_password`, 192 bits), not
something a person chose; never hash a human-chosen password with the default count.

Errors: ``ValueError`` for a malformed stored hash or bad arguments (a fault of whoever wrote
the hash, not of the client presenting a password).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets

__all__ = [
    "DEFAULT_ITERATIONS",
    "HASH_PREFIX",
    "SALT_BYTES",
    "generate_password",
    "hash_password",
    "is_password_hash",
    "verify_password",
]

#: the marker Mosquitto uses for PBKDF2-HMAC-SHA512 hashes
HASH_PREFIX = "$7$"
#: mosquitto_passwd 2.0's iteration count (and ours by default)
DEFAULT_ITERATIONS = 101
#: mosquitto_passwd 2.0's salt length, in bytes
SALT_BYTES = 12
_DIGEST_BYTES = 64  # SHA-512
_MAX_ITERATIONS = 10_000_000  # a hash asking for more is a denial of service, not a hash


def generate_password(nbytes: int = 24) -> str:
    """A fresh random password for a device or the server user (URL-safe, no ``:``).

    Args:
        nbytes: random bytes behind it (24 bytes = 192 bits, 32 characters).

    Raises:
        ValueError: ``nbytes`` is below 16 (128 bits).
    """
    if nbytes < 16:
        raise ValueError(f"generate_password: need at least 16 random bytes, got {nbytes}")
    return secrets.token_urlsafe(nbytes)


def _as_bytes(password: str | bytes) -> bytes:
    return password.encode("utf-8") if isinstance(password, str) else bytes(password)


def hash_password(password: str | bytes, *, iterations: int = DEFAULT_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """Hash ``password`` into a ``$7$`` string that Mosquitto and :func:`verify_password` accept.

    Args:
        password: the password (a ``str`` is encoded as UTF-8, as MQTT clients send it).
        iterations: PBKDF2 iterations (Mosquitto's 101 by default; see the module docstring).
        salt: the salt; a fresh ``os.urandom(12)`` when omitted (inject it in tests).

    Raises:
        ValueError: the password is empty, ``iterations`` is outside 1..10,000,000, or the
            salt is shorter than 8 bytes.
    """
    secret = _as_bytes(password)
    if not secret:
        raise ValueError("hash_password: the password must not be empty")
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"hash_password: iterations must be 1..{_MAX_ITERATIONS}, "
                         f"got {iterations}")
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    if len(salt) < 8:
        raise ValueError(f"hash_password: the salt must be at least 8 bytes, got {len(salt)}")
    digest = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, _DIGEST_BYTES)
    return (f"{HASH_PREFIX}{iterations}${base64.b64encode(salt).decode('ascii')}"
            f"${base64.b64encode(digest).decode('ascii')}")


def _parse(stored: str) -> tuple[int, bytes, bytes]:
    """Split a ``$7$`` string into (iterations, salt, digest).

    Raises:
        ValueError: it is not a well-formed ``$7$`` hash.
    """
    if not isinstance(stored, str) or not stored.startswith(HASH_PREFIX):
        raise ValueError(f"password hash: expected a string starting with {HASH_PREFIX!r}, "
                         f"got {_shown(stored)}")
    parts = stored[len(HASH_PREFIX):].split("$")
    if len(parts) != 3 or not parts[0].isdigit():
        raise ValueError("password hash: expected $7$<iterations>$<salt>$<hash>, "
                         f"got {_shown(stored)}")
    iterations = int(parts[0])
    if not 1 <= iterations <= _MAX_ITERATIONS:
        raise ValueError(f"password hash: iterations must be 1..{_MAX_ITERATIONS}, "
                         f"got {iterations}")
    try:
        salt = base64.b64decode(parts[1], validate=True)
        digest = base64.b64decode(parts[2], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"password hash: salt or hash is not base64 in {_shown(stored)}") from exc
    if not salt or len(digest) != _DIGEST_BYTES:
        raise ValueError(f"password hash: expected a non-empty salt and a {_DIGEST_BYTES}-byte "
                         f"hash, got {len(salt)} and {len(digest)} bytes")
    return iterations, salt, digest


def _shown(stored: object) -> str:
    """A hash for an error message: never the secret part."""
    if isinstance(stored, str) and stored.startswith(HASH_PREFIX):
        return repr(stored.rsplit("$", 1)[0] + "$...")
    return f"a {type(stored).__name__} of length {len(stored) if isinstance(stored, str) else '?'}"


def is_password_hash(stored: object) -> bool:
    """True when ``stored`` is a well-formed ``$7$`` hash."""
    try:
        _parse(stored)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def verify_password(password: str | bytes, stored: str) -> bool:
    """Does ``password`` match the ``$7$`` hash ``stored``? Compares in constant time.

    Raises:
        ValueError: ``stored`` is not a well-formed ``$7$`` hash (a fault of whoever stored it;
            an empty or wrong password just gives False).
    """
    iterations, salt, digest = _parse(stored)
    secret = _as_bytes(password)
    computed = hashlib.pbkdf2_hmac("sha512", secret, salt, iterations, _DIGEST_BYTES)
    return hmac.compare_digest(computed, digest) and bool(secret)

"""The director envelope: a per-device desired state, signed by the fleet server (Ed25519).

On the ``desired`` topic travels canonical JSON of::

    {"signed": <DesiredState.to_dict()>,
     "signatures": [{"keyid": <sha256 hex of the raw public key>, "sig": <hex signature>}]}

Each signature covers the canonical JSON bytes of ``signed``
(:func:`agent.protocol.messages.canonical_json`). :func:`verify_desired` is the agent's gate:
bytes, trusted keys, its own id, the last sequence it applied and ``now`` in; a
:class:`DesiredState` or an exception out. It accepts a state signed by any one trusted key, so
keys rotate by trusting old and new on the devices, signing with the new one (or both, while
devices still trust only the old), then dropping the old.

Errors (all :class:`agent.protocol.ProtocolError`, so ``ValueError``; split by who is at
fault)::

    DesiredStateRejected        the envelope must not be applied (hostile, stale or broken)
    ├── MalformedEnvelope       not the envelope shape, or the state inside is invalid
    ├── BadSignature            no valid signature by a trusted key
    ├── WrongDevice             signed for another device
    ├── ReplayedSequence        sequence not above the last applied one
    ├── NotYetValid             issued further in the future than the allowed clock skew
    └── Expired                 expires_at has passed
    KeyFormatError              a local key is not an Ed25519 key in PEM (configuration)

Calls that are misuse (no trusted keys, a key id that does not match its key) raise plain
``ValueError``/``TypeError``. ``cryptography`` is imported inside the functions that need it,
so the rest of :mod:`agent.protocol` imports without it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

from agent.protocol._errors import ProtocolError
from agent.protocol.messages import (
    MAX_MESSAGE_BYTES,
    DesiredState,
    MessageError,
    canonical_json,
    parse_json,
)
from agent.protocol.topics import is_valid_device_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "DEFAULT_MAX_CLOCK_SKEW",
    "BadSignature",
    "DesiredStateRejected",
    "Expired",
    "KeyFormatError",
    "MalformedEnvelope",
    "NotYetValid",
    "PrivateKeyLike",
    "PublicKeyLike",
    "ReplayedSequence",
    "WrongDevice",
    "load_private_key_pem",
    "load_public_key_pem",
    "public_key_id",
    "public_key_pem",
    "sign_desired",
    "trusted_keys_from_pem",
    "verify_desired",
]

#: seconds an ``issued_at`` may lie ahead of the device clock before the state is refused
DEFAULT_MAX_CLOCK_SKEW = 300
_RAW_KEY_BYTES = 32
_SIG_HEX = 128

PrivateKeyLike = Union["Ed25519PrivateKey", bytes, str]  # a key, or its PEM
PublicKeyLike = Union["Ed25519PublicKey", bytes]  # a key, or its 32 raw bytes


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
class DesiredStateRejected(ProtocolError):
    """A received desired-state envelope must not be applied."""


class MalformedEnvelope(DesiredStateRejected):
    """Not ``{"signed": ..., "signatures": [...]}``, or the state inside is invalid."""

    def __init__(self, field: str, expected: str, actual: object) -> None:
        self.field, self.expected, self.actual = field, expected, actual
        shown = repr(actual)
        if len(shown) > 160:
            shown = shown[:157] + "..."
        super().__init__(f"desired state envelope field {field!r}: expected {expected}, "
                         f"got {shown}")


class BadSignature(DesiredStateRejected):
    """No signature verifies under a trusted key (tampered, or signed by an unknown key)."""

    def __init__(self, trusted: Sequence[str], signed_by: Sequence[str], detail: str) -> None:
        self.trusted = tuple(trusted)
        self.signed_by = tuple(signed_by)
        super().__init__(f"desired state signature: expected a valid signature by one of "
                         f"{_short(self.trusted)}, got {detail}")


class WrongDevice(DesiredStateRejected):
    """The state is for another device."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"desired state is for device {actual!r}, expected this device "
                         f"{expected!r}")


class ReplayedSequence(DesiredStateRejected):
    """The sequence is not above the last applied one (a replay, or the state we already run:
    the retained message comes back on every reconnect; see :attr:`same_as_last`)."""

    def __init__(self, sequence: int, last_sequence: int) -> None:
        self.sequence, self.last_sequence = sequence, last_sequence
        super().__init__(f"desired state sequence {sequence} is not above the last applied "
                         f"{last_sequence}")

    @property
    def same_as_last(self) -> bool:
        """True when this is the sequence already applied (a redelivery, not an attack)."""
        return self.sequence == self.last_sequence


class NotYetValid(DesiredStateRejected):
    """``issued_at`` lies further ahead of the device clock than the allowed skew."""

    def __init__(self, issued_at: int, now: int, max_clock_skew: int) -> None:
        self.issued_at, self.now, self.max_clock_skew = issued_at, now, max_clock_skew
        super().__init__(f"desired state issued_at {issued_at} is {issued_at - now} s ahead of "
                         f"the device clock {now}, expected at most {max_clock_skew} s")


class Expired(DesiredStateRejected):
    """``expires_at`` is not after ``now``."""

    def __init__(self, expires_at: int, now: int) -> None:
        self.expires_at, self.now = expires_at, now
        super().__init__(f"desired state expired at {expires_at}, expected a time after now "
                         f"({now}; {now - expires_at} s ago)")


class KeyFormatError(ProtocolError):
    """A configured key is not an Ed25519 key in the expected form."""


def _short(keyids: Sequence[str]) -> str:
    return "[" + ", ".join(k[:12] for k in keyids) + "]"


# ---------------------------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------------------------
def _public_key(key: object) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

    if isinstance(key, Ed25519PublicKey):
        return key
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if isinstance(key, (bytes, bytearray)):
        if len(key) != _RAW_KEY_BYTES:
            raise KeyFormatError(f"raw Ed25519 public key: expected {_RAW_KEY_BYTES} bytes, "
                                 f"got {len(key)}")
        return Ed25519PublicKey.from_public_bytes(bytes(key))
    raise TypeError(f"expected an Ed25519 public key or its 32 raw bytes, got "
                    f"{type(key).__name__}")


def public_key_id(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """The key id: sha256 hex of the raw 32-byte public key (of a private key: its public).

    Raises:
        KeyFormatError: raw bytes that are not 32 long.
        TypeError: not an Ed25519 key or bytes.
    """
    from cryptography.hazmat.primitives import serialization

    raw = _public_key(key).public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def load_private_key_pem(data: bytes | str, password: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM (PKCS#8, optionally encrypted).

    Raises:
        KeyFormatError: not PEM, wrong password, or not an Ed25519 private key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = serialization.load_pem_private_key(raw, password=password)
    except (ValueError, TypeError) as exc:  # cryptography's errors for bad PEM / password
        raise KeyFormatError(f"private key: expected an Ed25519 private key in PEM, "
                             f"got an unreadable key ({type(exc).__name__})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"private key: expected Ed25519, got {type(key).__name__}")
    return key


def load_public_key_pem(data: bytes | str) -> Ed25519PublicKey:
    """Load an Ed25519 public key from PEM (SubjectPublicKeyInfo).

    Raises:
        KeyFormatError: not PEM, or not an Ed25519 public key.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise KeyFormatError(f"public key: expected an Ed25519 public key in PEM, "
                             f"got an unreadable key ({type(exc).__name__})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"public key: expected Ed25519, got {type(key).__name__}")
    return key


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The PEM (SubjectPublicKeyInfo) of a public key, or of a private key's public half.

    Raises:
        TypeError: not an Ed25519 key.
    """
    from cryptography.hazmat.primitives import serialization

    return _public_key(key).public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def trusted_keys_from_pem(pems: Sequence[bytes | str]) -> dict[str, Ed25519PublicKey]:
    """Build the ``public_keys`` mapping for :func:`verify_desired` from PEM public keys.

    Raises:
        KeyFormatError: one of them is not an Ed25519 public key in PEM.
    """
    keys = [load_public_key_pem(p) for p in pems]
    return {public_key_id(k): k for k in keys}


def _private_key(key: object) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, (bytes, str)):
        return load_private_key_pem(key)
    raise TypeError(f"expected an Ed25519 private key or its PEM, got {type(key).__name__}")


# ---------------------------------------------------------------------------------------------
# sign and verify
# ---------------------------------------------------------------------------------------------
def sign_desired(state: DesiredState, key: PrivateKeyLike | Sequence[PrivateKeyLike]) -> bytes:
    """Sign a desired state; return the envelope as canonical JSON bytes.

    Args:
        state: the state to sign (checked: we never sign what a device would refuse).
        key: an Ed25519 private key or its PEM; or several (one signature each), to sign
            with old and new key while devices rotate.

    Raises:
        MessageError: the state is invalid, or the envelope exceeds MAX_MESSAGE_BYTES.
        KeyFormatError: a PEM is not an Ed25519 private key.
        TypeError: a key is neither a key nor PEM.
        ValueError: no key given.
    """
    keys = [key] if isinstance(key, (bytes, str)) or not isinstance(key, Sequence) else key
    if not keys:
        raise ValueError("sign_desired: at least one private key is required")
    signed = state.to_dict()
    state.to_bytes()  # checks the state (and its size) exactly as a device will
    payload = canonical_json(signed, message=DesiredState.MESSAGE)
    signatures = []
    for k in keys:
        private = _private_key(k)
        signatures.append({"keyid": public_key_id(private),
                           "sig": private.sign(payload).hex()})
    envelope = canonical_json({"signed": signed, "signatures": signatures},
                              message=DesiredState.MESSAGE)
    if len(envelope) > MAX_MESSAGE_BYTES:
        raise MessageError("<envelope>", f"at most {MAX_MESSAGE_BYTES} bytes",
                           f"{len(envelope)} bytes", message=DesiredState.MESSAGE)
    return envelope


def _trusted(public_keys: Mapping[str, PublicKeyLike]) -> dict[str, Ed25519PublicKey]:
    if not public_keys:
        raise ValueError("verify_desired: no trusted public keys given")
    out: dict[str, Ed25519PublicKey] = {}
    for keyid, key in public_keys.items():
        public = _public_key(key)
        actual = public_key_id(public)
        if keyid != actual:
            raise ValueError(f"verify_desired: trusted key listed as {keyid!r} has key id "
                             f"{actual!r} (sha256 of the raw public key)")
        out[keyid] = public
    return out


def _signatures(envelope: dict[str, Any]) -> list[tuple[str, str]]:
    raw = envelope.get("signatures")
    if not isinstance(raw, list):
        raise MalformedEnvelope("signatures", "a list", type(raw).__name__)
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise MalformedEnvelope(f"signatures[{i}]", "an object", type(item).__name__)
        keyid, sig = item.get("keyid"), item.get("sig")
        if not isinstance(keyid, str):
            raise MalformedEnvelope(f"signatures[{i}].keyid", "a string", keyid)
        if not isinstance(sig, str):
            raise MalformedEnvelope(f"signatures[{i}].sig", "a hex string", sig)
        out.append((keyid, sig))
    return out


def _check_signature(payload: bytes, signatures: list[tuple[str, str]],
                     trusted: dict[str, Ed25519PublicKey]) -> None:
    from cryptography.exceptions import InvalidSignature

    known = [(keyid, sig) for keyid, sig in signatures if keyid in trusted]
    signed_by = [keyid for keyid, _ in signatures]
    if not known:
        detail = ("no signatures" if not signatures
                  else f"signatures only by unknown keys {_short(signed_by)}")
        raise BadSignature(list(trusted), signed_by, detail)
    for keyid, sig in known:
        try:
            sig_bytes = bytes.fromhex(sig)
        except ValueError:
            continue
        if len(sig_bytes) != _SIG_HEX // 2:
            continue
        try:
            trusted[keyid].verify(sig_bytes, payload)
        except InvalidSignature:
            continue
        return
    raise BadSignature(list(trusted), signed_by,
                       f"{len(known)} signature(s) by trusted keys that do not verify "
                       f"(tampered payload or corrupt signature)")


def verify_desired(
    envelope: bytes,
    *,
    public_keys: Mapping[str, PublicKeyLike],
    device_id: str,
    last_sequence: int,
    now: int,
    max_clock_skew: int = DEFAULT_MAX_CLOCK_SKEW,
) -> DesiredState:
    """Check a received envelope and return the desired state it carries.

    In order: size and shape, a valid signature by one trusted key over the canonical bytes of
    ``signed`` (before the state is parsed), a valid state, this device, a sequence above
    ``last_sequence``, ``issued_at <= now + max_clock_skew``, ``now < expires_at``.

    Args:
        envelope: the payload from the ``desired`` topic.
        public_keys: trusted keys by key id (:func:`public_key_id`); more than one while keys
            rotate. Values are Ed25519 public keys or their 32 raw bytes.
        device_id: this device.
        last_sequence: the sequence of the last state applied (0: none yet).
        now: unix seconds, read once by the caller.
        max_clock_skew: seconds ``issued_at`` may be ahead of ``now``.

    Raises:
        MalformedEnvelope: oversize, not JSON, not the envelope shape, or an invalid state.
        BadSignature: no signature by a trusted key verifies.
        WrongDevice: the state names another device.
        ReplayedSequence: ``sequence <= last_sequence``.
        NotYetValid: ``issued_at`` too far in the future.
        Expired: ``expires_at <= now``.
        ValueError: misuse: no trusted keys, a key id that is not its key's, an invalid
            ``device_id``, or a negative ``last_sequence``/``max_clock_skew``.
        TypeError: a trusted key is neither a key nor raw bytes.
    """
    if not is_valid_device_id(device_id):
        raise ValueError(f"verify_desired: invalid device_id {device_id!r}")
    if last_sequence < 0 or max_clock_skew < 0:
        raise ValueError(f"verify_desired: last_sequence ({last_sequence}) and max_clock_skew "
                         f"({max_clock_skew}) must be >= 0")
    trusted = _trusted(public_keys)
    try:
        data = parse_json(envelope, message="desired state envelope")
    except MessageError as exc:
        raise MalformedEnvelope(exc.field, exc.expected, exc.actual) from exc
    if not isinstance(data, dict):
        raise MalformedEnvelope("<root>", "an object", type(data).__name__)
    signed = data.get("signed")
    if not isinstance(signed, dict):
        raise MalformedEnvelope("signed", "an object", type(signed).__name__)
    payload = canonical_json(signed)  # parse_json already proved it encodes
    _check_signature(payload, _signatures(data), trusted)
    try:
        state = DesiredState.from_dict(signed)
    except MessageError as exc:
        raise MalformedEnvelope(f"signed.{exc.field}", exc.expected, exc.actual) from exc
    if state.device_id != device_id:
        raise WrongDevice(device_id, state.device_id)
    if state.sequence <= last_sequence:
        raise ReplayedSequence(state.sequence, last_sequence)
    if state.issued_at > now + max_clock_skew:
        raise NotYetValid(state.issued_at, now, max_clock_skew)
    if state.expires_at <= now:
        raise Expired(state.expires_at, now)
    return state
